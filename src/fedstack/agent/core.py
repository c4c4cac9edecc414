"""The agent's asyncio core: its state, and what it does with what arrives. No I/O.

:class:`AgentCore` holds one agent's state around a
:class:`~fedstack.wire.session.AgentSession` (which holds the protocol rules, the known
version, the pending upload and THE stale-upload rule): the book's client state
(:class:`ClientState`), the global model waiting for the trainer, uploads being queued
(and persisted through :mod:`fedstack.agent.state` before they are sent), the reactions
to the welcome and to every later event, and the waiters woken at each change. Its I/O
half, the connection loop (registration, reconnection with backoff and failover between
the known aggregators, heartbeats, polling, TLS diagnosis), is
:class:`fedstack.agent.connection.AgentConnection`. The aggregator URLs it knows (given,
learned from welcomes) are a :class:`fedstack.agent.urls.KnownAggregators`.

Every method and attribute belongs to the core's event loop: call them from that loop only
(:class:`fedstack.agent.client.Agent` is the facade that calls in from other threads).
Whoever waits for a change takes a waiter (:meth:`AgentCore.waiter`): a future the core
completes at its next change of state.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import enum
import logging
import os
import secrets
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from ssl import SSLContext
from typing import Any

import numpy as np

from fedstack.agent.state import AgentStateDir, SavedGlobal, SavedUpload
from fedstack.agent.urls import KnownAggregators, safe_url
from fedstack.errors import (
    ConnectionClosed,
    FederationFinished,
    FedstackError,
    RegistrationRefused,
    RemoteProtocolError,
)
from fedstack.names import check_agent_name
from fedstack.security.tls import client_context
from fedstack.types import Metrics, Weights
from fedstack.wire import Error, Limits, Message, ModelUpload, SecAggAbort, UploadAck, Welcome
from fedstack.wire.messages import SECAGG_SESSION
from fedstack.wire.session import (
    AgentSession,
    Event,
    GlobalModelReceived,
    HeartbeatReceived,
    Left,
    NotReadyReceived,
    Refused,
    RequestRefused,
    SecAggReceived,
    UploadAcknowledged,
)

log = logging.getLogger("fedstack.agent")

CLIENT = "fedstack-agent/0.1"

Waiter = asyncio.Future[None] | concurrent.futures.Future[None]


class ClientState(enum.IntEnum):
    """The book's four client states (``fl_main/lib/util/states.py``)."""

    waiting_gm = 0
    training = 1
    sending = 2
    gm_ready = 3


_W, _T, _S, _G = (
    ClientState.waiting_gm,
    ClientState.training,
    ClientState.sending,
    ClientState.gm_ready,
)

CLIENT_TRANSITIONS: dict[str, dict[ClientState, ClientState]] = {
    "model-proposed": {_W: _S, _S: _S},  # send_initial_model, or an upload restored
    "global-model": {_W: _G, _T: _G, _S: _G, _G: _G},  # a newer global model arrived
    "handed-over": {_G: _T},  # the trainer took the global model
    "upload-queued": {_W: _S, _T: _S, _S: _S},  # (a newer model waiting keeps gm_ready)
    "upload-done": {_S: _W},  # acknowledged, or refused for good
    "nothing-to-send": {_S: _W},  # welcomed without a model, nothing pending
}
"""Every change of the client state: event -> {state before: state after}; an event not
listed for the current state leaves it as it is."""


def clean_metrics(metrics: Mapping[str, Any] | None) -> Metrics:
    """``metrics`` as wire values (numpy scalars become Python numbers).

    Raises:
        TypeError: a value is not a number, string or bool.
    """
    out: Metrics = {}
    for k, v in (metrics or {}).items():
        if isinstance(v, np.generic):
            v = v.item()
        if not isinstance(v, (bool, int, float, str)):
            raise TypeError(f"metric {k!r} must be a number, string or bool, not {type(v)}")
        out[str(k)] = v
    return out


