"""Sync synthesis, made exact across failures: the round barrier and the rounds of dead
members.

With ``synthesis = "sync"`` the global model of version ``r`` is meant to combine round
``r`` of every cluster of the federation. Two things would break that when a member
dies mid-round, and this module handles both:

- **The barrier.** A member whose cluster is complete for round ``r`` records it
  (``aggregators.ready_round``) and delivers its semi-global model only once every
  other live member with agents is complete too (or delivered, or ``synthesis_timeout``
  passed). Until then its round stays open: agents that fail over to it from a dead
  member join its round (their fresh uploads count here; those that had uploaded to the
  dead member are *excused*: ``RoundState.excused``), instead of arriving after it
  delivered and being counted a round late.
- **Rounds of dead members.** The acknowledged uploads a dead member held for round
  ``r`` are delivered on its behalf by a survivor (:func:`deliver_orphans`): the same
  strategy over the same uploads on the same global model, stored as the dead member's
  semi-global model of ``r`` (``commit_semi_global(..., held_by=dead)``: an upload
  claimed meanwhile by another member refuses that delivery, and the member row's
  round key lets only one survivor deliver it). Every acknowledged upload is thus
  counted exactly once, in the round it was acknowledged for.

Asynchronous synthesis and tiers have no barrier (a member never waits for another).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING

import numpy as np

from fedstack.aggregator.driver import mean_metrics
from fedstack.aggregator.events import BarrierOpened, Excused
from fedstack.aggregator.rounds import RoundState
from fedstack.aggregator.tasks import ScopeClosed
from fedstack.aggregator.uploads import gated
from fedstack.errors import StoreConflict, StoreError

if TYPE_CHECKING:
    from fedstack.aggregator.service import Aggregator
    from fedstack.store import FederationView

__all__ = ["RoundBarrier", "deliver_orphans", "has_dead_undelivered"]

log = logging.getLogger("fedstack.aggregator")

POLL_FIRST = 0.01
"""Seconds between the first looks at the other members while waiting at the barrier."""
POLL_MAX = 0.05
"""Longest pause between two looks."""


class RoundBarrier:
    """The sync synthesis barrier of one member (see the module doc).

    :meth:`is_open` is asked by the round owner when its round is ready; the first ask
    for a round records the member ready and starts the wait, whose end posts
    :class:`~fedstack.aggregator.events.BarrierOpened`.
    """

    def __init__(self, aggregator: Aggregator) -> None:
        self.agg = aggregator
        cfg = aggregator.config
        self.applies = cfg.synthesis == "sync" and cfg.upstream is None
        self._open = -1  # the latest round whose barrier opened
        self._waiting = -1  # the round being waited for

    def is_open(self, round: int) -> bool:
        """True once ``round`` may be delivered (always without a barrier)."""
        if not self.applies or self._open >= round:
            return True
        if self._waiting != round:
            self._waiting = round
            with contextlib.suppress(ScopeClosed):
                self.agg._scope.spawn(self._wait(round), name="round-barrier", daemon=True)
        return False

    async def _wait(self, round: int) -> None:
        agg, cfg = self.agg, self.agg.config
        store = agg.store
        assert store is not None
        me = agg.aggregator_id
        deadline = agg.clock() + cfg.synthesis_timeout
        pause = POLL_FIRST
        marked = False
        while True:
            try:
                if not marked:
                    await agg._db(store.mark_ready, agg.run_id, me, round)
                    marked = True
                view = await agg._db(
                    store.federation_view, agg.run_id, round, liveness=cfg.liveness_timeout
                )
                if view.global_model_id is not None or view.version >= round:
                    break  # the round is over elsewhere: the follower takes it from here
                waiting = _not_ready(view, me, round)
                if not waiting:
                    break
                if agg.clock() >= deadline:
                    log.warning(
                        "round %d: delivering without waiting longer for %s (not complete "
                        "within %g s)",
                        round,
                        ", ".join(sorted(waiting)[:10]),
                        cfg.synthesis_timeout,
                    )
                    break
                if has_dead_undelivered(view, round):
                    await deliver_orphans(agg, round)
            except StoreError as exc:  # the store is unavailable: look again later
                log.debug("round %d barrier: %s", round, exc)
                if agg.clock() >= deadline:
                    break
            await asyncio.sleep(pause)
            pause = min(POLL_MAX, pause * 1.5)
        self._open = max(self._open, round)
        await agg._post(BarrierOpened(round))

    def joined(self, agent_id: str, state: RoundState) -> None:
        """Owner: ``agent_id`` joined; if it contributed to the round in progress through
        another member, post :class:`~fedstack.aggregator.events.Excused`."""
        if not state.initialized or state.finished:
            return
        round = state.round
        agg = self.agg

        async def look() -> None:
            store = agg.store
            assert store is not None
            try:
                found = await agg._db(
                    store.contributed_elsewhere, agg.run_id, agg.aggregator_id, [agent_id], round
                )
            except StoreError as exc:
                log.debug("contribution lookup of a joining agent failed: %s", exc)
                return
            if found:
                await agg._post(Excused(round, set(found)))

        with contextlib.suppress(ScopeClosed):
            agg._scope.spawn(look(), name="excuse", daemon=True)


def _not_ready(view: FederationView, me: str, round: int) -> list[str]:
    """The other live members with agents whose cluster is not complete for ``round``
    and that did not deliver it."""
    delivered = {sg.aggregator_id for sg in view.semi_globals if sg.round == round}
    return [
        m.name
        for m in view.members
        if m.live
        and m.id != me
        and m.active_agents > 0
        and m.id not in delivered
        and m.ready_round < round
    ]


def has_dead_undelivered(view: FederationView, round: int) -> bool:
    """True if a member that is not live has not delivered ``round`` (in ``view``)."""
    delivered = {sg.aggregator_id for sg in view.semi_globals if sg.round == round}
    return any(not m.live and m.id not in delivered for m in view.members)


async def deliver_orphans(agg: Aggregator, round: int) -> int:
    """Deliver round ``round`` of every dead member that holds acknowledged uploads of
    it and did not deliver it (see the module doc), on this member's global model of
    ``round - 1``. Returns how many such members were found (delivered here, by another
    survivor meanwhile, or not deliverable): 0 means none is left to wait for."""
    store = agg.store
    weights = agg.global_weights
    if store is None or weights is None or agg.state.version != round - 1:
        return 0
    orphans = await agg._db(
        store.orphaned_rounds, agg.run_id, round, liveness=agg.config.liveness_timeout
    )
    for member_id, records in sorted(orphans.items()):
        started = time.time()
        try:
            own = await agg._db(store.cluster_resume, agg.run_id, member_id)
            state = (
                own.strategy_state
                if own.strategy_state is not None
                else agg.strategy.init_state(weights)
            )
            rng = np.random.default_rng([agg.config.seed, round, int(member_id[:8], 16)])
            acc = agg.strategy.begin(weights, state, round=round, rng=rng)
            inputs: list[str] = []
            metrics_in = []
            for rec in records:
                update = await agg.driver.stored_update(rec, round - 1, "orphaned")
                if update is None:
                    continue
                if agg.gate is not None:
                    update = gated(update, agg.owner.gate_check(update.weights))
                acc.add(update)
                inputs.append(rec.model_id)
                metrics_in.append((rec.num_samples, rec.metrics))
            if not inputs:
                continue
            result = await asyncio.to_thread(acc.result)
            await agg._db(
                store.commit_semi_global,
                agg.run_id,
                aggregator_id=member_id,
                round=round,
                weights=result.weights,
                inputs=inputs,
                base_model_id=agg.global_model_id or None,
                num_samples=sum(max(n, 0) for n, _ in metrics_in),
                metrics={
                    **result.metrics,
                    **mean_metrics(metrics_in),
                    "delivered_by": agg.config.name or "",
                },
                started=started,
                finished=time.time(),
                strategy_state=result.state,
                extra=result.extra or None,
                held_by=member_id,
            )
        except StoreConflict as exc:  # delivered by another survivor, or an input moved
            log.debug("round %d of member %s: %s", round, member_id[:8], exc)
            continue
        except StoreError:
            raise
        except Exception:  # the strategy failed on these uploads: they become late
            log.exception("round %d: cannot deliver dead member %s's uploads", round, member_id)
            continue
        log.info(
            "round %d: delivered the %d acknowledged upload(s) held by dead member %s",
            round,
            len(inputs),
            member_id[:8],
        )
    return len(orphans)
