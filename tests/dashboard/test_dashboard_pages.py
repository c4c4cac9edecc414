"""The dashboard's pages over a store alone (read-only, as ``fedstack dashboard --db``):
the DOM contract of every view, escaping of agent-supplied text, the content security
policy, pagination bounds and the read-only refusals."""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

with warnings.catch_warnings():  # Starlette 1.10 would rather have httpx2 (same API)
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

from fedstack.dashboard import CSP, dashboard_middleware, dashboard_routes
from fedstack.dashboard.app import SERIES_POINTS
from fedstack.operator import create_app
from fedstack.store import Store

XSS = "<img src=x onerror=alert(1)>"  # as tests/dashboard/conftest.py fills the store
SCRIPT = "<script>alert(2)</script>"
WANT_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)


class Dom(HTMLParser):
    """Elements (tag, attributes) in document order, and every inline script/style."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str | None]]] = []
        self.inline: list[str] = []
        self._in: str | None = None
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.elements.append((tag, a))
        if tag == "script" and "src" not in a:
            self.inline.append("script")
        if tag == "style":
            self.inline.append("style")
        for k in a:
            if k == "style" or k.startswith("on"):
                self.inline.append(f"{tag}[{k}]")

    def find(self, tag: str, **attrs: str | None) -> list[dict[str, str | None]]:
        return [
            a
            for t, a in self.elements
            if t == tag and all(a.get(k.replace("_", "-")) == v for k, v in attrs.items())
        ]

    def has(self, tag: str, attr: str) -> list[dict[str, str | None]]:
        return [a for t, a in self.elements if t == tag and attr in a]


@pytest.fixture
def client(readonly_store: Store) -> Iterator[TestClient]:
    app = create_app(dashboard_routes(readonly_store), middleware=dashboard_middleware())
    with TestClient(app) as c:
        yield c


def page(client: TestClient, url: str, status: int = 200) -> Dom:
    r = client.get(url)
    assert r.status_code == status, (url, r.status_code, r.text[:300])
    assert r.headers["content-security-policy"] == WANT_CSP == CSP
    assert r.headers["x-frame-options"] == "DENY"
    assert r.headers["content-type"].startswith("text/html")
    html = r.text
    # attacker-controlled text is never markup
    assert XSS not in html and SCRIPT not in html
    dom = Dom(html)
    assert dom.inline == [], (url, dom.inline)
    assert dom.find("nav", id="nav"), url
    for tag, attr in (("script", "src"), ("link", "href"), ("img", "src")):
        for a in dom.has(tag, attr):
            v = a[attr] or ""
            assert v.startswith("/static/") or v.startswith("data:"), (url, tag, v)
    return dom


def test_every_view_renders_its_contract_and_escapes_agent_text(
    client: TestClient, filled: Any
) -> None:
    rid = filled.run_ids[-1]
    dom = page(client, "/")
    rows = dom.has("tr", "data-run-id")
    assert [r["data-run-id"] for r in rows] == filled.run_ids[::-1]  # newest first
    assert len(dom.find("input", name="run", type="checkbox")) == 3
    assert dom.find("button", id="compare") and dom.find("table", id="runs")
    assert not dom.find("a", id="next-page")
    assert dom.find("span", id="read-only")  # the standalone dashboard says so
    html = client.get("/").text
    assert "fedprox" in html and "0.75" in html  # strategy, last accuracy (0.5 + 5/10)

    dom = page(client, f"/compare?run={rid}&run={filled.run_ids[0]}")
    assert dom.find("div", id="compare-chart")
    assert {a["data-run-id"] for a in dom.has("li", "data-run-id")} == {rid, filled.run_ids[0]}

    dom = page(client, f"/runs/{rid}")
    for chart in ("accuracy-chart", "loss-chart", "round-time-chart"):
        assert dom.find("div", id=chart)
    assert [a["data-round"] for a in dom.has("tr", "data-round")] == ["5", "4", "3", "2", "1"]
    version = client.get(f"/runs/{rid}").text
    assert re.search(r'<span id="run-version">5</span>', version)
    assert "&lt;script&gt;alert(2)&lt;/script&gt;=5" in version  # the metric key, escaped
    assert not dom.find("form", id="stop-run")  # read-only: no action

    dom = page(client, f"/runs/{rid}/agents")
    agents = dom.has("tr", "data-agent")
    assert XSS in {a["data-agent"] for a in agents}  # the attribute value, parsed back
    assert len(agents) == 3 and not dom.find("form", **{"class": "revoke"})
    text = client.get(f"/runs/{rid}/agents").text
    assert "&lt;img src=x onerror=alert(1)&gt;" in text
    assert "&lt;img src=x onerror=alert(1)&gt; refused 1" in text  # a refusal reason
    for cls in ("online", "last-seen", "address", "contributions", "refusals"):
        assert f'class="{cls}' in text
    assert "5 aggregated of 5 uploads; last upload for round 5" in text
    assert "rounds 1, 2, 3, 4, 5<" in text

    dom = page(client, "/audit")
    assert dom.find("table", id="audit") and dom.find("form", id="audit-filter")
    assert dom.find("select", name="kind") and dom.find("input", name="agent")
    assert len(dom.find("tr", **{"class": "event"})) == 7

    dom = page(client, f"/models/{filled.global_ids[-1]}")
    ids = [a["data-model-id"] for a in dom.has("li", "data-model-id")]
    assert ids[0] == filled.global_ids[-1] and set(ids[1:]) == set(filled.local_ids[-3:])
    assert dom.find("div", id="lineage") and dom.find("p", id="round-metrics")
    assert any(
        a.get("href") == f"/models/{filled.global_ids[-2]}"
        for a in dom.find("a", **{"class": "base"})
    )

    dom = page(client, f"/runs/{rid}/aggregators")
    assert dom.find("table", id="aggregators") and dom.has("tr", "data-aggregator")

    dom = page(client, "/login")
    assert dom.find("p", id="login-read-only") and not dom.find("form", id="login")

    r = client.get(f"/runs/{rid}/series")
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    series = r.json()
    assert [p["round"] for p in series["rounds"]] == [1, 2, 3, 4, 5]
    assert series["rounds"][-1]["accuracy"] == 0.75 and series["rounds"][0]["loss"] == 1.0

    # static assets: one script, one style sheet, uPlot and its licence, in the package
    for asset in (
        "/static/dashboard.js",
        "/static/dashboard.css",
        "/static/vendor/uPlot.iife.min.js",
        "/static/vendor/uPlot.min.css",
        "/static/vendor/uPlot.LICENSE",
    ):
        got = client.get(asset)
        assert got.status_code == 200 and len(got.content) > 500, asset
    assert "MIT" in client.get("/static/vendor/uPlot.LICENSE").text
    js = client.get("/static/dashboard.js").text
    assert "innerHTML" not in js and "http://" not in js and "https://" not in js


def test_audit_filters_by_kind_and_agent(client: TestClient, filled: Any) -> None:
    dom = page(client, "/audit?kind=refused")
    assert len(dom.find("tr", **{"class": "event"})) == 2
    dom = page(client, "/audit?kind=joined&agent=agent-1")
    assert len(dom.find("tr", **{"class": "event"})) == 3  # events 0, 2, 4 of 5
    dom = page(client, "/audit?agent=" + XSS.replace(" ", "%20"))
    assert len(dom.find("tr", **{"class": "event"})) == 2
    dom = page(client, "/audit?agent=nobody")
    assert dom.find("p", id="unknown-agent") and not dom.find("tr", **{"class": "event"})
    page(client, "/audit?kind=" + "x" * 40, 400)


def test_pagination_bounds_and_limits(tmp_path: Path, make_store: Any) -> None:
    f = make_store(
        tmp_path / "big.db", runs=120, rounds=2600, agents=60, events=130, local_rounds=1
    )
    st = Store.open_readonly(str(f.db))
    try:
        app = create_app(dashboard_routes(st), middleware=dashboard_middleware())
        with TestClient(app) as client:
            rid = f.run_ids[-1]
            dom = page(client, "/")
            assert len(dom.has("tr", "data-run-id")) == 50
            nxt = dom.find("a", id="next-page")
            assert nxt and nxt[0]["href"] == "/?page=2"
            dom = page(client, "/?page=3")
            assert [a["data-run-id"] for a in dom.has("tr", "data-run-id")] == f.run_ids[:20][::-1]
            assert not dom.find("a", id="next-page")
            for bad in ("0", "-1", "abc", "1.5", "99999999999"):
                page(client, f"/?page={bad}", 400)
            page(client, "/?page=1&page=2", 400)
            page(client, "/?page=4", 404)

            # a long run: the last 50 rounds, newest first; page 2 the 50 before
            dom = page(client, f"/runs/{rid}")
            got = [int(a["data-round"] or 0) for a in dom.has("tr", "data-round")]
            assert got == list(range(2600, 2550, -1))
            assert dom.find("a", id="next-page")[0]["href"] == f"/runs/{rid}?page=2"
            dom = page(client, f"/runs/{rid}?page=52")
            got = [int(a["data-round"] or 0) for a in dom.has("tr", "data-round")]
            assert got == list(range(50, 0, -1)) and not dom.find("a", id="next-page")
            page(client, f"/runs/{rid}?page=53", 404)
            # the charts read at most SERIES_POINTS rounds, spread, the latest included
            rounds = [p["round"] for p in client.get(f"/runs/{rid}/series").json()["rounds"]]
            assert len(rounds) <= SERIES_POINTS + 1 and rounds[-1] == 2600
            assert rounds == sorted(rounds) and rounds[0] <= 3

            dom = page(client, f"/runs/{rid}/agents?page=2")
            assert len(dom.has("tr", "data-agent")) == 10
            page(client, f"/runs/{rid}/agents?page=3", 404)
            dom = page(client, "/audit?page=3")
            assert len(dom.find("tr", **{"class": "event"})) == 32  # 132 events
            dom = page(client, f"/models/{f.global_ids[-1]}")
            assert len(dom.has("li", "data-model-id")) == 1 + 60

            page(client, "/runs/nosuchrun", 404)
            page(client, f"/models/{'x' * 65}", 404)
            page(client, "/compare", 400)
            page(client, "/compare?" + "&".join(f"run={r}" for r in f.run_ids[:9]), 400)
    finally:
        st.close()


def test_standalone_dashboard_is_read_only(client: TestClient, filled: Any) -> None:
    before = filled.db.read_bytes()
    for path in ("/login", "/actions/stop", "/actions/agents/agent-1/revoke", "/logout"):
        r = client.post(
            path,
            content=b"csrf=x&token=y",
            headers={"content-type": "application/x-www-form-urlencoded"},
        )
        assert r.status_code == 403, (path, r.status_code)
        assert r.headers["content-security-policy"] == CSP
    assert "fedstack_session" not in client.cookies
    assert filled.db.read_bytes() == before


def test_a_loopback_dashboard_answers_loopback_host_names_only(readonly_store: Store) -> None:
    app = create_app(dashboard_routes(readonly_store), middleware=dashboard_middleware("127.0.0.1"))
    with TestClient(app) as client:
        for host in ("127.0.0.1:8080", "localhost", "LOCALHOST:1", "[::1]:8080", "127.0.0.2"):
            r = client.get("/", headers={"host": host})
            assert r.status_code == 200, host
        # DNS rebinding: a name of the attacker's pointing at 127.0.0.1
        for host in ("evil.example", "evil.example:8080", "10.0.0.1", "testserver"):
            r = client.get("/audit", headers={"host": host})
            assert r.status_code == 421, host
            assert "refused" not in r.text and r.headers["content-security-policy"] == CSP
        assert client.get("/healthz", headers={"host": "evil.example"}).status_code == 200
    # listening beyond loopback: names are the operator's business (TLS checks them)
    app = create_app(dashboard_routes(readonly_store), middleware=dashboard_middleware("0.0.0.0"))
    with TestClient(app) as client:
        assert client.get("/", headers={"host": "dash.example"}).status_code == 200


def test_views_need_a_login_when_an_aggregators_dashboard_listens_beyond_loopback(
    readonly_store: Store, filled: Any
) -> None:
    """On loopback the views are open (the actions need a login); an aggregator's
    dashboard reachable from other hosts shows nothing (agent names, addresses) before an
    operator logs in: pages redirect to the login form, data and event streams get 401."""
    from fedstack.dashboard.app import Dashboard, views_need_login

    assert views_need_login(True, "0.0.0.0") and views_need_login(True, "10.1.2.3")
    assert not views_need_login(True, "127.0.0.1") and not views_need_login(True, "::1")
    assert not views_need_login(False, "0.0.0.0")  # fedstack dashboard --db: no logins
    app = create_app(Dashboard(readonly_store, views_need_login=True).routes())
    run_id = filled.run_ids[0]
    with TestClient(app, follow_redirects=False) as client:
        for url in ("/", "/audit", f"/runs/{run_id}", f"/runs/{run_id}/agents", "/compare"):
            r = client.get(url)
            assert r.status_code == 303 and r.headers["location"] == "/login", url
            assert "agent" not in r.text.lower(), url
        for url in (f"/runs/{run_id}/series", f"/runs/{run_id}/events"):
            assert client.get(url).status_code == 401, url
        assert client.get("/login").status_code == 200
        assert client.get("/healthz").status_code == 200


def test_an_anonymous_session_does_not_open_the_views_and_odd_digits_are_refused(
    readonly_store: Store, filled: Any
) -> None:
    """Beyond loopback, the session GET /login hands out (not logged in) opens nothing; a
    page number in non-ASCII digits is a 400, not a 500; live views are bounded per host."""
    from fedstack.dashboard.app import MAX_STREAMS_PER_HOST, Dashboard

    dash = Dashboard(readonly_store, views_need_login=True)
    run_id = filled.run_ids[0]
    with TestClient(create_app(dash.routes()), follow_redirects=False) as client:
        anonymous = dash.sessions.new()  # what GET /login hands out on an aggregator
        client.cookies.set("fedstack_session", dash.sessions.cookie_value(anonymous))
        assert client.get("/login").status_code == 200
        assert client.get("/audit").status_code == 303
        assert client.get(f"/runs/{run_id}/agents").status_code == 303
        assert client.get(f"/runs/{run_id}/series").status_code == 401
    open_dash = Dashboard(readonly_store)
    with TestClient(create_app(open_dash.routes()), follow_redirects=False) as client:
        for url in ("/?page=%C2%B2", "/audit?page=%D9%A3", f"/runs/{run_id}/events?after=%C2%B2"):
            assert client.get(url).status_code == 400, url
        open_dash._streams_by_host["testclient"] = MAX_STREAMS_PER_HOST  # as if all open
        r = client.get(f"/runs/{run_id}/events")
        assert r.status_code == 503 and "too many live views" in r.text
