"""The agent library: the book's client API, event-driven, over one outbound connection.

Usage from a plain training loop (the book's names)::

    agent = Agent("ws://127.0.0.1:8765", name="a1")
    agent.send_initial_model(weights)
    agent.start()                       # or agent.start_fl_client()
    while True:
        try:
            gm = agent.wait_for_global_model()
        except FederationFinished:
            break
        weights, n, metrics = train(gm)
        agent.send_trained_model(weights, n, metrics)
    agent.close()

A background thread runs the connection: registration, uploads (kept until acknowledged and
re-sent after a reconnect), pushed global models or (long-)polling, heartbeats, and
reconnection with capped exponential backoff and jitter. Code that already runs on an event
loop (the simulator: thousands of agents on one loop) uses the same agent without a thread:
``await agent.start_async()``, ``await agent.wait_for_global_model_async()``,
``agent.send_trained_model(...)`` (never blocks without a ``state_dir``) and
``await agent.close_async()``. The book's state machine
(``waiting_gm -> training -> sending -> gm_ready``) is kept, driven by events instead of a
state file polled every 5 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import random
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fedstack import aio
from fedstack.agent.state import AgentStateDir, SavedUpload
from fedstack.buffers import take_arrays
from fedstack.errors import (
    ConnectionClosed,
    FederationFinished,
    FedstackError,
    ProtocolError,
    RegistrationRefused,
    RemoteProtocolError,
    TLSError,
)
from fedstack.names import check_agent_name
from fedstack.security.tls import client_context, diagnose
from fedstack.transport import Connection, connect
from fedstack.types import Metrics, Weights
from fedstack.wire import (
    Bye,
    Error,
    GlobalModel,
    Heartbeat,
    Limits,
    ModelUpload,
    NotReady,
    Participate,
    Poll,
    UploadAck,
    Welcome,
    decode,
    encode,
)

log = logging.getLogger("fedstack.agent")


AUTH_ERRORS = frozenset({"revoked", "auth-required", "bad-credential", "weak-token"})
"""Fatal error codes after which the agent stops instead of reconnecting."""


class ClientState(enum.IntEnum):
    """The book's four client states (``fl_main/lib/util/states.py``)."""

    waiting_gm = 0
    training = 1
    sending = 2
    gm_ready = 3


def _clean_metrics(metrics: Mapping[str, Any] | None) -> Metrics:
    out: Metrics = {}
    for k, v in (metrics or {}).items():
        if isinstance(v, np.generic):
            v = v.item()
        if not isinstance(v, (bool, int, float, str)):
            raise TypeError(f"metric {k!r} must be a number, string or bool, not {type(v)}")
        out[str(k)] = v
    return out


