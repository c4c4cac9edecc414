"""The aggregator: serves its cluster of agents, runs rounds, persists, distributes.

One WebSocket port (or an in-process server) serves everything. Each connection runs
:meth:`Aggregator._serve_agent`, which turns what arrives into typed events
(:mod:`fedstack.aggregator.events`) on ONE bounded queue. One task, the round owner
(:meth:`Aggregator._own`), applies them in order to the round state
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
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict
from typing import Any, TypeVar

import numpy as np

from fedstack.aggregator.config import AggregatorConfig
from fedstack.aggregator.connections import AgentConnections
from fedstack.aggregator.delivery import Delivery, PollWaiters, Published
from fedstack.aggregator.driver import Evaluator, RoundDriver
from fedstack.aggregator.events import (
    AgentJoined,
    AgentLeft,
    BatchCommitted,
    DeadlineFired,
    Event,
    FederationStarted,
    PollReceived,
    RoundCommitted,
    UploadReceived,
)
from fedstack.aggregator.fanout import Fanout
from fedstack.aggregator.gate import UpdateGate
from fedstack.aggregator.operator_api import OperatorAPI
from fedstack.aggregator.registry import Registry, Session, refusal_detail
from fedstack.aggregator.rounds import RoundState, UploadStatus
from fedstack.aggregator.statistics import AgentStatistics, AggregatorStatistics
from fedstack.aggregator.tasks import ScopeClosed, TaskScope
from fedstack.aggregator.uploads import Committer, plan_batch
from fedstack.aggregator.validation import Structure
from fedstack.aggregator.workers import Workers
from fedstack.errors import (
    ConfigError,
    ConnectionClosed,
    FedstackError,
    StoreError,
)
from fedstack.plugins import load_callable
from fedstack.security.tls import server_context
from fedstack.store import Store
from fedstack.store.repository import fingerprint
from fedstack.strategies import create
from fedstack.transport import inproc, serve
from fedstack.transport.budget import ByteBudget
from fedstack.transport.limits import raise_nofile_limit
from fedstack.types import Metrics, Weights
from fedstack.wire import (
    Bye,
    Error,
    Limits,
    Message,
    UploadAck,
)

__all__ = ["Aggregator", "AggregatorFailed", "Evaluator"]

T = TypeVar("T")

EVENT_QUEUE_SIZE = 4096
"""Events waiting for the round owner; a full queue makes connections wait (backpressure)."""
MAX_POLL_WAIT = 3600.0

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
        self.strategy = create(config.strategy, **config.strategy_params)
        if self.strategy.trigger is not None and config.staleness == "drop":
            raise ConfigError(
                f"strategy {config.strategy!r} is asynchronous and weighs stale updates "
                "itself: use staleness 'next' (the default), not 'drop'"
            )
        if evaluator is None and config.evaluator:
            evaluator = load_callable(config.evaluator)
        self.evaluator = evaluator
        self.limits = Limits(max_message_bytes=config.max_message_bytes)
        self.ssl_context = (
            server_context(config.tls_cert, config.tls_key, config.tls_client_ca)
            if config.tls_cert
            else None
        )
        """The TLS context the port serves with (None: plaintext ws://)."""
        self.gate = UpdateGate.from_config(config.gate)
        self._baseline: tuple[int, Any] | None = None  # (version, the gate's probe outputs)
        self.rng = np.random.default_rng(config.seed)
        self.federation_config: Metrics = {**config.federation, **self.strategy.agent_config()}
        if self.strategy.trigger is not None:
            # asynchronous rules weigh stale updates themselves: agents must send them
            self.federation_config.setdefault("discard_stale", False)
        # ---- round state: changed only by the owner task (read-only for everyone else)
        self.state = RoundState(
            threshold=config.threshold,
            min_agents=config.min_agents,
            round_timeout=config.round_timeout,
            max_rounds=config.rounds,
            staleness_policy=config.staleness,
            trigger=self.strategy.trigger,
            min_updates=self.strategy.min_updates,
        )
        self.aggregator_id = uuid.uuid4().hex
        self.run_id = ""
        self.structure: Structure | None = None
        self.global_weights: Weights | None = None
        self.global_model_id = ""
        self.global_extra: Weights = {}
        self.strategy_state: dict[str, Any] = {}
        self.rounds_completed = 0
        self._published: Published | None = None
        self._upload_queue: collections.deque[UploadReceived] = collections.deque()
        self._batch_in_flight = False
        self._aggregating = False
        self._retry_at: float | None = None
        self._warned_round = 0
        self._polls = PollWaiters()
        self._new_version = asyncio.Event()
        # ---- the parts
        self.workers = Workers(inline=config.transport == "inproc")
        self._db = self.workers.db
        """Runs a database call on the store thread (see :class:`Workers`)."""
        self._events: asyncio.Queue[Event] = asyncio.Queue(EVENT_QUEUE_SIZE)
        self.registry = Registry(
            config, self.workers.registry, lambda: self.store, lambda: self.run_id
        )
        self.sessions = self.registry.sessions
        """Agent id -> the session that counts towards rounds (read-only)."""
        self.fanout = Fanout(config.fanout_budget_bytes)
        """Global model encoded once per version; bytes of big sends in flight bounded."""
        self.upload_budget = ByteBudget(config.upload_budget_bytes)
        """Bytes of big uploads being received or processed at once (all connections)."""
        self.delivery = Delivery(
            self.fanout, lambda: self._published, config.send_timeout, self._welcome_fields
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
        self.committer = Committer(
            db=self._db,
            compute=self.workers.compute,
            store=lambda: self.store,
            run_id=lambda: self.run_id,
            gate=self.gate,
            gate_check=self._gate_check,
            accumulator=lambda: self.driver.accumulator,
            post=self._post,
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
        self.port = config.port

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
        self.run_id = run.id
        self.aggregator_id = run.aggregator_id
        if run.version >= 0:
            await self._resume(run.structure, run.version)
        self._driver = self._scope.spawn(
            self._own(), name="round-owner", critical=True, daemon=True
        )
        self._scope.spawn(self.committer.run(), name="committer", critical=True, daemon=True)
        self._scope.supervise(
            "credential-watcher", lambda: self.registry.watch_credentials(self._revoked)
        )
        self._scope.supervise("refusal-audit", self.registry.audit.run_flusher)
        if cfg.transport == "inproc":
            self._inproc = await inproc.serve(
                self.connections.serve, cfg.run_name, max_message_bytes=cfg.max_message_bytes
            )
        else:
            self._server = await serve(
                self.connections.serve,
                cfg.host,
                cfg.port,
                max_message_bytes=cfg.max_message_bytes,
                ssl=self.ssl_context,
                handshake_timeout=cfg.register_timeout,
                http_handler=OperatorAPI(self).handle if cfg.operator_api else None,
                receive_budget=self.upload_budget,
            )
            self.port = self._server.sockets[0].getsockname()[1]
        log.info(
            "aggregator listening on %s%s (run %s, %s, version %d, store %s)",
            self.url,
            " with mutual TLS" if cfg.tls_client_ca else "",
            self.run_id[:8],
            "resumed" if run.resumed else "new",
            self.state.version,
            self.store.url,
        )
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
        self.structure = structure
        self._adopt(resume.version, resume.global_model_id, weights, extra, state)
        replayed = await self.driver.replay(weights, state, resume.version, resume.buffered)
        self.driver.accumulator = replayed.accumulator
        self.driver.inputs = replayed.inputs
        self.state.contributors = replayed.contributors
        self._initialized.set()
        log.info(
            "resumed at version %d with %d buffered upload(s)", resume.version, len(resume.buffered)
        )

    def _adopt(
        self, version: int, model_id: str, weights: Weights, extra: Weights, state: dict[str, Any]
    ) -> None:
        """Owner only: ``weights`` is global model ``version``; round ``version + 1`` starts."""
        self.global_weights, self.global_model_id = weights, model_id
        self.global_extra, self.strategy_state = extra, state
        self.state.start(version, self.clock())
        self.driver.begin(weights, state, self.state.round)
        self._published = Published(
            version, self.state.round, model_id, weights, extra, self.state.finished
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
            await self._new_version.wait()

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
        self._new_version.set()  # wake wait_for_version
        if self._server is not None:
            self._server.close()
        if self._inproc is not None:
            self._inproc.close()

        async def bye(s: Session) -> None:
            with contextlib.suppress(Exception):
                await s.send(Bye(reason="aggregator stopping"), 1.0)
            with contextlib.suppress(Exception):
                await s.conn.close(1001, "aggregator stopping", timeout=1.0)

        await asyncio.gather(*(bye(s) for s in list(self.sessions.values())))
        await self.connections.close(grace=2.0)  # they end by themselves; or are cancelled
        await self._scope.aclose()
        for up in self._upload_queue:  # nobody waits for these any more
            up.reply.cancel()
        self._upload_queue.clear()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
        if self.store is not None:
            with contextlib.suppress(StoreError):
                await self.registry.audit.flush(force=True)
            if self._own_store:
                await self._db(self.store.close)
        self.workers.close()

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
            uploads_queued=len(self._upload_queue),
            agents=listed,
        )

    # ------------------------------------------------------------------ the round owner
    async def _own(self) -> None:
        """The one task that changes round state: apply events in order, then act."""
        get = self._events.get
        while True:
            wake = self._next_wakeup()
            if wake is None:
                event: Event | None = await get()
            else:
                try:
                    async with asyncio.timeout_at(
                        asyncio.get_running_loop().time() + max(0.0, wake - self.clock())
                    ):
                        event = await get()
                except TimeoutError:
                    event = DeadlineFired()
            while event is not None:
                self._apply(event)
                try:
                    event = self._events.get_nowait()
                except asyncio.QueueEmpty:
                    event = None
            self._act()

    def _next_wakeup(self) -> float | None:
        """The next clock time the owner must act without an event (or None)."""
        times = [t for t in (self._retry_at, self._polls.next_expiry()) if t is not None]
        deadline = self.state.deadline()
        if deadline is not None and deadline > self.clock():  # once past, events decide
            times.append(deadline)
        return min(times) if times else None

    def _apply(self, ev: Event) -> None:
        if isinstance(ev, UploadReceived):
            self._upload_queue.append(ev)
        elif isinstance(ev, BatchCommitted):
            self._counted(ev)
        elif isinstance(ev, PollReceived):
            self._poll(ev)
        elif isinstance(ev, AgentJoined):
            old = self.registry.add(ev.session)
            if old is not None:
                log.info("agent %s reconnected; dropping its previous connection", old.name)
                self._polls.remove(old)
                old.conn.abort()
            log.info("agent %s joined (%d active)", ev.session.name, len(self.sessions))
            if not ev.reply.done():
                ev.reply.set_result(None)
        elif isinstance(ev, AgentLeft):
            self._polls.remove(ev.session)
            if self.registry.remove(ev.session):
                log.info("agent %s left (%d active)", ev.session.name, len(self.sessions))
        elif isinstance(ev, RoundCommitted):
            self._round_done(ev)
        elif isinstance(ev, DeadlineFired):
            pass  # _act looks at the clock after every batch of events
        elif isinstance(ev, FederationStarted):
            self.structure = ev.structure
            weights = ev.weights
            self._adopt(
                0,
                ev.model_id,
                weights,
                self.strategy.initial_extra(weights),
                self.strategy.init_state(weights),
            )
            self._initialized.set()
            if not ev.reply.done():
                ev.reply.set_result(None)
        else:  # pragma: no cover - the union is closed
            raise TypeError(f"unknown event {ev!r}")

    def _act(self) -> None:
        """After events: answer expired polls, then aggregate or store the next batch."""
        now = self.clock()
        for s, known in self._polls.take_due(now):
            self._reply(s, self.delivery.answer_poll(s, known), "poll")
        if (
            self._aggregating
            or self._batch_in_flight
            or not self.state.initialized
            or (self._retry_at is not None and now < self._retry_at)
        ):
            return
        self._retry_at = None
        active = len(self.sessions)
        n = len(self.state.contributors)
        dl = self.state.deadline()
        if (
            dl is not None
            and now >= dl
            and 0 < n < self.state.min_updates
            and self._warned_round != self.state.round
        ):
            self._warned_round = self.state.round
            log.warning(
                "round %d is past its deadline with %d update(s); strategy %s needs "
                "at least %d (%d agents active)",
                self.state.round,
                n,
                self.strategy.name,
                self.state.min_updates,
                active,
            )
        if self.state.ready(now, active):
            self._aggregating = True
            assert self.global_weights is not None
            self._scope.spawn(
                self._aggregate(
                    round=self.state.round,
                    inputs=list(self.state.contributors.values()),
                    base_model_id=self.global_model_id,
                    global_weights=self.global_weights,
                    state=self.strategy_state,
                    version=self.state.version,
                ),
                name="aggregate",
                daemon=True,
            )
        elif self._upload_queue:
            self._batch_in_flight = True
            self.committer.submit(plan_batch(self._upload_queue, self.state, now, active))

    def _counted(self, ev: BatchCommitted) -> None:
        """A batch is stored: count what it stored and answer, in arrival order."""
        self._batch_in_flight = False
        if ev.error is not None:  # e.g. the store is unavailable: no acks
            for p in ev.batch:
                if not p.upload.reply.done():
                    p.upload.reply.set_exception(ev.error)
            return
        for p, (rec, created, add_error) in zip(ev.batch, ev.results, strict=True):
            session, msg = p.upload.session, p.upload.msg
            reply: Message
            if not created:
                reply = UploadAck(
                    upload_id=msg.upload_id,
                    status=str(UploadStatus.from_stored(rec.status)),
                    round=rec.round,
                    message="already received",
                )
            elif p.status.counts and add_error is not None:  # e.g. a buffered rule is full
                reply = Error(code="invalid-model", message=add_error)
            else:
                if p.status is UploadStatus.REJECTED:
                    log.warning(
                        "round %d: rejected the update of %s: %s",
                        self.state.round,
                        session.name,
                        p.message,
                    )
                    self._audit(
                        "update_rejected",
                        {"upload_id": msg.upload_id, "model_id": rec.model_id, "reason": p.message},
                        session.agent_id,
                    )
                elif p.status.counts:
                    self.state.contribute(session.agent_id, rec.model_id)
                    self.driver.inputs.append((msg.num_samples, msg.metrics))
                reply = UploadAck(
                    upload_id=msg.upload_id,
                    status=p.status.value,
                    round=self.state.round,
                    message=p.message,
                )
                log.info(
                    "round %d: %s from %s (%d/%d)",
                    self.state.round,
                    p.status.value,
                    session.name,
                    len(self.state.contributors),
                    self.state.needed(len(self.sessions)),
                )
            if not p.upload.reply.done():
                p.upload.reply.set_result(reply)

    def _poll(self, ev: PollReceived) -> None:
        s, msg = ev.session, ev.msg
        self._polls.remove(s)  # a new poll replaces the one waiting
        if self.state.version > msg.known_version or msg.wait <= 0 or self._published is None:
            self._reply(s, self.delivery.answer_poll(s, msg.known_version), "poll")
        else:
            self._polls.add(s, msg.known_version, self.clock() + min(msg.wait, MAX_POLL_WAIT))

    def _reply(self, s: Session, coro: Any, name: str) -> None:
        """Send to ``s`` as a task of its connection (dropped if it is closing)."""
        with contextlib.suppress(ScopeClosed):
            s.scope.spawn(coro, name=name)

    def _audit(self, kind: str, detail: dict[str, Any], agent_id: str | None) -> None:
        """Write an audit event in the background (a store error is logged)."""
        store = self.store
        assert store is not None

        async def write() -> None:
            with contextlib.suppress(StoreError):
                await self._db(store.log_event, kind, detail, run_id=self.run_id, agent_id=agent_id)

        with contextlib.suppress(ScopeClosed):
            self._scope.spawn(write(), name=f"audit-{kind}")

    async def _aggregate(self, **round_input: Any) -> None:
        """Effect: aggregate the round in progress, report a RoundCommitted."""
        await self._post(await self.driver.aggregate(**round_input))

    def _round_done(self, ev: RoundCommitted) -> None:
        self._aggregating = False
        if ev.error is not None or ev.result is None:
            if ev.rebuilt is not None:
                self.driver.accumulator = ev.rebuilt.accumulator
                self.driver.inputs = ev.rebuilt.inputs
                self.state.contributors = ev.rebuilt.contributors
            if isinstance(ev.error, StoreError):
                log.error("cannot store round %d (will retry): %s", ev.round, ev.error)
            else:  # a bug must not silently stop the federation: the uploads are stored
                log.error(
                    "aggregation of round %d failed (will retry)", ev.round, exc_info=ev.error
                )
            self._retry_at = self.clock() + 1.0
            return
        result, inputs = ev.result, len(self.state.contributors)
        seconds = ev.finished_wall - self.driver.started_wall
        self._adopt(self.state.version + 1, ev.model_id, result.weights, result.extra, result.state)
        self.rounds_completed += 1
        waiter, self._new_version = self._new_version, asyncio.Event()
        waiter.set()
        log.info(
            "round %d aggregated from %d update(s) in %.3f s%s",
            ev.round,
            inputs,
            seconds,
            " (final)" if self.state.finished else "",
        )
        version = self.state.version
        for s, known in self._polls.take_all():
            self._reply(s, self.delivery.answer_poll(s, known), "poll")
        if self.config.delivery == "push":
            for s in self.sessions.values():
                if s.welcomed and s.known_version < version:
                    self._reply(s, self.delivery.push(s, version), "push")
        if self.evaluator is not None:
            self._scope.spawn(self.driver.evaluate(ev.round, result.weights), name="evaluate")
        now = time.monotonic()
        if self.driver.checkpoint_due(self.state.finished, now):
            self._scope.spawn(self.driver.checkpoint(now), name="checkpoint")
        if self.state.finished:
            self._finished.set()

    def _gate_check(self, weights: Weights) -> Any:
        assert self.gate is not None and self.global_weights is not None
        baseline = None
        if self.gate.max_deviation is not None:
            if self._baseline is None or self._baseline[0] != self.state.version:
                self._baseline = (self.state.version, self.gate.baseline(self.global_weights))
            baseline = self._baseline[1]
        return self.gate.check(weights, self.global_weights, baseline)

    def _welcome_fields(self) -> dict[str, Any]:
        return {
            "aggregator_id": self.aggregator_id,
            "run_id": self.run_id,
            "delivery": self.config.delivery,
            "heartbeat_interval": self.config.heartbeat_interval,
            "config": self.federation_config,
        }

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


def _public_config(cfg: AggregatorConfig) -> dict[str, Any]:
    return {k: v for k, v in asdict(cfg).items() if k not in ("db", "blob_dir", "enrollment_token")}
