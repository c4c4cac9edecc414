"""Synthesis of semi-global models into a global model: pure and deterministic.

The members of a federation each aggregate their own cluster into a *semi-global* model;
the global model is their sample-weighted mean (book A3-34). Any member may compute it, so
every host must get the SAME bits from the same inputs: the inputs are put in one order
(by member name, then model id), every product ``n_i / N * w_i`` is accumulated in
float64 in that order, and each tensor is cast back to its dtype at the end (integers
rounded, booleans by majority: :func:`fedstack.strategies.base.cast_like`). Nothing here
depends on threads, BLAS or the platform's summation order: one ``numpy.add`` of two
float64 arrays at a time, elementwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedstack.errors import InvalidUpdate
from fedstack.strategies.base import cast_like
from fedstack.types import Weights

__all__ = ["SynthesisInput", "synthesize", "weights_of"]


@dataclass(frozen=True, slots=True)
class SynthesisInput:
    """One member's semi-global model as synthesis sees it.

    ``name`` is the member's name (the order key), ``model_id`` breaks ties (one member's
    several models in async synthesis never meet: at most one per member is used)."""

    name: str
    model_id: str
    num_samples: int
    weights: Weights


def weights_of(inputs: Sequence[SynthesisInput]) -> list[float]:
    """Each input's weight ``n_i / N`` in synthesis order (equal weights when every
    cluster reported 0 samples)."""
    ordered = _ordered(inputs)
    total = sum(max(0, i.num_samples) for i in ordered)
    if total <= 0:
        return [1.0 / len(ordered)] * len(ordered)
    return [max(0, i.num_samples) / total for i in ordered]


def synthesize(inputs: Sequence[SynthesisInput]) -> Weights:
    """The global model: ``sum_i n_i / N * w_i`` over ``inputs``, bit-identical for the
    same inputs on every host (see the module doc).

    Raises:
        ValueError: no inputs.
        InvalidUpdate: the inputs do not have the same tensor names and shapes.
    """
    if not inputs:
        raise ValueError("nothing to synthesise: no semi-global model")
    ordered = _ordered(inputs)
    shares = weights_of(ordered)
    first = ordered[0].weights
    for i in ordered[1:]:
        if set(i.weights) != set(first) or any(
            np.shape(i.weights[k]) != np.shape(first[k]) for k in first
        ):
            raise InvalidUpdate(
                f"semi-global model {i.model_id[:16]} of member {i.name!r} does not have "
                "the structure of the others"
            )
    out: Weights = {}
    for key in sorted(first):
        acc = np.zeros(np.shape(first[key]), dtype=np.float64)
        for share, i in zip(shares, ordered, strict=True):
            term = np.multiply(np.asarray(i.weights[key], dtype=np.float64), share)
            acc = np.add(acc, term)
        out[key] = cast_like(acc, np.asarray(first[key]))
    return {k: out[k] for k in first}  # the first input's tensor order


def _ordered(inputs: Sequence[SynthesisInput]) -> list[SynthesisInput]:
    return sorted(inputs, key=lambda i: (i.name, i.model_id))
