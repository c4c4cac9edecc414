"""FedNova: normalized averaging (Wang, Liu, Liang, Joshi, Poor, "Tackling the Objective
Inconsistency Problem in Heterogeneous Federated Optimization", NeurIPS 2020).

When agents take different numbers of local steps ``tau_k``, FedAvg's mean of their models
drifts towards the objectives of the agents that took more steps. FedNova divides each
agent's change by the size of its local work before averaging, then rescales by the
federation's effective number of steps:

    d_k     = (x - w_k) / ||a_k||_1              (normalized update of agent k)
    x      <- x - tau_eff * sum_k p_k d_k
    tau_eff = sum_k p_k ||a_k||_1,    p_k = n_k / sum_j n_j

with ``||a_k||_1 = tau_k`` for plain local SGD. For local SGD with momentum ``rho``
(``local_momentum``) ``||a_k||_1 = [tau_k - rho (1 - rho^tau_k) / (1 - rho)] / (1 - rho)``,
and for a FedProx-style proximal term ``mu`` with local rate ``eta_l``
(``prox_mu``, ``local_lr``) ``||a_k||_1 = [1 - (1 - eta_l mu)^tau_k] / (eta_l mu)``
(the paper's section 4). With equal ``tau_k``
the rule is exactly FedAvg.

Each update must report ``tau_k`` as the metric ``"local_steps"`` (a positive number);
:meth:`FedNova.check` refuses one that does not.

Streaming: with ``r_k = ||a_1||_1 / ||a_k||_1`` (relative to the round's first update) the
server keeps ``M = sum_k n_k r_k w_k / sum_k n_k r_k`` (:class:`WeightedMean`) and three
scalars, since ``sum_k p_k d_k = (S / N) (x - M)`` with ``S = sum_k n_k / ||a_k||_1`` and
``N = sum_k n_k``; so ``x <- x + c (M - x)`` with ``c = tau_eff S / N``. When every
``||a_k||_1`` is equal, ``r_k = 1``, ``c = 1`` and the result is taken as ``M``: the FedAvg
mean, computed the same way as :class:`FedAvg` computes it.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

import numpy as np

from fedstack.errors import InvalidUpdate
from fedstack.strategies.base import Result, Strategy, Update, cast_like, register
from fedstack.strategies.fedavg import WeightedMean
from fedstack.types import Weights

__all__ = ["FedNova", "FedNovaAccumulator", "local_steps_of"]

STEPS_METRIC = "local_steps"


def local_steps_of(update: Update) -> float:
    """``update.metrics["local_steps"]`` as a positive float, or :class:`InvalidUpdate`."""
    value = update.metrics.get(STEPS_METRIC)
    if value is None:
        raise InvalidUpdate(
            "fednova: the update does not report its number of local steps "
            f"(metric {STEPS_METRIC!r})",
            agent_id=update.agent_id,
        )
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidUpdate(
            f"fednova: {STEPS_METRIC} must be a number, got {value!r}", agent_id=update.agent_id
        )
    steps = float(value)
    if not math.isfinite(steps) or steps <= 0:
        raise InvalidUpdate(
            f"fednova: {STEPS_METRIC} must be positive, got {value!r}", agent_id=update.agent_id
        )
    return steps


@register
class FedNova(Strategy):
    """Normalized averaging by each agent's local step count (Wang et al., NeurIPS 2020).

    ``x <- x - tau_eff * sum_k p_k (x - w_k) / ||a_k||_1`` with ``tau_eff = sum_k p_k
    ||a_k||_1``, ``p_k = n_k / n`` and ``||a_k||_1 = tau_k`` (the update's ``local_steps``
    metric) for plain local SGD; equal step counts give FedAvg.

    Args:
        weighted: ``p_k`` proportional to sample counts (False: equal weights).
        local_momentum: The agents' local SGD momentum ``rho`` (0: plain SGD).
        prox_mu: The agents' proximal coefficient ``mu`` (FedProx; 0: none).
        local_lr: The agents' learning rate ``eta_l`` (needed only with ``prox_mu``).

    Refused in a horizontal federation (:attr:`federation_refusal`): ``tau_eff`` must be
    computed over all agents of the round; per-cluster normalisations with different
    ``tau_eff`` synthesised by sample weight re-introduce the objective inconsistency
    FedNova removes.
    """

    name = "fednova"
    federation_refusal = (
        "its normalisation (tau_eff, the weighted mean of local step counts) must be over "
        "ALL agents of a round; per-cluster values synthesised by sample weight bring back "
        "the objective inconsistency FedNova removes; use fedavg or fedprox in the "
        "federation, or FedNova on one aggregator"
    )

    def __init__(
        self,
        weighted: bool = True,
        local_momentum: float = 0.0,
        prox_mu: float = 0.0,
        local_lr: float | None = None,
    ) -> None:
        self.weighted = bool(weighted)
        self.local_momentum = float(local_momentum)
        self.prox_mu = float(prox_mu)
        self.local_lr = None if local_lr is None else float(local_lr)
        if not 0.0 <= self.local_momentum < 1.0:
            raise ValueError(f"local_momentum must be in [0, 1), got {local_momentum!r}")
        if not (math.isfinite(self.prox_mu) and self.prox_mu >= 0.0):
            raise ValueError(f"prox_mu must be >= 0, got {prox_mu!r}")
        if self.prox_mu > 0.0:
            if self.local_momentum > 0.0:
                raise ValueError("local_momentum and prox_mu cannot be combined")
            if self.local_lr is None or not 0.0 < self.local_lr * self.prox_mu <= 1.0:
                raise ValueError("prox_mu needs local_lr with 0 < local_lr * prox_mu <= 1")

    def norm_of(self, steps: float) -> float:
        """``||a||_1`` of an agent that took ``steps`` local steps."""
        rho = self.local_momentum
        if rho > 0.0:
            return (steps - rho * (1.0 - math.pow(rho, steps)) / (1.0 - rho)) / (1.0 - rho)
        if self.prox_mu > 0.0:
            assert self.local_lr is not None
            s = self.local_lr * self.prox_mu
            return (1.0 - math.pow(1.0 - s, steps)) / s
        return steps

    def check(self, update: Update, global_weights: Weights) -> None:
        local_steps_of(update)

    def begin(
        self,
        global_weights: Weights,
        state: Mapping[str, Any],
        *,
        round: int = 1,
        rng: np.random.Generator | None = None,
    ) -> FedNovaAccumulator:
        return FedNovaAccumulator(self, global_weights)


class FedNovaAccumulator:
    """Streaming FedNova: one float64 accumulator per tensor plus four scalars."""

    def __init__(self, strategy: FedNova, global_weights: Weights) -> None:
        self._strategy = strategy
        self._global = global_weights
        self._mean = WeightedMean(global_weights, strategy.weighted)
        self._first_norm = 0.0
        self._equal = True
        self._n = 0.0  # N = sum n_k
        self._tn = 0.0  # sum n_k ||a_k||
        self._rn = 0.0  # sum n_k r_k

    @property
    def count(self) -> int:
        return self._mean.count

    def add(self, update: Update) -> None:
        norm = self._strategy.norm_of(local_steps_of(update))
        if self._mean.count == 0:
            self._first_norm = norm
        ratio = self._first_norm / norm
        self._equal = self._equal and ratio == 1.0
        n = self._mean.weight_of(update)
        self._mean.add(update, weight=n * ratio)
        self._n += n
        self._tn += n * norm
        self._rn += n * ratio

    def result(self) -> Result:
        mean = self._mean.mean64()
        tau_eff = self._tn / self._n
        # c = tau_eff * S / N with S = sum n_k / ||a_k|| = (sum n_k r_k) / ||a_1||
        c = tau_eff * (self._rn / self._first_norm) / self._n
        out: Weights = {}
        for name, ref in self._global.items():
            m = mean[name]
            if not self._equal:  # x + c (M - x)
                np.subtract(m, ref, out=m, dtype=np.float64)
                m *= c
                np.add(m, ref, out=m, dtype=np.float64)
            out[name] = cast_like(m, ref)
        return Result(
            out,
            {},
            {
                "num_updates": self._mean.count,
                "num_samples": self._mean.samples,
                "tau_eff": tau_eff,
                "nova_scale": 1.0 if self._equal else c,
            },
        )
