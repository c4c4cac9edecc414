"""Book row 67: the aggregator's peak memory for FedAvg does not grow with the number of
agents.

Two federations with the same 8 MB model (2 M float32), one of K = 2 agents and one of
K = 20, each a real ``fedstack aggregator`` process with the load generator's protocol
agents (``python -m fedstack.testing.loadgen``, one other process), one round that needs
every agent. The aggregator receives uploads within its upload byte budget (16 MiB here:
two models) and FedAvg accumulates each one as it arrives (nothing of an upload is kept
after it is added), and sends the global model within its fan-out budget (16 MiB). Its
peak resident memory (VmHWM) must then be the same for K = 20 as for K = 2, within a
tolerance of 3 models (24 MB), where keeping the 18 extra uploads would add 144 MB.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedstack.testing import AggregatorProcess

PARAMS = 2_000_000
MODEL = PARAMS * 4
BUDGET = 2 * MODEL
TOLERANCE = 3 * MODEL

pytestmark = pytest.mark.slow


def _status(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {key} for {pid}")


def _peak_for(workdir: Path, agents: int) -> tuple[int, int]:
    """(resident bytes once started, peak resident bytes after the round) of an
    aggregator serving one round of ``agents`` agents."""
    workdir.mkdir()
    agg = AggregatorProcess(
        workdir,
        "--db", str(workdir / "agg.db"),
        "--auth", "off",
        "--min-agents", str(agents),
        "--threshold", "1.0",
        "--round-timeout", "60",
        "--keep-local-models", "metadata",
        "--upload-budget-bytes", str(BUDGET),
        "--fanout-budget-bytes", str(BUDGET),
    )  # fmt: skip
    agg.start()
    try:
        assert agg.proc is not None
        start = _status(agg.proc.pid, "VmRSS")
        report = workdir / "load.json"
        load = subprocess.run(
            [
                sys.executable, "-m", "fedstack.testing.loadgen", "--url", agg.url,
                "--agents", str(agents), "--rounds", "1", "--params", str(PARAMS),
                "--timeout", "60", "--json", str(report), "-q",
            ],
            timeout=90,
        )  # fmt: skip
        result = json.loads(report.read_text())
        assert load.returncode == 0, result["errors"]
        assert {r["version"]: r["agents"] for r in result["rounds"]}.get(1) == agents, result
        peak = _status(agg.proc.pid, "VmHWM")
    finally:
        agg.close()
    return start, peak


@pytest.mark.timeout(180)
def test_fedavg_peak_memory_does_not_grow_with_agents(tmp_path: Path) -> None:
    start2, peak2 = _peak_for(tmp_path / "k2", 2)
    start20, peak20 = _peak_for(tmp_path / "k20", 20)
    mib = 1 << 20
    print(
        f"aggregator peak RSS: K=2 {peak2 / mib:.0f} MiB (start {start2 / mib:.0f}), "
        f"K=20 {peak20 / mib:.0f} MiB (start {start20 / mib:.0f}); model {MODEL / mib:.1f} MiB"
    )
    assert peak20 - peak2 < TOLERANCE, (
        f"K=20 peaked {(peak20 - peak2) / mib:.0f} MiB above K=2 "
        f"(tolerance {TOLERANCE / mib:.0f} MiB)"
    )
