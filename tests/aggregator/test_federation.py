"""The horizontal federation (issue 12): members over one shared store, semi-global models
synthesised into the global model.

Real aggregators (each in its own thread and event loop, real sockets on 127.0.0.1), real
agents through the book's API, a real SQLite file or a real PostgreSQL server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedstack import Agent, AggregatorConfig, Store
from fedstack.aggregator.service import Aggregator
from fedstack.cli.main import main as cli_main
from fedstack.errors import ConfigError, StoreError
from fedstack.testing import aggregator_thread
from fedstack.testing.postgres import PostgresServer

pytestmark = pytest.mark.timeout(120)

HEARTBEAT = 0.1
LIVENESS = 2.0  # 20 heartbeats: room for a loaded machine


def wait_until(cond: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    """Poll ``cond`` every 10 ms; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"{what} not reached within {timeout} s"
        time.sleep(0.01)


def member_config(db: str, blobs: Path, name: str | None, **changes: Any) -> AggregatorConfig:
    """A member of run "fed" on ``db`` with short heartbeats (``changes`` override)."""
    values: dict[str, Any] = dict(
        auth="off",
        port=0,
        db=db,
        blob_dir=str(blobs),
        run_name="fed",
        name=name,
        threshold=1.0,
        rounds=1,
        federation_heartbeat=HEARTBEAT,
        liveness_timeout=LIVENESS,
        synthesis_timeout=15.0,
        finish_grace=0.5,
        round_timeout=60.0,
    )
    values.update(changes)
    return AggregatorConfig(**values)


@contextlib.contextmanager
def members(*configs: AggregatorConfig) -> Iterator[list[Aggregator]]:
    """Start each config's aggregator in its own thread; stop them all on exit."""
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(aggregator_thread(c)) for c in configs]


@contextlib.contextmanager
def agents(
    specs: list[tuple[str, str]], first: str | tuple[str, ...] | None = None
) -> Iterator[dict[str, Agent]]:
    """Agents ``(name, url)`` started through the book's API, in order; ``first`` (names)
    send the initial model ([0.0]) that may start the federation. Closed on exit."""
    made: dict[str, Agent] = {}
    try:
        for name, url in specs:
            a = Agent(url, name=name, max_backoff=0.5)
            if first is not None and name in ((first,) if isinstance(first, str) else first):
                a.send_initial_model(model(0.0))
            made[name] = a
        for a in made.values():
            a.start(timeout=30)
        yield made
    finally:
        for a in made.values():
            with contextlib.suppress(Exception):
                a.close(timeout=5)


def model(v: float) -> dict[str, np.ndarray[Any, Any]]:
    return {"w": np.full(1, v, np.float32)}


def live_members(db: str, run_id: str, blobs: Path) -> dict[str, tuple[bool, int, int]]:
    """name -> (live, active_agents, version) as the store has them."""
    store = Store(db, str(blobs))
    try:
        return {
            m.name: (m.live, m.active_agents, m.version)
            for m in store.members(run_id, liveness=LIVENESS)
        }
    finally:
        store.close()


def wait_heartbeats(
    db: str, run_id: str, blobs: Path, expected: dict[str, int], timeout: float = 20.0
) -> None:
    """Until every member of ``expected`` is live with that many agents in the store."""
    wait_until(
        lambda: all(
            live_members(db, run_id, blobs).get(n, (False, -1, 0))[:2] == (True, k)
            for n, k in expected.items()
        ),
        timeout,
        what=f"heartbeats {expected}",
    )


@pytest.fixture(params=["sqlite", "postgresql"])
def shared_db(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, Path]:
    """The federation's store: a SQLite file, or a fresh database on a real PostgreSQL
    server (skipped where none can be started); and the blob directory."""
    if request.param == "sqlite":
        return str(tmp_path / "fed.db"), tmp_path / "blobs"
    url: str = request.getfixturevalue("pg_url")
    return url, tmp_path / "blobs"


