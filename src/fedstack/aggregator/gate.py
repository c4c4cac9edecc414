"""Update checks before aggregation: refuse or down-weight suspicious updates.

Two checks, each optional:

- **norm bound**: ``||w_k - w_global||_2`` above ``norm_bound`` is refused
  (``action="reject"``) or the update is scaled back onto the bound (``action="clip"``).
- **deviation from baseline outputs** (the book's chapter 3): the operator provides probe
  inputs (a ``.npy`` file) and a ``forward(weights, inputs) -> outputs`` function; an update
  whose outputs on the probe set deviate from the current global model's outputs by more
  than ``max_deviation`` (mean absolute difference) is refused.

Every decision carries a reason; the aggregator stores refused updates with it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedstack.errors import ConfigError
from fedstack.types import Array, Metrics, Weights

Forward = Callable[[Weights, Array], Array]


@dataclass(frozen=True, slots=True)
class GateDecision:
    accepted: bool
    weights: Weights  # the weights to aggregate (clipped if the gate clipped them)
    reason: str = ""
    metrics: Metrics = field(default_factory=dict)


def update_norm(weights: Weights, base: Weights) -> float:
    total = 0.0
    for k, ref in base.items():
        d = np.subtract(weights[k], ref, dtype=np.float64)
        total += float(np.dot(d.ravel(), d.ravel()))
    return math.sqrt(total)


class UpdateGate:
    """Checks one update against the current global model."""

    def __init__(
        self,
        *,
        norm_bound: float | None = None,
        action: str = "reject",
        probe_inputs: Array | None = None,
        forward: Forward | None = None,
        max_deviation: float | None = None,
    ) -> None:
        if action not in ("reject", "clip"):
            raise ConfigError(f"gate action {action!r} must be 'reject' or 'clip'")
        if norm_bound is not None and not norm_bound > 0:
            raise ConfigError("gate norm_bound must be positive")
        if max_deviation is not None and (probe_inputs is None or forward is None):
            raise ConfigError("gate max_deviation needs probe_inputs and forward")
        self.norm_bound = norm_bound
        self.action = action
        self.probe_inputs = probe_inputs
        self.forward = forward
        self.max_deviation = max_deviation

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> UpdateGate | None:
        """Build from the aggregator config's ``gate`` table (None if it is empty)."""
        if not cfg:
            return None
        known = {"norm_bound", "action", "probe_inputs", "forward", "max_deviation"}
        unknown = set(cfg) - known
        if unknown:
            raise ConfigError(f"gate: unknown key(s) {sorted(unknown)}; known: {sorted(known)}")
        inputs = None
        forward = None
        if cfg.get("probe_inputs"):
            path = Path(str(cfg["probe_inputs"]))
            try:
                inputs = np.load(path, allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise ConfigError(f"gate probe_inputs {path}: {exc}") from exc
        if cfg.get("forward"):
            from fedstack.plugins import load_callable

            forward = load_callable(str(cfg["forward"]))
        bound = cfg.get("norm_bound")
        dev = cfg.get("max_deviation")
        return cls(
            norm_bound=None if bound is None else float(bound),
            action=str(cfg.get("action", "reject")),
            probe_inputs=inputs,
            forward=forward,
            max_deviation=None if dev is None else float(dev),
        )

    def check(
        self, weights: Weights, global_weights: Weights, baseline: Array | None = None
    ) -> GateDecision:
        """Decide on ``weights``. ``baseline``: the global model's probe outputs, if known."""
        metrics: Metrics = {}
        if self.norm_bound is not None:
            norm = update_norm(weights, global_weights)
            metrics["update_norm"] = norm
            if norm > self.norm_bound:
                if self.action == "reject":
                    return GateDecision(
                        False,
                        weights,
                        f"update norm {norm:.4g} exceeds the bound {self.norm_bound:.4g}",
                        metrics,
                    )
                scale = self.norm_bound / norm
                weights = {
                    k: np.add(
                        ref,
                        scale * np.subtract(weights[k], ref, dtype=np.float64),
                        dtype=np.float64,
                    ).astype(ref.dtype)
                    for k, ref in global_weights.items()
                }
                metrics["clip_scale"] = scale
        if self.max_deviation is not None:
            assert self.forward is not None and self.probe_inputs is not None
            if baseline is None:
                baseline = self.baseline(global_weights)
            out = np.asarray(self.forward(weights, self.probe_inputs), dtype=np.float64)
            dev = float(np.mean(np.abs(np.subtract(out, baseline, dtype=np.float64))))
            metrics["probe_deviation"] = dev
            if not math.isfinite(dev) or dev > self.max_deviation:
                return GateDecision(
                    False,
                    weights,
                    f"outputs on the probe set deviate by {dev:.4g} from the global model's "
                    f"(limit {self.max_deviation:.4g})",
                    metrics,
                )
        return GateDecision(True, weights, "", metrics)

    def baseline(self, global_weights: Weights) -> Array:
        """The global model's outputs on the probe set (cache them per version)."""
        assert self.forward is not None and self.probe_inputs is not None
        return np.asarray(self.forward(global_weights, self.probe_inputs), dtype=np.float64)
