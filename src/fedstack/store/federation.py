"""The SQL of the horizontal federation: semi-global models, the global model, uploads
that move between members.

A mixin of :class:`~fedstack.store.Store` (like ``Queries`` and ``Credentials``); the
members themselves (join, heartbeat, liveness on the database's clock) are
:class:`~fedstack.store.members.Members`, its base. Each member stores the result of its
cluster rounds as **semi-global** models (a ``cluster_rounds`` row each); the global model
of version v is synthesised from semi-globals and committed by
:meth:`Federation.commit_global`, which the run's version guard and the ``rounds`` primary
key make race-safe: of several members committing version v, exactly one wins, the others
get None. Local models record the member holding them (``models.cluster``); the buffered
uploads of a member that is no longer live are claimed by the member their agent moved to.

As everywhere in the store, each write is one transaction that has committed when the
method returns, and every database error leaves as :class:`~fedstack.errors.StoreError`
(:class:`~fedstack.errors.StoreConflict` for a constraint) without SQL text.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import bindparam, func, insert, or_, select, update

from fedstack.errors import StoreConflict, StoreError
from fedstack.store import schema as s
from fedstack.store.members import MEMBERS_OF_RUN, RUN_VERSION, Member, Members, member_of_row
from fedstack.store.records import UploadRecord, split_state, upload_record
from fedstack.types import Metrics, Weights

__all__ = ["ClusterResume", "Federation", "FederationView", "Member", "SemiGlobal"]


@dataclass(frozen=True, slots=True)
class SemiGlobal:
    """A member's semi-global model (the result of one of its cluster rounds)."""

    model_id: str
    aggregator_id: str
    name: str  # the member's name ("" if the member row is unknown)
    round: int
    base_version: int
    num_samples: int
    num_updates: int
    metrics: Metrics
    finished: float
    status: str = "delivered"  # delivered | synthesized | late


@dataclass(frozen=True, slots=True)
class FederationView:
    """What a member reads to decide whether (and from what) to synthesise."""

    version: int  # the run's latest global version
    global_model_id: str | None  # the global model of the round asked for, if it exists
    members: list[Member]
    semi_globals: list[SemiGlobal]  # of the round asked (latest=True: each member's latest)


@dataclass(frozen=True, slots=True)
class ClusterResume:
    """What a restarted member needs to continue its cluster."""

    strategy_state: dict[str, Any] | None  # its last cluster round's (None: none yet)
    extra: Weights  # the extra arrays stored with that round's semi-global model
    delivered: int | None  # the latest round it delivered whose global does not exist yet
    buffered: list[UploadRecord]  # the buffered uploads it holds (any round)


_A = s.aggregators
_CR = s.cluster_rounds
_M = s.models

