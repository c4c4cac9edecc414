"""Tiers of aggregators: an aggregator that is ONE agent of an upper aggregator.

``fedstack aggregator --name edge1 --upstream ws://upper:8765`` (config ``upstream``,
``upstream_ca``, ``upstream_timeout``; the credential from the environment variable
:data:`UPSTREAM_TOKEN_ENV`) runs an aggregator of its own cluster that takes part in the
upper aggregator's federation as the agent called ``name`` (book rows 33 and 71: an
intermediate server close to low-compute devices; an edge aggregator with intermittent
connectivity). Three tiers and more work the same way (top <- middle <- edge <- agents).

:class:`UpstreamLink` is the connection to the upper aggregator: the agent's asyncio core
(:class:`~fedstack.agent.core.AgentCore` and its connection loop
:class:`~fedstack.agent.connection.AgentConnection`: registration, reconnection with
backoff, heartbeats, polling, TLS) running as a task of the aggregator's
:class:`~fedstack.aggregator.tasks.TaskScope`, on its event loop.

:class:`UpstreamSynthesis` is the aggregator's round sink
(:class:`~fedstack.aggregator.federation.RoundSink`). After each cluster round it

1. stores the cluster's result as a semi-global model (``store.commit_semi_global``);
2. uploads it upstream: ``num_samples`` = the cluster's total, ``base_version`` = the
   upper version its current global model came from, the cluster's metrics;
3. waits up to ``upstream_timeout`` s for the upper's global model that includes it (the
   acknowledgement says in which upper round it counts);
4. commits that as its own global model (``store.commit_global``, lineage to the
   semi-global, metrics ``upstream_version``); cut off or timed out, it commits its own
   semi-global model as its global (metrics ``upstream_offline`` = 1) so its cluster keeps
   training. The upload stays queued: when the link comes back the LATEST semi-global
   goes up (a newer one replaces an older one not yet acknowledged) and the upper
   aggregator's staleness policy decides (``accepted-late`` with ``next``,
   ``stale-dropped`` with ``drop``).

The first global model: if the upper aggregator has a federation going when the
aggregator starts a new run, its current global model is the aggregator's version 0
(:meth:`UpstreamSynthesis.start` waits up to ``upstream_timeout``, at most
:data:`INITIAL_WAIT` s, for the welcome);
otherwise the aggregator's first agent's model starts the run as usual, and it is proposed
upstream as the initial model (it starts the upper federation if that has none yet).

Everything the upper aggregator sends is checked by the agent's protocol session (model
structure, finite values, versions); a model of another structure than this aggregator's
is never adopted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from fedstack.agent.connection import AgentConnection
from fedstack.agent.core import AgentCore
from fedstack.aggregator.events import FederationStarted
from fedstack.aggregator.federation import Adopted, ClusterRound
from fedstack.aggregator.tasks import TaskScope
from fedstack.errors import (
    ConfigError,
    FedstackError,
    RegistrationRefused,
    StoreConflict,
    StoreError,
    TLSError,
)
from fedstack.transport import Connection
from fedstack.types import Metrics, Weights
from fedstack.wire import ModelUpload, UploadAck
from fedstack.wire.session import State
from fedstack.wire.tensors import structure as structure_of

if TYPE_CHECKING:
    from fedstack.aggregator.service import Aggregator

__all__ = ["UPSTREAM_TOKEN_ENV", "UpperGlobal", "UpstreamLink", "UpstreamSynthesis"]

log = logging.getLogger("fedstack.aggregator.upstream")

UPSTREAM_TOKEN_ENV = "FEDSTACK_UPSTREAM_TOKEN"
"""The environment variable holding this aggregator's credential at the upper aggregator
(``fedstack credentials add NAME`` on the upper aggregator's store prints it)."""

MAX_BACKOFF = 5.0
"""Cap of the link's reconnection backoff, seconds (an edge's link comes back quickly)."""
INITIAL_WAIT = 10.0
"""Longest wait at the start of a new run for the upper aggregator's welcome (its global
model becomes version 0), seconds (and at most ``upstream_timeout``). An upper aggregator
that has no model yet holds the connection without answering: the run then starts from
its first agent's model, which is proposed upstream."""
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

    async def changed(self, timeout: float) -> None:
        """Return at the core's next change of state, or after ``timeout`` s."""
        fut = self.core.waiter()
        try:
            if isinstance(fut, asyncio.Future):
                await asyncio.wait_for(asyncio.shield(fut), timeout)
            else:
                await asyncio.sleep(min(timeout, POLL_STEP))
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
        self, upload_id: str, timeout: float
    ) -> tuple[UploadAck | None, UpperGlobal | None]:
        """Wait up to ``timeout`` s for the acknowledgement of ``upload_id`` and then for
        the upper global model that includes it (the version of the round it counts in).
        Returns (the ack or None, that global model or None). A ``stale-dropped`` upload
        returns the newest upper global model at once (the upper aggregator moved on
        without it); ``finished`` or a refusal returns no model."""
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
                        return ack, self.latest
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


