"""Book row 66: fan-out to 50 agents with one dead; the others get the model in time.

A real aggregator (in this process, :func:`fedstack.testing.aggregator_thread`) runs a
round that needs 50 uploads. One agent (``claims_hung_agent.py``, its own process) brings
the initial model, uploads, and then hangs (SIGSTOP) with a small receive buffer, so the
push of the 6 MB global model to it cannot complete: the kernel takes ~4 MB at most, the
rest waits in the aggregator. The 49 others are real protocol agents of the load
generator (``python -m fedstack.testing.loadgen``, another process).

The aggregator is given ``send_timeout`` = 30 s and no minimum transfer rate, so the hung
agent's push stays in flight for 30 s. The claim: all 49 live agents receive the global
model within T = 8 s of the round's end (measured to the load generator's exit, after
its agents said goodbye), while the push to the hung agent is still in
flight. A fan-out that serves agents one after another (or lets the hung send hold the
others) would make them wait the hung agent's 30 s.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedstack import AggregatorConfig
from fedstack.testing import aggregator_thread

AGENTS = 50
PARAMS = 1_500_000  # float32: 6 MB, more than the kernel's loopback buffers hold
SEND_TIMEOUT = 30.0
T = 8.0
HERE = Path(__file__).resolve().parent

pytestmark = pytest.mark.slow


def _proc_state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


@pytest.mark.timeout(120)
def test_live_agents_get_the_model_while_one_agent_hangs(tmp_path: Path) -> None:
    cfg = AggregatorConfig(
        auth="off",
        port=0,
        db=str(tmp_path / "agg.db"),
        min_agents=AGENTS,
        threshold=1.0,
        round_timeout=90,
        heartbeat_interval=60,
        send_timeout=SEND_TIMEOUT,
        min_transfer_rate=0,  # only send_timeout ends the hung agent's push
        keep_local_models="metadata",
        max_message_bytes=64 << 20,
    )
    hung: subprocess.Popen[bytes] | None = None
    load: subprocess.Popen[bytes] | None = None
    with aggregator_thread(cfg) as agg:
        url = f"ws://127.0.0.1:{agg.port}"
        ready = tmp_path / "hung.ready"
        try:
            hung = subprocess.Popen(
                [sys.executable, str(HERE / "claims_hung_agent.py"), url, str(PARAMS), str(ready)]
            )
            deadline = time.monotonic() + 60
            while not ready.exists():
                assert hung.poll() is None, "the hung agent exited before hanging"
                assert time.monotonic() < deadline, "the hung agent did not upload"
                time.sleep(0.05)
            report = tmp_path / "load.json"
            load = subprocess.Popen(
                [
                    sys.executable, "-m", "fedstack.testing.loadgen", "--url", url,
                    "--agents", str(AGENTS - 1), "--rounds", "1", "--params", str(PARAMS),
                    "--timeout", "90", "--json", str(report), "-q",
                ]
            )  # fmt: skip
            deadline = time.monotonic() + 100
            while agg.rounds_completed < 1:  # the round closes: the fan-out starts
                assert load.poll() is None, "the load generator ended before the round"
                assert time.monotonic() < deadline, "the round did not complete"
                time.sleep(0.01)
            published = time.monotonic()
            assert load.wait(100) == 0, report.read_text() if report.exists() else "no report"
            served = time.monotonic() - published  # every live agent got it, said bye, exited
            pushing = {s.name for s in agg.delivery._pushing}
            result = json.loads(report.read_text())
            assert _proc_state(hung.pid) == "T", "the hung agent was stopped throughout"
        finally:
            for p in (hung, load):
                if p is not None and p.poll() is None:
                    os.kill(p.pid, signal.SIGKILL)
                    p.wait(10)
    assert result["error_count"] == 0, result["errors"]
    rounds = {r["version"]: r for r in result["rounds"]}
    assert rounds[1]["agents"] == AGENTS - 1, rounds
    print(f"49 live agents served {served:.2f} s after the round closed (T = {T} s)")
    assert served < T, f"the live agents got the model {served:.1f} s after the round (T = {T})"
    # and it was not because the hung agent had been dropped or had taken the model
    assert pushing == {"hung"}, pushing
