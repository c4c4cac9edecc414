"""Agent connections: bytes in, events to the round owner out.

:meth:`AgentConnections.serve` runs once per connection (the transport calls it): it
reads the agent's messages through the connection's protocol session
(:class:`~fedstack.wire.session.AggregatorSession`, which decides what is legal when),
registers the agent (:class:`~fedstack.aggregator.registry.Registry`), validates uploads
(:func:`~fedstack.aggregator.uploads.check_upload`), and hands everything that concerns
round state to the owner as an event, waiting for its answer where there is one. It never
changes round state itself.

Fairness in the receive budget (issue 16, finding 7): a connection is charged as a
stranger of its host until it registers, then as its agent's account
(:meth:`WSConnection.admit`); an agent that trickles, goes silent in the middle of an
upload, breaks the protocol once registered or announces a first message over the limit
is penalised (:meth:`WSConnection.penalize`: a strike on
its identity, see :mod:`fedstack.transport.standing`), so that rejoining does not clear
it. An upload that holds budget bytes other agents wait for and would end after the
round deadline (even at a rate above the minimum) is cut the same way, with the error
code and close reason ``overdue`` (:class:`~fedstack.aggregator.pacing.Overdue`): a slow
agent never holds the others' rounds past the deadline. Before registration a message
may not exceed what a participate plausibly takes
(:meth:`AgentConnections.first_message_limit`), and it must arrive at the minimum rate.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from typing import TYPE_CHECKING, Any

import numpy as np

from fedstack.aggregator.audit import THROTTLE_DELAY
from fedstack.aggregator.events import (
    AgentJoined,
    AgentLeft,
    FederationStarted,
    PollReceived,
    SecAggMessage,
    SecAggWelcomed,
    UploadReceived,
)
from fedstack.aggregator.pacing import (
    OVERDUE,
    Overdue,
    ReceiveWatch,
    TooSlow,
    check_period,
)
from fedstack.aggregator.quotas import QUOTA_EXCEEDED, kept_extra, nbytes
from fedstack.aggregator.registry import Session
from fedstack.aggregator.uploads import check_upload, upload_id_problem
from fedstack.aggregator.validation import structure_difference, validate_model
from fedstack.errors import (
    ConnectionClosed,
    InvalidUpdate,
    MessageTooLarge,
    RemoteProtocolError,
    StoreConflict,
    StoreError,
    StoreUnavailable,
)
from fedstack.transport import Connection
from fedstack.types import Weights
from fedstack.wire import Error, ModelUpload, Participate, Segments
from fedstack.wire import session as protocol
from fedstack.wire.session import MODEL_MISMATCH
from fedstack.wire.tensors import ALIGN
from fedstack.wire.tensors import structure as structure_of

if TYPE_CHECKING:
    from fedstack.aggregator.service import Aggregator

log = logging.getLogger("fedstack.aggregator")


def internal_error_message(incident: str) -> str:
    """What an agent is told about an internal error: nothing of its cause (exception
    text can carry server paths, SQL and its parameters), only the incident id under
    which the aggregator's log has the details."""
    return f"internal aggregator error (incident {incident}); the operator's log has the details"


