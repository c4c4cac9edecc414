"""SCAFFOLD: server update, control-variate extras, check(), the torch agent helper, and
the client-drift picture on a tiny heterogeneous federation."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import numpy as np
import pytest

from fedstack import strategies
from fedstack.errors import ConfigError, InvalidUpdate
from fedstack.store.repository import split_state
from fedstack.strategies import FedAvg, Result, Strategy, Update
from fedstack.strategies.scaffold import Scaffold
from fedstack.types import Weights

torch = pytest.importorskip("torch")

from fedstack.agent.adapters.torch import module_to_weights, weights_to_module  # noqa: E402
from fedstack.agent.scaffold import ScaffoldClient  # noqa: E402

X0: Weights = {
    "w": np.array([1.0, 2.0]),
    "b": np.array([0.5], np.float32),
    "n": np.array([4], np.int64),
}


def up(
    agent: str, w: list[float], b: float, dw: list[float], db: float, n: int = 1, count: int = 4
) -> Update:
    return Update(
        agent,
        {"w": np.array(w), "b": np.array([b], np.float32), "n": np.array([count], np.int64)},
        n,
        extra={"dc/w": np.array(dw), "dc/b": np.array([db], np.float32)},
    )


def run(strat: Strategy, x: Weights, state: dict[str, Any], ups: list[Update]) -> Result:
    acc = strat.begin(x, state)
    for u in ups:
        strat.check(u, x)
        acc.add(u)
    return acc.result()


# ---------------------------------------------------------------- server
def test_server_update_formulas() -> None:
    s = Scaffold(global_lr=0.5, num_agents=4)
    st = s.init_state(X0)
    assert set(st) == {"c/w", "c/b"}  # no control for the integer tensor, no agent list
    st["c/w"] = np.array([0.1, -0.1])
    st["c/b"] = np.array([1.0])
    ups = [
        up("a", [3.0, 2.0], 1.5, [0.4, 0.0], 2.0, n=1, count=5),
        up("b", [1.0, 6.0], 0.5, [0.0, 0.8], -1.0, n=3, count=6),
    ]
    r = run(s, X0, st, ups)
    # mean (uniform) of y - x: ([1, 2], 0.5); x + 0.5 * that
    np.testing.assert_allclose(r.weights["w"], [1.5, 3.0], rtol=1e-15)
    np.testing.assert_allclose(r.weights["b"], [0.75])
    assert r.weights["b"].dtype == np.float32 and r.weights["w"].dtype == np.float64
    assert r.weights["n"].dtype == np.int64 and r.weights["n"].tolist() == [5]  # 4 + 0.5*1.5
    # c + (|S| / N) mean(dc) = c + (2/4) ([0.2, 0.4], 0.5)
    np.testing.assert_allclose(r.state["c/w"], [0.2, 0.1], rtol=1e-15)
    np.testing.assert_allclose(r.state["c/b"], [1.25], rtol=1e-15)
    assert r.metrics["num_agents"] == 4 and r.metrics["num_updates"] == 2
    assert r.metrics["num_samples"] == 4
    # the previous state is not modified in place
    np.testing.assert_array_equal(st["c/w"], [0.1, -0.1])


def test_global_lr_one_is_the_fedavg_mean() -> None:
    rng = np.random.default_rng(0)
    ups = [
        up(
            f"a{i}",
            list(rng.standard_normal(2)),
            float(rng.standard_normal()),
            [0.0, 0.0],
            0.0,
            n=int(rng.integers(1, 9)),
        )
        for i in range(3)
    ]
    for weighted in (False, True):
        r = run(Scaffold(weighted=weighted), X0, Scaffold().init_state(X0), ups)
        ref = run_fedavg(ups, weighted)
        for k in X0:
            np.testing.assert_array_equal(r.weights[k], ref[k])


def run_fedavg(ups: list[Update], weighted: bool) -> Weights:
    acc = FedAvg(weighted=weighted, precision="float64").begin(X0, {})
    for u in ups:
        acc.add(u)
    return acc.result().weights


def test_extras_round_and_agent_count_tracked_in_state() -> None:
    s = Scaffold()
    extra0 = s.initial_extra(X0)
    assert set(extra0) == {"c/w", "c/b"}
    assert extra0["c/b"].dtype == np.float32 and extra0["c/w"].dtype == np.float64
    assert not extra0["c/w"].any() and extra0["c/w"].shape == (2,)
    st = s.init_state(X0)
    assert st["agents"] == []
    r1 = run(
        s, X0, st, [up("a", [1, 2], 0.5, [1.0, 2.0], 4.0), up("b", [1, 2], 0.5, [3.0, 0.0], 0.0)]
    )
    # N = 2 agents seen: c = (dc_a + dc_b) / 2
    np.testing.assert_allclose(r1.state["c/w"], [2.0, 1.0])
    assert r1.state["agents"] == ["a", "b"] and r1.metrics["num_agents"] == 2
    assert set(r1.extra) == {"c/w", "c/b"}
    np.testing.assert_array_equal(r1.extra["c/w"], r1.state["c/w"])
    assert r1.extra["c/b"].dtype == np.float32 and r1.extra["c/b"].tolist() == [2.0]
    # round 2: a new agent c alone; N = 3: c += dc_c / 3
    r2 = run(s, r1.weights, r1.state, [up("c", [1, 2], 0.5, [3.0, 3.0], 0.0)])
    np.testing.assert_allclose(r2.state["c/w"], [3.0, 2.0])
    assert r2.state["agents"] == ["a", "b", "c"] and r2.metrics["num_agents"] == 3
    # round 3: a known agent again: N stays 3
    r3 = run(s, r2.weights, r2.state, [up("a", [1, 2], 0.5, [-3.0, 0.0], 0.0)])
    np.testing.assert_allclose(r3.state["c/w"], [2.0, 2.0])
    assert r3.metrics["num_agents"] == 3


def test_state_survives_json_and_array_round_trip() -> None:
    s = Scaffold(global_lr=0.7)
    rounds = [
        [up("a", [2, 1], 1.0, [1.0, 2.0], 4.0), up("b", [0, 3], 0.0, [3.0, 0.0], 1.0)],
        [up("c", [1, 1], 0.5, [0.5, 0.5], 0.5)],
        [up("a", [3, 1], 0.2, [-1.0, 0.0], 0.0), up("c", [1, 0], 0.1, [0.0, 1.0], 2.0)],
    ]
    x, st = X0, s.init_state(X0)
    results = []
    for ups in rounds:
        r = run(s, x, st, ups)
        x, st = r.weights, r.state
        results.append(r)
    # interrupted after round 1
    r1 = results[0]
    scalars, arrays = split_state(r1.state)
    assert set(arrays) == {"c/w", "c/b"} and set(scalars) == {"agents"}
    restored = json.loads(json.dumps(scalars)) | {k: v.copy() for k, v in arrays.items()}
    x2, st2 = r1.weights, restored
    s2 = strategies.create("scaffold", global_lr=0.7)
    for ups in rounds[1:]:
        r = run(s2, x2, st2, ups)
        x2, st2 = r.weights, r.state
    for k in X0:
        np.testing.assert_array_equal(x2[k], x[k])
    for k in ("c/w", "c/b"):
        np.testing.assert_array_equal(st2[k], st[k])
    assert st2["agents"] == st["agents"] == ["a", "b", "c"]


def test_check_refusals() -> None:
    s = Scaffold()
    good = up("a", [1, 2], 0.5, [0.0, 0.0], 0.0)
    s.check(good, X0)
    with_other = Update("a", good.weights, 1, extra={**good.extra, "u/w": np.zeros(2)})
    s.check(with_other, X0)  # extras of other features are not SCAFFOLD's business
    bad_extras: list[Weights] = [
        {},  # no extras at all
        {"dc/w": np.zeros(2)},  # missing dc/b
        {"dc/w": np.zeros(3), "dc/b": np.zeros(1)},  # wrong shape
        {"dc/w": np.zeros((2, 1)), "dc/b": np.zeros(1)},
        {"dc/w": np.zeros(2), "dc/b": np.zeros(1), "dc/n": np.zeros(1)},  # int: no control
        {"dc/w": np.zeros(2), "dc/b": np.zeros(1), "dc/z": np.zeros(1)},  # unknown tensor
        {"dc/w": np.zeros(2, bool), "dc/b": np.zeros(1)},  # not numeric
        {"c/w": np.zeros(2), "c/b": np.zeros(1)},  # the server's names, not the agent's
    ]
    for extra in bad_extras:
        u = Update("bad", good.weights, 1, extra=extra)
        with pytest.raises(InvalidUpdate, match="scaffold") as exc:
            s.check(u, X0)
        assert exc.value.agent_id == "bad"
        acc = s.begin(X0, s.init_state(X0))
        with pytest.raises(InvalidUpdate):
            acc.add(u)
        assert acc.count == 0


def test_registry_and_config() -> None:
    assert "scaffold" in strategies.names()
    s = strategies.create("scaffold", global_lr=0.5, num_agents=10, weighted=True)
    assert isinstance(s, Scaffold)
    assert (s.global_lr, s.num_agents, s.weighted) == (0.5, 10, True)
    d = Scaffold()
    assert (d.global_lr, d.num_agents, d.weighted) == (1.0, None, False)
    for bad in (
        {"num_agents": 0},
        {"num_agents": 2.5},
        {"global_lr": 0.0},
        {"global_lr": -1.0},
        {"lr": 1.0},
    ):
        with pytest.raises(ConfigError):
            strategies.create("scaffold", **bad)


# ---------------------------------------------------------------- agent helper (torch)
def linear(seed: int = 0) -> Any:
    torch.manual_seed(seed)
    return torch.nn.Linear(3, 2)


def test_helper_module_does_not_import_torch() -> None:
    code = (
        "import sys, fedstack.agent.scaffold, fedstack.strategies.scaffold; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_correct_gradients_adds_c_minus_ci() -> None:
    model = linear()
    x = torch.randn(5, 3)
    model(x).pow(2).sum().backward()
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    rng = np.random.default_rng(0)
    c = {"c/weight": rng.standard_normal((2, 3)), "c/bias": rng.standard_normal(2)}
    ci: Weights = {"weight": rng.standard_normal((2, 3)), "bias": rng.standard_normal(2)}
    client = ScaffoldClient(ci)
    client.correct_gradients(model, c)
    for n, p in model.named_parameters():
        np.testing.assert_allclose(
            (p.grad - before[n]).numpy(), c[f"c/{n}"] - ci[n], rtol=1e-5, atol=1e-6
        )
        assert p.grad.dtype == torch.float32
    # a second call with the same c adds the same correction again (cached tensors)
    client.correct_gradients(model, c)
    np.testing.assert_allclose(
        (model.bias.grad - before["bias"]).numpy(),
        2 * (c["c/bias"] - ci["bias"]),
        rtol=1e-5,
        atol=1e-6,
    )
    # parameters without a gradient are left alone; missing controls count as zero
    fresh = linear()
    ScaffoldClient().correct_gradients(fresh, c)
    assert fresh.weight.grad is None
    model.zero_grad()
    model(x).sum().backward()
    g = model.weight.grad.clone()
    ScaffoldClient().correct_gradients(model, {"c/bias": np.ones(2)})
    assert torch.equal(model.weight.grad, g)
    with pytest.raises(ValueError, match="shape"):
        ScaffoldClient().correct_gradients(model, {"c/weight": np.ones((3, 2))})


def test_update_control_is_option_two() -> None:
    rng = np.random.default_rng(1)
    x: Weights = {
        "weight": rng.standard_normal((2, 3)).astype(np.float32),
        "bias": rng.standard_normal(2).astype(np.float32),
        "count": np.array([3], np.int64),
    }
    y = {
        k: (v + 0.1 * rng.standard_normal(v.shape)).astype(v.dtype)
        if v.dtype.kind == "f"
        else v + 2
        for k, v in x.items()
    }
    c = {"c/weight": rng.standard_normal((2, 3)), "c/bias": rng.standard_normal(2)}
    ci: Weights = {"weight": rng.standard_normal((2, 3)), "bias": rng.standard_normal(2)}
    client = ScaffoldClient(ci)
    k_steps, lr = 7, 0.05
    dc = client.update_control(x, y, steps=k_steps, lr=lr, c_global=c)
    assert set(dc) == {"dc/weight", "dc/bias"}  # no control for the integer tensor
    for n in ("weight", "bias"):
        # c_i+ = c_i - c + (x - y) / (K lr)
        new = ci[n] - c[f"c/{n}"] + (x[n].astype(np.float64) - y[n]) / (k_steps * lr)
        np.testing.assert_allclose(client.control[n], new, rtol=1e-12)
        assert dc[f"dc/{n}"].dtype == np.float32
        np.testing.assert_allclose(dc[f"dc/{n}"], new - ci[n], rtol=1e-5, atol=1e-6)
    # the upload passes the server's check
    Scaffold().check(Update("a", y, 1, extra=dc), x)
    # c defaults to the one last used by correct_gradients
    other = ScaffoldClient(ci)
    with pytest.raises(ValueError, match="c_global"):
        other.update_control(x, y, steps=k_steps, lr=lr)
    model = linear()
    model(torch.randn(2, 3)).sum().backward()
    other.correct_gradients(model, c)
    dc2 = other.update_control(x, y, steps=k_steps, lr=lr)
    np.testing.assert_array_equal(dc2["dc/weight"], dc["dc/weight"])
    with pytest.raises(ValueError):
        other.update_control(x, y, steps=0, lr=lr)


# ---------------------------------------------------------------- client drift
def federation_data(
    seed: int = 0, n: int = 30, d: int = 4, k: int = 3
) -> list[tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]]:
    """Linear regression with different feature distributions and targets per agent."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(k):
        a = rng.normal(size=(n, d)) * rng.uniform(0.3, 1.5, size=d) + rng.normal(size=d)
        out.append((a, a @ (2 * rng.normal(size=d)) + 2 * rng.normal()))
    return out


