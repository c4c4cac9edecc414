"""SIGKILL the aggregator at random (seeded) moments and restart it, over many trials.

Each trial runs a whole federation (aggregator subprocess, three deterministic thread
agents) and kills the aggregator twice, at points chosen by a seeded RNG:

- ``between``: right after a round was committed, before any upload of the next round;
- ``mid-round``: with acknowledged uploads buffered for the round in progress;
- ``in-flight``: a random 0-60 ms after a round was committed, i.e. wherever the
  aggregator happens to be (receiving, acknowledging, aggregating or committing).

Every trial then asserts the invariants of :func:`faultlib.check_run` against the
fault-free reference run.
"""

from __future__ import annotations

import json
import random
import re
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from faultlib import (
    N_AGENTS,
    Observer,
    aggregator_args,
    check_run,
    join_all,
    start_thread_agent,
    wait_for,
)

from fedstack import Store
from fedstack.testing import AggregatorProcess

TRIALS = 12
KILLS_PER_TRIAL = 2
ROUNDS = 8
SEED = 20240611


def _run_finished(db: Path) -> bool:
    store = Store(str(db))
    try:
        return any(r["status"] == "finished" for r in store.list_runs())
    finally:
        store.close()


def _trial(tmp: Path, trial: int, reference: dict[str, np.ndarray]) -> list[dict[str, object]]:
    rng = random.Random(SEED + trial)
    db = tmp / "fed.db"
    agg = AggregatorProcess(tmp, *aggregator_args(db, ROUNDS))
    obs = Observer(db)
    kills: list[dict[str, object]] = []
    agg.start()
    agents = [
        start_thread_agent(agg.url, f"agent-{i}", i, delay=rng.uniform(0.01, 0.06))
        for i in range(N_AGENTS)
    ]
    try:
        # kill points: increasing round numbers, so each kill lands in a later round
        targets = sorted(rng.sample(range(1, ROUNDS - 1), KILLS_PER_TRIAL))
        for k in targets:
            kind = rng.choice(["between", "mid-round", "in-flight"])

            def kill_point(k: int = k, kind: str = kind) -> bool:
                version, buffered = obs.progress()
                if kind == "between":
                    return version >= k and buffered == 0
                if kind == "mid-round":
                    return version >= k and buffered >= 1
                return version >= k

            reached = wait_for(kill_point, 30, 0.002)
            if kind == "in-flight":
                time.sleep(rng.uniform(0.0, 0.06))
            assert agg.proc is not None
            if not reached or agg.proc.poll() is not None:
                kills.append({"trial": trial, "kind": kind, "landed": "missed (run over)"})
                continue
            agg.kill(signal.SIGKILL)
            version, buffered = obs.progress()
            kills.append({"trial": trial, "kind": kind, "version": version, "buffered": buffered})
            if _run_finished(db):  # the kill came after the run was marked finished
                kills[-1]["landed"] = "after finish"
                break
            agg.start()
        join_all(agents, 60)
        assert agg.wait(30) == 0
    finally:
        obs.close()
        agg.close()
    summary = check_run(db, ROUNDS, [a.report for a in agents], reference)
    log = agg.log_text()
    resumed = re.findall(r"resumed at version (\d+) with (\d+) buffered", log)
    done = [kill for kill in kills if "version" in kill]
    assert len(resumed) == len([kill for kill in done if kill.get("landed") != "after finish"])
    for kill, (v, n) in zip(done, resumed, strict=False):
        kill["resumed_version"], kill["resumed_buffered"] = int(v), int(n)
        assert int(v) == kill["version"], (kill, v)  # resumed exactly where the store was
    assert "Traceback" not in log, log[-3000:]
    for kill in done:
        kill["acked"] = summary["acked"]
    return kills


def test_aggregator_sigkill_trials(
    tmp_path: Path, reference: dict[int, dict[str, np.ndarray]]
) -> None:
    started = time.monotonic()
    kills: list[dict[str, object]] = []
    for trial in range(TRIALS):
        d = tmp_path / f"trial-{trial}"
        d.mkdir()
        kills += _trial(d, trial, reference[ROUNDS])
    landed = [k for k in kills if "version" in k]
    mid = [k for k in landed if int(k["buffered"]) > 0]  # type: ignore[call-overload]
    between = [k for k in landed if int(k["buffered"]) == 0]  # type: ignore[call-overload]
    summary = {
        "trials": TRIALS,
        "kills": len(landed),
        "mid_round_with_buffered": len(mid),
        "between_rounds": len(between),
        "by_kind": {
            kind: sum(1 for k in landed if k["kind"] == kind)
            for kind in ("between", "mid-round", "in-flight")
        },
        "seconds": round(time.monotonic() - started, 1),
        "detail": kills,
    }
    print("\nSIGKILL trials:", json.dumps({k: v for k, v in summary.items() if k != "detail"}))
    for k in kills:
        print("  ", k)
    (tmp_path / "kills.json").write_text(json.dumps(summary, indent=1))
    assert len(landed) >= 10, summary
    assert mid and between, "kills must land both mid-round and between rounds"


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__, "-q", "-s"])
