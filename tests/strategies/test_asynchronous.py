"""FedAsync and FedBuff: staleness functions, mixing, buffered steps, state."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest

from fedstack import strategies
from fedstack.errors import ConfigError
from fedstack.strategies import FedAvg, Update
from fedstack.strategies.asynchronous import FedAsync, FedBuff, staleness_function
from fedstack.types import Weights


def run(
    strategy: strategies.Strategy,
    global_weights: Weights,
    updates: list[Update],
    state: dict[str, Any] | None = None,
) -> strategies.Result:
    st = strategy.init_state(global_weights) if state is None else state
    acc = strategy.begin(global_weights, st)
    for u in updates:
        acc.add(u)
    assert acc.count == len(updates)
    return acc.result()


def model(rng: np.random.Generator) -> Weights:
    return {
        "w": rng.standard_normal((3, 2)).astype(np.float32),
        "b": rng.standard_normal(2) * 1e6,
        "n": rng.integers(0, 100, 3).astype(np.int32),
    }


# ---------------------------------------------------------------------------- staleness
def test_staleness_functions_at_several_t() -> None:
    const = staleness_function("constant")
    assert [const(t) for t in (0, 1, 5, 100)] == [1.0] * 4
    poly = staleness_function("polynomial", a=0.5)
    assert poly(0) == 1.0 and poly(3) == 0.5
    assert poly(8) == pytest.approx(1 / 3, rel=1e-15)
    assert poly(99) == pytest.approx(0.1, rel=1e-15)
    poly1 = staleness_function("polynomial", a=1.0)
    assert [poly1(t) for t in (0, 1, 3)] == [1.0, 0.5, 0.25]
    hinge = staleness_function("hinge", a=10, b=4)
    assert [hinge(t) for t in (0, 3, 4)] == [1.0, 1.0, 1.0]
    assert hinge(5) == pytest.approx(1 / 11, rel=1e-15)
    assert hinge(6) == pytest.approx(1 / 21, rel=1e-15)
    hinge2 = staleness_function("hinge", a=0.5, b=2)
    assert hinge2(2) == 1.0 and hinge2(4) == 0.5
    with pytest.raises(ValueError):
        staleness_function("exponential")
    with pytest.raises(ValueError):
        staleness_function("polynomial", a=-1)


@pytest.mark.parametrize(
    ("fn", "params", "expected"),
    [
        ("constant", {}, {0: 1.0, 2: 1.0, 10: 1.0}),
        ("polynomial", {"a": 0.5}, {0: 1.0, 3: 0.5, 8: 1 / 3}),
        ("hinge", {"a": 10, "b": 4}, {0: 1.0, 4: 1.0, 5: 1 / 11, 6: 1 / 21}),
    ],
)
def test_fedasync_alpha_t(fn: str, params: dict[str, float], expected: dict[int, float]) -> None:
    strat = FedAsync(alpha=0.6, staleness_fn=fn, **params)
    glob: Weights = {"w": np.array([0.0, 10.0])}
    for t, s in expected.items():
        assert strat.alpha_t(t) == pytest.approx(0.6 * s, rel=1e-15)
        res = run(strat, glob, [Update("a", {"w": np.array([1.0, 0.0])}, 5, staleness=t)])
        a = 0.6 * s
        np.testing.assert_allclose(res.weights["w"], [a, 10.0 * (1 - a)], rtol=1e-14)
        assert res.metrics["alpha_t"] == pytest.approx(a, rel=1e-15)
        assert res.metrics["max_staleness"] == t


# ---------------------------------------------------------------------------- FedAsync
def test_fedasync_alpha_one_replaces_the_model() -> None:
    rng = np.random.default_rng(0)
    glob, new = model(rng), model(rng)
    res = run(FedAsync(alpha=1.0), glob, [Update("a", new, 3, staleness=7)])
    assert list(res.weights) == list(glob)
    for k in glob:
        assert res.weights[k].dtype == glob[k].dtype
        np.testing.assert_array_equal(res.weights[k], new[k])


def test_fedasync_trigger_and_config() -> None:
    assert FedAsync.trigger == 1 and FedAsync().trigger == 1
    s = strategies.create("fedasync", alpha=0.9, staleness_fn="polynomial")
    assert isinstance(s, FedAsync) and s.trigger == 1 and s.alpha == 0.9
    assert FedAsync().agent_config() == {}
    assert FedAsync(rho=0.01).agent_config() == {"fedprox_mu": 0.01}
    params = {d["name"]: d["params"] for d in strategies.describe()}
    assert params["fedasync"] == {
        "alpha": 0.6,
        "staleness_fn": "constant",
        "a": 0.5,
        "b": 4.0,
        "rho": 0.0,
    }
    for bad in (
        {"alpha": 0.0},
        {"alpha": 1.5},
        {"staleness_fn": "linear"},
        {"a": -1},
        {"rho": -0.1},
    ):
        with pytest.raises(ConfigError):
            strategies.create("fedasync", **bad)


def test_fedasync_mixes_updates_in_arrival_order() -> None:
    glob: Weights = {"w": np.array([0.0], np.float64)}
    strat = FedAsync(alpha=0.5, staleness_fn="polynomial", a=1.0)
    res = run(
        strat,
        glob,
        [
            Update("a", {"w": np.array([4.0])}, 1, staleness=0),
            Update("b", {"w": np.array([8.0])}, 1, staleness=1),
        ],
    )
    # w = 0.5*0 + 0.5*4 = 2 ; alpha_t = 0.5 * 1/2 = 0.25 -> 0.75*2 + 0.25*8 = 3.5
    assert res.weights["w"].tolist() == [3.5]
    assert res.metrics["num_updates"] == 2 and res.metrics["alpha_t_min"] == 0.25


def test_fedasync_keeps_dtypes_and_ignores_sample_counts() -> None:
    glob: Weights = {"w": np.array([1.0, 2.0], np.float32), "i": np.array([10], np.int64)}
    up: Weights = {"w": np.array([3.0, 4.0], np.float32), "i": np.array([13], np.int64)}
    r1 = run(FedAsync(alpha=0.5), glob, [Update("a", up, 1)])
    r2 = run(FedAsync(alpha=0.5), glob, [Update("a", up, 1000)])
    assert r1.weights["w"].dtype == np.float32 and r1.weights["i"].dtype == np.int64
    assert r1.weights["w"].tolist() == [2.0, 3.0] and r1.weights["i"].tolist() == [12]
    np.testing.assert_array_equal(r1.weights["w"], r2.weights["w"])
    assert glob["w"].tolist() == [1.0, 2.0]  # the global model is not modified


# ---------------------------------------------------------------------------- FedBuff
@pytest.mark.parametrize("weighted", [True, False])
def test_fedbuff_all_agents_fresh_lr1_is_fedavg(weighted: bool) -> None:
    rng = np.random.default_rng(1)
    glob = model(rng)
    ups = [Update(f"a{i}", model(rng), int(rng.integers(1, 50))) for i in range(5)]
    ref = run(FedAvg(weighted=weighted, precision="float64"), glob, ups)
    out = run(FedBuff(k=5, server_lr=1.0, weighted=weighted), glob, ups)
    for k in glob:
        assert out.weights[k].dtype == ref.weights[k].dtype
        np.testing.assert_array_equal(out.weights[k], ref.weights[k])
    assert out.metrics["num_updates"] == 5 and out.metrics["staleness_weight_mean"] == 1.0


def test_fedbuff_trigger_and_config() -> None:
    assert FedBuff(k=3).trigger == 3 and FedBuff().trigger == 10
    s = strategies.create("fedbuff", k=4, server_lr=0.5)
    assert isinstance(s, FedBuff) and s.trigger == 4 and s.server_lr == 0.5
    assert FedBuff().agent_config() == {}
    for bad in (
        {"k": 0},
        {"k": 2.5},
        {"server_lr": 0.0},
        {"staleness_fn": "x"},
        {"server_momentum": 1.0},
        {"server_momentum": -0.5},
    ):
        with pytest.raises(ConfigError):
            strategies.create("fedbuff", **bad)


def test_fedbuff_staleness_down_weights_old_deltas() -> None:
    glob: Weights = {"w": np.array([1.0, 1.0])}
    fresh = Update("a", {"w": np.array([3.0, 1.0])}, 1, staleness=0)  # delta [2, 0]
    old = Update("b", {"w": np.array([1.0, 5.0])}, 3, staleness=3)  # delta [0, 4], s = 1/2
    res = run(FedBuff(k=2), glob, [fresh, old])
    # w + (1*1*[2,0] + 3*0.5*[0,4]) / (1 + 3)
    np.testing.assert_allclose(res.weights["w"], [1.0 + 2 / 4, 1.0 + 6 / 4], rtol=1e-15)
    assert res.metrics["staleness_weight_mean"] == pytest.approx(2.5 / 4)
    assert res.metrics["max_staleness"] == 3
    # the same deltas without staleness: plain FedAvg of the deltas
    flat = run(FedBuff(k=2, staleness_fn="constant"), glob, [fresh, old])
    np.testing.assert_allclose(flat.weights["w"], [1.0 + 2 / 4, 1.0 + 12 / 4])
    # a lone stale update (K = 1) takes a step shrunk by s = 1/sqrt(1 + 8) = 1/3
    lone = run(FedBuff(k=1), glob, [Update("c", {"w": np.array([4.0, 7.0])}, 9, staleness=8)])
    np.testing.assert_allclose(lone.weights["w"], [2.0, 3.0], rtol=1e-15)


def test_fedbuff_normalize_staleness_only_reweights() -> None:
    glob: Weights = {"w": np.array([0.0])}
    a = Update("a", {"w": np.array([2.0])}, 1, staleness=3)  # s = 1/2
    b = Update("b", {"w": np.array([6.0])}, 1, staleness=3)
    same = run(FedBuff(k=2, normalize_staleness=True), glob, [a, b])
    assert same.weights["w"].tolist() == [4.0]  # equally stale: the full mean
    absolute = run(FedBuff(k=2), glob, [a, b])
    assert absolute.weights["w"].tolist() == [2.0]  # default: half a step
    c = Update("c", {"w": np.array([6.0])}, 1, staleness=0)  # s = 1
    mixed = run(FedBuff(k=2, normalize_staleness=True), glob, [a, c])
    np.testing.assert_allclose(mixed.weights["w"], [(0.5 * 2 + 6) / 1.5], rtol=1e-15)


def test_fedbuff_server_lr_and_dtypes() -> None:
    glob: Weights = {"w": np.array([1.0, -1.0], np.float32), "i": np.array([10, 0], np.int32)}
    ups = [
        Update("a", {"w": np.array([3.0, 1.0], np.float32), "i": np.array([20, 4], np.int32)}, 1),
        Update("b", {"w": np.array([1.0, 3.0], np.float32), "i": np.array([10, 0], np.int32)}, 1),
    ]
    res = run(FedBuff(k=2, server_lr=0.5), glob, ups)
    assert res.weights["w"].dtype == np.float32 and res.weights["i"].dtype == np.int32
    # mean delta w: [1, 3]; i: [5, 2] -> + 0.5 * delta
    assert res.weights["w"].tolist() == [1.5, 0.5] and res.weights["i"].tolist() == [12, 1]


def test_fedbuff_fewer_updates_than_k_still_step() -> None:
    glob: Weights = {"w": np.array([0.0])}
    res = run(FedBuff(k=10), glob, [Update("a", {"w": np.array([3.0])}, 2)])
    assert res.weights["w"].tolist() == [3.0]  # the mean over the updates received


def test_results_without_updates_or_twice_raise() -> None:
    for strat in (FedAsync(), FedBuff(k=2)):
        acc = strat.begin({"w": np.zeros(1)}, strat.init_state({"w": np.zeros(1)}))
        assert acc.count == 0
        with pytest.raises(ValueError):
            acc.result()
        acc.add(Update("a", {"w": np.ones(1)}, 1))
        acc.result()
        with pytest.raises(ValueError):
            acc.result()


# ---------------------------------------------------------------------------- state
def store_round_trip(state: dict[str, Any]) -> dict[str, Any]:
    """What the model store does: JSON for scalars, arrays kept apart (copied)."""
    scalars = {k: v for k, v in state.items() if not isinstance(v, np.ndarray)}
    arrays = {k: np.array(v) for k, v in state.items() if isinstance(v, np.ndarray)}
    return {**json.loads(json.dumps(scalars)), **arrays}


@pytest.mark.parametrize("strat", [FedAsync(alpha=0.5), FedBuff(k=2)], ids=["fedasync", "fedbuff"])
def test_update_counter_survives_rounds(strat: strategies.Strategy) -> None:
    glob: Weights = {"w": np.zeros(2)}
    state = strat.init_state(glob)
    assert state == {"updates": 0}
    for expected in (2, 4, 6):
        res = run(
            strat,
            glob,
            [Update("a", {"w": np.ones(2)}, 1), Update("b", {"w": np.ones(2)}, 1)],
            store_round_trip(state),
        )
        state, glob = res.state, res.weights
        assert state["updates"] == expected


def test_fedbuff_momentum_state_round_trip() -> None:
    beta, lr = 0.5, 1.0
    strat = FedBuff(k=1, server_lr=lr, server_momentum=beta, staleness_fn="constant")
    glob: Weights = {"w": np.array([0.0, 0.0], np.float32)}
    targets = [np.array([2.0, 0.0]), np.array([2.0, 4.0]), np.array([0.0, 0.0])]
    # by hand (heavy ball): m <- beta m + d ; w <- w + lr m
    w, m = np.zeros(2), np.zeros(2)
    state = strat.init_state(glob)
    for t in targets:
        d = t - w
        m = beta * m + d
        w = w + lr * m
        res = run(
            strat, glob, [Update("a", {"w": t.astype(np.float32)}, 1)], store_round_trip(state)
        )
        assert res.weights["w"].dtype == np.float32
        np.testing.assert_allclose(res.weights["w"], w, rtol=1e-6)
        np.testing.assert_allclose(res.state["momentum/w"], m, rtol=1e-6)
        state, glob = res.state, res.weights
    assert state["updates"] == 3
    # without momentum there is no array state
    plain = run(FedBuff(k=1), glob, [Update("a", {"w": np.ones(2, np.float32)}, 1)])
    assert plain.state == {"updates": 1}
    assert math.isfinite(float(plain.weights["w"][0]))
