"""The link of an aggregator to its upper aggregator: the agent's core as a connection.

An aggregator with ``upstream`` set (see :mod:`fedstack.aggregator.upstream`) is ONE agent
of the upper aggregator. :class:`UpstreamLink` is that agent: the agent's asyncio core
(:class:`~fedstack.agent.core.AgentCore` and its connection loop
:class:`~fedstack.agent.connection.AgentConnection`: registration, reconnection with
capped backoff, heartbeats, long polling, TLS and its diagnosis) running as a task of the
aggregator's :class:`~fedstack.aggregator.tasks.TaskScope`, on the aggregator's event loop.
The link offers what the round sink needs: whether a connection is up
(:attr:`UpstreamLink.connected`), the first welcome (:meth:`UpstreamLink.wait_welcome`), an
initial model to propose (:meth:`UpstreamLink.propose`), an upload that replaces the one
not yet acknowledged (:meth:`UpstreamLink.upload`), and the wait for the upper global model
that includes it (:meth:`UpstreamLink.exchange`).

Everything the upper aggregator sends goes through the agent's protocol session, which
refuses a model of another structure than the first one it sent, NaN or infinite values,
absurd or backward versions; the upper aggregator's staleness policy is never
second-guessed here (the agent's stale-upload rule is not applied to the link's uploads).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedstack.agent.connection import AgentConnection
from fedstack.agent.core import AgentCore
from fedstack.aggregator.tasks import TaskScope
from fedstack.errors import FedstackError, RegistrationRefused, TLSError
from fedstack.transport import Connection
from fedstack.types import Metrics, Weights
from fedstack.wire import ModelUpload, UploadAck
from fedstack.wire.session import State

__all__ = ["COUNTED", "MAX_BACKOFF", "UpperGlobal", "UpstreamLink", "wire_metrics"]

log = logging.getLogger("fedstack.aggregator.upstream")

MAX_BACKOFF = 5.0
"""Cap of the link's reconnection backoff, seconds (an edge's link comes back quickly)."""
POLL_STEP = 0.05
"""Longest sleep between two looks at the link while waiting, seconds."""
COUNTED = ("accepted", "accepted-late", "duplicate")
"""Acknowledgement statuses after which the upper global of the ack's round includes this
aggregator's contribution (``duplicate``: an earlier upload of ours counts in that round)."""


@dataclass(frozen=True)
class UpperGlobal:
    """A global model of the upper aggregator, as the link received it."""

    version: int
    weights: Weights
    extra: Weights
    final: bool


class _LinkConnection(AgentConnection):
    """The agent's connection loop, telling the link whether a connection is open."""

    def __init__(self, link: UpstreamLink) -> None:
        super().__init__(link.core)
        self.link = link

    async def _run_session(self, conn: Connection) -> bool:
        self.link._open = True
        try:
            return await super()._run_session(conn)
        finally:
            self.link._open = False


