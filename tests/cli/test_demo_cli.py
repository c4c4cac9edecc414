"""The README's first command: `fedstack demo` runs a whole federation; `fedstack db` reads it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest


def fedstack(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedstack", *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    work = tmp_path_factory.mktemp("demo")
    proc = fedstack(
        "demo",
        "--agents",
        "3",
        "--rounds",
        "10",
        "--partition",
        "dirichlet:0.5",
        "--workdir",
        str(work),
        "--json",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return result, work / "fedstack.db"


def test_demo_reaches_accuracy(demo: tuple[dict[str, Any], Path]) -> None:
    result, db = demo
    assert result["final_accuracy"] >= 0.90
    assert [r["round"] for r in result["rounds"]] == list(range(1, 11))
    assert all(r["agents"] == 3 and r["seconds"] > 0 for r in result["rounds"])
    assert all(0 <= r["accuracy"] <= 1 for r in result["rounds"])
    assert result["rounds"][-1]["accuracy"] == result["final_accuracy"]
    assert Path(result["db"]) == db and db.exists()


def test_db_commands(demo: tuple[dict[str, Any], Path]) -> None:
    result, db = demo
    rounds = json.loads(fedstack("db", "rounds", "--db", str(db), "--json").stdout)
    assert [r["round"] for r in rounds] == list(range(1, 11))
    accs = [r["metrics"]["eval_accuracy"] for r in rounds]
    assert accs == [r["accuracy"] for r in result["rounds"]]

    models = json.loads(fedstack("db", "models", "--db", str(db), "--json").stdout)
    local = [m for m in models if m["kind"] == "local"]
    cluster = [m for m in models if m["kind"] == "cluster"]
    assert len(cluster) == 11  # initial global model + one per round
    assert len(local) == 1 + 3 * 10  # the initial model + every upload
    assert {m["agent"] for m in local} == {"agent-1", "agent-2", "agent-3"}

    tree = json.loads(fedstack("db", "lineage", "--db", str(db), "--json").stdout)
    assert tree["kind"] == "cluster" and tree["round"] == 10
    inputs = [p for p in tree["parents"] if p["relation"] == "input"]
    bases = [p for p in tree["parents"] if p["relation"] == "base"]
    assert sorted(p["agent"] for p in inputs) == ["agent-1", "agent-2", "agent-3"]
    assert all(p["round"] == 10 for p in inputs)
    assert [b["round"] for b in bases] == [9]
    assert sum(p["num_samples"] for p in inputs) == tree["num_samples"]

    metrics = json.loads(fedstack("db", "metrics", "--db", str(db), "--json").stdout)
    assert len(metrics["rounds"]) == 10 and len(metrics["agents"]) == 30
    assert all("local_accuracy" in a and "train_loss" in a for a in metrics["agents"])

    text = fedstack("db", "rounds", "--db", str(db)).stdout
    assert text.splitlines()[0].split()[:2] == ["round", "num_updates"]


def test_demo_rejects_bad_partition(tmp_path: Path) -> None:
    proc = fedstack("demo", "--partition", "dirichlet:abc", "--workdir", str(tmp_path))
    assert proc.returncode == 2
    assert "dirichlet" in proc.stderr and "Traceback" not in proc.stderr


def test_db_on_missing_run_is_a_clear_error(tmp_path: Path) -> None:
    # a store without runs (the views no longer create one at a missing path)
    assert fedstack("db", "upgrade", "--db", str(tmp_path / "empty.db")).returncode == 0
    proc = fedstack("db", "rounds", "--db", str(tmp_path / "empty.db"))
    assert proc.returncode == 2 and "no run" in proc.stderr
