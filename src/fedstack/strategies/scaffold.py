"""SCAFFOLD, the server side (Karimireddy, Kale, Mohri, Reddi, Stich, Suresh, "SCAFFOLD:
Stochastic Controlled Averaging for Federated Learning", ICML 2020, Algorithm 1).

Client drift on heterogeneous data is corrected with *control variates*: the server keeps
``c`` (an estimate of the full gradient), agent ``i`` keeps ``c_i`` (of its own gradient),
and every local step uses the corrected gradient ``g_i(y) - c_i + c``. After ``K`` local
steps agent ``i`` updates its control (option II: ``c_i+ = c_i - c + (x - y_i) / (K eta_l)``)
and uploads ``Delta y_i = y_i - x`` (as its model ``y_i``) and ``Delta c_i = c_i+ - c_i``.
The server takes

    x <- x + eta_g * mean_{i in S} (y_i - x)
    c <- c + (|S| / N) * mean_{i in S} Delta c_i   (= c + sum_{i in S} Delta c_i / N)

with ``N`` the total number of agents, which keeps ``c = mean_i c_i`` over all agents.
The PyTorch helper for the agents is :class:`fedstack.agent.scaffold.ScaffoldClient`.

Wire format, for every floating-point tensor ``<t>`` of the model (integer and boolean
tensors, e.g. batch-norm counters, have no control variate):

- down (``Result.extra``, and :meth:`Scaffold.initial_extra`: zeros): ``"c/<t>"``, ``c`` in
  the tensor's dtype (at least float32);
- up (``Update.extra``): ``"dc/<t>"``, ``Delta c_i``, shaped like the tensor;
  :meth:`Scaffold.check` refuses an update that lacks one, has one of the wrong shape or
  a non-numeric dtype, or carries a ``"dc/"`` array for an unknown tensor.

State: ``"c/<t>"`` (float64) and, when ``num_agents`` is not given, ``"agents"``: the sorted
ids of the agents seen so far (``N`` is its length).

The paper averages ``Delta y_i`` uniformly over the sampled agents (``weighted=False``, the
default); ``weighted=True`` weights the models by sample counts as FedAvg does. ``Delta c_i``
is always averaged uniformly: that is what keeps ``c`` the mean of the ``c_i``. With
``global_lr = 1`` the new model is the (weighted) mean of the ``y_i`` as FedAvg computes it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from fedstack.errors import InvalidUpdate
from fedstack.strategies.base import Result, Strategy, StrategyState, Update, cast_like, register
from fedstack.strategies.fedavg import WeightedMean
from fedstack.types import Array, Weights

__all__ = ["C_PREFIX", "DC_PREFIX", "Scaffold", "ScaffoldAccumulator", "control_names"]

C_PREFIX = "c/"
"""Server control variate, in ``Result.extra`` and the state."""
DC_PREFIX = "dc/"
"""An agent's control-variate change, in ``Update.extra``."""

F64 = np.ndarray[Any, np.dtype[np.float64]]


def control_names(weights: Mapping[str, Array]) -> list[str]:
    """The tensors that have control variates: the floating-point ones."""
    return [k for k, v in weights.items() if np.asarray(v).dtype.kind == "f"]


def _wire_dtype(ref: Array) -> np.dtype[Any]:
    return np.result_type(ref.dtype, np.float32)