def train_federation(
    data: list[tuple[Any, Any]], use_scaffold: bool, rounds: int, steps: int, lr: float
) -> np.ndarray[Any, Any]:
    model = torch.nn.Linear(data[0][0].shape[1], 1).double()
    with torch.no_grad():
        model.weight.zero_()
        model.bias.zero_()
    x = module_to_weights(model)
    strat = Scaffold() if use_scaffold else FedAvg(precision="float64")
    state = strat.init_state(x)
    extra = strat.initial_extra(x)
    clients = [ScaffoldClient() for _ in data]
    for rnd in range(rounds):
        acc = strat.begin(x, state, round=rnd + 1)
        for i, (a, y) in enumerate(data):
            weights_to_module(model, x)
            opt = torch.optim.SGD(model.parameters(), lr=lr)
            at, yt = torch.from_numpy(a), torch.from_numpy(y)
            for _ in range(steps):  # full-batch local gradient descent
                opt.zero_grad()
                ((model(at).squeeze(1) - yt) ** 2).mean().backward()
                if use_scaffold:
                    clients[i].correct_gradients(model, extra)
                opt.step()
            local = module_to_weights(model)
            dc = clients[i].update_control(x, local, steps, lr) if use_scaffold else {}
            u = Update(f"agent{i}", local, len(y), extra=dc)
            strat.check(u, x)
            acc.add(u)
        res = acc.result()
        x, state, extra = res.weights, res.state, res.extra
    out: np.ndarray[Any, Any] = np.r_[x["weight"].ravel(), x["bias"]]
    return out


def test_scaffold_removes_client_drift_that_fedavg_keeps() -> None:
    data = federation_data()
    design = np.vstack([np.c_[a, np.ones(len(a))] for a, _ in data])
    target = np.concatenate([y for _, y in data])
    optimum = np.linalg.lstsq(design, target, rcond=None)[0]  # minimiser of the sum of losses
    err_avg = np.linalg.norm(train_federation(data, False, 30, 10, 0.05) - optimum)
    err_scaffold = np.linalg.norm(train_federation(data, True, 30, 10, 0.05) - optimum)
    # FedAvg converges to a drifted point; SCAFFOLD to the optimum
    assert err_avg > 0.3
    assert err_scaffold < 1e-2
    assert err_scaffold < err_avg / 100
