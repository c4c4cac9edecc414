"""Group commit: uploads that queue up while a batch is being stored are stored in ONE
transaction, yet counted exactly as one by one (a batch ends where the round is ready)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedstack import Agent, AggregatorConfig, Store
from fedstack.testing import aggregator_thread


def w(v: float) -> dict[str, np.ndarray]:
    return {"w": np.full(4, v, np.float32)}


def upload_args(uid: str, agent: str, v: float) -> dict[str, Any]:
    return {
        "agent_id": agent,
        "upload_id": uid,
        "round": 1,
        "base_version": 0,
        "num_samples": 1,
        "metrics": {"v": v},
        "weights": w(v),
        "status": "buffered",
    }


@pytest.fixture
def store_run(tmp_path: Path) -> Any:
    st = Store(str(tmp_path / "s.db"), inline_blob_bytes=256 * 1024)
    run = st.open_run("r", {}, "agg")
    agent, _ = st.register_agent("a0", None, "x")
    st.init_federation(
        run.id,
        agent_id=agent,
        structure=[("w", "float32", (4,))],
        init_weights=True,
        initial=w(0),
        global_weights=w(0),
        num_samples=1,
        metrics={},
        aggregator_id="agg",
    )
    yield st, run.id, agent
    st.close()


def test_add_uploads_one_transaction_dedupes_and_falls_back(store_run: Any) -> None:
    st, run_id, agent = store_run
    out = st.add_uploads(
        run_id,
        [upload_args("u1", agent, 1), upload_args("u2", agent, 2), upload_args("u1", agent, 1)],
    )
    assert [created for _, created in out] == [True, True, False]
    assert out[2][0].model_id == out[0][0].model_id  # the same upload_id: stored once
    # a batch holding an upload stored before: one by one, the old one returned as is
    again = st.add_uploads(run_id, [upload_args("u3", agent, 3), upload_args("u2", agent, 2)])
    assert [created for _, created in again] == [True, False]
    assert again[1][0].model_id == out[1][0].model_id
    local = {m["upload_id"]: m for m in st.models(run_id, "local") if m["upload_id"]}
    assert sorted(local) == ["u1", "u2", "u3"]
    for uid, v in (("u1", 1), ("u2", 2), ("u3", 3)):  # every blob readable, inline or not
        np.testing.assert_array_equal(st.load_weights(local[uid]["id"])["w"], v)


class GatedStore(Store):
    """Holds the aggregator's first batch until ``release``; records every batch size."""

    def __init__(self, db: str) -> None:
        super().__init__(db)
        self.batches: list[int] = []
        self.entered = threading.Event()
        self.release = threading.Event()

    def add_uploads(self, run_id: str, uploads: Any) -> Any:
        self.batches.append(len(uploads))
        if not self.entered.is_set():
            self.entered.set()
            self.release.wait(30)
        return super().add_uploads(run_id, uploads)


def test_queued_uploads_are_stored_together_and_counted_as_one_by_one(tmp_path: Path) -> None:
    """6 agents, a round needs 3 (threshold 0.5): while the first upload is held in the
    store, the 5 others queue; the next batch stops at the upload that completes round 1,
    and the rest are counted in round 2 (stale: trained on v0, accepted late)."""
    db = str(tmp_path / "g.db")
    store = GatedStore(db)
    cfg = AggregatorConfig(
        auth="off",
        port=0,
        db=db,
        rounds=2,
        min_agents=3,
        threshold=0.5,
        staleness="next",
        finish_grace=0.5,
    )
    with aggregator_thread(cfg, store=store) as agg:
        agents = [Agent(f"ws://127.0.0.1:{agg.port}", name=f"a{i}") for i in range(6)]
        for a in agents:
            a.send_initial_model(w(0))
        for a in agents:
            a.start(timeout=20)
        gms = [a.wait_for_global_model(20) for a in agents]
        agents[0].send_trained_model({"w": gms[0]["w"] + 1}, 1)
        assert store.entered.wait(20)
        for i, a in enumerate(agents[1:], start=1):
            a.send_trained_model({"w": gms[i]["w"] + 1 + i}, 1)
        deadline = time.monotonic() + 20
        while agg.statistics().uploads_queued < 5:  # all five queued behind the held batch
            assert time.monotonic() < deadline, "uploads did not queue"
            time.sleep(0.005)
        store.release.set()
        for a in agents:
            a.flush(20)
        deadline = time.monotonic() + 20
        while agg.state.version < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        rounds = store.rounds(agg.run_id)
        inputs: dict[int, list[str]] = {1: [], 2: []}
        for m in store.models(agg.run_id, "local"):
            if m["upload_id"]:
                inputs[m["round"]].append(m["id"])
        for a in agents:
            a.close()
    assert store.batches[:2] == [1, 2]  # the held one, then two more complete round 1
    assert rounds[0]["num_updates"] == 3
    check = Store(db)
    try:  # round 1 is the mean of exactly the three uploads stored for round 1
        ups = [check.load_weights(i)["w"] for i in inputs[1]]
        np.testing.assert_allclose(
            check.load_weights(rounds[0]["model_id"])["w"], np.mean(ups, axis=0), rtol=1e-6
        )
        assert len({float(u[0]) for u in ups}) == 3
    finally:
        check.close()
    assert len(inputs[1]) == 3 and len(inputs[2]) == 3  # the other three count in round 2
