"""The aggregator: serves its cluster of agents, runs rounds, persists, distributes.

:class:`Aggregator` assembles the parts, starts and stops them, and is the public face
(``start``, ``wait_finished``, ``wait_for_version``, ``statistics``, ``stop``).

One WebSocket port (or an in-process server) serves the agents (and ``GET /healthz``);
with ``operator_port`` set, the operator surface (:mod:`fedstack.operator`: Prometheus
``/metrics``, the operator API, the dashboard of :mod:`fedstack.dashboard` at ``/``) runs
on its own port in the same event loop, started and stopped with the aggregator. Each agent
connection runs
:meth:`AgentConnections.serve <fedstack.aggregator.connections.AgentConnections.serve>`,
which turns what arrives into typed events (:mod:`fedstack.aggregator.events`) on ONE
bounded queue. One task, the round owner (:class:`~fedstack.aggregator.owner.RoundOwner`),
applies them in order to the round state
(:class:`~fedstack.aggregator.rounds.RoundState`, the sessions that count, the published
global model) and starts effects: a batch of uploads to store
(:class:`~fedstack.aggregator.uploads.Committer`), a round to aggregate
(:class:`~fedstack.aggregator.driver.RoundDriver`), replies and pushes
(:class:`~fedstack.aggregator.delivery.Delivery`). Effects report back as events; nothing
else changes round state. Every change is committed to the store before it is
acknowledged or announced (persist before acknowledge).

Every task belongs to a :class:`~fedstack.aggregator.tasks.TaskScope`: the aggregator's
(the owner, the committer, the credential watcher, effects) or a connection's (its
replies); :meth:`Aggregator.stop` cancels and awaits them all. A background task that
fails is restarted, or (the owner, the committer) stops the aggregator loudly.

Deadlines use a monotonic clock (``clock``, injectable); stored timestamps are wall-clock.
On start the aggregator reloads the run from the store (structure, latest global model,
round, the current round's acknowledged uploads) and carries on.

With a ``name`` (or an ``upstream``) the aggregator is a member of a horizontal federation
(:mod:`fedstack.aggregator.federation`): it joins at start (its id is then its member
row's), its cluster rounds go to :attr:`Aggregator.sink`, and :attr:`Aggregator.membership`
heartbeats, follows the run and claims dead members' uploads. Without either, none of this
exists and nothing of it runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from fedstack.aggregator.config import AggregatorConfig
from fedstack.aggregator.connections import AgentConnections
from fedstack.aggregator.delivery import Delivery
from fedstack.aggregator.driver import Evaluator, RoundDriver
from fedstack.aggregator.events import (
    AgentLeft,
    Event,
    RoundCommitted,
)
from fedstack.aggregator.fanout import Fanout
from fedstack.aggregator.federation import RoundSink, SharedStoreSynthesis
from fedstack.aggregator.gate import UpdateGate
from fedstack.aggregator.membership import Membership
from fedstack.aggregator.owner import RoundOwner
from fedstack.aggregator.quotas import StorageQuota
from fedstack.aggregator.registry import Registry, Session, refusal_detail
from fedstack.aggregator.retention import Retention
from fedstack.aggregator.rounds import RoundState
from fedstack.aggregator.statistics import AgentStatistics, AggregatorStatistics
from fedstack.aggregator.tasks import ScopeClosed, TaskScope
from fedstack.aggregator.uploads import Committer
from fedstack.aggregator.upstream import UpstreamSynthesis
from fedstack.aggregator.validation import Structure
from fedstack.aggregator.workers import Workers
from fedstack.errors import (
    ConfigError,
    ConnectionClosed,
    FedstackError,
    StoreError,
)
from fedstack.operator.metrics import AggregatorMetrics, BudgetUse, Gauges
from fedstack.plugins import load_callable
from fedstack.security.tls import server_context
from fedstack.store import RunInfo, Store
from fedstack.store.repository import fingerprint
from fedstack.strategies import Result, create
from fedstack.trackers.records import RunMeta
from fedstack.trackers.sink import TrackerSink
from fedstack.transport import Connection, inproc, serve
from fedstack.transport.budget import ByteBudget
from fedstack.transport.http import health_handler
from fedstack.transport.limits import raise_nofile_limit
from fedstack.types import Metrics, Weights
from fedstack.wire import (
    Bye,
    Limits,
)

if TYPE_CHECKING:
    from fedstack.aggregator.secagg import SecAggCoordinator
    from fedstack.operator.server import OperatorServer

__all__ = ["Aggregator", "AggregatorFailed", "Evaluator"]

T = TypeVar("T")

EVENT_QUEUE_SIZE = 4096
"""Events waiting for the round owner; a full queue makes connections wait (backpressure)."""
DATABASE_CHECK_INTERVAL = 1.0
"""Seconds between two checks that the SQLite database file was not deleted or replaced."""

log = logging.getLogger("fedstack.aggregator")


class AggregatorFailed(FedstackError):
    """A task the aggregator cannot run without failed; it stopped (raised by
    :meth:`Aggregator.wait_finished`, with the task's exception as ``__cause__``)."""


class Aggregator:
    """A fedstack aggregator. ``await start()``, then ``await wait_finished()`` or ``stop()``.

    Args:
        config: the settings.
        store: an open store to use (default: open ``config.db``; the aggregator closes
            only a store it opened).
        evaluator: central evaluation of each global model (default: ``config.evaluator``).
        clock: monotonic seconds for deadlines and poll waits (tests pass a fake clock).
    """

    def __init__(
        self,
        config: AggregatorConfig,
        *,
        store: Store | None = None,
        evaluator: Evaluator | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.clock = clock
        self._own_store = store is None
        self.store = store
        strategy_name, strategy_params = config.strategy_spec()
        self.strategy = create(strategy_name, **strategy_params)
        if config.dp != "off":  # central DP wraps the strategy (fedstack.privacy.dp)
            from fedstack.privacy.dp import wrap

            self.strategy = wrap(config, self.strategy)
        if self.strategy.trigger is not None and config.staleness == "drop":
            raise ConfigError(
                f"strategy {config.strategy!r} is asynchronous and weighs stale updates "
                "itself: use staleness 'next' (the default), not 'drop'"
            )
        if evaluator is None and config.evaluator:
            evaluator = load_callable(config.evaluator)
        self.evaluator = evaluator
        self.target = config.target
        """The metric that ends the run (``target_metric``), or None."""
        if self.target is not None and self.target.needs_evaluator and evaluator is None:
            raise ConfigError(
                f"target_metric {config.target_metric!r} names an evaluator metric "
                "(eval_...): set evaluator too"
            )
        self.limits = Limits(max_message_bytes=config.max_message_bytes)
        self.ssl_context = (
            server_context(config.tls_cert, config.tls_key, config.tls_client_ca)
            if config.tls_cert
            else None
        )
        """The TLS context the port serves with (None: plaintext ws://)."""
        self.gate = UpdateGate.from_config(config.gate)
        self.rng = np.random.default_rng(config.seed)
        self.federation_config: Metrics = {**config.federation, **self.strategy.agent_config()}
        if self.strategy.trigger is not None:
            # asynchronous rules weigh stale updates themselves: agents must send them
            self.federation_config.setdefault("discard_stale", False)
        self.secagg: SecAggCoordinator | None = None
        """Secure aggregation's coordinator (``secagg``; None: plain rounds)."""
        secagg_params = self._secagg_params() if config.secagg else None
        # ---- round state: changed only by the owner task (read-only for everyone else)
        self.aggregator_id = uuid.uuid4().hex
        self.run_id = ""
        self.owner = RoundOwner(self)
        """The round state and the task that changes it (see :mod:`.owner`)."""
        # ---- the parts
        self.metrics = AggregatorMetrics(self._gauges)
        """Prometheus metrics (served at /metrics on the operator port)."""
        self.workers = Workers(inline=config.transport == "inproc")
        self._db = self.metrics.timed_store(self.workers.db)
        """Runs a database call on the store thread (see :class:`Workers`)."""
        self._events: asyncio.Queue[Event] = asyncio.Queue(EVENT_QUEUE_SIZE)
        self.registry = Registry(
            config, self.workers.registry, lambda: self.store, lambda: self.run_id, self.metrics
        )
        self.sessions = self.registry.sessions
        """Agent id -> the session that counts towards rounds (read-only)."""
        self.fanout = Fanout(config.fanout_budget_bytes)
        """Global model encoded once per version; bytes of big sends in flight bounded."""
        self.upload_budget = ByteBudget(config.upload_budget_bytes)
        self.storage_quota = StorageQuota(
            config.agent_round_storage_bytes,
            config.round_storage_bytes,
            cap=4 * config.max_message_bytes,
        )
        self.retention = Retention(self)
        """Bytes of big uploads being received or processed at once (all connections)."""
        self.delivery = Delivery(
            self.fanout,
            lambda: self.owner.published,
            config.send_timeout,
            self._welcome_fields,
            config.min_transfer_rate,
        )
        self.driver = RoundDriver(
            strategy=self.strategy,
            rng=self.rng,
            db=self._db,
            store=lambda: self.store,
            run_id=lambda: self.run_id,
            aggregator_id=lambda: self.aggregator_id,
            gate=self.gate,
            evaluator=evaluator,
        )
        if secagg_params is not None:
            from fedstack.aggregator.secagg import SecAggCoordinator

            self.secagg = SecAggCoordinator(self, secagg_params, config.secagg_max_attempts)
            self.driver.secagg = self.secagg
        # a target on an evaluator metric is decided before the round's model is sent
        self.driver.eval_in_round = self.target is not None and self.target.needs_evaluator
        self.trackers = TrackerSink(config.track) if config.track else None
        """The experiment trackers rounds are logged to (``track``; None: none)."""
        self.driver.trackers = self.trackers
        self.committer = Committer(
            db=self._db,
            compute=self.workers.compute,
            store=lambda: self.store,
            run_id=lambda: self.run_id,
            gate=self.gate,
            gate_check=self.owner.gate_check,
            accumulator=lambda: self.driver.accumulator,
            post=self._post,
            cluster=(lambda: self.aggregator_id) if config.federated else None,
        )
        # ---- tasks and threads
        self._scope = TaskScope("aggregator", on_error=self._fatal)
        self.connections = AgentConnections(self)
        self._driver: asyncio.Task[None] | None = None
        """The round owner's task (its loop is the aggregator's loop)."""
        self._initialized = asyncio.Event()
        self._finished = asyncio.Event()
        self._stopped = asyncio.Event()
        self._stopping: asyncio.Future[None] | None = None
        self._failure: BaseException | None = None
        self._server: asyncio.Server | None = None
        self._inproc: inproc.InProcServer | None = None
        self.operator: OperatorServer | None = None
        """The operator surface's server (None: no ``operator_port``)."""
        self.port = config.port
        # ---- the horizontal federation (None for a standalone aggregator)
        self.membership: Membership | None = None
        """A federation member's background work (see :mod:`.membership`)."""
        self.sink: RoundSink | None = None
        """Where cluster rounds go in a federation or below an upstream aggregator."""
        self.upstream: UpstreamSynthesis | None = None
        """The sink and link of an aggregator below an upstream one (see :mod:`.upstream`)."""
        self._joined = asyncio.Event()
        if config.federated:
            self._check_federation()
            self.membership = Membership(self)
            self.sink = self._make_sink()
            self.driver.sink = self.sink

    def _secagg_params(self) -> Any:
        """Check that secure aggregation can run with these settings (ConfigError if not)
        and tell the agents its parameters in their welcome."""
        try:
            from fedstack.aggregator.secagg import check_config
        except ImportError as exc:
            raise ConfigError(
                f"--secagg needs the privacy extra (pip install 'fedstack[privacy]'): {exc}"
            ) from None
        params = check_config(self.config, self.strategy)
        self.federation_config.update(
            {
                "secagg": True,
                **{f"secagg_{k}": (0 if v is None else v) for k, v in params.to_config().items()},
            }
        )
        return params

    def _check_federation(self) -> None:
        """Refuse a strategy that cannot run per cluster (see ``Strategy.federation``)."""
        cfg, strategy = self.config, self.strategy
        why = strategy.federation_refusal
        if why:
            raise ConfigError(
                f"strategy {strategy.name!r} cannot run in a horizontal federation "
                f"(name or upstream is set): {why}"
            )
        if strategy.trigger is not None and cfg.upstream is None and cfg.synthesis == "sync":
            raise ConfigError(
                f"strategy {strategy.name!r} makes a round of every {strategy.trigger} "
                "update(s): in a federation it needs --synthesis async (sync synthesis "
                "would make every member wait for the others after each update)"
            )

    def _make_sink(self) -> RoundSink:
        if self.config.upstream is None:
            return SharedStoreSynthesis(self)
        self.upstream = UpstreamSynthesis(self)  # the tiers' sink
        return self.upstream

    # ------------------------------------------------------------------ round state (read-only)
    @property
    def state(self) -> RoundState:
        """The round state machine (owned by :attr:`owner`: read, never write)."""
        return self.owner.state

    @property
    def structure(self) -> Structure | None:
        return self.owner.structure

    @property
    def global_weights(self) -> Weights | None:
        """The latest global model (None before the federation starts)."""
        return self.owner.global_weights

    @property
    def global_model_id(self) -> str:
        return self.owner.global_model_id

    @property
    def global_extra(self) -> Weights:
        return self.owner.global_extra

    @property
    def strategy_state(self) -> dict[str, Any]:
        return self.owner.strategy_state

    @property
    def rounds_completed(self) -> int:
        return self.owner.rounds_completed

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Open the store, resume the run, start the round owner, and start listening."""
        cfg = self.config
        raise_nofile_limit()  # one descriptor per agent: 1,000s of agents need more than 1,024
        if self.store is None:
            self.store = await self._db(
                Store, cfg.db, cfg.blob_dir, inline_blob_bytes=cfg.inline_blob_bytes
            )
        run = await self._db(
            self.store.open_run, cfg.run_name, _public_config(cfg), self.aggregator_id
        )
        if run.resumed:
            _check_privacy_unchanged(run.config, cfg, run.name)
        elif cfg.dp == "central":
            ended = [
                r
                for r in await self._db(self.store.list_runs)
                if r["name"] == run.name and r["id"] != run.id and r["status"] != "running"
            ]
            if ended:
                log.warning(
                    "differential privacy: %d earlier run(s) named %r ended (their epsilon "
                    "was spent on the same agents' data); this NEW run %s starts a new privacy "
                    "budget: the total privacy loss of the agents is the composition of all runs",
                    len(ended),
                    run.name,
                    run.id,
                )
        self.run_id = run.id
        self.aggregator_id = run.aggregator_id
        if self.membership is not None:
            await self._start_member(run)
            return
        if run.version >= 0:
            await self._resume(run.structure, run.version)
        self._spawn_tasks()
        await self._listen(self.connections.serve, cfg.run_name)
        self._started(run)

    def _spawn_tasks(self) -> None:
        self._driver = self._scope.spawn(
            self.owner.run(), name="round-owner", critical=True, daemon=True
        )
        self._scope.spawn(self.committer.run(), name="committer", critical=True, daemon=True)
        self._scope.supervise(
            "credential-watcher", lambda: self.registry.watch_credentials(self._revoked)
        )
        self._scope.supervise("refusal-audit", self.registry.audit.run_flusher)
        self._scope.spawn(self._watch_database(), name="database-watch", critical=True, daemon=True)

    async def _listen(self, handler: Callable[[Connection], Any], inproc_name: str) -> None:
        cfg = self.config
        if cfg.transport == "inproc":
            self._inproc = await inproc.serve(
                handler, inproc_name, max_message_bytes=cfg.max_message_bytes
            )
        else:
            self._server = await serve(
                handler,
                cfg.host,
                cfg.port,
                max_message_bytes=cfg.max_message_bytes,
                ssl=self.ssl_context,
                handshake_timeout=cfg.register_timeout,
                http_handler=health_handler(
                    "" if cfg.operator_port is None else "; operators: the operator port"
                ),
                receive_budget=self.upload_budget,
                first_message_bytes=self.connections.first_message_limit,
            )
            self.port = self._server.sockets[0].getsockname()[1]
            if cfg.operator_port is not None:
                await self._start_operator()

    async def _start_operator(self) -> None:
        """The operator surface on its own port (the agents' port is listening)."""
        from fedstack.dashboard import dashboard_middleware, dashboard_routes
        from fedstack.operator import OperatorServer, aggregator_app

        cfg = self.config
        assert self.store is not None
        server = OperatorServer(
            aggregator_app(  # operator_api off: metrics only, no dashboard either
                self,
                dashboard_routes(self.store, agg=self, host=cfg.operator_host)
                if cfg.operator_api
                else (),
                middleware=dashboard_middleware(cfg.operator_host) if cfg.operator_api else (),
            ),
            cfg.operator_host,
            cfg.operator_port or 0,
            ssl=self.ssl_context,
            head_timeout=cfg.register_timeout,
        )
        try:
            await server.start()
        except OSError as exc:
            await self.stop()
            raise ConfigError(
                f"cannot serve the operator surface on {cfg.operator_host}:{cfg.operator_port} "
                f"(operator_host, operator_port): {exc.strerror or exc}"
            ) from exc
        except BaseException:
            await self.stop()
            raise
        self.operator = server

    async def _start_member(self, run: RunInfo) -> None:
        """A federation member's start: listen (connections wait), join (the member id
        becomes the aggregator id), resume its cluster, start the federation's tasks, and
        let the connections in."""
        cfg, membership = self.config, self.membership
        assert membership is not None and self.store is not None
        await self._listen(self._serve_member, f"{cfg.run_name}.{cfg.name}")
        if cfg.advertise_url is None and cfg.host in ("0.0.0.0", "::", ""):
            log.warning(
                "member %s listens on every interface (%s) without advertise_url: the other "
                "members' agents are told %s, which they cannot reach; set --advertise-url",
                cfg.name,
                cfg.host or "*",
                self.url,
            )
        try:
            if not run.resumed:
                run = await self._db(_first_run, self.store, run)
                self.run_id = run.id
            member = await membership.join(cfg.advertise_url or self.url)
            self.aggregator_id = member.id
            current = await self._db(self.store.get_run, self.run_id)
            if current.version >= 0:
                await self._resume_member(current.structure, current.version)
        except BaseException:
            await self.stop()
            raise
        self._spawn_tasks()
        self._scope.supervise("federation-heartbeat", membership.run_heartbeat)
        self._scope.supervise("federation-follow", membership.run_follow)
        if self.upstream is not None:  # a new run may start from the upper global model
            try:
                await self.upstream.start()
            except BaseException:
                await self.stop()
                raise
        self._joined.set()
        self._started(run)

    async def _serve_member(self, conn: Connection) -> None:
        """A member's connections wait until it joined and resumed."""
        await self._joined.wait()
        if self._stopped.is_set():
            with contextlib.suppress(Exception):
                await conn.close(1001, "aggregator stopping", timeout=1.0)
            return
        await self.connections.serve(conn)

    def _started(self, run: RunInfo) -> None:
        cfg = self.config
        assert self.store is not None
        log.info(
            "aggregator listening on %s%s (run %s, %s, version %d, store %s)",
            self.url,
            " with mutual TLS" if cfg.tls_client_ca else "",
            self.run_id[:8],
            "resumed" if run.resumed else "new",
            self.state.version,
            self.store.url,
        )
        if self.trackers is not None:
            meta = RunMeta(run.id, run.name, run.status, time.time(), _public_config(cfg))
            self.trackers.start(self.store, meta)
        if self.state.finished:
            self._finished.set()

    @property
    def url(self) -> str:
        """Where agents connect: ``ws://HOST:PORT``, ``wss://HOST:PORT`` or
        ``inproc://NAME`` (valid once :meth:`start` returned)."""
        if self._inproc is not None:
            return self._inproc.url
        host = self.config.host
        if ":" in host:
            host = f"[{host}]"
        return f"{'wss' if self.ssl_context else 'ws'}://{host}:{self.port}"

    async def _resume(self, structure: Structure | None, version: int) -> None:
        """Before the owner starts: the run's state as the store has it."""
        assert self.store is not None
        resume = await self._db(self.store.resume_state, self.run_id)
        if resume.global_model_id is None:
            raise StoreError(f"run {self.run_id}: global model {version} is missing")
        weights = await self._db(self.store.load_weights, resume.global_model_id)
        if resume.strategy_state is None:  # no round committed yet: the initial state
            state, extra = self.strategy.init_state(weights), self.strategy.initial_extra(weights)
        else:
            state, extra = resume.strategy_state, resume.global_extra
        self.owner.structure = structure
        if self.target is not None and resume.version > 0:
            # the run reached its target before the restart: it is over, not resumed
            last = await self._db(self.store.rounds, self.run_id, 1)
            if last and self.target.reached(last[-1]["metrics"] or {}):
                self.state.target_reached = True
                log.info(
                    "round %d reached the target %s before this restart: the run is over",
                    last[-1]["round"],
                    self.target,
                )
        self._check_dp_budget(state, resume.version)
        self.owner.adopt(resume.version, resume.global_model_id, weights, extra, state)
        if self.secagg is not None:
            # the secure-aggregation attempt in progress at the restart is abandoned (its
            # sessions' secrets are gone): its masked inputs are void, a new attempt starts
            if resume.buffered:
                await self._db(
                    self.store.discard_uploads,
                    self.run_id,
                    [r.model_id for r in resume.buffered],
                )
                await self._db(
                    self.store.log_event,
                    "secagg_abandoned",
                    {"round": resume.version + 1, "masked_inputs": len(resume.buffered)},
                    run_id=self.run_id,
                )
                log.info(
                    "secure aggregation: abandoned the attempt in progress at the restart "
                    "(%d masked input(s) voided); round %d starts a new attempt",
                    len(resume.buffered),
                    resume.version + 1,
                )
            self._initialized.set()
            return
        replayed = await self.driver.replay(weights, state, resume.version, resume.buffered)
        self.driver.accumulator = replayed.accumulator
        self.driver.inputs = replayed.inputs
        self.state.contributors = replayed.contributors
        self._initialized.set()
        log.info(
            "resumed at version %d with %d buffered upload(s)", resume.version, len(resume.buffered)
        )

    def _check_dp_budget(self, state: dict[str, Any], version: int) -> None:
        """A run whose epsilon budget the stored rounds used up is over, not resumed."""
        if self.config.dp == "off":
            return
        from fedstack.privacy.dp import CentralDP

        if isinstance(self.strategy, CentralDP) and self.strategy.budget_exhausted(state):
            self.state.target_reached = True
            log.info(
                "the %d stored round(s) used the epsilon budget %g: the run is over",
                self.strategy.rounds_released(state),
                self.strategy.settings.epsilon_budget,
            )

    async def _resume_member(self, structure: Structure | None, version: int) -> None:
        """A federation member's resume: the run's latest global model, and its OWN
        cluster: strategy state, extra arrays, buffered uploads (carried into the round in
        progress per the staleness policy), and a round it delivered that was not
        synthesised yet (it then waits for that synthesis before a new round)."""
        assert self.store is not None
        resume = await self._db(self.store.resume_state, self.run_id)
        if resume.global_model_id is None:
            raise StoreError(f"run {self.run_id}: global model {version} is missing")
        own = await self._db(self.store.cluster_resume, self.run_id, self.aggregator_id)
        weights = await self._db(self.store.load_weights, resume.global_model_id)
        if own.strategy_state is None:
            state, extra = self.strategy.init_state(weights), self.strategy.initial_extra(weights)
        else:
            state, extra = own.strategy_state, own.extra
        self.owner.structure = structure
        self.owner.adopt(resume.version, resume.global_model_id, weights, extra, state)
        if own.delivered is not None and own.delivered > resume.version:
            if isinstance(self.sink, (SharedStoreSynthesis, UpstreamSynthesis)):
                self.owner._aggregating = True  # until that round's global model exists
                sink, rnd = self.sink, own.delivered
                self._scope.spawn(
                    self._complete_delivered(sink, rnd, state, extra),
                    name="resume-synthesis",
                    daemon=True,
                )
        drop = self.config.staleness == "drop"
        moved = [r.model_id for r in own.buffered if r.round != resume.version + 1]
        if moved:
            await self._db(
                self.store.carry_uploads,
                self.run_id,
                moved,
                round=resume.version + 1,
                drop=drop,
            )
        dropped = set(moved) if drop else set()
        buffered = [r for r in own.buffered if r.model_id not in dropped]
        replayed = await self.driver.replay(weights, state, resume.version, buffered)
        self.driver.accumulator = replayed.accumulator
        self.driver.inputs = replayed.inputs
        self.state.contributors = replayed.contributors
        self._initialized.set()
        log.info(
            "member %s resumed at version %d with %d buffered upload(s)%s",
            self.config.name,
            resume.version,
            len(buffered),
            f"; round {own.delivered} delivered, waiting for its synthesis"
            if self.owner._aggregating
            else "",
        )

    async def _complete_delivered(
        self,
        sink: SharedStoreSynthesis | UpstreamSynthesis,
        rnd: int,
        state: dict[str, Any],
        extra: Weights,
    ) -> None:
        """Resume: wait for (or make) the global model of the delivered round ``rnd``."""
        pause = 0.5
        while True:
            try:
                adopted = await sink.complete(rnd, extra)
                break
            except StoreError as exc:
                log.warning("waiting for the synthesis of round %d: %s", rnd, exc)
                await asyncio.sleep(pause)
                pause = min(pause * 2, 5.0)
        result = Result(adopted.weights, state, adopted.metrics, adopted.extra)
        await self._post(
            RoundCommitted(rnd, result, adopted.model_id, time.time(), version=adopted.version)
        )

    async def wait_finished(self) -> None:
        """Return when the last round is over and the agents had ``finish_grace`` seconds
        to collect the final model (or when :meth:`stop` was called).

        Raises:
            AggregatorFailed: a task the aggregator cannot run without failed.
        """
        finished = asyncio.ensure_future(self._finished.wait())
        stopped = asyncio.ensure_future(self._stopped.wait())
        await asyncio.wait({finished, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finished.cancel()
        stopped.cancel()
        if self._failure is not None:
            raise AggregatorFailed(f"the aggregator stopped: {self._failure!r}") from self._failure
        if self._stopped.is_set():
            return
        deadline = time.monotonic() + self.config.finish_grace
        while self.sessions and time.monotonic() < deadline and not self._stopped.is_set():
            await asyncio.sleep(0.05)
        await self._scope.wait_idle(60)
        assert self.store is not None
        await self._db(self.store.finish_run, self.run_id)
        log.info("run %s finished after %d rounds", self.run_id[:8], self.state.version)

    async def wait_for_version(self, version: int) -> None:
        """Return once global model ``version`` (or a later one) exists.

        Raises:
            ConnectionClosed: the aggregator stopped first.
        """
        while self.state.version < version:
            if self._stopped.is_set():
                raise ConnectionClosed(1001, "aggregator stopped")
            await self.owner.new_version.wait()

    @property
    def stopped(self) -> bool:
        """Whether the aggregator stopped or is stopping (:meth:`stop`, a fatal failure)."""
        return self._stopped.is_set()

    async def stop(self) -> None:
        """Stop serving: say bye to the agents, close connections, end every task, close
        the store.

        Idempotent: a second (or concurrent) call waits for the first one's work (the
        operator API's shutdown and the CLI's signal handling may both call it)."""
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._stop())
        await asyncio.shield(self._stopping)

    async def _stop(self) -> None:
        self._stopped.set()
        self.owner.new_version.set()  # wake wait_for_version
        if self._server is not None:
            self._server.close()
        if self._inproc is not None:
            self._inproc.close()
        if self.operator is not None:
            with contextlib.suppress(Exception):
                await self.operator.stop()
        if self.upstream is not None:
            await self.upstream.close()

        async def bye(s: Session) -> None:
            with contextlib.suppress(Exception):
                await s.send(Bye(reason="aggregator stopping"), 1.0)
            with contextlib.suppress(Exception):
                await s.conn.close(1001, "aggregator stopping", timeout=1.0)

        await asyncio.gather(*(bye(s) for s in list(self.sessions.values())))
        await self.connections.close(grace=2.0)  # they end by themselves; or are cancelled
        await self._scope.aclose()
        self._joined.set()  # connections still waiting for the join end now
        if self.membership is not None:
            await self.membership.leave()
        for up in self.owner.upload_queue:  # nobody waits for these any more
            up.reply.cancel()
        self.owner.upload_queue.clear()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
        if self.trackers is not None:  # their pending writes read the store
            await self.trackers.close(finished=self.state.finished)
        if self.store is not None:
            with contextlib.suppress(StoreError):
                await self.registry.audit.flush(force=True)
            if self._own_store:
                await self._db(self.store.close)
        self.workers.close()

    async def _watch_database(self) -> None:
        """Every :data:`DATABASE_CHECK_INTERVAL` s, check the store's database file is
        still there (raises :class:`~fedstack.errors.DatabaseReplaced`, which stops the
        aggregator: going on would lose credentials and runs on the next start)."""
        store = self.store
        assert store is not None
        while True:
            await asyncio.sleep(DATABASE_CHECK_INTERVAL)
            await asyncio.to_thread(store.check_database)  # a stat, not the store thread

    def _fatal(self, name: str, exc: BaseException) -> None:
        """A task the aggregator cannot run without failed: stop, loudly."""
        log.critical("aggregator task %s failed; stopping the aggregator", name, exc_info=exc)
        if self._failure is None:
            self._failure = exc
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._stop())

    async def _post(self, event: Event) -> None:
        """Queue ``event`` for the owner (waits while the queue is full)."""
        await self._events.put(event)

    async def audit_refusal(
        self, kind: str, detail: dict[str, Any], *, address: str, agent_id: str | None = None
    ) -> None:
        """Write a refusal (of a registration, an operator call) to the audit trail, at a
        bounded rate per source: a flood is counted, not written row by row (see
        :class:`~fedstack.aggregator.registry.RefusalAudit`).

        Raises:
            StoreError: the store could not write it.
        """
        await self.registry.audit.record(
            kind, detail, address=address, run_id=self.run_id, agent_id=agent_id
        )

    def _gauges(self) -> Gauges:
        """The state series of :attr:`metrics`, read at each scrape."""
        from fedstack import __version__

        return Gauges(
            rounds_completed=max(self.state.version, 0),  # = the run's committed rounds
            round=self.state.round,
            version=self.state.version,
            finished=self.state.finished,
            active_agents=len(self.sessions),
            connected_agents=len(self.connections.tasks),
            uploads_queued=len(self.owner.upload_queue),
            budgets={
                name: BudgetUse(b.used, b.limit, b.peak, b.waited)
                for name, b in (("upload", self.upload_budget), ("fanout", self.fanout.budget))
            },
            info={
                "run_id": self.run_id,
                "aggregator_id": self.aggregator_id,
                "strategy": self.strategy.name,
                "delivery": self.config.delivery,
                "fedstack_version": __version__,
            },
        )

    def statistics(self, *, agents: bool = False) -> AggregatorStatistics:
        """An immutable snapshot (with the connected agents if ``agents``)."""
        active = len(self.sessions)
        listed: tuple[AgentStatistics, ...] = ()
        if agents:
            now_wall, now_mono = time.time(), time.monotonic()
            listed = tuple(
                sorted(
                    (
                        AgentStatistics(
                            name=s.name,
                            agent_id=s.agent_id,
                            address=s.address,
                            last_seen=now_wall - (now_mono - s.last_seen),
                            idle_seconds=round(now_mono - s.last_seen, 3),
                            known_version=s.known_version,
                            welcomed=s.welcomed,
                            credential_source=s.source,
                            credential=fingerprint(s.credential),
                        )
                        for s in list(self.sessions.values())
                    ),
                    key=lambda a: a.name,
                )
            )
        return AggregatorStatistics(
            run_id=self.run_id,
            aggregator_id=self.aggregator_id,
            version=self.state.version,
            round=self.state.round,
            active_agents=active,
            contributors=len(self.state.contributors),
            needed=self.state.needed(active),
            finished=self.state.finished,
            rounds_completed=self.rounds_completed,
            strategy=self.strategy.name,
            delivery=self.config.delivery,
            tls=self.ssl_context is not None,
            uploads_queued=len(self.owner.upload_queue),
            agents=listed,
            name=self.config.name,
            peers=tuple(self.membership.peers) if self.membership is not None else (),
        )

    def _welcome_fields(self) -> dict[str, Any]:
        fields = {
            "aggregator_id": self.aggregator_id,
            "run_id": self.run_id,
            "delivery": self.config.delivery,
            "heartbeat_interval": self.config.heartbeat_interval,
            "config": self.federation_config,
        }
        if self.membership is not None:
            fields["aggregators"] = list(self.membership.peers)
        return fields

    # ------------------------------------------------------------------ disconnecting
    def disconnect_agent(self, name: str, code: str, message: str, detail: dict[str, Any]) -> bool:
        """Drop the connected agent called ``name`` now: it stops counting towards rounds,
        gets a fatal ``code`` error and its connection closes (audited as ``refused`` with
        ``detail``). False if no agent of that name is connected."""
        found = self.registry.find(name)
        for s in found:
            self._disconnect(s, code, message, detail)
        return bool(found)

    async def _revoked(self, s: Session, why: str) -> None:
        """The credential watcher found ``s``'s credential revoked or replaced."""
        self._disconnect(
            s,
            "revoked",
            f"the credential of agent {s.name!r} was {why}",
            {"name": s.name, "stage": "credential-check", "reason": why},
        )

    def _disconnect(self, s: Session, code: str, message: str, detail: dict[str, Any]) -> None:
        left = AgentLeft(s)
        try:
            self._events.put_nowait(left)  # no longer counts, as soon as the owner runs
        except asyncio.QueueFull:
            left = None  # type: ignore[assignment]

        async def refuse() -> None:
            if left is None:
                await self._post(AgentLeft(s))
            await self.registry.refuse(s.conn, code, message, s, refusal_detail(s, detail))

        with contextlib.suppress(ScopeClosed):
            self._scope.spawn(refuse(), name="refuse")


def _first_run(store: Store, mine: RunInfo) -> RunInfo:
    """Members started at the same moment may each have created a run of that name: all
    take the oldest running one (the same for everyone); an unused one of ours is closed."""
    running = [r for r in store.list_runs() if r["name"] == mine.name and r["status"] == "running"]
    first = min(running, key=lambda r: (r["created"], r["id"]), default=None)
    if first is None or first["id"] == mine.id:
        return mine
    store.finish_run(mine.id)
    log.info("run %r was created by another member at the same time: joining it", mine.name)
    return store.get_run(first["id"])


PRIVACY_SETTINGS = ("secagg", "dp", "he")
"""What a run keeps from its start to its end: resuming it with another of these would
silently change what the agents' updates are protected by."""
_PRIVACY_OFF: dict[str, Any] = {"secagg": False, "dp": "off", "he": "off"}


def _check_privacy_unchanged(stored: Mapping[str, Any], cfg: AggregatorConfig, run: str) -> None:
    """Refuse (ConfigError) to resume run ``run``, started with the privacy settings in
    ``stored`` (its recorded configuration), with other ones."""
    if not stored:  # a run registered by `fedstack model register`, not started yet
        return
    was = {k: stored.get(k, _PRIVACY_OFF[k]) for k in PRIVACY_SETTINGS}
    now = {k: getattr(cfg, k) for k in PRIVACY_SETTINGS}
    if was != now:
        differ = ", ".join(f"{k} = {was[k]!r} (now {now[k]!r})" for k in was if was[k] != now[k])
        raise ConfigError(
            f"run {run!r} was started with {differ}: resume it with the same privacy "
            "settings, or start a new run with another --run-name (a run never changes "
            "how its agents' updates are protected)"
        )


def _public_config(cfg: AggregatorConfig) -> dict[str, Any]:
    return {
        k: v
        for k, v in asdict(cfg).items()
        if k not in ("db", "blob_dir", "enrollment_token", "track")
    }
