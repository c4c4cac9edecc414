"""A federation member's background work: membership, liveness, following, claims.

:class:`Membership` belongs to an aggregator with a ``name`` (or an ``upstream``); a
standalone aggregator has none. It

- joins the federation at start (:meth:`Membership.join`: the member row of
  (run, name) is taken over if it is not live, so a restarted member keeps its id, its
  buffered uploads and its strategy state; a live member of that name refuses the start);
- heartbeats every ``federation_heartbeat`` s with the number of connected agents and the
  global version (the database's clock decides liveness), keeps the other live members'
  URLs for the agents' welcomes (:attr:`Membership.peers`), and *claims* the buffered
  uploads that dead members held for agents that recently connected here (posting
  :class:`~fedstack.aggregator.events.UploadsClaimed` to the round owner); after a
  heartbeat gap longer than ``liveness_timeout`` it has the owner re-check which of its
  counted uploads it still holds;
- follows the run: when the run's global version moves past this member's (other members
  synthesised without it, or it has no agents), it loads that global model and posts
  :class:`~fedstack.aggregator.events.GlobalAdvanced` (or, before this member has a model
  at all, :class:`~fedstack.aggregator.events.FederationStarted`);
- leaves on stop (:meth:`Membership.leave`).

The owner-side effects of following and claiming (:func:`carry_contributions`,
:func:`absorb_claims`) are here too: they run as effects of the round owner and report
back with an event, like every other effect.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any

from fedstack.aggregator.barrier import RoundBarrier
from fedstack.aggregator.events import (
    ClaimsAbsorbed,
    FederationStarted,
    Followed,
    GlobalAdvanced,
    UploadsClaimed,
)
from fedstack.aggregator.federation import Adopted
from fedstack.aggregator.uploads import gated
from fedstack.errors import (
    ConfigError,
    FedstackError,
    InvalidUpdate,
    StoreConflict,
    StoreError,
)

if TYPE_CHECKING:
    from fedstack.aggregator.rounds import RoundState
    from fedstack.aggregator.service import Aggregator
    from fedstack.store import Member, UploadRecord

__all__ = ["FederationLost", "Membership", "absorb_claims", "carry_contributions"]

log = logging.getLogger("fedstack.aggregator")

FOLLOW_INTERVAL = 0.25
"""Seconds between two looks at the run's global version."""
CLAIM_WINDOW_LIVENESS = 4
"""An agent's buffered uploads held by dead members are looked for during its first
``CLAIM_WINDOW_LIVENESS x liveness_timeout`` seconds connected here."""
MAX_PEERS = 64
"""Most peer URLs told to an agent in a welcome (the wire bounds the list too)."""


class FederationLost(FedstackError):
    """Another aggregator took this member's row over (it was considered dead): this one
    must stop, or two aggregators would act as the same member."""


