"""Shared configuration and conversions for the Flower side of the benchmarks.

Both sides run literally the same code: the partition, the MLP, the local training and the
central evaluation come from fedstack (installed editable into the Flower venv).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Context

DEFAULTS: dict[str, Any] = {
    "task": "digits",
    "num-rounds": 20,
    "num-agents": 10,
    "partition": "dirichlet:0.5",
    "seed": 0,
    "epochs": 1,
    "lr": 0.05,
    "batch-size": 32,
    "probe-params": 25_000_000,
    "probe-delta": 0.001,
    "out": "",
}


def run_config(context: Context) -> dict[str, Any]:
    """Defaults < ``FSBENCH_FLOWER_CONFIG`` (JSON; ``run_simulation`` has no run config)
    < the run config given to ``flwr run``."""
    cfg = dict(DEFAULTS)
    env = os.environ.get("FSBENCH_FLOWER_CONFIG")
    if env:
        cfg.update(json.loads(env))
    cfg.update({k: v for k, v in dict(context.run_config).items() if v != ""})
    return cfg


def to_record(weights: dict[str, np.ndarray[Any, Any]]) -> ArrayRecord:
    """fedstack weights (name -> array) to an ArrayRecord, keeping names and order."""
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in weights.items()})


def to_weights(record: ArrayRecord) -> dict[str, np.ndarray[Any, Any]]:
    """An ArrayRecord back to fedstack weights."""
    return {k: v.numpy() for k, v in record.items()}


def log_event(cfg: dict[str, Any], **fields: Any) -> None:
    """Append one JSON line with a wall-clock timestamp to the run's ``out`` file."""
    out = cfg.get("out")
    if not out:
        return
    with open(out, "a", encoding="utf-8") as f:
        f.write(json.dumps({"t": time.time(), **fields}) + "\n")
