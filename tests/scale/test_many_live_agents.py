"""1,000 live agents on one aggregator process (issue 5, "Many live agents").

A real ``fedstack aggregator`` subprocess and the load generator (:mod:`fedstack.testing.loadgen`:
1,000 agents speaking the real protocol over 1,000 WebSocket connections, in ONE other
process) run 3 rounds of a small model; every round needs all 1,000 agents
(``--min-agents 1000``), so the aggregator must hold 1,000 concurrent connections.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedstack.store import Store
from fedstack.testing import AggregatorProcess

AGENTS = 1000
ROUNDS = 3

pytestmark = [pytest.mark.slow, pytest.mark.serial]  # rates and stalls: run alone


@pytest.mark.timeout(240)
def test_1000_live_agents_complete_rounds(tmp_path: Path) -> None:
    db = tmp_path / "agg.db"
    agg = AggregatorProcess(
        tmp_path,
        "--db",
        str(db),
        "--auth",
        "off",
        "--min-agents",
        str(AGENTS),
        "--threshold",
        "1.0",
        "--rounds",
        str(ROUNDS),
        "--round-timeout",
        "150",
        "--finish-grace",
        "2",
        "--heartbeat-interval",
        "5",
    )
    agg.start()
    out = tmp_path / "loadgen.json"
    t0 = time.monotonic()
    try:
        lg = subprocess.run(
            [
                sys.executable,
                "-m",
                "fedstack.testing.loadgen",
                "--url",
                agg.url,
                "--agents",
                str(AGENTS),
                "--rounds",
                str(ROUNDS),
                "--params",
                "300",
                "--timeout",
                "150",
                "--json",
                str(out),
                "-q",
            ],
            capture_output=True,
            text=True,
            timeout=200,
        )
        elapsed = time.monotonic() - t0
        assert out.exists(), lg.stderr[-3000:]
        report = json.loads(out.read_text())
        assert lg.returncode == 0, (report["errors"], agg.log_text()[-3000:])
        assert agg.wait(30) == 0
    finally:
        agg.close()
    print(
        f"\n1,000 live agents: {elapsed:.1f} s, join {report['join_seconds']:.1f} s, "
        f"rounds {[r.get('round_seconds') for r in report['rounds']]}"
    )

    assert report["connected_peak"] == AGENTS
    assert report["welcomed"] == AGENTS
    assert report["error_count"] == 0
    assert report["acks"] == AGENTS * ROUNDS
    assert report["ack_statuses"] == {"accepted": AGENTS * ROUNDS}

    store = Store(str(db))
    try:
        run_id = store.latest_run_id()
        assert run_id is not None
        rounds = store.rounds(run_id)
        assert [r["round"] for r in rounds] == list(range(1, ROUNDS + 1))  # contiguous
        # every round was made from all 1,000 agents: they were all connected at once
        assert [r["num_updates"] for r in rounds] == [AGENTS] * ROUNDS
        for r in rounds:
            inputs = [p for p in store.parents(r["model_id"]) if p["relation"] == "input"]
            assert len({p["producer"] for p in inputs}) == AGENTS
        joined = [e for e in store.events(run_id) if e["kind"] == "joined"]
        assert len({e["agent_id"] for e in joined}) == AGENTS
        stored = {m["upload_id"] for m in store.models(run_id, kind="local")}
        assert set(report["acked_upload_ids"]) <= stored  # every acked upload is stored
        assert len(report["acked_upload_ids"]) == AGENTS * ROUNDS
    finally:
        store.close()
