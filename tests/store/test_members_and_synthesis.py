"""The store side of the horizontal federation (issue 12), on SQLite and on a real
PostgreSQL server: members (join, take-over, refusal, liveness on the database's clock),
semi-global and global models with their lineage, the race for a global version, uploads
claimed from a dead member and carried into a new round, a member's resume state, the
migration of a 0001 store, and ``fedstack db aggregators`` / ``lineage`` / ``rounds``."""

from __future__ import annotations

import functools
import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import create_engine, text

from fedstack.cli.db import lineage_tree
from fedstack.cli.main import main as cli_main
from fedstack.errors import StoreConflict, StoreError
from fedstack.store import ClusterResume, Member, SemiGlobal, Store, migrations
from fedstack.testing.postgres import PostgresServer

LIVE = 5.0  # seconds: a liveness no test waits for
W = {"w": np.zeros(3, dtype=np.float32)}

Opener = Callable[[], Store]


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, str | None]]:
    """(database argument, blob directory) of a new, empty store on each backend; on
    PostgreSQL every blob lives in the database (what a multi-host federation uses)."""
    if request.param == "sqlite":
        yield str(tmp_path / "fed.db"), str(tmp_path / "fed.db.blobs")
    else:
        server: PostgresServer = request.getfixturevalue("postgres")
        yield server.create_database(), None


@pytest.fixture
def opener(backend: tuple[str, str | None]) -> Iterator[Opener]:
    """Opens another Store on the same database (another aggregator process's view)."""
    opened: list[Store] = []

    def open_store() -> Store:
        # SQLite: blobs as files; PostgreSQL: in the database
        st = Store(backend[0], backend[1])
        opened.append(st)
        return st

    yield open_store
    for st in opened:
        st.close()


def _run(st: Store) -> tuple[str, str]:
    """A run at global version 0: (run id, id of global model 0)."""
    run = st.open_run("fed", {}, "init")
    aid, _ = st.register_agent("seed", None, "x")
    gid = st.init_federation(
        run.id,
        agent_id=aid,
        structure=[("w", "float32", (3,))],
        init_weights=True,
        initial=W,
        global_weights=W,
        num_samples=1,
        metrics={},
        aggregator_id="init",
    )
    return run.id, gid


def _upload(
    st: Store, run_id: str, agent: str, value: float, n: int, *, round: int = 1, cluster: str
) -> str:
    aid, _ = st.register_agent(agent, None, "x")
    rec, created = st.add_uploads(
        run_id,
        [
            {
                "agent_id": aid,
                "upload_id": f"{agent}-{round}-{value}",
                "round": round,
                "base_version": round - 1,
                "num_samples": n,
                "metrics": {"loss": 1.0},
                "weights": {"w": np.full(3, value, dtype=np.float32)},
                "status": "buffered",
                "cluster": cluster,
            }
        ],
    )[0]
    assert created and rec.cluster == cluster
    return rec.model_id


def _semi(
    st: Store,
    run_id: str,
    member: str,
    inputs: list[str],
    value: float,
    n: int,
    base: str | None,
    round: int = 1,
) -> str:
    return st.commit_semi_global(
        run_id,
        aggregator_id=member,
        round=round,
        weights={"w": np.full(3, value, dtype=np.float32)},
        inputs=inputs,
        base_model_id=base,
        num_samples=n,
        metrics={"mean_loss": 1.0},
        started=time.time(),
        finished=time.time(),
        strategy_state={"step": round, "momentum": np.full(3, value)},
        extra={"c": np.ones(2, dtype=np.float32)},
    )


def _global(st: Store, run_id: str, round: int, semis: list[SemiGlobal], base: str) -> str | None:
    total = sum(g.num_samples for g in semis)
    weights = {"w": np.zeros(3, dtype=np.float64)}
    for g in semis:
        weights["w"] += g.num_samples / total * st.load_weights(g.model_id)["w"]
    return st.commit_global(
        run_id,
        round=round,
        weights={"w": weights["w"].astype(np.float32)},
        semi_globals=semis,
        base_model_id=base,
        num_samples=total,
        num_updates=sum(g.num_updates for g in semis),
        metrics={"synthesized_from": len(semis)},
        aggregator_id=semis[0].aggregator_id,
        started=time.time(),
        finished=time.time(),
    )


