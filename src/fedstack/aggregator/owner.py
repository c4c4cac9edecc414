"""The round owner: the one task that changes an aggregator's round state.

:class:`RoundOwner` holds the round state (:class:`~fedstack.aggregator.rounds.RoundState`,
the global model, the uploads waiting for the store, the long polls) and
:meth:`RoundOwner.run` applies the aggregator's events (:mod:`fedstack.aggregator.events`)
to it one at a time, in order, then acts: it answers expired polls, starts the aggregation
of a ready round or hands the next batch of uploads to the committer. Its effects report
back as events. Nothing else writes round state; everything else reads it (or, better,
:meth:`Aggregator.statistics <fedstack.aggregator.service.Aggregator.statistics>`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

from fedstack.aggregator.delivery import PollWaiters, Published
from fedstack.aggregator.events import (
    AgentJoined,
    AgentLeft,
    BarrierOpened,
    BatchCommitted,
    ClaimsAbsorbed,
    DeadlineFired,
    Event,
    Excused,
    FederationStarted,
    Followed,
    GlobalAdvanced,
    PollReceived,
    RoundCommitted,
    SecAggMessage,
    SecAggWelcomed,
    UploadReceived,
    UploadsClaimed,
)
from fedstack.aggregator.registry import Session
from fedstack.aggregator.rounds import RoundState, UploadStatus
from fedstack.aggregator.tasks import ScopeClosed
from fedstack.aggregator.uploads import plan_batch
from fedstack.aggregator.validation import Structure
from fedstack.errors import StoreError
from fedstack.types import Metrics, Weights
from fedstack.wire import Error, Message, UploadAck

if TYPE_CHECKING:
    from fedstack.aggregator.federation import Adopted
    from fedstack.aggregator.service import Aggregator
    from fedstack.store import UploadRecord

log = logging.getLogger("fedstack.aggregator")

MAX_POLL_WAIT = 3600.0
"""Longest a poll may wait for a new version, seconds."""


class RoundOwner:
    """The round state of one aggregator and the task that changes it.

    Args:
        aggregator: whose events the owner consumes and whose parts it drives.
    """

    def __init__(self, aggregator: Aggregator) -> None:
        self.agg = aggregator
        self.state = RoundState(
            threshold=aggregator.config.threshold,
            min_agents=aggregator.config.min_agents,
            round_timeout=aggregator.config.round_timeout,
            max_rounds=aggregator.config.rounds,
            staleness_policy=aggregator.config.staleness,
            trigger=aggregator.strategy.trigger,
            min_updates=aggregator.strategy.min_updates,
        )
        self.structure: Structure | None = None
        self.global_weights: Weights | None = None
        self.global_model_id = ""
        self.global_extra: Weights = {}
        self.strategy_state: dict[str, Any] = {}
        self.rounds_completed = 0
        self.published: Published | None = None
        self.upload_queue: collections.deque[UploadReceived] = collections.deque()
        self._batch_in_flight = False
        self._aggregating = False
        self._retry_at: float | None = None
        self._warned_round = 0
        self._warned_target = False
        self._polls = PollWaiters()
        self.new_version = asyncio.Event()
        self._baseline: tuple[int, Any] | None = None  # (version, the gate's probe outputs)
        # ---- federation only (see fedstack.aggregator.membership)
        self._follow: Adopted | None = None  # a newer global model to adopt when idle
        self._claimed: list[UploadRecord] = []  # claimed uploads to feed to the round
        self._recheck = False  # rebuild the round from the uploads still held here

    def adopt(
        self, version: int, model_id: str, weights: Weights, extra: Weights, state: dict[str, Any]
    ) -> None:
        """Owner only: ``weights`` is global model ``version``; round ``version + 1`` starts."""
        self.global_weights, self.global_model_id = weights, model_id
        self.global_extra, self.strategy_state = extra, state
        self.state.start(version, self.agg.clock())
        self.agg.driver.begin(weights, state, self.state.round)
        secagg = self.agg.secagg
        if secagg is not None:  # the masked inputs go to the round's first session
            self._secagg_restart(secagg.begin_round(self.state.round, weights))
        self.published = Published(
            version, self.state.round, model_id, weights, extra, self.state.finished
        )

    async def run(self) -> None:
        """The one task that changes round state: apply events in order, then act."""
        get = self.agg._events.get
        while True:
            wake = self._next_wakeup()
            if wake is None:
                event: Event | None = await get()
            else:
                try:
                    async with asyncio.timeout_at(
                        asyncio.get_running_loop().time() + max(0.0, wake - self.agg.clock())
                    ):
                        event = await get()
                except TimeoutError:
                    event = DeadlineFired()
            while event is not None:
                self._apply(event)
                try:
                    event = self.agg._events.get_nowait()
                except asyncio.QueueEmpty:
                    event = None
            self._act()

    def _next_wakeup(self) -> float | None:
        """The next clock time the owner must act without an event (or None)."""
        secagg = None if self.agg.secagg is None else self.agg.secagg.deadline()
        times = [t for t in (self._retry_at, self._polls.next_expiry(), secagg) if t is not None]
        deadline = self.state.deadline()
        if deadline is not None and deadline > self.agg.clock():  # once past, events decide
            times.append(deadline)
        return min(times) if times else None

    def _apply(self, ev: Event) -> None:
        if isinstance(ev, UploadReceived):
            self.upload_queue.append(ev)
        elif isinstance(ev, BatchCommitted):
            self._counted(ev)
        elif isinstance(ev, PollReceived):
            self._poll(ev)
        elif isinstance(ev, AgentJoined):
            old = self.agg.registry.add(ev.session)
            if old is not None:
                log.info("agent %s reconnected; dropping its previous connection", old.name)
                self._polls.remove(old)
                old.conn.abort()
            log.info("agent %s joined (%d active)", ev.session.name, len(self.agg.sessions))
            if not ev.reply.done():
                ev.reply.set_result(None)
            if self.agg.membership is not None:
                self.agg.membership.joined(ev.session.agent_id, self.state)
        elif isinstance(ev, AgentLeft):
            self._polls.remove(ev.session)
            if self.agg.registry.remove(ev.session):
                log.info("agent %s left (%d active)", ev.session.name, len(self.agg.sessions))
                if self.agg.secagg is not None:
                    self.agg.secagg.left(ev.session)
                if self.agg.membership is not None:
                    self.agg.membership.poke()
        elif isinstance(ev, Excused):
            if ev.round == self.state.round:
                self.state.excused.update(ev.agents - self.state.contributors.keys())
        elif isinstance(ev, BarrierOpened):
            pass  # _act asks the membership again
        elif isinstance(ev, RoundCommitted):
            self._round_done(ev)
        elif isinstance(ev, DeadlineFired):
            pass  # _act looks at the clock after every batch of events
        elif isinstance(ev, SecAggMessage):
            if self.agg.secagg is not None:
                self.agg.secagg.on_message(ev.session, ev.msg)
        elif isinstance(ev, SecAggWelcomed):
            if self.agg.secagg is not None:
                self.agg.secagg.joined(ev.session)
        elif isinstance(ev, FederationStarted):
            if self.state.initialized:  # another member's start, seen after our own
                if not ev.reply.done():
                    ev.reply.set_result(None)
                return
            self.structure = ev.structure
            weights = ev.weights
            self.adopt(
                ev.version,
                ev.model_id,
                weights,
                self.agg.strategy.initial_extra(weights),
                self.agg.strategy.init_state(weights),
            )
            self.agg._initialized.set()
            if not ev.reply.done():
                ev.reply.set_result(None)
        elif isinstance(ev, GlobalAdvanced):
            if self._follow is None or ev.adopted.version > self._follow.version:
                self._follow = ev.adopted
            self._recheck = self._recheck or ev.recheck
        elif isinstance(ev, Followed):
            self._followed(ev)
        elif isinstance(ev, UploadsClaimed):
            self._claimed.extend(ev.records)
        elif isinstance(ev, ClaimsAbsorbed):
            self._absorbed(ev)
        else:  # pragma: no cover - the union is closed
            raise TypeError(f"unknown event {ev!r}")

    def _act(self) -> None:
        """After events: answer expired polls, then aggregate or store the next batch."""
        now = self.agg.clock()
        for s, known in self._polls.take_due(now):
            self._reply(s, self.agg.delivery.answer_poll(s, known), "poll")
        if (
            self._aggregating
            or self._batch_in_flight
            or not self.state.initialized
            or (self._retry_at is not None and now < self._retry_at)
        ):
            return
        self._retry_at = None
        if (self._follow is not None or self._claimed) and self._federation_effect():
            return
        active = len(self.agg.sessions)
        secagg = self.agg.secagg
        if secagg is not None:  # (never while masked inputs are being counted: see above)
            secagg.tick(now)  # a phase that timed out closes (or the attempt fails)
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
                self.agg.strategy.name,
                self.state.min_updates,
                active,
            )
        ready = self.state.ready(now, active) if secagg is None else secagg.ready(now)
        if ready and self._barrier_open():
            self._aggregating = True
            assert self.global_weights is not None
            self.agg._scope.spawn(
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
        elif self.upload_queue:
            self._batch_in_flight = True
            self.agg.committer.submit(plan_batch(self.upload_queue, self.state, now, active))

    def _barrier_open(self) -> bool:
        """Sync synthesis: deliver only once every live member's cluster is complete for
        this round (see :meth:`Membership.barrier_open`); always True otherwise."""
        membership = self.agg.membership
        return membership is None or membership.barrier_open(self.state.round)

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
                if self.agg.secagg is not None:  # a masked input no session took: void
                    self._void([rec.model_id])
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
                    self.agg.driver.inputs.append((msg.num_samples, msg.metrics))
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
                    self.state.needed(len(self.agg.sessions)),
                )
            self.agg.metrics.count_upload(
                "resent" if not created else getattr(reply, "status", "refused")
            )
            if not p.upload.reply.done():
                p.upload.reply.set_result(reply)

    def _poll(self, ev: PollReceived) -> None:
        s, msg = ev.session, ev.msg
        self._polls.remove(s)  # a new poll replaces the one waiting
        if self.state.version > msg.known_version or msg.wait <= 0 or self.published is None:
            self._reply(s, self.agg.delivery.answer_poll(s, msg.known_version), "poll")
        else:
            self._polls.add(s, msg.known_version, self.agg.clock() + min(msg.wait, MAX_POLL_WAIT))

    def _reply(self, s: Session, coro: Any, name: str) -> None:
        """Send to ``s`` as a task of its connection (dropped if it is closing)."""
        with contextlib.suppress(ScopeClosed):
            s.scope.spawn(coro, name=name)

    def _audit(self, kind: str, detail: dict[str, Any], agent_id: str | None) -> None:
        """Write an audit event in the background (a store error is logged)."""
        store = self.agg.store
        assert store is not None

        async def write() -> None:
            with contextlib.suppress(StoreError):
                await self.agg._db(
                    store.log_event, kind, detail, run_id=self.agg.run_id, agent_id=agent_id
                )

        with contextlib.suppress(ScopeClosed):
            self.agg._scope.spawn(write(), name=f"audit-{kind}")

    async def _aggregate(self, **round_input: Any) -> None:
        """Effect: aggregate the round in progress, report a RoundCommitted."""
        await self.agg._post(await self.agg.driver.aggregate(**round_input))

    def _round_done(self, ev: RoundCommitted) -> None:
        self._aggregating = False
        if self.agg.secagg is not None and self.agg.secagg.is_failure(ev.error):
            # no model, no partial sum: the attempt is over, a new one starts
            self.agg.secagg.fail(ev.error)
            return
        if ev.error is not None or ev.result is None:
            if ev.rebuilt is not None:
                self.agg.driver.accumulator = ev.rebuilt.accumulator
                self.agg.driver.inputs = ev.rebuilt.inputs
                self.state.contributors = ev.rebuilt.contributors
            if isinstance(ev.error, StoreError):
                log.error("cannot store round %d (will retry): %s", ev.round, ev.error)
            else:  # a bug must not silently stop the federation: the uploads are stored
                log.error(
                    "aggregation of round %d failed (will retry)", ev.round, exc_info=ev.error
                )
            self._retry_at = self.agg.clock() + 1.0
            return
        result, inputs = ev.result, len(self.state.contributors)
        seconds = ev.finished_wall - self.agg.driver.started_wall
        version = self.state.version + 1 if ev.version is None else ev.version
        if ev.metrics is not None:
            self._check_target(ev.round, ev.metrics)  # before adopt: the model is final
        self.adopt(version, ev.model_id, result.weights, result.extra, result.state)
        self.rounds_completed += 1
        self.agg.metrics.observe_round(seconds)
        if self.agg.trackers is not None:
            self.agg.trackers.round_changed(version)
        log.info(
            "round %d aggregated from %d update(s) in %.3f s%s",
            ev.round,
            inputs,
            seconds,
            " (final)" if self.state.finished else "",
        )
        self._announce()
        if self.agg.evaluator is not None and not self.agg.driver.eval_in_round:
            self.agg._scope.spawn(
                self.agg.driver.evaluate(version, result.weights), name="evaluate"
            )
        if self.agg.config.keep_local_models != "all":
            self.agg._scope.spawn(self.agg.retention.after_commit(ev.round), name="retention")
        now = time.monotonic()
        if self.agg.driver.checkpoint_due(self.state.finished, now):
            self.agg._scope.spawn(self.agg.driver.checkpoint(now), name="checkpoint")
        if self.state.finished:
            self.agg._finished.set()

    # ------------------------------------------------------------------ secure aggregation
    def _secagg_restart(self, server: Any) -> None:
        """Owner: a new attempt (``server`` its session) takes the round's masked inputs;
        nothing of an earlier attempt counts."""
        from fedstack.aggregator.secagg import MaskedAccumulator

        self.state.contributors = {}
        self.agg.driver.accumulator = MaskedAccumulator(server)
        self.agg.driver.inputs = []

    def _void(self, model_ids: list[str]) -> None:
        """Mark stored masked inputs of a failed attempt ``stale`` (never aggregated)."""
        store, rnd = self.agg.store, self.state.round
        assert store is not None

        async def write() -> None:
            try:
                await self.agg._db(
                    store.carry_uploads, self.agg.run_id, model_ids, round=rnd, drop=True
                )
            except StoreError as exc:
                log.error("cannot mark %d masked input(s) stale: %s", len(model_ids), exc)

        with contextlib.suppress(ScopeClosed):
            self.agg._scope.spawn(write(), name="secagg-void")

    def _check_target(self, rnd: int, metrics: Metrics) -> None:
        """End the run if round ``rnd``'s ``metrics`` reach the target metric."""
        target = self.agg.target
        if target is None or self.state.target_reached:
            return
        reached = target.reached(metrics)
        if reached is None:
            if not self._warned_target:
                self._warned_target = True
                log.warning(
                    "round %d has no numeric metric %r for the target %s (its metrics: %s); "
                    "the run goes on",
                    rnd,
                    target.name,
                    target,
                    ", ".join(sorted(metrics)) or "none",
                )
            return
        if reached:
            self.state.target_reached = True
            log.info(
                "round %d reached the target %s (%s = %s): this is the final round",
                rnd,
                target,
                target.name,
                metrics[target.name],
            )

    def _announce(self) -> None:
        """A new global version was adopted: wake its waiters, answer the polls, push it."""
        waiter, self.new_version = self.new_version, asyncio.Event()
        waiter.set()
        version = self.state.version
        for s, known in self._polls.take_all():
            self._reply(s, self.agg.delivery.answer_poll(s, known), "poll")
        if self.agg.config.delivery == "push":
            for s in self.agg.sessions.values():
                if s.welcomed and s.known_version < version:
                    self._reply(s, self.agg.delivery.push(s, version), "push")
        if self.agg.membership is not None:
            self.agg.membership.poke()

    # ------------------------------------------------------------------ federation
    def _federation_effect(self) -> bool:
        """Start following a newer global model, or absorbing claimed uploads (before
        aggregating or storing more uploads). True if an effect started."""
        from fedstack.aggregator.membership import absorb_claims, carry_contributions

        follow, self._follow = self._follow, None
        recheck, self._recheck = self._recheck, False
        if follow is not None and (
            follow.version > self.state.version
            or (recheck and follow.version == self.state.version)
        ):
            self._aggregating = True  # nothing else until the round is carried over
            self.agg._scope.spawn(
                self._report(
                    carry_contributions(
                        self.agg,
                        follow,
                        dict(self.state.contributors),
                        self.strategy_state,
                        recheck=follow.version == self.state.version,
                    )
                ),
                name="follow",
                daemon=True,
            )
            return True
        claimed, self._claimed = self._claimed, []
        fresh: dict[str, UploadRecord] = {}
        duplicates: list[str] = []  # the round keeps one upload per agent
        for rec in claimed:
            if rec.agent_id in self.state.contributors or rec.agent_id in fresh:
                duplicates.append(rec.model_id)
            else:
                fresh[rec.agent_id] = rec
        self._batch_in_flight = True  # the accumulator is fed by one effect at a time
        self.agg._scope.spawn(
            self._report(
                absorb_claims(self.agg, list(fresh.values()), self.state.version, duplicates)
            ),
            name="absorb-claims",
            daemon=True,
        )
        return True

    async def _report(self, effect: Any) -> None:
        await self.agg._post(await effect)

    def _followed(self, ev: Followed) -> None:
        self._aggregating = False
        if ev.error is not None or ev.replayed is None:
            log.error("cannot carry round %d over (will retry): %s", self.state.round, ev.error)
            if self._follow is None:
                self._follow = ev.adopted
            self._retry_at = self.agg.clock() + 1.0
            return
        a = ev.adopted
        carried = len(ev.replayed.contributors)
        log.info(
            "following the federation: adopted global model %d (was %d; %d contribution(s) "
            "carried into round %d)",
            a.version,
            self.state.version,
            carried,
            a.version + 1,
        )
        self.agg.driver.discard_pending()
        self.adopt(a.version, a.model_id, a.weights, self.global_extra, self.strategy_state)
        self.agg.driver.accumulator = ev.replayed.accumulator
        self.agg.driver.inputs = ev.replayed.inputs
        self.state.contributors = ev.replayed.contributors
        self._announce()
        if self.state.finished:
            self.agg._finished.set()

    def _absorbed(self, ev: ClaimsAbsorbed) -> None:
        self._batch_in_flight = False
        for rec in ev.added:
            self.state.contribute(rec.agent_id, rec.model_id)
            self.state.excused.discard(rec.agent_id)
            self.agg.driver.inputs.append((rec.num_samples, rec.metrics))
        if ev.added:
            log.info(
                "round %d: %d claimed upload(s) counted (%d/%d)",
                self.state.round,
                len(ev.added),
                len(self.state.contributors),
                self.state.needed(len(self.agg.sessions)),
            )
        if ev.error is not None:
            log.error("claimed uploads not counted (counted on resume): %s", ev.error)

    def gate_check(self, weights: Weights) -> Any:
        assert self.agg.gate is not None and self.global_weights is not None
        baseline = None
        if self.agg.gate.max_deviation is not None:
            if self._baseline is None or self._baseline[0] != self.state.version:
                self._baseline = (self.state.version, self.agg.gate.baseline(self.global_weights))
            baseline = self._baseline[1]
        return self.agg.gate.check(weights, self.global_weights, baseline)
