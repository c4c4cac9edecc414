"""The dashboard of a running aggregator, in a real browser (Playwright driving the
system's Chromium).

A real federation: ``fedstack aggregator`` as a subprocess with its operator port (which
serves the dashboard at ``/``), four agents training scikit-learn's digits with operator-
issued credentials, one of them (``mallory``) reporting metrics named and valued with
markup. Acceptance (issue 13): while the federation trains, the live page shows new rounds
without reload, within a second of their commit; login with a wrong token (or an agent's)
is refused, with the operator token accepted (session cookie HttpOnly, SameSite=Strict; the
token in no URL, page or log line); revoking an agent from the page disconnects it and
writes the audit event; agent-controlled text (a registration as
``<img src=x onerror=alert(1)>``, markup metric names) is shown as text and no script
runs; the browser asks no host but the dashboard's. Screenshots of the views go to the
``screenshots`` folder.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import signal
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from fedstack import Agent, FederationFinished, Store
from fedstack.errors import ConnectionClosed
from fedstack.testing import AggregatorProcess, read_ready
from fedstack.testing.dashboard import Watched, injected_markup, shoot
from fedstack.trainers.digits import DigitsLinearTrainer
from fedstack.transport import connect
from fedstack.types import Metrics, Weights
from fedstack.wire import Error, Participate, decode, encode

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Cookie, Page

HOSTILE = "<img src=x onerror=alert(1)>"
HOSTILE_METRICS: Metrics = {HOSTILE: 0.5, "note": "<script>alert(2)</script>"}
AGENTS = ("alice", "bob", "carol", "mallory")
PACE = 0.3  # seconds each fit sleeps: a few rounds a second, little CPU


class AgentThread(threading.Thread):
    """A digits agent with its own credential, training until stopped or refused."""

    def __init__(self, url: str, name: str, token: str, index: int, extra: Metrics) -> None:
        super().__init__(name=f"agent-{name}", daemon=True)
        self.trainer = DigitsLinearTrainer(index=index, num_agents=len(AGENTS))
        self.extra = dict(extra)
        self.agent = Agent(url, name=name, token=token)
        self.agent.send_initial_model(self.trainer.initial_weights())
        self.stopping = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.agent.start(timeout=30)
            while not self.stopping.is_set():
                try:
                    gm = self.agent.wait_for_global_model(0.5)
                except TimeoutError:
                    continue
                time.sleep(PACE)
                out = self.trainer.fit(gm, {"version": self.agent.version})
                weights: Weights = dict(out[0])
                self.agent.send_owned_model(weights, out[1], {**out[2], **self.extra})
        except FederationFinished:
            pass
        except BaseException as exc:  # the test reads it (a revoked agent's refusal)
            self.error = exc
        finally:
            self.agent.close(timeout=5)


@dataclass
class Federation:
    tmp: Path
    db: Path
    aggregator: AggregatorProcess
    origin: str
    operator_port: int
    tokens: dict[str, str]
    agents: dict[str, AgentThread] = field(default_factory=dict)
    run_id: str = ""

    def api(self, path: str) -> Any:
        conn = http.client.HTTPConnection("127.0.0.1", self.operator_port, timeout=10)
        try:
            conn.request("GET", path, headers={"Authorization": f"Bearer {self.tokens['ops']}"})
            resp = conn.getresponse()
            assert resp.status == 200, resp.status
            return json.loads(resp.read())
        finally:
            conn.close()

    def store(self) -> Store:
        return Store.open_readonly(str(self.db))


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    tmp = tmp_path_factory.mktemp("browser-live")
    db = tmp / "fed.db"
    st = Store(str(db))
    try:
        tokens = {n: st.issue_credential(n) for n in AGENTS}
        tokens["ops"] = st.issue_credential("ops", role="operator")
    finally:
        st.close()
    agg = AggregatorProcess(
        tmp,
        "--db",
        str(db),
        "--run-name",
        "browser-live",
        "--operator-port",
        "0",
        "--round-timeout",
        "30",
    )
    agg.start()
    try:
        port = int(str(read_ready(tmp / "aggregator-0.ready")["operator_port"]))
        fed = Federation(tmp, db, agg, f"http://127.0.0.1:{port}", port, tokens)
        for i, name in enumerate(AGENTS):
            extra = HOSTILE_METRICS if name == "mallory" else {}
            fed.agents[name] = AgentThread(agg.url, name, tokens[name], i, extra)
            fed.agents[name].start()
        deadline = time.monotonic() + 60
        while (status := fed.api("/api/v1/status"))["version"] < 3:
            assert time.monotonic() < deadline, "the federation did not train"
            time.sleep(0.1)
        fed.run_id = status["run_id"]
        yield fed
    finally:
        for a in fed.agents.values():
            a.stopping.set()
        if agg.proc is not None and agg.proc.poll() is None:
            agg.kill(signal.SIGTERM)
        for a in fed.agents.values():
            a.join(15)
        agg.close()


def committed(fed: Federation) -> dict[int, float]:
    """``{round: commit time}`` of the run's last 200 rounds (the store's clock = ours)."""
    st = fed.store()
    try:
        return {int(r["round"]): float(r["finished"]) for r in st.rounds(fed.run_id, limit=200)}
    finally:
        st.close()


def events(fed: Federation, kind: str) -> list[dict[str, Any]]:
    st = fed.store()
    try:
        return [e for e in st.events() if e["kind"] == kind]
    finally:
        st.close()


def session_cookie(w: Watched) -> Cookie | None:
    return next((c for c in w.context.cookies() if c["name"] == "fedstack_session"), None)


def login(page: Page, token: str) -> int:
    """Submit the login form with ``token``; the HTTP status of the POST's answer."""
    page.goto("/login")
    page.fill("form#login input[name=token]", token)
    with page.expect_response(
        lambda r: r.request.method == "POST" and r.url.split("?")[0].endswith("/login")
    ) as answer:
        page.click("button#login-submit")
    page.wait_for_load_state()
    return answer.value.status


