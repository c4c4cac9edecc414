"""The dashboard on a real aggregator's operator port while agents train: the live view's
server-sent events, login with an operator token (session cookie, CSRF), revoking an
agent and stopping the aggregator from the pages, each an audit event; the token never
in a page, an event or a log line."""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from fedstack import Agent, AggregatorConfig, FederationFinished, RegistrationRefused, Store
from fedstack.security import client_context, make_test_pki
from fedstack.testing import aggregator_thread


@pytest.fixture(autouse=True)
def _no_env_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FEDSTACK_TOKEN", raising=False)
    monkeypatch.delenv("FEDSTACK_ENROLLMENT_TOKEN", raising=False)


class Trainer(threading.Thread):
    """An agent training in a loop (global + 1) until refused or finished."""

    def __init__(self, url: str, name: str, token: str, first: bool = False) -> None:
        super().__init__(daemon=True, name=f"agent-{name}")
        self.agent = Agent(url, name=name, token=token)
        if first:
            self.agent.send_initial_model({"w": np.zeros(4, np.float32)})
        self.agent.start(timeout=10)
        self.refused: RegistrationRefused | None = None

    def run(self) -> None:
        try:
            while True:
                gm = self.agent.wait_for_global_model(30)
                time.sleep(0.05)
                self.agent.send_trained_model({"w": gm["w"] + 1}, 10)
        except RegistrationRefused as exc:
            self.refused = exc
        except (FederationFinished, Exception):
            pass
        finally:
            self.agent.close()


