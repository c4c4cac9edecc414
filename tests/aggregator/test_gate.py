"""Update checks before aggregation: norm bound (reject / clip) and probe deviation."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from fedstack import Agent, AggregatorConfig, FederationFinished, Store
from fedstack.aggregator.gate import UpdateGate, update_norm
from fedstack.errors import ConfigError
from fedstack.testing import aggregator_thread
from fedstack.types import Weights

G: Weights = {"w": np.zeros(4, np.float32), "b": np.zeros(2, np.float64)}


def linear_forward(weights: dict[str, np.ndarray], inputs: np.ndarray) -> np.ndarray:
    out: np.ndarray = inputs @ weights["w"].reshape(4, 1) + weights["b"][0]
    return out


def test_update_norm() -> None:
    w: Weights = {"w": np.array([3, 0, 0, 0], np.float32), "b": np.array([4.0, 0.0])}
    assert update_norm(w, G) == pytest.approx(5.0)


def test_norm_bound_rejects_with_reason() -> None:
    gate = UpdateGate(norm_bound=4.0)
    d = gate.check({"w": np.array([3, 0, 0, 0], np.float32), "b": np.array([4.0, 0.0])}, G)
    assert not d.accepted and "exceeds the bound" in d.reason
    assert d.metrics["update_norm"] == pytest.approx(5.0)
    ok = gate.check({"w": np.array([1, 0, 0, 0], np.float32), "b": np.zeros(2)}, G)
    assert ok.accepted and ok.reason == ""


def test_norm_bound_clips_onto_the_bound() -> None:
    gate = UpdateGate(norm_bound=1.0, action="clip")
    d = gate.check({"w": np.array([3, 0, 0, 0], np.float32), "b": np.array([4.0, 0.0])}, G)
    assert d.accepted
    assert update_norm(d.weights, G) == pytest.approx(1.0, rel=1e-6)
    np.testing.assert_allclose(d.weights["w"], [0.6, 0, 0, 0], rtol=1e-6)
    assert d.weights["w"].dtype == np.float32 and d.metrics["clip_scale"] == pytest.approx(0.2)


def test_probe_deviation_gate() -> None:
    probe = np.eye(4, dtype=np.float32)
    gate = UpdateGate(probe_inputs=probe, forward=linear_forward, max_deviation=0.5)
    near: Weights = {"w": np.array([0.1, 0.2, 0.0, 0.0], np.float32), "b": np.zeros(2)}
    far: Weights = {"w": np.array([5.0, 0.0, 0.0, 0.0], np.float32), "b": np.zeros(2)}
    assert gate.check(near, G).accepted
    d = gate.check(far, G)
    assert not d.accepted and "probe set" in d.reason
    assert d.metrics["probe_deviation"] == pytest.approx(5.0 / 4)


def test_gate_config_errors(tmp_path: Path) -> None:
    assert UpdateGate.from_config({}) is None
    with pytest.raises(ConfigError, match="unknown"):
        UpdateGate.from_config({"nrom_bound": 1})
    with pytest.raises(ConfigError):
        UpdateGate(norm_bound=-1)
    with pytest.raises(ConfigError):
        UpdateGate(action="ban")
    with pytest.raises(ConfigError, match="probe_inputs"):
        UpdateGate(max_deviation=1.0)
    np.save(tmp_path / "probe.npy", np.eye(4, dtype=np.float32))
    gate = UpdateGate.from_config(
        {
            "probe_inputs": str(tmp_path / "probe.npy"),
            "forward": "test_gate:linear_forward",
            "max_deviation": 0.5,
        }
    )
    assert gate is not None and gate.probe_inputs is not None


def test_rejected_update_is_recorded_and_not_aggregated(tmp_path: Path) -> None:
    # both agents are active (threshold 1.0 needs 2 uploads); the attacker's are refused,
    # so each round completes at its deadline with the honest update alone
    cfg = AggregatorConfig(
        auth="off",
        port=0,
        db=str(tmp_path / "f.db"),
        rounds=2,
        min_agents=1,
        round_timeout=1,
        gate={"norm_bound": 10.0},
        finish_grace=3,
    )
    seen: dict[str, list[float] | list[str]] = {}

    def run(name: str, scale: float) -> None:
        a = Agent(f"ws://127.0.0.1:{agg.port}", name=name)
        a.send_initial_model({"w": np.zeros(3, np.float32)})
        a.start()
        acks = []
        while True:
            try:
                gm = a.wait_for_global_model(30)
            except FederationFinished:
                break
            a.send_trained_model({"w": gm["w"] + scale}, 1)
        a.close()
        acks = [x.status for x in a.acknowledged]
        seen[name] = [float(gm["w"][0])]
        seen[name + "-acks"] = acks

    with aggregator_thread(cfg) as agg:
        threads = [
            threading.Thread(target=run, args=("honest", 1.0)),
            threading.Thread(target=run, args=("attacker", 1000.0)),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        run_id = agg.run_id
    assert seen["honest"] == [2.0]  # only the honest updates were aggregated (1 + 1)
    assert set(seen["attacker-acks"]) == {"rejected"}
    store = Store(str(tmp_path / "f.db"))
    rejected = [m for m in store.models(run_id, "local") if m["status"] == "rejected"]
    assert len(rejected) == 2 and all(m["agent"] == "attacker" for m in rejected)
    assert all(m["metrics"]["gate_update_norm"] > 10 for m in rejected)
    events = [e for e in store.events(run_id) if e["kind"] == "update_rejected"]
    assert len(events) == 2 and all("exceeds the bound" in e["detail"]["reason"] for e in events)
    store.close()
