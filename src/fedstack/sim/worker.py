"""What runs where the virtual agents' training runs: a worker process, a Ray worker, or
the simulator's own process. Builds each agent's trainer once per worker (a bounded
cache), restores the agent's state, calls ``fit`` and returns the state after it.

A trainer is given as ``module:Callable`` and is built as
``Callable(index=I, num_agents=N, **trainer_args)``: ``index`` selects the agent's data.
A trainer that keeps state between fits (a random generator, an optimizer's moments,
SCAFFOLD's control variate, ...) should implement ``get_state() -> dict`` and
``set_state(dict)``: the simulator keeps that state per agent between rounds, so an agent
trains the same wherever its fit runs (any worker, any backend).
"""

from __future__ import annotations

import collections
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fedstack.plugins import load_callable
from fedstack.types import Metrics, Weights

__all__ = ["FitResult", "FitTask", "TrainerCache", "initial_weights", "run_fit"]


@dataclass
class FitTask:
    """One local training of one virtual agent."""

    trainer: str
    trainer_args: dict[str, Any]
    index: int
    num_agents: int
    weights: Weights
    config: dict[str, Any]
    state: dict[str, Any] | None = None


@dataclass
class FitResult:
    index: int
    weights: Weights
    num_samples: int
    metrics: Metrics
    extra: Weights | None = None
    state: dict[str, Any] | None = None
    seconds: float = 0.0
    """Wall time of the whole task in the worker (building the trainer included)."""
    fit_seconds: float = 0.0
    """Wall time of ``trainer.fit`` alone."""
    worker: int = field(default_factory=os.getpid)


class TrainerCache:
    """Trainers built in this process, by agent index; the least recently used go first."""

    def __init__(self, capacity: int = 256) -> None:
        self.capacity = capacity
        self._items: collections.OrderedDict[tuple[str, str, int, int], Any] = (
            collections.OrderedDict()
        )

    def get(
        self, trainer: str, trainer_args: Mapping[str, Any], index: int, num_agents: int
    ) -> Any:
        key = (trainer, repr(sorted(trainer_args.items())), index, num_agents)
        obj = self._items.get(key)
        if obj is None:
            obj = load_callable(trainer)(index=index, num_agents=num_agents, **trainer_args)
            self._items[key] = obj
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        else:
            self._items.move_to_end(key)
        return obj


_cache = TrainerCache()


def run_fit(task: FitTask, cache: TrainerCache | None = None) -> FitResult:
    """Train one agent: build (or reuse) its trainer, restore its state, fit."""
    cache = cache or _cache
    t0 = time.perf_counter()
    trainer = cache.get(task.trainer, task.trainer_args, task.index, task.num_agents)
    if task.state is not None and hasattr(trainer, "set_state"):
        trainer.set_state(task.state)
    t1 = time.perf_counter()
    out = trainer.fit(task.weights, task.config)
    fit_seconds = time.perf_counter() - t1
    weights, num_samples, metrics = out[0], int(out[1]), dict(out[2])
    extra = out[3] if len(out) > 3 else None
    state = trainer.get_state() if hasattr(trainer, "get_state") else None
    return FitResult(
        task.index,
        dict(weights),
        num_samples,
        metrics,
        None if extra is None else dict(extra),
        state,
        time.perf_counter() - t0,
        fit_seconds,
    )


def initial_weights(trainer: str, trainer_args: Mapping[str, Any], num_agents: int) -> Weights:
    """The initial model: that of agent 0's trainer."""
    return dict(_cache.get(trainer, dict(trainer_args), 0, num_agents).initial_weights())


def warm_up(trainer: str) -> int:
    """Import the trainer's module in this worker (so the first round is not slower)."""
    load_callable(trainer)
    return os.getpid()
