"""``bench/secagg_cost.py``'s fedstack runs measure what they claim: secure aggregation on,
the configured agents dropping after the key sharing in every round, and the result the
weighted FedAvg of the survivors within the stated bound (tiny sizes: a few seconds)."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

pytest.importorskip("cryptography")
pytest.importorskip("Crypto.Protocol.SecretSharing")

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _bench() -> ModuleType:
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("secagg_cost", BENCH / "secagg_cost.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_graph_settings_match_the_library_and_fit_flower() -> None:
    from fedstack.privacy.secagg import SecAggParams

    bench = _bench()
    p = SecAggParams()
    for n in (10, 50, 100):
        g = bench.graph_settings(n)
        assert g["num_shares"] == p.degree(n) + 1
        assert g["threshold"] == p.holders_threshold(n)
        # Flower's SecAggPlusWorkflow: an int num_shares > 2, threshold < num_shares
        assert g["num_shares"] > 2 and 1 < g["threshold"] < g["num_shares"]
    assert bench.dropped_count(100, 0.1) == 10 and bench.dropped_count(10, 0.0) == 0


def test_engine_run_drops_agents_every_round_and_is_exact(tmp_path: Path) -> None:
    bench = _bench()
    out = bench.worker_secagg_engine(6, 2000, 1, 3, str(tmp_path / "e.db"))
    assert len(out["round_ends"]) == 3
    # the aggregator ran secure aggregation in every round, 5 survivors and 1 dropped
    assert [m.get("secagg_agents") for m in out["round_metrics"]] == [5, 5, 5]
    assert [m.get("secagg_dropped") for m in out["round_metrics"]] == [1, 1, 1]
    assert out["drops"] == 3
    assert 0.0 < out["max_abs_error"] <= out["error_bound"]


def test_library_run_is_exact_with_drops() -> None:
    import numpy as np

    bench = _bench()
    secagg_task = importlib.import_module("secagg_task")
    out = bench.worker_secagg_library(6, 2000, 1, 2)
    assert len(out["round_ends"]) == len(out["phase_seconds"]) == 2
    assert 0.0 < out["max_abs_error"] <= out["error_bound"]
    # the check discriminates: had the dropped agent's update been summed, the model
    # would be off by far more than the bound
    with_all = secagg_task.expected_mean_update(list(range(6)), 2000)
    survivors = secagg_task.expected_mean_update(list(range(5)), 2000)
    assert float(np.abs(2 * (with_all - survivors)).max()) > 10 * out["error_bound"]
