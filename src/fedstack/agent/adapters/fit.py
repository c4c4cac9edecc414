"""The check every adapter makes before loading named arrays into a model."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from fedstack.errors import InvalidUpdate


def check_fit(
    shapes: Mapping[str, tuple[int, ...]], weights: Mapping[str, Any], strict: bool, model: str
) -> None:
    """Raise :class:`InvalidUpdate` listing every difference between the model's tensor
    ``shapes`` (by name) and ``weights``: missing and unexpected names (when ``strict``)
    and shape mismatches (always). ``model`` names the model in the message."""
    missing = sorted(set(shapes) - set(weights))
    unexpected = sorted(set(weights) - set(shapes))
    mismatched = [
        f"{name} (model {shapes[name]}, got {tuple(np.shape(weights[name]))})"
        for name in sorted(set(shapes) & set(weights))
        if tuple(np.shape(weights[name])) != shapes[name]
    ]
    problems: list[str] = []
    if strict and missing:
        problems.append(f"missing: {', '.join(missing)}")
    if strict and unexpected:
        problems.append(f"unexpected: {', '.join(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatch: {', '.join(mismatched)}")
    if problems:
        raise InvalidUpdate(f"weights do not fit {model}: " + "; ".join(problems))
