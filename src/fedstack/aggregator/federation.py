"""The horizontal federation, aggregator side: semi-global models and their synthesis.

Aggregators started with the same ``db`` and ``run_name`` and a ``name`` form one
federation (book A3-31..A3-34). Each *member* aggregates its own cluster (its connected
agents) as a standalone aggregator does; the result of a cluster round is a
:class:`ClusterRound`, which the round driver hands to the aggregator's :class:`RoundSink`
instead of committing it as the global model. The sink turns it into the global model the
member continues from (:class:`Adopted`):

- :class:`SharedStoreSynthesis` (a federation over one shared store): store the
  semi-global model, then synthesise the global model from the members' semi-global
  models (``synthesis = "sync"``: those of the same round; ``"async"``: each member's
  latest within ``staleness_bound``) with :func:`fedstack.aggregator.synthesis.synthesize`,
  or adopt the one another member synthesised first (the store's round key and version
  guard make sure no global version is produced twice);
- ``UpstreamSynthesis`` (:mod:`fedstack.aggregator.upstream`): upload it to an upper
  aggregator as one agent and adopt the upper global model.

The member's background work (joining, heartbeats, following the run's version, claiming
the uploads of dead members) is :class:`~fedstack.aggregator.membership.Membership`.
A standalone aggregator (no ``name``, no ``upstream``) has neither: its path is unchanged.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from fedstack.aggregator.synthesis import SynthesisInput, synthesize
from fedstack.errors import StoreConflict, StoreError
from fedstack.types import Metrics, Weights

if TYPE_CHECKING:
    from fedstack.aggregator.service import Aggregator
    from fedstack.store import SemiGlobal

__all__ = ["Adopted", "ClusterRound", "RoundSink", "SharedStoreSynthesis", "cluster_metrics"]

log = logging.getLogger("fedstack.aggregator")

POLL_FIRST = 0.02
"""Seconds between the first polls of the store while waiting for a synthesis."""
POLL_MAX = 0.05
"""Longest wait between two polls of the store while waiting for a synthesis."""
ASYNC_ATTEMPTS = 8
"""Async synthesis: versions tried before adopting the latest global model instead."""


@dataclass(frozen=True)
class ClusterRound:
    """A cluster round, aggregated: handed to a :class:`RoundSink`.

    ``round`` is the cluster round (the member's global version + 1) aggregated on global
    model ``base_version`` (``base_model_id``); ``weights``, ``extra``, ``strategy_state``
    are the strategy's result (the *semi-global* model and the cluster's server state);
    ``num_samples`` / ``num_updates`` count the cluster's accepted uploads, ``inputs``
    are their model ids; ``started`` / ``finished`` are wall-clock times."""

    round: int
    base_version: int
    base_model_id: str
    weights: Weights
    extra: Weights
    strategy_state: dict[str, Any]
    num_samples: int
    num_updates: int
    inputs: list[str]
    metrics: Metrics
    started: float
    finished: float


@dataclass(frozen=True)
class Adopted:
    """The global model the aggregator continues from: global ``version`` stored as
    ``model_id``; ``extra`` are the arrays sent to the cluster's agents with it."""

    version: int
    model_id: str
    weights: Weights
    extra: Weights
    metrics: Metrics


class RoundSink(Protocol):
    """Where a federated aggregator's cluster rounds go (set as ``Aggregator.sink``)."""

    async def publish(self, cluster: ClusterRound) -> Adopted:
        """Store ``cluster`` and return the global model to continue from (its version
        is ``cluster.round`` or later). Called by one round at a time.

        Raises:
            StoreError: the store failed; the owner retries the same ``cluster`` later
                (so publishing must be idempotent by round).
        """
        ...


def cluster_metrics(items: list[tuple[int, Mapping[str, Any]]]) -> Metrics:
    """The sample-weighted mean of the numeric metrics of several models (the global
    model's metrics from its semi-global models': ``mean_loss`` stays ``mean_loss``)."""
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    for n, metrics in items:
        w = float(max(n, 1))
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                sums[k] = sums.get(k, 0.0) + w * float(v)
                weights[k] = weights.get(k, 0.0) + w
    return {k: total / weights[k] for k, total in sorted(sums.items())}


