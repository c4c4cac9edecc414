"""Robust aggregation: median, trimmed mean, Krum, Multi-Krum, geometric median, Bulyan,
norm clipping (hand-computed cases, the book's examples and its robust-estimator harness)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from fedstack import strategies
from fedstack.errors import ConfigError, InvalidUpdate
from fedstack.strategies import FedAvg, Result, Strategy, Update
from fedstack.strategies.robust import (
    Bulyan,
    GeometricMedian,
    Krum,
    Median,
    MultiKrum,
    NormClip,
    TrimmedMean,
    pairwise_sq_distances,
)
from fedstack.types import Weights

ROBUST = ["median", "trimmed_mean", "krum", "multikrum", "geometric_median", "bulyan", "normclip"]


def vec_updates(
    rows: Any, name: str = "w", dtype: Any = np.float64, samples: list[int] | None = None
) -> list[Update]:
    arr = np.asarray(rows, dtype=dtype)
    return [
        Update(f"a{i}", {name: arr[i].copy()}, samples[i] if samples else 1)
        for i in range(arr.shape[0])
    ]


def aggregate(strategy: Strategy, updates: list[Update], template: Weights | None = None) -> Result:
    tmpl = (
        template
        if template is not None
        else {k: np.zeros_like(v) for k, v in updates[0].weights.items()}
    )
    acc = strategy.begin(tmpl, strategy.init_state(tmpl))
    for u in updates:
        acc.add(u)
    assert acc.count == len(updates)
    return acc.result()


def book_harness(seed: int) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """The book's robust-estimator harness: K = 10 vectors of d = 15 from N(mu, 1),
    mu ~ U(-10, 10)^d; the true mean is taken, then vector 0 becomes U(-500, 500)^d."""
    rng = np.random.default_rng(seed)
    mu = rng.uniform(-10, 10, 15)
    x = rng.normal(mu, 1.0, (10, 15))
    true = x.mean(axis=0)
    x[0] = rng.uniform(-500, 500, 15)
    return x, true


def weiszfeld_direct(points: np.ndarray[Any, Any], iters: int = 5000) -> np.ndarray[Any, Any]:
    """An independent plain Weiszfeld on the vectors themselves (reference)."""
    z: np.ndarray[Any, Any] = points.mean(axis=0)
    for _ in range(iters):
        d = np.maximum(np.linalg.norm(points - z, axis=1), 1e-12)
        z = (points / d[:, None]).sum(axis=0) / (1.0 / d).sum()
    return z


# ------------------------------------------------------------------------- median
def test_book_coordinate_median() -> None:
    ups = vec_updates([[1, 100, 3], [2, 2, 2], [3, 3, -50]])
    r = aggregate(Median(), ups)
    assert r.weights["w"].tolist() == [2, 3, 2]
    assert r.metrics["num_updates"] == 3


def test_median_even_count_takes_mean_of_middle_pair_per_tensor() -> None:
    a = [
        {"m": np.array([[1.0, 8.0]]), "b": np.array([0.0])},
        {"m": np.array([[2.0, 6.0]]), "b": np.array([10.0])},
        {"m": np.array([[4.0, 4.0]]), "b": np.array([-3.0])},
        {"m": np.array([[100.0, -7.0]]), "b": np.array([1.0])},
    ]
    ups = [Update(f"a{i}", w, 5) for i, w in enumerate(a)]
    r = aggregate(Median(), ups)
    np.testing.assert_array_equal(r.weights["m"], [[3.0, 5.0]])
    np.testing.assert_array_equal(r.weights["b"], [0.5])
    assert r.weights["m"].shape == (1, 2)


def test_median_does_not_modify_inputs() -> None:
    rows = np.array([[3.0, 1.0], [1.0, 2.0], [2.0, 3.0]])
    ups = vec_updates(rows)
    aggregate(Median(), ups)
    for i, u in enumerate(ups):
        assert u.weights["w"].tolist() == rows[i].tolist()


# -------------------------------------------------------------------- trimmed mean
def test_trimmed_mean_beta_zero_is_the_plain_mean() -> None:
    rng = np.random.default_rng(3)
    ups = vec_updates(rng.standard_normal((7, 20)), samples=[1, 5, 2, 9, 1, 1, 3])
    r = aggregate(TrimmedMean(beta=0.0), ups)
    ref = aggregate(FedAvg(weighted=False, precision="float64"), ups)
    np.testing.assert_allclose(r.weights["w"], ref.weights["w"], rtol=0, atol=1e-15)
    assert r.metrics["num_trimmed"] == 0 and r.metrics["num_averaged"] == 7


def test_trimmed_mean_hand_computed() -> None:
    # beta = 0.2 of n = 5: one value dropped at each end of every coordinate
    ups = vec_updates([[1, -100, 5], [2, 5, 5], [3, 5, 5], [4, 6, 5], [100, 7, 5]])
    r = aggregate(TrimmedMean(beta=0.2), ups)
    np.testing.assert_allclose(r.weights["w"], [3.0, 16 / 3, 5.0], rtol=1e-15)
    assert r.metrics["num_trimmed"] == 1 and r.metrics["num_averaged"] == 3
    # beta = 0.25 of n = 8: floor(2.0) = 2 per end; 0.24 of 8 -> 1 per end
    rows = [[v] for v in (-50, 1, 2, 3, 4, 5, 6, 90)]
    assert aggregate(TrimmedMean(beta=0.25), vec_updates(rows)).weights["w"].tolist() == [3.5]
    r = aggregate(TrimmedMean(beta=0.24), vec_updates(rows))
    np.testing.assert_allclose(r.weights["w"], [21 / 6])


def test_trimmed_mean_rejects_beta_out_of_range() -> None:
    for beta in (-0.1, 0.5, 0.7):
        with pytest.raises(ValueError, match="beta"):
            TrimmedMean(beta=beta)
    with pytest.raises(ConfigError):
        strategies.create("trimmed_mean", beta=0.5)


# -------------------------------------------------------------------------- Krum
def test_krum_hand_computed_scores() -> None:
    # n = 5, f = 1: each score sums the squared distances to the 2 nearest others
    # 0: 1 + 4 = 5; 1: 1 + 1 = 2; 2: 1 + 4 = 5; 10: 1 + 64 = 65; 11: 1 + 81 = 82
    ups = vec_updates([[0.0], [1.0], [2.0], [10.0], [11.0]])
    strat = Krum(f=1)
    np.testing.assert_allclose(strat.scores({"w": np.zeros(1)}, ups), [5, 2, 5, 65, 82])
    r = aggregate(strat, ups)
    assert r.weights["w"].tolist() == [1.0]
    assert r.metrics["selected"] == "a1" and r.metrics["score"] == pytest.approx(2.0)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("f", [1, 2, 3])
def test_krum_never_selects_the_far_outlier(seed: int, f: int) -> None:
    rng = np.random.default_rng(seed)
    x = rng.normal(0.0, 1.0, (10, 30))
    bad = int(rng.integers(0, 10))
    x[bad] = rng.uniform(-500, 500, 30)
    ups = vec_updates(x)
    r = aggregate(Krum(f=f), ups)
    assert r.metrics["selected"] != f"a{bad}"
    chosen = int(str(r.metrics["selected"])[1:])
    np.testing.assert_array_equal(r.weights["w"], x[chosen])


def test_krum_refuses_too_few_updates_with_the_count_needed() -> None:
    rng = np.random.default_rng(0)
    ups = vec_updates(rng.standard_normal((11, 4)))
    strat = Krum(f=4)  # needs n > 2f + 2 = 10
    acc = strat.begin({"w": np.zeros(4)}, {})
    for u in ups[:10]:
        acc.add(u)
    with pytest.raises(ValueError, match=r"f=4.*at least 11 updates, got 10"):
        acc.result()
    acc.add(ups[10])  # the refusal did not use up the round
    assert acc.result().metrics["num_updates"] == 11
    with pytest.raises(ValueError, match="at least 5 updates, got 4"):
        aggregate(Krum(f=1), ups[:4])
    with pytest.raises(ValueError, match="at least 5 updates, got 3"):
        aggregate(MultiKrum(f=1), ups[:3])


def test_krum_rejects_bad_parameters() -> None:
    with pytest.raises(ValueError, match="f"):
        Krum(f=-1)
    with pytest.raises(ValueError, match="max_updates"):
        Krum(f=2, max_updates=6)  # could never reach the 7 updates it needs
    with pytest.raises(ValueError, match="m "):
        MultiKrum(f=1, m=0)
    with pytest.raises(ConfigError):
        strategies.create("krum", f=-1)
    with pytest.raises(ConfigError):
        strategies.create("krum", byzantine=1)


def test_distances_survive_large_weights_and_a_wild_update() -> None:
    # models far from the origin, close to the global model and to each other, plus one
    # absurd update: the distances between the others stay exact (Gram of the deltas)
    rng = np.random.default_rng(1)
    g = 1e6 + rng.standard_normal(1000)
    x = g + rng.standard_normal((6, 1000)) * 1e-3
    x[4] = 1e30
    ups = vec_updates(x)
    got = pairwise_sq_distances({"w": g}, ups)
    want = ((x[:, None, :] - x[None, :, :]) ** 2).sum(axis=2)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
    r = aggregate(Krum(f=1), ups, {"w": g})
    assert r.metrics["selected"] != "a4"
    r = aggregate(GeometricMedian(), ups, {"w": g})
    assert np.abs(r.weights["w"] - g).max() < 1e-2


# -------------------------------------------------------------------- Multi-Krum
def test_multikrum_is_the_mean_of_its_selection_and_excludes_the_outlier() -> None:
    x, _ = book_harness(4)
    ups = vec_updates(x)
    r = aggregate(MultiKrum(f=2), ups)
    sel = str(r.metrics["selected"]).split(",")
    assert len(sel) == r.metrics["num_selected"] == 8  # default m = n - f
    assert "a0" not in sel and len(set(sel)) == 8
    idx = [int(s[1:]) for s in sel]
    np.testing.assert_allclose(r.weights["w"], x[idx].mean(axis=0), rtol=1e-13)
    r3 = aggregate(MultiKrum(f=2, m=3), ups)
    idx3 = [int(s[1:]) for s in str(r3.metrics["selected"]).split(",")]
    assert idx3 == idx[:3]  # best scores first
    np.testing.assert_allclose(r3.weights["w"], x[idx3].mean(axis=0), rtol=1e-13)


def test_multikrum_with_m_equal_n_is_the_mean() -> None:
    rng = np.random.default_rng(5)
    ups = vec_updates(rng.standard_normal((9, 12)), samples=[3, 1, 4, 1, 5, 9, 2, 6, 5])
    r = aggregate(MultiKrum(f=1, m=9), ups)
    ref = aggregate(FedAvg(weighted=False, precision="float64"), ups)
    np.testing.assert_allclose(r.weights["w"], ref.weights["w"], rtol=0, atol=1e-15)
    assert r.metrics["num_selected"] == 9
    assert aggregate(MultiKrum(f=1, m=50), ups).metrics["num_selected"] == 9


# -------------------------------------------------------------- geometric median
def test_geometric_median_of_symmetric_points_is_their_centre() -> None:
    c = np.array([3.0, -2.0, 7.5])
    offsets = np.concatenate(
        [np.eye(3) * 2.0, -np.eye(3) * 2.0, [[1.0, 1.0, 1.0], [-1.0, -1.0, -1.0]]]
    )
    r = aggregate(GeometricMedian(), vec_updates(c + offsets))
    np.testing.assert_allclose(r.weights["w"], c, rtol=0, atol=1e-12)
    assert r.metrics["converged"] is True


def test_geometric_median_matches_a_direct_weiszfeld() -> None:
    rng = np.random.default_rng(11)
    x = rng.standard_normal((9, 6))
    x[2] += 40.0
    strat = GeometricMedian(eps=1e-12, max_iter=10_000)
    r = aggregate(strat, vec_updates(x))
    want = weiszfeld_direct(x)
    np.testing.assert_allclose(r.weights["w"], want, rtol=0, atol=1e-7)
    obj = float(np.linalg.norm(x - r.weights["w"], axis=1).sum())
    assert r.metrics["objective"] == pytest.approx(obj, rel=1e-9)
    # it beats the mean and the coordinate median on its own objective
    for other in (x.mean(axis=0), np.median(x, axis=0)):
        assert obj < float(np.linalg.norm(x - other, axis=1).sum())


def test_geometric_median_stops_at_max_iter() -> None:
    x, _ = book_harness(0)
    r = aggregate(GeometricMedian(max_iter=3, eps=1e-15), vec_updates(x))
    assert r.metrics["iterations"] == 3 and r.metrics["converged"] is False
    assert np.all(np.isfinite(r.weights["w"]))
    r = aggregate(GeometricMedian(max_iter=100), vec_updates(x))
    assert 1 <= int(r.metrics["iterations"]) < 100 and r.metrics["converged"] is True


def test_geometric_median_of_identical_points_has_no_nan() -> None:
    p = np.array([1.5, -2.0, 0.25, 1e6])
    r = aggregate(GeometricMedian(), vec_updates(np.tile(p, (5, 1))))
    assert np.all(np.isfinite(r.weights["w"]))
    np.testing.assert_allclose(r.weights["w"], p, rtol=1e-15)
    assert r.metrics["iterations"] == 1 and r.metrics["converged"] is True
    assert r.metrics["objective"] == pytest.approx(0.0, abs=1e-6)
    # a majority of identical points: the median is that point (zero distances on the way)
    rows = np.vstack([np.tile(p, (4, 1)), p + 10.0, p - [30.0, 0, 0, 0]])
    r = aggregate(GeometricMedian(), vec_updates(rows))
    assert np.all(np.isfinite(r.weights["w"]))
    np.testing.assert_allclose(r.weights["w"], p, rtol=0, atol=1e-4)


def test_geometric_median_weighted_by_samples() -> None:
    # 1-d: the weighted geometric median is the weighted median
    ups = vec_updates([[0.0], [1.0], [10.0]], samples=[1, 1, 5])
    r = aggregate(GeometricMedian(weighted=True, eps=1e-12, max_iter=1000), ups)
    np.testing.assert_allclose(r.weights["w"], [10.0], atol=1e-4)
    r = aggregate(GeometricMedian(), ups)
    np.testing.assert_allclose(r.weights["w"], [1.0], atol=1e-4)


# ------------------------------------------------------------------------- Bulyan
def test_bulyan_hand_computed() -> None:
    # n = 7, f = 1: theta = 5 picked by repeated Krum, beta = 3 averaged per coordinate.
    # Krum over all 7 (4 nearest): 0: 111, 1: 78, 5: 1+4+16+25 = 46, 6: 63, 7: 90 -> 5;
    # over 6 (3 nearest): 1 and 6 tie at 62 -> 1 (arrived first); over 5 (2 nearest): 6 (37);
    # over 4 (1 nearest): 0 and 7 tie at 49 -> 0; over 3: 7 (2809, tie with 60) -> 7.
    # The outliers 60 and -50 stay out. Sorted selection 0 1 5 6 7, median 5, the 3 values
    # closest to it: 5 6 7 -> 6.0 (the trimmed mean would give 4.0, the lowest window 2.0).
    ups = vec_updates([[0.0], [1.0], [5.0], [6.0], [7.0], [60.0], [-50.0]])
    r = aggregate(Bulyan(f=1), ups)
    assert r.metrics["selected"] == "a2,a1,a3,a0,a4"
    assert r.metrics["num_selected"] == 5 and r.metrics["num_averaged"] == 3
    assert r.weights["w"].tolist() == [6.0]
    # the window can sit anywhere: 0 1 2 6 7 -> median 2 -> 0 1 2 -> 1.0
    ups = vec_updates([[0.0], [1.0], [2.0], [6.0], [7.0], [50.0], [-40.0]])
    assert aggregate(Bulyan(f=1), ups).weights["w"].tolist() == [1.0]
    # closest to the median, not the tightest window: 0 0 3 4 9 (median 3) -> 0 3 4
    ups = vec_updates([[0.0], [0.0], [3.0], [4.0], [9.0], [80.0], [-90.0]])
    np.testing.assert_allclose(aggregate(Bulyan(f=1), ups).weights["w"], [7 / 3])
    # equally far from the median: the smaller value is kept (2 4 6 10 12 -> 2 4 6)
    ups = vec_updates([[2.0], [4.0], [6.0], [10.0], [12.0], [99.0], [-99.0]])
    assert aggregate(Bulyan(f=1), ups).weights["w"].tolist() == [4.0]


def test_bulyan_refuses_fewer_than_4f_plus_3() -> None:
    rng = np.random.default_rng(2)
    ups = vec_updates(rng.standard_normal((11, 3)))
    with pytest.raises(ValueError, match=r"f=2.*at least 11 updates, got 10"):
        aggregate(Bulyan(f=2), ups[:10])
    r = aggregate(Bulyan(f=2), ups)
    assert r.metrics["num_selected"] == 7 and r.metrics["num_averaged"] == 3


def test_bulyan_resists_the_outliers() -> None:
    x, true = book_harness(7)
    r = aggregate(Bulyan(f=1), vec_updates(x))
    assert "a0" not in str(r.metrics["selected"]).split(",")
    assert float(np.abs(r.weights["w"] - true).mean()) < 1.5


# ----------------------------------------------------------------------- NormClip
def test_normclip_clips_exactly_to_the_bound() -> None:
    g: Weights = {"w": np.array([1.0, 1.0, 1.0]), "b": np.array([2.0])}
    big = {"w": np.array([4.0, 5.0, 1.0]), "b": np.array([14.0])}  # delta (3, 4, 0, 12): 13
    r = aggregate(NormClip(bound=2.6), [Update("a", big, 3)], template=g)
    d = np.concatenate([r.weights["w"] - g["w"], r.weights["b"] - g["b"]])
    assert np.linalg.norm(d) == pytest.approx(2.6, rel=1e-14)
    np.testing.assert_allclose(d, np.array([3.0, 4.0, 0.0, 12.0]) * 0.2, rtol=1e-14)
    assert r.metrics["num_clipped"] == 1 and r.metrics["max_update_norm"] == pytest.approx(13.0)


def test_normclip_leaves_small_updates_unchanged() -> None:
    g: Weights = {"w": np.array([1.0, 1.0])}
    small = [
        Update("a", {"w": np.array([1.3, 1.4])}, 1),
        Update("b", {"w": np.array([0.9, 1.0])}, 3),
    ]
    r = aggregate(NormClip(bound=0.5), small, template=g)
    ref = aggregate(FedAvg(precision="float64"), small, template=g)
    np.testing.assert_array_equal(r.weights["w"], ref.weights["w"])
    assert r.metrics["num_clipped"] == 0


def test_normclip_weighted_mean_of_clipped_models() -> None:
    g: Weights = {"w": np.array([1.0, 1.0])}
    ups = [
        Update("a", {"w": np.array([4.0, 5.0])}, 1),  # delta (3, 4) -> (0.6, 0.8)
        Update("b", {"w": np.array([1.3, 1.4])}, 3),
    ]  # delta (0.3, 0.4) unchanged
    r = aggregate(NormClip(bound=1.0), ups, template=g)
    np.testing.assert_allclose(r.weights["w"], [1.375, 1.5], rtol=1e-15)
    r = aggregate(NormClip(bound=1.0, weighted=False), ups, template=g)
    np.testing.assert_allclose(r.weights["w"], [1.45, 1.6], rtol=1e-15)
    assert NormClip.streaming is True


def test_normclip_needs_a_positive_bound() -> None:
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="bound"):
            NormClip(bound=bad)
    with pytest.raises(ConfigError):
        strategies.create("normclip")


# ------------------------------------------------------------- shared behaviour
def make(name: str) -> Strategy:
    params: dict[str, dict[str, Any]] = {
        "trimmed_mean": {"beta": 0.2},
        "krum": {"f": 1},
        "multikrum": {"f": 1},
        "bulyan": {"f": 1},
        "normclip": {"bound": 100.0},
    }
    return strategies.create(name, **params.get(name, {}))


@pytest.mark.parametrize("name", ROBUST)
def test_dtypes_and_shapes_preserved(name: str) -> None:
    rng = np.random.default_rng(8)
    ups = []
    for i in range(7):
        ups.append(
            Update(
                f"a{i}",
                {
                    "f32": rng.standard_normal((3, 4)).astype(np.float32),
                    "f16": rng.standard_normal(5).astype(np.float16),
                    "i32": rng.integers(-5, 5, 4).astype(np.int32),
                    "u8": rng.integers(0, 255, 2).astype(np.uint8),
                    "m": rng.random(3) < 0.5,
                    "s0": np.array(rng.standard_normal(), dtype=np.float32),  # 0-d
                    "empty": np.zeros((0, 3), np.float64),
                },
                int(rng.integers(1, 10)),
            )
        )
    tmpl = {k: np.zeros_like(v) for k, v in ups[0].weights.items()}
    r = aggregate(make(name), ups, template=tmpl)
    assert list(r.weights) == list(tmpl)
    for k, ref in tmpl.items():
        assert r.weights[k].dtype == ref.dtype, k
        assert r.weights[k].shape == ref.shape, k
        assert np.all(np.isfinite(r.weights[k].astype(np.float64)))
    # values lie within the coordinate range of the inputs (all rules are averages)
    for k in ("f32", "i32", "u8"):
        stack = np.stack([u.weights[k] for u in ups]).astype(np.float64)
        out = r.weights[k].astype(np.float64)
        assert np.all(out >= stack.min(axis=0) - 1e-3) and np.all(out <= stack.max(axis=0) + 1e-3)


@pytest.mark.parametrize("name", ROBUST)
def test_result_does_not_alias_the_inputs(name: str) -> None:
    rng = np.random.default_rng(9)
    ups = vec_updates(rng.standard_normal((7, 5)))
    r = aggregate(make(name), ups)
    before = r.weights["w"].copy()
    for u in ups:
        u.weights["w"][:] = 1e9
    np.testing.assert_array_equal(r.weights["w"], before)


@pytest.mark.parametrize("cls", [Median, TrimmedMean, Krum, MultiKrum, GeometricMedian, Bulyan])
def test_max_updates_enforced(cls: type[Strategy]) -> None:
    strat = cls(max_updates=7)  # type: ignore[call-arg]
    assert strat.streaming is False
    acc = strat.begin({"w": np.zeros(2)}, {})
    ups = vec_updates(np.arange(16.0).reshape(8, 2))
    for u in ups[:7]:
        acc.add(u)
    with pytest.raises(InvalidUpdate, match="at most 7"):
        acc.add(ups[7])
    assert acc.result().metrics["num_updates"] == 7
    with pytest.raises(ValueError, match="already taken"):
        acc.result()
    with pytest.raises(ValueError, match="max_updates"):
        cls(max_updates=0)  # type: ignore[call-arg]


def test_registered_with_parameters() -> None:
    names = strategies.names()
    for n in ROBUST:
        assert n in names
    params = {d["name"]: d["params"] for d in strategies.describe()}
    assert params["krum"] == {"f": 1, "max_updates": 1000}
    assert params["multikrum"] == {"f": 1, "m": None, "max_updates": 1000}
    assert params["trimmed_mean"] == {"beta": 0.1, "max_updates": 1000}
    assert params["geometric_median"] == {
        "max_iter": 100,
        "eps": 1e-6,
        "nu": 1e-6,
        "weighted": False,
        "max_updates": 1000,
    }
    assert params["bulyan"] == {"f": 1, "max_updates": 1000}
    assert params["normclip"] == {"bound": None, "weighted": True}
    streaming = {d["name"]: d["streaming"] for d in strategies.describe()}
    assert streaming["normclip"] and not streaming["median"]


def test_empty_round_raises_value_error() -> None:
    for name in ROBUST:
        acc = make(name).begin({"w": np.zeros(2)}, {})
        with pytest.raises(ValueError):
            acc.result()


# ------------------------------------------------------------ the book's harness
@pytest.mark.parametrize("seed", range(5))
def test_book_robust_estimator_harness(seed: int) -> None:
    x, true = book_harness(seed)
    ups = vec_updates(x)
    tmpl: Weights = {"w": np.zeros(15)}

    def err(strat: Strategy) -> float:
        return float(np.abs(aggregate(strat, ups, tmpl).weights["w"] - true).mean())

    mean_err = err(FedAvg(weighted=False, precision="float64"))
    assert mean_err > 10.0  # ~250 / K per coordinate
    for strat in (
        Median(),
        GeometricMedian(),
        Krum(f=2),
        MultiKrum(f=2),
        TrimmedMean(beta=0.1),
        Bulyan(f=1),
    ):
        e = err(strat)
        assert e < 2.0, (strat.name, e)
        assert e < mean_err / 10, (strat.name, e, mean_err)


# ------------------------------------------------ block-wise code on large tensors
def test_blockwise_rules_match_numpy_on_a_large_tensor() -> None:
    rng = np.random.default_rng(12)
    x = rng.standard_normal((7, 200_003)).astype(np.float32)  # several working blocks
    x[3, ::5] = 1e30  # a wild agent on some coordinates
    ups = vec_updates(x, dtype=np.float32)
    tmpl: Weights = {"w": np.zeros(200_003, np.float32)}
    x64 = x.astype(np.float64)
    s = np.sort(x64, axis=0)
    med = aggregate(Median(), ups, tmpl).weights["w"]
    np.testing.assert_array_equal(med, s[3].astype(np.float32))
    tm = aggregate(TrimmedMean(beta=0.3), ups, tmpl).weights["w"]
    np.testing.assert_array_equal(tm, (s[2:5].sum(axis=0) / 3).astype(np.float32))
    # Bulyan with f = 1 keeps 5 and averages, per coordinate, the 3 closest to their median
    r = aggregate(Bulyan(f=1), ups, tmpl)
    chosen = sorted(int(a[1:]) for a in str(r.metrics["selected"]).split(","))
    sel = np.sort(x64[chosen], axis=0)
    dist = np.abs(sel - sel[2])
    keep = np.argsort(dist, axis=0, kind="stable")[:3]
    want = np.take_along_axis(sel, keep, axis=0).mean(axis=0)
    np.testing.assert_allclose(r.weights["w"], want.astype(np.float32), rtol=1e-6)
    got = pairwise_sq_distances(tmpl, ups)
    ref = np.array([[float(((x64[i] - x64[j]) ** 2).sum()) for j in range(7)] for i in range(7)])
    np.testing.assert_allclose(got, ref, rtol=1e-9)


def test_streaming_mean_is_blockwise_but_exact() -> None:
    # WeightedMean (FedAvg, Multi-Krum, NormClip) works in blocks: the numbers must be
    # exactly those of the whole-array float64 expression
    rng = np.random.default_rng(13)
    xs = [rng.standard_normal(100_003).astype(np.float32) for _ in range(5)]
    ns = [3, 1, 7, 2, 5]
    ups = [Update(f"a{i}", {"w": x}, n) for i, (x, n) in enumerate(zip(xs, ns, strict=True))]
    # float64 template: no final rounding
    acc = FedAvg(precision="float64").begin({"w": np.zeros(100_003)}, {})
    for u in ups:
        acc.add(u)
    want = xs[0].astype(np.float64) * ns[0]
    for x, n in zip(xs[1:], ns[1:], strict=True):
        want = want + x.astype(np.float64) * n
    np.testing.assert_array_equal(acc.result().weights["w"], want / sum(ns))
    r = aggregate(MultiKrum(f=1, m=5), ups, {"w": np.zeros(100_003, np.float32)})
    mean = np.asarray(sum(x.astype(np.float64) for x in xs)) / 5
    np.testing.assert_array_equal(r.weights["w"], mean.astype(np.float32))
