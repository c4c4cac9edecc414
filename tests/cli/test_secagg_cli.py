"""`fedstack aggregator --secagg` with `fedstack agents`: three secure rounds, exit 0; a
strategy that needs individual updates is refused at start (exit 2, a clear error)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from fedstack.store import Store

TRAINER = "fedstack.trainers.digits:DigitsLinearTrainer"


def _env() -> dict[str, str]:
    src = str(Path(__file__).resolve().parents[2] / "src")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}


def test_aggregator_secagg_with_cli_agents_runs_three_rounds(tmp_path: Path) -> None:
    ready = tmp_path / "ready.json"
    agg = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fedstack",
            "-q",
            "aggregator",
            "--secagg",
            "--secagg-timeout",
            "20",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--db",
            str(tmp_path / "agg.db"),
            "--rounds",
            "3",
            "--min-agents",
            "3",
            "--finish-grace",
            "5",
            "--auth",
            "off",
            "--ready-file",
            str(ready),
        ],
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "agg.log", "wb"),  # noqa: SIM115
        env=_env(),
        start_new_session=True,
    )
    agents = None
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert agg.poll() is None, (tmp_path / "agg.log").read_text()[-2000:]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        port = int(json.loads(ready.read_text())["port"])
        agents = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fedstack",
                "-q",
                "agents",
                "--url",
                f"ws://127.0.0.1:{port}",
                "--count",
                "3",
                "--trainer",
                TRAINER,
                "--trainer-arg",
                "partition=iid",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(),
            start_new_session=True,
        )
        assert agg.wait(120) == 0, (tmp_path / "agg.log").read_text()[-3000:]
        out, err = agents.communicate(timeout=60)
        assert agents.returncode == 0, err[-3000:]
    finally:
        for p in (agg, agents):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait(10)
    store = Store.open_readonly(str(tmp_path / "agg.db"))
    try:
        run = store.latest_run_id()
        assert run is not None
        rounds = store.rounds(run)
        assert [r["round"] for r in rounds] == [1, 2, 3]
        assert all(r["metrics"]["secagg_agents"] == 3 for r in rounds)
        uploads = [
            m for m in store.models(run) if m["kind"] == "local" and m["status"] != "initial"
        ]
        assert len(uploads) == 9
        for m in uploads:  # the store holds masked inputs only
            assert list(store.load_weights(m["id"])) == ["secagg/masked"]
        assert len([e for e in store.events(run) if e["kind"] == "secagg_round"]) == 3
    finally:
        store.close()


def test_secagg_with_median_exits_2_with_a_clear_error(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedstack",
            "aggregator",
            "--secagg",
            "--strategy",
            "median",
            "--port",
            "0",
            "--db",
            str(tmp_path / "m.db"),
        ],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=60,
        check=False,
    )
    assert out.returncode == 2, out.stdout + out.stderr
    assert "--secagg cannot run with strategy 'median'" in out.stderr
    assert "fedavg" in out.stderr  # what to use instead
    assert not (tmp_path / "m.db").exists()  # refused before anything started