# JS run in the page (by the DevTools protocol, not subject to the page's CSP): mark the
# document, and note when each round row first appears (Date.now(), the machine's clock)
OBSERVE = """() => {
    window.__fedstackMarker = 'same-document';
    window.__seen = {};
    const note = () => {
        for (const tr of document.querySelectorAll('table#rounds tr[data-round]')) {
            if (!(tr.dataset.round in window.__seen)) window.__seen[tr.dataset.round] = Date.now();
        }
    };
    note();
    new MutationObserver(note).observe(document.body, {childList: true, subtree: true});
}"""


@pytest.mark.serial  # asserts a delay (< 1 s) measured on this machine
def test_live_run_page_shows_new_rounds_without_reload(
    fed: Federation, browser: Browser, screenshots: Path
) -> None:
    w = Watched(browser, fed.origin)
    try:
        page = w.new_page()
        loads: list[str] = []
        page.on("load", lambda p: loads.append(p.url))
        page.goto(f"/runs/{fed.run_id}")
        page.wait_for_selector("table#rounds tr[data-round]")
        for chart in ("#accuracy-chart", "#loss-chart", "#round-time-chart"):
            assert page.locator(f"div{chart}").count() == 1, chart
        page.evaluate(OBSERVE)
        first = int(page.inner_text("span#run-version"))
        before = page.locator("div#accuracy-chart").screenshot()
        target = first + 3
        page.wait_for_selector(f'table#rounds tr[data-round="{target}"]', timeout=20_000)
        # the same document all along: no reload, no navigation
        assert page.evaluate("() => window.__fedstackMarker") == "same-document"
        assert len(loads) == 1
        assert int(page.inner_text("span#run-version")) >= target
        shown = page.eval_on_selector_all(
            "table#rounds tr[data-round]", "rows => rows.map(r => Number(r.dataset.round))"
        )
        assert shown == sorted(shown, reverse=True) and shown[0] >= target  # newest first
        assert set(range(first, target + 1)) <= set(shown)  # no round skipped
        # the chart took the new points (it is redrawn)
        assert page.locator("div#accuracy-chart").screenshot() != before
        # each new row appeared within a second of the round's commit
        seen: dict[str, float] = page.evaluate("() => window.__seen")
        commits = committed(fed)
        delays = {r: seen[str(r)] / 1000 - commits[r] for r in range(first + 1, target + 1)}
        assert all(d < 1.0 for d in delays.values()), delays
        shoot(page, screenshots, "live-run")
        assert w.outside_origin() == [] and w.dialogs == []
    finally:
        w.close()