@register
class Scaffold(Strategy):
    """SCAFFOLD's server (Karimireddy et al., ICML 2020): model step plus control variate.

    ``x <- x + eta_g * mean(y_i - x)`` and ``c <- c + (|S| / N) * mean(Delta c_i)``; ``c`` is
    sent to the agents as the extra arrays ``"c/<tensor>"``, agents upload ``Delta c_i`` as
    ``"dc/<tensor>"`` (see the module docstring).

    Args:
        global_lr: The server step ``eta_g`` (1.0).
        num_agents: ``N``, the number of agents in the federation; None (default) counts
            the distinct agents seen so far (kept in the state). ``N`` is never taken below
            the round's number of updates.
        weighted: Weight the models by sample counts (False: the paper's plain mean).

    Refused in a horizontal federation (:attr:`federation_refusal`): the server control
    variate ``c`` must be the mean correction over ALL agents, and every agent must get
    the same ``c``; per-cluster variates synthesised by sample weight are neither.
    """

    name = "scaffold"
    reads_extra = (DC_PREFIX,)
    federation_refusal = (
        "its server control variate must be the mean over ALL agents and the same for "
        "every agent, which per-cluster aggregation cannot give; run SCAFFOLD on one "
        "aggregator, or use fedavg / fedprox / fedavgm in the federation"
    )

    def __init__(
        self, global_lr: float = 1.0, num_agents: int | None = None, weighted: bool = False
    ) -> None:
        lr = float(global_lr)
        if not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"global_lr must be positive, got {global_lr!r}")
        if num_agents is not None and (
            isinstance(num_agents, bool) or not isinstance(num_agents, int) or num_agents < 1
        ):
            raise ValueError(f"num_agents must be a positive integer, got {num_agents!r}")
        self.global_lr = lr
        self.num_agents = num_agents
        self.weighted = bool(weighted)

    def init_state(self, weights: Weights) -> StrategyState:
        """``c = 0`` for every floating-point tensor (and no agents seen)."""
        state: StrategyState = {
            C_PREFIX + k: np.zeros(np.shape(weights[k]), dtype=np.float64)
            for k in control_names(weights)
        }
        if self.num_agents is None:
            state["agents"] = []
        return state

    def initial_extra(self, weights: Weights) -> Weights:
        """``"c/<tensor>"`` zeros, sent with the first global model."""
        return {
            C_PREFIX + k: np.zeros(np.shape(weights[k]), dtype=_wire_dtype(weights[k]))
            for k in control_names(weights)
        }

    def check(self, update: Update, global_weights: Weights) -> None:
        names = control_names(global_weights)
        bad: list[str] = []
        for k in names:
            arr = update.extra.get(DC_PREFIX + k)
            if arr is None:
                bad.append(f"missing {DC_PREFIX + k}")
                continue
            a = np.asarray(arr)
            if a.shape != np.shape(global_weights[k]):
                bad.append(
                    f"{DC_PREFIX + k} has shape {a.shape}, the model {np.shape(global_weights[k])}"
                )
            elif a.dtype.kind not in "fiu":
                bad.append(f"{DC_PREFIX + k} has dtype {a.dtype}")
        known = {DC_PREFIX + k for k in names}
        bad += [f"unknown {k}" for k in update.extra if k.startswith(DC_PREFIX) and k not in known]
        if bad:
            raise InvalidUpdate(
                "scaffold: the update must carry the control-variate change 'dc/<tensor>' "
                "for every floating-point tensor: "
                + "; ".join(bad[:10])
                + (f" (and {len(bad) - 10} more)" if len(bad) > 10 else ""),
                agent_id=update.agent_id,
            )

    def begin(
        self,
        global_weights: Weights,
        state: Mapping[str, Any],
        *,
        round: int = 1,
        rng: np.random.Generator | None = None,
    ) -> ScaffoldAccumulator:
        return ScaffoldAccumulator(self, global_weights, state)


class ScaffoldAccumulator:
    """Streams the mean model and the sum of the ``Delta c_i``."""

    def __init__(
        self, strategy: Scaffold, global_weights: Weights, state: Mapping[str, Any]
    ) -> None:
        self._strategy = strategy
        self._global = global_weights
        self._names = control_names(global_weights)
        self._c: dict[str, F64] = {}
        for k in self._names:
            c = state.get(C_PREFIX + k)
            arr = (
                np.zeros(np.shape(global_weights[k]))
                if c is None
                else np.asarray(c, dtype=np.float64)
            )
            if arr.shape != np.shape(global_weights[k]):
                raise ValueError(
                    f"strategy state {C_PREFIX + k!r} has shape {arr.shape}, "
                    f"the model tensor {np.shape(global_weights[k])}"
                )
            self._c[k] = arr
        self._seen: set[str] = set(state.get("agents") or [])
        self._mean = WeightedMean(global_weights, strategy.weighted)
        self._dc: dict[str, F64] = {}

    @property
    def count(self) -> int:
        return self._mean.count

    def add(self, update: Update) -> None:
        self._strategy.check(update, self._global)
        self._mean.add(update)
        for k in self._names:
            dc = update.extra[DC_PREFIX + k]
            acc = self._dc.get(k)
            if acc is None:
                self._dc[k] = np.array(dc, dtype=np.float64)
            else:
                np.add(acc, dc, out=acc, dtype=np.float64)
        self._seen.add(update.agent_id)

    def result(self) -> Result:
        s = self._strategy
        mean = self._mean.mean64()
        out: Weights = {}
        for name, ref in self._global.items():
            m = mean[name]
            if s.global_lr != 1.0:  # x + eta_g (mean - x); eta_g = 1: the mean itself
                np.subtract(m, ref, out=m, dtype=np.float64)
                m *= s.global_lr
                np.add(m, ref, out=m, dtype=np.float64)
            out[name] = cast_like(m, ref)
        updates = self._mean.count
        n_agents = s.num_agents if s.num_agents is not None else len(self._seen)
        n_agents = max(n_agents, updates)
        state: StrategyState = {}
        extra: Weights = {}
        sq = 0.0
        for k in self._names:
            c = self._c[k] + self._dc[k] / n_agents  # c + (|S|/N) mean(dc) = c + sum(dc)/N
            state[C_PREFIX + k] = c
            extra[C_PREFIX + k] = c.astype(_wire_dtype(self._global[k]))
            sq += float(np.sum(np.square(c)))
        if s.num_agents is None:
            state["agents"] = sorted(self._seen)
        return Result(
            out,
            state,
            {
                "num_updates": updates,
                "num_samples": self._mean.samples,
                "num_agents": n_agents,
                "control_norm": math.sqrt(sq),
            },
            extra,
        )
