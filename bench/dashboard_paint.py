"""First paint of every dashboard view over a large store, measured in a real browser.

What it measures: a store with ``--rounds`` rounds (default 10,000) and ``--agents`` agents
(default 1,000) of one run of a horizontal federation (two member aggregators, their
semi-global models, 10 local models a round with lineage, audit events; plus three small
finished runs), written by :func:`fedstack.testing.dashboard.populate_store` (bulk SQL);
then ``fedstack dashboard --db`` over it (a subprocess, SQLite opened read-only) and the
system's Chromium driven by Playwright. Each view is opened ``--visits`` times in a new tab
(the first visit with a cold browser cache and fresh server) and timed by the browser's
Performance API: ``first-contentful-paint`` (the issue's "first paint"), the load event,
``complete`` (the last script, style sheet or data fetch finished: the charts' rounds
included), and the server's answer to the page (``responseStart - requestStart``); all
in ms from the navigation's start (medians over the visits but for ``first``). Target:
every view's first paint under 1 s (exit status 1 otherwise).

Run::

    .venv/bin/python bench/dashboard_paint.py                  # ~30 s: store + visits
    .venv/bin/python bench/dashboard_paint.py --rounds 1000 --agents 100 --visits 5
    .venv/bin/python bench/dashboard_paint.py --screenshots docs/screenshots

Measured on this machine (2 vCPUs, Chromium 150, the default sizes): the store written in
9.2 s; every view's first paint 130-320 ms (slowest: the agents view's first, cold visit),
chart data in by 320 ms; the table is in the README's "Dashboard" section.

``--db PATH`` keeps the store (reused if it exists, with ``--rounds``/``--agents`` ignored);
``--screenshots DIR`` writes one PNG per view (the README's come from here).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fedstack.store.repository import Store
from fedstack.testing.dashboard import (
    DashboardProcess,
    PopulatedRun,
    Watched,
    find_chromium,
    populate_store,
    shoot,
)

TARGET_MS = 1000.0

TIMING = """() => {
    const nav = performance.getEntriesByType('navigation')[0];
    const fcp = performance.getEntriesByName('first-contentful-paint')[0];
    return {
        fcp: fcp ? fcp.startTime : null,
        load: nav.loadEventEnd,
        server: nav.responseStart - nav.requestStart,
        bytes: nav.transferSize,
        // the last script, style sheet or data fetch (the charts' rounds) to finish
        complete: Math.max(nav.loadEventEnd, ...performance.getEntriesByType('resource')
            .map(e => e.responseEnd)),
    };
}"""


def existing(db: str) -> PopulatedRun:
    """The ids of a store written before by :func:`populate_store`."""
    st = Store.open_readonly(db)
    try:
        runs = sorted(st.list_runs(), key=lambda r: -int(r["version"]))
        long_run = runs[0]
        rounds = st.rounds(long_run["id"], limit=20_000)
        agents = [a["name"] for a in st.list_agents()]
        members = sorted(st.aggregator_names().values())
        return PopulatedRun(
            run_id=long_run["id"],
            rounds=len(rounds),
            agents=agents,
            global_model_ids=[r["model_id"] for r in rounds],
            members=members,
            other_run_ids=[r["id"] for r in runs[1:]],
        )
    finally:
        st.close()


def views(run: PopulatedRun, agents: int) -> dict[str, str]:
    last_agents_page = max((agents + 49) // 50, 1)
    return {
        "runs": "/",
        "compare": f"/compare?run={run.run_id}&run={run.other_run_ids[0]}",
        "run": f"/runs/{run.run_id}",
        "run, last page": f"/runs/{run.run_id}?page={max(run.rounds // 50, 1)}",
        "agents": f"/runs/{run.run_id}/agents",
        "agents, last page": f"/runs/{run.run_id}/agents?page={last_agents_page}",
        "audit": "/audit",
        "audit, filtered": "/audit?kind=refused",
        "lineage, last round": f"/models/{run.global_model_ids[-1]}",
        "lineage, round 1": f"/models/{run.global_model_ids[0]}",
        "aggregators": f"/runs/{run.run_id}/aggregators",
        "login": "/login",
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rounds", type=int, default=10_000)
    ap.add_argument("--agents", type=int, default=1_000)
    ap.add_argument("--visits", type=int, default=3, help="visits per view (first: cold)")
    ap.add_argument("--db", help="keep the store here (reused if it exists)")
    ap.add_argument("--screenshots", type=Path, help="write one PNG per view here")
    args = ap.parse_args()
    chromium = find_chromium()
    if chromium is None:
        print("no Chromium: apt-get install chromium (or set FEDSTACK_CHROMIUM)")
        return 2
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory(prefix="dashboard-paint-") as tmp:
        db = args.db or str(Path(tmp) / "big.db")
        if args.db and Path(args.db).exists():
            run = existing(db)
            print(f"store {db}: {run.rounds} rounds, {len(run.agents)} agents (reused)")
        else:
            t0 = time.perf_counter()
            run = populate_store(db, rounds=args.rounds, agents=args.agents)
            print(
                f"store: {args.rounds} rounds, {args.agents} agents, "
                f"{args.rounds * 10} local models written in {time.perf_counter() - t0:.1f} s"
            )
        dash = DashboardProcess(Path(tmp), db)
        dash.start()
        results: dict[str, list[dict[str, Any]]] = {}
        try:
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=chromium)
                w = Watched(browser, dash.url)
                for visit in range(args.visits):
                    for name, path in views(run, len(run.agents)).items():
                        page = w.new_page()
                        answer = page.goto(path, wait_until="load")
                        if answer is None or answer.status != 200:
                            status = None if answer is None else answer.status
                            raise SystemExit(f"{name}: {path} answered {status}")
                        with contextlib.suppress(PlaywrightTimeout):  # a live stream
                            page.wait_for_load_state("networkidle", timeout=3_000)
                        # the paint entry is recorded at the next rendering opportunity
                        page.wait_for_function(
                            "() => performance.getEntriesByName('first-contentful-paint')"
                            ".length > 0",
                            timeout=10_000,
                        )
                        timing = page.evaluate(TIMING)
                        if visit == 0 and args.screenshots is not None:
                            shoot(page, args.screenshots, name.replace(", ", "-").replace(" ", "-"))
                        results.setdefault(name, []).append(timing)
                        page.close()
                outside = w.outside_origin()
                w.close()
                browser.close()
        finally:
            dash.close()
    print(f"\nfirst paint per view (ms; {args.visits} visits, the first cold), target < 1000 ms")
    print(
        f"{'view':22} {'first':>7} {'median':>7} {'max':>7} {'load':>7} {'complete':>8} "
        f"{'server':>7} {'KiB':>6}"
    )
    worst = 0.0
    for name, runs in results.items():
        fcps = [float(r["fcp"]) for r in runs if r["fcp"] is not None]
        if len(fcps) < len(runs):
            print(f"{name:22} no first-contentful-paint entry")
            worst = float("inf")
            continue
        worst = max(worst, *fcps)
        print(
            f"{name:22} {fcps[0]:7.0f} {statistics.median(fcps):7.0f} {max(fcps):7.0f} "
            f"{statistics.median(float(r['load']) for r in runs):7.0f} "
            f"{statistics.median(float(r['complete']) for r in runs):8.0f} "
            f"{statistics.median(float(r['server']) for r in runs):7.0f} "
            f"{runs[0]['bytes'] / 1024:6.1f}"
        )
    print(f"\nslowest first paint: {worst:.0f} ms ({'OK' if worst < TARGET_MS else 'OVER'} 1 s)")
    if outside:
        print(f"requests to other hosts: {outside}")
        return 1
    return 0 if worst < TARGET_MS else 1


if __name__ == "__main__":
    sys.exit(main())
