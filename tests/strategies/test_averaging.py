"""FedSGD, FedAvgM and the FedOpt family: formulas, FedAvg equivalences, state round trips."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest

from fedstack import strategies
from fedstack.errors import ConfigError, InvalidUpdate
from fedstack.store.blobs import BlobStore
from fedstack.store.repository import split_state
from fedstack.strategies import FedAvg, Result, Strategy, Update
from fedstack.strategies.averaging import (
    FedAdagrad,
    FedAdam,
    FedAvgM,
    FedOpt,
    FedSGD,
    FedYogi,
)
from fedstack.types import Weights

TAU = 1e-3


def run(strat: Strategy, x: Weights, state: dict[str, Any], updates: list[Update]) -> Result:
    acc = strat.begin(x, state)
    for u in updates:
        strat.check(u, x)
        acc.add(u)
    assert acc.count == len(updates)
    return acc.result()


def rounds(
    strat: Strategy, x: Weights, batches: list[list[Update]], state: dict[str, Any] | None = None
) -> tuple[Weights, dict[str, Any]]:
    st = strat.init_state(x) if state is None else state
    for ups in batches:
        r = run(strat, x, st, ups)
        x, st = r.weights, r.state
    return x, st


def random_round(
    rng: np.random.Generator, x: Weights, k: int = 3, scale: float = 0.5
) -> list[Update]:
    out = []
    for i in range(k):
        w: Weights = {}
        for name, ref in x.items():
            if ref.dtype.kind == "f":
                w[name] = (ref + scale * rng.standard_normal(ref.shape)).astype(ref.dtype)
            else:
                w[name] = (ref + rng.integers(0, 3, ref.shape)).astype(ref.dtype)
        out.append(Update(f"a{i}", w, int(rng.integers(1, 20))))
    return out


def model(rng: np.random.Generator) -> Weights:
    return {
        "w": rng.standard_normal((3, 2)),
        "b": rng.standard_normal(4).astype(np.float32),
        "steps": np.array([5, 7], np.int64),
    }


# ---------------------------------------------------------------- equivalences with FedAvg
@pytest.mark.parametrize("weighted", [True, False])
def test_fedopt_sgd_lr1_no_momentum_is_fedavg_exactly(weighted: bool) -> None:
    rng = np.random.default_rng(0)
    x = model(rng)
    for strat in (
        FedOpt(weighted=weighted),
        FedOpt("sgd", server_lr=1.0, momentum=0.0, weighted=weighted),
        FedAvgM(server_lr=1.0, momentum=0.0, weighted=weighted),
    ):
        xa, xo = x, x
        st = strat.init_state(x)
        for _ in range(3):
            ups = random_round(rng, xa)
            ref = run(FedAvg(weighted=weighted, precision="float64"), xa, {}, ups).weights
            res = run(strat, xo, st, ups)
            for k in x:
                assert res.weights[k].dtype == x[k].dtype
                np.testing.assert_array_equal(res.weights[k], ref[k])
            xa, xo, st = ref, res.weights, res.state
        assert st["step"] == 3


def test_fedsgd_lr1_is_fedavg_of_one_step_models() -> None:
    # agents: least squares on their data; one full-batch gradient step from x
    rng = np.random.default_rng(1)
    x: Weights = {"w": rng.standard_normal(3), "b": np.array([0.25], np.float32)}
    eta = 0.1
    data = [(rng.standard_normal((n, 3)), rng.standard_normal(n)) for n in (4, 7, 2)]
    ups, grads = [], []
    for i, (a, y) in enumerate(data):
        resid = a @ x["w"] + float(x["b"][0]) - y
        g: Weights = {"w": 2 * a.T @ resid / len(y), "b": np.array([2 * resid.mean()])}
        grads.append(g)
        w: Weights = {"w": x["w"] - eta * g["w"], "b": (x["b"] - eta * g["b"]).astype(np.float32)}
        ups.append(Update(f"a{i}", w, len(y), metrics={"local_steps": 1}))
    out = run(FedSGD(), x, {}, ups).weights
    ref = run(FedAvg(precision="float64"), x, {}, ups).weights
    np.testing.assert_array_equal(out["w"], ref["w"])
    np.testing.assert_array_equal(out["b"], ref["b"])
    assert out["b"].dtype == np.float32
    # ... which is one step of gradient descent with the sample-weighted mean gradient
    n = np.array([len(y) for _, y in data], float)
    g_mean = sum(g["w"] * k for g, k in zip(grads, n, strict=True)) / n.sum()
    np.testing.assert_allclose(out["w"], x["w"] - eta * g_mean, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------- hand-computed cases
X0: Weights = {"w": np.array([1.0, 2.0]), "b": np.array([0.0], np.float32)}
R1 = [
    Update("a", {"w": np.array([2.0, 2.0]), "b": np.array([1.0], np.float32)}, 1),
    Update("b", {"w": np.array([1.0, 5.0]), "b": np.array([-1.0], np.float32)}, 3),
]
# Delta1 = mean - x0 = ([1.25, 4.25] - [1, 2], -0.5) = ([0.25, 2.25], -0.5)


def test_fedsgd_server_lr_hand_computed() -> None:
    out = run(FedSGD(lr=2.0), X0, {}, R1)
    np.testing.assert_array_equal(out.weights["w"], [1.5, 6.5])  # x + 2 Delta
    np.testing.assert_array_equal(out.weights["b"], np.array([-1.0], np.float32))
    assert out.weights["b"].dtype == np.float32
    assert out.metrics["num_updates"] == 2 and out.metrics["num_samples"] == 4
    assert out.metrics["delta_norm"] == pytest.approx(math.sqrt(0.25**2 + 2.25**2 + 0.5**2))


def test_fedsgd_gradient_uploads() -> None:
    x: Weights = {
        "w": np.array([1.0, 2.0]),
        "b": np.array([0.5], np.float32),
        "n": np.array([3], np.int32),
    }
    ups = [
        Update(
            "a",
            {
                "w": np.array([1.0, -2.0]),
                "b": np.array([4.0], np.float32),
                "n": np.array([9], np.int32),
            },
            1,
        ),
        Update(
            "b",
            {
                "w": np.array([5.0, 2.0]),
                "b": np.array([0.0], np.float32),
                "n": np.array([9], np.int32),
            },
            3,
        ),
    ]
    out = run(FedSGD(lr=0.5, upload="gradient"), x, {}, ups).weights
    # mean gradient ([4, 1], [1]); x - 0.5 * g
    np.testing.assert_array_equal(out["w"], [-1.0, 1.5])
    np.testing.assert_array_equal(out["b"], np.array([0.0], np.float32))
    np.testing.assert_array_equal(out["n"], [3])  # integer tensors keep their value
    assert out["n"].dtype == np.int32 and out["b"].dtype == np.float32


def test_fedsgd_refuses_several_local_steps() -> None:
    strat = FedSGD()
    ok = Update("a", X0, 1, metrics={"local_steps": 1})
    strat.check(ok, X0)
    strat.check(Update("a", X0, 1), X0)  # not reported: fine
    for bad in (5, 0, 2.5, "1", True):
        with pytest.raises(InvalidUpdate, match="one"):
            strat.check(Update("a", X0, 1, metrics={"local_steps": bad}), X0)
        acc = strat.begin(X0, {})
        with pytest.raises(InvalidUpdate):
            acc.add(Update("a", X0, 1, metrics={"local_steps": bad}))


def test_fedavgm_two_rounds_hand_computed() -> None:
    strat = FedAvgM(server_lr=2.0, momentum=0.5)
    st = strat.init_state(X0)
    assert set(st) == {"step", "v/w", "v/b"}
    r1 = run(strat, X0, st, R1)
    # v1 = Delta1; x1 = x0 + 2 v1
    np.testing.assert_array_equal(r1.state["v/w"], [0.25, 2.25])
    np.testing.assert_array_equal(r1.state["v/b"], [-0.5])
    np.testing.assert_array_equal(r1.weights["w"], [1.5, 6.5])
    np.testing.assert_array_equal(r1.weights["b"], np.array([-1.0], np.float32))
    r2 = run(
        strat,
        r1.weights,
        r1.state,
        [
            Update("a", {"w": np.array([2.5, 6.5]), "b": np.array([-1.0], np.float32)}, 1),
            Update("b", {"w": np.array([1.5, 6.5]), "b": np.array([-1.0], np.float32)}, 1),
        ],
    )
    # Delta2 = ([0.5, 0], 0); v2 = 0.5 v1 + Delta2; x2 = x1 + 2 v2
    np.testing.assert_array_equal(r2.state["v/w"], [0.625, 1.125])
    np.testing.assert_array_equal(r2.state["v/b"], [-0.25])
    np.testing.assert_array_equal(r2.weights["w"], [2.75, 8.75])
    np.testing.assert_array_equal(r2.weights["b"], np.array([-1.5], np.float32))
    assert r2.weights["b"].dtype == np.float32 and r2.state["step"] == 2
    # the previous state was not modified in place
    np.testing.assert_array_equal(r1.state["v/w"], [0.25, 2.25])


def test_fedadagrad_first_step_hand_computed() -> None:
    r = run(FedAdagrad(), X0, FedAdagrad().init_state(X0), R1)
    # m = 0.1 Delta; v = tau^2 + Delta^2; x + 0.1 m / (sqrt(v) + tau)
    for d, x0, got in ((0.25, 1.0, r.weights["w"][0]), (2.25, 2.0, r.weights["w"][1])):
        assert got == pytest.approx(
            x0 + 0.1 * 0.1 * d / (math.sqrt(1e-6 + d * d) + 1e-3), rel=1e-15
        )
    assert r.weights["b"][0] == pytest.approx(
        -0.1 * 0.05 / (math.sqrt(1e-6 + 0.25) + 1e-3), rel=1e-6
    )
    np.testing.assert_allclose(r.state["m/w"], [0.025, 0.225], rtol=1e-15)
    np.testing.assert_allclose(r.state["v/w"], [1e-6 + 0.0625, 1e-6 + 5.0625], rtol=1e-15)


# ---------------------------------------------------------------- adaptive: reference
def reference_step(
    kind: str,
    x: float,
    delta: float,
    m: float,
    v: float,
    *,
    eta: float,
    b1: float,
    b2: float,
    tau: float,
) -> tuple[float, float, float]:
    """Reddi et al. 2021, Algorithm 2, one coordinate, written out by hand."""
    m = b1 * m + (1 - b1) * delta
    if kind == "adagrad":
        v = v + delta * delta
    elif kind == "adam":
        v = b2 * v + (1 - b2) * delta * delta
    else:
        diff = v - delta * delta
        sign = 1.0 if diff > 0 else (-1.0 if diff < 0 else 0.0)
        v = v - (1 - b2) * delta * delta * sign
    return x + eta * m / (math.sqrt(v) + tau), m, v


def reference_rounds(
    kind: str,
    x: Weights,
    batches: list[list[Update]],
    *,
    eta: float,
    b1: float,
    b2: float,
    tau: float,
) -> tuple[Weights, dict[str, Any]]:
    xs = {k: [float(t) for t in v.ravel()] for k, v in x.items()}
    ms = {k: [0.0] * len(v) for k, v in xs.items()}
    vs = {k: [tau * tau] * len(v) for k, v in xs.items()}
    for ups in batches:
        total = sum(u.num_samples for u in ups)
        for k in xs:
            for i in range(len(xs[k])):
                mean = sum(u.num_samples * float(u.weights[k].ravel()[i]) for u in ups) / total
                xs[k][i], ms[k][i], vs[k][i] = reference_step(
                    kind,
                    xs[k][i],
                    mean - xs[k][i],
                    ms[k][i],
                    vs[k][i],
                    eta=eta,
                    b1=b1,
                    b2=b2,
                    tau=tau,
                )
        # the strategy's next round starts from the model cast to its dtype
        xs = {k: [float(t) for t in np.asarray(v, x[k].dtype)] for k, v in xs.items()}
    out = {k: np.asarray(v).reshape(x[k].shape).astype(x[k].dtype) for k, v in xs.items()}
    state: dict[str, Any] = {f"m/{k}": np.asarray(v) for k, v in ms.items()}
    state.update({f"v/{k}": np.asarray(v) for k, v in vs.items()})
    return out, state


@pytest.mark.parametrize(
    "kind,strat",
    [
        ("adagrad", FedAdagrad()),
        ("adam", FedAdam()),
        ("yogi", FedYogi()),
        ("adam", FedAdam(server_lr=0.5, beta1=0.5, beta2=0.9, tau=1e-2)),
        ("yogi", FedOpt("yogi", server_lr=0.3, momentum=0.2, beta2=0.5, tau=0.05)),
        ("adagrad", FedOpt("adagrad", server_lr=1.0, momentum=0.0, tau=1e-4)),
    ],
)
def test_adaptive_two_rounds_match_reference(kind: str, strat: FedOpt) -> None:
    r1 = run(strat, X0, strat.init_state(X0), R1)
    x1 = r1.weights
    # round 2: one coordinate moves a lot, one a little, and one not at all (b)
    r2_updates = [
        Update("a", {"w": x1["w"] + np.array([3.0, 0.03]), "b": x1["b"].copy()}, 2),
        Update("c", {"w": x1["w"] + np.array([1.0, -0.01]), "b": x1["b"].copy()}, 2),
    ]
    r2 = run(strat, x1, r1.state, r2_updates)
    ref_x, ref_state = reference_rounds(
        kind,
        X0,
        [R1, r2_updates],
        eta=strat.server_lr,
        b1=strat.momentum,
        b2=strat.beta2,
        tau=strat.tau,
    )
    np.testing.assert_allclose(r2.weights["w"], ref_x["w"], rtol=1e-13)
    assert r2.weights["b"].dtype == np.float32
    np.testing.assert_allclose(r2.weights["b"], ref_x["b"], rtol=1e-6)
    for key in ("m/w", "v/w", "m/b", "v/b"):
        np.testing.assert_allclose(r2.state[key], ref_state[key], rtol=1e-12, atol=1e-300)
    assert r2.state["step"] == 2
    if kind == "yogi":  # v grew on coordinate 0 and decreased on the small coordinate 1
        assert r2.state["v/w"][0] > r1.state["v/w"][0]
        assert r2.state["v/w"][1] < r1.state["v/w"][1]
        assert r2.state["v/b"][0] == r1.state["v/b"][0]  # Delta = 0: unchanged


def test_adaptive_differs_between_variants() -> None:
    # the three rules agree on round 1 only if they are wired to the same formula
    outs = [
        run(s, X0, s.init_state(X0), R1).state["v/w"] for s in (FedAdagrad(), FedAdam(), FedYogi())
    ]
    # adagrad: tau^2 + D^2 ; adam: 0.99 tau^2 + 0.01 D^2 ; yogi: tau^2 + 0.01 D^2
    d2 = np.array([0.0625, 5.0625])
    np.testing.assert_allclose(outs[0], 1e-6 + d2, rtol=1e-14)
    np.testing.assert_allclose(outs[1], 0.99e-6 + 0.01 * d2, rtol=1e-14)
    np.testing.assert_allclose(outs[2], 1e-6 + 0.01 * d2, rtol=1e-14)


def test_integer_tensors_take_the_mean_and_have_no_moments() -> None:
    x: Weights = {"w": np.array([0.0]), "n": np.array([10], np.int32), "m": np.array([True, False])}
    ups = [
        Update(
            "a",
            {"w": np.array([1.0]), "n": np.array([11], np.int32), "m": np.array([True, True])},
            1,
        ),
        Update(
            "b",
            {"w": np.array([1.0]), "n": np.array([14], np.int32), "m": np.array([False, True])},
            3,
        ),
    ]
    s = FedAdam()
    assert set(s.init_state(x)) == {"step", "m/w", "v/w"}
    r = run(s, x, s.init_state(x), ups)
    assert r.weights["n"].dtype == np.int32 and r.weights["n"].tolist() == [13]
    assert r.weights["m"].dtype == np.bool_ and r.weights["m"].tolist() == [False, True]
    assert set(r.state) == {"step", "m/w", "v/w"}


def test_empty_state_is_the_initial_state() -> None:
    for s in (FedAdam(), FedYogi(), FedAdagrad(), FedAvgM()):
        a = run(s, X0, {}, R1)
        b = run(s, X0, s.init_state(X0), R1)
        for k in X0:
            np.testing.assert_array_equal(a.weights[k], b.weights[k])
        assert a.state.keys() == b.state.keys()


def test_foreign_state_is_refused() -> None:
    with pytest.raises(ValueError, match="shape"):
        FedAdam().begin(X0, {"step": 3, "m/w": np.zeros(5), "v/w": np.ones(2)})


def test_order_of_updates_does_not_matter() -> None:
    rng = np.random.default_rng(5)
    x = model(rng)
    ups = random_round(rng, x, k=4)
    for s in (FedAdam(), FedYogi(), FedAvgM()):
        a = run(s, x, s.init_state(x), ups)
        b = run(s, x, s.init_state(x), ups[::-1])
        for k in x:
            np.testing.assert_allclose(a.weights[k], b.weights[k], rtol=1e-6, atol=1e-12)


# ---------------------------------------------------------------- state round trip
def checkpoint(state: dict[str, Any], blobs: BlobStore) -> dict[str, Any]:
    """What the aggregator does: scalars as JSON, arrays as a blob, merged on resume."""
    scalars, arrays = split_state(state)
    for v in scalars.values():
        assert not isinstance(v, np.ndarray)
    restored: dict[str, Any] = json.loads(json.dumps(scalars))
    if arrays:
        restored.update(blobs.get(blobs.put(arrays)[0]))
    return restored


@pytest.mark.parametrize(
    "name,params",
    [
        ("fedavgm", {"server_lr": 0.7, "momentum": 0.8}),
        ("fedadagrad", {}),
        ("fedadam", {"server_lr": 0.05}),
        ("fedyogi", {"beta2": 0.9}),
        ("fedopt", {"optimizer": "adam", "momentum": 0.5}),
        ("fedopt", {"optimizer": "sgd", "server_lr": 0.5, "momentum": 0.3}),
        ("fedsgd", {"lr": 0.5}),
    ],
)
def test_state_survives_a_checkpoint(name: str, params: dict[str, Any], tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    x0 = model(rng)
    batches = [random_round(rng, x0, k=3) for _ in range(4)]
    # uninterrupted
    xa, sa = rounds(strategies.create(name, **params), x0, batches)
    # interrupted after round 2: checkpoint, new strategy object, continue
    s1 = strategies.create(name, **params)
    xb, sb = rounds(s1, x0, batches[:2])
    sb = checkpoint(sb, BlobStore(tmp_path))
    assert sb["step"] == 2 and isinstance(sb["step"], int)
    s2 = strategies.create(name, **params)
    xb, sb = rounds(s2, xb, batches[2:], state=sb)
    for k in x0:
        assert xb[k].dtype == x0[k].dtype
        np.testing.assert_array_equal(xb[k], xa[k])
    assert sb.keys() == sa.keys()
    for k, v in sa.items():
        np.testing.assert_array_equal(sb[k], v)


# ---------------------------------------------------------------- registry and config
def test_registered_with_defaults() -> None:
    assert {"fedsgd", "fedavgm", "fedopt", "fedadagrad", "fedadam", "fedyogi"} <= set(
        strategies.names()
    )
    adam = strategies.create("fedadam")
    assert isinstance(adam, FedAdam)
    assert (adam.server_lr, adam.beta1, adam.beta2, adam.tau) == (0.1, 0.9, 0.99, 1e-3)
    yogi = strategies.create("FedYogi")
    assert isinstance(yogi, FedYogi)
    assert (yogi.server_lr, yogi.beta1, yogi.beta2, yogi.tau) == (0.1, 0.9, 0.99, 1e-3)
    ada = strategies.create("fedadagrad")
    assert isinstance(ada, FedAdagrad)
    assert (ada.server_lr, ada.beta1, ada.tau) == (0.1, 0.9, 1e-3)
    avgm = strategies.create("fedavgm")
    assert isinstance(avgm, FedAvgM)
    assert (avgm.server_lr, avgm.momentum) == (1.0, 0.9)
    sgd = strategies.create("fedsgd")
    assert isinstance(sgd, FedSGD) and sgd.lr == 1.0 and sgd.upload == "model"
    opt = strategies.create("fedopt")
    assert isinstance(opt, FedOpt)
    assert (opt.optimizer, opt.server_lr, opt.momentum) == ("sgd", 1.0, 0.0)
    opt_adam = strategies.create("fedopt", optimizer="adam")
    assert isinstance(opt_adam, FedOpt)
    assert (opt_adam.server_lr, opt_adam.momentum, opt_adam.beta2, opt_adam.tau) == (
        0.1,
        0.9,
        0.99,
        1e-3,
    )
    described = {d["name"]: d for d in strategies.describe()}
    assert described["fedadam"]["params"] == {
        "server_lr": 0.1,
        "beta1": 0.9,
        "beta2": 0.99,
        "tau": 1e-3,
        "weighted": True,
    }
    assert described["fedavgm"]["params"] == {"server_lr": 1.0, "momentum": 0.9, "weighted": True}
    assert described["fedopt"]["streaming"] is True


def test_create_with_config_params() -> None:
    s = strategies.create("fedadam", server_lr=0.01, beta1=0.5, beta2=0.9, tau=1e-4, weighted=False)
    assert isinstance(s, FedAdam)
    assert (s.server_lr, s.beta1, s.beta2, s.tau, s.weighted) == (0.01, 0.5, 0.9, 1e-4, False)
    o = strategies.create("fedopt", optimizer="YOGI", server_lr=0.5, momentum=0.0)
    assert isinstance(o, FedOpt) and (o.optimizer, o.server_lr, o.momentum) == ("yogi", 0.5, 0)
    assert cast(FedSGD, strategies.create("fedsgd", lr=0.25, upload="gradient")).server_lr == 0.25
    assert cast(FedAvgM, strategies.create("fedavgm", momentum=0.0)).momentum == 0.0


@pytest.mark.parametrize(
    "name,params",
    [
        ("fedadam", {"momentum": 0.9}),  # fedadam calls it beta1
        ("fedavgm", {"beta1": 0.9}),
        ("fedadagrad", {"beta2": 0.9}),
        ("fedsgd", {"server_lr": 1.0}),
        ("fedyogi", {"learning_rate": 0.1}),
        ("fedopt", {"optimizer": "rmsprop"}),
        ("fedopt", {"momentum": 1.0}),
        ("fedopt", {"server_lr": 0.0}),
        ("fedopt", {"server_lr": "fast"}),
        ("fedadam", {"tau": -1e-3}),
        ("fedadam", {"beta2": 1.5}),
        ("fedyogi", {"server_lr": float("nan")}),
        ("fedsgd", {"upload": "delta"}),
    ],
)
def test_bad_config_is_a_config_error(name: str, params: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        strategies.create(name, **params)


@pytest.mark.parametrize(
    "name", ["fedadagrad", "fedadam", "fedyogi", "fedavgm", "fedsgd", "fedopt"]
)
def test_zero_dim_tensors_keep_array_state(name: str) -> None:
    """0-d tensors (e.g. a scalar bias): numpy returns scalars for some 0-d results."""
    from fedstack.strategies import create

    s = create(name)
    g: Weights = {"w": np.zeros(3, np.float32), "b": np.zeros((), np.float64)}
    st = s.init_state(g)
    for _ in range(2):
        acc = s.begin(g, st)
        acc.add(
            Update(
                "a",
                {"w": np.ones(3, np.float32), "b": np.array(1.0)},
                1,
                metrics={"local_steps": 1},
            )
        )
        res = acc.result()
        g, st = res.weights, res.state
    assert g["b"].shape == () and g["b"].dtype == np.float64 and np.isfinite(g["b"])
    assert all(isinstance(v, np.ndarray) for k, v in st.items() if "/" in k)
