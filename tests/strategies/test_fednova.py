"""FedNova: normalized averaging by local step counts."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pytest

from fedstack import strategies
from fedstack.errors import ConfigError, InvalidUpdate
from fedstack.strategies import FedAvg, Result, Strategy, Update
from fedstack.strategies.fednova import FedNova
from fedstack.types import Weights


def run(strat: Strategy, x: Weights, updates: list[Update]) -> Result:
    acc = strat.begin(x, strat.init_state(x))
    for u in updates:
        strat.check(u, x)
        acc.add(u)
    return acc.result()


def upd(agent: str, w: Weights, n: int, steps: Any) -> Update:
    return Update(agent, w, n, metrics={"local_steps": steps, "train_loss": 0.5})


def random_updates(rng: np.random.Generator, x: Weights, steps: list[Any]) -> list[Update]:
    out = []
    for i, s in enumerate(steps):
        w = {k: (v + rng.standard_normal(v.shape)).astype(v.dtype) for k, v in x.items()}
        out.append(upd(f"a{i}", w, int(rng.integers(1, 50)), s))
    return out


@pytest.mark.parametrize("steps", [[5, 5, 5, 5], [1, 1, 1, 1], [3.0, 3, 3.0, 3]])
@pytest.mark.parametrize("weighted", [True, False])
def test_equal_local_steps_is_fedavg(steps: list[Any], weighted: bool) -> None:
    rng = np.random.default_rng(0)
    x: Weights = {"w": rng.standard_normal((4, 3)), "b": rng.standard_normal(3).astype(np.float32)}
    ups = random_updates(rng, x, steps)
    out = run(FedNova(weighted=weighted), x, ups)
    ref = run(FedAvg(weighted=weighted, precision="float64"), x, ups).weights
    np.testing.assert_allclose(out.weights["w"], ref["w"], rtol=0, atol=1e-12)
    assert out.weights["b"].dtype == np.float32
    np.testing.assert_allclose(out.weights["b"], ref["b"], rtol=1e-7)
    assert out.metrics["tau_eff"] == pytest.approx(float(steps[0]))


def test_equal_local_steps_is_bit_identical_to_fedavg() -> None:
    # stronger than the formula needs: equal steps take FedAvg's own computation
    rng = np.random.default_rng(4)
    # a global model far from the updates: x + (M - x) would lose M's low bits
    x: Weights = {
        "w": rng.standard_normal(50) * 1e6,
        "h": rng.standard_normal(8).astype(np.float16),
    }
    ups = [
        upd(
            f"a{i}",
            {"w": rng.standard_normal(50), "h": rng.standard_normal(8).astype(np.float16)},
            i + 1,
            7,
        )
        for i in range(3)
    ]
    out = run(FedNova(), x, ups).weights
    ref = run(FedAvg(precision="float64"), x, ups).weights
    for k in x:
        assert out[k].dtype == x[k].dtype
        np.testing.assert_array_equal(out[k], ref[k])


def test_unequal_steps_hand_computed() -> None:
    x: Weights = {"w": np.array([0.0, 0.0]), "b": np.array([1.0], np.float32)}
    ups = [
        upd("a", {"w": np.array([1.0, 2.0]), "b": np.array([2.0], np.float32)}, 1, 1),
        upd("b", {"w": np.array([4.0, -4.0]), "b": np.array([5.0], np.float32)}, 3, 4),
    ]
    # p = (1/4, 3/4); d_a = x - w_a = (-1, -2 | -1); d_b = (x - w_b) / 4 = (-1, 1 | -1)
    # sum p d = (-1, 0.25 | -1); tau_eff = 1/4 + 3 = 3.25; x - 3.25 * sum p d
    r = run(FedNova(), x, ups)
    np.testing.assert_allclose(r.weights["w"], [3.25, -0.8125], rtol=1e-15)
    assert r.weights["b"].dtype == np.float32
    np.testing.assert_allclose(r.weights["b"], [4.25], rtol=1e-7)
    assert r.metrics["tau_eff"] == 3.25
    assert r.metrics["num_updates"] == 2 and r.metrics["num_samples"] == 4
    # FedAvg would give (3.25, -2.5): the agent with more steps no longer dominates
    np.testing.assert_allclose(run(FedAvg(precision="float64"), x, ups).weights["w"], [3.25, -2.5])


def reference(x: Weights, ups: list[Update], weighted: bool = True) -> Weights:
    n = np.array([u.num_samples if weighted else 1 for u in ups], float)
    p = n / n.sum()
    tau = np.array([float(u.metrics["local_steps"]) for u in ups])
    tau_eff = float(p @ tau)
    out = {}
    for k, xk in x.items():
        x64 = xk.astype(np.float64)
        direction = sum(
            pk * (x64 - u.weights[k].astype(np.float64)) / tk
            for pk, tk, u in zip(p, tau, ups, strict=True)
        )
        out[k] = x64 - tau_eff * direction
    return out


@pytest.mark.parametrize("weighted", [True, False])
def test_unequal_steps_match_the_formula(weighted: bool) -> None:
    rng = np.random.default_rng(1)
    x: Weights = {"w": rng.standard_normal((5, 2)), "b": rng.standard_normal(7).astype(np.float32)}
    ups = random_updates(rng, x, [1, 7, 3, 12.5])
    r = run(FedNova(weighted=weighted), x, ups)
    ref = reference(x, ups, weighted)
    np.testing.assert_allclose(r.weights["w"], ref["w"], rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(r.weights["b"], ref["b"].astype(np.float32), rtol=1e-6, atol=1e-6)
    fedavg = run(FedAvg(weighted=weighted, precision="float64"), x, ups).weights["w"]
    assert np.abs(r.weights["w"] - fedavg).max() > 1e-2


def test_result_independent_of_order() -> None:
    rng = np.random.default_rng(2)
    x: Weights = {"w": rng.standard_normal(6)}
    ups = random_updates(rng, x, [2, 9, 4])
    ref = run(FedNova(), x, ups).weights["w"]
    for perm in itertools.permutations(ups):
        np.testing.assert_allclose(
            run(FedNova(), x, list(perm)).weights["w"], ref, rtol=1e-12, atol=1e-13
        )


@pytest.mark.parametrize(
    "metrics",
    [
        {},
        {"local_steps": 0},
        {"local_steps": -3},
        {"local_steps": "5"},
        {"local_steps": True},
        {"local_steps": float("nan")},
        {"local_steps": float("inf")},
    ],
)
def test_missing_or_bad_local_steps_refused(metrics: dict[str, Any]) -> None:
    x: Weights = {"w": np.zeros(2)}
    u = Update("a", {"w": np.ones(2)}, 3, metrics=metrics)
    s = FedNova()
    with pytest.raises(InvalidUpdate, match="local_steps|local steps") as exc:
        s.check(u, x)
    assert exc.value.agent_id == "a"
    acc = s.begin(x, {})
    with pytest.raises(InvalidUpdate):  # also when an update bypasses check (e.g. a resume)
        acc.add(u)
    assert acc.count == 0
    s.check(Update("a", {"w": np.ones(2)}, 3, metrics={"local_steps": 2}), x)


def test_momentum_and_proximal_normalizers() -> None:
    assert FedNova().norm_of(7) == 7
    # [tau - rho (1 - rho^tau) / (1 - rho)] / (1 - rho), rho = 0.5, tau = 3: (3 - 0.875) / 0.5
    m = FedNova(local_momentum=0.5)
    assert m.norm_of(3) == pytest.approx(4.25)
    assert m.norm_of(1) == pytest.approx(1.0)
    # [1 - (1 - eta mu)^tau] / (eta mu), eta mu = 0.1, tau = 2: 0.19 / 0.1
    p = FedNova(prox_mu=1.0, local_lr=0.1)
    assert p.norm_of(2) == pytest.approx(1.9)
    assert p.norm_of(1) == pytest.approx(1.0)
    # normalized with ||a||: equal steps are still FedAvg, unequal follow the formula
    x: Weights = {"w": np.array([0.0])}
    ups = [upd("a", {"w": np.array([1.0])}, 1, 1), upd("b", {"w": np.array([4.0])}, 1, 3)]
    # ||a|| = 1 and 4.25; tau_eff = (1 + 4.25) / 2; x - tau_eff * (-1 / 1 - 4 / 4.25) / 2
    expected = 2.625 * (1.0 + 4.0 / 4.25) / 2
    assert run(m, x, ups).weights["w"][0] == pytest.approx(expected, rel=1e-12)


def test_registry_and_config() -> None:
    assert "fednova" in strategies.names()
    s = strategies.create("fednova", weighted=False, local_momentum=0.9)
    assert isinstance(s, FedNova) and s.weighted is False and s.local_momentum == 0.9
    assert FedNova.streaming
    for bad in (
        {"local_steps": 3},
        {"local_momentum": 1.0},
        {"prox_mu": 0.1},
        {"prox_mu": -1.0},
        {"prox_mu": 0.1, "local_lr": 0.1, "local_momentum": 0.5},
    ):
        with pytest.raises(ConfigError):
            strategies.create("fednova", **bad)