def _race(calls: list[Callable[[], Any]]) -> list[Any]:
    """Run ``calls`` on one thread each, released together; their results (or the
    exceptions they raised), in order."""
    barrier = threading.Barrier(len(calls))
    results: list[Any] = [None] * len(calls)

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = calls[i]()
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads)
    return results


# ---------------------------------------------------------------------- members
def test_join_refuses_a_live_name_and_takes_over_a_dead_one(opener: Opener) -> None:
    first, second = opener(), opener()
    run_id, _ = _run(first)
    a = first.join_federation(run_id, name="A", url="ws://h1:1", liveness=LIVE)
    assert a.live and a.status == "live" and a.version == 0 and a.name == "A"
    b = second.join_federation(
        run_id, name="B", url="ws://h2:1", upstream="ws://up:1", liveness=LIVE
    )
    assert b.id != a.id and b.upstream == "ws://up:1"
    with pytest.raises(StoreConflict, match="already live"):
        second.join_federation(run_id, name="A", url="ws://h3:1", liveness=LIVE)
    # A stops: its name is free again, with the same id (its uploads and rounds stay its)
    first.leave_federation(run_id, a.id)
    again = second.join_federation(run_id, name="A", url="ws://h3:1", liveness=LIVE)
    assert again.id == a.id and again.url == "ws://h3:1" and again.live
    assert again.started >= a.started
    # the old process comes back: its row was taken over, it must stop
    with pytest.raises(StoreConflict, match="no longer a member"):
        first.heartbeat(run_id, a.id, active_agents=1, version=0, liveness=LIVE)
    second.heartbeat(run_id, a.id, active_agents=1, version=0, liveness=LIVE)
    # a member that stopped heartbeating is taken over after the liveness timeout
    c = first.join_federation(run_id, name="C", url="ws://h4:1", liveness=1.0)
    with pytest.raises(StoreConflict):
        second.join_federation(run_id, name="C", url="ws://h5:1", liveness=1.0)
    time.sleep(1.1)
    assert second.join_federation(run_id, name="C", url="ws://h5:1", liveness=1.0).id == c.id
    with pytest.raises(StoreError, match="name"):
        first.join_federation(run_id, name="", url="ws://x:1", liveness=LIVE)
    with pytest.raises(StoreError, match="no run"):
        first.join_federation("0" * 32, name="Z", url="ws://x:1", liveness=LIVE)


def test_members_starting_together_open_one_run(opener: Opener) -> None:
    stores = [opener() for _ in range(4)]
    for trial in range(3):
        runs = _race([functools.partial(st.open_run, f"run-{trial}", {}, "agg") for st in stores])
        assert len({r.id for r in runs}) == 1, runs
        assert sum(not r.resumed for r in runs) == 1
    assert len(stores[0].list_runs()) == 3


def test_concurrent_joins_of_one_name_admit_exactly_one(opener: Opener) -> None:
    stores = [opener() for _ in range(4)]
    run_id, _ = _run(stores[0])
    for trial in range(3):
        name = f"racer-{trial}"
        results = _race(
            [
                functools.partial(
                    st.join_federation, run_id, name=name, url="ws://h:1", liveness=LIVE
                )
                for st in stores
            ]
        )
        joined = [r for r in results if isinstance(r, Member)]
        assert len(joined) == 1, results
        assert all(isinstance(r, StoreConflict) for r in results if r not in joined)


