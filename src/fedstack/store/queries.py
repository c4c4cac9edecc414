"""The store's read-only views: runs, agents and credentials, models, lineage, rounds and
events, as plain dictionaries (what ``fedstack db``, the operator API and the simulator
read). A mixin of :class:`~fedstack.store.Store`; nothing here writes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import func, or_, select

from fedstack.errors import StoreError
from fedstack.security.credentials import fingerprint
from fedstack.store import schema as s


class Queries:
    """Read-only queries over the store's tables (see the module docstring)."""

    def _begin(self) -> Any:  # provided by Store: a transaction that raises StoreError
        raise NotImplementedError

    def list_runs(self) -> list[dict[str, Any]]:
        with self._begin() as c:
            rows = c.execute(select(s.runs).order_by(s.runs.c.created)).mappings().all()
        return [dict(r) for r in rows]

    def list_credentials(self) -> list[dict[str, Any]]:
        """Every agent's credential state (never the hash)."""
        with self._begin() as c:
            rows = c.execute(select(s.agents).order_by(s.agents.c.created)).mappings().all()
        return [
            {
                "name": r["name"],
                "role": r["role"],
                "agent_id": r["id"],
                "source": r["credential_source"],
                "credential": fingerprint(r["token_hash"]),
                "created": r["credential_created"],
                "revoked": r["revoked_at"] is not None,
                "revoked_at": r["revoked_at"],
                "last_seen": r["last_seen"],
                "last_address": r["last_address"],
            }
            for r in rows
        ]

    def credential_status(self, agent_ids: Sequence[str]) -> dict[str, tuple[str | None, bool]]:
        """``{agent id: (stored credential hash, revoked)}`` in one query (missing ids are
        absent): what an aggregator re-checks for its connected agents."""
        if not agent_ids:
            return {}
        with self._begin() as c:
            rows = c.execute(
                select(s.agents.c.id, s.agents.c.token_hash, s.agents.c.revoked_at).where(
                    s.agents.c.id.in_(list(agent_ids))
                )
            ).all()
        return {str(r[0]): (r[1], r[2] is not None) for r in rows}

    def list_agents(self) -> list[dict[str, Any]]:
        with self._begin() as c:
            rows = c.execute(select(s.agents).order_by(s.agents.c.created)).mappings().all()
        return [{k: v for k, v in r.items() if k != "token_hash"} for r in rows]

    def model_spec(self, run_id: str) -> dict[str, Any]:
        """Run ``run_id``'s model structure and what fixed it: ``{"run", "run_name",
        "version", "structure": [{"name", "dtype", "shape"}] (empty: no model yet),
        "source": "registered" | "agent" | None, "model_id": global model 0, "digest",
        "file", "agent", "time"}`` (``file`` for a registered model, ``agent`` for the
        first agent's).

        Raises:
            StoreError: no such run.
        """
        with self._begin() as c:
            run = c.execute(select(s.runs).where(s.runs.c.id == run_id)).mappings().first()
            if run is None:
                raise StoreError(f"no run {run_id}")
            event = (
                c.execute(
                    select(s.events)
                    .where(s.events.c.run_id == run_id, s.events.c.kind == "model_registered")
                    .order_by(s.events.c.id.desc())
                    .limit(1)
                )
                .mappings()
                .first()
            )
            first = (
                c.execute(
                    select(s.models, s.agents.c.name.label("agent"))
                    .outerjoin(s.agents, s.agents.c.id == s.models.c.producer)
                    .where(
                        s.models.c.run_id == run_id,
                        s.models.c.kind == "local",
                        s.models.c.status == "initial",
                    )
                    .order_by(s.models.c.created)
                    .limit(1)
                )
                .mappings()
                .first()
            )
            gm0 = (
                c.execute(
                    select(s.models.c.id, s.models.c.blob, s.models.c.created).where(
                        s.models.c.run_id == run_id,
                        s.models.c.kind == "cluster",
                        s.models.c.round == 0,
                    )
                )
                .mappings()
                .first()
            )
        out: dict[str, Any] = {
            "run": run["id"],
            "run_name": run["name"],
            "version": run["version"],
            "structure": [
                {"name": n, "dtype": d, "shape": list(sh)} for n, d, sh in run["structure"] or []
            ],
            "source": None,
            "model_id": None if gm0 is None else gm0["id"],
            "digest": None if gm0 is None else gm0["blob"] or None,
            "file": None,
            "agent": None,
            "time": None if gm0 is None else gm0["created"],
        }
        if event is not None:
            out.update(source="registered", file=(event["detail"] or {}).get("file"))
        elif first is not None:
            out.update(source="agent", agent=first["agent"] or first["producer"])
        return out

    def latest_run_id(self) -> str | None:
        with self._begin() as c:
            rid = c.execute(select(s.runs.c.id).order_by(s.runs.c.created.desc()).limit(1)).scalar()
        return None if rid is None else str(rid)

    def models(self, run_id: str | None = None, kind: str | None = None) -> list[dict[str, Any]]:
        q = select(s.models, s.agents.c.name.label("agent")).outerjoin(
            s.agents, s.agents.c.id == s.models.c.producer
        )
        if run_id is not None:
            q = q.where(s.models.c.run_id == run_id)
        if kind is not None:
            q = q.where(s.models.c.kind == kind)
        with self._begin() as c:
            rows = c.execute(q.order_by(s.models.c.round, s.models.c.created)).mappings().all()
        return [dict(r) for r in rows]

    def rounds(self, run_id: str, limit: int | None = None) -> list[dict[str, Any]]:
        """The rounds of ``run_id`` in order (only the last ``limit`` if given)."""
        q = select(s.rounds).where(s.rounds.c.run_id == run_id)
        if limit is not None:
            q = q.order_by(s.rounds.c.round.desc()).limit(limit)
        else:
            q = q.order_by(s.rounds.c.round)
        with self._begin() as c:
            rows = c.execute(q).mappings().all()
        out = [dict(r) for r in rows]
        return out[::-1] if limit is not None else out

    def parents(self, model_id: str) -> list[dict[str, Any]]:
        q = (
            select(s.lineage.c.relation, s.models, s.agents.c.name.label("agent"))
            .join(s.models, s.models.c.id == s.lineage.c.parent_id)
            .outerjoin(s.agents, s.agents.c.id == s.models.c.producer)
            .where(s.lineage.c.child_id == model_id)
            .order_by(s.models.c.created)
        )
        with self._begin() as c:
            return [dict(r) for r in c.execute(q).mappings().all()]

    def model(self, model_id: str) -> dict[str, Any] | None:
        q = (
            select(s.models, s.agents.c.name.label("agent"))
            .outerjoin(s.agents, s.agents.c.id == s.models.c.producer)
            .where(s.models.c.id == model_id)
        )
        with self._begin() as c:
            row = c.execute(q).mappings().first()
        return None if row is None else dict(row)

    def events(
        self, run_id: str | None = None, *, deployment: bool = False
    ) -> list[dict[str, Any]]:
        """Events of ``run_id`` (all without it); ``deployment`` adds the events that belong
        to no run (credentials issued and revoked)."""
        q = select(s.events)
        if run_id is not None:
            cond = s.events.c.run_id == run_id
            q = q.where(or_(cond, s.events.c.run_id.is_(None)) if deployment else cond)
        with self._begin() as c:
            return [dict(r) for r in c.execute(q.order_by(s.events.c.id)).mappings().all()]

    def aggregator_names(self) -> dict[str, str]:
        """``{member id: name}`` of every federation member of every run."""
        with self._begin() as c:
            rows = c.execute(select(s.aggregators.c.id, s.aggregators.c.name)).all()
        return {str(r[0]): str(r[1]) for r in rows}

    def semi_globals_delivered(self, run_id: str) -> dict[str, int]:
        """``{member id: semi-global models delivered}`` in ``run_id``."""
        cr = s.cluster_rounds
        with self._begin() as c:
            rows = c.execute(
                select(cr.c.aggregator_id, func.count())
                .where(cr.c.run_id == run_id)
                .group_by(cr.c.aggregator_id)
            ).all()
        return {str(r[0]): int(r[1]) for r in rows}

    def round_synthesis(self, run_id: str) -> dict[int, tuple[int, int]]:
        """``{round: (semi-global models, members)}`` the global model of each federated
        round of ``run_id`` was synthesised from (rounds of a standalone run: absent)."""
        parent = s.models.alias("parent")
        q = (
            select(s.rounds.c.round, func.count(), func.count(parent.c.producer.distinct()))
            .select_from(
                s.rounds.join(s.lineage, s.lineage.c.child_id == s.rounds.c.model_id).join(
                    parent, parent.c.id == s.lineage.c.parent_id
                )
            )
            .where(
                s.rounds.c.run_id == run_id,
                s.lineage.c.relation == "input",
                parent.c.kind == "semi-global",
            )
            .group_by(s.rounds.c.round)
        )
        with self._begin() as c:
            rows = c.execute(q).all()
        return {int(r[0]): (int(r[1]), int(r[2])) for r in rows}

    # ------------------------------------------------------------------ paged views
    # What the dashboard reads: every list one page at a time (LIMIT/OFFSET on an
    # indexed order), never a whole table.

    def count_runs(self) -> int:
        with self._begin() as c:
            return int(c.execute(select(func.count()).select_from(s.runs)).scalar() or 0)

    def runs_page(self, offset: int, limit: int) -> list[dict[str, Any]]:
        """Runs, newest first, ``limit`` from ``offset``, each with ``rounds`` (rounds
        committed) and ``last_round`` (the latest round's row, or None)."""
        with self._begin() as c:
            rows = [
                dict(r)
                for r in c.execute(
                    select(s.runs)
                    .order_by(s.runs.c.created.desc(), s.runs.c.id)
                    .offset(offset)
                    .limit(limit)
                )
                .mappings()
                .all()
            ]
            ids = [r["id"] for r in rows]
            counts: dict[str, tuple[int, int]] = {}
            if ids:
                counts = {
                    str(r[0]): (int(r[1]), int(r[2]))
                    for r in c.execute(
                        select(s.rounds.c.run_id, func.count(), func.max(s.rounds.c.round))
                        .where(s.rounds.c.run_id.in_(ids))
                        .group_by(s.rounds.c.run_id)
                    ).all()
                }
            last: dict[str, dict[str, Any]] = {}
            for rid, (_, top) in counts.items():
                row = (
                    c.execute(
                        select(s.rounds.c.round, s.rounds.c.finished, s.rounds.c.metrics).where(
                            s.rounds.c.run_id == rid, s.rounds.c.round == top
                        )
                    )
                    .mappings()
                    .first()
                )
                if row is not None:
                    last[rid] = dict(row)
        for r in rows:
            r["rounds"] = counts.get(r["id"], (0, 0))[0]
            r["last_round"] = last.get(r["id"])
        return rows

    def run(self, run_id: str) -> dict[str, Any] | None:
        """Run ``run_id``'s row (None: no such run)."""
        with self._begin() as c:
            row = c.execute(select(s.runs).where(s.runs.c.id == run_id)).mappings().first()
        return None if row is None else dict(row)

    def count_rounds(self, run_id: str) -> int:
        with self._begin() as c:
            return int(
                c.execute(
                    select(func.count()).select_from(s.rounds).where(s.rounds.c.run_id == run_id)
                ).scalar()
                or 0
            )

    def rounds_page(
        self, run_id: str, offset: int, limit: int, *, after: int | None = None
    ) -> list[dict[str, Any]]:
        """Rounds of ``run_id`` newest first, ``limit`` from ``offset`` (``after``: only
        rounds above it, oldest first: what a live view has not shown yet)."""
        cols = (
            s.rounds.c.round,
            s.rounds.c.started,
            s.rounds.c.finished,
            s.rounds.c.seconds,
            s.rounds.c.model_id,
            s.rounds.c.num_updates,
            s.rounds.c.num_samples,
            s.rounds.c.metrics,
        )
        q = select(*cols).where(s.rounds.c.run_id == run_id)
        if after is not None:
            q = q.where(s.rounds.c.round > after).order_by(s.rounds.c.round)
        else:
            q = q.order_by(s.rounds.c.round.desc())
        with self._begin() as c:
            return [dict(r) for r in c.execute(q.offset(offset).limit(limit)).mappings().all()]

    def round_row(self, run_id: str, round_: int) -> dict[str, Any] | None:
        """Round ``round_`` of ``run_id`` (None: not committed)."""
        with self._begin() as c:
            row = (
                c.execute(
                    select(s.rounds).where(s.rounds.c.run_id == run_id, s.rounds.c.round == round_)
                )
                .mappings()
                .first()
            )
        return None if row is None else dict(row)

    def round_series(self, run_id: str, points: int) -> list[dict[str, Any]]:
        """At most about ``points`` rounds of ``run_id`` spread evenly over the run (every
        k-th round, the latest always), oldest first: a chart's data, never every round
        of a long run."""
        with self._begin() as c:
            n, top = c.execute(
                select(func.count(), func.max(s.rounds.c.round)).where(s.rounds.c.run_id == run_id)
            ).one()
            if not n:
                return []
            step = max(1, -(-int(n) // max(1, points)))
            q = select(
                s.rounds.c.round, s.rounds.c.finished, s.rounds.c.seconds, s.rounds.c.metrics
            ).where(s.rounds.c.run_id == run_id)
            if step > 1:
                q = q.where(or_(s.rounds.c.round % step == 0, s.rounds.c.round == top))
            return [dict(r) for r in c.execute(q.order_by(s.rounds.c.round)).mappings().all()]

    def count_run_agents(self) -> int:
        """Agent credentials (every run's agents: credentials are deployment-wide)."""
        with self._begin() as c:
            return int(
                c.execute(
                    select(func.count()).select_from(s.agents).where(s.agents.c.role == "agent")
                ).scalar()
                or 0
            )

    def agents_page(
        self, run_id: str, offset: int, limit: int, *, window: int = 50
    ) -> list[dict[str, Any]]:
        """Agents by name, ``limit`` from ``offset``, each with its uploads in the last
        ``window`` rounds of ``run_id`` and the round under way (``uploads``: {status:
        count}; ``rounds``: the rounds its model was aggregated in, ascending;
        ``last_round``: the latest round it uploaded for), its latest refusals there
        (``refusals``: up to 5 ``{"time", "code", "message"}``, newest first) and
        ``presence``: its latest ``joined``/``left`` event in the run (None: neither).

        Bounded work whatever the store's size: the uploads come from an index range of
        the last ``window`` rounds (``window`` is also returned, with ``from_round``); the
        events from one pass each, never one query per agent."""
        a, m, e = s.agents, s.models, s.events
        with self._begin() as c:
            rows = [
                {k: v for k, v in r.items() if k != "token_hash"}
                for r in c.execute(
                    select(a)
                    .where(a.c.role == "agent")
                    .order_by(a.c.name)
                    .offset(offset)
                    .limit(limit)
                )
                .mappings()
                .all()
            ]
            ids = [r["id"] for r in rows]
            uploads: dict[str, dict[str, int]] = {}
            contributed: dict[str, list[int]] = {}
            last: dict[str, int] = {}
            refusals: dict[str, list[dict[str, Any]]] = {}
            presence: dict[str, str] = {}
            top = c.execute(
                select(func.max(s.rounds.c.round)).where(s.rounds.c.run_id == run_id)
            ).scalar()
            low = int(top or 0) - window
            if ids:
                for producer, rnd, status in c.execute(
                    select(m.c.producer, m.c.round, m.c.status).where(
                        m.c.run_id == run_id,
                        m.c.kind == "local",
                        m.c.round > low,
                        m.c.producer.in_(ids),
                    )
                ).all():
                    aid, rnd = str(producer), int(rnd)
                    counts = uploads.setdefault(aid, {})
                    counts[str(status)] = counts.get(str(status), 0) + 1
                    if status == "aggregated":
                        contributed.setdefault(aid, []).append(rnd)
                    if status != "initial":
                        last[aid] = max(last.get(aid, -1), rnd)
                ranked = (
                    select(
                        e.c.agent_id,
                        e.c.time,
                        e.c.detail,
                        func.row_number()
                        .over(partition_by=e.c.agent_id, order_by=e.c.id.desc())
                        .label("rank"),
                    )
                    .where(
                        e.c.agent_id.in_(ids),
                        e.c.kind == "refused",
                        or_(e.c.run_id == run_id, e.c.run_id.is_(None)),
                    )
                    .subquery()
                )
                for r in (
                    c.execute(
                        select(ranked)
                        .where(ranked.c.rank <= 5)
                        .order_by(ranked.c.agent_id, ranked.c.rank)
                    )
                    .mappings()
                    .all()
                ):
                    detail = r["detail"] if isinstance(r["detail"], dict) else {}
                    refusals.setdefault(str(r["agent_id"]), []).append(
                        {
                            "time": r["time"],
                            "code": str(detail.get("code", "")),
                            "message": str(detail.get("message", "")),
                        }
                    )
                latest = (
                    select(func.max(e.c.id))
                    .where(
                        e.c.agent_id.in_(ids),
                        e.c.run_id == run_id,
                        e.c.kind.in_(("joined", "left")),
                    )
                    .group_by(e.c.agent_id)
                )
                for aid, kind in c.execute(
                    select(e.c.agent_id, e.c.kind).where(e.c.id.in_(latest))
                ).all():
                    presence[str(aid)] = str(kind)
        for r in rows:
            r["uploads"] = uploads.get(r["id"], {})
            r["rounds"] = sorted(contributed.get(r["id"], []))
            r["last_round"] = last.get(r["id"])
            r["refusals"] = refusals.get(r["id"], [])
            r["presence"] = presence.get(r["id"])
            r["window"] = window
            r["from_round"] = max(1, low + 1)
        return rows

    def agent_by_name(self, name: str) -> dict[str, Any] | None:
        with self._begin() as c:
            row = c.execute(select(s.agents).where(s.agents.c.name == name)).mappings().first()
        return None if row is None else {k: v for k, v in row.items() if k != "token_hash"}

    def event_kinds(self) -> list[str]:
        """The distinct kinds of audit events."""
        with self._begin() as c:
            return sorted(str(k) for (k,) in c.execute(select(s.events.c.kind).distinct()).all())

    def _events_where(
        self, q: Any, kind: str | None, agent_id: str | None, run_id: str | None
    ) -> Any:
        e = s.events
        if kind:
            q = q.where(e.c.kind == kind)
        if agent_id is not None:
            q = q.where(e.c.agent_id == agent_id)
        if run_id:
            q = q.where(e.c.run_id == run_id)
        return q

    def count_events(
        self, *, kind: str | None = None, agent_id: str | None = None, run_id: str | None = None
    ) -> int:
        q = self._events_where(select(func.count()).select_from(s.events), kind, agent_id, run_id)
        with self._begin() as c:
            return int(c.execute(q).scalar() or 0)

    def events_page(
        self,
        offset: int,
        limit: int,
        *,
        kind: str | None = None,
        agent_id: str | None = None,
        run_id: str | None = None,
    ) -> list[dict[str, Any]]:
        """Audit events newest first, ``limit`` from ``offset``, filtered; each with the
        ``agent`` name of its ``agent_id``."""
        e = s.events
        q = select(e, s.agents.c.name.label("agent")).outerjoin(
            s.agents, s.agents.c.id == e.c.agent_id
        )
        q = self._events_where(q, kind, agent_id, run_id)
        with self._begin() as c:
            return [
                dict(r)
                for r in c.execute(q.order_by(e.c.id.desc()).offset(offset).limit(limit))
                .mappings()
                .all()
            ]

    def count_parents(self, model_id: str) -> int:
        with self._begin() as c:
            return int(
                c.execute(
                    select(func.count())
                    .select_from(s.lineage)
                    .where(s.lineage.c.child_id == model_id)
                ).scalar()
                or 0
            )

    def parents_page(self, model_id: str, offset: int, limit: int) -> list[dict[str, Any]]:
        """The models ``model_id`` was made from (``relation``: input | base), ``limit``
        from ``offset``, the base first, then by producer name; each with the name of its
        ``agent`` (an agent's models) and its ``aggregator`` (a federation member's)."""
        m = s.models
        q = (
            select(
                s.lineage.c.relation,
                m,
                s.agents.c.name.label("agent"),
                s.aggregators.c.name.label("aggregator"),
            )
            .join(m, m.c.id == s.lineage.c.parent_id)
            .outerjoin(s.agents, s.agents.c.id == m.c.producer)
            .outerjoin(s.aggregators, s.aggregators.c.id == m.c.producer)
            .where(s.lineage.c.child_id == model_id)
            .order_by(s.lineage.c.relation, m.c.created, m.c.id)
            .offset(offset)
            .limit(limit)
        )
        with self._begin() as c:
            return [dict(r) for r in c.execute(q).mappings().all()]

    def count_aggregators(self, run_id: str) -> int:
        with self._begin() as c:
            return int(
                c.execute(
                    select(func.count())
                    .select_from(s.aggregators)
                    .where(s.aggregators.c.run_id == run_id)
                ).scalar()
                or 0
            )

    def aggregators_page(self, run_id: str, offset: int, limit: int) -> list[dict[str, Any]]:
        """The federation members of ``run_id`` by name, ``limit`` from ``offset``."""
        g = s.aggregators
        with self._begin() as c:
            return [
                dict(r)
                for r in c.execute(
                    select(g)
                    .where(g.c.run_id == run_id)
                    .order_by(g.c.name)
                    .offset(offset)
                    .limit(limit)
                )
                .mappings()
                .all()
            ]

    def count_cluster_rounds(self, run_id: str) -> int:
        with self._begin() as c:
            return int(
                c.execute(
                    select(func.count())
                    .select_from(s.cluster_rounds)
                    .where(s.cluster_rounds.c.run_id == run_id)
                ).scalar()
                or 0
            )

    def cluster_rounds_page(self, run_id: str, offset: int, limit: int) -> list[dict[str, Any]]:
        """The semi-global models of ``run_id``'s members, newest round first, ``limit``
        from ``offset``, each with its member's ``aggregator`` name."""
        cr = s.cluster_rounds
        q = (
            select(cr, s.aggregators.c.name.label("aggregator"))
            .outerjoin(s.aggregators, s.aggregators.c.id == cr.c.aggregator_id)
            .where(cr.c.run_id == run_id)
            .order_by(cr.c.round.desc(), s.aggregators.c.name)
            .offset(offset)
            .limit(limit)
        )
        with self._begin() as c:
            return [dict(r) for r in c.execute(q).mappings().all()]