class UpstreamLink:
    """The connection to the upper aggregator, as its agent called ``name``.

    Call everything from the aggregator's event loop. :meth:`start` runs the connection as
    a task of ``scope``; :meth:`close` says bye and ends it.

    Args:
        url: the upper aggregator (``ws://`` or ``wss://``).
        name: the agent name there (the aggregator's ``name``).
        token: the credential there (None: none, e.g. an upper aggregator with auth off).
        ca: PEM CA verifying a ``wss://`` upper aggregator's certificate (None: the
            ``FEDSTACK_CA`` environment variable, else the system's trust store).
        max_message_bytes: largest message accepted from the upper aggregator.
        connect_timeout: seconds to open one connection.
        max_backoff: cap of the reconnection backoff, seconds.

    Raises:
        BadName (a ValueError): ``name`` is not a valid agent name.
        TLSError: ``ca`` cannot be read.
    """

    def __init__(
        self,
        url: str,
        name: str,
        *,
        token: str | None,
        ca: str | None = None,
        max_message_bytes: int = 1 << 30,
        connect_timeout: float = 10.0,
        max_backoff: float = MAX_BACKOFF,
    ) -> None:
        self.core = AgentCore(
            url,
            name,
            token=token,
            enrollment_token=None,
            init_weights=True,
            max_message_bytes=max_message_bytes,
            poll_wait=30.0,
            max_backoff=max_backoff,
            connect_timeout=connect_timeout,
            ca=ca,
            cert=None,
            key=None,
            state_dir=None,
        )
        # never the agents' variables of this process: the aggregator's enrollment secret
        # (FEDSTACK_ENROLLMENT_TOKEN) must not travel upstream, nor an agent's token
        self.core.token = token
        self.core.enrollment = None
        self.url = url
        self.name = name
        self.latest: UpperGlobal | None = None
        """The newest upper global model received (None: none yet)."""
        self.first_version: int | None = None
        """The upper version at this link's first welcome (None: never welcomed)."""
        self._scope: TaskScope | None = None
        self._task: asyncio.Task[None] | None = None
        self._open = False  # a connection to the upper aggregator is open

    # ------------------------------------------------------------------ state
    @property
    def connected(self) -> bool:
        """True while a connection is open and welcomed."""
        return self._open and self.core.session.state is State.JOINED

    @property
    def connecting(self) -> bool:
        """True while a connection is open and not welcomed yet (e.g. the upper aggregator
        holds it until its federation has a model)."""
        return self._open and self.core.session.state is not State.JOINED

    @property
    def stopped(self) -> bool:
        """True once the link will not connect again (closed, refused, finished)."""
        return self._task is not None and self._task.done()

    @property
    def error(self) -> FedstackError | None:
        """Why the link stopped for good (e.g. a refused credential), if it did."""
        return self.core.error

    @property
    def known_version(self) -> int:
        """The newest upper version received (-1: none)."""
        return self.core.session.known_version

    @property
    def reconnects(self) -> int:
        return self.core.reconnects

    @property
    def last_refusal(self) -> str | None:
        """The message of the upper aggregator's latest refusal of a request (None: none);
        text from the upper aggregator: show it quoted."""
        refusals = self.core.refusals
        if len(refusals) > 64:  # the core keeps every refusal: keep the recent ones only
            del refusals[:-16]
        return refusals[-1].message if refusals else None

    # ------------------------------------------------------------------ lifecycle
    def start(self, scope: TaskScope) -> None:
        """Start connecting (as a task of ``scope``); returns at once."""
        self._scope = scope
        self._spawn()

    def _spawn(self) -> None:
        assert self._scope is not None
        self.core.stopped = False
        self._task = self._scope.spawn(
            _LinkConnection(self).run(), name=f"upstream-{self.name}", daemon=True
        )
        self._task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task[None]) -> None:
        self._open = False
        if task is self._task and not task.cancelled() and self.core.error is not None:
            log.error("link to the upstream aggregator %s stopped: %s", self.url, self.core.error)

    async def propose(self, weights: Weights, num_samples: int = 1) -> None:
        """Make ``weights`` the initial model offered to the upper aggregator (it starts
        the upper federation if that has none yet). A connection not welcomed yet is
        restarted so that its ``participate`` carries the model."""
        self.core.propose(weights, num_samples, {})
        task = self._task
        if self.core.welcomed or task is None or task.done():
            return
        task.remove_done_callback(self._ended)
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        self._open = False
        self._spawn()

    async def close(self, timeout: float = 2.0) -> None:
        """Say bye to the upper aggregator and end the connection (waits up to
        ``timeout`` s, then cancels it)."""
        self.core.close()
        task = self._task
        if task is not None and not task.done():
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(task), timeout)
            if not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task

    # ------------------------------------------------------------------ models
    def refresh(self) -> UpperGlobal | None:
        """Take a newly received upper global model, if any, into :attr:`latest`; returns
        :attr:`latest`."""
        core = self.core
        if core.welcomed and self.first_version is None:
            self.first_version = core.session.known_version
        try:
            weights = core.take_global()
        except FedstackError:  # finished, closed, or the link's error: nothing new
            weights = None
        if weights is not None:
            self.latest = UpperGlobal(
                core.training_base, weights, dict(core.gm_extra), core.gm_final
            )
        return self.latest

    async def changed(self, timeout: float | None = None) -> None:
        """Return at the core's next change of state (a welcome, a global model, an
        acknowledgement, a refusal, the connection loop's end), or after ``timeout`` s."""
        fut = self.core.waiter()
        try:
            if isinstance(fut, asyncio.Future):
                await asyncio.wait_for(asyncio.shield(fut), timeout)
            else:  # the connection loop has not started yet
                await asyncio.sleep(POLL_STEP if timeout is None else min(timeout, POLL_STEP))
        except TimeoutError:
            pass

    async def wait_welcome(self, timeout: float) -> UpperGlobal | None:
        """Wait up to ``timeout`` s for the first welcome; the upper global model it
        carried (None: not welcomed in time, or the upper aggregator is unreachable: a
        connection attempt failed and none is open now).

        Raises:
            RegistrationRefused, TLSError: the upper aggregator refused this aggregator
                (its credential, its name) or its certificate does not verify.
        """
        deadline = time.monotonic() + timeout
        while True:
            if self.core.welcomed:
                return self.refresh()
            err = self.core.error
            if isinstance(err, (RegistrationRefused, TLSError)):
                raise err
            if self.stopped:
                return None
            if self.core.reconnects > 0 and not self._open:
                return None  # not reachable now: do not hold the aggregator's start
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            await asyncio.sleep(min(remaining, POLL_STEP))

    def upload(
        self,
        weights: Weights,
        num_samples: int,
        base_version: int,
        metrics: Metrics,
        upload_id: str | None = None,
    ) -> str:
        """Queue ``weights`` as this aggregator's upload (it replaces any upload not yet
        acknowledged, and is re-sent after each reconnection until acknowledged).
        ``base_version`` is clamped to the versions the upper aggregator issued.
        ``upload_id`` (1-64 characters; default: a random one) names it: the upper
        aggregator stores an id once, so the same id sent again (after a restart) is
        answered with what became of the first."""
        known = self.core.session.known_version
        base = max(0, base_version if known < 0 else min(base_version, known))
        upload = ModelUpload(
            upload_id=upload_id or uuid.uuid4().hex,
            base_version=base,
            num_samples=max(0, int(num_samples)),
            metrics=wire_metrics(metrics),
            model={k: np.array(v, copy=True) for k, v in weights.items()},
            extra=None,
        )
        self.core.commit_upload(upload)
        return upload.upload_id

    def ack(self, upload_id: str) -> UploadAck | None:
        """The acknowledgement of ``upload_id``, once received."""
        acks = self.core.acknowledged
        if len(acks) > 64:  # the core keeps every ack: keep the recent ones only
            del acks[:-16]
        for a in reversed(acks):
            if a.upload_id == upload_id:
                return a
        return None

    async def exchange(
        self, upload_id: str, newer_than: int, timeout: float
    ) -> tuple[UploadAck | None, UpperGlobal | None]:
        """Wait up to ``timeout`` s for the acknowledgement of ``upload_id``, then for the
        upper global model to continue from: the one of the round the upload counts in
        (accepted, accepted-late, or an earlier upload of ours counts: duplicate), or, for
        a ``stale-dropped`` upload, any one newer than version ``newer_than`` (the upper
        aggregator moved on without it). Returns (the ack or None, that model or None:
        not in time, ``finished``, refused by the update gate, or the upload was refused
        or replaced)."""
        deadline = time.monotonic() + timeout
        ack: UploadAck | None = None
        target: int | None = None
        while True:
            self.refresh()
            if ack is None:
                ack = self.ack(upload_id)
                pending = self.core.session.pending
                if ack is None and (pending is None or pending.upload_id != upload_id):
                    return None, None  # refused (invalid-model, quota), or replaced
                if ack is not None:
                    if ack.status in COUNTED:
                        target = ack.round
                    elif ack.status == "stale-dropped":
                        target = newer_than + 1
                    else:  # finished, rejected: the upper aggregator will not use it
                        return ack, None
            if target is not None and self.latest is not None and self.latest.version >= target:
                return ack, self.latest
            if self.stopped:
                return ack, None
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return ack, None
            await self.changed(min(remaining, 1.0))


def wire_metrics(metrics: Mapping[str, Any]) -> Metrics:
    """The numbers, strings and bools of ``metrics`` (numpy scalars as Python numbers)."""
    out: Metrics = {}
    for k, v in metrics.items():
        if isinstance(v, np.generic):
            v = v.item()
        if isinstance(v, (bool, int, float, str)):
            out[str(k)] = v
    return out
