"""The operator REST API on the operator port: operator tokens, endpoints, HTTPS, hostile
HTTP, audit trail.

Real aggregators on 127.0.0.1: agents on the agents' port (WebSocket), the operator API on
the operator port (``operator_port``, Starlette under uvicorn). Acceptance: no token, a
wrong token, an agent's token and a revoked operator token are refused (401/403) 100 % of
the time while agents train; an operator token sees the real federation, revokes an agent
(disconnected at once, cannot come back) and shuts the aggregator down; over TLS the API
is HTTPS with the same certificate; malformed requests get 4xx and never hurt the
aggregator (on both ports); every call is audited. The agents' port answers only agents
and ``/healthz``.
"""

from __future__ import annotations

import http.client
import json
import random
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedstack import Agent, AggregatorConfig, FederationFinished, RegistrationRefused, Store
from fedstack.aggregator import Aggregator
from fedstack.errors import StoreError
from fedstack.security import PKIFiles, client_context, make_test_pki
from fedstack.store import CredentialRefused
from fedstack.testing import AggregatorProcess, aggregator_thread, free_port, read_ready

ENDPOINTS = [
    ("GET", "/api/v1/status"),
    ("GET", "/api/v1/agents"),
    ("GET", "/api/v1/rounds?limit=3"),
    ("POST", "/api/v1/agents/alice/revoke"),
    ("POST", "/api/v1/shutdown"),
]


@pytest.fixture(autouse=True)
def _no_env_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FEDSTACK_TOKEN", raising=False)
    monkeypatch.delenv("FEDSTACK_ENROLLMENT_TOKEN", raising=False)


def m(v: float) -> dict[str, np.ndarray]:
    return {"w": np.full(4, v, np.float32)}


def issue(db: Path) -> dict[str, str]:
    """Agents alice and bob, operator ops, and operator old-ops (revoked)."""
    st = Store(str(db))
    try:
        tokens = {n: st.issue_credential(n) for n in ("alice", "bob")}
        for n in ("ops", "old-ops"):
            tokens[n] = st.issue_credential(n, role="operator")
        st.revoke_credential("old-ops")
    finally:
        st.close()
    return tokens


def call(
    port: int,
    method: str,
    path: str,
    token: str | None = None,
    *,
    context: ssl.SSLContext | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any, http.client.HTTPResponse]:
    """One request: (status, decoded JSON body, response)."""
    conn: http.client.HTTPConnection
    if context is None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    else:
        conn = http.client.HTTPSConnection("localhost", port, timeout=10, context=context)
    try:
        hdrs = dict(headers or {})
        if token is not None:
            hdrs["Authorization"] = f"Bearer {token}"
        conn.request(method, path, headers=hdrs)
        resp = conn.getresponse()
        body = resp.read()
        assert resp.getheader("Content-Type") == "application/json"
        assert resp.getheader("Connection") == "close"
        return resp.status, json.loads(body), resp
    finally:
        conn.close()


def raw(port: int, data: bytes, timeout: float = 5.0, half_close: bool = True) -> bytes:
    """Send ``data`` on a plain socket (then end our side, unless not ``half_close``);
    everything the server sends until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            s.sendall(data)
            if half_close:
                s.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server may answer and stop reading before we are done
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except (TimeoutError, ConnectionResetError):
            pass
        return out


def status_of(reply: bytes) -> int:
    assert reply.startswith(b"HTTP/1.1 "), reply[:80]
    return int(reply[9:12])


def op_port(agg: Aggregator) -> int:
    """The aggregator's operator port."""
    assert agg.operator is not None
    return agg.operator.port


def audit(db: Path) -> list[dict[str, Any]]:
    st = Store(str(db))
    try:
        return [e["detail"] for e in st.events() if e["kind"] == "operator_api"]
    finally:
        st.close()