class AgentConnections:
    """The connections of one aggregator's agents.

    Args:
        aggregator: whose round owner the events go to.
    """

    def __init__(self, aggregator: Aggregator) -> None:
        self.agg = aggregator
        self.tasks: set[asyncio.Task[Any]] = set()
        """The running :meth:`serve` tasks (the aggregator cancels them on stop)."""
        self._init_lock = asyncio.Lock()
        self._first_limit: int | None = None

    async def close(self, grace: float) -> None:
        """Wait up to ``grace`` s for the connections to end, then cancel and await the
        rest."""
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=grace)
        while self.tasks:
            left = list(self.tasks)
            for t in left:
                t.cancel()
            await asyncio.wait(left)
            self.tasks.difference_update(left)

    def first_message_limit(self) -> int:
        """The largest first message of an unregistered connection: before the federation
        has a model, the message limit (the first participate carries the model); then
        the codec's header limit plus the model's bytes (a participate may carry the
        agent's initial model again, which must match the federation's structure)."""
        if self._first_limit is not None:
            return self._first_limit
        weights = self.agg.global_weights
        if weights is None or not self.agg._initialized.is_set():
            return self.agg.config.max_message_bytes
        plausible = self.agg.limits.max_header_bytes + nbytes(weights) + ALIGN * len(weights)
        self._first_limit = min(self.agg.config.max_message_bytes, plausible)  # fixed now
        return self._first_limit

    async def serve(self, conn: Connection) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        cfg = self.agg.config
        session: Session | None = None
        counted = False
        try:
            proto = protocol.AggregatorSession(self.agg.limits, secagg=self.agg.secagg is not None)
            if self.agg.registry.audit.over_budget("refused", conn.remote_address):
                # a host refused again and again: slow it down before any work for it
                await asyncio.sleep(min(THROTTLE_DELAY, cfg.register_timeout / 2))
            cooling = conn.cooling()
            if cooling > 0:
                # its host recently aborted or trickled uploads: no registration (no store
                # write, no welcome) for it before the cool-down ends
                await asyncio.sleep(min(cooling, cfg.register_timeout / 2))
            async with asyncio.timeout(cfg.register_timeout):
                # a first message that trickles is cut within seconds, not at the deadline
                raw = await self._recv_leased(conn, cfg.register_timeout)
            hello = proto.receive_bytes(raw)  # the first message must be participate
            assert isinstance(hello, protocol.ParticipateReceived)
            first = hello.message
            session = await self.agg.registry.authenticate(conn, first)
            if session is None:
                return
            # registered: lift the stranger's caps before its next frame arrives, and charge
            # its uploads to its own standing
            conn.admit(account=session.agent_id)
            session.protocol = proto
            if not self.agg._initialized.is_set():
                if first.model is not None:
                    await self._initialize(session, first)
                if not self.agg._initialized.is_set():
                    log.info("agent %s waits: the federation has no model yet", session.name)
                    await self.agg._initialized.wait()
            if first.model is not None and await self._refuse_mismatch(session, first.model):
                return
            del raw, first, hello  # free the initial model's buffer (the store has it)
            joined = asyncio.get_running_loop().create_future()
            await self.agg._post(AgentJoined(session, joined))
            counted = True
            await joined
            await self.agg.delivery.welcome(session)
            if self.agg.secagg is not None:  # it learns the session collecting keys
                await self.agg._post(SecAggWelcomed(session))
            assert self.agg.store is not None
            # on the registry's thread: a churn of joins does not queue before the uploads
            await self.agg.workers.registry(
                self.agg.store.log_event,
                "joined",
                {"name": session.name, "address": session.address},
                run_id=self.agg.run_id,
                agent_id=session.agent_id,
            )
            await self._receive(session)
        except RemoteProtocolError as exc:
            who = session.name if session else conn.remote_address
            log.warning("protocol error from %s: %s", who, exc)
            if session is not None or isinstance(exc, MessageTooLarge):
                conn.penalize()  # (a stranger's malformed hello is a refusal, not a strike)
            await self.agg.registry.refuse(conn, exc.code, str(exc), session)
        except TooSlow as exc:
            who = session.name if session else conn.remote_address
            overdue = isinstance(exc, Overdue)
            what = "holds others past the round deadline" if overdue else "is too slow"
            log.warning("%s %s; closing its connection: %s", who, what, exc)
            drop = getattr(conn, "drop_message", None)
            if drop is not None:
                drop()  # its budget bytes go back now, not after the refusal is sent
            conn.penalize()
            code = OVERDUE if overdue else "too-slow"
            await self.agg.registry.refuse(conn, code, str(exc), session)
        except TimeoutError:
            who = session.name if session else conn.remote_address
            if getattr(conn, "in_message", False) and not getattr(
                conn, "waiting_for_budget", False
            ):
                conn.penalize()  # silent in the middle of a message (not held back by us)
            log.warning("%s went silent; closing its connection", who)
        except ConnectionClosed:
            pass
        except Exception as exc:  # a bug or a store failure: keep serving everyone else
            who = session.name if session else conn.remote_address
            if isinstance(exc, StoreUnavailable):  # the database server is away (no bug):
                # nothing was acknowledged; the agent reconnects and sends it again
                log.error("the store is unavailable while serving %s: %s", who, exc)
                message = "the aggregator's store is unavailable; retry later"
                await self.agg.registry.refuse(conn, "unavailable", message, session)
            else:
                # The details (paths, SQL, exception text) go to the log only; the agent
                # gets a generic message with the incident id the operator can look up.
                incident = uuid.uuid4().hex[:12]
                log.exception("internal error (incident %s) while serving %s", incident, who)
                await self.agg.registry.refuse(
                    conn, "internal-error", internal_error_message(incident), session
                )
        finally:
            try:
                if session is not None:
                    await self._leave(session, counted)
            finally:
                self.tasks.discard(task)

    async def _receive(self, session: Session) -> None:
        """The agent's messages, until it says bye (raises when the connection fails or
        the agent breaks the protocol: its session decides what is legal when)."""
        cfg, conn, proto = self.agg.config, session.conn, session.protocol
        assert proto is not None
        lease = 3 * cfg.heartbeat_interval
        while True:
            raw = await self._recv_leased(conn, lease)
            session.last_seen = time.monotonic()
            ev = proto.receive_bytes(raw)
            if isinstance(ev, protocol.UploadReceived):
                await self._on_upload(session, ev.message)
            elif isinstance(ev, protocol.PollReceived):
                await self.agg._post(PollReceived(session, ev.message))
            elif isinstance(ev, protocol.SecAggReceived):
                await self.agg._post(SecAggMessage(session, ev.message))
            elif isinstance(ev, protocol.HeartbeatReceived):
                if ev.reply is not None:
                    await session.send(ev.reply, cfg.send_timeout)
            elif isinstance(ev, protocol.Left):
                return
            del raw, ev  # an upload's buffer is freed now, not at the next message

    async def _recv_leased(self, conn: Connection, lease: float) -> memoryview | Segments:
        """The next message; TimeoutError after ``lease`` s of silence. A connection in the
        middle of a big message (arriving, or held back by the upload budget) is not
        silent: it gets up to ``10 x send_timeout`` more, as long as its message keeps
        arriving at ``min_transfer_rate`` (judged every :data:`RATE_WINDOW` s; slower:
        :class:`~fedstack.aggregator.pacing.TooSlow`, and the budget it held is free).

        With a round deadline (``round_timeout``), a message that holds upload-budget bytes
        other agents wait for must also end in time for the round (checked every
        :func:`~fedstack.aggregator.pacing.check_period`; else
        :class:`~fedstack.aggregator.pacing.Overdue`). The round state is only read."""
        cfg = self.agg.config
        watch = ReceiveWatch(conn, cfg.min_transfer_rate)
        loop = asyncio.get_running_loop()
        extra = 10 * cfg.send_timeout
        quiet = 0.0
        grace = cfg.round_timeout
        period = check_period(grace)
        while True:
            arriving = getattr(conn, "in_message", False)
            if arriving:
                wait = min(period, extra)
            else:  # idle: at the lease, or a quarter round if shorter (a message that
                # begins is looked at in time for the round; with the default round
                # timeout the lease decides: no wake-ups of thousands of idle agents)
                wait = lease - quiet if grace is None else min(lease - quiet, grace / 4)
            started = loop.time()
            try:
                async with asyncio.timeout(wait):
                    return await conn.recv()
            except TimeoutError:
                elapsed = loop.time() - started
                if not getattr(conn, "in_message", False):
                    quiet += elapsed
                    if quiet >= lease:
                        raise
                    continue
                quiet = 0.0
                watch.check(elapsed)
                if grace is not None:
                    watch.check_deadline(self.agg.clock(), self.agg.state.deadline(), grace)
                extra -= elapsed
                if extra <= 0:
                    raise

    async def _leave(self, session: Session, counted: bool) -> None:
        """The connection ended: stop counting the agent (the owner outlives the
        connections, also while the aggregator stops) and audit its leaving."""
        await session.scope.aclose()  # its pending replies and pushes
        if counted:
            owner = self.agg._driver
            if owner is not None and not owner.done():
                await self.agg._post(AgentLeft(session))
            if self.agg.store is not None:
                with contextlib.suppress(StoreError):
                    await self.agg.workers.registry(
                        self.agg.store.log_event,
                        "left",
                        {"name": session.name},
                        run_id=self.agg.run_id,
                        agent_id=session.agent_id,
                    )
        with contextlib.suppress(Exception):
            await session.conn.close(timeout=1.0)

    async def _refuse_mismatch(self, session: Session, model: Weights) -> bool:
        """Refuse (``model-mismatch``, final: no retry can fix it) an agent whose initial
        model has other names, shapes or dtypes than the federation's model (the
        operator's registered base model, or the first agent's), telling it what differs.
        Returns whether it was refused."""
        structure = self.agg.structure
        if structure is None:
            return False
        problem = structure_difference(model, structure)
        if problem is None:
            return False
        message = f"the agent's model does not match the federation's model: {problem}"
        log.warning("refused %s: %s", session.name, message)
        await self.agg.registry.refuse(session.conn, MODEL_MISMATCH, message[:2000], session)
        return True

    async def _initialize(self, session: Session, msg: Participate) -> None:
        """The first model fixes names, shapes and dtypes; its weights or zeros start."""
        assert self.agg.store is not None and msg.model is not None
        async with self._init_lock:
            if self.agg._initialized.is_set():
                return
            try:
                validate_model(msg.model, None, agent_id=session.agent_id)
            except InvalidUpdate as exc:
                raise RemoteProtocolError(
                    f"initial model refused: {exc}", code="invalid-model"
                ) from None
            use_weights = self.agg.config.init_weights
            if use_weights is None:
                use_weights = True if msg.init_weights is None else msg.init_weights
            initial = {k: np.array(v) for k, v in msg.model.items()}
            glob = initial if use_weights else {k: np.zeros_like(v) for k, v in initial.items()}
            structure = structure_of(initial)
            try:
                gid = await self.agg._db(
                    self.agg.store.init_federation,
                    self.agg.run_id,
                    agent_id=session.agent_id,
                    structure=structure,
                    init_weights=use_weights,
                    initial=initial,
                    global_weights=glob,
                    num_samples=max(msg.num_samples, 0),
                    metrics=msg.metrics,
                    aggregator_id=self.agg.aggregator_id,
                )
            except StoreConflict:
                if self.agg.membership is None:
                    # the operator registered a base model (`fedstack model register`)
                    # since this aggregator opened the run: that model starts it
                    await self._adopt_registered()
                    return
                # another member started the run first: its model is adopted by the
                # membership's follower (the agent waits for it like any other)
                log.info("another member of the federation recorded the first model")
                return
            started = asyncio.get_running_loop().create_future()
            await self.agg._post(FederationStarted(structure, glob, gid, started))
            await started
            log.info(
                "model structure fixed by %s: %s (init from %s)",
                session.name,
                ", ".join(f"{n}{list(s)}:{d}" for n, d, s in structure),
                "its weights" if use_weights else "zeros",
            )

    async def _adopt_registered(self) -> None:
        """Start the federation from the global model 0 the store has for this run (the
        operator registered one after this aggregator started, before any agent came)."""
        assert self.agg.store is not None
        run = await self.agg._db(self.agg.store.get_run, self.agg.run_id)
        gid = await self.agg._db(self.agg.store.global_model_id, self.agg.run_id, 0)
        if run.structure is None or gid is None:
            raise StoreError(f"run {self.agg.run_id[:8]} has a model version but no model 0")
        weights = await self.agg._db(self.agg.store.load_weights, gid)
        started = asyncio.get_running_loop().create_future()
        await self.agg._post(FederationStarted(run.structure, weights, gid, started))
        await started
        log.info(
            "model structure fixed by the operator's registered model: %d tensors",
            len(run.structure),
        )

    async def _on_upload(self, session: Session, msg: ModelUpload) -> None:
        """Validate, write the blob, queue for the owner, and send its answer."""
        assert self.agg.store is not None and self.agg.global_weights is not None
        cfg = self.agg.config
        self.agg.metrics.upload_bytes.inc(nbytes(msg.model) + nbytes(msg.extra))
        try:
            if self.agg.secagg is not None:  # only masked inputs of the session in progress
                problem = self.agg.secagg.check_masked(session.agent_id, msg)
                if problem is not None:
                    raise InvalidUpdate(problem, agent_id=session.agent_id)
                if msg.base_version != self.agg.state.version or msg.num_samples != 0:
                    raise InvalidUpdate(
                        "a masked input has base_version = the current version and "
                        "num_samples 0 (its weight is inside the masked vector)",
                        agent_id=session.agent_id,
                    )
            else:
                check_upload(
                    msg,
                    agent_id=session.agent_id,
                    version=self.agg.state.version,
                    round=self.agg.state.round,
                    structure=self.agg.structure,
                    global_weights=self.agg.global_weights,
                    strategy=self.agg.strategy,
                    max_num_samples=cfg.max_num_samples,
                )
            problem, code = upload_id_problem(msg.upload_id), "bad-field"
        except InvalidUpdate as exc:
            log.warning("refused upload from %s: %s", session.name, exc)
            problem, code = str(exc), "invalid-model"
        if problem is None:
            # extra arrays the strategy does not read are never stored nor passed on; what
            # is left is charged to the agent's and the round's storage quotas
            extra = kept_extra(msg.extra, self.agg.strategy.reads_extra)
            if extra is not msg.extra:
                msg = dataclasses.replace(msg, extra=extra)
            over = self.agg.storage_quota.charge(
                session.agent_id,
                self.agg.state.round,
                nbytes(msg.model) + nbytes(extra),
                nbytes(self.agg.global_weights),
            )
            if over is not None:
                problem, code = over, QUOTA_EXCEEDED
        if problem is not None:
            detail = {"upload_id": msg.upload_id[:64], "reason": problem[:500]}
            if code == QUOTA_EXCEEDED:  # a flood: audited at a bounded rate, counted beyond
                with contextlib.suppress(StoreError):
                    await self.agg.registry.audit.record(
                        "upload_refused",
                        {**detail, "code": code},
                        address=session.address,
                        run_id=self.agg.run_id,
                        agent_id=session.agent_id,
                    )
            else:
                await self.agg._db(
                    self.agg.store.log_event,
                    "upload_refused",
                    detail,
                    run_id=self.agg.run_id,
                    agent_id=session.agent_id,
                )
            self.agg.metrics.count_upload("refused")
            self.agg.metrics.count_refusal(code)
            await session.send(Error(code=code, message=problem), cfg.send_timeout)
            return
        # The blob first: content-addressed and idempotent (a re-sent upload costs a hash
        # and a stat). Then the owner plans it into a batch, the committer stores the
        # record (idempotent by upload_id) and counts it: persisted before counted,
        # counted before acknowledged.
        blob = (
            None
            if self.agg.store.will_inline(msg.model)
            else await asyncio.to_thread(self.agg.store.put_blob, msg.model)
        )
        upload = UploadReceived(session, msg, blob)
        await self.agg._post(upload)
        await session.send(await upload.reply, cfg.send_timeout)