class Membership:
    """The federation work of one member (see the module doc).

    Args:
        aggregator: the member; its store, run, config and round state are read, events
            are posted to its round owner.
    """

    def __init__(self, aggregator: Aggregator) -> None:
        self.agg = aggregator
        self.cfg = aggregator.config
        self.member: Member | None = None
        self.peers: list[str] = []
        """The other live members' advertised URLs (for ``Welcome.aggregators``)."""
        self.barrier = RoundBarrier(aggregator)
        """The sync synthesis barrier (see :mod:`fedstack.aggregator.barrier`)."""
        self._poke = asyncio.Event()
        self._followed = -1  # the latest version a GlobalAdvanced was posted for
        self._arrived: dict[str, float] = {}  # agent id -> when first seen connected here

    # ------------------------------------------------------------------ lifecycle
    async def join(self, url: str) -> Member:
        """Join the run's federation as ``config.name`` advertising ``url``.

        Raises:
            ConfigError: a live member already has this name.
            StoreError: the store failed.
        """
        store = self.agg.store
        assert store is not None and self.cfg.name is not None
        waited = False
        while True:
            try:
                member = await self.agg._db(
                    store.join_federation,
                    self.agg.run_id,
                    name=self.cfg.name,
                    url=url,
                    upstream=self.cfg.upstream,
                    liveness=self.cfg.liveness_timeout,
                )
                break
            except StoreConflict as exc:
                pause = None if waited else await self._silent_for()
                if pause is None:
                    raise ConfigError(
                        f"an aggregator called {self.cfg.name!r} is already live in run "
                        f"{self.cfg.run_name!r} (heartbeat within "
                        f"{self.cfg.liveness_timeout:g} s): choose another --name, or stop "
                        f"that one first ({exc})"
                    ) from None
                log.info(
                    "member %r still looks live but has not heartbeaten for a while (this "
                    "aggregator restarted?): joining in %.1f s when it expires",
                    self.cfg.name,
                    pause,
                )
                waited = True
                await asyncio.sleep(pause)
        self.member = member
        log.info(
            "joined the federation of run %s as %r (member %s, %s)",
            self.agg.run_id[:8],
            member.name,
            member.id[:8],
            url,
        )
        return member

    async def _silent_for(self) -> float | None:
        """If the live row of this member's name has stopped heartbeating (no beat for
        more than two heartbeat intervals: a previous start of this aggregator that
        died), the seconds until it expires; None if it is heartbeating (a duplicate)."""
        store = self.agg.store
        assert store is not None
        members = await self.agg._db(
            store.members, self.agg.run_id, liveness=self.cfg.liveness_timeout
        )
        now = await self.agg._db(store.db_now)
        for m in members:
            if m.name == self.cfg.name and m.live:
                age = now - m.heartbeat
                if age > 2 * self.cfg.federation_heartbeat:
                    return max(0.0, self.cfg.liveness_timeout - age) + 0.1
        return None

    async def leave(self) -> None:
        """Mark this member stopped (its agents' uploads may then be claimed at once).
        A store failure is logged: the heartbeat's expiry says the same later."""
        store = self.agg.store
        if store is None or self.member is None:
            return
        try:
            await self.agg._db(store.leave_federation, self.agg.run_id, self.member.id)
        except StoreError as exc:
            log.warning("could not record leaving the federation: %s", exc)

    def poke(self) -> None:
        """Heartbeat now (the global version or the agents connected here changed)."""
        self._poke.set()

    def barrier_open(self, round: int) -> bool:
        """Owner: may this member deliver ``round`` now (see :class:`RoundBarrier`)?"""
        return self.barrier.is_open(round)

    def joined(self, agent_id: str, state: RoundState) -> None:
        """Owner: ``agent_id`` joined: heartbeat soon (the others see it has agents) and
        look whether it already contributed to the round elsewhere."""
        self.poke()
        if self.barrier.applies:
            self.barrier.joined(agent_id, state)

    # ------------------------------------------------------------------ background loops
    async def run_heartbeat(self) -> None:
        """Heartbeat, refresh the peers, claim dead members' uploads; forever.

        Raises:
            StoreError: the store failed (the scope restarts this loop after a pause).
        """
        assert self.member is not None
        last_beat = self.agg.clock()
        warned = False
        while True:
            self._poke.clear()
            try:
                await self._beat(last_beat)
                last_beat = self.agg.clock()
            except StoreConflict as exc:
                self.agg._fatal(
                    "federation-heartbeat",
                    FederationLost(f"member {self.cfg.name!r} was taken over: {exc}"),
                )
                return
            except StoreError as exc:  # the database is unavailable: keep trying, quietly
                if not warned and self.agg.clock() - last_beat > self.cfg.liveness_timeout:
                    warned = True
                    log.warning(
                        "no federation heartbeat for %.1f s (the other members now take this "
                        "one for dead): %s",
                        self.agg.clock() - last_beat,
                        exc,
                    )
            else:
                warned = False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._poke.wait(), self.cfg.federation_heartbeat)

    async def _beat(self, last_beat: float) -> None:
        """One heartbeat (and claim sweep). After a gap longer than ``liveness_timeout``
        (the store was unreachable) the other members may have taken this one for dead and
        claimed uploads it counts: the owner re-checks what it still holds."""
        store = self.agg.store
        assert store is not None and self.member is not None
        me = self.member.id
        state = self.agg.state
        members = await self.agg._db(
            store.heartbeat,
            self.agg.run_id,
            me,
            active_agents=len(self.agg.sessions),
            version=state.version,
            liveness=self.cfg.liveness_timeout,
        )
        self.peers = [m.url for m in members if m.live and m.id != me][:MAX_PEERS]
        gap = self.agg.clock() - last_beat
        weights = self.agg.global_weights
        if gap > self.cfg.liveness_timeout and state.contributors and weights is not None:
            log.warning(
                "no heartbeat for %.1f s: re-checking which uploads this member still holds",
                gap,
            )
            current = Adopted(state.version, self.agg.global_model_id, weights, {}, {})
            await self.agg._post(GlobalAdvanced(current, recheck=True))
        recent = self._recent_agents()
        if state.initialized and not state.finished and recent:
            claimed = await self.agg._db(
                store.claim_uploads,
                self.agg.run_id,
                me,
                recent,
                round=state.round,
                liveness=self.cfg.liveness_timeout,
                older_only=self.barrier.applies,
            )
            if claimed:
                log.info(
                    "claimed %d buffered upload(s) of agents now connected here from "
                    "members that are no longer live",
                    len(claimed),
                )
                await self.agg._post(UploadsClaimed(list(claimed)))

    def _recent_agents(self) -> list[str]:
        """The connected agents that arrived within the claim window: only an agent that
        moved here can have uploads held by a member that died, and that member is seen
        dead at most ``liveness_timeout`` after the agent left it."""
        now = self.agg.clock()
        window = CLAIM_WINDOW_LIVENESS * self.cfg.liveness_timeout
        arrived = {a: self._arrived.get(a, now) for a in self.agg.sessions}
        self._arrived = arrived
        return [a for a, t in arrived.items() if now - t <= window]

    async def run_follow(self) -> None:
        """Watch the run's global version; post what this member must adopt. Forever.

        Raises:
            StoreError: the store failed (the scope restarts this loop after a pause).
        """
        while True:
            await asyncio.sleep(FOLLOW_INTERVAL)
            try:
                await self._follow_once()
            except StoreError as exc:  # the database is unavailable: look again later
                log.debug("following the run's version failed: %s", exc)

    async def _follow_once(self) -> None:
        """Post what to adopt if the run's global version is ahead of this member's."""
        store = self.agg.store
        assert store is not None
        state = self.agg.state
        run = await self.agg._db(store.get_run, self.agg.run_id)
        if run.version < 0 or run.version <= max(state.version, self._followed):
            return
        gid = await self.agg._db(store.global_model_id, self.agg.run_id, run.version)
        if gid is None:
            return
        if not state.initialized and run.structure is None:
            return
        weights = await self.agg._db(store.load_weights, gid)
        if not state.initialized:
            assert run.structure is not None
            started = asyncio.get_running_loop().create_future()
            log.info("the federation started elsewhere: joining at version %d", run.version)
            await self.agg._post(
                FederationStarted(run.structure, weights, gid, started, version=run.version)
            )
            await started
        else:
            row = await self.agg._db(store.model, gid)
            metrics = dict(row["metrics"] or {}) if row else {}
            await self.agg._post(GlobalAdvanced(Adopted(run.version, gid, weights, {}, metrics)))
        self._followed = run.version


