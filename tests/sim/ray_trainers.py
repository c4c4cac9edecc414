"""Trainers for the Ray backend's tests (imported by name in Ray's worker processes)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import psutil

from fedstack.types import Metrics, Weights

_LEAK: list[np.ndarray] = []


class ResourceProbe:
    """Reports the Ray resources assigned to the process its fit runs in."""

    def __init__(self, index: int = 0, num_agents: int = 1) -> None:
        self.index = index

    def initial_weights(self) -> Weights:
        return {"w": np.zeros(4, np.float32)}

    def fit(self, weights: Weights, config: Mapping[str, Any]) -> tuple[Weights, int, Metrics]:
        import ray

        got = ray.get_runtime_context().get_assigned_resources()
        return (
            dict(weights),
            1,
            {
                "cpus": float(got.get("CPU", 0.0)),
                "gpus": float(got.get("GPU", 0.0)),
                "pid": os.getpid(),
            },
        )

    def evaluate(self, weights: Weights, config: Mapping[str, Any]) -> Metrics:
        return {}


class LeakyTrainer(ResourceProbe):
    """Leaks ``leak_mb`` MiB (touched) per fit and reports its process's RSS."""

    def __init__(self, index: int = 0, num_agents: int = 1, leak_mb: int = 4) -> None:
        super().__init__(index, num_agents)
        self.leak_mb = leak_mb

    def fit(self, weights: Weights, config: Mapping[str, Any]) -> tuple[Weights, int, Metrics]:
        _LEAK.append(np.ones(self.leak_mb * 2**20 // 8))
        rss = psutil.Process().memory_info().rss
        return dict(weights), 1, {"rss_mb": rss / 2**20, "pid": os.getpid()}
