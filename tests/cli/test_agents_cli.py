"""`fedstack agents`: N real agent processes forked from one warm parent."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from fedstack.store import Store

TRAINER = "fedstack.trainers.digits:DigitsLinearTrainer"


def _aggregator(
    tmp: Path, rounds: int, agents: int, *extra: str
) -> tuple[subprocess.Popen[bytes], int]:
    ready = tmp / "ready.json"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fedstack",
            "-q",
            "aggregator",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--db",
            str(tmp / "agg.db"),
            "--rounds",
            str(rounds),
            "--min-agents",
            str(agents),
            "--finish-grace",
            "5",
            "--ready-file",
            str(ready),
            *(extra or ("--auth", "off")),
        ],
        stdout=subprocess.DEVNULL,
        stderr=open(tmp / "agg.log", "wb"),
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert proc.poll() is None, (tmp / "agg.log").read_text()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return proc, int(json.loads(ready.read_text())["port"])


def _agents(port: int, count: int, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fedstack",
            "-q",
            "agents",
            "--url",
            f"ws://127.0.0.1:{port}",
            "--count",
            str(count),
            "--trainer",
            TRAINER,
            "--trainer-arg",
            "partition=iid",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def test_agents_run_a_whole_federation_as_separate_processes(tmp_path: Path) -> None:
    agg, port = _aggregator(tmp_path, rounds=4, agents=4)
    try:
        proc = _agents(port, 4, "--name-prefix", "site-")
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-3000:]
        finals = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        assert sorted(f["agent"] for f in finals) == ["site-0", "site-1", "site-2", "site-3"]
        assert all(f["final"] for f in finals)
        assert agg.wait(60) == 0
    finally:
        if agg.poll() is None:
            os.killpg(agg.pid, signal.SIGKILL)
    store = Store(str(tmp_path / "agg.db"))
    try:
        run = store.list_runs()[-1]["id"]
        rounds = store.rounds(run)
        addresses = {e["detail"].get("address") for e in store.events(run) if e["kind"] == "joined"}
    finally:
        store.close()
    assert [r["round"] for r in rounds] == [1, 2, 3, 4]
    assert all(r["num_updates"] == 4 for r in rounds)
    assert len(addresses) == 4  # four connections: four processes, four source ports


def test_sigterm_is_passed_on_and_every_agent_leaves(tmp_path: Path) -> None:
    agg, port = _aggregator(tmp_path, rounds=100_000, agents=3)
    try:
        proc = _agents(port, 3)
        store = Store(str(tmp_path / "agg.db"))
        try:
            deadline = time.monotonic() + 60
            while True:
                runs = store.list_runs()
                if runs and len(store.rounds(runs[-1]["id"])) >= 2:
                    break
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.1)
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, err[-3000:]
            deadline = time.monotonic() + 20
            while True:
                left = [e for e in store.events(runs[-1]["id"]) if e["kind"] == "left"]
                if len(left) == 3 or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            assert len(left) == 3
        finally:
            store.close()
    finally:
        os.killpg(agg.pid, signal.SIGKILL)
        agg.wait(10)


def test_bad_arguments(tmp_path: Path) -> None:
    bad = tmp_path / "tokens.json"
    bad.write_text("[1, 2]")
    for args in (["--count", "0"], ["--count", "2", "--tokens-file", str(bad)]):
        proc = subprocess.run(
            [sys.executable, "-m", "fedstack", "agents", "--trainer", TRAINER, *args],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 2 and "error" in proc.stderr


def test_agents_do_mutual_tls_with_cert_key_and_token(tmp_path: Path) -> None:
    from fedstack.security.tls import make_test_pki

    pki = make_test_pki(tmp_path / "pki", agents=["site"])
    cert, key = pki.clients["site"]
    db = str(tmp_path / "agg.db")
    tokens = {}
    for name in ("agent-0", "agent-1"):
        added = subprocess.run(
            [sys.executable, "-m", "fedstack", "credentials", "add", name, "--db", db, "--json"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert added.returncode == 0, added.stderr
        tokens[name] = json.loads(added.stdout)["token"]
    tokens_file = tmp_path / "tokens.json"
    tokens_file.write_text(json.dumps({"agent-0": tokens["agent-0"]}))
    agg, port = _aggregator(
        tmp_path,
        2,
        2,
        "--tls-cert",
        str(pki.server_cert),
        "--tls-key",
        str(pki.server_key),
        "--tls-client-ca",
        str(pki.ca),
        "--require-tls",
    )
    url = f"wss://127.0.0.1:{port}"
    try:
        # without a client certificate the aggregator refuses them: a clear failure
        proc = _agents(
            port,
            2,
            "--url",
            url,
            "--ca",
            str(pki.ca),
            "--tokens-file",
            str(tokens_file),
            "--token",
            tokens["agent-1"],
        )
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 1 and "certificate" in err, err[-3000:]
        # with --cert/--key (shared by every agent) and --token for the one not in the file
        proc = _agents(
            port,
            2,
            "--url",
            url,
            "--ca",
            str(pki.ca),
            "--cert",
            str(cert),
            "--key",
            str(key),
            "--tokens-file",
            str(tokens_file),
            "--token",
            tokens["agent-1"],
        )
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-3000:]
        finals = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        assert sorted(f["agent"] for f in finals) == ["agent-0", "agent-1"]
        assert agg.wait(60) == 0
    finally:
        if agg.poll() is None:
            os.killpg(agg.pid, signal.SIGKILL)
            agg.wait(10)
