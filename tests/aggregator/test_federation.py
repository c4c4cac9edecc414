"""The horizontal federation (issue 12): members over one shared store, semi-global models
synthesised into the global model.

Real aggregators (each in its own thread and event loop, real sockets on 127.0.0.1), real
agents through the book's API, a real SQLite file or a real PostgreSQL server.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedstack import Agent, AggregatorConfig, Store
from fedstack.aggregator.service import Aggregator
from fedstack.testing import aggregator_thread
from fedstack.testing.postgres import PostgresServer

pytestmark = pytest.mark.timeout(120)

HEARTBEAT = 0.1
LIVENESS = 1.0


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
def agents(specs: list[tuple[str, str]], first: str | None = None) -> Iterator[dict[str, Agent]]:
    """Agents ``(name, url)`` started through the book's API; ``first`` sends the initial
    model ([0.0]) that starts the federation. Closed on exit."""
    made: dict[str, Agent] = {}
    try:
        for name, url in specs:
            a = Agent(url, name=name, max_backoff=0.5)
            if name == first:
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


def wait_heartbeats(db: str, run_id: str, blobs: Path, expected: dict[str, int]) -> None:
    """Until every member of ``expected`` is live with that many agents in the store."""
    wait_until(
        lambda: all(
            live_members(db, run_id, blobs).get(n, (False, -1, 0))[:2] == (True, k)
            for n, k in expected.items()
        ),
        what=f"heartbeats {expected}",
    )


def two_clusters_one_round(db: str, blobs: Path) -> None:
    """Acceptance 1: A's agents upload [0] (5 samples each), B's [10] (15 samples each);
    threshold 1.0, one round: every agent gets [7.5]; lineage global <- 2 semi-global <- 4
    local."""
    with members(member_config(db, blobs, "a"), member_config(db, blobs, "b")) as (a, b):
        assert a.aggregator_id != b.aggregator_id and a.run_id == b.run_id
        specs = [("a1", a.url), ("a2", a.url), ("b1", b.url), ("b2", b.url)]
        with agents(specs, first="a1") as ag:
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


def test_two_clusters_sqlite(tmp_path: Path) -> None:
    two_clusters_one_round(str(tmp_path / "fed.db"), tmp_path / "blobs")


def test_two_clusters_postgresql(pg_url: str, postgres: PostgresServer, tmp_path: Path) -> None:
    two_clusters_one_round(pg_url, tmp_path / "blobs")