def test_heartbeat_liveness_is_judged_on_the_database_clock(opener: Opener) -> None:
    st = opener()
    run_id, _ = _run(st)
    a = st.join_federation(run_id, name="A", url="ws://a:1", liveness=0.4)
    b = st.join_federation(run_id, name="B", url="ws://b:1", liveness=0.4)
    now = st.db_now()
    assert abs(now - time.time()) < 5 and a.heartbeat <= now
    time.sleep(0.6)
    members = st.heartbeat(run_id, a.id, active_agents=3, version=0, liveness=0.4)
    assert [m.name for m in members] == ["A", "B"]
    ma, mb = members
    assert ma.live and ma.active_agents == 3 and ma.heartbeat > a.heartbeat
    assert ma.heartbeat <= st.db_now() + 1e-3  # written by the database's clock
    assert not mb.live and mb.status == "live"  # silent for longer than the liveness
    assert st.members(run_id, liveness=LIVE)[1].live  # ... but not for 5 s
    # another Store object (it did not join A) may heartbeat A too
    (other_a, _) = opener().heartbeat(run_id, a.id, active_agents=4, version=0, liveness=0.4)
    assert other_a.active_agents == 4 and other_a.heartbeat >= ma.heartbeat
    st.heartbeat(run_id, b.id, active_agents=0, version=0, liveness=0.4)
    st.leave_federation(run_id, b.id)
    view = st.federation_view(run_id, 1, liveness=LIVE)
    assert [(m.name, m.live, m.status) for m in view.members] == [
        ("A", True, "live"),
        ("B", False, "stopped"),
    ]


# ---------------------------------------------------------------------- synthesis
def _acceptance(st: Store) -> tuple[str, str, str]:
    """Two members; A's two agents upload [0] x 5 samples, B's [10] x 15; each member
    stores its semi-global model; A synthesises. Returns (run id, global id, A's id)."""
    run_id, g0 = _run(st)
    a = st.join_federation(run_id, name="A", url="ws://a:1", liveness=LIVE)
    b = st.join_federation(run_id, name="B", url="ws://b:1", liveness=LIVE)
    ins_a = [_upload(st, run_id, f"a{i}", 0.0, 5, cluster=a.id) for i in range(2)]
    ins_b = [_upload(st, run_id, f"b{i}", 10.0, 15, cluster=b.id) for i in range(2)]
    _semi(st, run_id, b.id, ins_b, 10.0, 30, g0)
    view = st.federation_view(run_id, 1, liveness=LIVE)
    assert view.version == 0 and view.global_model_id is None
    assert [g.name for g in view.semi_globals] == ["B"]
    _semi(st, run_id, a.id, ins_a, 0.0, 10, g0)
    view = st.federation_view(run_id, 1, liveness=LIVE)
    assert [
        (g.name, g.num_samples, g.num_updates, g.base_version, g.status) for g in view.semi_globals
    ] == [
        ("A", 10, 2, 0, "delivered"),
        ("B", 30, 2, 0, "delivered"),
    ]
    gid = _global(st, run_id, 1, view.semi_globals, g0)
    assert gid is not None
    return run_id, gid, a.id


def test_global_from_two_semi_globals_records_the_lineage(opener: Opener) -> None:
    st = opener()
    run_id, gid, a_id = _acceptance(st)
    np.testing.assert_array_equal(st.load_weights(gid)["w"], np.full(3, 7.5, dtype=np.float32))
    view = st.federation_view(run_id, 1, liveness=LIVE)
    assert view.version == 1 and view.global_model_id == gid
    assert {g.status for g in view.semi_globals} == {"synthesized"}
    assert st.get_run(run_id).version == 1
    (r1,) = [r for r in st.rounds(run_id) if r["round"] == 1]
    assert (r1["model_id"], r1["num_updates"], r1["num_samples"]) == (gid, 4, 40)
    tree = lineage_tree(st, gid, 2)
    assert tree["kind"] == "cluster" and tree["status"] == "global" and tree["aggregator"] == "A"
    semis = [p for p in tree["parents"] if p["relation"] == "input"]
    assert sorted((p["kind"], p["aggregator"], p["num_samples"]) for p in semis) == [
        ("semi-global", "A", 10),
        ("semi-global", "B", 30),
    ]
    locals_ = [q for p in semis for q in p["parents"] if q["relation"] == "input"]
    assert len(locals_) == 4 and {q["kind"] for q in locals_} == {"local"}
    assert {q["status"] for q in locals_} == {"aggregated"}
    assert [p["round"] for p in tree["parents"] if p["relation"] == "base"] == [0]
    # standalone readers keep working: the run resumes at version 1, nothing buffered
    res = st.resume_state(run_id)
    assert res.version == 1 and res.global_model_id == gid and res.buffered == []
    # a semi-global delivered after its round's global exists is "late"
    late = _semi(st, run_id, "0" * 32, [], 5.0, 1, gid)
    assert st.model(late)["status"] == "late"  # type: ignore[index]
    with pytest.raises(StoreConflict, match="delivered round 1 already"):
        _semi(st, run_id, a_id, [], 0.0, 10, gid)


