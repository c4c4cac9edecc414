"""Members of a run's federation: joining, heartbeats and liveness on the database's clock.

A mixin of :class:`~fedstack.store.Store`, through :class:`~fedstack.store.federation.
Federation`. A member is one aggregator of a run's federation: a row of ``aggregators``,
stable per (run, name). A restarted aggregator of that name takes the row over (same id)
if it is not live; a live one is refused. Live = status ``live`` and a heartbeat at most
``liveness`` seconds old on the DATABASE's clock (:meth:`Members.db_now`: SQLite
``julianday('now')``, PostgreSQL ``now()``), never a host's.

A Store object remembers when it joined each member (``started``): a heartbeat of a member
whose row was taken over by another process since fails with
:class:`~fedstack.errors.StoreConflict`, and that aggregator must stop.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import Float, bindparam, cast, func, insert, literal_column, select, update

from fedstack.errors import StoreConflict, StoreError
from fedstack.store import schema as s

if TYPE_CHECKING:
    from sqlalchemy import Engine

__all__ = [
    "MAX_NAME",
    "MAX_URL",
    "MEMBERS_OF_RUN",
    "RUN_VERSION",
    "Member",
    "Members",
    "member_of_row",
]

MAX_NAME = 128
MAX_URL = 512


@dataclass(frozen=True, slots=True)
class Member:
    """One aggregator of a run's federation, as its row was when read."""

    id: str
    name: str
    url: str
    upstream: str | None
    started: float  # database clock, seconds since the epoch
    heartbeat: float  # database clock
    status: str  # "live" | "stopped"
    active_agents: int
    version: int  # the global version the member reported
    live: bool  # computed when read: status "live" and a recent heartbeat
    ready_round: int = -1  # the latest round whose cluster is complete (sync barrier)


# The database clock in seconds since the epoch, per dialect.
_CLOCK: dict[str, Any] = {
    "sqlite": (func.julianday(literal_column("'now'")) - 2440587.5) * 86400.0,
    "postgresql": cast(func.extract("epoch", func.now()), Float),
}

_NOW = {dialect: select(clock) for dialect, clock in _CLOCK.items()}

_A = s.aggregators

MEMBERS_OF_RUN = select(_A).where(_A.c.run_id == bindparam("b_run")).order_by(_A.c.name)
_MEMBER_BY_NAME = select(_A).where(
    _A.c.run_id == bindparam("b_run"), _A.c.name == bindparam("b_name")
)
RUN_VERSION = select(s.runs.c.version).where(s.runs.c.id == bindparam("b_run"))
_INSERT_MEMBER = insert(_A)
_HEARTBEAT_WHERE = (
    _A.c.id == bindparam("b_id"),
    _A.c.run_id == bindparam("b_run"),
    _A.c.status == "live",
)
_HEARTBEAT = {
    (dialect, guarded): update(_A)
    .where(*_HEARTBEAT_WHERE, *([_A.c.started == bindparam("b_started")] if guarded else []))
    .values(heartbeat=clock, active_agents=bindparam("b_agents"), version=bindparam("b_version"))
    for dialect, clock in _CLOCK.items()
    for guarded in (False, True)
}
"""Per dialect, and with the guard on the row's ``started`` (the session that joined)."""
_TAKE_OVER = (
    update(_A)
    .where(
        _A.c.id == bindparam("b_id"),
        _A.c.status == bindparam("b_old_status"),
        _A.c.heartbeat == bindparam("b_old_heartbeat"),
    )
    .values(
        url=bindparam("b_url"),
        upstream=bindparam("b_upstream"),
        started=bindparam("b_now"),
        heartbeat=bindparam("b_now"),
        status="live",
        active_agents=0,
        version=bindparam("b_version"),
        ready_round=-1,
    )
)
_MARK_READY = (
    update(_A)
    .where(_A.c.id == bindparam("b_id"), _A.c.run_id == bindparam("b_run"))
    .values(ready_round=bindparam("b_round"))
)


