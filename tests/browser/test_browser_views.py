"""Every view of ``fedstack dashboard --db`` (the standalone, read-only dashboard over a
store) in a real browser (Playwright driving the system's Chromium).

The store is a horizontal federation's (two member aggregators, their semi-global models,
60 agents, 300 rounds) written by :func:`fedstack.testing.dashboard.populate_store`, plus an
agent recorded under the name ``<img src=x onerror=alert(1)>`` (a store written by
anything: the dashboard trusts nothing in it). Each view renders with its navigation bar,
is screenshotted into the ``screenshots`` folder, shows that name as text with no markup
injected and no script run, offers no operator action (read-only), and the browser asks
no host but the dashboard's.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import pytest

from fedstack.testing.dashboard import (
    DashboardProcess,
    PopulatedRun,
    Watched,
    injected_markup,
    populate_store,
    shoot,
)

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

HOSTILE = "<img src=x onerror=alert(1)>"
CLEAN = {"images": 0, "handlers": 0, "inline_scripts": 0, "foreign_scripts": 0}


@pytest.fixture(scope="module")
def standalone(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[DashboardProcess, PopulatedRun]]:
    tmp = tmp_path_factory.mktemp("browser-views")
    db = str(tmp / "big.db")
    run = populate_store(db, rounds=300, agents=60, extra_agent_names=[HOSTILE])
    dash = DashboardProcess(tmp, db)
    dash.start()
    try:
        yield dash, run
    finally:
        dash.close()


def check(page: Page, w: Watched, path: str) -> None:
    """``path`` rendered: navigation bar, no injected markup, no dialog."""
    assert page.locator("nav#nav").count() == 1, path
    assert injected_markup(page) == CLEAN, path
    assert w.dialogs == [], path


def test_every_view_renders_from_the_package_alone_and_is_screenshotted(
    standalone: tuple[DashboardProcess, PopulatedRun], browser: Browser, screenshots: Path
) -> None:
    dash, run = standalone
    w = Watched(browser, dash.url)
    try:
        page = w.new_page()
        # runs: one row per run, compare two of them on one chart
        page.goto("/")
        rows = page.locator("table#runs tr[data-run-id]")
        assert rows.count() == 1 + len(run.other_run_ids)
        check(page, w, "/")
        shoot(page, screenshots, "runs")
        for rid in (run.run_id, run.other_run_ids[0]):
            page.locator(f'tr[data-run-id="{rid}"] input[name=run]').check()
        page.click("button#compare")
        page.wait_for_url("**/compare?*")
        assert page.locator("div#compare-chart").count() == 1
        assert set(page.url.split("?", 1)[1].split("&")) >= {
            f"run={run.run_id}",
            f"run={run.other_run_ids[0]}",
        }
        page.wait_for_load_state("networkidle")
        check(page, w, "/compare")
        shoot(page, screenshots, "compare")
        # one run: charts and the newest rounds first, 50 a page
        page.goto(f"/runs/{run.run_id}")
        rounds = page.eval_on_selector_all(
            "table#rounds tr[data-round]", "rows => rows.map(r => Number(r.dataset.round))"
        )
        assert rounds == list(range(run.rounds, run.rounds - 50, -1))
        assert page.inner_text("span#run-version").strip() == str(run.rounds)
        assert page.locator("form#stop-run").count() == 0  # read-only
        page.wait_for_load_state("networkidle")
        check(page, w, "/runs/ID")
        shoot(page, screenshots, "run")
        # agents: the hostile name as text, paginated, no action
        page.goto(f"/runs/{run.run_id}/agents")
        assert page.locator("table#agents tr[data-agent]").count() <= 50
        assert page.locator("form.revoke").count() == 0
        check(page, w, "/runs/ID/agents")
        shoot(page, screenshots, "agents")
        found = False
        for _ in range(3):  # 61 agents: the hostile one is on the first or second page
            hostile = page.locator("table#agents tr[data-agent]").filter(has_text=HOSTILE)
            if hostile.count():
                assert hostile.get_attribute("data-agent") == HOSTILE
                assert hostile.locator(".address").inner_text().strip() == HOSTILE
                found = True
                break
            nxt = page.locator("a#next-page")
            if not nxt.count():
                break
            nxt.click()
            page.wait_for_load_state()
            check(page, w, "/runs/ID/agents?page")
        assert found, "the agent named with markup is not listed"
        # the audit log, filtered
        page.goto("/audit")
        assert page.locator("table#audit tr.event").count() > 0
        check(page, w, "/audit")
        page.select_option("form#audit-filter select[name=kind]", "refused")
        page.locator("form#audit-filter [type=submit]").click()
        page.wait_for_url("**/audit?*kind=refused*")
        kinds = page.locator("table#audit tr.event")
        assert kinds.count() > 0
        assert HOSTILE in page.inner_text("table#audit")  # the newest refusal, as text
        check(page, w, "/audit?kind=refused")
        shoot(page, screenshots, "audit")
        # lineage of round 7's global model: its semi-globals and their local models, one
        # of them the hostile agent's (61 contributors in turn, 10 a round)
        page.goto(f"/models/{run.global_model_ids[6]}")
        lineage = page.locator("div#lineage")
        assert lineage.locator("li[data-model-id]").count() >= 1 + len(run.members) + 10
        assert lineage.locator(f'li[data-model-id="{run.global_model_ids[6]}"]').count() == 1
        assert HOSTILE in lineage.inner_text()
        check(page, w, "/models/ID")
        shoot(page, screenshots, "lineage")
        # the aggregators of the federation
        page.goto(f"/runs/{run.run_id}/aggregators")
        for name in run.members:
            assert page.locator(f'table#aggregators tr[data-aggregator="{name}"]').count() == 1
        check(page, w, "/runs/ID/aggregators")
        shoot(page, screenshots, "aggregators")
        page.wait_for_timeout(300)  # an image error handler would have fired by now
        assert w.dialogs == []
        assert not [e for e in w.console_errors if "Content Security Policy" in e]
        # self-contained: scripts, styles and the chart library came from the dashboard
        paths = {urlsplit(u).path for u in w.requests}
        assert {p for p in paths if p.endswith(".js")} >= {
            "/static/dashboard.js",
            "/static/vendor/uPlot.iife.min.js",
        }
        assert {p for p in paths if p.endswith(".css")}
        assert w.outside_origin() == [] and w.foreign == []
    finally:
        w.close()