_RUN_VERSION_SHARED = RUN_VERSION.with_for_update(read=True)
_SET_STATUS = update(_M).where(_M.c.id == bindparam("b_model")).values(status=bindparam("b_status"))
_MODEL_ROUND = select(_M.c.kind, _M.c.round).where(_M.c.id == bindparam("b_model"))
_DELIVERED = select(_CR.c.status).where(
    _CR.c.run_id == bindparam("b_run"),
    _CR.c.aggregator_id == bindparam("b_agg"),
    _CR.c.round == bindparam("b_round"),
)
_INSERT_MODEL = insert(_M)
_INSERT_LINEAGE = insert(s.lineage)
_INSERT_CLUSTER_ROUND = insert(_CR)
_INSERT_ROUND = insert(s.rounds)
_MARK_AGGREGATED = (
    update(_M).where(_M.c.id.in_(bindparam("b_ids", expanding=True))).values(status="aggregated")
)
_MARK_HELD_AGGREGATED = (
    update(_M)
    .where(
        _M.c.id.in_(bindparam("b_ids", expanding=True)),
        _M.c.status == "buffered",
        _M.c.cluster == bindparam("b_held"),
    )
    .values(status="aggregated")
)
_CONTRIBUTED = select(_M.c.producer).where(
    _M.c.run_id == bindparam("b_run"),
    _M.c.kind == "local",
    _M.c.round == bindparam("b_round"),
    _M.c.status.in_(("buffered", "aggregated")),
    _M.c.producer.in_(bindparam("b_agents", expanding=True)),
    or_(_M.c.cluster.is_(None), _M.c.cluster != bindparam("b_agg")),
)
_ORPHANS = (
    select(_M)
    .where(
        _M.c.run_id == bindparam("b_run"),
        _M.c.kind == "local",
        _M.c.status == "buffered",
        _M.c.round == bindparam("b_round"),
        _M.c.cluster.in_(bindparam("b_dead", expanding=True)),
    )
    .order_by(_M.c.created)
)
_ADVANCE_RUN = (
    update(s.runs)
    .where(s.runs.c.id == bindparam("b_run"), s.runs.c.version == bindparam("b_from"))
    .values(version=bindparam("b_version"))
)
_MARK_SYNTH_ROUNDS = (
    update(_CR)
    .where(
        _CR.c.run_id == bindparam("b_run"), _CR.c.model_id.in_(bindparam("b_ids", expanding=True))
    )
    .values(status="synthesized")
)
_MARK_SYNTH_MODELS = (
    update(_M).where(_M.c.id.in_(bindparam("b_ids", expanding=True))).values(status="synthesized")
)
_GLOBAL_OF_ROUND = select(_M.c.id).where(
    _M.c.run_id == bindparam("b_run"),
    _M.c.kind == "cluster",
    _M.c.status == "global",
    _M.c.round == bindparam("b_round"),
)
_SEMI_COLUMNS = (
    _CR.c.model_id,
    _CR.c.aggregator_id,
    _A.c.name,
    _CR.c.round,
    _M.c.base_version,
    _CR.c.num_samples,
    _CR.c.num_updates,
    _CR.c.metrics,
    _CR.c.finished,
    _CR.c.status,
)
_SEMI_FROM = _CR.join(_M, _M.c.id == _CR.c.model_id).outerjoin(_A, _A.c.id == _CR.c.aggregator_id)
_SEMI_OF_ROUND = (
    select(*_SEMI_COLUMNS)
    .select_from(_SEMI_FROM)
    .where(_CR.c.run_id == bindparam("b_run"), _CR.c.round == bindparam("b_round"))
)
_LATEST = (
    select(_CR.c.aggregator_id.label("agg"), func.max(_CR.c.round).label("last"))
    .where(_CR.c.run_id == bindparam("b_run"))
    .group_by(_CR.c.aggregator_id)
    .subquery()
)
_SEMI_LATEST = (
    select(*_SEMI_COLUMNS)
    .select_from(
        _SEMI_FROM.join(
            _LATEST, (_LATEST.c.agg == _CR.c.aggregator_id) & (_LATEST.c.last == _CR.c.round)
        )
    )
    .where(_CR.c.run_id == bindparam("b_run"))
)
_CLAIMABLE = (
    select(_M)
    .where(
        _M.c.run_id == bindparam("b_run"),
        _M.c.status == "buffered",
        _M.c.kind == "local",
        _M.c.round <= bindparam("b_round"),
        _M.c.producer.in_(bindparam("b_agents", expanding=True)),
        # held by no one, or by a member that is not live (never by the claimer)
        or_(_M.c.cluster.is_(None), _M.c.cluster.not_in(bindparam("b_live", expanding=True))),
    )
    .order_by(_M.c.created)
)
_CLAIMABLE_OLDER = _CLAIMABLE.where(_M.c.round < bindparam("b_round"))
_CLAIM_FROM = (
    update(_M)
    .where(
        _M.c.id == bindparam("b_id"), _M.c.status == "buffered", _M.c.cluster == bindparam("b_old")
    )
    .values(cluster=bindparam("b_new"), round=bindparam("b_round"))
)
_CLAIM_UNHELD = (
    update(_M)
    .where(_M.c.id == bindparam("b_id"), _M.c.status == "buffered", _M.c.cluster.is_(None))
    .values(cluster=bindparam("b_new"), round=bindparam("b_round"))
)
_CARRY = (
    update(_M)
    .where(
        _M.c.run_id == bindparam("b_run"),
        _M.c.id.in_(bindparam("b_ids", expanding=True)),
        _M.c.status == "buffered",
    )
    .values(round=bindparam("b_round"))
)
_DROP = (
    update(_M)
    .where(
        _M.c.run_id == bindparam("b_run"),
        _M.c.id.in_(bindparam("b_ids", expanding=True)),
        _M.c.status == "buffered",
    )
    .values(status="stale")
)
_HELD = (
    select(_M)
    .where(
        _M.c.run_id == bindparam("b_run"),
        _M.c.status == "buffered",
        _M.c.cluster == bindparam("b_agg"),
        _M.c.kind == "local",
    )
    .order_by(_M.c.created)
)
_LAST_CLUSTER_ROUND = (
    select(_CR.c.strategy_state, _CR.c.state_blob, _M.c.extra_blob)
    .join(_M, _M.c.id == _CR.c.model_id)
    .where(_CR.c.run_id == bindparam("b_run"), _CR.c.aggregator_id == bindparam("b_agg"))
    .order_by(_CR.c.round.desc())
    .limit(1)
)
_PENDING_DELIVERY = select(func.max(_CR.c.round)).where(
    _CR.c.run_id == bindparam("b_run"),
    _CR.c.aggregator_id == bindparam("b_agg"),
    _CR.c.status == "delivered",
    _CR.c.round > bindparam("b_version"),
)