def test_commit_global_refuses_a_gap_and_an_unknown_run(opener: Opener) -> None:
    st = opener()
    run_id, g0 = _run(st)
    a = st.join_federation(run_id, name="A", url="ws://a:1", liveness=LIVE)
    _semi(st, run_id, a.id, [], 1.0, 1, g0, round=3)
    semis = st.federation_view(run_id, 3, liveness=LIVE).semi_globals
    with pytest.raises(StoreError, match="cannot follow version 0"):
        _global(st, run_id, 3, semis, g0)
    with pytest.raises(StoreError, match="no run"):
        st.commit_global(
            "0" * 32,
            round=1,
            weights=W,
            semi_globals=[],
            base_model_id=None,
            num_samples=0,
            num_updates=0,
            metrics={},
            aggregator_id=a.id,
            started=0.0,
            finished=0.0,
        )
    assert st.get_run(run_id).version == 0


def test_commit_global_race_has_exactly_one_winner(opener: Opener) -> None:
    stores = [opener(), opener()]
    run_id, base = _run(stores[0])
    members = [
        st.join_federation(run_id, name=n, url=f"ws://{n}:1", liveness=LIVE)
        for st, n in zip(stores, "AB", strict=True)
    ]
    for rnd in range(1, 7):
        for st, m in zip(stores, members, strict=True):
            _semi(st, run_id, m.id, [], float(rnd), 5, base, round=rnd)
        semis = stores[0].federation_view(run_id, rnd, liveness=LIVE).semi_globals
        results = _race([functools.partial(_global, st, run_id, rnd, semis, base) for st in stores])
        winners = [r for r in results if isinstance(r, str)]
        assert len(results) == 2 and len(winners) == 1 and None in results, results
        view = stores[1].federation_view(run_id, rnd, liveness=LIVE)
        assert view.version == rnd and view.global_model_id == winners[0]
        base = winners[0]
    assert [r["round"] for r in stores[0].rounds(run_id)] == list(range(7))[1:]
    cluster = [m for m in stores[0].models(run_id, "cluster") if m["round"] > 0]
    assert sorted(m["round"] for m in cluster) == list(range(1, 7))  # no version twice


# ---------------------------------------------------------------------- uploads that move
def test_claim_uploads_of_a_dead_member_once(opener: Opener) -> None:
    first, second, third = opener(), opener(), opener()
    run_id, _ = _run(first)
    dead = first.join_federation(run_id, name="dead", url="ws://d:1", liveness=LIVE)
    live = first.join_federation(run_id, name="live", url="ws://l:1", liveness=LIVE)
    b = second.join_federation(run_id, name="B", url="ws://b:1", liveness=LIVE)
    c = third.join_federation(run_id, name="C", url="ws://c:1", liveness=LIVE)
    agents = [f"m{i}" for i in range(8)]
    held = {_upload(first, run_id, a, 1.0, 2, round=2, cluster=dead.id) for a in agents}
    later = _upload(first, run_id, "m0", 2.0, 2, round=4, cluster=dead.id)  # after round 3
    kept = _upload(first, run_id, "m1", 3.0, 2, round=2, cluster=live.id)  # holder is live
    ids = {first.find_upload(f"{a}-2-1.0").agent_id for a in agents}  # type: ignore[union-attr]
    assert first.claim_uploads(run_id, b.id, list(ids), round=3, liveness=LIVE) == []
    first.leave_federation(run_id, dead.id)
    many = [f"{i:032x}" for i in range(300)] + list(ids) + [f"{i:032x}" for i in range(300, 900)]
    for _ in range(3):  # the same uploads, claimed by two members at once
        results = _race(
            [
                functools.partial(st.claim_uploads, run_id, m.id, many, round=3, liveness=LIVE)
                for st, m in ((second, b), (third, c))
            ]
        )
        got = {b.id: results[0], c.id: results[1]}
        claimed = [r.model_id for recs in got.values() for r in recs]
        assert len(claimed) == len(set(claimed))
        if claimed:
            assert set(claimed) == held
            for me, recs in got.items():
                assert all(r.cluster == me and r.round == 3 for r in recs)
            break
    else:
        pytest.fail("nothing was claimed")
    models = {m["id"]: m for m in first.models(run_id, "local")}
    assert models[later]["cluster"] == dead.id and models[later]["round"] == 4
    assert models[kept]["cluster"] == live.id
    assert all(models[i]["status"] == "buffered" and models[i]["round"] == 3 for i in held)
    # a claimed upload is the claimer's: a later claim takes nothing
    assert second.claim_uploads(run_id, b.id, list(ids), round=3, liveness=LIVE) == []
    assert third.claim_uploads(run_id, c.id, list(ids), round=3, liveness=LIVE) == []
    assert second.claim_uploads(run_id, b.id, [], round=3, liveness=LIVE) == []


