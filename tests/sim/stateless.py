"""Trainers for the simulator tests (imported by name, also in worker processes)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from fedstack.trainers.digits import DigitsLinearTrainer
from fedstack.types import Metrics, Weights


class ForgetfulDigits(DigitsLinearTrainer):
    """The digits trainer with its generator reset before every fit (no state kept)."""

    def get_state(self) -> dict[str, Any]:
        return {}

    def set_state(self, state: Mapping[str, Any]) -> None:
        self._rng = np.random.default_rng([self.seed, self.index])

    def fit(self, weights: Weights, config: Mapping[str, Any]) -> tuple[Weights, int, Metrics]:
        self.set_state({})
        return super().fit(weights, config)


class FailingTrainer:
    def __init__(self, index: int = 0, num_agents: int = 1) -> None:
        self.index = index

    def initial_weights(self) -> Weights:
        return {"w": np.zeros(4, np.float32)}

    def fit(self, weights: Weights, config: Mapping[str, Any]) -> tuple[Weights, int, Metrics]:
        raise RuntimeError(f"boom in fit of agent {self.index}")

    def evaluate(self, weights: Weights, config: Mapping[str, Any]) -> Metrics:
        return {}
