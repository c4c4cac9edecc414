"""FedAvg: sample-weighted means, dtype handling, and the strategy registry."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from fedstack import strategies
from fedstack.errors import ConfigError
from fedstack.strategies import FedAvg, Update
from fedstack.strategies.base import StrategyState
from fedstack.types import Metrics, Weights


def aggregate(
    updates: list[Update],
    template: Weights | None = None,
    weighted: bool = True,
    precision: str = "auto",
) -> tuple[Weights, StrategyState, Metrics]:
    strat = FedAvg(weighted=weighted, precision=precision)
    tmpl = template if template is not None else updates[0].weights
    acc = strat.begin(tmpl, strat.init_state(tmpl))
    for u in updates:
        acc.add(u)
    assert acc.count == len(updates)
    r = acc.result()
    return r.weights, r.state, r.metrics


def test_book_minimal_example() -> None:
    # two agents with equal sample counts (the book's minimal example)
    a: Weights = {
        "model1": np.array([[1, 2, 3], [4, 5, 6]], dtype=np.float64),
        "model2": np.array([[1, 2], [3, 4]], dtype=np.float64),
    }
    b: Weights = {
        "model1": np.array([[3, 4, 5], [6, 7, 8]], dtype=np.float64),
        "model2": np.array([[3, 4], [5, 6]], dtype=np.float64),
    }
    out, state, diag = aggregate([Update("a", a, 1), Update("b", b, 1)])
    assert out["model1"].tolist() == [[2, 3, 4], [5, 6, 7]]
    assert out["model2"].tolist() == [[2, 3], [4, 5]]
    assert state == {}
    assert diag == {"num_updates": 2, "num_samples": 2}


def test_book_minimal_example_with_int_arrays() -> None:
    a: Weights = {"model1": np.array([[1, 2, 3], [4, 5, 6]]), "model2": np.array([[1, 2], [3, 4]])}
    b: Weights = {"model1": np.array([[3, 4, 5], [6, 7, 8]]), "model2": np.array([[3, 4], [5, 6]])}
    out, _, _ = aggregate([Update("a", a, 50), Update("b", b, 50)])
    assert out["model1"].dtype == a["model1"].dtype
    assert out["model1"].tolist() == [[2, 3, 4], [5, 6, 7]]
    assert out["model2"].tolist() == [[2, 3], [4, 5]]


def test_unequal_sample_counts() -> None:
    a: Weights = {"w": np.array([0.0, 0.0, 10.0])}
    b: Weights = {"w": np.array([3.0, 6.0, 1.0])}
    c: Weights = {"w": np.array([6.0, 0.0, 1.0])}
    out, _, diag = aggregate([Update("a", a, 1), Update("b", b, 2), Update("c", c, 3)])
    # (1*a + 2*b + 3*c) / 6
    np.testing.assert_allclose(out["w"], [(0 + 6 + 18) / 6, (0 + 12 + 0) / 6, (10 + 2 + 3) / 6])
    assert diag == {"num_updates": 3, "num_samples": 6}


def test_unweighted_mean() -> None:
    a: Weights = {"w": np.array([0.0, 0.0])}
    b: Weights = {"w": np.array([3.0, 6.0])}
    out, _, diag = aggregate([Update("a", a, 1), Update("b", b, 1000)], weighted=False)
    np.testing.assert_allclose(out["w"], [1.5, 3.0])
    assert diag["num_samples"] == 1001
    assert strategies.create("fedavg", weighted=False).weighted is False  # type: ignore[attr-defined]


def test_float32_in_float32_out() -> None:
    a: Weights = {"w": np.array([1.0, 2.0], np.float32), "h": np.array([1.0], np.float16)}
    b: Weights = {"w": np.array([2.0, 4.0], np.float32), "h": np.array([2.0], np.float16)}
    out, _, _ = aggregate([Update("a", a, 1), Update("b", b, 3)])
    assert out["w"].dtype == np.float32 and out["h"].dtype == np.float16
    np.testing.assert_allclose(out["w"], [1.75, 3.5])
    np.testing.assert_allclose(out["h"], [1.75])


def test_float32_accumulates_in_float64() -> None:
    # many small float32 updates: a float32 running sum would drift visibly
    rng = np.random.default_rng(2)
    ups = [
        Update(str(i), {"w": rng.random(100, dtype=np.float32)}, int(rng.integers(1, 9)))
        for i in range(200)
    ]
    out, _, _ = aggregate(ups, precision="float64")
    n = np.array([u.num_samples for u in ups], dtype=np.float64)
    exact = sum(u.weights["w"].astype(np.float64) * k for u, k in zip(ups, n, strict=True))
    exact = exact / n.sum()
    np.testing.assert_allclose(out["w"], exact.astype(np.float32), rtol=1e-7, atol=0)
    # the default ("auto") accumulates float32 tensors in float32: close, not exact
    fast, _, _ = aggregate(ups)
    assert fast["w"].dtype == np.float32
    np.testing.assert_allclose(fast["w"], exact, rtol=200 * 2.0**-24)
    assert not np.array_equal(fast["w"], out["w"])  # it really is the float32 path


def test_precision_is_validated() -> None:
    from fedstack.errors import ConfigError
    from fedstack.strategies import create

    with pytest.raises(ConfigError):
        create("fedavg", precision="float16")


def test_int_tensor_rounded_and_kept_int() -> None:
    a: Weights = {"steps": np.array([0, 10, 7], np.int32), "u": np.array([1, 200], np.uint8)}
    b: Weights = {"steps": np.array([1, 11, 7], np.int32), "u": np.array([2, 255], np.uint8)}
    out, _, _ = aggregate([Update("a", a, 1), Update("b", b, 2)])
    assert out["steps"].dtype == np.int32 and out["u"].dtype == np.uint8
    # (0 + 2) / 3 = 0.67 -> 1 ; (10 + 22) / 3 = 10.67 -> 11 ; 7
    assert out["steps"].tolist() == [1, 11, 7]
    # (1 + 4) / 3 = 1.67 -> 2 ; (200 + 510) / 3 = 236.67 -> 237 (no uint8 overflow)
    assert out["u"].tolist() == [2, 237]


def test_bool_tensor_is_majority() -> None:
    a: Weights = {"m": np.array([True, True, False])}
    b: Weights = {"m": np.array([False, True, False])}
    out, _, _ = aggregate([Update("a", a, 3), Update("b", b, 1)])
    assert out["m"].dtype == np.bool_
    assert out["m"].tolist() == [True, True, False]


def test_result_independent_of_update_order() -> None:
    rng = np.random.default_rng(7)
    ups = [
        Update(
            f"a{i}",
            {"w": rng.standard_normal((4, 3)), "b": rng.standard_normal(3)},
            int(rng.integers(0, 50)),
        )
        for i in range(5)
    ]
    ref, _, _ = aggregate(ups)
    for perm in itertools.permutations(ups):
        out, _, _ = aggregate(list(perm))
        for k in ref:
            np.testing.assert_allclose(out[k], ref[k], rtol=1e-6, atol=1e-12)


def test_zero_sample_update_counts_once() -> None:
    a: Weights = {"w": np.array([0.0])}
    b: Weights = {"w": np.array([3.0])}
    out, _, diag = aggregate([Update("a", a, 0), Update("b", b, 2)])
    np.testing.assert_allclose(out["w"], [2.0])  # weights 1 and 2
    assert diag == {"num_updates": 2, "num_samples": 2}
    out, _, diag = aggregate([Update("a", a, 0), Update("b", b, 0)])
    np.testing.assert_allclose(out["w"], [1.5])  # both count once
    assert diag["num_samples"] == 0
    out, _, _ = aggregate([Update("b", b, 2), Update("a", a, -5)])  # negative: once as well
    np.testing.assert_allclose(out["w"], [2.0])


def test_single_update_is_returned_unchanged() -> None:
    w: Weights = {"w": np.array([1.5, -2.25], np.float32), "i": np.array([3], np.int64)}
    out, _, _ = aggregate([Update("a", w, 17)])
    assert out["w"].tolist() == [1.5, -2.25] and out["i"].tolist() == [3]


def test_inputs_are_not_modified_or_aliased() -> None:
    a: Weights = {"w": np.array([1.0, 2.0])}
    b: Weights = {"w": np.array([3.0, 4.0])}
    strat = FedAvg()
    acc = strat.begin(a, {})
    acc.add(Update("a", a, 1))
    acc.add(Update("b", b, 1))
    assert a["w"].tolist() == [1.0, 2.0] and b["w"].tolist() == [3.0, 4.0]
    a["w"][:] = 100.0  # released/reused after add
    b["w"][:] = 100.0
    out = acc.result().weights
    assert out["w"].tolist() == [2.0, 3.0]


def test_result_follows_the_template_names() -> None:
    tmpl: Weights = {"first": np.zeros(1), "second": np.zeros(2)}
    up: Weights = {"second": np.ones(2), "first": np.ones(1)}
    out, _, _ = aggregate([Update("a", up, 1)], template=tmpl)
    assert list(out) == ["first", "second"]


def test_result_without_updates_raises_value_error() -> None:
    strat = FedAvg()
    acc = strat.begin({"w": np.zeros(2)}, {})
    assert acc.count == 0
    with pytest.raises(ValueError):
        acc.result()


def test_create_strategies() -> None:
    s = strategies.create("fedavg")
    assert isinstance(s, FedAvg) and s.name == "fedavg" and s.weighted
    assert isinstance(strategies.create("FedAvg"), FedAvg)
    assert "fedavg" in strategies.names()
    with pytest.raises(ConfigError, match="nope"):
        strategies.create("nope")
    with pytest.raises(ConfigError):
        strategies.create("fedavg", learning_rate=0.1)


def test_weighted_mean_is_independent_of_arrival_order() -> None:
    # float32 inputs times non-integer-friendly weights: a float32 multiply would round
    rng = np.random.default_rng(1)
    ups = [Update(f"a{i}", {"w": rng.normal(size=64).astype(np.float32)}, 10 + i) for i in range(2)]
    tmpl: Weights = {"w": np.zeros(64, np.float32)}
    outs = []
    for order in (ups, ups[::-1]):
        acc = FedAvg().begin(tmpl, {})
        for u in order:
            acc.add(u)
        outs.append(acc.result().weights["w"])
    np.testing.assert_array_equal(outs[0], outs[1])
