"""Strategies whose agents train a regularised local objective: FedProx and FedCurv.

Both keep FedAvg on the server for the weights; what differs is what the agents minimise
(the PyTorch helpers are in :mod:`fedstack.agent.regularizers`) and, for FedCurv, the extra
arrays exchanged with the model.

**FedProx** (Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020;
the book's chapter 7, G7-03). Agent ``k`` minimises

    h_k(w) = F_k(w) + (mu / 2) ||w - w_t||^2

around the global model ``w_t`` it received, possibly *inexactly*: it may stop once
``||grad h_k(w)|| <= gamma ||grad h_k(w_t)||`` (gamma-inexact solution). The server
aggregates with FedAvg. ``mu = 0`` makes the local objective plain ``F_k``: FedProx with
``mu = 0`` *is* FedAvg (server and agents alike), apart from any gamma-inexact early stop.
The book's code writes ``mu ||w - w_t||^2`` without the 1/2 (its ``mu = 0.001`` is this
module's ``mu = 0.002``); the paper and this implementation use ``mu / 2``, whose gradient
is ``mu (w - w_t)``.

**FedCurv** (Shoham et al., "Overcoming Forgetting in Federated Learning on Non-IID Data",
2019; G7-04). Agent ``j`` uploads, besides its weights ``w_j``, the diagonal of its
empirical Fisher information ``u_j = F_j`` and ``v_j = F_j * w_j`` (element-wise), as the
extra arrays ``"u/<tensor>"`` and ``"v/<tensor>"``. The server averages the weights
(FedAvg) and *sums* the statistics over the round's updates,

    U = sum_j u_j,    V = sum_j v_j,

returned to every agent as ``Result.extra`` under the same names. Agent ``k`` subtracts its
own contribution (``U_k = U - u_k``, ``V_k = V - v_k``) and adds the EWC-style penalty

    lambda * sum_i ( w_i^2 U_k,i - 2 w_i V_k,i + V_k,i^2 / (U_k,i + eps) )
      = lambda * sum_{j != k} (w - w_j)^T diag(F_j) (w - w_j) + const,

whose gradient is ``2 lambda (w U_k - V_k)``. Statistics exist for floating-point tensors
only (integer and boolean tensors, e.g. batch-norm counters, carry none); an update must
carry both arrays for every floating-point tensor of the model, shaped like it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from fedstack.errors import InvalidUpdate
from fedstack.strategies.base import Result, Strategy, Update, cast_like, register
from fedstack.strategies.fedavg import FedAvgAccumulator, WeightedMean
from fedstack.types import Metrics, Weights

__all__ = ["FedCurv", "FedCurvAccumulator", "FedProx", "fisher_tensor_names"]

U_PREFIX = "u/"
V_PREFIX = "v/"


def _finite_nonnegative(name: str, value: float, *, positive: bool = False) -> float:
    v = float(value)
    if not math.isfinite(v) or v < 0 or (positive and v == 0):
        raise ValueError(
            f"{name} must be a finite number {'>' if positive else '>='} 0, got {value!r}"
        )
    return v


# ---------------------------------------------------------------------------- FedProx
@register
class FedProx(Strategy):
    """FedAvg on the server; agents add the proximal term (mu/2)||w - w_t||^2 to their loss.

    Args:
        mu: Proximal coefficient sent to the agents as ``fedprox_mu`` (default 0.01, the
            NIID-Bench default; the paper tunes it in {0.001, 0.01, 0.1, 0.5, 1}).
            ``mu = 0`` is FedAvg.
        weighted: Weight the average by ``num_samples`` (as FedAvg).
        gamma: If set (0 <= gamma <= 1), also sent as ``fedprox_gamma``: agents may stop
            local training once ``||grad h_k(w)|| <= gamma ||grad h_k(w_t)||``
            (:class:`fedstack.agent.regularizers.GammaInexact`). ``None``: fixed local work.
    """

    name = "fedprox"
    secure_aggregation = True

    def __init__(self, mu: float = 0.01, weighted: bool = True, gamma: float | None = None) -> None:
        self.mu = _finite_nonnegative("mu", mu)
        self.weighted = bool(weighted)
        if gamma is not None:
            gamma = _finite_nonnegative("gamma", gamma)
            if gamma > 1:
                raise ValueError(f"gamma must be in [0, 1], got {gamma!r}")
        self.gamma = gamma

    def agent_config(self) -> Metrics:
        cfg: Metrics = {"fedprox_mu": self.mu}
        if self.gamma is not None:
            cfg["fedprox_gamma"] = self.gamma
        return cfg

    def begin(
        self,
        global_weights: Weights,
        state: Mapping[str, Any],
        *,
        round: int = 1,
        rng: np.random.Generator | None = None,
    ) -> FedAvgAccumulator:
        return FedAvgAccumulator(global_weights, self.weighted, "auto")


# ---------------------------------------------------------------------------- FedCurv
def fisher_tensor_names(weights: Weights) -> list[str]:
    """The tensors that carry FedCurv statistics: the floating-point ones, in model order."""
    return [k for k, v in weights.items() if np.asarray(v).dtype.kind == "f"]


class FedCurvAccumulator:
    """FedAvg of the weights and streaming float64 sums of the ``u/`` and ``v/`` arrays."""

    def __init__(self, global_weights: Weights, weighted: bool) -> None:
        self._template = global_weights
        self._mean = WeightedMean(global_weights, weighted)
        self._names = fisher_tensor_names(global_weights)
        self._sums: dict[str, np.ndarray[Any, np.dtype[np.float64]]] = {}

    @property
    def count(self) -> int:
        return self._mean.count

    def add(self, update: Update) -> None:
        _check_extra(update, self._template, self._names)
        self._mean.add(update)
        first = not self._sums
        for name in self._names:
            for key in (U_PREFIX + name, V_PREFIX + name):
                arr = update.extra[key]
                if first:
                    self._sums[key] = np.array(arr, dtype=np.float64)  # a copy
                else:
                    np.add(self._sums[key], arr, out=self._sums[key], dtype=np.float64)

    def result(self) -> Result:
        means = self._mean.mean64()
        weights = {k: cast_like(means[k], ref) for k, ref in self._template.items()}
        extra: Weights = {}
        for name in self._names:
            ref = self._template[name]
            for key in (U_PREFIX + name, V_PREFIX + name):
                extra[key] = cast_like(self._sums[key], ref)
        self._sums = {}
        metrics: Metrics = {"num_updates": self._mean.count, "num_samples": self._mean.samples}
        return Result(weights, {}, metrics, extra)


def _check_extra(update: Update, global_weights: Weights, names: list[str]) -> None:
    def bad(msg: str) -> InvalidUpdate:
        return InvalidUpdate(f"fedcurv: {msg}", agent_id=update.agent_id)

    expected = {p + n for n in names for p in (U_PREFIX, V_PREFIX)}
    missing = sorted(expected - set(update.extra))
    unexpected = sorted(set(update.extra) - expected)
    if missing or unexpected:
        raise bad(
            "the update must carry the extra arrays 'u/<tensor>' (Fisher diagonal) and "
            "'v/<tensor>' (Fisher * weights) for every floating-point tensor; "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for name in names:
        shape = np.shape(global_weights[name])
        for prefix in (U_PREFIX, V_PREFIX):
            arr = np.asarray(update.extra[prefix + name])
            if arr.shape != shape:
                raise bad(
                    f"extra array {prefix + name!r} has shape {arr.shape}, the tensor has {shape}"
                )
            if arr.dtype.kind not in "fiu":
                raise bad(
                    f"extra array {prefix + name!r} has dtype {arr.dtype}, "
                    "expected a real number type"
                )
            if prefix == U_PREFIX and arr.size and bool(np.any(np.less(arr, 0))):
                raise bad(f"extra array {prefix + name!r} (a Fisher diagonal) has negative entries")


@register
class FedCurv(Strategy):
    """FedAvg of the weights plus the sums of the agents' Fisher statistics (u, v).

    Args:
        lam: The penalty weight lambda, sent to agents as ``fedcurv_lambda``
            (default 1.0, the book's ``fedcurv_lambda``).
        eps: Added to ``U`` in the constant term ``V^2 / (U + eps)``, sent as
            ``fedcurv_eps`` (default 1e-8).
        weighted: Weight the average of the weights by ``num_samples`` (as FedAvg). The
            statistics are always summed unweighted.

    In a horizontal federation it runs per cluster: the Fisher sums sent to a member's
    agents are those of its own cluster (extra arrays are per cluster), the weights are
    synthesised with the other members'.
    """

    name = "fedcurv"
    reads_extra = (U_PREFIX, V_PREFIX)

    def __init__(self, lam: float = 1.0, eps: float = 1e-8, weighted: bool = True) -> None:
        self.lam = _finite_nonnegative("lam", lam)
        self.eps = _finite_nonnegative("eps", eps)
        self.weighted = bool(weighted)

    def agent_config(self) -> Metrics:
        return {"fedcurv_lambda": self.lam, "fedcurv_eps": self.eps}

    def initial_extra(self, weights: Weights) -> Weights:
        """Zero statistics (no agent has reported yet): the first round's penalty is 0."""
        extra: Weights = {}
        for name in fisher_tensor_names(weights):
            extra[U_PREFIX + name] = np.zeros_like(weights[name])
            extra[V_PREFIX + name] = np.zeros_like(weights[name])
        return extra

    def check(self, update: Update, global_weights: Weights) -> None:
        """Refuse an update without ``u/``, ``v/`` arrays shaped like every float tensor,
        with unexpected extra arrays, or with a negative Fisher entry."""
        _check_extra(update, global_weights, fisher_tensor_names(global_weights))

    def begin(
        self,
        global_weights: Weights,
        state: Mapping[str, Any],
        *,
        round: int = 1,
        rng: np.random.Generator | None = None,
    ) -> FedCurvAccumulator:
        return FedCurvAccumulator(global_weights, self.weighted)