class AgentCore:
    """One agent's connection, protocol and state; see the module docstring.

    The arguments are those of :class:`fedstack.agent.client.Agent`.
    """

    def __init__(
        self,
        url: str | Sequence[str],
        name: str,
        *,
        token: str | None,
        enrollment_token: str | None,
        init_weights: bool,
        max_message_bytes: int,
        poll_wait: float,
        max_backoff: float,
        connect_timeout: float,
        ca: str | os.PathLike[str] | None,
        cert: str | os.PathLike[str] | None,
        key: str | os.PathLike[str] | None,
        state_dir: str | Path | None,
    ) -> None:
        check_agent_name(name)  # BadName (a ValueError) outside fedstack.names' grammar
        self.known = KnownAggregators(url)  # ConfigError: not aggregator URLs
        self.url = self.known.home
        """The aggregator connected to (or being tried now)."""
        self.moving: str | None = None
        """A URL :meth:`move_to` asked for, until the connection loop goes there."""
        self.welcomes = 0
        self.welcomed_at = 0.0  # time.monotonic() of the latest welcome
        self.name = name
        self.token = token if token is not None else os.environ.get("FEDSTACK_TOKEN") or None
        self.enrollment = (
            enrollment_token
            if enrollment_token is not None
            else os.environ.get("FEDSTACK_ENROLLMENT_TOKEN") or None
        )
        self.init_weights = init_weights
        self.limits = Limits(max_message_bytes=max_message_bytes)
        self.poll_wait = poll_wait
        self.max_backoff = max_backoff
        self.connect_timeout = connect_timeout
        self.ca = ca if ca is not None else (os.environ.get("FEDSTACK_CA") or None)
        self.client_cert = cert is not None
        self._cert, self._key = cert, key
        self._ssl: SSLContext | None = None
        if self.known.tls_only:  # certificate files are read now: errors show at once
            self._ssl = client_context(self.ca, cert, key)
        elif ca is not None or cert is not None or key is not None:
            log.warning(
                "%s: --ca/--cert/--key are ignored for %s: only wss:// URLs use TLS",
                name,
                ", ".join(self.known.given),
            )
        # an aggregator in this process (the simulator) is trusted with its values
        inproc = all(u.startswith("inproc://") for u in self.known.given)
        self.session = AgentSession(self.limits, check_values=not inproc)
        self.state = ClientState.waiting_gm
        self.initial: Weights | None = None
        self.initial_samples = 1
        self.initial_metrics: Metrics = {}
        self._gm: Weights | None = None  # the global model not yet handed to the trainer
        self._gm_next_extra: Weights = {}
        self.gm_extra: Weights = {}
        self.gm_final = False
        self.final_delivered = False
        self.training_base = -1
        self.error: FedstackError | None = None
        self.welcomed = False
        self.closing = False
        self.stopped = False
        self.round = 0
        self.reconnects = 0
        self.refusals: list[Error] = []
        self.acknowledged: list[UploadAck] = []
        self.on_refusal: Callable[[Error], None] | None = None
        self._waiters: list[Waiter] = []
        self.wake: asyncio.Event | None = None
        self.state_dir = None if state_dir is None else Path(state_dir)
        self.disk: AgentStateDir | None = None
        self._restored: SavedUpload | None = None
        self.secagg: Any = None
        """Secure aggregation (a :class:`fedstack.agent.secagg.SecAggAgent`) when the
        welcome's config has ``secagg``; None: plain uploads."""
        self._secagg_base: Weights | None = None  # the global model being trained on
        self.outbox: list[Message] = []
        """Secure-aggregation messages for the connection loop to send, in order."""
        if self.state_dir is not None:
            self._restore(self.state_dir)

    def _restore(self, state_dir: Path) -> None:
        """Open the state directory: load (or create) the identity and a pending upload."""
        disk = AgentStateDir(state_dir, self.name, self.token)
        self.disk = disk
        self.token = disk.identity.token
        self.session.agent_id = disk.identity.agent_id
        saved = disk.load_pending()
        if saved is not None:
            # re-sent after the first welcome (same upload_id: stored at most once); the
            # welcome decides whether it is still current (see _resume_pending)
            self._restored = saved
            self.session.queue_upload(saved.upload)
            self.move("model-proposed")
            log.info(
                "%s: restored upload %s (trained on v%d) from %s",
                self.name,
                saved.upload.upload_id[:8],
                saved.upload.base_version,
                state_dir,
            )

    # ------------------------------------------------------------------ aggregators
    @property
    def ssl(self) -> SSLContext | None:
        """The TLS context of :attr:`url` (None unless it is a ``wss://`` URL)."""
        return self.ssl_for(self.url)

    def ssl_for(self, url: str) -> SSLContext | None:
        """The TLS context for ``url``: None for ``ws://`` and ``inproc://``."""
        if not url.startswith("wss://"):
            return None
        if self._ssl is None:  # a wss:// URL added later (move_to)
            self._ssl = client_context(self.ca, self._cert, self._key)
        return self._ssl

    @property
    def aggregators(self) -> list[str]:
        """Every aggregator URL known: the given ones, then those learned from welcomes."""
        return self.known.all

    def move_to(self, url: str) -> str:
        """Ask the connection to leave its aggregator (``bye``) and join ``url`` (added to
        the known URLs); the pending upload follows. Returns the checked URL.

        Raises:
            ConfigError: ``url`` is not an aggregator URL.
        """
        url = self.known.add(url)
        self.ssl_for(url)  # a TLS setting problem shows here, not in the loop
        self.known.home = url
        self.moving = url
        log.info("%s: moving from %s to %s", self.name, safe_url(self.url), safe_url(url))
        self.notify()
        self._kick()
        return url

    def moved(self, url: str, since: int) -> bool | None:
        """True once welcomed by ``url`` after :attr:`welcomes` was ``since``; else None.

        Raises:
            the connection's error; ConnectionClosed if the connection loop stopped.
        """
        if self.welcomes > since and self.moving is None and self.url == url:
            return True
        if self.error is not None:
            raise self.error
        if self.stopped:
            raise ConnectionClosed(reason="agent stopped before it reached the aggregator")
        if self.closing:
            raise ConnectionClosed(reason="agent closed")
        return None

    # ------------------------------------------------------------------ changes and waiters
    def waiter(self, threadsafe: bool = False) -> Waiter:
        """A future completed at the core's next change of state (a concurrent future
        for a waiter in another thread)."""
        fut: Waiter
        if threadsafe or self.wake is None:
            fut = concurrent.futures.Future()
        else:
            fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        return fut

    def move(self, event: str) -> None:
        """Change the client state as :data:`CLIENT_TRANSITIONS` says for ``event``."""
        self.state = CLIENT_TRANSITIONS[event].get(self.state, self.state)

    def notify(self) -> None:
        """Wake every waiter: the state changed."""
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    def _kick(self) -> None:
        """Wake the connection (something to send, or closing)."""
        if self.wake is not None:
            self.wake.set()

    def propose(
        self, weights: Mapping[str, Any], num_samples: int, metrics: Mapping[str, Any] | None
    ) -> None:
        self.initial = {k: np.array(v, copy=True) for k, v in weights.items()}
        self.initial_samples = int(num_samples)
        self.initial_metrics = clean_metrics(metrics)
        self.move("model-proposed")

    def prepare_start(self) -> None:
        if self.token is None and self.enrollment is not None:
            # enrolling without a credential: make one; the aggregator binds it to the name
            self.token = secrets.token_urlsafe(32)
            if self.disk is not None:
                self.disk.save_identity(token=self.token)

    def close(self) -> None:
        """Ask the connection to leave (``bye``) and stop."""
        self.closing = True
        self.notify()
        self._kick()

    # ------------------------------------------------------------------ the trainer's side
    def take_global(self) -> Weights | None:
        """The new global model for the trainer (state -> training), or None if there is
        none yet.

        Raises:
            FederationFinished, ConnectionClosed, or the connection's error.
        """
        if self.error is not None:
            raise self.error
        if self.state == ClientState.gm_ready and self._gm is not None:
            self.move("handed-over")
            self.training_base = self.session.known_version
            self.gm_extra = self._gm_next_extra
            if self.gm_final:
                self.final_delivered = True
            # handed over: the agent keeps no reference (a big model's buffer is free
            # again as soon as the trainer is done with it)
            gm, self._gm = self._gm, None
            if self.secagg is not None:  # the update is the delta to this model: kept
                from fedstack.agent.secagg import copy_weights

                self._secagg_base = copy_weights(gm)
            return gm
        if self.final_delivered or (self.gm_final and self.closing):
            raise FederationFinished(
                f"the federation finished at version {self.session.known_version}"
            )
        if self.closing:
            raise ConnectionClosed(reason="agent closed")
        return None

    def take_global_kept(self) -> tuple[Weights, SavedGlobal | None] | None:
        """:meth:`take_global`, with the record the state directory keeps of it (None
        without a state directory): the caller writes it, off this loop, before the
        trainer gets the model."""
        gm = self.take_global()
        if gm is None:
            return None
        if self.disk is None:
            return gm, None
        record = SavedGlobal(
            version=self.training_base,
            run_id=self.session.run_id,
            aggregator_id=self.session.aggregator_id,
            final=self.final_delivered,
            received=time.time(),
            model=gm,
            extra=dict(self.gm_extra),
        )
        return gm, record

    def flushed(self) -> bool | None:
        """True if no upload awaits its acknowledgement (or none will come), else None.

        Raises:
            the connection's error.
        """
        if self.session.pending is None:
            return True
        if self.error is not None:
            raise self.error
        return True if self.gm_final and self.closing else None

    def started(self) -> bool | None:
        """True once welcomed; None while not yet.

        Raises:
            the connection's error; ConnectionClosed if it stopped before a welcome.
        """
        if self.welcomed:
            return True
        if self.error is not None:
            raise self.error
        if self.stopped:
            raise ConnectionClosed(reason="agent stopped before it was welcomed")
        return None

    def new_upload(
        self,
        model: Weights,
        num_samples: int,
        metrics: Mapping[str, Any] | None,
        extra: Weights | None,
    ) -> ModelUpload | None:
        """The upload of a trained ``model`` (private to the agent), or None if it is not
        to be sent (the federation finished, or the model is stale). Without a state
        directory it is queued at once; with one, :meth:`commit_upload` queues it once it
        is on disk."""
        if num_samples < 0:
            raise ValueError("num_samples must be >= 0")
        clean = clean_metrics(metrics)
        if self._not_to_send("training on"):
            return None
        upload = ModelUpload(
            upload_id=uuid.uuid4().hex,
            base_version=max(self.training_base, 0),
            num_samples=int(num_samples),
            metrics=clean,
            model=model,
            extra=extra,
        )
        if self.disk is None:
            self.commit_upload(upload)
        return upload

    def secagg_update(self, model: Weights, num_samples: int) -> bool:
        """Secure aggregation: keep the trained ``model`` for the sessions of its round
        (never sent as it is); False if it is not to be sent (finished or stale)."""
        if num_samples < 0:
            raise ValueError("num_samples must be >= 0")
        if self._not_to_send("training on") or self._secagg_base is None:
            return False
        self.secagg.agent_id = self.session.agent_id
        out = self.secagg.set_update(
            model, self._secagg_base, max(self.training_base, 0), int(num_samples)
        )
        self._secagg_base = None
        self.move("upload-queued")
        self._send_secagg(out)
        self.notify()
        return True

    def _send_secagg(self, messages: list[Message]) -> None:
        """Queue what the secure aggregation sends (a masked input is the pending upload:
        re-sent with its id after a reconnect, cleared by its acknowledgement)."""
        for m in messages:
            if isinstance(m, ModelUpload):
                self.session.queue_upload(m)
                self.move("upload-queued")
            else:
                self.outbox.append(m)
        if messages:
            self._kick()

    def commit_upload(self, upload: ModelUpload) -> bool:
        """Queue ``upload`` (written to disk meanwhile) unless it became stale."""
        if self.disk is not None and self._not_to_send("saving the model trained on"):
            return False
        self.session.queue_upload(upload)
        self.move("upload-queued")
        self.notify()
        self._kick()
        return True

    def _not_to_send(self, doing: str) -> bool:
        if self.final_delivered:
            log.info("%s: federation finished; not uploading", self.name)
            return True
        if self.session.is_stale(self.training_base):  # THE rule, in the session
            log.info(
                "%s: a newer global model (v%d) arrived while %s v%d; discarding it",
                self.name,
                self.session.known_version,
                doing,
                self.training_base,
            )
            return True
        return False

    # ------------------------------------------------------------------ what arrives
    def on_welcome(self, w: Welcome, new_model: bool) -> None:
        previous = self.session.aggregator_id if self.welcomes else None
        self.welcomes += 1
        self.welcomed_at = time.monotonic()
        self.known.home = self.url
        if self.known.learn(w.aggregators, self.url) and self.known.learned:
            log.info(
                "%s: aggregators of this federation: %s",
                self.name,
                ", ".join(safe_url(u) for u in self.known.learned),
            )
        if previous is not None and previous != w.aggregator_id:
            log.info(
                "%s: now with aggregator %s at %s (run %s, version %d)",
                self.name,
                safe_url(w.aggregator_id[:32]),
                safe_url(self.url),
                safe_url(w.run_id[:32]),
                w.version,
            )
        self.round = w.round
        self._setup_secagg(w)
        if self._restored is not None and self._resume_pending(w):
            # the restored upload was trained on this very model: wait for the next one
            self._gm, self._gm_next_extra = w.model, w.extra or {}
        elif new_model:
            assert w.model is not None
            self._new_global(w.version, w.model, w.finished, w.extra)
        elif w.finished:
            self.gm_final = True
        # an upload trained on an older model that the aggregator never acknowledged is
        # still sent: the aggregator's staleness policy decides what becomes of it
        if self.session.pending is None and w.model is None:
            self.move("nothing-to-send")
        if self.disk is not None:
            known = self.disk.identity.agent_id
            if known is not None and known != w.agent_id:
                log.warning(
                    "%s: the aggregator now knows this agent as %s (was %s)",
                    self.name,
                    w.agent_id[:8],
                    known[:8],
                )
            version = self.session.known_version
            self.disk.save_identity(
                agent_id=w.agent_id,
                aggregator_id=w.aggregator_id,
                run_id=w.run_id,
                **({"version": version} if version >= 0 else {}),
            )
        self.welcomed = True
        self.notify()
        log.info(
            "%s: welcomed as %s (version %d, %s delivery)",
            self.name,
            w.agent_id[:8],
            w.version,
            w.delivery,
        )

    def _setup_secagg(self, w: Welcome) -> None:
        """Secure aggregation on (or off) as the welcome's config says."""
        if w.config.get("secagg") is not True:
            if self.secagg is not None:
                log.warning("%s: the aggregator no longer runs secure aggregation", self.name)
            self.secagg = None
            return
        from fedstack.agent.secagg import SecAggAgent, params_from_config

        try:
            params = params_from_config(w.config)
        except FedstackError as exc:
            raise RemoteProtocolError(
                f"the aggregator's secure-aggregation settings are refused: {exc}",
                code="bad-field",
            ) from None
        if self.secagg is None or self.secagg.params != params:
            self.secagg = SecAggAgent(params, self.name)
        self.secagg.agent_id = w.agent_id

    def _resume_pending(self, w: Welcome) -> bool:
        """Decide, at the first welcome after a restart, what becomes of the upload restored
        from the state directory: re-sent with its upload_id (the aggregator stores it at
        most once), or discarded if it belongs to another run or is stale (the session's
        rule). Returns True if it is current: the welcome's model is the one it was
        trained on."""
        saved, self._restored = self._restored, None
        assert saved is not None and self.disk is not None
        up = saved.upload
        reason = None
        if self.secagg is not None:
            reason = "the federation runs secure aggregation: a plain model is never sent"
        elif saved.run_id is not None and saved.run_id != w.run_id:
            reason = f"it was trained in run {saved.run_id[:8]}, not {w.run_id[:8]}"
        elif self.session.is_stale(up.base_version, restored=True):
            reason = f"it was trained on v{up.base_version}, the global model is now v{w.version}"
        if reason is None:
            log.info(
                "%s: re-sending upload %s restored from %s",
                self.name,
                up.upload_id[:8],
                self.state_dir,
            )
            return w.model is not None and w.version == up.base_version and not w.finished
        log.warning(
            "%s: discarding the upload %s restored from %s: %s",
            self.name,
            up.upload_id[:8],
            self.state_dir,
            reason,
        )
        self.session.drop_upload(up.upload_id)
        self.disk.clear_pending(up.upload_id)
        return False

    def _new_global(self, version: int, model: Weights, final: bool, extra: Weights | None) -> None:
        """A global model newer than any before (the session decided)."""
        if self.secagg is not None:
            self.secagg.new_global(version)
        self._gm = model
        self._gm_next_extra = extra or {}
        self.gm_final = final
        self.move("global-model")
        self.notify()
        if self.disk is not None:
            self.disk.save_identity(version=version)

    def on_event(self, event: Event) -> None:
        """Act on what the aggregator sent after the welcome."""
        if isinstance(event, GlobalModelReceived):
            msg = event.message
            if event.new:
                self._new_global(msg.version, msg.model, msg.final, msg.extra)
            self.round = msg.version + 1
        elif isinstance(event, UploadAcknowledged):
            ack = event.message
            if event.matched:
                self.acknowledged.append(ack)
                self.move("upload-done")
                self.notify()
            if self.disk is not None:
                self.disk.clear_pending(ack.upload_id)  # only if it is the one on disk
            if ack.message:
                log.info("%s: upload %s: %s", self.name, ack.status, ack.message)
        elif isinstance(event, RequestRefused):
            err = event.error
            log.error("%s: aggregator refused a request: %s", self.name, err.message)
            self.refusals.append(err)
            if self.on_refusal is not None:
                self.on_refusal(err)
            if event.dropped_upload is not None:
                if self.disk is not None:
                    self.disk.clear_pending(event.dropped_upload)
                self.move("upload-done")
                self.notify()
        elif isinstance(event, Refused):  # a fatal error: the aggregator closes
            err = event.error
            if event.permanent:  # e.g. revoked: reconnecting cannot help
                self.refusals.append(err)
                raise RegistrationRefused(
                    f"{self.url} disconnected {self.name!r}: {err.message}", code=err.code
                )
            raise RemoteProtocolError(f"aggregator error: {err.message}", code=err.code)
        elif isinstance(event, SecAggReceived):
            if self.secagg is not None:
                sa_msg = event.message
                if isinstance(sa_msg, SecAggAbort):  # its masked input is void: not re-sent
                    pending = self.session.pending
                    if (
                        pending is not None
                        and pending.metrics.get(SECAGG_SESSION) == sa_msg.session
                    ):
                        self.session.drop_upload(pending.upload_id)
                self._send_secagg(self.secagg.on_message(sa_msg, self.session.agent_id))
        elif isinstance(event, Left):
            raise ConnectionClosed(1001, event.reason)
        else:
            assert isinstance(event, (NotReadyReceived, HeartbeatReceived))
