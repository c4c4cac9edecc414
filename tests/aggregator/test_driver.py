"""The round driver: aggregation reports errors instead of raising, replays stored uploads."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np

from fedstack import Store
from fedstack.aggregator.driver import RoundDriver, mean_metrics
from fedstack.errors import StoreError
from fedstack.strategies import FedAvg, Update


def test_mean_metrics_weighs_by_samples_and_keeps_the_slowest_agent() -> None:
    out = mean_metrics(
        [
            (1, {"loss": 1.0, "train_seconds": 2.0, "flag": True, "tag": "x"}),
            (3, {"loss": 3.0, "train_seconds": 5.0}),
        ]
    )
    assert out == {"mean_loss": 2.5, "mean_train_seconds": 4.25, "max_train_seconds": 5.0}


def w(v: float) -> dict[str, np.ndarray]:
    return {"w": np.full(2, v, np.float32)}


def setup(tmp_path: Path) -> tuple[Store, str, str]:
    st = Store(str(tmp_path / "s.db"))
    run = st.open_run("r", {}, "agg")
    agent, _ = st.register_agent("a", None, "x")
    st.init_federation(
        run.id,
        agent_id=agent,
        structure=[("w", "float32", (2,))],
        init_weights=True,
        initial=w(0),
        global_weights=w(0),
        num_samples=1,
        metrics={},
        aggregator_id="agg",
    )
    return st, run.id, agent


def driver(st: Store, run_id: str) -> RoundDriver:
    async def db(fn: Any, *args: Any, **kw: Any) -> Any:
        return fn(*args, **kw)

    return RoundDriver(
        strategy=FedAvg(),
        rng=np.random.default_rng(0),
        db=db,
        store=lambda: st,
        run_id=lambda: run_id,
        aggregator_id=lambda: "agg",
        gate=None,
        evaluator=None,
    )


def test_a_failed_commit_is_reported_and_the_same_result_retried(tmp_path: Path) -> None:
    st, run_id, agent = setup(tmp_path)
    d = driver(st, run_id)
    d.begin(w(0), {}, 1)
    assert d.accumulator is not None
    d.accumulator.add(Update(agent, w(4), 1))
    d.inputs.append((1, {}))
    real = st.commit_round
    calls = {"n": 0}

    def flaky(*args: Any, **kw: Any) -> str:
        calls["n"] += 1
        if calls["n"] == 1:
            raise StoreError("database unavailable (injected)")
        return real(*args, **kw)

    st.commit_round = flaky  # type: ignore[method-assign]
    kw: dict[str, Any] = {
        "round": 1,
        "inputs": [],
        "base_model_id": "",
        "global_weights": w(0),
        "state": {},
        "version": 0,
    }
    first = asyncio.run(d.aggregate(**kw))
    assert isinstance(first.error, StoreError) and first.result is None
    second = asyncio.run(d.aggregate(**kw))  # the accumulator is spent: the kept result
    assert second.error is None and second.result is not None and second.model_id
    np.testing.assert_array_equal(second.result.weights["w"], 4.0)
    assert [r["round"] for r in st.rounds(run_id)] == [1]
    st.close()


def test_a_broken_accumulator_is_rebuilt_from_the_stored_uploads(tmp_path: Path) -> None:
    st, run_id, agent = setup(tmp_path)
    st.add_uploads(
        run_id,
        [
            {
                "agent_id": agent,
                "upload_id": "u1",
                "round": 1,
                "base_version": 0,
                "num_samples": 2,
                "metrics": {"l": 1.0},
                "weights": w(6),
                "status": "buffered",
            }
        ],
    )
    d = driver(st, run_id)
    d.begin(w(0), {}, 1)  # empty: result() fails

    ev = asyncio.run(
        d.aggregate(round=1, inputs=[], base_model_id="", global_weights=w(0), state={}, version=0)
    )
    assert ev.error is not None and ev.rebuilt is not None
    assert list(ev.rebuilt.contributors) == [agent] and ev.rebuilt.inputs == [(2, {"l": 1.0})]
    np.testing.assert_array_equal(ev.rebuilt.accumulator.result().weights["w"], 6.0)
    st.close()
