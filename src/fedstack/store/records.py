"""Records the store hands out about local models, shared by the store's modules."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedstack.types import Metrics, Weights

__all__ = ["UploadRecord", "split_state", "upload_record"]


@dataclass(frozen=True, slots=True)
class UploadRecord:
    model_id: str
    agent_id: str
    upload_id: str
    round: int
    base_version: int
    num_samples: int
    status: str
    metrics: Metrics
    cluster: str | None = None  # the federation member holding it (None: standalone)


def split_state(state: Mapping[str, Any]) -> tuple[dict[str, Any], Weights]:
    """A strategy state -> (JSON scalars, numpy arrays)."""
    scalars: dict[str, Any] = {}
    arrays: Weights = {}
    for k, v in state.items():
        if isinstance(v, np.ndarray):
            arrays[k] = v
        elif isinstance(v, np.generic):
            scalars[k] = v.item()
        else:
            scalars[k] = v
    return scalars, arrays


def upload_record(row: Mapping[str, Any]) -> UploadRecord:
    """The :class:`UploadRecord` of a ``models`` row (a local model)."""
    return UploadRecord(
        model_id=row["id"],
        agent_id=row["producer"],
        upload_id=row["upload_id"] or "",
        round=int(row["round"]),
        base_version=int(row["base_version"] or 0),
        num_samples=int(row["num_samples"]),
        status=row["status"],
        metrics=dict(row["metrics"]),
        cluster=row.get("cluster"),
    )
