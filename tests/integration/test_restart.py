"""SIGKILL the aggregator between rounds and during a round; it resumes the same run."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from fedstack import Store
from fedstack.testing import AggregatorProcess

HERE = Path(__file__).parent
ROUNDS = 8


def _rounds(db: Path) -> list[dict[str, Any]]:
    store = Store(str(db))
    try:
        run = store.latest_run_id()
        return store.rounds(run) if run else []
    finally:
        store.close()


def _buffered(db: Path) -> int:
    store = Store(str(db))
    try:
        run = store.latest_run_id()
        if run is None:
            return 0
        return sum(1 for m in store.models(run, "local") if m["status"] == "buffered")
    finally:
        store.close()


def _wait(cond, timeout: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


def test_sigkill_between_and_during_rounds_resumes_the_run(tmp_path: Path) -> None:
    db = tmp_path / "fed.db"
    agg = AggregatorProcess(
        tmp_path,
        "--db",
        str(db),
        "--rounds",
        str(ROUNDS),
        "--min-agents",
        "3",
        "--threshold",
        "1.0",
        "--heartbeat-interval",
        "1",
        "--finish-grace",
        "10",
        "--auth",
        "off",
    )
    agg.start()
    agents = []
    try:
        for i, delay in enumerate((0.05, 0.15, 0.3)):
            agents.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        str(HERE / "agent_proc.py"),
                        "--url",
                        agg.url,
                        "--name",
                        f"agent-{i}",
                        "--delay",
                        str(delay),
                        "--report",
                        str(tmp_path / f"agent-{i}.json"),
                    ],
                    stdout=subprocess.DEVNULL,
                )
            )
        # 1) between rounds: right after round 2 is committed
        _wait(lambda: len(_rounds(db)) >= 2)
        agg.kill(signal.SIGKILL)
        agg.start()
        # 2) during a round: some uploads acknowledged (stored), round not complete
        _wait(lambda: len(_rounds(db)) >= 4 and _buffered(db) >= 1)
        agg.kill(signal.SIGKILL)
        agg.start()
        codes = [a.wait(120) for a in agents]
        assert codes == [0, 0, 0]
        assert agg.wait(60) == 0
    finally:
        for a in agents:
            if a.poll() is None:
                a.kill()
        agg.close()
    rounds = _rounds(db)
    assert [r["round"] for r in rounds] == list(range(1, ROUNDS + 1))  # contiguous, no dups
    store = Store(str(db))
    run_id = store.latest_run_id()
    assert run_id is not None
    runs = store.list_runs()
    assert len(runs) == 1 and runs[0]["status"] == "finished"  # one run, continued
    stored = {m["upload_id"]: m for m in store.models(run_id, "local") if m["upload_id"]}
    for i in range(3):
        report = json.loads((tmp_path / f"agent-{i}.json").read_text())
        missing = [u for u in report["acked"] if u not in stored]
        assert not missing, f"acknowledged uploads missing from the store: {missing}"
        assert report["versions"][-1] == ROUNDS
        assert report["reconnects"] >= 2  # each agent reconnected by itself after each kill
        # "training" adds 1; every round's global model is the previous one plus 1
        np.testing.assert_array_equal(np.array(report["final"]["w"]), ROUNDS)
    final = store.load_weights(rounds[-1]["model_id"])
    np.testing.assert_array_equal(final["w"], np.full((4, 3), ROUNDS, np.float32))
    assert final["b"].dtype == np.float64
    # every aggregated upload was trained on the model of the round before it
    for m in store.models(run_id, "local"):
        if m["status"] == "aggregated":
            assert m["base_version"] == m["round"] - 1
    store.close()
    log = agg.log_text()
    assert log.count("aggregator listening") == 3
    resumed = [
        (int(v), int(n))
        for v, n in re.findall(r"resumed at version (\d+) with (\d+) buffered", log)
    ]
    assert len(resumed) == 2
    assert resumed[0][0] >= 2
    assert resumed[1][0] >= 4 and resumed[1][1] >= 1  # the kill landed mid-round