class _Lost(Exception):
    """commit_global: the run's version is no longer the one the round follows."""


class Federation(Members):
    """The federation methods of :class:`~fedstack.store.Store` (see the module docstring)."""

    if TYPE_CHECKING:

        def _stage(self, weights: Mapping[str, Any]) -> Any: ...
        def _write_inline(self, c: Any, *staged: Any) -> None: ...
        def get_blob(self, digest: str) -> Weights: ...
        def check_database(self) -> None: ...

    # ------------------------------------------------------------------ semi-globals
    def commit_semi_global(
        self,
        run_id: str,
        *,
        aggregator_id: str,
        round: int,
        weights: Weights,
        inputs: Sequence[str],
        base_model_id: str | None,
        num_samples: int,
        metrics: Metrics,
        started: float,
        finished: float,
        strategy_state: Mapping[str, Any] | None = None,
        extra: Weights | None = None,
        held_by: str | None = None,
    ) -> str:
        """Store member ``aggregator_id``'s semi-global model of cluster ``round``, in one
        transaction: the model (kind ``semi-global``), its lineage (``input``: the local
        models ``inputs``, marked aggregated; ``base``: ``base_model_id``), and the
        ``cluster_rounds`` row with the strategy's state (scalars as JSON, arrays as a
        blob). Its status is ``delivered``, or ``late`` if the global model of ``round``
        exists already. ``extra``: the arrays stored with the model. Returns its id.

        ``held_by``: the ``inputs`` must all still be buffered and held by that member
        (a survivor delivering a dead member's round: an input claimed meanwhile by
        another member refuses the whole delivery, so no upload is counted twice).

        Raises:
            StoreConflict: the member delivered ``round`` already, or (``held_by``) an
                input is no longer buffered there.
            StoreError: the database failed.
        """
        staged = self._stage(weights)
        scalars, arrays = split_state(strategy_state or {})
        state_staged = self._stage(arrays) if arrays else None
        extra_staged = self._stage(extra) if extra else None
        model_id = uuid.uuid4().hex
        self.check_database()
        duplicate = False
        with self._begin() as c:
            if c.execute(
                _DELIVERED, {"b_run": run_id, "b_agg": aggregator_id, "b_round": round}
            ).first():
                duplicate = True
            else:
                self._write_inline(c, staged, state_staged, extra_staged)
                version = c.execute(RUN_VERSION, {"b_run": run_id}).scalar()
                if version is None:
                    raise StoreError(f"no run {run_id}")
                base_version = round - 1
                if base_model_id is not None:
                    base = c.execute(_MODEL_ROUND, {"b_model": base_model_id}).first()
                    if base is not None and base[0] == "cluster":
                        base_version = int(base[1])
                c.execute(
                    _INSERT_MODEL,
                    {
                        "id": model_id,
                        "run_id": run_id,
                        "kind": "semi-global",
                        "producer": aggregator_id,
                        "round": round,
                        "base_version": base_version,
                        "num_samples": num_samples,
                        "metrics": dict(metrics),
                        "blob": staged.digest,
                        "nbytes": staged.size,
                        "created": finished,
                        "status": "delivered",
                        "upload_id": None,
                        "extra_blob": extra_staged.digest if extra_staged else None,
                        "cluster": aggregator_id,
                    },
                )
                # after a write (SQLite: the write lock is held, the read is current) and
                # FOR SHARE (PostgreSQL: waits for a global being committed): a global of
                # this round committed meanwhile makes this semi-global late
                version = c.execute(_RUN_VERSION_SHARED, {"b_run": run_id}).scalar_one()
                status = "late" if int(version) >= round else "delivered"
                if status == "late" and held_by is not None:
                    # a dead member's uploads stay buffered (claimable), never aggregated
                    # into a semi-global model no global model will use
                    raise StoreConflict(f"round {round} was synthesised already")
                if status == "late":
                    c.execute(_SET_STATUS, {"b_model": model_id, "b_status": status})
                rows = [{"child_id": model_id, "parent_id": i, "relation": "input"} for i in inputs]
                if base_model_id is not None:
                    rows.append(
                        {"child_id": model_id, "parent_id": base_model_id, "relation": "base"}
                    )
                if rows:
                    c.execute(_INSERT_LINEAGE, rows)
                if inputs and held_by is not None:
                    ids = list(dict.fromkeys(inputs))
                    n = c.execute(_MARK_HELD_AGGREGATED, {"b_ids": ids, "b_held": held_by})
                    if n.rowcount != len(ids):
                        raise StoreConflict(
                            f"round {round} of member {aggregator_id[:8]}: an input is no "
                            "longer buffered there (claimed or aggregated meanwhile)"
                        )
                elif inputs:
                    c.execute(_MARK_AGGREGATED, {"b_ids": list(inputs)})
                c.execute(
                    _INSERT_CLUSTER_ROUND,
                    {
                        "run_id": run_id,
                        "aggregator_id": aggregator_id,
                        "round": round,
                        "model_id": model_id,
                        "num_updates": len(inputs),
                        "num_samples": num_samples,
                        "started": started,
                        "finished": finished,
                        "metrics": dict(metrics),
                        "strategy_state": scalars,
                        "state_blob": state_staged.digest if state_staged else None,
                        "status": status,
                    },
                )
        if duplicate:
            raise StoreConflict(f"aggregator {aggregator_id[:8]} delivered round {round} already")
        return model_id

    def federation_view(
        self, run_id: str, round: int, *, liveness: float, latest: bool = False
    ) -> FederationView:
        """The run's version, the global model of ``round`` (if it exists), the members
        (``live`` judged on ``liveness`` s of the database's clock) and the semi-global
        models of ``round`` (``latest``: each member's latest one, whatever its round),
        sorted by member name. Read in one transaction; nothing is written."""
        with self._begin() as c:
            now = self._now(c)
            version = c.execute(RUN_VERSION, {"b_run": run_id}).scalar()
            if version is None:
                raise StoreError(f"no run {run_id}")
            gid = c.execute(_GLOBAL_OF_ROUND, {"b_run": run_id, "b_round": round}).scalar()
            rows = c.execute(MEMBERS_OF_RUN, {"b_run": run_id}).mappings().all()
            semi = c.execute(
                _SEMI_LATEST if latest else _SEMI_OF_ROUND, {"b_run": run_id, "b_round": round}
            ).all()
        semis = sorted(
            (
                SemiGlobal(
                    model_id=r[0],
                    aggregator_id=r[1],
                    name=r[2] or "",
                    round=int(r[3]),
                    base_version=int(r[4] if r[4] is not None else int(r[3]) - 1),
                    num_samples=int(r[5]),
                    num_updates=int(r[6]),
                    metrics=dict(r[7] or {}),
                    finished=float(r[8]),
                    status=r[9],
                )
                for r in semi
            ),
            key=lambda g: (g.name, g.aggregator_id, g.round),
        )
        return FederationView(
            version=int(version),
            global_model_id=None if gid is None else str(gid),
            members=[member_of_row(r, now, liveness) for r in rows],
            semi_globals=semis,
        )

    # ------------------------------------------------------------------ the global model
    def commit_global(
        self,
        run_id: str,
        *,
        round: int,
        weights: Weights,
        semi_globals: Sequence[SemiGlobal | str],
        base_model_id: str | None,
        num_samples: int,
        num_updates: int,
        metrics: Metrics,
        aggregator_id: str,
        started: float,
        finished: float,
        extra: Weights | None = None,
    ) -> str | None:
        """Commit global model ``round`` synthesised from ``semi_globals`` (SemiGlobal
        records or model ids), stored like a standalone round's (kind ``cluster``,
        status ``global``, a ``rounds`` row, the run's version set to ``round``), with its
        lineage (``input``: the semi-globals, marked ``synthesized``; ``base``:
        ``base_model_id``), in one transaction.

        Race-safe: the run's version moves from ``round - 1`` to ``round`` only if it is
        still ``round - 1`` (and the ``rounds`` primary key backs it up), so of several
        members committing ``round`` exactly one wins.

        Returns:
            The global model's id, or None if another member committed ``round`` first
            (read the winner's with :meth:`federation_view`).

        Raises:
            StoreError: the run's version is below ``round - 1`` (rounds must follow each
                other), no such run, or the database failed.
        """
        ids = [g if isinstance(g, str) else g.model_id for g in semi_globals]
        staged = self._stage(weights)
        extra_staged = self._stage(extra) if extra else None
        model_id = uuid.uuid4().hex
        self.check_database()
        try:
            with self._begin() as c:
                self._write_inline(c, staged, extra_staged)
                # first: on SQLite it takes the write lock; on PostgreSQL it locks the run's
                # row and a concurrent committer waits, then finds the version moved on
                moved = c.execute(
                    _ADVANCE_RUN, {"b_run": run_id, "b_from": round - 1, "b_version": round}
                ).rowcount
                if moved != 1:
                    raise _Lost
                c.execute(
                    _INSERT_MODEL,
                    {
                        "id": model_id,
                        "run_id": run_id,
                        "kind": "cluster",
                        "producer": aggregator_id,
                        "round": round,
                        "base_version": round - 1,
                        "num_samples": num_samples,
                        "metrics": dict(metrics),
                        "blob": staged.digest,
                        "nbytes": staged.size,
                        "created": finished,
                        "status": "global",
                        "upload_id": None,
                        "extra_blob": extra_staged.digest if extra_staged else None,
                        "cluster": None,
                    },
                )
                rows = [{"child_id": model_id, "parent_id": i, "relation": "input"} for i in ids]
                if base_model_id is not None:
                    rows.append(
                        {"child_id": model_id, "parent_id": base_model_id, "relation": "base"}
                    )
                if rows:
                    c.execute(_INSERT_LINEAGE, rows)
                if ids:
                    c.execute(_MARK_SYNTH_ROUNDS, {"b_run": run_id, "b_ids": ids})
                    c.execute(_MARK_SYNTH_MODELS, {"b_ids": ids})
                c.execute(
                    _INSERT_ROUND,
                    {
                        "run_id": run_id,
                        "round": round,
                        "started": started,
                        "finished": finished,
                        "seconds": finished - started,
                        "model_id": model_id,
                        "num_updates": num_updates,
                        "num_samples": num_samples,
                        "metrics": dict(metrics),
                        "strategy_state": None,  # server state is per cluster
                        "state_blob": None,
                    },
                )
        except (_Lost, StoreConflict) as exc:
            with self._begin() as c:
                version = c.execute(RUN_VERSION, {"b_run": run_id}).scalar()
            if version is None:
                raise StoreError(f"no run {run_id}") from None
            if int(version) >= round:
                return None  # another member committed this version first
            if isinstance(exc, StoreConflict):
                raise
            raise StoreError(
                f"global version {round} cannot follow version {version} of the run"
            ) from None
        return model_id

    # ------------------------------------------------------------------ uploads that move
    def claim_uploads(
        self,
        run_id: str,
        aggregator_id: str,
        agent_ids: Sequence[str],
        *,
        round: int,
        liveness: float,
        older_only: bool = False,
    ) -> list[UploadRecord]:
        """Take over the buffered uploads of rounds ``<= round`` of the agents
        ``agent_ids`` (now connected to this member) that no live member holds (their
        holder is not live, or none is recorded): each is relabelled to ``round`` and held
        by ``aggregator_id`` from now on. Atomic per upload: of two members claiming the
        same upload exactly one gets it. Returns the claimed ones, oldest first.
        ``older_only``: only uploads of rounds before ``round`` (with sync synthesis, a
        dead member's uploads of the round in progress are delivered as its semi-global
        model instead: see :mod:`fedstack.aggregator.barrier`)."""
        if not agent_ids:
            return []
        claimed: list[UploadRecord] = []
        with self._begin() as c:
            now = self._now(c)
            live = {
                r["id"]
                for r in c.execute(MEMBERS_OF_RUN, {"b_run": run_id}).mappings()
                if member_of_row(r, now, liveness).live
            }
            live.add(aggregator_id)
            agents = list(dict.fromkeys(agent_ids))
            candidates = [
                row
                for i in range(0, len(agents), 500)
                for row in c.execute(
                    _CLAIMABLE_OLDER if older_only else _CLAIMABLE,
                    {
                        "b_run": run_id,
                        "b_round": round,
                        "b_agents": agents[i : i + 500],
                        "b_live": sorted(live),
                    },
                )
                .mappings()
                .all()
            ]
            candidates.sort(key=lambda r: r["created"])
            for row in candidates:
                holder = row["cluster"]
                params = {"b_id": row["id"], "b_new": aggregator_id, "b_round": round}
                if holder is None:
                    n = c.execute(_CLAIM_UNHELD, params).rowcount
                else:
                    n = c.execute(_CLAIM_FROM, {**params, "b_old": holder}).rowcount
                if n == 1:
                    claimed.append(upload_record({**row, "round": round, "cluster": aggregator_id}))
        return claimed

    def contributed_elsewhere(
        self, run_id: str, aggregator_id: str, agent_ids: Sequence[str], round: int
    ) -> set[str]:
        """Which of ``agent_ids`` already contributed to ``round`` through another member
        (an upload of that round buffered or aggregated anywhere but at
        ``aggregator_id``): agents that moved here after uploading. Read only."""
        agents = list(dict.fromkeys(agent_ids))
        out: set[str] = set()
        with self._begin() as c:
            for i in range(0, len(agents), 500):
                out.update(
                    c.execute(
                        _CONTRIBUTED,
                        {
                            "b_run": run_id,
                            "b_round": round,
                            "b_agents": agents[i : i + 500],
                            "b_agg": aggregator_id,
                        },
                    ).scalars()
                )
        return out

    def orphaned_rounds(
        self, run_id: str, round: int, *, liveness: float
    ) -> dict[str, list[UploadRecord]]:
        """The buffered uploads of ``round`` held by members that are not live and did not
        deliver ``round``, by member id: what a survivor delivers on their behalf (with
        :meth:`commit_semi_global`'s ``held_by``). Read only."""
        with self._begin() as c:
            now = self._now(c)
            dead = [
                r["id"]
                for r in c.execute(MEMBERS_OF_RUN, {"b_run": run_id}).mappings()
                if not member_of_row(r, now, liveness).live
            ]
            if not dead:
                return {}
            rows = c.execute(
                _ORPHANS, {"b_run": run_id, "b_round": round, "b_dead": dead}
            ).mappings()
            out: dict[str, list[UploadRecord]] = {}
            for row in rows:
                out.setdefault(row["cluster"], []).append(upload_record(row))
            if out:
                delivered = set(
                    c.execute(
                        select(_CR.c.aggregator_id).where(
                            _CR.c.run_id == run_id, _CR.c.round == round
                        )
                    ).scalars()
                )
                out = {k: v for k, v in out.items() if k not in delivered}
        return out

    def carry_uploads(
        self, run_id: str, model_ids: Sequence[str], *, round: int, drop: bool
    ) -> None:
        """The staleness policy for buffered uploads overtaken by a newer global model:
        ``drop=False`` relabels them to ``round`` (still buffered), ``drop=True`` marks
        them ``stale``. Uploads no longer buffered are left alone. One transaction."""
        ids = list(dict.fromkeys(model_ids))
        if not ids:
            return
        with self._begin() as c:
            for i in range(0, len(ids), 500):
                chunk = ids[i : i + 500]
                if drop:
                    c.execute(_DROP, {"b_run": run_id, "b_ids": chunk})
                else:
                    c.execute(_CARRY, {"b_run": run_id, "b_ids": chunk, "b_round": round})

    def cluster_resume(self, run_id: str, aggregator_id: str) -> ClusterResume:
        """What member ``aggregator_id`` needs to continue after a restart: its last
        cluster round's strategy state and extra arrays, the latest round it delivered
        whose global model does not exist yet, and the buffered uploads it holds."""
        with self._begin() as c:
            version = c.execute(RUN_VERSION, {"b_run": run_id}).scalar()
            if version is None:
                raise StoreError(f"no run {run_id}")
            args = {"b_run": run_id, "b_agg": aggregator_id}
            last = c.execute(_LAST_CLUSTER_ROUND, args).first()
            delivered = c.execute(_PENDING_DELIVERY, {**args, "b_version": int(version)}).scalar()
            rows = c.execute(_HELD, args).mappings().all()
        state: dict[str, Any] | None = None
        extra: Weights = {}
        if last is not None:
            state = dict(last[0] or {})
            if last[1]:
                state.update(self.get_blob(last[1]))
            if last[2]:
                extra = self.get_blob(last[2])
        return ClusterResume(
            strategy_state=state,
            extra=extra,
            delivered=None if delivered is None else int(delivered),
            buffered=[upload_record(r) for r in rows],
        )