class Trainer(threading.Thread):
    """An agent training in a loop (global + 1) until told to stop or refused."""

    def __init__(self, url: str, name: str, token: str, first: bool = False, **kw: Any):
        super().__init__(daemon=True, name=f"agent-{name}")
        self.agent = Agent(url, name=name, token=token, **kw)
        if first:
            self.agent.send_initial_model(m(0))
        self.agent.start(timeout=10)
        self.stop = threading.Event()
        self.versions: list[int] = []
        self.refused: RegistrationRefused | None = None

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                gm = self.agent.wait_for_global_model(30)
                self.versions.append(self.agent.version)
                time.sleep(0.02)
                self.agent.send_trained_model({"w": gm["w"] + 1}, 10)
        except RegistrationRefused as exc:
            self.refused = exc
        except FederationFinished:
            pass
        finally:
            self.agent.close()


def wait_until(cond: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


# ---------------------------------------------------------------------------- acceptance
def test_operator_api_refuses_intruders_and_serves_operators_while_agents_train(
    tmp_path: Path,
) -> None:
    db = tmp_path / "f.db"
    tok = issue(db)
    cfg = AggregatorConfig(
        port=0, db=str(db), rounds=None, min_agents=1, heartbeat_interval=30.0, operator_port=0
    )  # the API disconnects, not the watcher
    with aggregator_thread(cfg) as agg:
        port = op_port(agg)
        assert port != agg.port
        url = f"ws://127.0.0.1:{agg.port}"
        alice = Trainer(url, "alice", tok["alice"], first=True)
        bob = Trainer(url, "bob", tok["bob"])
        alice.start()
        bob.start()
        wait_until(lambda: agg.rounds_completed >= 4 and len(agg.sessions) == 2)

        # intruders: every endpoint, many times, concurrently -> 401/403, never served
        intruders: list[tuple[str, str | None, dict[str, str] | None, int]] = [
            ("no token", None, None, 401),
            ("wrong token", tok["ops"][:-2] + "xx", None, 401),
            ("agent token", tok["alice"], None, 403),
            ("revoked operator", tok["old-ops"], None, 403),
            ("basic auth", None, {"Authorization": f"Basic {tok['ops']}"}, 401),
            ("two tokens", None, {"Authorization": f"Bearer {tok['ops']} {tok['ops']}"}, 401),
        ]
        jobs = [
            (kind, method, path, token, headers, want)
            for kind, token, headers, want in intruders
            for method, path in ENDPOINTS
            for _ in range(4)
        ]
        random.Random(0).shuffle(jobs)

        def attack(job: tuple[Any, ...]) -> tuple[str, int, int, Any]:
            kind, method, path, token, headers, want = job
            status, body, resp = call(port, method, path, token, headers=headers)
            if status == 401:
                assert resp.getheader("WWW-Authenticate") == 'Bearer realm="fedstack"'
            return kind, status, want, body

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(attack, jobs))
        assert len(results) == len(intruders) * len(ENDPOINTS) * 4 == 120
        for kind, status, want, body in results:
            assert status == want, (kind, status, body)
            assert set(body) == {"error", "hint"} and "--operator" in body["hint"], body
        # ... and nothing happened: both agents still train, the aggregator still runs
        assert {s.name for s in agg.sessions.values()} == {"alice", "bob"}
        assert not agg._stopped.is_set() and alice.refused is None and bob.refused is None

        # an operator credential is not an agent's
        with pytest.raises(RegistrationRefused) as err:
            Agent(url, name="ops", token=tok["ops"]).start(timeout=10)
        assert err.value.code == "bad-credential"

        # the operator sees the real federation
        status, st, _ = call(port, "GET", "/api/v1/status", tok["ops"])
        assert status == 200
        assert st["run_id"] == agg.run_id and st["aggregator_id"] == agg.aggregator_id
        assert st["active_agents"] == 2 and st["strategy"] == "fedavg"
        assert st["version"] >= 3 and st["round"] == st["version"] + 1
        assert st["finished"] is False and st["needed"] == 2 and st["tls"] is False
        assert {"contributors", "fedstack_version"} <= set(st)
        status, ag, _ = call(port, "GET", "/api/v1/agents", tok["ops"])
        assert status == 200 and ag["count"] == 2
        by_name = {a["name"]: a for a in ag["agents"]}
        assert set(by_name) == {"alice", "bob"}
        assert by_name["bob"]["agent_id"] == bob.agent.agent_id
        assert by_name["bob"]["address"].startswith("127.0.0.1:")
        assert abs(by_name["bob"]["last_seen"] - time.time()) < 10
        assert by_name["bob"]["known_version"] >= 3
        status, rd, _ = call(port, "GET", "/api/v1/rounds?limit=2", tok["ops"])
        assert status == 200 and rd["count"] == 2 and rd["run_id"] == agg.run_id
        last = rd["rounds"][-1]
        assert rd["rounds"][0]["round"] + 1 == last["round"] >= 2
        assert last["num_updates"] == 2 and last["num_samples"] == 20
        assert last["metrics"] is not None and last["seconds"] >= 0
        status, body, _ = call(port, "GET", "/api/v1/rounds?limit=0", tok["ops"])
        assert status == 400 and "limit" in body["hint"]

        # revoke bob: disconnected at once (the watcher would take 30 s), cannot come back
        t0 = time.monotonic()
        status, rv, _ = call(port, "POST", "/api/v1/agents/bob/revoke", tok["ops"])
        assert status == 200, rv
        assert rv == {"name": "bob", "revoked": True, "changed": True, "disconnected": True}
        bob.join(10)
        assert not bob.is_alive() and bob.refused is not None
        assert bob.refused.code == "revoked" and time.monotonic() - t0 < 5
        assert {s.name for s in agg.sessions.values()} == {"alice"}
        with pytest.raises(RegistrationRefused) as err:
            Agent(url, name="bob", token=tok["bob"]).start(timeout=10)
        assert err.value.code == "revoked"
        status, _, _ = call(port, "POST", "/api/v1/agents/nobody/revoke", tok["ops"])
        assert status == 404
        status, _, _ = call(port, "POST", "/api/v1/agents/ops/revoke", tok["ops"])
        assert status == 404  # an operator is not an agent
        status, _, _ = call(port, "GET", "/api/v1/agents/bob/revoke", tok["ops"])
        assert status == 405
        # the federation goes on with alice
        done = agg.rounds_completed
        wait_until(lambda: agg.rounds_completed >= done + 2)
        status, st, _ = call(port, "GET", "/api/v1/status", tok["ops"])
        assert st["active_agents"] == 1 and st["needed"] == 1
        alice.stop.set()
        alice.join(30)
        assert alice.refused is None and alice.versions == sorted(alice.versions)
        run_id = agg.run_id

    events = audit(db)
    assert len(events) == 120 + 9
    refused = Counter((e["reason"], e["status"]) for e in events if e["outcome"] == "refused")
    assert refused[("no-token", 401)] == 20 and refused[("wrong-token", 401)] == 20
    assert refused[("agent-credential", 403)] == 20 and refused[("revoked", 403)] == 20
    assert refused[("malformed-authorization", 401)] == 40
    agent_tries = [e for e in events if e.get("reason") == "agent-credential"]
    assert all(e["agent"] == "alice" and e["operator"] is None for e in agent_tries)
    revoked = [e for e in events if e["outcome"] == "accepted" and "revoke" in e["path"]]
    assert len(revoked) == 1
    assert revoked[0]["operator"] == "ops" and revoked[0]["disconnected"] is True
    assert revoked[0]["address"].startswith("127.0.0.1:") and revoked[0]["method"] == "POST"
    assert revoked[0]["credential"]
    st2 = Store(str(db))
    try:
        checks = [e for e in st2.events(run_id) if e["detail"].get("stage") == "operator-revoke"]
        assert [e["detail"]["name"] for e in checks] == ["bob"]
        stored = b"".join(p.read_bytes() for p in tmp_path.glob("f.db*") if p.is_file())
        assert tok["ops"].encode() not in stored
    finally:
        st2.close()


