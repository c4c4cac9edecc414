"""The chapter-8 experiment (book_spec §14 row 55) at a reduced size: IID FedAvg is close
to centralised training and Dirichlet label skew degrades FedAvg on digits.

Runs ``experiments/ch8_noniid_digits.py`` as a user would (10 agents on the real
aggregator and agent code through the in-process simulator, 15 rounds, one seed, IID and
Dirichlet(0.1)) and checks its figures against tolerances; the full-size run and its
figures are in experiments/README.md."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

SCRIPT = Path(__file__).resolve().parents[2] / "experiments" / "ch8_noniid_digits.py"
ROUNDS = 15
AGENTS = 10
TOLERANCE = 0.03  # |IID FedAvg - centralised|
MIN_DROP = 0.02  # IID FedAvg - Dirichlet(0.1) FedAvg


def test_iid_fedavg_close_to_centralised_and_dirichlet_skew_degrades(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--agents",
            str(AGENTS),
            "--rounds",
            str(ROUNDS),
            "--seeds",
            "0",
            "--partitions",
            "iid",
            "dirichlet:0.1",
            "--last",
            "3",
            "--tolerance",
            str(TOLERANCE),
            "--min-drop",
            str(MIN_DROP),
            "--workers",
            "1",
            "--no-plot",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "ACCEPTANCE PASS" in proc.stdout
    result = json.loads((tmp_path / "ch8_results.json").read_text())

    # every run went the whole way: one global model per round, evaluated
    for label in ("centralised", "iid", "dirichlet:0.1"):
        curve = result["curves"][label]["0"]
        assert len(curve) == ROUNDS and all(0.0 <= a <= 1.0 for a in curve)
    # the federations really were split: 10 agents, IID shares balanced, Dirichlet skewed
    skew = result["skew"]
    assert len(skew["iid"]["histograms"]) == AGENTS == len(skew["dirichlet:0.1"]["histograms"])
    assert skew["iid"]["top_class_share"] < 0.2 < 0.4 < skew["dirichlet:0.1"]["top_class_share"]

    central = result["final"]["centralised"][0]
    iid = result["final"]["iid"][0]
    skewed = result["final"]["dirichlet:0.1"][0]
    assert central > 0.93  # the model itself learns digits
    assert abs(iid - central) <= TOLERANCE, (iid, central)
    assert iid - skewed >= MIN_DROP, (iid, skewed)
    # the degradation shows over the whole run, not only at its end
    mean_iid = float(np.mean(result["curves"]["iid"]["0"]))
    mean_skewed = float(np.mean(result["curves"]["dirichlet:0.1"]["0"]))
    assert mean_iid - mean_skewed >= MIN_DROP
    assert result["checks"]["acceptance"] is True