class SharedStoreSynthesis:
    """The :class:`RoundSink` of a member of a federation over one shared store.

    :meth:`publish` stores the semi-global model (``commit_semi_global``), then makes or
    adopts the global model per ``config.synthesis`` (see the module doc and the brief's
    rules: sync waits until every live member with agents at the same version delivered,
    or ``synthesis_timeout`` after its own delivery; async uses each member's latest
    semi-global model of a round >= V - ``staleness_bound``).

    Args:
        aggregator: the member (its store, run, id, name and config are read).
    """

    def __init__(self, aggregator: Aggregator) -> None:
        self.agg = aggregator
        self.cfg = aggregator.config
        self._own: dict[str, Weights] = {}  # model id -> weights of our own semi-globals

    async def publish(self, cluster: ClusterRound) -> Adopted:
        store = self.agg.store
        assert store is not None
        try:
            model_id = await self.agg._db(
                store.commit_semi_global,
                self.agg.run_id,
                aggregator_id=self.agg.aggregator_id,
                round=cluster.round,
                weights=cluster.weights,
                inputs=cluster.inputs,
                base_model_id=cluster.base_model_id or None,
                num_samples=cluster.num_samples,
                metrics=cluster.metrics,
                started=cluster.started,
                finished=cluster.finished,
                strategy_state=cluster.strategy_state,
                extra=cluster.extra or None,
            )
            self._own = {model_id: cluster.weights}
        except StoreConflict:
            # a retry after a failure that happened once the delivery was committed
            log.info("round %d: semi-global model was already delivered", cluster.round)
        return await self.complete(cluster.round, cluster.extra)

    async def complete(self, round: int, extra: Weights) -> Adopted:
        """The global model that follows this member's delivered cluster round ``round``
        (made here or by another member); also used on resume, for a round delivered
        before a restart. ``extra`` goes to the cluster's agents with it.

        Raises:
            StoreError: the store failed.
        """
        delivered_at = self.agg.clock()
        if self.cfg.synthesis == "async":
            return await self._async(round, extra)
        return await self._sync(round, extra, delivered_at + self.cfg.synthesis_timeout)

    # ------------------------------------------------------------------ sync
    async def _sync(self, round: int, extra: Weights, deadline: float) -> Adopted:
        from fedstack.aggregator.barrier import deliver_orphans, has_dead_undelivered

        store = self.agg.store
        assert store is not None
        pause = POLL_FIRST
        waited_from = time.perf_counter()
        while True:
            # each member's LATEST semi-global: round ``round`` = delivered; ``round - 1``
            # = it is at version round - 1 even if its heartbeat does not say so yet
            view = await self.agg._db(
                store.federation_view,
                self.agg.run_id,
                round,
                liveness=self.cfg.liveness_timeout,
                latest=True,
            )
            if view.global_model_id is not None:
                return await self._load(round, view.global_model_id, extra)
            if view.version >= round:  # made, but not visible as round's global: read it
                gid = await self.agg._db(store.global_model_id, self.agg.run_id, view.version)
                if gid is not None:
                    return await self._load(view.version, gid, extra)
            latest = {sg.aggregator_id: sg.round for sg in view.semi_globals}
            delivered = [sg for sg in view.semi_globals if sg.round == round]
            # waited for: live members at version round - 1 that have agents, or that
            # delivered round - 1 (their agents may be reconnecting, e.g. after a store
            # outage, so that their last heartbeat counted none)
            waiting = [
                m.name
                for m in view.members
                if m.live
                and (m.active_agents > 0 or latest.get(m.id, -1) == round - 1)
                and latest.get(m.id, -1) != round
                and (m.version == round - 1 or latest.get(m.id, -1) == round - 1)
            ]
            timed_out = self.agg.clock() >= deadline
            mine = any(sg.aggregator_id == self.agg.aggregator_id for sg in delivered)
            if timed_out and not mine:  # (a conflict taken for a delivery): publish again
                raise StoreError(f"the semi-global model of round {round} is not in the store")
            if (
                not timed_out
                and has_dead_undelivered(view, round)
                and await deliver_orphans(self.agg, round)
            ):
                # a dead member held acknowledged uploads of this round: delivered here
                # or by another survivor (or being delivered): look again before
                # synthesising, so they are part of this round's global model
                await asyncio.sleep(pause)
                continue
            if delivered and (not waiting or timed_out):
                if waiting:
                    log.warning(
                        "round %d: synthesising without %s (no semi-global model within %g s)",
                        round,
                        ", ".join(sorted(waiting)[:10]),
                        self.cfg.synthesis_timeout,
                    )
                wait_seconds = time.perf_counter() - waited_from
                adopted = await self._synthesise(round, delivered, extra, wait_seconds)
                if adopted is not None:
                    return adopted
                continue  # another member won the race: read its global model
            await asyncio.sleep(pause)
            pause = min(POLL_MAX, pause * 1.5)

    # ------------------------------------------------------------------ async
    async def _async(self, round: int, extra: Weights) -> Adopted:
        store = self.agg.store
        assert store is not None
        bound = self.cfg.staleness_bound
        for _ in range(ASYNC_ATTEMPTS):
            view = await self.agg._db(
                store.federation_view,
                self.agg.run_id,
                round,
                liveness=self.cfg.liveness_timeout,
                latest=True,
            )
            target = view.version + 1
            inputs = [sg for sg in view.semi_globals if sg.round >= target - bound]
            if not any(sg.aggregator_id == self.agg.aggregator_id for sg in inputs):
                break  # our own semi-global model is too stale to make a new version
            adopted = await self._synthesise(target, inputs, extra, 0.0)
            if adopted is not None:
                return adopted
        return await self._latest(extra)

    # ------------------------------------------------------------------ common
    async def _synthesise(
        self, version: int, semi_globals: list[SemiGlobal], extra: Weights, wait: float
    ) -> Adopted | None:
        """Synthesise global ``version`` from ``semi_globals`` and try to commit it.
        None: another member committed that version first."""
        store = self.agg.store
        assert store is not None
        started_wall, t0 = time.time(), time.perf_counter()
        inputs = []
        for sg in sorted(semi_globals, key=lambda x: (x.name, x.model_id)):
            weights = self._own.get(sg.model_id)
            if weights is None:
                weights = await self.agg._db(store.load_weights, sg.model_id)
            inputs.append(SynthesisInput(sg.name, sg.model_id, sg.num_samples, weights))
        weights = await asyncio.to_thread(synthesize, inputs)
        base = await self.agg._db(store.global_model_id, self.agg.run_id, version - 1)
        metrics: Metrics = {
            **cluster_metrics([(sg.num_samples, sg.metrics) for sg in semi_globals]),
            "synthesis_members": ",".join(i.name for i in inputs),
            "synthesis_inputs": len(inputs),
            "synthesis_wait_seconds": round(wait, 6),
            "synthesized_by": self.cfg.name or "",
        }
        metrics["synthesis_seconds"] = round(time.perf_counter() - t0, 6)
        gid = await self.agg._db(
            store.commit_global,
            self.agg.run_id,
            round=version,
            weights=weights,
            semi_globals=[i.model_id for i in inputs],
            base_model_id=base,
            num_samples=sum(max(0, sg.num_samples) for sg in semi_globals),
            num_updates=sum(sg.num_updates for sg in semi_globals),
            metrics=metrics,
            aggregator_id=self.agg.aggregator_id,
            started=started_wall,
            finished=time.time(),
        )
        if gid is None:
            return None
        log.info(
            "global model %d synthesised from %d semi-global model(s) (%s) in %.4f s",
            version,
            len(inputs),
            metrics["synthesis_members"],
            metrics["synthesis_seconds"],
        )
        return Adopted(version, gid, weights, extra, metrics)

    async def _load(self, version: int, model_id: str, extra: Weights) -> Adopted:
        store = self.agg.store
        assert store is not None
        weights = await self.agg._db(store.load_weights, model_id)
        row = await self.agg._db(store.model, model_id)
        metrics = dict(row["metrics"] or {}) if row else {}
        return Adopted(version, model_id, weights, extra, metrics)

    async def _latest(self, extra: Weights) -> Adopted:
        store = self.agg.store
        assert store is not None
        run = await self.agg._db(store.get_run, self.agg.run_id)
        gid = await self.agg._db(store.global_model_id, self.agg.run_id, run.version)
        if gid is None:
            raise StoreError(f"run {self.agg.run_id}: global model {run.version} is missing")
        return await self._load(run.version, gid, extra)