@dataclass
class _Progress:
    """What one cluster round already did (a retried :meth:`UpstreamSynthesis.publish`
    carries on from there instead of storing or uploading twice)."""

    round: int
    semi_id: str | None = None
    upload_id: str | None = None
    decided: bool = False
    upper: UpperGlobal | None = None


class UpstreamSynthesis:
    """The round sink of an aggregator with an upstream (see the module docstring).

    Args:
        agg: the aggregator (``config.upstream`` and ``config.name`` set).
        token: its credential at the upper aggregator (default: the environment variable
            :data:`UPSTREAM_TOKEN_ENV`).

    Raises:
        ConfigError: ``name`` is not set, or is not a valid agent name.
    """

    def __init__(self, agg: Aggregator, *, token: str | None = None) -> None:
        cfg = agg.config
        if not cfg.upstream:
            raise ConfigError("aggregator config: UpstreamSynthesis needs upstream")
        if not cfg.name:
            raise ConfigError(
                "aggregator config: upstream needs name (the agent name of this aggregator "
                "at the upstream aggregator)"
            )
        self.agg = agg
        self.timeout = float(cfg.upstream_timeout)
        if token is None:
            token = os.environ.get(UPSTREAM_TOKEN_ENV) or None
        try:
            self.link = UpstreamLink(
                cfg.upstream,
                cfg.name,
                token=token,
                ca=cfg.upstream_ca,
                max_message_bytes=cfg.max_message_bytes,
                connect_timeout=min(10.0, max(1.0, self.timeout)),
                max_backoff=min(MAX_BACKOFF, max(0.5, self.timeout)),
            )
        except ValueError as exc:
            raise ConfigError(f"aggregator config: name {cfg.name!r}: {exc}") from None
        self.base_version = -1
        """The upper version this aggregator's current global model came from (-1: none)."""
        self._progress: _Progress | None = None
        self._closing = False

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Connect upstream. Call in :meth:`Aggregator.start` once the run is open and the
        round owner runs, before the agents' connections are let in: a new run takes the
        upper global model as its version 0 if the upper aggregator answers within
        ``upstream_timeout`` (at most :data:`INITIAL_WAIT` s).

        Raises:
            RegistrationRefused, TLSError: the upper aggregator refused this aggregator's
                credential or name, or its certificate does not verify.
        """
        agg = self.agg
        initialized = agg._initialized.is_set()
        if initialized:
            assert agg.global_weights is not None
            self.base_version = await self._stored_upstream_version()
            await self.link.propose(agg.global_weights)
        self.link.start(agg._scope)
        if not initialized:
            upper = await self.link.wait_welcome(min(self.timeout, INITIAL_WAIT))
            if upper is not None:
                await self._initialize_from(upper)
            else:
                log.info(
                    "upstream %s has no global model for us yet; the first agent's model "
                    "starts this run and is proposed upstream",
                    self.link.url,
                )
        agg._scope.supervise("upstream-first-model", self._first_model)

    async def close(self) -> None:
        """Say bye upstream and end the link (a round being published is then left to the
        aggregator's stop: it is not committed, and is completed after a restart)."""
        self._closing = True
        await self.link.close()

    async def _first_model(self) -> None:
        """Until the link's first welcome: the aggregator's first global model (from its
        first agent) is proposed upstream; a welcome while the aggregator has none yet
        starts its run from the upper global model."""
        agg, link = self.agg, self.link
        while not link.core.welcomed and not link.stopped:
            if agg._initialized.is_set():
                assert agg.global_weights is not None
                await link.propose(agg.global_weights)
                return
            if link.core.welcomed:
                upper = link.refresh()
                if upper is not None:
                    await self._initialize_from(upper)
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(agg._initialized.wait(), 0.1)

    async def _initialize_from(self, upper: UpperGlobal) -> None:
        """Version 0 of this aggregator's run = the upper global model (unless its first
        agent started the run meanwhile)."""
        agg = self.agg
        store = agg.store
        assert store is not None
        async with agg.connections._init_lock:
            if agg._initialized.is_set():
                return
            weights = {k: np.array(v) for k, v in upper.weights.items()}
            structure = structure_of(weights)
            try:
                gid = await agg._db(
                    store.init_federation,
                    agg.run_id,
                    agent_id=agg.aggregator_id,
                    structure=structure,
                    init_weights=True,
                    initial=weights,
                    global_weights=weights,
                    num_samples=0,
                    metrics={"upstream_version": upper.version},
                    aggregator_id=agg.aggregator_id,
                )
            except StoreConflict:  # another member of this federation started the run
                log.info("another member of the federation recorded the first model")
                return
            started = asyncio.get_running_loop().create_future()
            await agg._post(FederationStarted(structure, weights, gid, started))
            await started
        self.base_version = upper.version
        log.info(
            "run %s starts from the upstream global model version %d of %s",
            agg.run_id[:8],
            upper.version,
            self.link.url,
        )

    async def _stored_upstream_version(self) -> int:
        """The upper version the stored latest global model came from (a restart)."""
        agg = self.agg
        assert agg.store is not None
        try:
            rows = await agg._db(agg.store.rounds, agg.run_id, 1)
        except FedstackError:
            return -1
        if not rows:
            return -1
        metrics = rows[0].get("metrics") or {}
        v = metrics.get("upstream_version") if isinstance(metrics, dict) else None
        return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else -1

    # ------------------------------------------------------------------ the sink
    async def publish(self, cluster: ClusterRound) -> Adopted:
        """Store ``cluster`` as a semi-global model, exchange it upstream, commit the
        global model this aggregator continues from (see the module docstring).

        Raises:
            StoreError: the store failed (the caller retries: what was already stored or
                uploaded for this round is not done again).
        """
        agg = self.agg
        store = agg.store
        assert store is not None
        p = self._progress
        if p is None or p.round != cluster.round:
            p = self._progress = _Progress(cluster.round)
        if p.semi_id is None:
            p.semi_id = await self._commit_semi(cluster)
        if not p.decided:
            p.upper = await self._exchange(cluster, p)
            p.decided = True
        upper = p.upper
        metrics: Metrics = dict(cluster.metrics)
        if upper is not None:
            weights = {k: np.array(v) for k, v in upper.weights.items()}
            metrics["upstream_version"] = upper.version
        else:
            weights = cluster.weights
            metrics["upstream_offline"] = 1
        gid = await agg._db(
            store.commit_global,
            agg.run_id,
            round=cluster.round,
            weights=weights,
            semi_globals=[p.semi_id],
            base_model_id=cluster.base_model_id or None,
            num_samples=cluster.num_samples,
            num_updates=cluster.num_updates,
            metrics=metrics,
            aggregator_id=agg.aggregator_id,
            started=cluster.started,
            finished=time.time(),
            extra=cluster.extra,
        )
        extra = cluster.extra
        if gid is None:  # another member of this aggregator's own federation won round r
            gid, weights, extra, metrics = await self._winner(cluster.round)
        elif upper is not None:
            self.base_version = upper.version
        self._progress = None
        return Adopted(
            version=cluster.round, model_id=gid, weights=weights, extra=extra, metrics=metrics
        )

    async def complete(self, round: int, extra: Weights) -> Adopted:
        """The global model that follows cluster round ``round``, whose semi-global model
        was stored before a restart but not followed by a global model: it is exchanged
        upstream (or adopted offline) like a fresh one. ``extra`` goes to the cluster's
        agents with it.

        Raises:
            StoreError: the store failed, or holds no semi-global model of ``round`` of
                this aggregator.
        """
        agg = self.agg
        store = agg.store
        assert store is not None
        view = await agg._db(
            store.federation_view, agg.run_id, round, liveness=agg.config.liveness_timeout
        )
        mine = [
            g
            for g in view.semi_globals
            if g.aggregator_id == agg.aggregator_id and g.round == round
        ]
        if not mine:
            raise StoreError(f"no semi-global model of round {round} of this aggregator")
        semi = mine[0]
        weights = await agg._db(store.load_weights, semi.model_id)
        self._progress = _Progress(round, semi_id=semi.model_id)
        return await self.publish(
            ClusterRound(
                round=round,
                base_version=round - 1,
                base_model_id=agg.global_model_id,
                weights=weights,
                extra=extra,
                strategy_state={},
                num_samples=semi.num_samples,
                num_updates=semi.num_updates,
                inputs=[],
                metrics=dict(semi.metrics),
                started=semi.finished,
                finished=semi.finished,
            )
        )

    async def _commit_semi(self, cluster: ClusterRound) -> str:
        agg = self.agg
        store = agg.store
        assert store is not None
        try:
            semi_id: str = await agg._db(
                store.commit_semi_global,
                agg.run_id,
                aggregator_id=agg.aggregator_id,
                round=cluster.round,
                weights=cluster.weights,
                inputs=cluster.inputs,
                base_model_id=cluster.base_model_id or None,
                num_samples=cluster.num_samples,
                metrics=cluster.metrics,
                started=cluster.started,
                finished=cluster.finished,
                strategy_state=cluster.strategy_state,
                extra=cluster.extra,
            )
            return semi_id
        except StoreConflict:  # delivered before a failure: carry on with the stored one
            view = await agg._db(
                store.federation_view,
                agg.run_id,
                cluster.round,
                liveness=agg.config.liveness_timeout,
            )
            for sg in view.semi_globals:
                if sg.aggregator_id == agg.aggregator_id and sg.round == cluster.round:
                    return sg.model_id
            raise

    async def _winner(self, round: int) -> tuple[str, Weights, Weights, Metrics]:
        agg = self.agg
        store = agg.store
        assert store is not None
        view = await agg._db(
            store.federation_view, agg.run_id, round, liveness=agg.config.liveness_timeout
        )
        gid = view.global_model_id
        if gid is None:
            raise StoreConflict(f"global model {round} was committed by another, but is not found")
        weights = await agg._db(store.load_weights, gid)
        extra = await agg._db(store.load_extra, gid)
        return gid, weights, extra, {}

    async def _exchange(self, cluster: ClusterRound, p: _Progress) -> UpperGlobal | None:
        """Upload the semi-global model; the upper global model to continue from, or None
        (offline, timed out, or not usable)."""
        link, r = self.link, cluster.round
        if not link.core.welcomed and not link.stopped:
            # just (re)started: give the first connection its chance (returns at once when
            # the upper aggregator is unreachable)
            with contextlib.suppress(FedstackError):
                await link.wait_welcome(min(self.timeout, INITIAL_WAIT))
        if self._closing:  # the aggregator is stopping: nothing is committed
            await asyncio.get_running_loop().create_future()  # until cancelled
        if link.stopped:
            log.warning("round %d: the upstream link is down for good (%s)", r, link.error)
            return None
        base = self.base_version if self.base_version >= 0 else (link.first_version or 0)
        if p.upload_id is None:
            # one id per cluster round of this member: sent again after a restart, the
            # upper aggregator answers with what became of the first
            p.upload_id = link.upload(
                cluster.weights,
                cluster.num_samples,
                base,
                cluster.metrics,
                upload_id=f"{self.agg.aggregator_id[:40]}-{r}"[:64],
            )
        if not link.connected and not link.connecting:
            log.warning(
                "round %d: upstream %s unreachable; continuing from our own semi-global model "
                "(it is sent when the link comes back)",
                r,
                link.url,
            )
            return None
        ack, upper = await link.exchange(p.upload_id, self.timeout)
        if self._closing:
            await asyncio.get_running_loop().create_future()  # until cancelled
        if upper is not None and not self._fits(upper):
            upper = None
        if upper is None:
            log.warning(
                "round %d: no upstream global model within %.1f s (%s); continuing from our "
                "own semi-global model",
                r,
                self.timeout,
                "not acknowledged" if ack is None else f"upload {ack.status}",
            )
        else:
            log.info(
                "round %d: upstream global model version %d adopted (upload %s)",
                r,
                upper.version,
                ack.status if ack else "?",
            )
        return upper

    def _fits(self, upper: UpperGlobal) -> bool:
        """Whether ``upper`` has this aggregator's model structure (names, dtypes, shapes)."""
        mine = self.agg.structure
        if mine is None or [tuple(x) for x in structure_of(upper.weights)] == [
            (n, d, tuple(s)) for n, d, s in mine
        ]:
            return True
        log.error(
            "the upstream global model version %d has another structure than this "
            "aggregator's model; not adopted",
            upper.version,
        )
        return False