def wait_until(cond: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found, "no csrf field"
    return found.group(1)


def dashboard_events(db: Path) -> list[dict[str, Any]]:
    st = Store.open_readonly(str(db))
    try:
        return [
            e["detail"]
            for e in st.events()
            if e["kind"] == "operator_api" and e["detail"].get("via") == "dashboard"
        ]
    finally:
        st.close()


@pytest.mark.serial  # a round within a second of its commit: run alone
def test_dashboard_login_live_view_and_actions_on_a_training_aggregator(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    db = tmp_path / "f.db"
    st = Store(str(db))
    try:
        tok = {n: st.issue_credential(n) for n in ("alice", "bob")}
        tok["ops"] = st.issue_credential("ops", role="operator")
        tok["old"] = st.issue_credential("old", role="operator")
    finally:
        st.close()
    cfg = AggregatorConfig(
        port=0, db=str(db), rounds=None, min_agents=1, heartbeat_interval=30.0, operator_port=0
    )
    with aggregator_thread(cfg) as agg:
        assert agg.operator is not None
        base = f"http://127.0.0.1:{agg.operator.port}"
        url = f"ws://127.0.0.1:{agg.port}"
        alice = Trainer(url, "alice", tok["alice"], first=True)
        bob = Trainer(url, "bob", tok["bob"])
        alice.start()
        bob.start()
        wait_until(lambda: agg.rounds_completed >= 2 and len(agg.sessions) == 2)
        rid = agg.run_id
        bodies: list[str] = []

        with httpx.Client(base_url=base, follow_redirects=False, timeout=10) as c:
            # the live view: each committed round arrives as an event within a second
            after = agg.rounds_completed
            got: list[tuple[dict[str, Any], float]] = []
            with c.stream("GET", f"/runs/{rid}/events?after={after}") as stream:
                assert stream.status_code == 200
                assert stream.headers["content-type"].startswith("text/event-stream")
                event = None
                for line in stream.iter_lines():
                    if line.startswith("event: "):
                        event = line[7:]
                    elif line.startswith("data: ") and event == "round":
                        got.append((json.loads(line[6:]), time.time()))
                        if len(got) == 4:
                            break
            assert [rnd["round"] for rnd, _ in got] == list(range(after + 1, after + 5))
            for rnd, arrived in got:
                assert arrived - rnd["finished"] < 1.0, (rnd["round"], arrived - rnd["finished"])
                assert rnd["num_updates"] >= 1 and rnd["model_id"]

            # anonymous: the pages, no action
            r = c.get(f"/runs/{rid}/agents")
            assert r.status_code == 200 and 'class="revoke"' not in r.text
            for name in ("alice", "bob"):
                row = re.search(rf'<tr data-agent="{name}">(.*?)</tr>', r.text, re.S)
                assert row and '<td class="online yes">online</td>' in row.group(1)
            assert 'id="stop-run"' not in c.get(f"/runs/{rid}").text

            # the login form starts a session: its cookie is HttpOnly, SameSite=Strict
            r = c.get("/login")
            assert r.status_code == 200 and 'id="login"' in r.text and 'type="password"' in r.text
            cookie = r.headers["set-cookie"]
            assert cookie.startswith("fedstack_session=")
            assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie
            assert "Secure" not in cookie  # plain HTTP here
            csrf = csrf_of(r.text)
            form = {"content-type": "application/x-www-form-urlencoded"}

            # no CSRF token: refused before the token is looked at
            r = c.post("/login", data={"token": tok["ops"]})
            assert r.status_code == 403
            # a wrong token, an agent's token: 401 with the error on the page
            for wrong in (tok["ops"][:-3] + "xyz", tok["alice"]):
                r = c.post("/login", data={"token": wrong, "csrf": csrf})
                assert r.status_code == 401 and 'id="login-error"' in r.text
                bodies.append(r.text)
            # the operator's token: a new session, back to the runs
            old = c.cookies["fedstack_session"]
            r = c.post("/login", data={"token": tok["ops"], "csrf": csrf})
            assert r.status_code == 303 and r.headers["location"] == "/"
            assert c.cookies["fedstack_session"] != old  # the pre-login id is worth nothing

            r = c.get(f"/runs/{rid}/agents")
            bodies.append(r.text)
            assert r.text.count('class="revoke"') == 2 and 'id="operator-name">ops<' in r.text
            page = c.get(f"/runs/{rid}")
            bodies.append(page.text)
            assert 'id="stop-run"' in page.text
            csrf = csrf_of(r.text)

            # revoke bob: without the CSRF token refused; with it, disconnected at once
            r = c.post("/actions/agents/bob/revoke", data={"next": "/"})
            assert r.status_code == 403 and len(agg.sessions) == 2
            r = c.post(
                "/actions/agents/bob/revoke",
                data={"csrf": csrf, "next": f"/runs/{rid}/agents"},
            )
            assert r.status_code == 303 and r.headers["location"] == f"/runs/{rid}/agents"
            wait_until(lambda: {s.name for s in agg.sessions.values()} == {"alice"}, 5)
            bob.join(10)
            assert bob.refused is not None and bob.refused.code == "revoked"
            r = c.get(f"/runs/{rid}/agents")
            row = re.search(r'<tr data-agent="bob">(.*?)</tr>', r.text, re.S)
            assert row and "offline" in row.group(1) and "revoked" in row.group(1)
            r = c.post("/actions/agents/nobody/revoke", data={"csrf": csrf})
            assert r.status_code == 404

            # log out: the session ends, its token is stale
            r = c.post("/logout", data={"csrf": csrf})
            assert r.status_code == 303
            r = c.post("/actions/stop", content=f"csrf={csrf}", headers=form)
            assert r.status_code == 403 and not agg._stopped.is_set()

            # an operator whose credential is revoked after logging in: no more actions
            with httpx.Client(base_url=base, follow_redirects=False, timeout=10) as o2:
                r = o2.get("/login")
                r = o2.post("/login", data={"token": tok["old"], "csrf": csrf_of(r.text)})
                assert r.status_code == 303
                old_csrf = csrf_of(o2.get(f"/runs/{rid}").text)
                st = Store(str(db))
                try:
                    st.revoke_credential("old", role="operator")
                finally:
                    st.close()
                r = o2.post("/actions/stop", data={"csrf": old_csrf})
                assert r.status_code == 403 and "revoked" in r.text
                assert not agg._stopped.is_set()
                assert 'id="operator-name"' not in o2.get("/").text  # the session ended

            # log in again and stop the aggregator from the run page
            r = c.get("/login")
            r = c.post("/login", data={"token": tok["ops"], "csrf": csrf_of(r.text)})
            assert r.status_code == 303
            csrf = csrf_of(c.get(f"/runs/{rid}").text)
            r = c.post("/actions/stop", data={"csrf": csrf})
            assert r.status_code == 202 and 'id="stopping"' in r.text
            wait_until(agg._stopped.is_set, 5)
        alice.agent.close()  # it would wait to reconnect
        alice.join(5)

    events = dashboard_events(db)
    logins = [e for e in events if e.get("action") == "login"]
    assert [e["outcome"] for e in logins] == ["refused"] * 2 + ["accepted"] * 3
    assert [e["status"] for e in logins] == [401, 401, 303, 303, 303]
    assert logins[0]["reason"] == "unknown" or logins[0]["reason"]
    assert logins[2]["operator"] == "ops" and logins[2]["credential"]
    revokes = [e for e in events if e.get("action") == "revoke"]
    assert [(e["target"], e["outcome"], e["status"]) for e in revokes] == [
        ("bob", "refused", 403),  # no CSRF token
        ("bob", "accepted", 303),
        ("nobody", "refused", 404),
    ]
    assert "security token" in revokes[0]["reason"]
    assert revokes[1]["operator"] == "ops" and revokes[1]["disconnected"] is True
    assert revokes[1]["changed"] is True and revokes[1]["path"] == "/actions/agents/bob/revoke"
    stops = [e for e in events if e.get("action") == "stop"]
    assert [(e["operator"], e["status"]) for e in stops] == [
        (None, 403),  # after logging out
        ("old", 403),  # revoked after logging in (its sessions ended)
        ("ops", 202),
    ]
    assert "revoked" in stops[1]["reason"]
    # the operator's token: in no page, no event, no log line
    secret = tok["ops"]
    assert all(secret not in b for b in bodies)
    assert secret not in json.dumps(events)
    assert secret not in caplog.text


def test_dashboard_over_tls_sets_a_secure_session_cookie(tmp_path: Path) -> None:
    pki = make_test_pki(tmp_path / "pki")
    db = tmp_path / "tls.db"
    st = Store(str(db))
    try:
        ops = st.issue_credential("ops", role="operator")
    finally:
        st.close()
    cfg = AggregatorConfig(
        port=0,
        db=str(db),
        min_agents=1,
        tls_cert=str(pki.server_cert),
        tls_key=str(pki.server_key),
        require_tls=True,
        operator_port=0,
    )
    with aggregator_thread(cfg) as agg:
        assert agg.operator is not None and agg.operator.url.startswith("https://")
        base = f"https://localhost:{agg.operator.port}"
        with httpx.Client(base_url=base, verify=client_context(pki.ca), timeout=10) as c:
            r = c.get("/login")
            assert r.status_code == 200
            cookie = r.headers["set-cookie"]
            assert "Secure" in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie
            r = c.post("/login", data={"token": ops, "csrf": csrf_of(r.text)})
            assert r.status_code == 303 and "Secure" in r.headers["set-cookie"]
            assert 'id="operator-name">ops<' in c.get("/").text