def two_clusters_one_round(db: str, blobs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Acceptance 1: A's agents upload [0] (5 samples each), B's [10] (15 samples each);
    threshold 1.0, one round: every agent gets [7.5]; lineage global <- 2 semi-global <- 4
    local."""
    with members(member_config(db, blobs, "a"), member_config(db, blobs, "b")) as (a, b):
        assert a.aggregator_id != b.aggregator_id and a.run_id == b.run_id
        specs = [("a1", a.url), ("a2", a.url), ("b1", b.url), ("b2", b.url)]
        with agents(specs, first=("a1", "b1")) as ag:  # b1's initial model: b races a
            wait_heartbeats(db, a.run_id, blobs, {"a": 2, "b": 2})
            for x in ag.values():
                np.testing.assert_array_equal(x.wait_for_global_model(20)["w"], [0.0])
            for name, x in ag.items():
                cluster_a = name.startswith("a")
                assert x.send_trained_model(
                    model(0.0 if cluster_a else 10.0), 5 if cluster_a else 15
                )
            for x in ag.values():
                got = x.wait_for_global_model(30)["w"]
                assert got.dtype == np.float32
                np.testing.assert_array_equal(got, [7.5])
            assert {x.version for x in ag.values()} == {1}
            assert set(a.membership.peers if a.membership else []) == {b.url}
            assert (a.statistics().name, a.statistics().peers) == ("a", (b.url,))
        run_id = a.run_id
    store = Store(db, str(blobs))
    try:
        rounds = store.rounds(run_id)
        assert [r["round"] for r in rounds] == [1]
        gid = rounds[0]["model_id"]
        np.testing.assert_array_equal(store.load_weights(gid)["w"], [7.5])
        metrics = rounds[0]["metrics"]
        assert metrics["synthesis_members"] == "a,b" and metrics["synthesis_seconds"] >= 0
        inputs = [p for p in store.parents(gid) if p["relation"] == "input"]
        assert len(inputs) == 2
        assert {p["kind"] for p in inputs} == {"semi-global"}
        locals_ = []
        for p in inputs:
            semi_inputs = [q for q in store.parents(p["id"]) if q["relation"] == "input"]
            assert len(semi_inputs) == 2 and {q["kind"] for q in semi_inputs} == {"local"}
            locals_ += [q["id"] for q in semi_inputs]
        assert len(set(locals_)) == 4
        by_cluster = {p["num_samples"] for p in inputs}
        assert by_cluster == {10, 30}
    finally:
        store.close()
    # the operator's view: fedstack db lineage (global <- 2 semi-global <- 4 local)
    capsys.readouterr()
    assert cli_main(["db", "lineage", "--db", db, "--blob-dir", str(blobs), "--json"]) == 0
    tree = json.loads(capsys.readouterr().out)
    assert tree["kind"] == "cluster" and tree["round"] == 1
    semis = [p for p in tree["parents"] if p["relation"] == "input"]
    assert sorted(p["aggregator"] for p in semis) == ["a", "b"]
    assert {p["kind"] for p in semis} == {"semi-global"}
    leaves = [q for p in semis for q in p["parents"] if q["relation"] == "input"]
    assert len(leaves) == 4 and {q["kind"] for q in leaves} == {"local"}
    assert sorted(q["agent"] for q in leaves) == ["a1", "a2", "b1", "b2"]


def test_two_clusters_sqlite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    two_clusters_one_round(str(tmp_path / "fed.db"), tmp_path / "blobs", capsys)


def test_two_clusters_postgresql(
    pg_url: str, postgres: PostgresServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    two_clusters_one_round(pg_url, tmp_path / "blobs", capsys)


def test_member_without_agents_follows(tmp_path: Path) -> None:
    """A member with no agents is not waited for; it follows the run's global versions."""
    db, blobs = str(tmp_path / "fed.db"), tmp_path / "blobs"
    with members(
        member_config(db, blobs, "a", rounds=2), member_config(db, blobs, "idle", rounds=2)
    ) as (a, idle):
        with agents([("a1", a.url)], first="a1") as ag:
            x = ag["a1"]
            x.wait_for_global_model(20)
            wait_heartbeats(db, a.run_id, blobs, {"a": 1, "idle": 0})
            for v in (2.0, 4.0):
                assert x.send_trained_model(model(v), 3)
                np.testing.assert_array_equal(x.wait_for_global_model(30)["w"], [v])
            wait_until(lambda: idle.state.version == 2, what="the idle member following")
            assert idle.global_weights is not None
            np.testing.assert_array_equal(idle.global_weights["w"], [4.0])
            assert idle.global_model_id == a.global_model_id
            assert idle.state.finished and idle.rounds_completed == 0


@pytest.mark.parametrize("bound,expected", [(1, 5.0), (0, 0.0)])
def test_async_synthesis_staleness_bound(
    shared_db: tuple[str, Path], tmp_path: Path, bound: int, expected: float
) -> None:
    """Async: global V is synthesised from each member's latest semi-global model of a
    round >= V - staleness_bound, right after a member delivers."""
    db, blobs = shared_db
    kw: dict[str, Any] = dict(rounds=3, synthesis="async", staleness_bound=bound)
    with members(member_config(db, blobs, "a", **kw), member_config(db, blobs, "b", **kw)) as (
        a,
        b,
    ):
        with agents([("a1", a.url), ("b1", b.url)], first="a1") as ag:
            a1, b1 = ag["a1"], ag["b1"]
            a1.wait_for_global_model(20)
            b1.wait_for_global_model(20)
            wait_heartbeats(db, a.run_id, blobs, {"a": 1, "b": 1})
            # b delivers round 1 first: nothing else exists, global 1 = b's semi-global
            assert b1.send_trained_model(model(10.0), 1)
            np.testing.assert_array_equal(b1.wait_for_global_model(20)["w"], [10.0])
            # a follows to version 1 (pushed to a1), a1 trains on it: a's round 2
            np.testing.assert_array_equal(a1.wait_for_global_model(20)["w"], [10.0])
            assert a1.version == 1
            assert a1.send_trained_model(model(0.0), 1)
            got = a1.wait_for_global_model(20)["w"]
            np.testing.assert_array_equal(got, [expected])  # bound 1: b's round 1 counts
            np.testing.assert_array_equal(b1.wait_for_global_model(20)["w"], [expected])
        store = Store(db, str(blobs))
        try:
            rounds = store.rounds(a.run_id)
            assert [r["round"] for r in rounds] == [1, 2]
            assert rounds[1]["metrics"]["synthesis_members"] == ("a,b" if bound else "a")
        finally:
            store.close()


def test_duplicate_live_name_is_refused(tmp_path: Path) -> None:
    """A second aggregator of a live member's name refuses to start (and frees its port)."""
    db, blobs = str(tmp_path / "fed.db"), tmp_path / "blobs"
    slow = dict(liveness_timeout=30.0)  # never taken for dead, however loaded the host

    async def second() -> Aggregator:
        agg = Aggregator(member_config(db, blobs, "a", **slow))
        await agg.start()
        return agg  # pragma: no cover - the start fails

    with members(member_config(db, blobs, "a", **slow)) as (first,):
        with pytest.raises(ConfigError, match="already live"):
            asyncio.run(second())
        assert live_members(db, first.run_id, blobs)["a"][0]


def test_restarted_member_rejoins_and_resumes(shared_db: tuple[str, Path], tmp_path: Path) -> None:
    """A member stopped and started again with the same name keeps its id, resumes its
    cluster's buffered upload, and the federation completes the next round with it."""
    db, blobs = shared_db
    port = free_port()
    cfg_a = member_config(db, blobs, "a", rounds=3)
    # min_agents 2: the resumed round waits for b's agents to reconnect (else its one
    # buffered upload would make a round on its own, as a standalone aggregator's does)
    cfg_b = member_config(db, blobs, "b", rounds=3, port=port, min_agents=2)
    with aggregator_thread(cfg_a) as a:
        with contextlib.ExitStack() as b_life:
            b = b_life.enter_context(aggregator_thread(cfg_b))
            b_id = b.aggregator_id
            specs = [("a1", a.url), ("a2", a.url), ("b1", b.url), ("b2", b.url)]
            with agents(specs, first="a1") as ag:
                wait_heartbeats(db, a.run_id, blobs, {"a": 2, "b": 2})
                for x in ag.values():
                    x.wait_for_global_model(20)
                for name, x in ag.items():
                    x.send_trained_model(
                        model(0.0 if name[0] == "a" else 10.0), 5 if name[0] == "a" else 15
                    )
                for x in ag.values():
                    np.testing.assert_array_equal(x.wait_for_global_model(30)["w"], [7.5])
                # round 2: b1's upload is stored (buffered, held by b), then b stops
                assert ag["b1"].send_trained_model(model(10.0), 15)
                ag["b1"].flush(20)
                b_life.close()
                wait_until(lambda: not live_members(db, a.run_id, blobs)["b"][0], what="b gone")
                with aggregator_thread(cfg_b) as b2:
                    assert b2.aggregator_id == b_id
                    assert b2.state.version == 1
                    assert set(b2.state.contributors) == {ag["b1"].agent_id}
                    # meanwhile b's agents may have failed over to a: they move back
                    for n in ("b1", "b2"):
                        if ag[n].url != b2.url:
                            ag[n].move_to(b2.url)
                    wait_heartbeats(db, a.run_id, blobs, {"a": 2, "b": 2})
                    assert ag["b2"].send_trained_model(model(10.0), 15)
                    for n in ("a1", "a2"):
                        assert ag[n].send_trained_model(model(0.0), 5)
                    for x in ag.values():
                        np.testing.assert_array_equal(x.wait_for_global_model(30)["w"], [7.5])
                    assert {x.version for x in ag.values()} == {2}
                    store = Store(db, str(blobs))
                    try:
                        semis = [
                            m for m in store.models(a.run_id, "semi-global") if m["round"] == 2
                        ]
                        assert sorted(m["num_samples"] for m in semis) == [10, 30]
                        assert {m["producer"] for m in semis} == {a.aggregator_id, b_id}
                    finally:
                        store.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.contextmanager
def member_process(
    db: str, blobs: Path, name: str, tmp_path: Path, *extra: str
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """``fedstack aggregator --name NAME`` in a subprocess: (process, its URL)."""
    ready = tmp_path / f"{name}.ready"
    args = [
        sys.executable,
        "-m",
        "fedstack",
        "aggregator",
        "--db",
        db,
        "--blob-dir",
        str(blobs),
        "--run-name",
        "fed",
        "--name",
        name,
        "--auth",
        "off",
        "--port",
        "0",
        "--federation-heartbeat",
        str(HEARTBEAT),
        "--liveness-timeout",
        str(LIVENESS),
        "--ready-file",
        str(ready),
        *extra,
    ]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: ready.exists() or proc.poll() is not None, what=f"{name} ready")
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        port = json.loads(ready.read_text())["port"]
        yield proc, f"ws://127.0.0.1:{port}"
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def test_upload_held_by_a_killed_member_is_counted_once(
    shared_db: tuple[str, Path], tmp_path: Path
) -> None:
    """b acknowledges b1's upload and is SIGKILLed (no leave); b1 reconnects to a; once b
    is no longer live a delivers b's round on its behalf (b's semi-global model, from the
    upload b held), so the upload counts once, in the round it was acknowledged for."""
    db, blobs = shared_db
    token = "token-of-agent-b1-" + "x" * 16
    with members(member_config(db, blobs, "a")) as (a,):
        with agents([("a1", a.url)], first="a1") as ag:
            a1 = ag["a1"]
            a1.wait_for_global_model(20)
            with member_process(db, blobs, "b", tmp_path, "--rounds", "1") as (proc, b_url):
                b1 = Agent(b_url, name="b1", token=token, max_backoff=0.5)
                try:
                    b1.start(timeout=30)
                    b1.wait_for_global_model(20)
                    assert b1.send_trained_model(model(10.0), 15)
                    b1.flush(20)  # acknowledged: stored, held by b
                    upload_id = b1.acknowledged[-1].upload_id
                    proc.send_signal(signal.SIGKILL)
                    proc.wait(10)
                finally:
                    b1.close(timeout=2)
            moved = Agent(a.url, name="b1", token=token, max_backoff=0.5)
            try:
                moved.start(timeout=30)
                assert moved.agent_id == b1.agent_id
                # a's round needs both of its agents: a1's upload and b1's claimed one
                assert a1.send_trained_model(model(0.0), 5)
                np.testing.assert_array_equal(a1.wait_for_global_model(30)["w"], [7.5])
            finally:
                moved.close(timeout=5)
        store = Store(db, str(blobs))
        try:
            copies = [m for m in store.models(a.run_id, "local") if m["upload_id"] == upload_id]
            assert len(copies) == 1 and copies[0]["status"] == "aggregated"
            gid = store.rounds(a.run_id)[0]["model_id"]
            semis = [p for p in store.parents(gid) if p["relation"] == "input"]
            held = {
                q["id"]: s
                for s in semis
                for q in store.parents(s["id"])
                if q["relation"] == "input"
            }
            assert len(held) == 2 and sum(s["num_samples"] for s in semis) == 20
            by_b = held[copies[0]["id"]]  # b's semi-global model, delivered by a
            assert by_b["producer"] != a.aggregator_id
            assert by_b["metrics"]["delivered_by"] == "a" and by_b["num_samples"] == 15
        finally:
            store.close()


def test_members_started_at_once_agree_on_the_first_model(
    shared_db: tuple[str, Path], tmp_path: Path
) -> None:
    """Both members get an initial model at the same moment: one records global model 0,
    the other adopts it (the run's version guard), and both serve the same model."""
    db, blobs = shared_db
    with members(member_config(db, blobs, "a"), member_config(db, blobs, "b")) as (a, b):
        made = [Agent(a.url, name="a1"), Agent(b.url, name="b1")]
        for x, v in zip(made, (1.0, 2.0), strict=True):
            x.send_initial_model(model(v))
        starters = [threading.Thread(target=x.start, kwargs={"timeout": 30}) for x in made]
        try:
            for t in starters:
                t.start()
            for t in starters:
                t.join(40)
            got = [x.wait_for_global_model(20)["w"][0] for x in made]
            assert got[0] == got[1] and got[0] in (1.0, 2.0)
            assert a.global_model_id == b.global_model_id
        finally:
            for x in made:
                x.close(timeout=5)
        store = Store(db, str(blobs))
        try:
            assert [m["round"] for m in store.models(a.run_id, "cluster")] == [0]
        finally:
            store.close()


def test_sync_rounds_wait_for_every_member_with_agents(tmp_path: Path) -> None:
    """Several rounds back to back (agents answer at once): every global model is
    synthesised from both members' semi-global models of its round."""
    db, blobs = str(tmp_path / "fed.db"), tmp_path / "blobs"
    n = 5
    with members(
        member_config(db, blobs, "a", rounds=n), member_config(db, blobs, "b", rounds=n)
    ) as (a, b):
        with agents([("a1", a.url), ("b1", b.url)], first="a1") as ag:
            a1, b1 = ag["a1"], ag["b1"]
            a1.wait_for_global_model(20)
            b1.wait_for_global_model(20)
            wait_heartbeats(db, a.run_id, blobs, {"a": 1, "b": 1})
            for r in range(1, n + 1):
                assert a1.send_trained_model(model(float(r)), 1)
                assert b1.send_trained_model(model(float(3 * r)), 3)
                for x in (a1, b1):
                    np.testing.assert_array_equal(x.wait_for_global_model(30)["w"], [2.5 * r])
        store = Store(db, str(blobs))
        try:
            rounds = store.rounds(a.run_id)
            assert [r["round"] for r in rounds] == list(range(1, n + 1))
            assert {r["metrics"]["synthesis_members"] for r in rounds} == {"a,b"}
            assert {r["num_samples"] for r in rounds} == {4}
        finally:
            store.close()


def test_restarted_member_waits_for_the_synthesis_of_its_delivered_round(tmp_path: Path) -> None:
    """b delivered round 1 and stopped before its synthesis; restarted, it does not start
    a new round but waits for round 1's global model, which it then serves."""
    db, blobs = str(tmp_path / "fed.db"), tmp_path / "blobs"
    cfg_b = member_config(db, blobs, "b", port=free_port(), rounds=2)
    with aggregator_thread(member_config(db, blobs, "a", rounds=2)) as a:
        with contextlib.ExitStack() as b_life:
            b = b_life.enter_context(aggregator_thread(cfg_b))
            specs = [("a1", a.url), ("a2", a.url), ("b1", b.url), ("b2", b.url)]
            with agents(specs, first="a1") as ag:
                wait_heartbeats(db, a.run_id, blobs, {"a": 2, "b": 2})
                for x in ag.values():
                    x.wait_for_global_model(20)
                for n in ("b1", "b2"):
                    assert ag[n].send_trained_model(model(10.0), 15)

                def delivered() -> bool:
                    store = Store(db, str(blobs))
                    try:
                        return bool(store.models(a.run_id, "semi-global"))
                    finally:
                        store.close()

                # b delivers once a is complete or after its synthesis_timeout (15 s)
                wait_until(delivered, timeout=60.0, what="b's semi-global model")
                b_life.close()  # b stops while it waits for a's semi-global model
                with aggregator_thread(cfg_b) as b2:
                    assert b2.state.version == 0 and b2.rounds_completed == 0
                    # b's agents come back: by themselves if b was back before their
                    # retry, else from a, where they failed over (a loaded machine)
                    for n in ("b1", "b2"):
                        ag[n].move_to(b2.url, timeout=30)
                    wait_heartbeats(db, a.run_id, blobs, {"a": 2, "b": 2}, timeout=30.0)
                    for n in ("a1", "a2"):
                        assert ag[n].send_trained_model(model(0.0), 5)
                    for x in ag.values():
                        np.testing.assert_array_equal(x.wait_for_global_model(30)["w"], [7.5])
                    assert b2.state.version == 1 and b2.rounds_completed == 1
                    semis = Store(db, str(blobs))
                    try:
                        assert len(semis.models(a.run_id, "semi-global")) == 2
                    finally:
                        semis.close()


def test_member_rechecks_its_uploads_after_a_heartbeat_gap(tmp_path: Path) -> None:
    """While a member cannot heartbeat (its database calls fail) others may take it for
    dead and claim an upload it counted; once it heartbeats again it rebuilds its round
    from the uploads it still holds, so nothing is counted twice."""
    db, blobs = str(tmp_path / "fed.db"), tmp_path / "blobs"
    with members(member_config(db, blobs, "a")) as (a,):
        with agents([("a1", a.url), ("a2", a.url)], first="a1") as ag:
            for x in ag.values():
                x.wait_for_global_model(20)
            assert ag["a1"].send_trained_model(model(1.0), 1)
            ag["a1"].flush(20)
            assert set(a.state.contributors) == {ag["a1"].agent_id}
            assert a.store is not None
            real = a.store.heartbeat
            broken = threading.Event()
            broken.set()

            def heartbeat(*args: Any, **kwargs: Any) -> Any:
                if broken.is_set():
                    raise StoreError("database unavailable (test)")
                return real(*args, **kwargs)

            a.store.heartbeat = heartbeat  # type: ignore[method-assign]
            other = Store(db, str(blobs))
            try:
                wait_until(lambda: not live_members(db, a.run_id, blobs)["a"][0], what="a dead")
                c = other.join_federation(a.run_id, name="c", url="ws://c:1", liveness=LIVENESS)
                agent_id = ag["a1"].agent_id
                assert agent_id is not None
                claimed = other.claim_uploads(
                    a.run_id, c.id, [agent_id], round=1, liveness=LIVENESS
                )
                assert len(claimed) == 1
                broken.clear()
                wait_until(lambda: not a.state.contributors, what="a's round rebuilt")
                assert live_members(db, a.run_id, blobs)["a"][0]
            finally:
                other.close()


def test_fedasync_runs_per_cluster_with_async_synthesis(tmp_path: Path) -> None:
    """A trigger strategy in a federation (async synthesis): every accepted update makes a
    cluster round; each member's step is synthesised with the others' latest."""
    db, blobs = str(tmp_path / "fed.db"), tmp_path / "blobs"
    kw: dict[str, Any] = dict(
        rounds=2, synthesis="async", strategy="fedasync", strategy_params={"alpha": 0.5}
    )
    with members(member_config(db, blobs, "a", **kw), member_config(db, blobs, "b", **kw)) as (
        a,
        b,
    ):
        with agents([("a1", a.url), ("b1", b.url)], first="a1") as ag:
            a1, b1 = ag["a1"], ag["b1"]
            a1.wait_for_global_model(20)
            b1.wait_for_global_model(20)
            assert a1.send_trained_model(model(4.0), 1)
            np.testing.assert_array_equal(a1.wait_for_global_model(20)["w"], [2.0])  # a alone
            np.testing.assert_array_equal(b1.wait_for_global_model(20)["w"], [2.0])  # followed
            assert b1.send_trained_model(model(8.0), 1)
            # b's step from 2: 5; synthesis with a's latest (round 1, within the bound): 3.5
            np.testing.assert_array_equal(b1.wait_for_global_model(20)["w"], [3.5])
            np.testing.assert_array_equal(a1.wait_for_global_model(20)["w"], [3.5])