class Agent:
    """A federated-learning agent: trains where its data lives, exchanges only weights.

    Args:
        url: the aggregator, ``ws://HOST:PORT``.
        name: this agent's stable name (same name and token -> same agent after restarts).
        token: the agent's credential (``fedstack credentials add NAME`` prints it);
            default: the ``FEDSTACK_TOKEN`` environment variable.
        enrollment_token: the deployment's shared enrollment token (default:
            ``FEDSTACK_ENROLLMENT_TOKEN``): lets this agent register a NEW name; without a
            ``token`` the agent then makes its own at :meth:`start` (see :attr:`token`).
        init_weights: the book's ``init_weights_flag``: whether this agent's initial model
            seeds the global model (True) or only its structure, with zeros (False).
        max_message_bytes: largest message accepted from the aggregator.
        poll_wait: in polling mode, seconds the aggregator may hold a poll open.
        max_backoff: cap of the reconnection backoff, seconds.
        connect_timeout: seconds to open one connection.
        ca: for ``wss://`` URLs, PEM file of the CA that signed the aggregator's certificate
            (default: ``FEDSTACK_CA``, else the system's trust store). The certificate and
            the URL's host name are always verified.
        cert, key: a client certificate (PEM) and its key, for aggregators that require
            one (mutual TLS); ``key`` may be omitted if it is in the ``cert`` file.
        state_dir: a directory (created, mode 0700) where the agent keeps its identity and
            the upload awaiting acknowledgement, written atomically, so that after a crash
            (even SIGKILL) the agent restarted with the same directory resumes as the same
            agent and re-sends that upload with the same id (see
            :mod:`fedstack.agent.state`). None (the default) keeps everything in memory.

    Raises:
        ConfigError: ``state_dir`` belongs to an agent of another name, or is unusable.
    """

    def __init__(
        self,
        url: str,
        name: str,
        *,
        token: str | None = None,
        enrollment_token: str | None = None,
        init_weights: bool = True,
        max_message_bytes: int = 1 << 30,
        poll_wait: float = 30.0,
        max_backoff: float = 10.0,
        connect_timeout: float = 10.0,
        ca: str | os.PathLike[str] | None = None,
        cert: str | os.PathLike[str] | None = None,
        key: str | os.PathLike[str] | None = None,
        state_dir: str | Path | None = None,
    ) -> None:
        check_agent_name(name)  # BadName (a ValueError) outside fedstack.names' grammar
        self.url = url
        self.name = name
        self._token = token if token is not None else os.environ.get("FEDSTACK_TOKEN") or None
        self._enrollment = (enrollment_token if enrollment_token is not None
                            else os.environ.get("FEDSTACK_ENROLLMENT_TOKEN") or None)
        self.init_weights = init_weights
        self.limits = Limits(max_message_bytes=max_message_bytes)
        self.poll_wait = poll_wait
        self.max_backoff = max_backoff
        self.connect_timeout = connect_timeout
        self.ca = ca if ca is not None else (os.environ.get("FEDSTACK_CA") or None)
        self._client_cert = cert is not None
        self._ssl = client_context(self.ca, cert, key) if url.startswith("wss://") else None
        if self._ssl is None and (ca is not None or cert is not None or key is not None):
            log.warning("%s: --ca/--cert/--key are ignored for %s: only wss:// URLs use TLS",
                        name, url)
        self._cond = threading.Condition()
        self._state = ClientState.waiting_gm
        self._initial: Weights | None = None
        self._initial_samples = 1
        self._initial_metrics: Metrics = {}
        self._gm: Weights | None = None
        self._gm_extra: Weights = {}
        self._gm_next_extra: Weights = {}
        self._gm_version = -1
        self._gm_final = False
        self._training_base = -1
        self._final_delivered = False
        self._pending: ModelUpload | None = None
        self._error: FedstackError | None = None
        self._welcomed = threading.Event()
        self._closing = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None  # the connection, without a thread
        self._changed: asyncio.Event | None = None  # state changed (for *_async waiters)
        self.agent_id: str | None = None
        self.aggregator_id: str | None = None
        self.delivery = "push"
        self.federation_config: Metrics = {}
        """Settings the aggregator sends every agent (e.g. ``fedprox_mu``)."""
        self.round = 0
        self.reconnects = 0
        self.refusals: list[Error] = []
        """Requests the aggregator refused (e.g. an upload that failed validation)."""
        self.on_refusal: Callable[[Error], None] | None = None
        """Called (on the connection's loop) with each request the aggregator refuses
        without closing the connection, e.g. an upload that does not fit its strategy."""
        self.acknowledged: list[UploadAck] = []
        """Every upload acknowledgement received (the upload is then in the store)."""
        self.run_id: str | None = None
        self.state_dir = None if state_dir is None else Path(state_dir)
        self._disk: AgentStateDir | None = None
        self._restored: SavedUpload | None = None
        if self.state_dir is not None:
            self._restore(self.state_dir)

    def _restore(self, state_dir: Path) -> None:
        """Open the state directory: load (or create) the identity and a pending upload."""
        disk = AgentStateDir(state_dir, self.name, self._token)
        self._disk = disk
        self._token = disk.identity.token
        self.agent_id = disk.identity.agent_id
        saved = disk.load_pending()
        if saved is not None:
            # re-sent after the first welcome (same upload_id: stored at most once); the
            # welcome decides whether it is still current (see _resume_pending)
            self._restored = saved
            self._pending = saved.upload
            self._state = ClientState.sending
            log.info("%s: restored upload %s (trained on v%d) from %s", self.name,
                     saved.upload.upload_id[:8], saved.upload.base_version, state_dir)

    # ------------------------------------------------------------------ book API
    @property
    def token(self) -> str | None:
        """This agent's credential (after :meth:`start`, also one it made to enroll):
        keep it to reconnect as the same agent (e.g. as ``FEDSTACK_TOKEN``)."""
        return self._token

    @property
    def state(self) -> ClientState:
        return self._state

    @property
    def global_extra(self) -> Weights:
        """Extra arrays that came with the global model last returned (e.g. FedCurv's
        summed statistics, SCAFFOLD's server control variate)."""
        return self._gm_extra

    @property
    def finished(self) -> bool:
        """True once :meth:`wait_for_global_model` returned the federation's final model."""
        return self._final_delivered

    @property
    def version(self) -> int:
        """Version of the latest global model received (-1: none yet)."""
        return self._gm_version

    def send_initial_model(
        self,
        weights: Mapping[str, Any],
        num_samples: int = 1,
        metrics: Mapping[str, Any] | None = None,
    ) -> None:
        """Propose the initial model (the book's template model). Call before :meth:`start`.

        If this agent is the first to join, the model fixes the federation's tensor names,
        shapes and dtypes, and (with ``init_weights``) its weights start the federation.
        """
        if self._thread is not None:
            raise RuntimeError("send_initial_model() must be called before start()")
        self._initial = {k: np.array(v, copy=True) for k, v in weights.items()}
        self._initial_samples = int(num_samples)
        self._initial_metrics = _clean_metrics(metrics)
        with self._cond:
            self._state = ClientState.sending

    def start(self, timeout: float | None = 120.0) -> None:
        """Connect and register; return once the aggregator welcomed this agent.

        Keeps retrying (with backoff) while the aggregator is unreachable, up to ``timeout``.

        Raises:
            RegistrationRefused: the aggregator refused this agent.
            TLSError: the TLS handshake failed in a way no retry fixes (the aggregator's
                certificate does not verify against the CA, a client certificate is missing
                or refused, or a ws:// URL names a port that speaks only TLS): at once.
            TimeoutError: no welcome within ``timeout`` seconds.
        """
        self._prepare_start()
        self._thread = threading.Thread(target=self._thread_main,
                                        name=f"fedstack-agent-{self.name}",
                                        daemon=True)
        self._thread.start()
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._welcomed.wait(0.05):
            with self._cond:
                if self._error is not None:
                    raise self._error
            if self._thread is not None and not self._thread.is_alive():
                raise ConnectionClosed(reason="agent stopped before it was welcomed")
            if deadline is not None and time.monotonic() > deadline:
                self.close()
                raise TimeoutError(f"no welcome from {self.url} within {timeout} s; "
                                   "is the aggregator running?")

    start_fl_client = start
    """The book's name for :meth:`start`."""

    def _prepare_start(self) -> None:
        if self._thread is not None or self._task is not None:
            raise RuntimeError("the agent is already started")
        if self._token is None and self._enrollment is not None:
            # enrolling without a credential: make one; the aggregator binds it to the name
            self._token = secrets.token_urlsafe(32)
            if self._disk is not None:
                self._disk.save_identity(token=self._token)

    # ------------------------------------------------------------------ on an event loop
    async def start_async(self, timeout: float | None = 120.0) -> None:
        """:meth:`start` for code running on an event loop: the connection runs as a task
        of the running loop instead of a thread. Then use the ``*_async`` methods (and
        :meth:`send_trained_model`) from that loop only.

        Raises:
            RegistrationRefused, TLSError, TimeoutError: as :meth:`start`.
        """
        self._prepare_start()
        self._changed = asyncio.Event()
        self._task = asyncio.create_task(self._main(), name=f"fedstack-agent-{self.name}")
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._welcomed.is_set():
            with self._cond:
                if self._error is not None:
                    raise self._error
            if self._task.done():
                raise ConnectionClosed(reason="agent stopped before it was welcomed")
            if not await self._until_changed(deadline):
                await self.close_async()
                raise TimeoutError(f"no welcome from {self.url} within {timeout} s; "
                                   "is the aggregator running?")

    async def wait_for_global_model_async(self, timeout: float | None = None) -> Weights:
        """:meth:`wait_for_global_model` without blocking the event loop."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._cond:
                gm = self._take_global()
            if gm is not None:
                return gm
            if not await self._until_changed(deadline):
                raise TimeoutError("no new global model in time")

    async def flush_async(self, timeout: float | None = 60.0) -> None:
        """:meth:`flush` without blocking the event loop."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._flushed():
            if not await self._until_changed(deadline):
                raise TimeoutError(f"{self.name}: upload not acknowledged within "
                                   f"{timeout} s")

    async def close_async(self, timeout: float = 10.0) -> None:
        """:meth:`close` without blocking the event loop."""
        with self._cond:
            self._closing = True
            self._notify()
        self._kick()
        if self._task is not None:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self._task), timeout)
            if not self._task.done():
                self._task.cancel()

    async def _until_changed(self, deadline: float | None) -> bool:
        """Wait until the connection changed the agent's state (at most 1 s, or until
        ``deadline``). False if the deadline has passed."""
        assert self._changed is not None, "not started with start_async()"
        wait = 1.0 if deadline is None else min(1.0, deadline - time.monotonic())
        if wait <= 0:
            return False
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait):
                await self._changed.wait()
        self._changed.clear()
        return True

    def _notify(self) -> None:
        """Wake whoever waits for a state change (call with ``self._cond`` held)."""
        self._cond.notify_all()
        if self._changed is not None:
            self._changed.set()

    def wait_for_global_model(self, timeout: float | None = None) -> Weights:
        """Block until a global model newer than the last one returned is available.

        Raises:
            FederationFinished: the final global model was already returned.
            TimeoutError: nothing arrived within ``timeout`` seconds.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                gm = self._take_global()
                if gm is not None:
                    return gm
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError("no new global model in time")
                self._cond.wait(remaining if remaining is not None else 1.0)

    def _take_global(self) -> Weights | None:
        """The new global model for the trainer (state -> training), or None if there is
        none yet. Call with ``self._cond`` held.

        Raises:
            FederationFinished, ConnectionClosed, or the connection's error.
        """
        if self._error is not None:
            raise self._error
        if self._state == ClientState.gm_ready and self._gm is not None:
            self._state = ClientState.training
            self._training_base = self._gm_version
            self._gm_extra = self._gm_next_extra
            if self._gm_final:
                self._final_delivered = True
            # handed over: the agent keeps no reference (a big model's buffer is free
            # again as soon as the trainer is done with it)
            gm, self._gm = self._gm, None
            return gm
        if self._final_delivered or (self._gm_final and self._closing):
            raise FederationFinished(f"the federation finished at version {self._gm_version}")
        if self._closing:
            raise ConnectionClosed(reason="agent closed")
        return None

    def send_trained_model(
        self,
        weights: Mapping[str, Any],
        num_samples: int,
        metrics: Mapping[str, Any] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> bool:
        """Upload a locally trained model (and optional extra named arrays).

        Returns False (and sends nothing) when the result is stale: a newer global model
        arrived while training (the book's rule; asynchronous strategies such as FedAsync
        turn it off through the federation config ``discard_stale: false``, because they
        weigh stale updates themselves), or the federation is finished.

        With a ``state_dir`` the upload is written there before it is sent (StoreError if
        that fails) and removed when the aggregator acknowledges it.
        """
        model = {k: np.array(v, copy=True) for k, v in weights.items()}
        extras = {k: np.array(v, copy=True) for k, v in (extra or {}).items()} or None
        return self._queue_upload(model, num_samples, metrics, extras)

    def send_owned_model(
        self,
        weights: dict[str, Any],
        num_samples: int,
        metrics: Mapping[str, Any] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> bool:
        """:meth:`send_trained_model` for a caller that gives ``weights`` (and ``extra``)
        up: the dicts are emptied, and each array nothing else refers to (a trainer's
        fresh result) is sent as it is instead of copied; anything still referred to
        elsewhere is copied. The simulator uploads this way."""
        model = take_arrays(weights)
        extras = take_arrays(extra) if extra else None
        return self._queue_upload(model, num_samples, metrics, extras)

    def _queue_upload(self, model: Weights, num_samples: int,
                      metrics: Mapping[str, Any] | None, extras: Weights | None) -> bool:
        """Queue the upload of ``model``/``extras``, which are private to this agent."""
        if num_samples < 0:
            raise ValueError("num_samples must be >= 0")
        clean = _clean_metrics(metrics)
        with self._cond:
            if self._final_delivered:
                log.info("%s: federation finished; not uploading", self.name)
                return False
            discard = bool(self.federation_config.get("discard_stale", True))
            if (discard and self._state == ClientState.gm_ready
                    and self._gm_version > self._training_base):
                log.info("%s: a newer global model (v%d) arrived during training on v%d; "
                         "discarding the trained model", self.name, self._gm_version,
                         self._training_base)
                return False
            upload = ModelUpload(
                upload_id=uuid.uuid4().hex, base_version=max(self._training_base, 0),
                num_samples=int(num_samples), metrics=clean, model=model, extra=extras,
            )
            if self._disk is None:
                self._pending = upload
                self._state = ClientState.sending
        if self._disk is not None and not self._persist_pending(upload):
            return False
        self._kick()
        return True

    def _persist_pending(self, upload: ModelUpload) -> bool:
        """Write ``upload`` to the state directory, then queue it: on disk BEFORE it is
        sent, so that after a crash from here on the restarted agent re-sends it."""
        assert self._disk is not None
        self._disk.save_pending(upload, self.run_id)  # outside the lock: may be large
        with self._cond:
            discard = bool(self.federation_config.get("discard_stale", True))
            if not (self._final_delivered or (
                    discard and self._state == ClientState.gm_ready
                    and self._gm_version > self._training_base)):
                self._pending = upload
                if self._state != ClientState.gm_ready:
                    self._state = ClientState.sending
                return True
        # a newer global model arrived while the upload was being written: stale after all
        log.info("%s: a newer global model (v%d) arrived while saving the model trained on "
                 "v%d; discarding it", self.name, self._gm_version, self._training_base)
        self._disk.clear_pending(upload.upload_id)
        return False

    def flush(self, timeout: float | None = 60.0) -> None:
        """Block until the aggregator acknowledged the last upload (it is then stored), or
        refused it. Returns at once when nothing is pending.

        Raises:
            TimeoutError: still unacknowledged after ``timeout`` seconds.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._flushed():
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"{self.name}: upload not acknowledged within "
                                       f"{timeout} s")
                self._cond.wait(remaining if remaining is not None else 1.0)

    def _flushed(self) -> bool:
        """True if no upload awaits its acknowledgement (or none will come)."""
        with self._cond:
            if self._pending is None:
                return True
            if self._error is not None:
                raise self._error
            return self._gm_final and self._closing

    def close(self, timeout: float = 10.0) -> None:
        """Leave the federation cleanly (sends ``bye``) and stop the background thread."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._kick()
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> Agent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ background thread
    def _kick(self) -> None:
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None and not loop.is_closed():
            if self._loop_thread == threading.get_ident():  # called on the loop itself
                wake.set()
                return
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(wake.set)

    def _thread_main(self) -> None:
        with aio.runner() as r:
            r.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._wake = asyncio.Event()
        try:
            await self._connection()
        finally:  # waiters re-check: nothing more will come from this connection
            with self._cond:
                self._notify()

    async def _connection(self) -> None:
        backoff = 0.05
        while not self._closing:
            conn: Connection | None = None
            try:
                conn = await connect(self.url, max_message_bytes=self.limits.max_message_bytes,
                                     open_timeout=self.connect_timeout, ssl=self._ssl)
                done = await self._session(conn)
                backoff = 0.05
                if done:
                    return
            except RegistrationRefused as exc:
                with self._cond:
                    self._error = exc
                    self._notify()
                return
            except (OSError, ConnectionClosed, TimeoutError, ProtocolError) as exc:
                fatal = None if conn is not None else await self._tls_fatal(exc)
                if fatal is not None:  # a certificate problem: retrying cannot fix it
                    log.error("%s: %s", self.name, fatal)
                    with self._cond:
                        self._error = fatal
                        self._notify()
                    return
                if self._closing or self._gm_final:
                    # after the final model the aggregator goes away: nothing to reconnect to
                    with self._cond:
                        self._notify()
                    return
                log.info("%s: connection to %s lost (%s); retrying in %.2f s", self.name,
                         self.url, exc or type(exc).__name__, backoff)
            except Exception as exc:
                # never leave the training loop waiting on a dead thread
                log.exception("%s: agent connection failed", self.name)
                with self._cond:
                    self._error = FedstackError(f"agent {self.name} stopped: {exc!r}")
                    self._notify()
                return
            finally:
                if conn is not None:
                    conn.abort()
            self.reconnects += 1
            # capped exponential backoff with full jitter, interruptible by close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wait_closing(), backoff * (0.5 + random.random()))
            backoff = min(backoff * 2, self.max_backoff)

    async def _tls_fatal(self, exc: BaseException) -> TLSError | None:
        """A TLSError if opening the connection failed for a TLS reason (wrong CA, host name
        not in the certificate, client certificate refused or missing, ws:// to a TLS-only
        port), None if the failure may be transient."""
        if self._closing:
            return None
        try:
            return await diagnose(self.url, exc, self._ssl, ca=self.ca,
                                  client_cert=self._client_cert,
                                  timeout=min(2.0, self.connect_timeout))
        except Exception:  # the diagnosis must never stop the reconnect loop
            log.debug("%s: TLS diagnosis failed", self.name, exc_info=True)
            return None

    async def _wait_closing(self) -> None:
        assert self._wake is not None
        while not self._closing:
            await self._wake.wait()
            self._wake.clear()

    async def _session(self, conn: Connection) -> bool:
        """Run one connection. Returns True when the agent is done (closed or finished)."""
        assert self._wake is not None
        with self._cond:
            known = self._gm_version
            initial = self._initial if known < 0 else None
        conn.write(encode(Participate(
            agent_name=self.name, token=self._token, enrollment=self._enrollment, model=initial,
            init_weights=self.init_weights, num_samples=self._initial_samples,
            metrics=self._initial_metrics, known_version=known, client="fedstack-agent/0.1",
        )))
        await conn.drain()
        welcome = decode(await asyncio.wait_for(conn.recv(), 3600.0), self.limits)
        if isinstance(welcome, Error):
            if welcome.code in AUTH_ERRORS or welcome.code in ("refused", "bad-name"):
                raise RegistrationRefused(
                    f"{self.url} refused {self.name!r}: {welcome.message}", code=welcome.code)
            # e.g. the aggregator's store is unavailable: a transient failure, retry
            raise RemoteProtocolError(f"{self.url} could not register {self.name!r} now: "
                                      f"{welcome.message}", code=welcome.code)
        if not isinstance(welcome, Welcome):
            raise RemoteProtocolError(f"expected welcome, got {welcome.TYPE}")
        self._on_welcome(welcome)
        interval = welcome.heartbeat_interval
        del welcome  # its model (a view of the message buffer) is the agent's, not the frame's
        lease = 3 * interval
        reader = asyncio.create_task(self._reader(conn, lease))
        wake = self._wake
        reader.add_done_callback(lambda _: wake.set())
        heart = asyncio.create_task(self._heartbeat(conn, interval))
        try:
            sent_upload: str | None = None
            polled_version: int | None = None
            while True:
                if reader.done():
                    return reader.result()  # raises the reader's exception if it failed
                with self._cond:
                    closing, pending = self._closing, self._pending
                    state, version = self._state, self._gm_version
                if closing:
                    with contextlib.suppress(Exception):
                        conn.write(encode(Bye(reason="agent closing")))
                        await asyncio.wait_for(conn.close(), 2.0)
                    return True
                if pending is not None and pending.upload_id != sent_upload:
                    # the upload's arrays are the agent's own copies, never changed:
                    # the in-process transport may hand them over without copying
                    conn.write(encode(pending), frozen=True)
                    sent_upload = pending.upload_id
                    await conn.drain()
                    continue
                if (self.delivery == "poll" and pending is None
                        and state == ClientState.waiting_gm and polled_version != version):
                    conn.write(encode(Poll(known_version=version, wait=self.poll_wait)))
                    polled_version = version
                await self._wake.wait()  # set by the reader (also when it ends) and _kick
                self._wake.clear()
                if self._poll_answered:
                    self._poll_answered = False
                    polled_version = None
        finally:
            heart.cancel()
            reader.cancel()
            with contextlib.suppress(BaseException):
                await reader

    _poll_answered = False

    def _on_welcome(self, w: Welcome) -> None:
        self.agent_id = w.agent_id
        self.aggregator_id = w.aggregator_id
        self.delivery = w.delivery
        self.federation_config = dict(w.config)
        self.round = w.round
        self.run_id = w.run_id
        if self._restored is not None and self._resume_pending(w):
            # the restored upload was trained on this very model: wait for the next one
            with self._cond:
                self._gm, self._gm_next_extra = w.model, w.extra or {}
                self._gm_version = w.version
        elif w.model is not None and w.version > self._gm_version:
            self._new_global(w.version, w.model, w.finished, w.extra)
        elif w.finished:
            with self._cond:
                self._gm_final = True
                self._notify()
        with self._cond:
            # an upload trained on an older model that the aggregator never acknowledged is
            # still sent: the aggregator's staleness policy decides what becomes of it
            if self._state == ClientState.sending and self._pending is None and w.model is None:
                self._state = ClientState.waiting_gm
        if self._disk is not None:
            known = self._disk.identity.agent_id
            if known is not None and known != w.agent_id:
                log.warning("%s: the aggregator now knows this agent as %s (was %s)",
                            self.name, w.agent_id[:8], known[:8])
            self._disk.save_identity(
                agent_id=w.agent_id, aggregator_id=w.aggregator_id, run_id=w.run_id,
                **({"version": self._gm_version} if self._gm_version >= 0 else {}),
            )
        self._welcomed.set()
        with self._cond:
            self._notify()
        log.info("%s: welcomed as %s (version %d, %s delivery)", self.name, w.agent_id[:8],
                 w.version, w.delivery)

    def _resume_pending(self, w: Welcome) -> bool:
        """Decide, at the first welcome after a restart, what becomes of the upload restored
        from the state directory: re-sent with its upload_id (the aggregator stores it at
        most once), or discarded if it belongs to another run or, with push delivery, is
        stale (the book's rule, as in :meth:`send_trained_model`; not with
        ``discard_stale: false``). Returns True if it is current: the welcome's model is
        the one it was trained on."""
        saved, self._restored = self._restored, None
        assert saved is not None and self._disk is not None
        up = saved.upload
        reason = None
        if saved.run_id is not None and saved.run_id != w.run_id:
            reason = f"it was trained in run {saved.run_id[:8]}, not {w.run_id[:8]}"
        elif (w.version > up.base_version and w.delivery == "push"
              and bool(self.federation_config.get("discard_stale", True))):
            reason = (f"it was trained on v{up.base_version}, the global model is now "
                      f"v{w.version}")
        if reason is None:
            log.info("%s: re-sending upload %s restored from %s", self.name,
                     up.upload_id[:8], self.state_dir)
            return w.model is not None and w.version == up.base_version and not w.finished
        log.warning("%s: discarding the upload %s restored from %s: %s", self.name,
                    up.upload_id[:8], self.state_dir, reason)
        with self._cond:
            if self._pending is up:
                self._pending = None
        self._disk.clear_pending(up.upload_id)
        return False

    def _new_global(self, version: int, model: Weights, final: bool,
                    extra: Weights | None = None) -> None:
        with self._cond:
            if version <= self._gm_version:
                return
            self._gm = model
            self._gm_next_extra = extra or {}
            self._gm_version = version
            self._gm_final = final
            self._state = ClientState.gm_ready
            self._notify()
        if self._disk is not None:
            self._disk.save_identity(version=version)

    async def _reader(self, conn: Connection, lease: float) -> bool:
        assert self._wake is not None
        while True:
            async with asyncio.timeout(lease):  # not wait_for: no task per message
                raw = await conn.recv()
            msg = decode(raw, self.limits)
            if isinstance(msg, GlobalModel):
                self._new_global(msg.version, msg.model, msg.final, msg.extra)
                self.round = msg.version + 1
                self._poll_answered = True
            elif isinstance(msg, UploadAck):
                with self._cond:
                    if self._pending is not None and self._pending.upload_id == msg.upload_id:
                        self._pending = None
                        self.acknowledged.append(msg)
                        if self._state == ClientState.sending:
                            self._state = ClientState.waiting_gm
                        self._notify()
                if self._disk is not None:
                    self._disk.clear_pending(msg.upload_id)  # only if it is the one on disk
                if msg.message:
                    log.info("%s: upload %s: %s", self.name, msg.status, msg.message)
            elif isinstance(msg, NotReady):
                self._poll_answered = True
            elif isinstance(msg, Heartbeat):
                pass
            elif isinstance(msg, Error):
                if msg.fatal:
                    if msg.code in AUTH_ERRORS:  # e.g. revoked: reconnecting cannot help
                        self.refusals.append(msg)
                        raise RegistrationRefused(
                            f"{self.url} disconnected {self.name!r}: {msg.message}",
                            code=msg.code)
                    raise RemoteProtocolError(f"aggregator error: {msg.message}", code=msg.code)
                log.error("%s: aggregator refused a request: %s", self.name, msg.message)
                self.refusals.append(msg)
                if self.on_refusal is not None:
                    self.on_refusal(msg)
                with self._cond:
                    if msg.code == "invalid-model" and self._pending is not None:
                        if self._disk is not None:
                            self._disk.clear_pending(self._pending.upload_id)
                        self._pending = None
                        self._state = ClientState.waiting_gm
                        self._notify()
            elif isinstance(msg, Bye):
                raise ConnectionClosed(1001, msg.reason)
            self._wake.set()

    async def _heartbeat(self, conn: Connection, interval: float) -> None:
        seq = 0
        while True:
            await asyncio.sleep(interval)
            seq += 1
            try:
                conn.write(encode(Heartbeat(seq=seq)))
            except ConnectionClosed:
                return