def test_carry_uploads_relabels_or_drops_buffered_ones(opener: Opener) -> None:
    st = opener()
    run_id, _ = _run(st)
    a = st.join_federation(run_id, name="A", url="ws://a:1", liveness=LIVE)
    keep = _upload(st, run_id, "k", 1.0, 1, round=1, cluster=a.id)
    drop = _upload(st, run_id, "d", 1.0, 1, round=1, cluster=a.id)
    used = _upload(st, run_id, "u", 1.0, 1, round=1, cluster=a.id)
    _semi(st, run_id, a.id, [used], 1.0, 1, None)  # marks it aggregated
    st.carry_uploads(run_id, [keep, used], round=2, drop=False)
    st.carry_uploads(run_id, [drop, used], round=2, drop=True)
    st.carry_uploads(run_id, [], round=2, drop=True)
    models = {m["id"]: m for m in st.models(run_id, "local")}
    assert (models[keep]["status"], models[keep]["round"]) == ("buffered", 2)
    assert (models[drop]["status"], models[drop]["round"]) == ("stale", 1)
    assert (models[used]["status"], models[used]["round"]) == ("aggregated", 1)


def test_cluster_resume(opener: Opener) -> None:
    st = opener()
    run_id, g0 = _run(st)
    a = st.join_federation(run_id, name="A", url="ws://a:1", liveness=LIVE)
    b = st.join_federation(run_id, name="B", url="ws://b:1", liveness=LIVE)
    assert st.cluster_resume(run_id, a.id) == ClusterResume(None, {}, None, [])
    up = _upload(st, run_id, "x", 4.0, 2, round=1, cluster=a.id)
    _semi(st, run_id, a.id, [up], 4.0, 2, g0)
    waiting = _upload(st, run_id, "y", 5.0, 2, round=2, cluster=a.id)
    _upload(st, run_id, "z", 5.0, 2, round=2, cluster=b.id)
    res = st.cluster_resume(run_id, a.id)
    assert res.delivered == 1 and [r.model_id for r in res.buffered] == [waiting]
    assert res.strategy_state is not None and res.strategy_state["step"] == 1
    np.testing.assert_array_equal(res.strategy_state["momentum"], np.full(3, 4.0))
    np.testing.assert_array_equal(res.extra["c"], np.ones(2, dtype=np.float32))
    _global(st, run_id, 1, st.federation_view(run_id, 1, liveness=LIVE).semi_globals, g0)
    assert st.cluster_resume(run_id, a.id).delivered is None  # synthesised
    assert [r.cluster for r in st.cluster_resume(run_id, b.id).buffered] == [b.id]


