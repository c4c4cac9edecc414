"""The chapter-6 image-classification example runs end to end and records its metrics."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_compare_one_and_two_agents(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples/image_classification/run.py"),
            "--compare",
            "--rounds",
            "3",
            "--work-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    for n in (1, 2):
        rows = list(csv.DictReader((tmp_path / f"{n}-agents" / "metrics.csv").open()))
        agents = {r["agent"] for r in rows}
        assert len(agents) == n
        rounds = sorted({int(r["round"]) for r in rows})
        assert rounds[:3] == [1, 2, 3]
        # local and global accuracy recorded per round and agent; training helps
        accs = [float(r["global_accuracy"]) for r in rows if r["agent"] == min(agents)]
        assert accs[-1] > accs[0] and accs[-1] > 0.5
        assert all(0 <= float(r["local_accuracy"]) <= 1 for r in rows if r["local_accuracy"])
        assert (tmp_path / f"{n}-agents" / "fedstack.db").exists()
    png = tmp_path / "accuracy.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