async def carry_contributions(
    agg: Aggregator,
    adopted: Adopted,
    contributions: dict[str, str],
    state: dict[str, Any],
    *,
    recheck: bool = False,
) -> Followed:
    """Owner effect: the round in progress is superseded by ``adopted``; carry its
    ``contributions`` (agent id -> model id) into the round after it per the staleness
    policy (``next``: still buffered, relabelled, and fed to the new accumulator; ``drop``:
    stored as stale) and build that round's accumulator from those this member still
    holds. ``recheck``: ``adopted`` is the current global model; only the rebuild from
    what is still held happens. Errors are returned."""
    store = agg.store
    assert store is not None
    drop = agg.config.staleness == "drop" and not recheck
    ids = list(contributions.values())
    try:
        if ids and not recheck:
            await agg._db(
                store.carry_uploads, agg.run_id, ids, round=adopted.version + 1, drop=drop
            )
        buffered: list[UploadRecord] = []
        if ids and not drop:
            wanted = set(ids)
            held = await agg._db(store.cluster_resume, agg.run_id, agg.aggregator_id)
            buffered = [r for r in held.buffered if r.model_id in wanted]
        replayed = await agg.driver.replay(adopted.weights, state, adopted.version, buffered)
    except Exception as exc:
        return Followed(adopted, None, exc)
    return Followed(adopted, replayed)


async def absorb_claims(
    agg: Aggregator, records: list[UploadRecord], version: int, duplicates: list[str]
) -> ClaimsAbsorbed:
    """Owner effect: feed claimed uploads to the round in progress (round ``version +
    1``) as a replay does (load, gate, ``Update``); relabel those claimed for another
    round first, and store ``duplicates`` (model ids of agents that already contributed
    to the round) as stale. Errors are returned (the uploads stay buffered and held
    here: a resume replays them)."""
    store = agg.store
    assert store is not None and agg.global_weights is not None
    acc = agg.driver.accumulator
    assert acc is not None
    round_ = version + 1
    added: list[UploadRecord] = []
    try:
        stale = duplicates + [
            r.model_id
            for r in records
            if agg.config.staleness == "drop" and r.base_version < version
        ]
        if stale:
            await agg._db(store.carry_uploads, agg.run_id, stale, round=round_, drop=True)
        moved = [r.model_id for r in records if r.round != round_ and r.model_id not in stale]
        if moved:
            await agg._db(store.carry_uploads, agg.run_id, moved, round=round_, drop=False)
        for rec in records:
            if rec.model_id in stale:
                continue
            update = await agg.driver.stored_update(rec, version, "claimed")
            if update is None:
                continue
            if agg.gate is not None:
                update = gated(update, agg.owner.gate_check(update.weights))
            try:
                acc.add(update)
            except InvalidUpdate as exc:
                log.warning("claimed upload %s refused: %s", rec.upload_id[:64], exc)
                continue
            added.append(rec)
    except Exception as exc:
        return ClaimsAbsorbed(added, exc)
    return ClaimsAbsorbed(added)
