"""``fedstack dashboard --db``: a standalone server over a store, read-only, whose live
view follows rounds another process commits."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import insert

from fedstack.store import Store
from fedstack.store import schema as s


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.serial  # a round within a second of its commit: run alone
def test_dashboard_command_serves_a_store_read_only_and_follows_new_rounds(
    tmp_path: Path, make_store: Any
) -> None:
    f = make_store(tmp_path / "f.db", runs=2, rounds=3, agents=2, running=True)
    ready = tmp_path / "ready.json"
    before = _digest(f.db)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fedstack",
            "dashboard",
            "--db",
            str(f.db),
            "--port",
            "0",
            "--ready-file",
            str(ready),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while not ready.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no ready file"
            time.sleep(0.05)
        info = json.loads(ready.read_text())
        base = f"http://127.0.0.1:{info['port']}"
        assert info["url"] == base
        rid = f.run_ids[-1]
        with httpx.Client(base_url=base, timeout=10) as c:
            r = c.get("/")
            assert r.status_code == 200 and r.text.count("data-run-id=") == 2
            assert 'id="read-only"' in r.text
            for path in (f"/runs/{rid}", f"/runs/{rid}/agents", "/audit", "/login"):
                assert c.get(path).status_code == 200, path
            assert c.post("/login", data={"token": "x", "csrf": "y"}).status_code == 403
            assert _digest(f.db) == before  # nothing written

            # another process commits round 4: the live view shows it within a second
            with c.stream("GET", f"/runs/{rid}/events") as stream:
                assert stream.status_code == 200
                lines = stream.iter_lines()
                assert next(lines).startswith("retry:")
                st = Store(str(f.db))
                try:
                    with st.engine.begin() as conn:
                        conn.execute(
                            insert(s.models).values(
                                id="m4",
                                run_id=rid,
                                kind="cluster",
                                producer="agg",
                                round=4,
                                base_version=3,
                                num_samples=20,
                                metrics={},
                                blob="",
                                nbytes=0,
                                created=time.time(),
                                status="global",
                            )
                        )
                        conn.execute(
                            insert(s.rounds).values(
                                run_id=rid,
                                round=4,
                                started=time.time(),
                                finished=time.time(),
                                seconds=0.1,
                                model_id="m4",
                                num_updates=2,
                                num_samples=20,
                                metrics={"eval_accuracy": 0.9},
                            )
                        )
                    committed = time.time()
                finally:
                    st.close()
                event = data = None
                for line in lines:
                    if line.startswith("event: "):
                        event = line[7:]
                    elif line.startswith("data: ") and event == "round":
                        data = json.loads(line[6:])
                        break
                assert time.time() - committed < 1.0
                assert data is not None and data["round"] == 4 and data["accuracy"] == 0.9
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err
    assert f"fedstack dashboard (read-only) on {base}/" in out
    assert not os.path.exists(str(f.db) + "-journal")