def test_shutdown_stops_the_cli_aggregator(tmp_path: Path) -> None:
    db = tmp_path / "cli.db"
    tok = issue(db)
    port = free_port()
    agg = AggregatorProcess(
        tmp_path, "--db", str(db), "--min-agents", "1", "--operator-port", str(port)
    )
    agg.start()
    try:
        assert read_ready(tmp_path / "aggregator-0.ready")["operator_port"] == port
        a = Agent(agg.url, name="alice", token=tok["alice"])
        a.send_initial_model(m(0))
        a.start(timeout=10)
        a.wait_for_global_model(10)
        status, body, _ = call(port, "POST", "/api/v1/shutdown", tok["alice"])
        assert status == 403
        status, body, _ = call(port, "POST", "/api/v1/shutdown", tok["ops"])
        assert status == 202 and body["status"] == "stopping"
        assert agg.proc is not None
        assert agg.proc.wait(15) == 0  # the agent connected did not hold the stop up
        a.close()
    finally:
        agg.close()
    assert "operator ops requested shutdown" in agg.log_text()
    events = audit(db)
    assert [(e["path"], e["status"], e["operator"]) for e in events] == [
        ("/api/v1/shutdown", 403, None),
        ("/api/v1/shutdown", 202, "ops"),
    ]