def test_login_refuses_a_wrong_token_and_accepts_the_operator_token(
    fed: Federation, browser: Browser, screenshots: Path
) -> None:
    audited = len(events(fed, "operator_api"))
    w = Watched(browser, fed.origin)
    try:
        page = w.new_page()
        page.goto("/login")
        assert page.get_attribute("form#login input[name=token]", "type") == "password"
        shoot(page, screenshots, "login")
        # read-only before logging in: no action on the page
        page.goto(f"/runs/{fed.run_id}/agents")
        page.wait_for_selector("table#agents tr[data-agent]")
        assert page.locator("form.revoke").count() == 0
        for wrong in ("f" * 43, fed.tokens["alice"]):  # a made-up token, an agent's
            assert login(page, wrong) == 401
            assert page.locator("p#login-error").is_visible()
            shoot(page, screenshots, "login-refused")
            page.goto(f"/runs/{fed.run_id}/agents")  # still not logged in
            page.wait_for_selector("table#agents tr[data-agent]")
            assert page.locator("form.revoke").count() == 0
        before = session_cookie(w)
        assert login(page, fed.tokens["ops"]) in (200, 302, 303)
        page.wait_for_url(fed.origin + "/")
        cookie = session_cookie(w)
        assert cookie is not None
        assert cookie["httpOnly"] is True and cookie["sameSite"] == "Strict"
        assert fed.tokens["ops"] not in cookie["value"]
        assert before is None or before["value"] != cookie["value"]  # a new session id
        page.goto(f"/runs/{fed.run_id}/agents")
        page.wait_for_selector("table#agents tr[data-agent]")
        assert page.locator("form.revoke").count() >= 1  # logged in: actions
        page.goto(f"/runs/{fed.run_id}")
        assert page.locator("form#stop-run").count() == 1
        # the token is in no URL, no page and no log line
        for token in (fed.tokens["ops"], fed.tokens["alice"]):
            assert not [u for u in w.requests if token in u]
            assert token not in page.content()
            assert token not in fed.aggregator.log_text()
        assert w.outside_origin() == [] and w.dialogs == []
    finally:
        w.close()
    # two refused logins and one accepted, audited like the operator API's calls
    logins = [
        (e["detail"].get("outcome"), e["detail"].get("operator"))
        for e in events(fed, "operator_api")[audited:]
        if e["detail"].get("action") == "login"
    ]
    assert sorted(o for o, _ in logins) == ["accepted", "refused", "refused"], logins
    assert ("accepted", "ops") in logins


