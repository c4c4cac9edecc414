"""A stateful strategy's state is committed with each round: a restart continues exactly."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedstack import Agent, AggregatorConfig, FederationFinished, Store
from fedstack.testing import aggregator_thread, free_port

ROUNDS = 5
TARGETS = [np.array([1.0, 2.0, -1.0], np.float32), np.array([3.0, 0.0, 1.0], np.float32)]


def agent_loop(url: str, k: int, out: dict[str, Any]) -> None:
    agent = Agent(url, name=f"a{k}", max_backoff=0.2)
    agent.send_initial_model({"w": np.zeros(3, np.float32)})
    agent.start()
    while True:
        try:
            gm = agent.wait_for_global_model(60)
        except FederationFinished:
            break
        # deterministic "training": half way from the global model to this agent's target
        agent.send_trained_model({"w": gm["w"] + 0.5 * (TARGETS[k] - gm["w"])}, 10 + k)
    agent.close()
    out[f"a{k}"] = agent.version


def run(tmp: Path, strategy: str, params: dict[str, Any], restart_at: int | None) -> np.ndarray:
    port = free_port()
    cfg = AggregatorConfig(
        auth="off",
        port=port,
        db=str(tmp / "f.db"),
        rounds=ROUNDS,
        min_agents=2,
        strategy=strategy,
        strategy_params=params,
        finish_grace=5,
    )
    out: dict[str, Any] = {}
    threads = [
        threading.Thread(target=agent_loop, args=(f"ws://127.0.0.1:{port}", k, out))
        for k in range(2)
    ]
    if restart_at is not None:
        with aggregator_thread(cfg) as agg:
            for t in threads:
                t.start()
            deadline = time.monotonic() + 60
            while agg.state.version < restart_at:
                assert time.monotonic() < deadline
                time.sleep(0.002)
        # the aggregator stopped mid-run; a new one resumes from the store
    with aggregator_thread(cfg) as agg:
        if restart_at is None:
            for t in threads:
                t.start()
        for t in threads:
            t.join(120)
        run_id = agg.run_id
    assert out == {"a0": ROUNDS, "a1": ROUNDS}
    store = Store(str(tmp / "f.db"))
    rounds = store.rounds(run_id)
    assert [r["round"] for r in rounds] == list(range(1, ROUNDS + 1))
    assert len(store.list_runs()) == 1
    final = store.load_weights(rounds[-1]["model_id"])["w"]
    store.close()
    return final


@pytest.mark.parametrize(
    "strategy,params",
    [
        ("fedavgm", {"server_lr": 1.0, "momentum": 0.9}),
        ("fedadam", {"server_lr": 0.3}),
    ],
)
def test_restart_continues_the_strategy_state(
    tmp_path: Path, strategy: str, params: dict[str, Any]
) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    straight = run(tmp_path / "a", strategy, params, restart_at=None)
    resumed = run(tmp_path / "b", strategy, params, restart_at=2)
    np.testing.assert_array_equal(resumed, straight)
    # and the state mattered: plain FedAvg gives a different model
    (tmp_path / "c").mkdir()
    fedavg = run(tmp_path / "c", "fedavg", {}, restart_at=None)
    assert not np.allclose(fedavg, straight)