# ---------------------------------------------------------------------------- TLS
@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKIFiles:
    return make_test_pki(tmp_path_factory.mktemp("pki"))


def test_https_operator_api_with_the_wss_certificate(tmp_path: Path, pki: PKIFiles) -> None:
    db = tmp_path / "tls.db"
    tok = issue(db)
    cfg = AggregatorConfig(
        port=0,
        db=str(db),
        min_agents=1,
        tls_cert=str(pki.server_cert),
        tls_key=str(pki.server_key),
        require_tls=True,
        register_timeout=2.0,
        operator_port=0,
    )
    ctx = client_context(pki.ca)
    with aggregator_thread(cfg) as agg:
        port = op_port(agg)
        assert agg.operator is not None and agg.operator.url.startswith("https://")
        alice = Agent(f"wss://localhost:{agg.port}", name="alice", token=tok["alice"], ca=pki.ca)
        alice.send_initial_model(m(0))
        alice.start(timeout=10)
        for p in (port, agg.port):  # both ports speak TLS only
            status, body, _ = call(p, "GET", "/healthz", context=ctx)
            assert (status, body) == (200, {"status": "ok"})
        status, body, _ = call(port, "GET", "/api/v1/status", tok["ops"], context=ctx)
        assert status == 200 and body["tls"] is True and body["active_agents"] == 1
        status, body, _ = call(port, "GET", "/api/v1/agents", tok["ops"], context=ctx)
        assert [a["name"] for a in body["agents"]] == ["alice"]
        for token in (None, tok["alice"], tok["old-ops"]):
            status, _, _ = call(port, "GET", "/api/v1/status", token, context=ctx)
            assert status in (401, 403)
        # a client that does not trust the aggregator's CA does not get through
        with pytest.raises(ssl.SSLCertVerificationError):
            call(port, "GET", "/api/v1/status", tok["ops"], context=ssl.create_default_context())
        # plain HTTP on a TLS port gets no HTTP answer at all
        for p in (port, agg.port):
            t0 = time.monotonic()
            reply = raw(
                p,
                b"GET /api/v1/status HTTP/1.1\r\nHost: x\r\n"
                b"Authorization: Bearer " + tok["ops"].encode() + b"\r\n\r\n",
            )
            assert not reply.startswith(b"HTTP/") and time.monotonic() - t0 < 5
            assert b"run_id" not in reply
        # a client that never starts its TLS handshake is dropped at the deadline
        t0 = time.monotonic()
        assert raw(port, b"", timeout=10, half_close=False) == b""
        assert 1.5 < time.monotonic() - t0 < 4
        # the agent was not disturbed
        gm = alice.wait_for_global_model(10)
        alice.send_trained_model({"w": gm["w"] + 1}, 1)
        np.testing.assert_array_equal(alice.wait_for_global_model(10)["w"], 1)
        alice.close()


