"""`fedstack demo --aggregators 2 --json`: a horizontal federation on one host.

Two aggregator processes share one SQLite file; the demo's agents are spread over them.
The last line is the JSON result: the global model reaches 0.90 after 10 rounds, and each
aggregator's semi-global model is reported per round. The store shows the federation: two
members, one semi-global model per member and round, the global model made from them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROUNDS = 10


def fedstack(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedstack", *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str, Path]:
    work = tmp_path_factory.mktemp("demo2")
    proc = fedstack(
        "demo", "--aggregators", "2", "--rounds", str(ROUNDS), "--workdir", str(work), "--json"
    )
    logs = "".join(
        f"\n--- {p.name}\n{p.read_text(errors='replace')[-1500:]}"
        for p in sorted((work / "logs").glob("*.log"))
    )
    assert proc.returncode == 0, proc.stderr[-3000:] + logs
    lines = proc.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    return result, proc.stderr, work / "fedstack.db"


def test_json_line_reaches_accuracy(demo: tuple[dict[str, Any], str, Path]) -> None:
    result, _, db = demo
    assert result["final_accuracy"] >= 0.90
    rounds = result["rounds"]
    assert [r["round"] for r in rounds] == list(range(1, ROUNDS + 1))
    assert rounds[-1]["accuracy"] == result["final_accuracy"]
    assert all(0 <= r["accuracy"] <= 1 and r["seconds"] > 0 for r in rounds)
    assert all(r["agents"] == 4 for r in rounds)  # 2 per aggregator, all in every round
    assert Path(result["db"]) == db and db.exists()


def test_per_aggregator_figures(demo: tuple[dict[str, Any], str, Path]) -> None:
    result, _, _ = demo
    members = result["aggregators"]
    assert [m["name"] for m in members] == ["a1", "a2"]
    assert [len(m["agents"]) for m in members] == [2, 2]
    assert len({m["url"] for m in members}) == 2
    for r in result["rounds"]:
        assert sorted(r["aggregators"]) == ["a1", "a2"]
        assert all(0 <= a["accuracy"] <= 1 for a in r["aggregators"].values())
        assert all(a["in_global"] for a in r["aggregators"].values())
        assert sum(a["agents"] for a in r["aggregators"].values()) == r["agents"]
    last = result["rounds"][-1]["aggregators"]
    assert [m["final_accuracy"] for m in members] == [
        last["a1"]["accuracy"],
        last["a2"]["accuracy"],
    ]
    # each semi-global model is a trained model of its cluster (skewed data: it may be
    # worse than the synthesis, but far above chance)
    assert all(m["final_accuracy"] > 0.5 for m in members)


def test_store_holds_the_federation(demo: tuple[dict[str, Any], str, Path]) -> None:
    result, _, db = demo
    models = json.loads(fedstack("db", "models", "--db", str(db), "--json").stdout)
    semi = [m for m in models if m["kind"] == "semi-global"]
    assert len(semi) == 2 * ROUNDS
    assert sorted({m["round"] for m in semi}) == list(range(1, ROUNDS + 1))
    rounds = json.loads(fedstack("db", "rounds", "--db", str(db), "--json").stdout)
    assert [r["round"] for r in rounds] == list(range(1, ROUNDS + 1))
    tree = json.loads(fedstack("db", "lineage", "--db", str(db), "--json").stdout)
    assert tree["round"] == ROUNDS
    inputs = [p for p in tree["parents"] if p["relation"] == "input"]
    assert len(inputs) == 2 and all(p["kind"] == "semi-global" for p in inputs)
    assert sum(p["num_samples"] for p in inputs) == tree["num_samples"]


def test_human_output_names_both_aggregators(demo: tuple[dict[str, Any], str, Path]) -> None:
    _, stderr, _ = demo  # with --json the table and the summary go to stderr
    assert "2 aggregators" in stderr
    assert "a1 (2 agents" in stderr and "a2 (2 agents" in stderr
    assert "final global accuracy" in stderr


def test_fewer_agents_than_aggregators_is_refused(tmp_path: Path) -> None:
    proc = fedstack("demo", "--aggregators", "3", "--agents", "2", "--workdir", str(tmp_path))
    assert proc.returncode == 2
    assert "--aggregators" in proc.stderr and "Traceback" not in proc.stderr
