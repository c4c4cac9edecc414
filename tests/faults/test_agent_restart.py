"""SIGKILL agents mid-training and restart them under the same name.

The agents are subprocesses (``agent_det.py``); each kill lands at a seeded random moment
(usually while the agent "trains": it sleeps 0.15 s per round, or while its upload is in
flight). The restarted agent joins as the same agent (same name) and carries on.

``test_agent_restart_with_state_dir`` also passes ``--state-dir`` (``Agent(state_dir=...)``)
and asserts that no upload handed to ``send_trained_model`` is lost across a SIGKILL (the
pending upload is re-sent with the same id after the restart).
"""

from __future__ import annotations

import random
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
from faultlib import (
    N_AGENTS,
    Observer,
    agent_cmd,
    aggregator_config,
    check_run,
    finish_thread_aggregator,
    read_report,
    wait_for,
)

from fedstack import Store
from fedstack.testing import aggregator_thread

ROUNDS = 8
KILLS = 4
DELAY = 0.15


def _run(
    tmp: Path, reference: dict[str, np.ndarray], *, seed: int, state_dir: bool
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    rng = random.Random(seed)
    db = tmp / "fed.db"
    procs: dict[int, subprocess.Popen[bytes]] = {}
    incarnation = dict.fromkeys(range(N_AGENTS), 0)
    reports: list[Path] = []
    kills: list[dict[str, Any]] = []

    def launch(i: int) -> None:
        report = tmp / f"agent-{i}.{incarnation[i]}.json"
        reports.append(report)
        sd = tmp / f"state-{i}" if state_dir else None
        procs[i] = subprocess.Popen(
            agent_cmd(url, f"agent-{i}", i, report, delay=DELAY, state_dir=sd),
            stdout=subprocess.DEVNULL,
            stderr=open(tmp / f"agent-{i}.{incarnation[i]}.log", "wb"),
        )  # noqa: SIM115
        incarnation[i] += 1

    obs = Observer(db)
    with aggregator_thread(aggregator_config(db, ROUNDS)) as agg:
        url = f"ws://127.0.0.1:{agg.port}"
        try:
            for i in range(N_AGENTS):
                launch(i)
            assert wait_for(lambda: obs.progress()[0] >= 1, 60), "the federation did not start"
            for _ in range(KILLS):
                time.sleep(rng.uniform(0.1, 0.6))
                version, _ = obs.progress()
                if version >= ROUNDS - 1:
                    break
                i = rng.randrange(N_AGENTS)
                procs[i].send_signal(signal.SIGKILL)
                procs[i].wait(10)
                v, buffered = obs.progress()
                kills.append({"agent": i, "version": v, "buffered": buffered})
                launch(i)
            deadline = time.monotonic() + 90
            for p in procs.values():
                assert p.wait(max(1.0, deadline - time.monotonic())) == 0
            finish_thread_aggregator(agg)
        finally:
            obs.close()
            for p in procs.values():
                if p.poll() is None:
                    p.kill()
                    p.wait(10)
    reps = [read_report(r) for r in reports]
    check_run(db, ROUNDS, reps, reference)
    assert len(kills) >= 2, kills
    print(f"\nagent kills (state_dir={state_dir}):", kills)
    return reps, kills


def test_agent_sigkill_restart(tmp_path: Path, reference: dict[int, dict[str, np.ndarray]]) -> None:
    _run(tmp_path, reference[ROUNDS], seed=7, state_dir=False)


def test_agent_restart_with_state_dir(
    tmp_path: Path, reference: dict[int, dict[str, np.ndarray]]
) -> None:
    reps, _ = _run(tmp_path, reference[ROUNDS], seed=11, state_dir=True)
    store = Store(str(tmp_path / "fed.db"))
    try:
        run = store.latest_run_id()
        stored = {m["upload_id"] for m in store.models(run, "local") if m["upload_id"]}
        agents = {a["name"] for a in store.list_agents()}
    finally:
        store.close()
    lost = [u for rep in reps for u in rep.get("sent", []) if u not in stored]
    assert not lost, f"uploads handed to send_trained_model lost across a SIGKILL: {lost}"
    assert agents == {f"agent-{i}" for i in range(N_AGENTS)}  # restarted as the same agents
