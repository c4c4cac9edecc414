"""The store becomes unavailable to the aggregator for a while, then comes back.

``FlakyStore`` fails every database transaction and blob write with ``StoreError`` while it
is "down" (what an unreachable database server or a read-only disk looks like to the
aggregator). Invariants: no upload is acknowledged unless it was stored first (acks seen
by the agents are timestamped by a monitor thread and compared with the store's own
timestamps), and the run recovers and completes, bit-identical to the reference.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from faultlib import (
    N_AGENTS,
    Observer,
    aggregator_config,
    check_run,
    finish_thread_aggregator,
    initial_model,
    join_all,
    start_thread_agent,
    wait_for,
)

from fedstack import Agent, Store
from fedstack.errors import StoreError
from fedstack.testing import aggregator_thread

ROUNDS = 8


class FlakyStore(Store):
    def __init__(self, db: str) -> None:
        super().__init__(db)
        self.down = False
        self.stored_at: dict[str, float] = {}
        self.refused: list[str] = []  # operations that failed because the store was down
        put = self.blobs.put

        def flaky_put(*a: Any, **kw: Any) -> Any:
            if self.down:
                self.refused.append("blob")
                raise StoreError("blob store unavailable (test outage)")
            return put(*a, **kw)

        self.blobs.put = flaky_put  # type: ignore[method-assign]

    def _begin(self) -> Any:
        if self.down:
            self.refused.append("db")
            raise StoreError("database unavailable (test outage)")
        return super()._begin()

    def add_upload(self, run_id: str, **kw: Any) -> Any:
        rec, new = super().add_upload(run_id, **kw)
        self.stored_at.setdefault(kw["upload_id"], time.monotonic())
        return rec, new

    def add_uploads(self, run_id: str, uploads: Any) -> Any:  # the aggregator's group commit
        out = super().add_uploads(run_id, uploads)
        for up in uploads:
            self.stored_at.setdefault(up["upload_id"], time.monotonic())
        return out


def test_store_outage_no_ack_while_down_then_recovers(
    tmp_path: Path, reference: dict[int, dict[str, np.ndarray]]
) -> None:
    db = tmp_path / "fed.db"
    store = FlakyStore(str(db))
    seen: dict[str, float] = {}
    outages: list[tuple[float, float]] = []
    stop = threading.Event()
    obs = Observer(db)
    try:
        with aggregator_thread(aggregator_config(db, ROUNDS), store=store) as agg:
            url = f"ws://127.0.0.1:{agg.port}"
            agents = [start_thread_agent(url, f"agent-{i}", i, delay=0.05) for i in range(N_AGENTS)]

            def monitor() -> None:  # when did each acknowledgement reach its agent?
                while not stop.is_set():
                    for a in agents:
                        for ack in list(a.agent.acknowledged):
                            seen.setdefault(ack.upload_id, time.monotonic())
                    time.sleep(0.002)

            mon = threading.Thread(target=monitor, daemon=True)
            mon.start()
            for at_version, seconds in ((2, 2.0), (5, 1.5)):

                def reached(v: int = at_version) -> bool:
                    return obs.progress()[0] >= v or any(a.error for a in agents)

                assert wait_for(reached, 20)
                assert not any(a.error for a in agents), (
                    f"stuck at version {obs.progress()[0]}; agent errors: "
                    f"{[(a.name, a.error) for a in agents]}; alive: "
                    f"{[a.thread.is_alive() for a in agents]}"
                )
                time.sleep(0.03)  # usually lands with uploads of the next round in flight
                t0 = time.monotonic()
                store.down = True
                time.sleep(seconds)
                store.down = False
                outages.append((t0, time.monotonic()))
            join_all(agents, 90)
            finish_thread_aggregator(agg)
            stop.set()
            mon.join(5)
    finally:
        stop.set()
        obs.close()
        store.close()
    summary = check_run(db, ROUNDS, [a.report for a in agents], reference[ROUNDS])
    late = {u: seen[u] - store.stored_at.get(u, float("inf")) for u in seen}
    assert all(u in store.stored_at for u in seen), "an upload was acknowledged, never stored"
    assert all(d >= 0 for d in late.values()), "an acknowledgement arrived before its store"
    during = [u for u in seen for (t0, t1) in outages if t0 + 0.01 < seen[u] <= t1]
    assert all(store.stored_at[u] < t0 for u in during for (t0, _t1) in outages if t0 < seen[u]), (
        "an upload was stored while the store was down"
    )
    assert store.refused, "the outage never hit the aggregator"
    print(
        f"\nstore outages {[round(b - a, 2) for a, b in outages]} s: {len(store.refused)} "
        f"refused store operations, {len(during)} acks in flight during outages, "
        f"{summary['acked']} acks, reconnects {[a.report['reconnects'] for a in agents]}"
    )


def test_agent_joining_during_store_outage_is_not_refused_for_good(tmp_path: Path) -> None:
    """A transient store failure while an agent registers must not stop that agent: the
    aggregator must not answer it as a refusal, and the agent must retry. (Failed until
    the aggregator answered store failures at registration with ``unavailable``.)"""
    db = tmp_path / "fed.db"
    store = FlakyStore(str(db))
    errors: list[BaseException] = []
    try:
        with aggregator_thread(aggregator_config(db, 1, min_agents=1), store=store) as agg:
            store.down = True
            agent = Agent(
                f"ws://127.0.0.1:{agg.port}", name="late", max_backoff=0.3, connect_timeout=3.0
            )
            agent.send_initial_model(initial_model())
            t = threading.Thread(target=lambda: _start(agent, errors), daemon=True)
            t.start()
            time.sleep(1.5)
            store.down = False
            t.join(20)
            agent.close(timeout=5)
    finally:
        store.close()
    assert not errors, f"the agent gave up during a 1.5 s store outage: {errors[0]!r}"


def _start(agent: Agent, errors: list[BaseException]) -> None:
    try:
        agent.start(timeout=15)
    except BaseException as exc:
        errors.append(exc)
