"""Asynchronous aggregation: FedAsync and FedBuff.

Both set :attr:`~fedstack.strategies.base.Strategy.trigger`, so the aggregator completes a
"round" (one server step, one new global version) after every ``trigger`` accepted updates
instead of waiting for its threshold of agents. An update's ``staleness`` is the number
of server steps since the global version it was trained from (``version - base_version``,
see :mod:`fedstack.aggregator.rounds`). Run the aggregator with the staleness policy
``"next"`` (accept stale uploads); with ``"drop"`` stale uploads never reach the strategy.

In a horizontal federation both run per cluster and need ``synthesis = "async"``: each
member takes its server steps on its own agents' updates, and the global model is
synthesised from each member's latest semi-global model within the staleness bound
(synchronous synthesis would make every member wait for the others after each step; the
aggregator refuses that combination at start).

**Staleness functions** ``s(t)`` (Xie, Koyejo & Gupta 2019, section 4; the forms used by
APPFL's FedAsync aggregator):

- ``"constant"``: ``s(t) = 1``;
- ``"polynomial"``: ``s(t) = (t + 1)^(-a)`` (``a = 0.5``: ``1 / sqrt(1 + t)``);
- ``"hinge"``: ``s(t) = 1`` if ``t <= b`` else ``1 / (a (t - b) + 1)``.

**FedAsync** (Xie et al., "Asynchronous Federated Optimization", OPT 2020,
arXiv:1903.03934) mixes every arriving model into the global one:

    w <- (1 - alpha_t) w + alpha_t w_k,    alpha_t = alpha * s(staleness_k).

**FedBuff** (Nguyen et al., "Federated Learning with Buffered Asynchronous Aggregation",
AISTATS 2022, arXiv:2106.06639) buffers ``K`` model deltas ``d_i = w_i - w`` and then takes
one server step

    w <- w + eta * sum_i p_i s(tau_i) d_i / sum_i p_i

with ``p_i = num_samples_i`` (``weighted``) or 1, and ``s = 1 / sqrt(1 + tau)`` by default
(the paper's down-weighting). As in the paper's algorithm (and
APPFL), the staleness factor scales a delta *absolutely*: a buffer of equally stale
updates takes a shorter step, and it still acts when ``K = 1``. ``normalize_staleness=True``
divides by ``sum_i p_i s(tau_i)`` instead, so that staleness only shifts the relative
weights (a uniformly stale buffer takes a full step). With ``K`` = all agents, zero
staleness, ``eta = 1`` and sample weights, the step is exactly FedAvg.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from fedstack.strategies.base import (
    Result,
    Strategy,
    StrategyState,
    Update,
    cast_like,
    register,
)
from fedstack.strategies.fedavg import WeightedMean
from fedstack.types import Metrics, Weights

__all__ = ["STALENESS_FUNCTIONS", "FedAsync", "FedBuff", "staleness_function"]

STALENESS_FUNCTIONS = ("constant", "polynomial", "hinge")

F64 = np.ndarray[Any, np.dtype[np.float64]]


def _number(
    name: str, value: float, *, low: float = 0.0, low_open: bool = False, high: float | None = None
) -> float:
    v = float(value)
    ok = math.isfinite(v) and (v > low if low_open else v >= low)
    if high is not None:
        ok = ok and v <= high
    if not ok:
        bound = f"{'(' if low_open else '['}{low:g}, {'inf)' if high is None else f'{high:g}]'}"
        raise ValueError(f"{name} must be in {bound}, got {value!r}")
    return v


def staleness_function(
    kind: str = "constant", a: float = 0.5, b: float = 4.0
) -> Callable[[int], float]:
    """The staleness weight ``s(t)`` named ``kind`` (see the module docstring).

    Args:
        kind: ``"constant"``, ``"polynomial"`` or ``"hinge"``.
        a: Exponent of ``"polynomial"``, slope of ``"hinge"`` (>= 0).
        b: Staleness up to which ``"hinge"`` gives weight 1 (>= 0).

    Returns:
        A function of the staleness ``t >= 0`` (negative values count as 0) with values
        in (0, 1].
    """
    a = _number("a", a)
    b = _number("b", b)
    if kind == "constant":
        return lambda t: 1.0
    if kind == "polynomial":
        return lambda t: float((max(t, 0) + 1.0) ** -a)
    if kind == "hinge":
        return lambda t: 1.0 if max(t, 0) <= b else 1.0 / (a * (t - b) + 1.0)
    raise ValueError(f"staleness_fn must be one of {', '.join(STALENESS_FUNCTIONS)}, got {kind!r}")


def _updates_done(state: Mapping[str, Any]) -> int:
    return int(state.get("updates", 0))


# ---------------------------------------------------------------------------- FedAsync
class FedAsyncAccumulator:
    """Mixes each update into a float64 copy of the global model as it arrives."""

    def __init__(
        self, global_weights: Weights, strategy: FedAsync, state: Mapping[str, Any]
    ) -> None:
        self._template = global_weights
        self._alpha = strategy.alpha
        self._s = strategy.staleness
        self._before = _updates_done(state)
        self._w: dict[str, F64] = {}
        self._tmp: dict[str, F64] = {}
        self.count = 0
        self._samples = 0
        self._alphas: list[float] = []
        self._max_staleness = 0
        self._done = False

    def add(self, update: Update) -> None:
        a = self._alpha * self._s(update.staleness)
        if not self._w:
            self._w = {k: np.array(v, dtype=np.float64) for k, v in self._template.items()}
        for name, w in self._w.items():
            # (1 - a) w + a w_k, written so that a = 1 gives w_k exactly
            np.multiply(w, 1.0 - a, out=w)
            tmp = self._tmp.get(name)
            if tmp is None:
                tmp = self._tmp[name] = np.empty_like(w)
            np.multiply(update.weights[name], a, out=tmp, dtype=np.float64)
            np.add(w, tmp, out=w)
        self.count += 1
        self._samples += max(update.num_samples, 0)
        self._alphas.append(a)
        self._max_staleness = max(self._max_staleness, update.staleness)

    def result(self) -> Result:
        if not self.count:
            raise ValueError("no updates to aggregate")
        if self._done:
            raise ValueError("result() was already taken for this round")
        self._done = True
        weights = {k: cast_like(self._w[k], ref) for k, ref in self._template.items()}
        self._w, self._tmp = {}, {}
        metrics: Metrics = {
            "num_updates": self.count,
            "num_samples": self._samples,
            "alpha_t": self._alphas[-1],
            "alpha_t_min": min(self._alphas),
            "max_staleness": self._max_staleness,
        }
        return Result(weights, {"updates": self._before + self.count}, metrics)


@register
class FedAsync(Strategy):
    """Asynchronous mixing w <- (1 - alpha_t) w + alpha_t w_k, alpha_t = alpha s(staleness).

    Args:
        alpha: Mixing weight in (0, 1] (default 0.6); ``alpha = 1`` with the constant
            staleness function replaces the global model by each arriving one.
        staleness_fn: ``"constant"``, ``"polynomial"`` or ``"hinge"``.
        a: ``"polynomial"`` exponent / ``"hinge"`` slope (default 0.5).
        b: ``"hinge"`` threshold (default 4).
        rho: If > 0, sent to agents as ``fedprox_mu``: the paper's regularised local
            objective ``f_k(w) + (rho/2)||w - w_tau||^2`` (the FedProx proximal term).
    """

    name = "fedasync"
    trigger = 1

    def __init__(
        self,
        alpha: float = 0.6,
        staleness_fn: str = "constant",
        a: float = 0.5,
        b: float = 4.0,
        rho: float = 0.0,
    ) -> None:
        self.alpha = _number("alpha", alpha, low_open=True, high=1.0)
        self.staleness_fn = str(staleness_fn)
        self.a = float(a)
        self.b = float(b)
        self.staleness = staleness_function(self.staleness_fn, self.a, self.b)
        self.rho = _number("rho", rho)

    def alpha_t(self, staleness: int) -> float:
        """The mixing weight for an update ``staleness`` server steps old."""
        return self.alpha * self.staleness(staleness)

    def agent_config(self) -> Metrics:
        return {"fedprox_mu": self.rho} if self.rho > 0 else {}

    def init_state(self, weights: Weights) -> StrategyState:
        return {"updates": 0}

    def begin(
        self,
        global_weights: Weights,
        state: Mapping[str, Any],
        *,
        round: int = 1,
        rng: np.random.Generator | None = None,
    ) -> FedAsyncAccumulator:
        return FedAsyncAccumulator(global_weights, self, state)


# ---------------------------------------------------------------------------- FedBuff
class FedBuffAccumulator:
    """Streams the buffered updates into a weighted sum; one server step in :meth:`result`.

    With ``c_i = p_i s(tau_i)``, ``C = sum c_i``, ``P = sum p_i`` and the weighted mean
    ``m = sum c_i w_i / C``, the averaged delta is ``(C / P)(m - w)`` (or ``m - w`` with
    ``normalize_staleness``), so the new model is ``(1 - eta C/P) w + eta (C/P) m``; when
    ``eta C / P == 1`` this is ``m`` bit for bit, i.e. FedAvg's result.
    """

    def __init__(
        self, global_weights: Weights, strategy: FedBuff, state: Mapping[str, Any]
    ) -> None:
        self._template = global_weights
        self._strategy = strategy
        self._state = state
        self._mean = WeightedMean(global_weights, strategy.weighted)
        self._p = 0.0
        self._max_staleness = 0

    @property
    def count(self) -> int:
        return self._mean.count

    def add(self, update: Update) -> None:
        p = self._mean.weight_of(update)
        self._mean.add(update, p * self._strategy.staleness(update.staleness))
        self._p += p
        self._max_staleness = max(self._max_staleness, update.staleness)

    def result(self) -> Result:
        strat = self._strategy
        mean = self._mean.mean64()  # raises on an empty or finished round
        ratio = 1.0 if strat.normalize_staleness else self._mean.total / self._p
        lr = strat.server_lr
        new: dict[str, F64] = {}
        state: StrategyState = {"updates": _updates_done(self._state) + self._mean.count}
        if strat.server_momentum == 0.0:
            keep = 1.0 - lr * ratio
            for k, ref in self._template.items():
                m = mean[k]
                np.multiply(m, lr * ratio, out=m)
                if keep != 0.0:
                    np.add(m, np.multiply(ref, keep, dtype=np.float64), out=m)
                new[k] = m
        else:
            beta = strat.server_momentum
            for k, ref in self._template.items():
                g = np.asarray(ref, dtype=np.float64)
                step = (mean[k] - g) * ratio
                prev = self._state.get(f"momentum/{k}")
                if prev is not None:
                    step += beta * np.asarray(prev, dtype=np.float64)
                state[f"momentum/{k}"] = step
                new[k] = g + lr * step
        weights = {k: cast_like(new[k], ref) for k, ref in self._template.items()}
        metrics: Metrics = {
            "num_updates": self._mean.count,
            "num_samples": self._mean.samples,
            "staleness_weight_mean": self._mean.total / self._p,
            "max_staleness": self._max_staleness,
        }
        return Result(weights, state, metrics)


@register
class FedBuff(Strategy):
    """Buffered asynchronous aggregation: one server step per K staleness-weighted deltas.

    Args:
        k: Buffer size K: the aggregator steps after every ``k`` accepted updates
            (``trigger``; default 10, the paper's usual K). A round that ends early (the
            round timeout) steps with the updates it has.
        server_lr: Server learning rate eta (default 1.0).
        weighted: Weight the deltas by ``num_samples`` (default True, as FedAvg;
            False: every delta counts once, as in the paper).
        staleness_fn: Staleness weight ``s``; the default ``"polynomial"`` with ``a = 0.5``
            is the paper's ``1 / sqrt(1 + staleness)``; ``"constant"`` disables it.
        a, b: Parameters of ``staleness_fn`` (see :func:`staleness_function`).
        normalize_staleness: Divide by ``sum p_i s_i`` instead of ``sum p_i`` (staleness
            then only changes the relative weights; see the module docstring).
        server_momentum: Heavy-ball momentum beta on the averaged delta (FedAvgM form,
            ``m <- beta m + d``, ``w <- w + eta m``; default 0 = none). The momentum is the
            strategy state ``momentum/<tensor>``.
    """

    name = "fedbuff"

    def __init__(
        self,
        k: int = 10,
        server_lr: float = 1.0,
        weighted: bool = True,
        staleness_fn: str = "polynomial",
        a: float = 0.5,
        b: float = 4.0,
        normalize_staleness: bool = False,
        server_momentum: float = 0.0,
    ) -> None:
        if isinstance(k, bool) or int(k) != k or int(k) < 1:
            raise ValueError(f"k must be an integer >= 1, got {k!r}")
        self.k = int(k)
        self.trigger = self.k
        self.server_lr = _number("server_lr", server_lr, low_open=True)
        self.weighted = bool(weighted)
        self.staleness_fn = str(staleness_fn)
        self.a = float(a)
        self.b = float(b)
        self.staleness = staleness_function(self.staleness_fn, self.a, self.b)
        self.normalize_staleness = bool(normalize_staleness)
        self.server_momentum = _number("server_momentum", server_momentum, high=1.0)
        if self.server_momentum == 1.0:
            raise ValueError("server_momentum must be < 1")

    def init_state(self, weights: Weights) -> StrategyState:
        return {"updates": 0}

    def begin(
        self,
        global_weights: Weights,
        state: Mapping[str, Any],
        *,
        round: int = 1,
        rng: np.random.Generator | None = None,
    ) -> FedBuffAccumulator:
        return FedBuffAccumulator(global_weights, self, state)
