"""The synthetic task of ``bench/secagg_cost.py``, shared by fedstack and the Flower app.

Every agent's "training" returns the global model plus a fixed synthetic update: ``P``
float32 values drawn once per agent (uniform in [-0.01, 0.01], seeded by the agent's
index), and a sample count of ``100 + index``. Nothing is learnt and nothing is computed
per round beyond one vector addition, so a round's wall time is the cost of moving and
aggregating the updates: the secure-aggregation protocol's cost, or plain FedAvg's.

Pure numpy on purpose: it is imported by fedstack's simulator (``--trainer
secagg_task:SyntheticUpdateTrainer`` with ``bench/`` on ``sys.path``) and by the Flower
ClientApp in Flower's own venv alike.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import numpy as np

KEY = "w"
AMPLITUDE = 0.01


@lru_cache(maxsize=256)
def synthetic_update(index: int, params: int, seed: int = 0) -> np.ndarray[Any, Any]:
    """Agent ``index``'s fixed update: ``params`` float32 in [-0.01, 0.01] (read-only)."""
    rng = np.random.default_rng([seed, index])
    out = rng.uniform(-AMPLITUDE, AMPLITUDE, params).astype(np.float32)
    out.setflags(write=False)
    return out


def num_samples(index: int) -> int:
    """Agent ``index``'s sample count (so the weighted FedAvg is not a plain mean)."""
    return 100 + int(index)


def expected_mean_update(agents: list[int], params: int, seed: int = 0) -> np.ndarray[Any, Any]:
    """The sample-weighted mean of the updates of ``agents`` (float64): what one round of
    weighted FedAvg over exactly those agents adds to the global model."""
    total = np.zeros(params, dtype=np.float64)
    weight = 0.0
    for i in agents:
        total += num_samples(i) * synthetic_update(i, params, seed).astype(np.float64)
        weight += num_samples(i)
    out: np.ndarray[Any, Any] = total / weight
    return out


class SyntheticUpdateTrainer:
    """A fedstack trainer: ``fit`` returns ``weights + synthetic_update(index)``.

    Args:
        params: Number of float32 parameters.
        seed: Seed of the synthetic updates.
        index: The agent's index (fedstack's simulator passes it).
        num_agents: Unused (accepted so every agent is built alike).
    """

    def __init__(
        self,
        params: int | str = 100_000,
        seed: int | str = 0,
        index: int | str = 0,
        num_agents: int | str = 1,
    ) -> None:
        self.params = int(params)
        self.seed = int(seed)
        self.index = int(index)
        self.num_agents = int(num_agents)
        if self.params < 1 or self.index < 0:
            raise ValueError("params must be >= 1 and index >= 0")

    def initial_weights(self) -> dict[str, np.ndarray[Any, Any]]:
        """``{"w": zeros(params, float32)}``."""
        return {KEY: np.zeros(self.params, dtype=np.float32)}

    def fit(
        self, weights: Mapping[str, np.ndarray[Any, Any]], config: Mapping[str, Any]
    ) -> tuple[dict[str, np.ndarray[Any, Any]], int, dict[str, float]]:
        """The global model plus this agent's fixed update, and its sample count."""
        w = np.asarray(weights[KEY], dtype=np.float32)
        if w.shape != (self.params,):
            raise ValueError(f"expected {{'w': ({self.params},)}}, got {w.shape}")
        new = np.add(w, synthetic_update(self.index, self.params, self.seed), dtype=np.float32)
        return {KEY: new}, num_samples(self.index), {}

    def evaluate(
        self, weights: Mapping[str, np.ndarray[Any, Any]], config: Mapping[str, Any]
    ) -> dict[str, float]:
        """``{"mean": mean weight}``."""
        return evaluate_mean(weights)


def evaluate_mean(weights: Mapping[str, np.ndarray[Any, Any]]) -> dict[str, float]:
    """Central "evaluation": the mean and the mean absolute value of the weights."""
    w = np.asarray(weights[KEY], dtype=np.float64)
    return {"mean": float(w.mean()), "mean_abs": float(np.abs(w).mean())}