# ---------------------------------------------------------------------------- hostile HTTP
@pytest.fixture
def bare_aggregator(tmp_path: Path) -> Iterator[Aggregator]:
    """An aggregator (agents' auth off) whose store has no operator credential yet."""
    cfg = AggregatorConfig(
        port=0,
        db=str(tmp_path / "h.db"),
        auth="off",
        min_agents=1,
        register_timeout=1.0,
        operator_port=0,
    )
    with aggregator_thread(cfg) as agg:
        yield agg


def test_malformed_and_oversize_requests_get_4xx_and_never_hurt_the_aggregator(
    bare_aggregator: Aggregator, tmp_path: Path
) -> None:
    agg = bare_aggregator
    port, agents_port = op_port(agg), agg.port
    # no operator credential issued yet: every API call is refused, saying how to issue one
    for method, path in ENDPOINTS:
        status, body, _ = call(port, method, path, "x" * 43)
        assert status == 401 and "fedstack credentials add" in body["hint"]
    head = b"POST /api/v1/shutdown HTTP/1.1\r\nHost: x\r\n"
    rng = random.Random(7)
    # the agents' port: fedstack's own request-head parser (it serves the WebSocket
    # handshake and /healthz; everything else is a 404 now: the API moved)
    cases: list[tuple[str, bytes, int]] = [
        ("garbage", b"GARBAGE\r\n\r\n", 400),
        ("no version", b"GET /healthz\r\n\r\n", 400),
        ("HTTP/2 line", b"GET /healthz HTTP/2.0\r\n\r\n", 400),
        ("lowercase method", b"get /healthz HTTP/1.1\r\n\r\n", 400),
        ("asterisk target", b"OPTIONS * HTTP/1.1\r\n\r\n", 400),
        ("bad header", b"GET /healthz HTTP/1.1\r\nno colon here\r\n\r\n", 400),
        ("space in header name", b"GET /healthz HTTP/1.1\r\nBad Name: 1\r\n\r\n", 400),
        ("folded header", b"GET /healthz HTTP/1.1\r\nX: 1\r\n continued\r\n\r\n", 400),
        ("control char", b"GET /healthz HTTP/1.1\r\nX: a\x00b\r\n\r\n", 400),
        ("two hosts", b"GET /healthz HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
        (
            "too many headers",
            b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"X: 1\r\n" * 150 + b"\r\n",
            431,
        ),
        ("head too large", b"GET /healthz HTTP/1.1\r\nX: " + b"a" * 40000, 431),
        ("small body", head + b"Content-Length: 5\r\n\r\nhello", 413),
        ("big body", head + b"Content-Length: 600000\r\n\r\n" + b"z" * 600000, 413),
        ("huge length", head + b"Content-Length: 99999999999999999999\r\n\r\n", 400),
        ("bad length", head + b"Content-Length: -1\r\n\r\n", 400),
        ("two lengths", head + b"Content-Length: 0\r\nContent-Length: 0\r\n\r\n", 400),
        ("chunked", head + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", 411),
        ("healthz body", b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc", 413),
        ("healthz post", b"POST /healthz HTTP/1.1\r\nHost: x\r\n\r\n", 405),
        ("unknown path", b"GET /../../etc/passwd HTTP/1.1\r\nHost: x\r\n\r\n", 404),
        ("the API moved", b"GET /api/v1/status HTTP/1.1\r\nHost: x\r\n\r\n", 404),
        ("metrics are elsewhere", b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", 404),
        # RFC 9112 3.2: an HTTP/1.1 request without Host is a 400
        ("no host", b"GET /healthz HTTP/1.1\r\n\r\n", 400),
        (
            "more than 20 query fields",
            b"GET /healthz?"
            + b"&".join(b"a%d=1" % i for i in range(30))
            + b" HTTP/1.1\r\nHost: x\r\n\r\n",
            400,
        ),
        ("bracket target", b"GET //[ HTTP/1.1\r\nHost: x\r\n\r\n", 404),
        ("absolute bracket target", b"GET http://[ HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        ("bad method", b"G\x01T /healthz HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        ("binary", bytes(rng.randrange(256) for _ in range(3000)) + b"\r\n\r\n", 400),
    ]
    cases += [
        (
            f"random {i}",
            rng.randbytes(rng.randint(1, 2000)).replace(b"\r\n\r\n", b"") + b"\r\n\r\n",
            400,
        )
        for i in range(20)
    ]
    # the operator port: uvicorn's h11 parser, then the API's own refusals (audited)
    operator_cases: list[tuple[str, bytes, int]] = [
        ("garbage", b"GARBAGE\r\n\r\n", 400),
        ("no version", b"GET /healthz\r\n\r\n", 400),
        ("head too large", b"GET /healthz HTTP/1.1\r\nX: " + b"a" * 40000, 400),
        ("small body", head + b"Content-Length: 5\r\n\r\nhello", 413),
        ("big body", head + b"Content-Length: 600000\r\n\r\n" + b"z" * 600000, 413),
        ("huge length", head + b"Content-Length: 99999999999999999999\r\n\r\n", 400),
        ("bad length", head + b"Content-Length: -1\r\n\r\n", 400),
        ("chunked", head + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", 411),
        ("no host", b"GET /healthz HTTP/1.1\r\n\r\n", 400),
        ("healthz post", b"POST /healthz HTTP/1.1\r\nHost: x\r\n\r\n", 405),
        ("no auth, API path", b"GET /api/../../etc/passwd HTTP/1.1\r\nHost: x\r\n\r\n", 401),
        ("unknown path", b"GET /../../etc/passwd HTTP/1.1\r\nHost: x\r\n\r\n", 404),
        ("no auth, bad method", b"FOO /api/v1/status HTTP/1.1\r\nHost: x\r\n\r\n", 401),
        ("non-ASCII path", b"GET /api/v1/\xff HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        ("binary", bytes(rng.randrange(256) for _ in range(3000)) + b"\r\n\r\n", 400),
    ]
    operator_cases += [
        (
            f"random {i}",
            b"\x00" + rng.randbytes(rng.randint(1, 2000)).replace(b"\r\n\r\n", b"") + b"\r\n\r\n",
            400,
        )
        for i in range(10)
    ]

    def send(job: tuple[int, tuple[str, bytes, int]]) -> tuple[int, str, int, int]:
        p, (name, data, want) = job
        return p, name, status_of(raw(p, data)), want

    jobs = [(agents_port, c) for c in cases] + [(port, c) for c in operator_cases]
    with ThreadPoolExecutor(8) as pool:
        for p, name, got, want in pool.map(send, jobs):
            assert got == want, ("operator" if p == port else "agents", name, got)
    # a slow-loris request is dropped at the head deadline, unanswered, on either port
    for p in (agents_port, port):
        t0 = time.monotonic()
        assert raw(p, b"GET /healthz HTTP/1.1\r\nHost: x\r\n", timeout=5, half_close=False) == b""
        assert time.monotonic() - t0 < 3
    # the aggregator is unharmed: both ports answer, an agent federates
    for p in (agents_port, port):
        status, body, _ = call(p, "GET", "/healthz")
        assert (status, body) == (200, {"status": "ok"})
    a = Agent(f"ws://127.0.0.1:{agents_port}", name="a")
    a.send_initial_model(m(1))
    a.start(timeout=10)
    gm = a.wait_for_global_model(10)
    a.send_trained_model({"w": gm["w"] + 1}, 1)
    np.testing.assert_array_equal(a.wait_for_global_model(10)["w"], 2)
    # an operator token issued while the aggregator runs works at once
    st = Store(str(tmp_path / "h.db"))
    try:
        token = st.issue_credential("ops", role="operator")
    finally:
        st.close()
    status, body, _ = call(port, "GET", "/api/v1/agents", token)
    assert status == 200 and [x["name"] for x in body["agents"]] == ["a"]
    a.close()
    kinds = Counter((e.get("reason"), e["status"]) for e in audit(tmp_path / "h.db"))
    assert kinds[("wrong-token", 401)] == len(ENDPOINTS)
    assert kinds[("request body too large", 413)] == 2  # the parsers' 400s are not
    assert kinds[("length required", 411)] == 1
    assert kinds[("malformed Content-Length", 400)] == 1
    assert kinds[("no-token", 401)] == 2


def test_operator_surface_is_opt_in_and_its_api_can_be_turned_off(tmp_path: Path) -> None:
    from fedstack.cli.aggregator import parse_aggregator_args
    from fedstack.errors import ConfigError

    assert AggregatorConfig().operator_port is None  # no operator surface unless asked
    assert AggregatorConfig().operator_api is True
    assert AggregatorConfig.from_mapping({"operator_api": "false"}).operator_api is False
    assert parse_aggregator_args(["--no-operator-api"]).operator_api is False
    assert parse_aggregator_args([]).operator_api is True
    cfg = parse_aggregator_args(["--operator-host", "0.0.0.0", "--operator-port", "9100"])
    assert (cfg.operator_host, cfg.operator_port) == ("0.0.0.0", 9100)
    with pytest.raises(ConfigError, match="operator_port"):
        AggregatorConfig(port=9000, operator_port=9000)
    with pytest.raises(ConfigError, match="operator_port"):
        AggregatorConfig(transport="inproc", operator_port=0)
    with pytest.raises(ConfigError, match="operator_port"):
        AggregatorConfig(operator_port=70000)

    # the API off: the operator port serves metrics only
    cfg = AggregatorConfig(
        port=0, db=str(tmp_path / "off.db"), auth="off", operator_api=False, operator_port=0
    )
    with aggregator_thread(cfg) as agg:
        status, body, _ = call(op_port(agg), "GET", "/api/v1/status")
        assert status == 404 and "error" in body
        conn = http.client.HTTPConnection("127.0.0.1", op_port(agg), timeout=10)
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        assert resp.status == 200 and b"fedstack_rounds_completed_total" in resp.read()
        conn.close()
        a = Agent(f"ws://127.0.0.1:{agg.port}", name="a")
        a.send_initial_model(m(0))
        a.start(timeout=10)  # agents are served as before
        a.close()
    assert audit(tmp_path / "off.db") == []
    # no operator port: nothing listens for operators; the agents' port has /healthz only
    cfg = AggregatorConfig(port=0, db=str(tmp_path / "none.db"), auth="off")
    with aggregator_thread(cfg) as agg:
        assert agg.operator is None
        reply = raw(agg.port, b"GET /api/v1/status HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status_of(reply) == 404 and b"run_id" not in reply
        status, body, _ = call(agg.port, "GET", "/healthz")
        assert (status, body) == (200, {"status": "ok"})


# ---------------------------------------------------------------------------- store
def test_store_operator_credentials(tmp_path: Path) -> None:
    st = Store(str(tmp_path / "s.db"))
    try:
        ops = st.issue_credential("ops", role="operator")
        agent = st.issue_credential("site", role="agent")
        who = st.authenticate_operator(ops, "1.2.3.4:5")
        assert who.name == "ops" and who.fingerprint and who.fingerprint not in ops

        def refused(token: str | None) -> str:
            with pytest.raises(CredentialRefused) as err:
                st.authenticate_operator(token, "x")
            return err.value.reason

        assert refused(None) == "no-token" and refused("") == "no-token"
        assert refused(ops + "x") == "wrong-token"
        assert refused(agent) == "agent-credential"
        for auth in ("required", "off"):  # an operator never joins a federation
            for token in (ops, None, agent):
                with pytest.raises(CredentialRefused) as err:
                    st.authenticate("ops", token, "x", auth=auth)
                assert err.value.code in ("bad-credential", "auth-required")
        assert st.authenticate("site", agent, "x", auth="required").source == "issued"
        with pytest.raises(StoreError, match="operator"):
            st.issue_credential("ops")  # the name belongs to an operator
        with pytest.raises(StoreError, match="agent"):
            st.issue_credential("site", role="operator")
        with pytest.raises(StoreError):
            st.revoke_credential("ops", role="agent")
        rows = {r["name"]: r for r in st.list_credentials()}
        assert (rows["ops"]["role"], rows["site"]["role"]) == ("operator", "agent")
        assert rows["ops"]["last_address"] == "1.2.3.4:5"
        assert st.revoke_credential("ops")
        assert refused(ops) == "revoked"
        fresh = st.issue_credential("ops", role="operator")  # re-issued after revocation
        assert st.authenticate_operator(fresh, "x").name == "ops"
        assert refused(ops) == "wrong-token"
    finally:
        st.close()


def test_credentials_cli_operator_role(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fedstack.cli.main import main as cli_main

    db = str(tmp_path / "c.db")
    assert cli_main(["credentials", "add", "ops", "--operator", "--db", db]) == 0
    out = capsys.readouterr()
    token = out.out.strip()
    assert len(token) >= 40 and "Bearer" in out.err
    assert cli_main(["credentials", "add", "site", "--db", db, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["role"] == "agent"
    assert cli_main(["credentials", "add", "ops", "--db", db]) == 2  # an operator's name
    capsys.readouterr()
    assert cli_main(["credentials", "list", "--db", db, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(c["name"], c["role"]) for c in listed] == [("ops", "operator"), ("site", "agent")]
    assert token not in json.dumps(listed)
    assert cli_main(["credentials", "list", "--db", db]) == 0
    assert "operator" in capsys.readouterr().out
    assert cli_main(["credentials", "revoke", "ops", "--db", db]) == 0
    st = Store(db)
    try:
        with pytest.raises(CredentialRefused):
            st.authenticate_operator(token, "x")
    finally:
        st.close()


def test_store_errors_answer_503_without_internals(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 16 finding 6: a store that fails (e.g. PostgreSQL restarting) makes the operator
    API answer 503 with a retry hint, never 500 and never the database's own text."""
    db = tmp_path / "f6.db"
    tokens = issue(db)
    cfg = AggregatorConfig(port=0, db=str(db), auth="required", operator_port=0)
    with aggregator_thread(cfg) as agg:
        assert agg.store is not None
        status, _, _ = call(op_port(agg), "GET", "/api/v1/status", tokens["ops"])
        assert status == 200

        import sqlalchemy.exc

        from fedstack.store.credentials import AgentRows

        def failing(*args: Any, **kwargs: Any) -> Any:  # what psycopg raises mid-restart
            raise sqlalchemy.exc.OperationalError(
                "SELECT token_hash FROM credentials WHERE token_hash = %(h)s",
                {"h": "secret-hash"},
                Exception("server closed the connection unexpectedly"),
            )

        monkeypatch.setattr(AgentRows, "by_hash", failing)
        status, body, _ = call(op_port(agg), "GET", "/api/v1/status", tokens["ops"])
        assert status == 503
        text = json.dumps(body)
        assert "SELECT" not in text and "secret-hash" not in text and "closed" not in text
        monkeypatch.undo()
        status, _, _ = call(op_port(agg), "GET", "/api/v1/status", tokens["ops"])
        assert status == 200  # recovered by itself once the store answers again
