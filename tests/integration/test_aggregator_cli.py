"""`fedstack aggregator` as a process: book-style config file, init from zeros, SIGTERM."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import numpy as np

from fedstack import Agent, Store
from fedstack.testing import AggregatorProcess


def test_book_config_zero_init_and_graceful_sigterm(tmp_path: Path) -> None:
    config = tmp_path / "config_aggregator.json"
    config.write_text(
        json.dumps(
            {
                "aggr_ip": "127.0.0.1",
                "reg_socket": 8765,
                "recv_socket": 4321,
                "round_interval": 5,
                "aggregation_threshold": 1.0,
                "polling": 1,
                "init_weights_flag": 0,
                "db_data_path": str(tmp_path / "book.db"),
            }
        )
    )
    agg = AggregatorProcess(tmp_path, "--config", str(config), "--auth", "off")
    agg.start()
    try:
        a = Agent(agg.url, name="a1")
        a.send_initial_model({"w": np.full((2, 2), 9, np.float32)})
        a.start()
        assert a.delivery == "poll"  # "polling": 1
        gm = a.wait_for_global_model(10)
        np.testing.assert_array_equal(gm["w"], 0)  # init_weights_flag 0: zeros, same shape
        assert gm["w"].dtype == np.float32
        a.send_trained_model({"w": np.ones((2, 2), np.float32)}, 3)
        np.testing.assert_array_equal(a.wait_for_global_model(10)["w"], 1)
        t0 = time.monotonic()
        agg.kill(signal.SIGTERM)  # graceful: says bye, closes the store, exits 0
        assert agg.proc is not None and agg.proc.returncode == 0
        assert time.monotonic() - t0 < 10
        a.close()
    finally:
        agg.close()
    store = Store(str(tmp_path / "book.db"))
    run = store.latest_run_id()
    assert run is not None
    models = store.models(run)
    initial = [m for m in models if m["status"] == "initial"]
    assert len(initial) == 1  # the first agent's model is kept, even if zeros start
    np.testing.assert_array_equal(store.load_weights(initial[0]["id"])["w"], 9)
    assert [r["round"] for r in store.rounds(run)] == [1]
    assert store.list_runs()[0]["status"] == "running"  # stopped, not finished: resumable
    store.close()
