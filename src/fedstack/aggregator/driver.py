"""The round driver: the accumulator of the round in progress, aggregation, checkpoints
and evaluation.

The round owner decides *when* (:meth:`RoundState.ready <fedstack.aggregator.rounds.
RoundState.ready>`); the driver does the work as effects that report back:
:meth:`RoundDriver.aggregate` computes the result off the event loop (never on the store
thread), commits the round, strategy state and global model in ONE store transaction,
and returns a :class:`~fedstack.aggregator.events.RoundCommitted` (an error inside it,
never raised: the owner retries). A failing strategy's accumulator is rebuilt from the
stored uploads, which are all persisted before they are counted.

In a federation (or below an upstream aggregator) :attr:`RoundDriver.sink` is set: the
round's result is then a :class:`~fedstack.aggregator.federation.ClusterRound` handed to
``sink.publish``, and the global model to continue from is what it returns (see
:mod:`fedstack.aggregator.federation`). Without a sink nothing of this runs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from fedstack.aggregator.events import RoundCommitted
from fedstack.aggregator.gate import UpdateGate
from fedstack.aggregator.uploads import gated
from fedstack.errors import CorruptBlob, StoreError, TensorFileError
from fedstack.store import Store, UploadRecord
from fedstack.strategies import Accumulator, Result, Strategy, Update
from fedstack.types import Metrics, Weights

if TYPE_CHECKING:
    from fedstack.aggregator.federation import RoundSink
    from fedstack.aggregator.secagg import SecAggCoordinator
    from fedstack.trackers.sink import TrackerSink

log = logging.getLogger("fedstack.aggregator")

CHECKPOINT_INTERVAL = 1.0
"""Seconds between background checkpoints of the store's log (one after a round at most)."""

Evaluator = Callable[[Weights], Metrics]


@dataclasses.dataclass
class Replayed:
    """A round's accumulator rebuilt from its stored uploads."""

    accumulator: Accumulator
    contributors: dict[str, str]  # agent id -> model id
    inputs: list[tuple[int, Metrics]]  # (num_samples, metrics) per upload