def test_revoking_an_agent_from_the_page_disconnects_it_and_is_audited(
    fed: Federation, browser: Browser, screenshots: Path
) -> None:
    carol = fed.agents["carol"]
    assert carol.is_alive() and carol.error is None
    assert "carol" in {a["name"] for a in fed.api("/api/v1/agents")["agents"]}
    w = Watched(browser, fed.origin)
    try:
        page = w.new_page()
        assert login(page, fed.tokens["ops"]) in (200, 302, 303)
        page.goto(f"/runs/{fed.run_id}/agents")
        row = page.locator('table#agents tr[data-agent="carol"]')
        assert row.locator(".online").inner_text().strip() == "online"
        shoot(page, screenshots, "agents-operator")
        with page.expect_response(
            lambda r: r.request.method == "POST" and "/actions/agents/carol/revoke" in r.url
        ) as answer:
            row.locator("form.revoke [type=submit]").click()
        assert answer.value.status < 400
        carol.join(15)
        assert not carol.is_alive() and carol.error is not None  # disconnected, refused
        assert "carol" not in {a["name"] for a in fed.api("/api/v1/agents")["agents"]}
        page.goto(f"/runs/{fed.run_id}/agents")
        row = page.locator('table#agents tr[data-agent="carol"]')
        assert row.locator(".online").inner_text().strip() == "offline"
        assert w.dialogs == []  # the form posts as it is (no confirm() in the way)
    finally:
        w.close()
    st = fed.store()
    try:
        assert next(a for a in st.list_agents() if a["name"] == "carol")["revoked_at"]
    finally:
        st.close()
    revokes = [
        e["detail"]
        for e in events(fed, "operator_api")
        if e["detail"].get("action") == "revoke" and e["detail"].get("target") == "carol"
    ]
    assert len(revokes) == 1, "no audit event for the revocation"
    assert revokes[0]["operator"] == "ops" and revokes[0]["outcome"] == "accepted"
    # the others train on
    version = fed.api("/api/v1/status")["version"]
    deadline = time.monotonic() + 15
    while fed.api("/api/v1/status")["version"] < version + 2:
        assert time.monotonic() < deadline
        time.sleep(0.1)


async def _register(url: str, name: str) -> object:
    """A protocol-level client (no name check on this side) asking to join as ``name``."""
    conn = await connect(url, max_message_bytes=1 << 20)
    try:
        conn.write(encode(Participate(agent_name=name)))
        return decode(await asyncio.wait_for(conn.recv(), 10))
    except ConnectionClosed as exc:
        return exc
    finally:
        conn.abort()


def test_agent_supplied_markup_is_shown_as_text_and_no_script_runs(
    fed: Federation, browser: Browser
) -> None:
    replies: list[object] = []  # (Playwright's sync API holds this thread's event loop)
    t = threading.Thread(
        target=lambda: replies.append(asyncio.run(_register(fed.aggregator.url, HOSTILE)))
    )
    t.start()
    t.join(30)
    reply = replies[0]
    assert isinstance(reply, Error) and reply.code == "bad-name"
    st = fed.store()
    try:
        latest = st.rounds(fed.run_id, limit=1)[0]
        assert f"mean_{HOSTILE}" in latest["metrics"] or HOSTILE in json.dumps(
            st.models(fed.run_id, kind="local")[-1]["metrics"]
        )
    finally:
        st.close()
    assert any(HOSTILE in json.dumps(e["detail"]) for e in events(fed, "refused"))
    w = Watched(browser, fed.origin)
    try:
        page = w.new_page()
        views: Mapping[str, str | None] = {
            "/audit?kind=refused": HOSTILE,  # the refusal's reason names it
            f"/models/{latest['model_id']}": HOSTILE,  # mallory's local model's metrics
            f"/runs/{fed.run_id}": None,
            f"/runs/{fed.run_id}/agents": None,
            "/": None,
        }
        for path, text in views.items():
            page.goto(path)
            page.wait_for_load_state("load")
            assert page.locator("nav#nav").count() == 1, path
            if text is not None:
                assert text in page.inner_text("body"), path  # shown, as text
            assert injected_markup(page) == {
                "images": 0,
                "handlers": 0,
                "inline_scripts": 0,
                "foreign_scripts": 0,
            }, path
        page.wait_for_timeout(300)  # an image error handler would have fired by now
        assert w.dialogs == []
        assert not [e for e in w.console_errors if "Content Security Policy" in e]
        assert w.outside_origin() == []
    finally:
        w.close()
