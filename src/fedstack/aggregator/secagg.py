"""Secure aggregation (SecAgg+) inside the aggregator: the coordinator of the round's
sessions.

One :class:`SecAggCoordinator` per aggregator runs the phases of the round in progress
(:mod:`fedstack.privacy.secagg` does the cryptography; this module does the I/O and the
timing). Its state changes only on the round owner's task (single-task discipline, like
round state): the owner hands it every secure-aggregation message
(:meth:`SecAggCoordinator.on_message`), asks it at every wake-up whether a phase timed
out (:meth:`SecAggCoordinator.tick`), and whether the round is ready
(:meth:`SecAggCoordinator.ready`). One session is one *attempt* at the round; its id is
``run:round:attempt:boot`` (``boot`` is random per aggregator process, so a restarted
aggregator never reuses the id of an attempt it abandoned).

Phases of an attempt:

1. ``keys``: :class:`~fedstack.wire.SecAggStart` goes to every welcomed agent (and to
   each agent that joins meanwhile); agents that trained on the current version answer
   with their public keys. The phase closes when as many agents as the round needs
   (``threshold`` x active, ``min_agents``) advertised, or ``secagg_timeout`` s after the
   first advertisement with at least ``secagg_min_survivors``; each member gets its
   roster (:class:`~fedstack.wire.SecAggRoster`).
2. ``shares``: members send their encrypted shares; the phase closes when every member
   sent (or left), or at the timeout; each recipient gets the ciphertexts addressed to it.
3. ``masked``: members upload their masked input as a :class:`~fedstack.wire.ModelUpload`
   (stored like any upload: persisted before acknowledged; the store only ever holds
   masked inputs); the round is ready when every member of phase 2 uploaded (or left),
   or at the timeout with at least ``secagg_min_survivors``.
4. ``unmask`` runs inside the aggregation (:meth:`SecAggCoordinator.aggregate`): the
   survivors are asked for their shares, the sum is unmasked and the global model is the
   strategy's result on the weighted mean, committed like any round.

A failure (too few agents in a phase, too few or bad shares) ends the attempt: the event
``secagg_failed`` is stored with the reason, every member gets
:class:`~fedstack.wire.SecAggAbort`, the attempt's stored masked inputs are marked
``stale`` (never aggregated), no model and no partial sum exist, and a new attempt
starts (agents re-run the phases with their trained update). After
``secagg_max_attempts`` failed attempts in a round the coordinator waits for an agent to
join before it tries again.

A restarted aggregator abandons the attempt in progress: its stored masked inputs are
marked stale at start (:meth:`SecAggCoordinator.abandoned`) and a new attempt begins.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeGuard

import numpy as np

from fedstack.errors import ConfigError, ConnectionClosed, InvalidUpdate, LocalProtocolError
from fedstack.privacy.secagg import (
    PublicKeys,
    SecAggError,
    SecAggParams,
    ServerSession,
    apply_update,
)
from fedstack.strategies import Result, Strategy, Update
from fedstack.types import Weights
from fedstack.wire import (
    Error,
    Message,
    ModelUpload,
    SecAggAbort,
    SecAggForward,
    SecAggKeys,
    SecAggRoster,
    SecAggShares,
    SecAggStart,
    SecAggUnmask,
    SecAggUnmaskShares,
)
from fedstack.wire.messages import SECAGG_MASKED, SECAGG_SESSION

if TYPE_CHECKING:
    from fedstack.aggregator.config import AggregatorConfig
    from fedstack.aggregator.registry import Session
    from fedstack.aggregator.service import Aggregator

log = logging.getLogger("fedstack.aggregator")

KEY_BYTES = 32

IDLE, KEYS, SHARES, MASKED, UNMASK, FINISHING, UNMASKED = (
    "idle",
    "keys",
    "shares",
    "masked",
    "unmask",
    "finishing",
    "unmasked",
)


def check_config(config: AggregatorConfig, strategy: Strategy) -> SecAggParams:
    """The secure-aggregation parameters of ``config``, refused (ConfigError) when the
    strategy needs individual updates, is asynchronous, or the parameters can overflow."""
    if strategy.trigger is not None:
        raise ConfigError(
            f"--secagg cannot run with the asynchronous strategy {strategy.name!r}: its "
            "rounds are made of single updates (use fedavg, fedprox or a server optimiser)"
        )
    if not strategy.secure_aggregation:
        raise ConfigError(
            f"--secagg cannot run with strategy {strategy.name!r}: it needs the individual "
            "updates, which secure aggregation hides from the aggregator; use a rule that "
            "only needs their (weighted) mean: fedavg, fedprox, fedopt, fedavgm, fedsgd, "
            "fedadagrad, fedadam, fedyogi"
        )
    if getattr(strategy, "weighted", True) is False and config.secagg_max_weight != 1:
        raise ConfigError(
            f"strategy {strategy.name!r} with weighted=false needs secagg_max_weight = 1 "
            "under --secagg (every agent then weighs 1: the plain mean)"
        )
    params: SecAggParams = config.secagg_params()
    try:
        params.check()
    except SecAggError as exc:
        raise ConfigError(f"secagg: {exc}") from None
    most = max_agents(params)
    if config.min_agents > most:
        raise ConfigError(
            f"secagg_quant_bits = {params.quant_bits} lets at most {most} agents be summed "
            f"without overflowing 32 bits, fewer than min_agents = {config.min_agents}: "
            "lower secagg_quant_bits"
        )
    return params


def max_agents(params: SecAggParams) -> int:
    """Most masked inputs one sum holds without overflowing 32 bits."""
    return int((2**32 - 1) // (2**params.quant_bits - 1))


@dataclass
class _Attempt:
    session: str
    server: ServerSession
    phase: str = KEYS
    opened: float | None = None  # when the phase's timer started (None: not yet)
    u1: tuple[str, ...] = ()
    u2: tuple[str, ...] = ()
    u3: tuple[str, ...] = ()
    dropped: tuple[str, ...] = ()
    advertised: set[str] = field(default_factory=set)
    shared: set[str] | None = None
    unmasked: set[str] | None = None
    answered: asyncio.Future[None] | None = None


class MaskedAccumulator:
    """The round's "accumulator" under secure aggregation: the committer feeds it the
    stored masked inputs, which go into the session's running sum (nothing else is kept).
    """

    def __init__(self, server: ServerSession) -> None:
        self.server = server
        self._count = 0

    @property
    def count(self) -> int:
        return self._count

    def add(self, update: Update) -> None:
        vector = update.weights.get(SECAGG_MASKED)
        if vector is None or len(update.weights) != 1:
            raise InvalidUpdate("not a masked input", agent_id=update.agent_id)
        try:
            self.server.add_masked(update.agent_id, np.asarray(vector))
        except SecAggError as exc:
            raise InvalidUpdate(f"{exc.code}: {exc}", agent_id=update.agent_id) from None
        self._count += 1

    def result(self) -> Result:  # pragma: no cover - the coordinator aggregates
        raise RuntimeError("a secure-aggregation round is aggregated by its coordinator")


class SecAggCoordinator:
    """The sessions of the round in progress (see the module docstring).

    Args:
        aggregator: whose owner task calls every method but :meth:`aggregate` (which runs
            as the owner's aggregation effect) and :meth:`check_masked` (read-only, on a
            connection's task).
        params: checked parameters (:func:`check_config`).
        max_attempts: failed attempts of a round before waiting for a join.
        rng: the graph's shuffle (None: a cryptographically secure one).
    """

    def __init__(
        self,
        aggregator: Aggregator,
        params: SecAggParams,
        max_attempts: int,
        rng: random.Random | None = None,
    ) -> None:
        self.agg = aggregator
        self.params = params
        self.max_attempts = max_attempts
        self.rng = rng
        self.boot = secrets.token_hex(4)
        self.round = 0
        self.attempts = 0  # attempts started in this round
        self.failures = 0  # failed attempts in this round
        self.paused = False
        self.current: _Attempt | None = None
        self.vector_length = 0
        self.history: list[dict[str, Any]] = []
        """Finished attempts (session, outcome, members), newest last (bounded)."""

    # ------------------------------------------------------------------ attempts
    def begin_round(self, round: int, global_weights: Weights) -> ServerSession:
        """Owner: round ``round`` starts on ``global_weights``: a first attempt."""
        self.round = round
        self.attempts = self.failures = 0
        self.paused = False
        self.vector_length = int(sum(np.asarray(a).size for a in global_weights.values())) + 1
        return self._new_attempt()

    def _new_attempt(self) -> ServerSession:
        self.attempts += 1
        sid = f"{self.agg.run_id}:{self.round}:{self.attempts}:{self.boot}"
        server = ServerSession(self.params, sid, self.rng, vector_length=self.vector_length)
        self.current = _Attempt(sid, server)
        if not self.paused:
            self._broadcast_start()
        return server

    @property
    def session(self) -> str | None:
        return None if self.current is None else self.current.session

    @property
    def phase(self) -> str:
        return IDLE if self.current is None else self.current.phase

    def _live(self, ids: tuple[str, ...] | list[str]) -> list[Session]:
        sessions = self.agg.sessions
        return [sessions[a] for a in ids if a in sessions and sessions[a].welcomed]

    def _write(self, s: Session, msg: Message) -> None:
        with contextlib.suppress(ConnectionClosed, LocalProtocolError, OSError):
            s.write(msg)

    def _broadcast_start(self) -> None:
        cur = self.current
        if cur is None or cur.phase != KEYS or self.agg.state.finished:
            return
        msg = SecAggStart(session=cur.session, round=self.round)
        for s in list(self.agg.sessions.values()):
            if s.welcomed:
                self._write(s, msg)

    def joined(self, s: Session) -> None:
        """Owner: ``s`` was welcomed (it learns the attempt collecting keys). A paused
        round tries again."""
        if self.paused and self.current is not None and self.current.phase == KEYS:
            log.info(
                "secure aggregation: agent %s joined; round %d tries again", s.name, self.round
            )
            self.paused = False
            self.failures = 0
            self._broadcast_start()
            return
        cur = self.current
        if cur is not None and cur.phase == KEYS and not self.paused:
            self._write(s, SecAggStart(session=cur.session, round=self.round))

    # ------------------------------------------------------------------ messages
    def on_message(self, s: Session, msg: Message) -> None:
        """Owner: a secure-aggregation message from agent ``s``; a refusal is answered
        with a non-fatal :class:`~fedstack.wire.Error` (code ``secagg-...``)."""
        try:
            self._handle(s, msg)
        except SecAggError as exc:
            log.warning("secure aggregation: refused %s from %s: %s", msg.TYPE, s.name, exc)
            self._write(s, Error(code=exc.code, message=f"{msg.TYPE} refused: {exc}"[:2000]))
            self.agg.metrics.count_refusal(exc.code)

    def _expect(self, s: Session, session: str, phase: str) -> _Attempt:
        cur = self.current
        if cur is None or session != cur.session:
            raise SecAggError(
                "secagg-replay",
                f"session {session[:120]!r} is not the one in progress "
                f"({cur.session if cur else 'none'}); wait for secagg_start",
            )
        if cur.phase != phase:
            raise SecAggError(
                "secagg-phase", f"session {cur.session} is in phase {cur.phase!r}, not {phase!r}"
            )
        return cur

    def _handle(self, s: Session, msg: Message) -> None:
        if isinstance(msg, SecAggKeys):
            cur = self._expect(s, msg.session, KEYS)
            for name, value in (("c_pk", msg.c_pk), ("s_pk", msg.s_pk), ("b_commit", msg.b_commit)):
                if len(value) != KEY_BYTES:
                    raise SecAggError(
                        "secagg-bad-key", f"{name} must be {KEY_BYTES} bytes, not {len(value)}"
                    )
            if self.paused:
                raise SecAggError("secagg-phase", "the round waits for agents to join")
            if len(cur.advertised) >= max_agents(self.params):
                raise SecAggError(
                    "secagg-refused",
                    f"session {cur.session} is full: {len(cur.advertised)} agents is the most "
                    f"a 32-bit sum of {self.params.quant_bits}-bit inputs holds",
                )
            cur.server.add_keys(s.agent_id, PublicKeys(msg.c_pk, msg.s_pk, msg.b_commit))
            cur.advertised.add(s.agent_id)
            if cur.opened is None:
                cur.opened = self.agg.clock()
            self._closing(self._maybe_close_keys)
        elif isinstance(msg, SecAggShares):
            cur = self._expect(s, msg.session, SHARES)
            cur.server.add_shares(s.agent_id, dict(msg.shares))
            assert cur.shared is not None
            cur.shared.add(s.agent_id)
            self._closing(self._maybe_close_shares)
        elif isinstance(msg, SecAggUnmaskShares):
            cur = self._expect(s, msg.session, UNMASK)
            cur.server.add_unmask(s.agent_id, dict(msg.b_shares), dict(msg.sk_shares))
            assert cur.unmasked is not None
            cur.unmasked.add(s.agent_id)
            self._check_answered()
        else:
            raise SecAggError("secagg-phase", f"an agent may not send {msg.TYPE}")

    def left(self, s: Session) -> None:
        """Owner: agent ``s`` left: the unmasking waits for it no longer."""
        self._check_answered()

    def _check_answered(self) -> None:
        cur = self.current
        if cur is None or cur.phase != UNMASK or cur.unmasked is None:
            return
        live = {x.agent_id for x in self._live(cur.u3)}
        if live <= cur.unmasked and cur.answered is not None and not cur.answered.done():
            cur.answered.set_result(None)

    # ------------------------------------------------------------------ phase closing
    def _closing(self, close: Any) -> None:
        """Close a phase if it is complete; a failure to close fails the attempt."""
        try:
            close(self.agg.clock())
        except SecAggError as exc:
            self.fail(exc)

    def _timed_out(self, cur: _Attempt, now: float) -> bool:
        return cur.opened is not None and now >= cur.opened + self.params.timeout

    def _maybe_close_keys(self, now: float) -> None:
        cur = self.current
        assert cur is not None
        n = len(cur.advertised)
        active = len(self.agg.sessions)
        needed = self.agg.state.needed(active)
        if n >= max(needed, self.params.min_survivors) or (
            self._timed_out(cur, now) and n >= self.params.min_survivors
        ):
            self._close_keys(now)
        elif self._timed_out(cur, now):
            self.fail(
                SecAggError(
                    "secagg-too-few",
                    f"{n} agent(s) advertised keys in {self.params.timeout:g} s; "
                    f"secagg_min_survivors is {self.params.min_survivors}",
                )
            )

    def _close_keys(self, now: float) -> None:
        cur = self.current
        assert cur is not None
        rosters = cur.server.close_keys()  # secagg-too-few is handled by tick/fail
        cur.u1 = tuple(rosters)
        cur.phase, cur.opened, cur.shared = SHARES, now, set()
        log.info(
            "secure aggregation %s: %d agent(s) advertised; sharing keys", cur.session, len(rosters)
        )
        for agent_id, r in rosters.items():
            s = self.agg.sessions.get(agent_id)
            if s is None:
                continue
            self._write(
                s,
                SecAggRoster(
                    session=cur.session,
                    threshold=r.threshold,
                    keys={j: k.c_pk + k.s_pk + k.b_commit for j, k in r.neighbours.items()},
                    index=dict(r.index),
                ),
            )

    def _maybe_close_shares(self, now: float) -> None:
        cur = self.current
        assert cur is not None and cur.shared is not None
        waiting = {a for a in cur.u1 if a in self.agg.sessions} - cur.shared
        if not waiting or self._timed_out(cur, now):
            forwards = cur.server.close_shares()
            cur.u2 = tuple(a for a in cur.u1 if a in cur.shared)
            cur.phase, cur.opened = MASKED, now
            log.info(
                "secure aggregation %s: %d agent(s) shared keys; collecting masked inputs",
                cur.session,
                len(cur.u2),
            )
            for agent_id, shares in forwards.items():
                s = self.agg.sessions.get(agent_id)
                if s is not None:
                    self._write(s, SecAggForward(session=cur.session, shares=shares))

    def tick(self, now: float) -> None:
        """Owner: close a phase whose time is up (or fail the attempt)."""
        cur = self.current
        if cur is None or self.paused or self.agg._stopped.is_set():
            return
        try:
            if cur.phase == KEYS and cur.opened is not None:
                self._maybe_close_keys(now)
            elif cur.phase == SHARES:
                self._maybe_close_shares(now)
            elif cur.phase == MASKED:
                n = len(self.agg.state.contributors)
                if self._timed_out(cur, now) and n < self.params.min_survivors:
                    raise SecAggError(
                        "secagg-too-few",
                        f"{n} masked input(s) in {self.params.timeout:g} s; "
                        f"secagg_min_survivors is {self.params.min_survivors}",
                    )
        except SecAggError as exc:
            self.fail(exc)

    def deadline(self) -> float | None:
        """Owner: when :meth:`tick` must run next (None: no timer)."""
        cur = self.current
        if (
            cur is None
            or self.paused
            or cur.opened is None
            or cur.phase not in (KEYS, SHARES, MASKED)
        ):
            return None
        return cur.opened + self.params.timeout

    def ready(self, now: float) -> bool:
        """Owner: the round's masked inputs are all in (every member of phase 2 uploaded
        or left), or the phase timed out with enough of them."""
        cur = self.current
        if self.agg._stopped.is_set():
            return False  # agents are leaving: the attempt is abandoned (see the module doc)
        if cur is not None and cur.phase == UNMASKED:
            return True  # unmasked, its commit is retried
        if cur is None or cur.phase != MASKED or self.paused:
            return False
        got = set(self.agg.state.contributors)
        if len(got) < self.params.min_survivors:
            return False
        waiting = {a for a in cur.u2 if a in self.agg.sessions} - got
        return not waiting or self._timed_out(cur, now)

    def check_masked(self, agent_id: str, msg: ModelUpload) -> str | None:
        """Connection task (reads only): why ``msg`` cannot be a masked input of the
        attempt in progress (None: it can)."""
        cur = self.current
        session = msg.metrics.get(SECAGG_SESSION)
        if set(msg.model) != {SECAGG_MASKED} or not isinstance(session, str):
            return (
                "this federation runs secure aggregation: upload only the masked input "
                f"({SECAGG_MASKED!r} with metric {SECAGG_SESSION!r}) that the agent's "
                "secure-aggregation session makes; plain models are refused"
            )
        if msg.extra:
            return "a masked input carries no extra arrays"
        if len(msg.metrics) != 1:
            return f"a masked input carries no metric but {SECAGG_SESSION!r}"
        if cur is None or session != cur.session:
            return f"masked input of session {session[:120]!r}, not of the one in progress"
        if cur.phase != MASKED:
            return f"session {cur.session} is in phase {cur.phase!r}: no masked input now"
        if agent_id not in cur.u2:
            return f"agent {agent_id[:32]} did not share keys in session {cur.session}"
        arr = msg.model[SECAGG_MASKED]
        if arr.dtype != np.uint32 or arr.shape != (self.vector_length,):
            return (
                f"a masked input is uint32[{self.vector_length}], not {arr.dtype}{list(arr.shape)}"
            )
        return None

    # ------------------------------------------------------------------ failure
    @staticmethod
    def is_failure(error: BaseException | None) -> TypeGuard[SecAggError]:
        """Whether an aggregation error is the attempt's failure (not a store error)."""
        return isinstance(error, SecAggError)

    @staticmethod
    def internal_failure(error: BaseException) -> SecAggError:
        """A bug while unmasking fails the attempt too (nothing partial is used)."""
        return SecAggError("secagg-internal", f"unmasking failed: {type(error).__name__}")

    def fail(self, exc: SecAggError) -> None:
        """Owner: the attempt in progress failed: audit, abort, void its masked inputs,
        and start the next attempt (or wait for a join after too many)."""
        cur = self.current
        if cur is None:
            return
        members = cur.u1 or tuple(sorted(cur.advertised))
        log.warning("secure aggregation %s failed: %s: %s", cur.session, exc.code, exc)
        detail = {
            "round": self.round,
            "session": cur.session,
            "code": exc.code,
            "reason": str(exc)[:500],
            "phase": cur.phase,
            "agents": list(members),
        }
        self._remember(cur, "failed", exc.code)
        self.agg.owner._audit("secagg_failed", detail, None)
        abort = SecAggAbort(session=cur.session, code=exc.code, reason=str(exc)[:1000])
        for s in list(self.agg.sessions.values()):
            if s.welcomed:
                self._write(s, abort)
        voided = list(self.agg.state.contributors.values())
        if voided:
            self.agg.owner._void(voided)
        self.failures += 1
        if self.failures >= self.max_attempts:
            self.paused = True
            log.error(
                "secure aggregation: round %d failed %d times; waiting for an agent to join "
                "before trying again",
                self.round,
                self.failures,
            )
        self.agg.owner._secagg_restart(self._new_attempt())

    def _remember(self, cur: _Attempt, outcome: str, code: str = "") -> None:
        self.history.append(
            {
                "session": cur.session,
                "round": self.round,
                "outcome": outcome,
                "code": code,
                "agents": list(cur.u3),
                "dropped": list(cur.dropped),
            }
        )
        del self.history[:-32]

    # ------------------------------------------------------------------ unmasking
    async def aggregate(
        self, global_weights: Weights, state: dict[str, Any], round: int
    ) -> tuple[Result, dict[str, Any]]:
        """The aggregation effect: unmask the sum of the masked inputs and return the
        strategy's result on the weighted mean, with the round's secure-aggregation
        facts. Raises SecAggError (the owner then fails the attempt)."""
        cur = self.current
        assert cur is not None
        survivors, dropped = cur.server.close_masked()
        cur.u3, cur.dropped = tuple(survivors), tuple(dropped)
        cur.phase, cur.unmasked = UNMASK, set()
        loop = asyncio.get_running_loop()
        cur.answered = loop.create_future()
        ask = SecAggUnmask(session=cur.session, survivors=list(survivors), dropped=list(dropped))
        asked = self._live(cur.u3)
        log.info(
            "secure aggregation %s: %d masked input(s), %d dropped; unmasking",
            cur.session,
            len(survivors),
            len(dropped),
        )
        for s in asked:
            self._write(s, ask)
        if asked:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(cur.answered), self.params.timeout)
        cur.phase = FINISHING  # no more shares: the server session is the thread's now
        total, weight, u3 = await asyncio.to_thread(cur.server.finish)
        if not weight > 0 or not math.isfinite(weight):
            raise SecAggError("secagg-too-few", f"the survivors' total weight is {weight}")
        mean = await asyncio.to_thread(apply_update, global_weights, total, weight)
        strategy = self.agg.strategy
        acc = strategy.begin(global_weights, state, round=round, rng=self.agg.rng)
        samples = max(1, round_half(weight * self.params.max_weight))
        acc.add(Update("secagg", mean, samples))
        result = await asyncio.to_thread(acc.result)
        facts = {
            "session": cur.session,
            "agents": list(u3),
            "dropped": list(cur.dropped),
            "weight": float(weight),
            "num_samples": samples,
            "error_bound": float(self.params.error_bound(len(u3))),
            "bad_senders": dict(cur.server.bad_senders),  # wrong shares caught, not used
        }
        cur.phase = UNMASKED
        self._remember(cur, "aggregated")
        return result, facts


def round_half(x: float) -> int:
    return int(math.floor(x + 0.5))