# ---------------------------------------------------------------------- migration
def test_a_0001_store_is_upgraded_to_0002(backend: tuple[str, str | None]) -> None:
    db, blobs = backend
    url = f"sqlite:///{db}" if "://" not in db else db
    engine = create_engine(url)
    try:
        migrations.upgrade(engine, "0001")
        assert migrations.current(engine) == "0001"
        with engine.begin() as c:
            c.execute(
                text(
                    "INSERT INTO runs (id, name, created, status, config, version, aggregator_id)"
                    " VALUES ('r1', 'old', 1.0, 'running', '{}', 0, 'agg')"
                )
            )
            c.execute(
                text(
                    "INSERT INTO models (id, run_id, kind, producer, round, base_version,"
                    " num_samples, metrics, blob, nbytes, created, status, upload_id)"
                    " VALUES ('m1', 'r1', 'local', 'agent', 1, 0, 3, '{}', '', 0, 1.0,"
                    " 'buffered', 'u1')"
                )
            )
    finally:
        engine.dispose()
    st = Store(db, blobs)
    try:
        assert st.schema_from == "0001" and migrations.current(st.engine) == migrations.HEAD
        from alembic.autogenerate import compare_metadata
        from alembic.runtime.migration import MigrationContext

        from fedstack.store import schema as s

        with st.engine.connect() as c:
            assert compare_metadata(MigrationContext.configure(c), s.metadata) == []
        (rec,) = st.resume_state("r1").buffered
        assert rec.upload_id == "u1" and rec.cluster is None
        m = st.join_federation("r1", name="A", url="ws://a:1", liveness=LIVE)
        (claimed,) = st.claim_uploads("r1", m.id, ["agent"], round=1, liveness=LIVE)
        assert claimed.model_id == "m1" and claimed.cluster == m.id
    finally:
        st.close()


# ---------------------------------------------------------------------- fedstack db
def test_db_aggregators_lineage_and_rounds(
    opener: Opener, backend: tuple[str, str | None], capsys: pytest.CaptureFixture[str]
) -> None:
    st = opener()
    run_id, gid, a_id = _acceptance(st)
    evil = st.join_federation(run_id, name="E\x1b[31mvil\n", url="ws://e\x07:1", liveness=LIVE)
    st.leave_federation(run_id, evil.id)
    st.heartbeat(run_id, a_id, active_agents=2, version=1, liveness=LIVE)
    db = ["--db", backend[0], *(["--blob-dir", backend[1]] if backend[1] else [])]

    assert cli_main(["db", "aggregators", *db, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    by_name = {r["name"]: r for r in rows}
    assert set(by_name) == {"A", "B", "E\x1b[31mvil\n"}
    assert by_name["A"]["state"] == "live" and by_name["A"]["active_agents"] == 2
    assert by_name["A"]["version"] == 1 and by_name["A"]["semi_globals"] == 1
    assert by_name["A"]["id"] == a_id and 0 <= by_name["A"]["heartbeat_age"] < 5
    assert by_name["E\x1b[31mvil\n"]["state"] == "stopped"

    assert cli_main(["db", "aggregators", *db]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "E\\x1b[31mvil\\n" in out
    assert a_id[:8] in out and a_id not in out and "ws://a:1" in out and "stopped" in out

    assert cli_main(["db", "lineage", *db]) == 0
    out = capsys.readouterr().out
    assert f"cluster {gid[:8]} round 1 by aggregator A (n=40, global)" in out
    assert out.count("semi-global") == 2
    assert "of aggregator A (n=10, synthesized)" in out
    assert "of aggregator B (n=30, synthesized)" in out
    assert len(re.findall(r"\[input\] local \w{8} round 1 by [ab]\d \(n=(?:5|15),", out)) == 4

    assert cli_main(["db", "lineage", *db, "--json"]) == 0
    tree = json.loads(capsys.readouterr().out)
    assert len([p for p in tree["parents"] if p["kind"] == "semi-global"]) == 2

    assert cli_main(["db", "rounds", *db, "--json"]) == 0
    rounds = json.loads(capsys.readouterr().out)
    assert [(r["round"], r["semi_globals"], r["aggregators"]) for r in rounds] == [(1, 2, 2)]
    assert cli_main(["db", "models", *db, "--kind", "semi-global", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 2
