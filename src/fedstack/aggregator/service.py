"""The aggregator: serves its cluster of agents, runs rounds, persists, distributes.

:class:`Aggregator` assembles the parts, starts and stops them, and is the public face
(``start``, ``wait_finished``, ``wait_for_version``, ``statistics``, ``stop``).

One WebSocket port (or an in-process server) serves everything. Each connection runs
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
"""

from __future__ import annotations

import asyncio
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
from fedstack.aggregator.delivery import Delivery
from fedstack.aggregator.driver import Evaluator, RoundDriver
from fedstack.aggregator.events import (
    AgentLeft,
    Event,
)
from fedstack.aggregator.fanout import Fanout
from fedstack.aggregator.gate import UpdateGate
from fedstack.aggregator.operator_api import OperatorAPI
from fedstack.aggregator.owner import RoundOwner
from fedstack.aggregator.quotas import StorageQuota
from fedstack.aggregator.registry import Registry, Session, refusal_detail
from fedstack.aggregator.retention import Retention
from fedstack.aggregator.rounds import RoundState
from fedstack.aggregator.statistics import AgentStatistics, AggregatorStatistics
from fedstack.aggregator.tasks import ScopeClosed, TaskScope
from fedstack.aggregator.uploads import Committer
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
    Limits,
)

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
        self.rng = np.random.default_rng(config.seed)
        self.federation_config: Metrics = {**config.federation, **self.strategy.agent_config()}
        if self.strategy.trigger is not None:
            # asynchronous rules weigh stale updates themselves: agents must send them
            self.federation_config.setdefault("discard_stale", False)
        # ---- round state: changed only by the owner task (read-only for everyone else)
        self.aggregator_id = uuid.uuid4().hex
        self.run_id = ""
        self.owner = RoundOwner(self)
        """The round state and the task that changes it (see :mod:`.owner`)."""
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
        self.committer = Committer(
            db=self._db,
            compute=self.workers.compute,
            store=lambda: self.store,
            run_id=lambda: self.run_id,
            gate=self.gate,
            gate_check=self.owner.gate_check,
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
        self.run_id = run.id
        self.aggregator_id = run.aggregator_id
        if run.version >= 0:
            await self._resume(run.structure, run.version)
        self._driver = self._scope.spawn(
            self.owner.run(), name="round-owner", critical=True, daemon=True
        )
        self._scope.spawn(self.committer.run(), name="committer", critical=True, daemon=True)
        self._scope.supervise(
            "credential-watcher", lambda: self.registry.watch_credentials(self._revoked)
        )
        self._scope.supervise("refusal-audit", self.registry.audit.run_flusher)
        self._scope.spawn(self._watch_database(), name="database-watch", critical=True, daemon=True)
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
                first_message_bytes=self.connections.first_message_limit,
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
        self.owner.structure = structure
        self.owner.adopt(resume.version, resume.global_model_id, weights, extra, state)
        replayed = await self.driver.replay(weights, state, resume.version, resume.buffered)
        self.driver.accumulator = replayed.accumulator
        self.driver.inputs = replayed.inputs
        self.state.contributors = replayed.contributors
        self._initialized.set()
        log.info(
            "resumed at version %d with %d buffered upload(s)", resume.version, len(resume.buffered)
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

        async def bye(s: Session) -> None:
            with contextlib.suppress(Exception):
                await s.send(Bye(reason="aggregator stopping"), 1.0)
            with contextlib.suppress(Exception):
                await s.conn.close(1001, "aggregator stopping", timeout=1.0)

        await asyncio.gather(*(bye(s) for s in list(self.sessions.values())))
        await self.connections.close(grace=2.0)  # they end by themselves; or are cancelled
        await self._scope.aclose()
        for up in self.owner.upload_queue:  # nobody waits for these any more
            up.reply.cancel()
        self.owner.upload_queue.clear()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
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
        )

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
