"""Agents talk to the aggregator through a proxy that cuts and stalls connections."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from chaosproxy import ChaosProxy
from faultlib import (
    N_AGENTS,
    aggregator_config,
    check_run,
    finish_thread_aggregator,
    join_all,
    start_thread_agent,
)

from fedstack.testing import aggregator_thread

ROUNDS = 8


def test_proxy_cuts_and_stalls_connections(
    tmp_path: Path, reference: dict[int, dict[str, np.ndarray]]
) -> None:
    db = tmp_path / "fed.db"
    started = time.monotonic()
    with (
        aggregator_thread(aggregator_config(db, ROUNDS)) as agg,
        ChaosProxy(
            agg.port, seed=3, max_cuts=12, max_stalls=12, fault_seconds=20.0, cut_probability=1.0
        ) as proxy,
    ):
        url = f"ws://127.0.0.1:{proxy.port}"
        # training takes long enough per round for the proxy to land its faults even when
        # a busy machine makes everything else slow
        agents = [start_thread_agent(url, f"agent-{i}", i, delay=0.15) for i in range(N_AGENTS)]
        join_all(agents, 90)
        finish_thread_aggregator(agg)
    summary = check_run(db, ROUNDS, [a.report for a in agents], reference[ROUNDS])
    st = proxy.stats
    print(
        f"\nproxy: {st.connections} connections, {st.cuts} cuts, {st.stalls} stalls "
        f"({st.stalled_seconds:.1f} s), {st.bytes} bytes; reconnects "
        f"{[a.report['reconnects'] for a in agents]}; uploads {summary['statuses']}; "
        f"{time.monotonic() - started:.1f} s"
    )
    assert st.cuts >= 5 and st.stalls >= 2, st
    assert sum(a.report["reconnects"] for a in agents) >= st.cuts // 2
