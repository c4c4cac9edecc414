"""FedProx and FedCurv: the server strategies and the agent-side torch helpers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
import pytest

from fedstack import strategies
from fedstack.errors import ConfigError, InvalidUpdate
from fedstack.strategies import FedAvg, Update
from fedstack.strategies.regularized import FedCurv, FedProx, fisher_tensor_names
from fedstack.types import Weights

try:
    import torch
except ImportError:  # pragma: no cover - the core works without torch
    torch = None  # type: ignore[assignment]

F = TypeVar("F", bound=Callable[..., Any])


def requires_torch(test: F) -> F:
    """Mark a test as needing torch (skipped without the torch extra)."""
    marked: F = pytest.mark.torch(
        pytest.mark.skipif(torch is None, reason="needs the torch extra")(test)
    )
    return marked


def run(
    strategy: strategies.Strategy, global_weights: Weights, updates: list[Update]
) -> strategies.Result:
    acc = strategy.begin(global_weights, strategy.init_state(global_weights))
    for u in updates:
        strategy.check(u, global_weights)
        acc.add(u)
    assert acc.count == len(updates)
    return acc.result()


def random_updates(seed: int, n: int = 4) -> tuple[Weights, list[Update]]:
    rng = np.random.default_rng(seed)
    glob: Weights = {
        "w": rng.standard_normal((3, 4)).astype(np.float32),
        "b": rng.standard_normal(4),
        "steps": np.array([5, 7], np.int64),
    }
    ups = [
        Update(
            f"a{i}",
            {
                "w": rng.standard_normal((3, 4)).astype(np.float32),
                "b": rng.standard_normal(4),
                "steps": rng.integers(0, 20, 2),
            },
            int(rng.integers(1, 100)),
        )
        for i in range(n)
    ]
    return glob, ups


# ---------------------------------------------------------------------------- FedProx server
@pytest.mark.parametrize("weighted", [True, False])
@pytest.mark.parametrize("mu", [0.0, 0.01, 1.0])
def test_fedprox_server_is_fedavg_exactly(mu: float, weighted: bool) -> None:
    glob, ups = random_updates(1)
    ref = run(FedAvg(weighted=weighted), glob, ups)
    out = run(FedProx(mu=mu, weighted=weighted), glob, ups)
    assert list(out.weights) == list(ref.weights)
    for k in ref.weights:
        assert out.weights[k].dtype == ref.weights[k].dtype
        np.testing.assert_array_equal(out.weights[k], ref.weights[k])
    assert out.metrics == ref.metrics and out.extra == {} and out.state == {}


def test_fedprox_agent_config_and_registry() -> None:
    assert FedProx().agent_config() == {"fedprox_mu": 0.01}
    assert FedProx(mu=0).agent_config() == {"fedprox_mu": 0.0}
    assert FedProx(mu=0.5, gamma=0.9).agent_config() == {"fedprox_mu": 0.5, "fedprox_gamma": 0.9}
    s = strategies.create("fedprox", mu=0.1, weighted=False)
    assert isinstance(s, FedProx) and s.mu == 0.1 and not s.weighted and s.trigger is None
    for bad in ({"mu": -0.1}, {"mu": float("nan")}, {"gamma": 1.5}, {"gamma": -1.0}):
        with pytest.raises(ConfigError):
            strategies.create("fedprox", **bad)
    params = {d["name"]: d["params"] for d in strategies.describe()}
    assert params["fedprox"] == {"mu": 0.01, "weighted": True, "gamma": None}
    assert params["fedcurv"] == {"lam": 1.0, "eps": 1e-8, "weighted": True}


# ---------------------------------------------------------------------------- FedProx agent
def _regression_data(seed: int = 0) -> tuple[Any, Any]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 3, generator=g, dtype=torch.float64)
    y = x @ torch.tensor([[1.5], [-2.0], [0.5]], dtype=torch.float64) + 0.3
    return x, y


def _local_train(mu: float | None, steps: int = 25, seed: int = 0) -> tuple[Any, Weights]:
    """SGD on a linear model from a fixed 'global' init; mu None: no proximal term."""
    from fedstack.agent.adapters.torch import module_to_weights
    from fedstack.agent.regularizers import ProximalTerm

    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 1).double()
    glob = module_to_weights(model)
    x, y = _regression_data()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    prox = ProximalTerm(model, glob, mu) if mu is not None else None
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        if prox is not None:
            loss = loss + prox()
        loss.backward()
        opt.step()
    return model, glob


def _distance(model: Any, glob: Weights) -> float:
    return float(
        sum(np.sum((p.detach().numpy() - glob[n]) ** 2) for n, p in model.named_parameters()) ** 0.5
    )


@requires_torch
def test_proximal_mu0_gives_the_same_local_weights() -> None:
    plain, _g = _local_train(None)
    prox0, _g = _local_train(0.0)
    for (n, a), (_n, b) in zip(plain.named_parameters(), prox0.named_parameters(), strict=True):
        assert torch.equal(a, b), n


@requires_torch
def test_proximal_term_keeps_the_local_model_closer() -> None:
    distances = [_distance(*_local_train(mu)) for mu in (0.0, 0.1, 1.0, 10.0)]
    assert distances[0] > 0.5  # training moves the model
    assert distances[0] > distances[1] > distances[2] > distances[3]


@requires_torch
def test_proximal_term_value_and_gradient() -> None:
    from fedstack.agent.adapters.torch import module_to_weights
    from fedstack.agent.regularizers import proximal_term

    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3)).double()
    rng = np.random.default_rng(3)
    glob = {
        k: v + rng.standard_normal(v.shape) if v.dtype.kind == "f" else v
        for k, v in module_to_weights(model).items()
    }  # buffers included: ignored
    mu = 0.7
    term = proximal_term(model, glob, mu)
    expected = (
        0.5
        * mu
        * sum(
            float(np.sum((p.detach().numpy() - glob[n]) ** 2)) for n, p in model.named_parameters()
        )
    )
    assert term.item() == pytest.approx(expected, rel=1e-12)
    term.backward()
    for n, p in model.named_parameters():
        assert p.grad is not None
        np.testing.assert_allclose(
            p.grad.numpy(), mu * (p.detach().numpy() - glob[n]), rtol=1e-12, atol=1e-15
        )
    # float32 global weights against a float64 model, and torch tensors, work the same
    glob32 = {k: v.astype(np.float32) for k, v in glob.items()}
    assert proximal_term(model, glob32, mu).item() == pytest.approx(expected, rel=1e-6)
    as_tensors = {k: torch.from_numpy(np.asarray(v)) for k, v in glob.items()}
    assert proximal_term(model, as_tensors, mu).item() == pytest.approx(expected, rel=1e-12)
    assert proximal_term(model, glob, 0.0).item() == 0.0
    with pytest.raises(KeyError, match="0.weight"):
        proximal_term(model, {k: v for k, v in glob.items() if k != "0.weight"}, mu)
    with pytest.raises(ValueError):
        proximal_term(model, {**glob, "0.bias": np.zeros(4)}, mu)
    with pytest.raises(ValueError):
        proximal_term(model, glob, -1.0)


def test_gamma_inexact_rule_on_given_norms() -> None:
    from fedstack.agent.regularizers import GammaInexact

    rule = GammaInexact(0.5)
    assert [rule.observe(n) for n in (10.0, 9.0, 5.1, 5.0)] == [False, False, False, True]
    assert rule.reference == 10.0 and rule.observed == 4
    rule.reset()
    assert rule.reference is None and rule.observe(2.0) is False and rule.observe(1.0)
    never = GammaInexact(0.0)
    assert not any(never.observe(n) for n in (1.0, 0.5, 1e-9, 0.0))
    with pytest.raises(ValueError):
        GammaInexact(1.5)
    with pytest.raises(ValueError):
        GammaInexact(-0.1)


def _gamma_epochs(gamma: float, max_epochs: int = 30) -> int:
    from fedstack.agent.adapters.torch import module_to_weights
    from fedstack.agent.regularizers import GammaInexact, ProximalTerm

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1).double()
    prox = ProximalTerm(model, module_to_weights(model), 0.01)
    x, y = _regression_data()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    rule = GammaInexact(gamma)
    for epoch in range(1, max_epochs + 1):
        for i in range(0, 32, 8):  # 4 mini-batches per epoch
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x[i : i + 8]), y[i : i + 8]) + prox()
            loss.backward()
            rule.accumulate(model)
            opt.step()
        if rule.end_epoch():
            return epoch
    return max_epochs


@requires_torch
def test_gamma_inexact_stops_local_training() -> None:
    assert _gamma_epochs(1.0) == 2  # the gradient shrinks after the first epoch
    assert _gamma_epochs(0.9) == 2  # the book's gamma
    assert 2 < _gamma_epochs(0.3) < 30  # smaller gamma: more local work, still early
    assert _gamma_epochs(0.0) == 30  # exact solve: never stops early


@requires_torch
def test_grad_norm() -> None:
    from fedstack.agent.regularizers import grad_norm

    model = torch.nn.Linear(2, 1).double()
    assert grad_norm(model) == 0.0
    model.weight.grad = torch.tensor([[3.0, 0.0]], dtype=torch.float64)
    model.bias.grad = torch.tensor([4.0], dtype=torch.float64)
    assert grad_norm(model) == 5.0


# ---------------------------------------------------------------------------- FedCurv server
def curv_update(
    agent: str, weights: Weights, rng: np.random.Generator, n: int = 1, dtype: Any = np.float32
) -> Update:
    extra: Weights = {}
    for name in fisher_tensor_names(weights):
        u = rng.random(weights[name].shape).astype(dtype)
        extra["u/" + name] = u
        extra["v/" + name] = (u * weights[name]).astype(dtype)
    return Update(agent, weights, n, extra=extra)


def curv_setup(seed: int = 5) -> tuple[Weights, list[Update]]:
    rng = np.random.default_rng(seed)
    glob: Weights = {
        "w": np.zeros((2, 3), np.float32),
        "b": np.zeros(3, np.float32),
        "count": np.array([0], np.int64),
    }
    ups = []
    for i, n in enumerate((3, 1, 6)):
        w: Weights = {
            "w": rng.standard_normal((2, 3)).astype(np.float32),
            "b": rng.standard_normal(3).astype(np.float32),
            "count": np.array([i], np.int64),
        }
        ups.append(curv_update(f"a{i}", w, rng, n))
    return glob, ups


def test_fedcurv_server_sums_statistics_and_averages_weights() -> None:
    glob, ups = curv_setup()
    out = run(FedCurv(), glob, ups)
    ref = run(
        FedAvg(precision="float64"),
        glob,
        [Update(u.agent_id, u.weights, u.num_samples) for u in ups],
    )
    for k in ref.weights:
        assert out.weights[k].dtype == ref.weights[k].dtype
        np.testing.assert_array_equal(out.weights[k], ref.weights[k])
    assert sorted(out.extra) == ["u/b", "u/w", "v/b", "v/w"]  # no statistics for ints
    for key, arr in out.extra.items():
        exact = sum(np.asarray(u.extra[key], np.float64) for u in ups)
        assert arr.dtype == np.float32 and arr.shape == glob[key[2:]].shape
        np.testing.assert_array_equal(arr, np.asarray(exact).astype(np.float32))
    assert out.metrics == {"num_updates": 3, "num_samples": 10}
    assert out.state == {}


def test_fedcurv_statistics_are_summed_unweighted_and_copied() -> None:
    glob: Weights = {"w": np.zeros(2)}
    a = Update(
        "a",
        {"w": np.array([1.0, 2.0])},
        100,
        extra={"u/w": np.array([1.0, 0.0]), "v/w": np.array([1.0, 0.0])},
    )
    b = Update(
        "b",
        {"w": np.array([3.0, 4.0])},
        1,
        extra={"u/w": np.array([0.5, 2.0]), "v/w": np.array([1.5, 8.0])},
    )
    acc = FedCurv(weighted=False).begin(glob, {})
    acc.add(a)
    acc.add(b)
    a.extra["u/w"][:] = 99.0  # the accumulator keeps no reference
    out = acc.result()
    assert out.weights["w"].tolist() == [2.0, 3.0]
    assert out.extra["u/w"].tolist() == [1.5, 2.0] and out.extra["v/w"].tolist() == [2.5, 8.0]


def test_fedcurv_initial_extra_config_and_registry() -> None:
    glob: Weights = {
        "w": np.ones((2, 2), np.float32),
        "h": np.ones(3, np.float16),
        "n": np.array([1], np.int32),
        "m": np.array([True]),
    }
    extra = FedCurv().initial_extra(glob)
    assert sorted(extra) == ["u/h", "u/w", "v/h", "v/w"]
    for k, v in extra.items():
        assert v.dtype == glob[k[2:]].dtype and not v.any()
    assert FedCurv().agent_config() == {"fedcurv_lambda": 1.0, "fedcurv_eps": 1e-8}
    s = strategies.create("fedcurv", lam=0.5, eps=0.0)
    assert isinstance(s, FedCurv) and s.agent_config() == {
        "fedcurv_lambda": 0.5,
        "fedcurv_eps": 0.0,
    }
    for bad in ({"lam": -1.0}, {"eps": float("inf")}, {"lambda_": 1.0}):
        with pytest.raises(ConfigError):
            strategies.create("fedcurv", **bad)


@pytest.mark.parametrize(
    "problem",
    ["no extras", "missing v", "unexpected", "shape", "negative u", "int tensor stats", "complex"],
)
def test_fedcurv_check_refuses_bad_extras(problem: str) -> None:
    glob, ups = curv_setup()
    extra = dict(ups[0].extra)
    if problem == "no extras":
        extra = {}
    elif problem == "missing v":
        del extra["v/b"]
    elif problem == "unexpected":
        extra["u/nope"] = np.zeros(1, np.float32)
    elif problem == "shape":
        extra["u/w"] = np.zeros((3, 2), np.float32)
    elif problem == "negative u":
        extra["u/b"] = np.array([0.1, -1e-6, 0.2], np.float32)
    elif problem == "int tensor stats":
        extra["u/count"] = extra["v/count"] = np.zeros(1, np.float32)
    elif problem == "complex":
        extra["v/b"] = np.zeros(3, np.complex64)
    bad = Update("bad", ups[0].weights, 1, extra=extra)
    strat = FedCurv()
    strat.check(ups[0], glob)  # the original passes
    with pytest.raises(InvalidUpdate, match="fedcurv") as info:
        strat.check(bad, glob)
    assert info.value.agent_id == "bad"
    acc = strat.begin(glob, {})
    with pytest.raises(InvalidUpdate):  # also refused when added directly (e.g. resume)
        acc.add(bad)
    assert acc.count == 0


# ---------------------------------------------------------------------------- FedCurv agent
def _extra_for(model: Any, u: dict[str, np.ndarray[Any, Any]]) -> Weights:
    out: Weights = {}
    for n, p in model.named_parameters():
        out["u/" + n] = u[n]
        out["v/" + n] = u[n] * p.detach().numpy()
    return out


@requires_torch
@pytest.mark.parametrize("lam", [1.0, 0.3])
def test_fedcurv_penalty_value_and_gradient(lam: float) -> None:
    from fedstack.agent.regularizers import fedcurv_penalty

    torch.manual_seed(1)
    model = torch.nn.Linear(3, 2).double()
    rng = np.random.default_rng(1)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    others: list[Weights] = [
        {n: rng.standard_normal(s) for n, s in shapes.items()} for _ in range(2)
    ]
    fishers: list[Weights] = [{n: rng.random(s) + 0.1 for n, s in shapes.items()} for _ in range(3)]
    # total = own (agent 0) + two others, each v = F * w_j
    own: Weights = {}
    for n in shapes:
        own["u/" + n] = fishers[0][n]
        own["v/" + n] = fishers[0][n] * rng.standard_normal(shapes[n])
    total = dict(own)
    for f, wo in zip(fishers[1:], others, strict=True):
        for n in shapes:
            total["u/" + n] = total["u/" + n] + f[n]
            total["v/" + n] = total["v/" + n] + f[n] * wo[n]
    eps = 1e-8
    pen = fedcurv_penalty(model, total, own, lam, eps)
    expected = 0.0
    for n, p in model.named_parameters():
        w = p.detach().numpy()
        uu = total["u/" + n] - own["u/" + n]
        vv = total["v/" + n] - own["v/" + n]
        expected += float(np.sum(w * w * uu - 2 * w * vv + vv * vv / (uu + eps)))
    assert pen.item() == pytest.approx(lam * expected, rel=1e-10)
    # = lam * sum_j (w - w_j)^T F_j (w - w_j) up to the constant: check the gradient
    pen.backward()
    for n, p in model.named_parameters():
        w = p.detach().numpy()
        uu = total["u/" + n] - own["u/" + n]
        vv = total["v/" + n] - own["v/" + n]
        assert p.grad is not None
        np.testing.assert_allclose(p.grad.numpy(), 2 * lam * (w * uu - vv), rtol=1e-10, atol=1e-12)
        ewc = sum(2 * lam * f[n] * (w - wj[n]) for f, wj in zip(fishers[1:], others, strict=True))
        np.testing.assert_allclose(p.grad.numpy(), ewc, rtol=1e-9, atol=1e-12)


@requires_torch
@pytest.mark.parametrize("eps", [1e-8, 0.0])
def test_fedcurv_penalty_has_no_nan_where_u_is_zero(eps: float) -> None:
    from fedstack.agent.adapters.torch import module_to_weights
    from fedstack.agent.regularizers import FedCurvPenalty, fedcurv_penalty

    torch.manual_seed(2)
    model = torch.nn.Linear(2, 2).double()
    zeros = FedCurv().initial_extra(module_to_weights(model))
    for own in (None, zeros):
        pen = fedcurv_penalty(model, zeros, own, 1.0, eps)
        pen.backward()
        assert pen.item() == 0.0
        for p in model.parameters():
            assert p.grad is not None and torch.all(p.grad == 0)
            p.grad = None
    # the agent alone: its own statistics are the whole sum -> U = 0 everywhere
    u = {n: np.full(tuple(p.shape), 0.3) for n, p in model.named_parameters()}
    mine = _extra_for(model, u)
    assert fedcurv_penalty(model, mine, mine, 2.0, eps).item() == 0.0
    # mixed: U = 0 on some entries only -> finite, and no pull there
    u2 = {n: np.where(np.arange(v.size).reshape(v.shape) % 2 == 0, 0.0, 1.0) for n, v in u.items()}
    stats = _extra_for(model, u2)
    for n in u2:  # a rounding residue in V where U = 0 must not pull either
        stats["v/" + n] = np.where(u2[n] == 0.0, 0.5, stats["v/" + n])
    pen = FedCurvPenalty(model, stats, None, 1.0, eps)()
    pen.backward()
    assert torch.isfinite(pen)
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.all(torch.isfinite(p.grad))
        assert torch.all(p.grad[torch.from_numpy(u2[n] == 0.0)] == 0)
    # no statistics at all: zero penalty
    assert fedcurv_penalty(model, {}, None, 1.0).item() == 0.0


@requires_torch
def test_fedcurv_penalty_refuses_missing_statistics() -> None:
    from fedstack.agent.regularizers import fedcurv_penalty

    model = torch.nn.Linear(2, 1).double()
    u = {n: np.ones(tuple(p.shape)) for n, p in model.named_parameters()}
    full = _extra_for(model, u)
    with pytest.raises(KeyError, match="v/bias"):
        fedcurv_penalty(model, {k: v for k, v in full.items() if k != "v/bias"}, None, 1.0)
    with pytest.raises(KeyError, match="own u/weight"):
        fedcurv_penalty(model, full, {"u/bias": np.ones(1)}, 1.0)
    with pytest.raises(ValueError):
        fedcurv_penalty(model, {**full, "u/bias": np.ones(3)}, None, 1.0)


@requires_torch
def test_fisher_diagonal_is_the_mean_of_squared_gradients() -> None:
    from fedstack.agent.regularizers import fisher_diagonal

    torch.manual_seed(4)
    model = torch.nn.Linear(2, 1).double()
    model.train()
    rng = np.random.default_rng(4)
    batches = [
        (
            torch.from_numpy(rng.standard_normal((4, 2))),
            torch.from_numpy(rng.standard_normal((4, 1))),
        )
        for _ in range(3)
    ]
    w = model.weight.detach().numpy().copy()  # (1, 2)
    b = model.bias.detach().numpy().copy()  # (1,)

    def grads(x: np.ndarray[Any, Any], y: np.ndarray[Any, Any]) -> tuple[Any, Any]:
        r = x @ w.T + b - y  # (m, 1); L = mean(r^2)
        return (2 * r * x).mean(axis=0, keepdims=True).reshape(1, 2), (2 * r).mean(axis=0)

    def by_hand(pairs: list[tuple[Any, Any]]) -> tuple[Any, Any]:
        gs = [grads(x, y) for x, y in pairs]
        return (np.mean([g[0] ** 2 for g in gs], axis=0), np.mean([g[1] ** 2 for g in gs], axis=0))

    mse = torch.nn.functional.mse_loss
    fisher = fisher_diagonal(model, batches, mse)
    fw, fb = by_hand([(x.numpy(), y.numpy()) for x, y in batches])
    assert sorted(fisher) == ["bias", "weight"]
    assert fisher["weight"].dtype == np.float64 and fisher["weight"].shape == (1, 2)
    np.testing.assert_allclose(fisher["weight"], fw, rtol=1e-12)
    np.testing.assert_allclose(fisher["bias"], fb, rtol=1e-12)
    # max_batches limits the batches used
    fisher2 = fisher_diagonal(model, iter(batches), mse, max_batches=2)
    fw2, _ = by_hand([(x.numpy(), y.numpy()) for x, y in batches[:2]])
    np.testing.assert_allclose(fisher2["weight"], fw2, rtol=1e-12)
    # per_sample: the textbook empirical Fisher over single examples
    fisher3 = fisher_diagonal(model, batches, mse, per_sample=True)
    singles = [(x.numpy()[i : i + 1], y.numpy()[i : i + 1]) for x, y in batches for i in range(4)]
    fw3, fb3 = by_hand(singles)
    np.testing.assert_allclose(fisher3["weight"], fw3, rtol=1e-12)
    np.testing.assert_allclose(fisher3["bias"], fb3, rtol=1e-12)
    # no side effects: mode restored, no .grad written
    assert model.training and model.weight.grad is None and model.bias.grad is None
    with pytest.raises(ValueError):
        fisher_diagonal(model, [], mse)


@requires_torch
def test_fedcurv_extras_fit_the_strategy_check() -> None:
    from fedstack.agent.adapters.torch import module_to_weights
    from fedstack.agent.regularizers import fedcurv_extras, fisher_diagonal

    torch.manual_seed(6)
    model = torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2)
    )
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    fisher = fisher_diagonal(model, [(x, y)], torch.nn.functional.cross_entropy)
    extra = fedcurv_extras(model, fisher)
    weights = module_to_weights(model)
    floats = [k for k, v in weights.items() if v.dtype.kind == "f"]
    assert sorted(extra) == sorted(p + k for k in floats for p in ("u/", "v/"))
    assert "u/1.num_batches_tracked" not in extra
    assert not extra["u/1.running_mean"].any()  # buffers: no Fisher
    for k in floats:
        assert extra["u/" + k].dtype == np.float32
        np.testing.assert_allclose(extra["v/" + k], extra["u/" + k] * weights[k], rtol=1e-6)
    FedCurv().check(Update("a", weights, 8, extra=extra), weights)  # accepted
    with pytest.raises(KeyError):
        fedcurv_extras(model, {"nope": np.zeros(1)})


@requires_torch
def test_fedcurv_round_trip_each_agent_sees_the_others() -> None:
    """Two agents upload; after the server's sums, each agent's U, V are the other's."""
    from fedstack.agent.adapters.torch import module_to_weights
    from fedstack.agent.regularizers import FedCurvPenalty, fedcurv_extras, fisher_diagonal

    models, uploads = [], []
    for seed in (10, 11):
        torch.manual_seed(seed)
        m = torch.nn.Linear(3, 1).double()
        x, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 1, dtype=torch.float64)
        extra = fedcurv_extras(m, fisher_diagonal(m, [(x, y)], torch.nn.functional.mse_loss))
        models.append(m)
        uploads.append(Update(f"a{seed}", module_to_weights(m), 6, extra=extra))
    glob = FedCurv().initial_extra(uploads[0].weights)
    res = run(FedCurv(), {k: np.zeros_like(v) for k, v in uploads[0].weights.items()}, uploads)
    assert sorted(res.extra) == sorted(glob)
    lam = 0.5
    for me, other in ((0, 1), (1, 0)):
        pen = FedCurvPenalty(models[me], res.extra, uploads[me].extra, lam)
        direct = FedCurvPenalty(models[me], uploads[other].extra, None, lam)
        a, b = pen(), direct()
        assert a.item() == pytest.approx(b.item(), rel=1e-9, abs=1e-12)
