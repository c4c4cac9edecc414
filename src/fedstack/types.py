"""Vocabulary types shared by every part of fedstack."""

from __future__ import annotations

from typing import Any, TypeAlias

import numpy.typing as npt

Array: TypeAlias = npt.NDArray[Any]
Weights: TypeAlias = dict[str, Array]
"""A model as named arrays: the only form in which models cross component boundaries."""

MetricValue: TypeAlias = float | int | str | bool
Metrics: TypeAlias = dict[str, MetricValue]
"""Free-form metrics an agent or aggregator attaches to a model (accuracy, loss, ...)."""
