"""A framework-overhead probe: a big model whose "training" only adds a constant.

Used by ``bench/overhead_probe.py``: with nothing to learn, a round's time is the
framework's own cost (moving, storing and averaging the model). Pure numpy::

    fedstack agent --trainer fedstack.testing.probe:ProbeTrainer \\
        --trainer-arg params=25000000 --trainer-arg delta=0.001
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from fedstack.errors import InvalidUpdate
from fedstack.trainers.digits import coerce_float, coerce_int
from fedstack.types import Metrics, Weights

__all__ = ["ProbeTrainer", "evaluate_probe", "probe_step"]

KEY = "w"


def probe_step(w: np.ndarray[Any, Any], delta: float) -> np.ndarray[Any, Any]:
    """The probe's whole "training": a new array ``w + delta`` (float32)."""
    out: np.ndarray[Any, Any] = np.add(w, np.float32(delta), dtype=np.float32)
    return out


class ProbeTrainer:
    """A model of ``params`` float32 zeros; ``fit`` returns ``weights + delta``.

    Args:
        params: Number of float32 parameters (25,000,000 = 100 MB).
        delta: The constant added to every weight in each ``fit``.
        index: Unused (accepted so every agent can be launched alike).
        num_agents: Unused.

    Raises:
        ConfigError: If an argument is invalid.
    """

    def __init__(
        self,
        params: int | str = 25_000_000,
        delta: float | str = 0.001,
        index: int | str = 0,
        num_agents: int | str = 1,
    ) -> None:
        self.params = coerce_int("params", params, minimum=1)
        self.delta = coerce_float("delta", delta, positive=False)
        self.index = coerce_int("index", index, minimum=0)
        self.num_agents = coerce_int("num_agents", num_agents, minimum=1)

    def initial_weights(self) -> Weights:
        """``{"w": zeros(params, float32)}``."""
        return {KEY: np.zeros(self.params, dtype=np.float32)}

    def fit(self, weights: Weights, config: Mapping[str, Any]) -> tuple[Weights, int, Metrics]:
        """Add ``delta`` to every weight.

        Returns:
            ``({"w": w + delta}, 1, {})``: every agent weighs the same in FedAvg.

        Raises:
            InvalidUpdate: If ``weights`` is not ``{"w": (params,)}``.
        """
        if set(weights) != {KEY} or weights[KEY].shape != (self.params,):
            raise InvalidUpdate(f"probe model needs {{'w': ({self.params},)}}")
        return {KEY: probe_step(weights[KEY], self.delta)}, 1, {}

    def evaluate(self, weights: Weights, config: Mapping[str, Any]) -> Metrics:
        """``{"mean": mean of the weights}`` (rounds x delta after ``rounds`` rounds)."""
        return evaluate_probe(weights)


def evaluate_probe(weights: Weights) -> Metrics:
    """Central "evaluation" of the probe model: the mean weight.

    Args:
        weights: ``{"w": array}``.

    Returns:
        ``{"mean": float}``; after ``r`` rounds of FedAvg it is ``r * delta``.

    Raises:
        InvalidUpdate: If the weights are not the probe's.
    """
    if set(weights) != {KEY}:
        raise InvalidUpdate("probe model needs exactly {'w'}")
    w: np.ndarray[Any, Any] = np.asarray(weights[KEY], dtype=np.float32)
    return {"mean": float(w.mean(dtype=np.float64))}
