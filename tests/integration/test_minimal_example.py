"""The book's minimal example (chapter 6, R6-12) over real loopback sockets."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from example_loader import load_example

from fedstack import AggregatorConfig, Store
from fedstack.testing import aggregator_thread

engine = load_example("examples/minimal/minimal_engine.py")


@pytest.mark.parametrize("delivery", ["push", "poll"])
def test_minimal_example_global_model(tmp_path: Path, delivery: str) -> None:
    cfg = AggregatorConfig(
        auth="off",
        port=0,
        db=str(tmp_path / "f.db"),
        rounds=3,
        min_agents=2,
        delivery=delivery,
        finish_grace=5,
    )
    results: dict[str, list[tuple[int, dict[str, np.ndarray]]]] = {}
    with aggregator_thread(cfg) as agg:
        url = f"ws://127.0.0.1:{agg.port}"
        threads = [
            threading.Thread(target=lambda n=n: results.__setitem__(n, engine.run(url, n)))
            for n in ("a1", "a2")
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads)
        run_id = agg.run_id
    expected = {"model1": [[2, 3, 4], [5, 6, 7]], "model2": [[2, 3], [4, 5]]}
    for name in ("a1", "a2"):
        versions = [v for v, _ in results[name]]
        assert versions == [0, 1, 2, 3], versions  # every version, the final one included
        for _version, gm in results[name][1:]:
            for k, v in expected.items():
                np.testing.assert_array_equal(gm[k], np.array(v, dtype=np.float32))
                assert gm[k].dtype == np.float32
    store = Store(str(tmp_path / "f.db"))
    rounds = store.rounds(run_id)
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert all(r["num_updates"] == 2 for r in rounds)
    local = [m for m in store.models(run_id, "local") if m["status"] != "initial"]
    assert len(local) == 6 and all(m["status"] == "aggregated" for m in local)
    # the global model in the store is the mean too, and its lineage names both agents
    final = store.load_weights(rounds[-1]["model_id"])
    np.testing.assert_array_equal(final["model1"], np.array(expected["model1"], np.float32))
    parents = store.parents(rounds[-1]["model_id"])
    assert sorted(p["agent"] for p in parents if p["relation"] == "input") == ["a1", "a2"]
    assert [p["round"] for p in parents if p["relation"] == "base"] == [2]
    store.close()


def test_single_agent_alone_becomes_global(tmp_path: Path) -> None:
    """R6-12: with threshold 1.0 and only a1 registered, a1's model alone is the global."""
    cfg = AggregatorConfig(auth="off", port=0, db=str(tmp_path / "f.db"), rounds=1, finish_grace=2)
    with aggregator_thread(cfg) as agg:
        seen = engine.run(f"ws://127.0.0.1:{agg.port}", "a1")
    assert [v for v, _ in seen] == [0, 1]
    np.testing.assert_array_equal(seen[1][1]["model1"], [[1, 2, 3], [4, 5, 6]])
