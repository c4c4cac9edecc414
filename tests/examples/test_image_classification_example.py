"""The chapter-6 example on digits: one agent against two, and the book's claim.

Book checklist row 27: the script produces the per-round table and the plot, and the
two-agent curve is at least the one-agent curve on average over the last 10 rounds
(with a tolerance for the round-to-round jitter). The run is the example's default
(the book's setting: every agent holds the whole training split and trains on a random
512 of its 1,437 images per round), 20 rounds, real aggregator and agent processes.
"""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TOLERANCE = 0.01
"""Two agents may trail one agent by this much (mean accuracy over the last 10 rounds);
measured over seeds 0-2 they lead by 0.019-0.023 (examples/image_classification/claim.py)."""


def curve(path: Path) -> dict[int, float]:
    rows = list(csv.DictReader(path.open()))
    per_round: dict[int, list[float]] = {}
    for r in rows:
        per_round.setdefault(int(r["round"]), []).append(float(r["global_accuracy"]))
    return {k: sum(v) / len(v) for k, v in sorted(per_round.items())}


def test_two_agents_reach_one_agent_on_digits(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples/image_classification/run.py"),
            "--compare",
            "--rounds",
            "20",
            "--work-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    curves = {}
    for n in (1, 2):
        out = tmp_path / f"{n}-agents"
        rows = list(csv.DictReader((out / "metrics.csv").open()))
        assert {r["agent"] for r in rows} == {f"a{i + 1}" for i in range(n)}
        # every agent records both accuracies for each of the 20 rounds and the final model
        for agent in {r["agent"] for r in rows}:
            assert sorted(int(r["round"]) for r in rows if r["agent"] == agent) == list(
                range(1, 22)
            )
        assert all(0 <= float(r["local_accuracy"]) <= 1 for r in rows)
        assert {int(r["num_samples"]) for r in rows} == {512}
        assert (out / "fedstack.db").exists()
        curves[n] = curve(out / "metrics.csv")
        assert curves[n][21] > 0.85 > curves[n][1]  # the CNN learns
    # the comparison table: one row per round, one column per configuration
    table = list(csv.DictReader((tmp_path / "accuracy.csv").open()))
    assert [int(r["round"]) for r in table] == list(range(1, 22))
    for r in table:
        for n in (1, 2):
            assert abs(float(r[f"{n}_agents"]) - curves[n][int(r["round"])]) < 1e-9
    png = tmp_path / "accuracy.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    last = [r for r in range(12, 22)]  # the last 10 rounds
    one = sum(curves[1][r] for r in last) / 10
    two = sum(curves[2][r] for r in last) / 10
    assert f"Two Agents: mean global accuracy over the last 10 rounds {two:.4f}" in proc.stdout
    assert two >= one - TOLERANCE, f"two agents {two:.4f} < one agent {one:.4f}"