class RoundDriver:
    """Aggregation, checkpointing and evaluation for one aggregator.

    Args:
        strategy: the aggregation rule.
        rng: the strategy's seeded generator.
        db: runs a store call on the store thread.
        store: returns the open store.
        run_id: returns the run id.
        aggregator_id: recorded with each committed round.
        gate: the update gate (None: none), applied again when uploads are replayed.
        evaluator: central evaluation of each new global model (None: none).
    """

    def __init__(
        self,
        *,
        strategy: Strategy,
        rng: np.random.Generator,
        db: Callable[..., Awaitable[Any]],
        store: Callable[[], Store | None],
        run_id: Callable[[], str],
        aggregator_id: Callable[[], str],
        gate: UpdateGate | None,
        evaluator: Evaluator | None,
    ) -> None:
        self.strategy = strategy
        self.rng = rng
        self._db = db
        self._store = store
        self._run_id = run_id
        self._aggregator_id = aggregator_id
        self.gate = gate
        self.evaluator = evaluator
        self.eval_in_round = False
        """Evaluate each round's model BEFORE it is committed and sent (its ``eval_*``
        metrics are then the round's, e.g. for a target metric), not in the background."""
        self.accumulator: Accumulator | None = None
        """The round in progress's accumulator: fed by the committer, taken by
        :meth:`aggregate`, never both at once (the owner sequences them)."""
        self.inputs: list[tuple[int, Metrics]] = []
        self.started_wall = time.time()
        """When the round in progress started (wall clock, for the stored round)."""
        self.sink: RoundSink | None = None
        """Where cluster rounds go in a federation (None: committed as the global model)."""
        self.trackers: TrackerSink | None = None
        """Told when a round's evaluation is stored (None: no experiment tracker)."""
        self._pending: Result | None = None  # computed but not committed yet: retried
        self.secagg: SecAggCoordinator | None = None
        """Secure aggregation's coordinator (None: plain rounds): it unmasks the round."""
        self._secagg_facts: dict[str, Any] | None = None
        self._last_checkpoint = -math.inf
        self._checkpointing = False
        self._eval_lock = asyncio.Lock()

    def begin(self, global_weights: Weights, state: dict[str, Any], round: int) -> None:
        """A fresh accumulator for ``round`` on top of ``global_weights``."""
        self.accumulator = self.strategy.begin(global_weights, state, round=round, rng=self.rng)
        self.inputs = []
        self.started_wall = time.time()

    def discard_pending(self) -> None:
        """Forget a computed round that was not committed (a federation member followed
        a newer global model instead)."""
        self._pending = None

    async def replay(
        self,
        global_weights: Weights,
        state: dict[str, Any],
        version: int,
        buffered: list[UploadRecord] | None = None,
    ) -> Replayed:
        """A fresh accumulator for round ``version + 1`` fed from the stored uploads
        (``buffered``, or read from the store)."""
        store = self._store()
        assert store is not None
        if buffered is None:
            buffered = (await self._db(store.resume_state, self._run_id())).buffered
        acc = self.strategy.begin(global_weights, state, round=version + 1, rng=self.rng)
        contributors: dict[str, str] = {}
        inputs: list[tuple[int, Metrics]] = []
        for rec in buffered:
            update = await self.stored_update(rec, version, "buffered")
            if update is None:
                continue
            weights = update.weights
            if self.gate is not None:
                update = gated(update, self.gate.check(weights, global_weights))
            acc.add(update)
            contributors[rec.agent_id] = rec.model_id
            inputs.append((rec.num_samples, rec.metrics))
        return Replayed(acc, contributors, inputs)

    async def stored_update(self, rec: UploadRecord, version: int, what: str) -> Update | None:
        """The stored upload ``rec`` as an :class:`Update` of the round after ``version``
        (not gated). None: its tensors are damaged: the upload is set aside (marked and
        audited; ``what`` names it in the log: "buffered", "claimed", ...) and the run goes
        on without it (damaged data, not an unavailable store)."""
        store = self._store()
        assert store is not None
        try:
            weights = await self._db(store.load_weights, rec.model_id)
            extra = await self._db(store.load_extra, rec.model_id)
        except (CorruptBlob, TensorFileError) as exc:
            log.warning(
                "quarantined the %s upload %s of agent %s: %s",
                what,
                rec.upload_id[:64],
                rec.agent_id,
                exc,
            )
            await self._db(store.quarantine_upload, self._run_id(), rec.model_id, str(exc))
            return None
        return Update(
            rec.agent_id,
            weights,
            rec.num_samples,
            max(0, version - rec.base_version),
            rec.metrics,
            rec.model_id,
            extra,
        )

    async def aggregate(
        self,
        *,
        round: int,
        inputs: list[str],
        base_model_id: str,
        global_weights: Weights,
        state: dict[str, Any],
        version: int,
    ) -> RoundCommitted:
        """Aggregate the round in progress and commit it; errors are returned, not raised.

        ``inputs`` are the model ids of the round's contributions; ``global_weights``,
        ``state`` and ``version`` describe the model they were aggregated on (to rebuild
        the accumulator if the strategy fails)."""
        store = self._store()
        assert store is not None and self.accumulator is not None
        if self.secagg is not None and self._pending is None:
            try:  # unmask the sum (no individual update is ever seen): the weighted mean
                self._pending, self._secagg_facts = await self.secagg.aggregate(
                    global_weights, state, round
                )
            except Exception as exc:
                if not self.secagg.is_failure(exc):
                    log.exception("secure aggregation of round %d failed", round)
                    exc = self.secagg.internal_failure(exc)
                return RoundCommitted(round, None, "", 0.0, exc)
        try:
            if self._pending is None:
                try:
                    self._pending = await asyncio.to_thread(self.accumulator.result)
                except Exception as exc:
                    # the accumulator is spent or broken: rebuild it from the stored
                    # uploads (they are all persisted) before the owner retries
                    rebuilt = await self.replay(global_weights, state, version)
                    return RoundCommitted(round, None, "", 0.0, exc, rebuilt)
            result = self._pending  # kept until committed: a store failure retries it
            num_samples = sum(max(n, 0) for n, _ in self.inputs)
            metrics: Metrics = {**result.metrics, **mean_metrics(self.inputs)}
            facts = self._secagg_facts if self.secagg is not None else None
            if facts is not None:  # the agents' metrics are not sent under secagg
                num_samples = int(facts["num_samples"])
                metrics = {
                    **result.metrics,
                    "num_updates": len(facts["agents"]),
                    "num_samples": num_samples,
                    "secagg_agents": len(facts["agents"]),
                    "secagg_dropped": len(facts["dropped"]),
                    "secagg_session": str(facts["session"]),
                    "secagg_error_bound": float(facts["error_bound"]),
                }
            if self.eval_in_round and self.evaluator is not None:
                metrics.update(await self._evaluate_now(round, result.weights))
            finished = time.time()
            if self.sink is not None:
                return await self._publish(
                    round, result, inputs, base_model_id, version, num_samples, metrics, finished
                )
            model_id = await self._db(
                store.commit_round,
                self._run_id(),
                round=round,
                weights=result.weights,
                inputs=inputs,
                base_model_id=base_model_id or None,
                num_samples=num_samples,
                metrics=metrics,
                started=self.started_wall,
                finished=finished,
                aggregator_id=self._aggregator_id(),
                strategy_state=result.state,
                extra=result.extra,
            )
        except Exception as exc:
            return RoundCommitted(round, None, "", 0.0, exc)
        if facts is not None:  # which agents' masked inputs made the round, who dropped
            try:
                await self._db(
                    store.log_event,
                    "secagg_round",
                    {"round": round, "model_id": model_id, "inputs": list(inputs), **facts},
                    run_id=self._run_id(),
                )
            except StoreError as exc:
                log.error("round %d: the secagg_round event is not stored: %s", round, exc)
        self._pending = None
        self._secagg_facts = None
        return RoundCommitted(round, result, model_id, finished, metrics=metrics)

    async def _publish(
        self,
        round: int,
        result: Result,
        inputs: list[str],
        base_model_id: str,
        version: int,
        num_samples: int,
        metrics: Metrics,
        finished: float,
    ) -> RoundCommitted:
        """Federation: hand the cluster round to the sink and report the global model it
        returns (the cluster's strategy state stays the member's own)."""
        from fedstack.aggregator.federation import ClusterRound

        assert self.sink is not None
        adopted = await self.sink.publish(
            ClusterRound(
                round=round,
                base_version=version,
                base_model_id=base_model_id,
                weights=result.weights,
                extra=result.extra,
                strategy_state=result.state,
                num_samples=num_samples,
                num_updates=len(inputs),
                inputs=list(inputs),
                metrics=metrics,
                started=self.started_wall,
                finished=finished,
            )
        )
        self._pending = None
        adopted_result = Result(adopted.weights, result.state, adopted.metrics, adopted.extra)
        return RoundCommitted(
            round, adopted_result, adopted.model_id, time.time(), version=adopted.version
        )

    def checkpoint_due(self, final: bool, now: float) -> bool:
        """True if a background checkpoint should start now (at most one a second)."""
        return not self._checkpointing and (
            final or now - self._last_checkpoint >= CHECKPOINT_INTERVAL
        )

    async def checkpoint(self, now: float) -> None:
        """Checkpoint the store's log while the agents train (not on the store thread:
        a checkpoint never blocks the writes of uploads)."""
        store = self._store()
        assert store is not None
        self._checkpointing = True
        self._last_checkpoint = now
        try:
            await asyncio.to_thread(store.checkpoint)
        except StoreError as exc:
            log.warning("store checkpoint failed (retried after the next round): %s", exc)
        finally:
            self._checkpointing = False

    async def _evaluate_now(self, rnd: int, weights: Weights) -> Metrics:
        """Round ``rnd``'s evaluator metrics (``eval_*``) before it is committed; a failing
        evaluator is logged and gives none (the round is committed without them)."""
        assert self.evaluator is not None
        try:
            async with self._eval_lock:
                metrics = await asyncio.to_thread(self.evaluator, weights)
        except Exception:
            log.exception("evaluation of round %d failed", rnd)
            return {}
        out = _eval_names(metrics)
        log.info("round %d evaluation: %s", rnd, _shown(metrics))
        return out

    async def evaluate(self, rnd: int, weights: Weights) -> None:
        """Evaluate round ``rnd``'s global model and store its metrics (one at a time, in
        round order); a failure is logged."""
        store = self._store()
        assert self.evaluator is not None and store is not None
        try:
            async with self._eval_lock:
                metrics = await asyncio.to_thread(self.evaluator, weights)
            await self._db(
                store.update_round_metrics,
                self._run_id(),
                rnd,
                _eval_names(metrics),
            )
            if self.trackers is not None:
                self.trackers.round_changed(rnd)
            log.info("round %d evaluation: %s", rnd, _shown(metrics))
        except Exception:
            log.exception("evaluation of round %d failed", rnd)


def _eval_names(metrics: Metrics) -> Metrics:
    """An evaluator's metrics under the round's names: ``eval_<name>``."""
    return {f"eval_{k}" if not k.startswith("eval_") else k: v for k, v in metrics.items()}


def _shown(metrics: Metrics) -> str:
    return ", ".join(
        f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()
    )


def mean_metrics(inputs: list[tuple[int, Metrics]]) -> Metrics:
    """Sample-weighted means of the agents' numeric metrics (and the max of train_seconds)."""
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    out: Metrics = {}
    for n, m in inputs:
        w = float(max(n, 1))
        for k, v in m.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                sums[k] = sums.get(k, 0.0) + w * float(v)
                weights[k] = weights.get(k, 0.0) + w
                if k == "train_seconds":
                    out["max_train_seconds"] = max(
                        float(out.get("max_train_seconds", 0.0)), float(v)
                    )
    for k, total in sums.items():
        out[f"mean_{k}"] = total / weights[k]
    return out
