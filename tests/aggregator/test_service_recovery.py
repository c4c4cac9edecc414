"""A failed store write or a failing strategy does not lose the round: it is retried."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fedstack import Agent, AggregatorConfig, Store
from fedstack.errors import StoreError
from fedstack.strategies import FedAvg
from fedstack.testing import aggregator_thread


class FlakyStore(Store):
    """Fails the first ``failures`` commits of a round, like a database that went away."""

    def __init__(self, *args: Any, failures: int = 2) -> None:
        super().__init__(*args)
        self.failures = failures
        self.attempts = 0

    def commit_round(self, run_id: str, **kwargs: Any) -> str:
        self.attempts += 1
        if self.attempts <= self.failures:
            raise StoreError("database unavailable (injected)")
        return super().commit_round(run_id, **kwargs)


def test_round_is_retried_after_store_failures(tmp_path: Path) -> None:
    store = FlakyStore(str(tmp_path / "f.db"), failures=2)
    cfg = AggregatorConfig(auth="off", port=0, rounds=1, min_agents=2, finish_grace=2)
    with aggregator_thread(cfg, store=store) as agg:
        url = f"ws://127.0.0.1:{agg.port}"
        agents = [Agent(url, name=f"a{i}") for i in range(2)]
        agents[0].send_initial_model({"w": np.zeros(2, np.float32)})
        for a in agents:
            a.start()
        for i, a in enumerate(agents):
            a.wait_for_global_model(10)
            a.send_trained_model({"w": np.full(2, 2.0 * (i + 1), np.float32)}, 1)
        for a in agents:
            np.testing.assert_array_equal(a.wait_for_global_model(20)["w"], 3.0)
            a.close()
        run_id = agg.run_id
    assert store.attempts == 3
    assert [r["round"] for r in store.rounds(run_id)] == [1]
    store.close()


def test_failing_strategy_is_rebuilt_from_stored_uploads(tmp_path: Path, monkeypatch: Any) -> None:
    calls = {"n": 0}
    original = FedAvg.begin

    def flaky_begin(self: FedAvg, *args: Any, **kwargs: Any) -> Any:
        acc = original(self, *args, **kwargs)
        real = acc.result

        def result() -> Any:
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("strategy bug (injected)")
            return real()

        acc.result = result  # type: ignore[method-assign]
        return acc

    monkeypatch.setattr(FedAvg, "begin", flaky_begin)
    cfg = AggregatorConfig(
        auth="off", port=0, db=str(tmp_path / "f.db"), rounds=1, min_agents=2, finish_grace=2
    )
    with aggregator_thread(cfg) as agg:
        url = f"ws://127.0.0.1:{agg.port}"
        agents = [Agent(url, name=f"a{i}") for i in range(2)]
        agents[0].send_initial_model({"w": np.zeros(2, np.float32)})
        for a in agents:
            a.start()
        for i, a in enumerate(agents):
            a.wait_for_global_model(10)
            a.send_trained_model({"w": np.full(2, 2.0 * (i + 1), np.float32)}, 1)
        for a in agents:
            np.testing.assert_array_equal(a.wait_for_global_model(20)["w"], 3.0)
            a.close()
    assert calls["n"] == 2
