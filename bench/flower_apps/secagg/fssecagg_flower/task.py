"""Configuration of the Flower side of ``bench/secagg_cost.py``.

``run_simulation`` takes no run config, so the benchmark passes the run's settings as
JSON in ``FSSECAGG_FLOWER_CONFIG``. The synthetic task itself (every node's fixed update
and sample count) is ``bench/secagg_task.py``, the very module fedstack's agents use.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

DEFAULTS: dict[str, Any] = {
    "secagg": True,  # False: Flower's plain FedAvg (DefaultWorkflow, no mods) as a baseline
    "num-agents": 10,
    "num-rounds": 3,
    "params": 100_000,
    "seed": 0,
    "dropped": 0,  # the nodes with partition-id >= num-agents - dropped drop out
    "drop-stage": "collect_masked_vectors",  # the SecAgg+ stage in which they fail
    "num-shares": 10,  # Flower's num_shares: fedstack's k + 1 holders
    "threshold": 6,  # Flower's reconstruction_threshold: fedstack's t
    "clipping-range": 8.0,
    "quantization-range": 2**22,
    "modulus-range": 2**32,
    "max-weight": 1000.0,
    "timeout": None,
    "out": "",  # JSON-lines file of timestamped events (absolute path)
    "final": "",  # .npy file for the final global model (absolute path)
}


def config() -> dict[str, Any]:
    """The defaults updated with ``FSSECAGG_FLOWER_CONFIG``."""
    cfg = dict(DEFAULTS)
    env = os.environ.get("FSSECAGG_FLOWER_CONFIG")
    if env:
        cfg.update(json.loads(env))
    return cfg


def dropping(cfg: dict[str, Any]) -> range:
    """The partition ids of the nodes that drop out of every round."""
    n = int(cfg["num-agents"])
    return range(n - int(cfg["dropped"]), n)


def log_event(cfg: dict[str, Any], **fields: Any) -> None:
    """Append one JSON line with a wall-clock timestamp to the run's ``out`` file."""
    out = cfg.get("out")
    if not out:
        return
    with open(out, "a", encoding="utf-8") as f:
        f.write(json.dumps({"t": time.time(), **fields}) + "\n")
