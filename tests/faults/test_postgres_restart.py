"""PostgreSQL restarted (``pg_ctl restart``) and stopped for a few seconds mid-run.

A real aggregator process (``python -m fedstack aggregator --db postgresql+psycopg://...``,
every blob in the database) and three deterministic thread agents run on a throwaway
PostgreSQL server. The server is restarted once and later stopped for 3 s, each time with
a round in progress. Asserted: while the server is down the aggregator acknowledges
nothing it had not stored before the outage began; it recovers by itself (no restart of
the aggregator, no operator action); the run then completes exactly (rounds contiguous,
every acknowledged upload in the store, final model bit-identical to the fault-free run).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
from faultlib import N_AGENTS, aggregator_args, check_run, join_all, start_thread_agent, wait_for

from fedstack import Store
from fedstack.errors import StoreError
from fedstack.testing import AggregatorProcess
from fedstack.testing.postgres import PostgresServer, unavailable_reason

ROUNDS = 8
OUTAGE = 3.0


class Progress:
    """The run's committed version as seen from the database (the last value while the
    server is down)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.store: Store | None = None
        self.version = 0

    def __call__(self) -> int:
        try:
            if self.store is None:
                self.store = Store(self.url, migrate=False)
            run = self.store.latest_run_id()
            if run is not None:
                self.version = max(self.store.get_run(run).version, 0)
        except StoreError:
            pass
        return self.version

    def close(self) -> None:
        if self.store is not None:
            self.store.close()


def test_postgres_restart_and_outage_mid_run(
    tmp_path: Path, reference: dict[int, dict[str, np.ndarray]]
) -> None:
    if (reason := unavailable_reason()) is not None:
        pytest.skip(reason)
    with PostgresServer() as server:  # its own server: this test stops it
        url = server.create_database("fed")
        args = aggregator_args(tmp_path / "fed", ROUNDS)
        args[args.index("--db") + 1] = url  # no --blob-dir: every blob in PostgreSQL
        agg = AggregatorProcess(tmp_path, *args)
        progress = Progress(url)
        seen: dict[str, float] = {}  # upload id -> wall time its ack reached the agent
        outages: list[tuple[str, float, float, float]] = []  # kind, asked, down, up again
        stop = threading.Event()
        agg.start()
        agents = [start_thread_agent(agg.url, f"agent-{i}", i, delay=0.05) for i in range(N_AGENTS)]

        def monitor() -> None:
            while not stop.is_set():
                for a in agents:
                    for ack in list(a.agent.acknowledged):
                        seen.setdefault(ack.upload_id, time.time())
                time.sleep(0.002)

        mon = threading.Thread(target=monitor, daemon=True)
        mon.start()
        try:
            for at_version, kind in ((2, "restart"), (5, "stop")):
                assert wait_for(lambda v=at_version: progress() >= v, 40, 0.01), (
                    f"stuck at version {progress.version} before the {kind}; "
                    f"agent errors {[a.error for a in agents if a.error]}"
                )
                time.sleep(0.03)  # with uploads of the next round in flight
                t0 = time.time()
                if kind == "restart":
                    server.restart()
                    down = t0
                else:
                    server.stop()  # returns once the server is down (transactions aborted)
                    down = time.time()
                    time.sleep(OUTAGE)
                    server.start()
                outages.append((kind, t0, down, time.time()))
                assert agg.proc is not None and agg.proc.poll() is None, "aggregator died"
            join_all(agents, 90)
            assert agg.wait(60) == 0
        finally:
            stop.set()
            mon.join(5)
            progress.close()
            agg.close()
        summary = check_run(url, ROUNDS, [a.report for a in agents], reference[ROUNDS])
        created = _created(url)
    log = agg.log_text()
    assert "Traceback" not in log, log[-3000:]
    assert agg.starts == 1  # recovered by itself
    # no acknowledgement while the server was down but for uploads stored before (in
    # flight when it stopped); nothing acknowledged that is not stored
    assert all(u in created for u in seen), "an acknowledged upload is not in the store"
    _, _, down, up = outages[1]
    during = {u: (t, created[u]) for u, t in seen.items() if down < t <= up}
    assert all(c < down for _, c in during.values()), (down, up, during)
    assert "the store is unavailable" in log, "the outage never reached the aggregator"
    print(
        f"\noutages {[(k, round(b - a, 2)) for k, a, _, b in outages]}: {summary['acked']} acks, "
        f"{len(during)} acked during the stop, reconnects "
        f"{[a.report.get('reconnects') for a in agents]}"
    )


def _created(url: str) -> dict[str, float]:
    """upload id -> when the store wrote it (wall clock, this host)."""
    store = Store(url)
    try:
        run = store.latest_run_id()
        assert run is not None
        return {m["upload_id"]: m["created"] for m in store.models(run, "local") if m["upload_id"]}
    finally:
        store.close()