class Members:
    """The member methods of :class:`~fedstack.store.Store` (see the module docstring)."""

    if TYPE_CHECKING:
        engine: Engine
        _federation_sessions: dict[str, float]

    def _begin(self) -> Any:  # provided by Store: a transaction that raises StoreError
        raise NotImplementedError

    # ------------------------------------------------------------------ clock
    def _clock(self) -> Any:
        """The SQL expression of the database's clock (seconds since the epoch)."""
        clock = _CLOCK.get(self.engine.dialect.name)
        if clock is None:
            raise StoreError(
                f"the federation needs SQLite or PostgreSQL (not {self.engine.dialect.name})"
            )
        return clock

    def _now(self, c: Any) -> float:
        self._clock()  # a dialect without a clock is refused
        return float(c.execute(_NOW[self.engine.dialect.name]).scalar_one())

    def db_now(self) -> float:
        """The database's clock, in seconds since the epoch (what liveness is judged on)."""
        with self._begin() as c:
            return self._now(c)

    # ------------------------------------------------------------------ members
    def _sessions(self) -> dict[str, float]:
        try:
            return self._federation_sessions
        except AttributeError:
            self._federation_sessions = {}
            return self._federation_sessions

    def join_federation(
        self, run_id: str, *, name: str, url: str, upstream: str | None = None, liveness: float
    ) -> Member:
        """Join ``run_id``'s federation as member ``name`` reachable at ``url``.

        A new name gets a new row (a new id); a name whose row is not live (stopped, or no
        heartbeat for ``liveness`` seconds) is taken over: same id, so the member keeps its
        buffered uploads and cluster rounds. Returns the member as stored (live).

        Raises:
            StoreConflict: a live member has that name (or another aggregator joined under
                that name at the same moment).
            StoreError: no such run, a name or URL too long, or the database failed.
        """
        if not name or len(name) > MAX_NAME:
            raise StoreError(f"an aggregator name has 1 to {MAX_NAME} characters")
        if len(url) > MAX_URL or (upstream is not None and len(upstream) > MAX_URL):
            raise StoreError(f"an aggregator URL has at most {MAX_URL} characters")
        for _attempt in range(3):
            live: Member | None = None
            try:
                with self._begin() as c:
                    now = self._now(c)
                    version = c.execute(RUN_VERSION, {"b_run": run_id}).scalar()
                    if version is None:
                        raise StoreError(f"no run {run_id}")
                    row = (
                        c.execute(_MEMBER_BY_NAME, {"b_run": run_id, "b_name": name})
                        .mappings()
                        .first()
                    )
                    if row is None:
                        values = {
                            "id": uuid.uuid4().hex,
                            "run_id": run_id,
                            "name": name,
                            "url": url,
                            "upstream": upstream,
                            "started": now,
                            "heartbeat": now,
                            "status": "live",
                            "active_agents": 0,
                            "version": int(version),
                        }
                        c.execute(_INSERT_MEMBER, values)
                        member = member_of_row(values, now, liveness)
                    else:
                        old = member_of_row(row, now, liveness)
                        if old.live:
                            live = old
                        else:
                            taken = c.execute(
                                _TAKE_OVER,
                                {
                                    "b_id": old.id,
                                    "b_old_status": old.status,
                                    "b_old_heartbeat": old.heartbeat,
                                    "b_url": url,
                                    "b_upstream": upstream,
                                    "b_now": now,
                                    "b_version": int(version),
                                },
                            ).rowcount
                            if taken != 1:
                                continue  # another aggregator took it over or it revived
                            member = member_of_row(
                                {
                                    **row,
                                    "url": url,
                                    "upstream": upstream,
                                    "started": now,
                                    "heartbeat": now,
                                    "status": "live",
                                    "active_agents": 0,
                                    "version": int(version),
                                },
                                now,
                                liveness,
                            )
            except StoreConflict:
                continue  # a concurrent first join of that name: read it again
            if live is not None:
                raise StoreConflict(
                    f"an aggregator named {name!r} is already live in this run (last "
                    f"heartbeat {max(0.0, now - live.heartbeat):.1f} s ago, at "
                    f"{live.url!r}); give this one another name or stop that one"
                )
            self._sessions()[member.id] = member.started
            return member
        raise StoreConflict(f"another aggregator is joining this run as {name!r} right now")

    def heartbeat(
        self, run_id: str, aggregator_id: str, *, active_agents: int, version: int, liveness: float
    ) -> list[Member]:
        """Record that member ``aggregator_id`` is alive (on the database's clock) with
        ``active_agents`` connected agents at global ``version``; returns every member
        of the run, ``live`` judged on ``liveness`` seconds.

        Raises:
            StoreConflict: the member's row was taken over by another aggregator of that
                name (or the member left): this aggregator must stop.
        """
        self._clock()  # a dialect without a clock is refused
        started = self._sessions().get(aggregator_id)
        stmt = _HEARTBEAT[(self.engine.dialect.name, started is not None)]
        params = {
            "b_id": aggregator_id,
            "b_run": run_id,
            "b_started": started,
            "b_agents": active_agents,
            "b_version": version,
        }
        if started is None:
            del params["b_started"]
        with self._begin() as c:
            if c.execute(stmt, params).rowcount != 1:
                raise StoreConflict(
                    f"aggregator {aggregator_id[:8]} is no longer a member of the run "
                    "(its row was taken over by another aggregator of that name, or it left)"
                )
            now = self._now(c)
            rows = c.execute(MEMBERS_OF_RUN, {"b_run": run_id}).mappings().all()
        return [member_of_row(r, now, liveness) for r in rows]

    def mark_ready(self, run_id: str, aggregator_id: str, round: int) -> None:
        """Record that member ``aggregator_id``'s cluster is complete for ``round`` (the
        sync synthesis barrier: the other members wait for it before they deliver)."""
        with self._begin() as c:
            c.execute(_MARK_READY, {"b_id": aggregator_id, "b_run": run_id, "b_round": round})

    def members(self, run_id: str, *, liveness: float) -> list[Member]:
        """Every member of ``run_id``'s federation, by name (read only)."""
        with self._begin() as c:
            now = self._now(c)
            rows = c.execute(MEMBERS_OF_RUN, {"b_run": run_id}).mappings().all()
        return [member_of_row(r, now, liveness) for r in rows]

    def leave_federation(self, run_id: str, aggregator_id: str) -> None:
        """Mark the member stopped (a clean shutdown); a row taken over by another
        aggregator meanwhile is left alone."""
        started = self._sessions().get(aggregator_id)  # kept: a later heartbeat fails
        cond = [_A.c.id == aggregator_id, _A.c.run_id == run_id]
        if started is not None:
            cond.append(_A.c.started == started)
        with self._begin() as c:
            c.execute(
                update(_A)
                .where(*cond)
                .values(status="stopped", active_agents=0, heartbeat=self._clock())
            )


def member_of_row(row: Mapping[str, Any], now: float, liveness: float) -> Member:
    """The :class:`Member` of an ``aggregators`` row, ``live`` judged at ``now`` (the
    database clock) on ``liveness`` seconds."""
    heartbeat = float(row["heartbeat"])
    return Member(
        id=row["id"],
        name=row["name"],
        url=row["url"],
        upstream=row["upstream"],
        started=float(row["started"]),
        heartbeat=heartbeat,
        status=row["status"],
        active_agents=int(row["active_agents"]),
        version=int(row["version"]),
        live=row["status"] == "live" and now - heartbeat <= liveness,
        ready_round=int(row.get("ready_round", -1)),
    )
