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
