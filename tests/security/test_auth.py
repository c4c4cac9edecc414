"""Agent authentication: issued credentials, enrollment, revocation, audit trail.

Real aggregators on 127.0.0.1; hostile registrations go over raw connections (many at once,
fast) and through the Agent API. Acceptance: unauthenticated, wrong-token, impersonating,
revoked and unknown agents are refused 100 % of the time while a legitimate agent trains.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedstack import Agent, AggregatorConfig, FederationFinished, Store
from fedstack.errors import ConfigError, ConnectionClosed, RegistrationRefused, StoreError
from fedstack.testing import aggregator_thread
from fedstack.transport import connect
from fedstack.wire import Error, Participate, decode, encode

ATTEMPTS = 50


@pytest.fixture(autouse=True)
def _no_env_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FEDSTACK_TOKEN", raising=False)
    monkeypatch.delenv("FEDSTACK_ENROLLMENT_TOKEN", raising=False)


def m(v: float) -> dict[str, np.ndarray]:
    return {"w": np.full(4, v, np.float32)}


def issue(db: Path, *names: str, revoke: tuple[str, ...] = ()) -> dict[str, str]:
    st = Store(str(db))
    try:
        tokens = {n: st.issue_credential(n) for n in names}
        for n in revoke:
            st.revoke_credential(n)
    finally:
        st.close()
    return tokens


async def attempt(
    url: str, name: str, token: str | None = None, enrollment: str | None = None
) -> tuple[Any, bool]:
    """One registration over a raw connection: (first reply, whether it was then closed)."""
    conn = await connect(url, max_message_bytes=1 << 20)
    try:
        conn.write(encode(Participate(agent_name=name, token=token, enrollment=enrollment)))
        await conn.drain()
        reply = decode(await asyncio.wait_for(conn.recv(), 10))
        try:
            await asyncio.wait_for(conn.recv(), 5)
            closed = False
        except ConnectionClosed:
            closed = True
        except TimeoutError:
            closed = False
        return reply, closed
    finally:
        conn.abort()


def assert_all_refused(results: list[tuple[Any, bool]], code: str) -> None:
    assert len(results) == ATTEMPTS
    for reply, closed in results:
        assert isinstance(reply, Error), reply  # never a Welcome
        assert reply.code == code and reply.fatal, reply
        assert closed


def refusals(store: Store, run_id: str) -> list[dict[str, Any]]:
    return [
        e["detail"]
        for e in store.events(run_id)
        if e["kind"] == "refused" and e["detail"].get("stage") == "auth"
    ]


def train(agent: Agent, out: dict[str, Any], pause: float = 0.0) -> None:
    versions = []
    while True:
        try:
            gm = agent.wait_for_global_model(60)
        except FederationFinished:
            break
        versions.append(agent.version)
        time.sleep(pause)
        agent.send_trained_model({"w": gm["w"] + 1}, 1)
    out["versions"] = versions
    out["final"] = gm["w"]


# ---------------------------------------------------------------------------- acceptance
def test_hostile_registrations_refused_100_percent_while_legit_agent_trains(tmp_path: Path) -> None:
    db = tmp_path / "f.db"
    tok = issue(db, "alice", "bob", "carol", revoke=("carol",))
    cfg = AggregatorConfig(
        port=0, db=str(db), rounds=5, min_agents=1, finish_grace=3, heartbeat_interval=0.5
    )
    assert cfg.auth == "required"  # the default
    with aggregator_thread(cfg) as agg:
        url = f"ws://127.0.0.1:{agg.port}"
        alice = Agent(url, name="alice", token=tok["alice"])
        alice.send_initial_model(m(0))
        alice.start(timeout=10)
        alice_id = alice.agent_id
        out: dict[str, Any] = {}
        trainer = threading.Thread(target=train, args=(alice, out, 0.1))
        trainer.start()

        async def attacks() -> dict[str, list[tuple[Any, bool]]]:
            def many(**kw: Any) -> Any:
                return asyncio.gather(
                    *(
                        attempt(url, **{k: v(i) if callable(v) else v for k, v in kw.items()})
                        for i in range(ATTEMPTS)
                    )
                )

            return {
                "unauthenticated": await many(name="alice"),
                "wrong-token": await many(name="alice", token=lambda i: secrets.token_urlsafe(32)),
                "impersonating": await many(name="alice", token=tok["bob"]),
                "revoked": await many(name="carol", token=tok["carol"]),
                "unknown": await many(
                    name=lambda i: f"mallory-{i}", token=lambda i: secrets.token_urlsafe(32)
                ),
                "unknown-no-token": await many(name=lambda i: f"eve-{i}"),
            }

        results = asyncio.run(attacks())
        # the same through the Agent API: start() raises instead of retrying
        cases: list[tuple[dict[str, Any], str]] = [
            ({}, "auth-required"),
            ({"token": tok["bob"]}, "bad-credential"),
            ({"token": "guess"}, "bad-credential"),
        ]
        for kwargs, code in cases:
            intruder = Agent(url, name="alice", **kwargs)
            with pytest.raises(RegistrationRefused) as err:
                intruder.start(timeout=10)
            assert err.value.code == code
            intruder.close()
        trainer.join(60)
        alice.close()
        assert agg.state.version == 5
    assert_all_refused(results["unauthenticated"], "auth-required")
    assert_all_refused(results["wrong-token"], "bad-credential")
    assert_all_refused(results["impersonating"], "bad-credential")
    assert_all_refused(results["revoked"], "revoked")
    assert_all_refused(results["unknown"], "bad-credential")
    assert_all_refused(results["unknown-no-token"], "auth-required")
    # the legitimate agent trained every round, as the same agent
    assert out["versions"] == [0, 1, 2, 3, 4, 5]
    np.testing.assert_array_equal(out["final"], 5)
    st = Store(str(db))
    try:
        assert [c["name"] for c in st.list_credentials()] == ["alice", "bob", "carol"]
        run_id = st.latest_run_id()
        assert run_id is not None
        # the audit trail: every refused attempt with address, name, reason and credential
        events = refusals(st, run_id)
        assert Counter(e["reason"] for e in events) == {
            "no-token": 2 * ATTEMPTS + 1,  # unauthenticated, unknown without token, Agent API
            "wrong-token": 2 * ATTEMPTS + 2,  # wrong token, impersonation, Agent API
            "revoked": ATTEMPTS,
            "unknown-agent": ATTEMPTS,
        }
        assert all(e["address"].startswith("127.0.0.1:") and e["name"] for e in events)
        bob_fp = next(c["credential"] for c in st.list_credentials() if c["name"] == "bob")
        impersonations = [e for e in events if e["name"] == "alice" and e["credential"] == bob_fp]
        assert len(impersonations) == ATTEMPTS + 1  # bob's credential, presented as alice
        accepted = [e for e in st.events(run_id) if e["kind"] == "authenticated"]
        assert [(e["agent_id"], e["detail"]["name"], e["detail"]["source"]) for e in accepted] == [
            (alice_id, "alice", "issued")
        ]
    finally:
        st.close()


def test_enrollment_registers_new_names_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = tmp_path / "f.db"
    tok = issue(db, "alice")
    enroll = secrets.token_urlsafe(24)
    cfg = AggregatorConfig(
        port=0, db=str(db), rounds=None, enrollment_token=enroll, heartbeat_interval=0.5
    )
    with aggregator_thread(cfg) as agg:
        url = f"ws://127.0.0.1:{agg.port}"
        newbie = Agent(url, name="newbie", enrollment_token=enroll)
        newbie.send_initial_model(m(0))
        newbie.start(timeout=10)
        assert newbie.token is not None and len(newbie.token) >= 40  # made its own
        first_id = newbie.agent_id
        newbie.close()
        again = Agent(url, name="newbie", token=newbie.token)  # no enrollment needed now
        again.start(timeout=10)
        assert again.agent_id == first_id
        again.close()
        monkeypatch.setenv("FEDSTACK_ENROLLMENT_TOKEN", enroll)  # the environment works too
        env_agent = Agent(url, name="from-env")
        env_agent.start(timeout=10)
        env_agent.close()
        monkeypatch.delenv("FEDSTACK_ENROLLMENT_TOKEN")

        async def refused() -> dict[str, tuple[Any, bool]]:
            other = secrets.token_urlsafe(32)
            return {
                # enrollment never takes over a name that exists
                "takeover-enrolled": await attempt(url, "newbie", other, enroll),
                "takeover-issued": await attempt(url, "alice", other, enroll),
                "wrong-enrollment": await attempt(url, "mallory", other, "x" * 32),
                "no-own-token": await attempt(url, "mallory", None, enroll),
                "weak-own-token": await attempt(url, "mallory", "short", enroll),
            }

        out = asyncio.run(refused())
        alice = Agent(url, name="alice", token=tok["alice"])  # issued credentials still work
        alice.start(timeout=10)
        alice.close()
    codes = {k: (v[0].code if isinstance(v[0], Error) else v[0]) for k, v in out.items()}
    assert codes == {
        "takeover-enrolled": "bad-credential",
        "takeover-issued": "bad-credential",
        "wrong-enrollment": "bad-credential",
        "no-own-token": "auth-required",
        "weak-own-token": "weak-token",
    }
    st = Store(str(db))
    try:
        creds = {c["name"]: c for c in st.list_credentials()}
        assert {n: c["source"] for n, c in creds.items()} == {
            "alice": "issued",
            "newbie": "enrolled",
            "from-env": "enrolled",
        }
        run_id = st.latest_run_id()
        assert run_id is not None
        reasons = {
            e["name"]: e["reason"]
            for e in refusals(st, run_id)
            if e["name"] == "mallory" and e["enrollment"] == "invalid"
        }
        assert reasons == {"mallory": "bad-enrollment"}
        accepted = [e["detail"] for e in st.events(run_id) if e["kind"] == "authenticated"]
        assert [(e["name"], e["source"], e["new"], e["enrollment"]) for e in accepted[:2]] == [
            ("newbie", "enrolled", True, "valid"),
            ("newbie", "enrolled", False, "none"),
        ]
        stored = b"".join(p.read_bytes() for p in tmp_path.glob("f.db*") if p.is_file())
        for secret in (enroll, tok["alice"], newbie.token):
            assert secret.encode() not in stored  # only hashes, never tokens
        assert enroll not in str(st.get_run(run_id).config)
    finally:
        st.close()


def test_revocation_disconnects_within_seconds_and_reconnect_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "f.db"
    tok = issue(db, "alice", "bob")
    cfg = AggregatorConfig(port=0, db=str(db), rounds=None, min_agents=1, heartbeat_interval=0.5)
    with aggregator_thread(cfg) as agg:
        url = f"ws://127.0.0.1:{agg.port}"
        alice = Agent(url, name="alice", token=tok["alice"])
        alice.send_initial_model(m(0))
        alice.start(timeout=10)
        bob = Agent(url, name="bob", token=tok["bob"])
        bob.start(timeout=10)
        bob.wait_for_global_model(10)
        bob_id = bob.agent_id
        assert len(agg.sessions) == 2
        st = Store(str(db))
        t0 = time.monotonic()
        assert st.revoke_credential("bob")
        assert not st.revoke_credential("bob")  # already revoked
        with pytest.raises(RegistrationRefused) as err:
            bob.wait_for_global_model(10)
        elapsed = time.monotonic() - t0
        assert err.value.code == "revoked" and elapsed < 3.0, elapsed
        assert [r.code for r in bob.refusals] == ["revoked"]
        deadline = time.monotonic() + 3
        while bob_id in agg.sessions and time.monotonic() < deadline:
            time.sleep(0.02)
        assert set(agg.sessions) == {alice.agent_id}
        bob.close()
        again = Agent(url, name="bob", token=tok["bob"])
        with pytest.raises(RegistrationRefused) as err:
            again.start(timeout=10)
        assert err.value.code == "revoked"
        again.close()
        # the federation goes on without bob
        gm = alice.wait_for_global_model(10)
        alice.send_trained_model({"w": gm["w"] + 1}, 1)
        np.testing.assert_array_equal(alice.wait_for_global_model(10)["w"], 1)
        # a replaced credential disconnects the agent holding the old one, too
        new_alice = st.issue_credential("alice", replace=True)
        with pytest.raises(RegistrationRefused) as err:
            alice.wait_for_global_model(10)
        assert err.value.code == "revoked"
        alice.close()
        fresh = Agent(url, name="alice", token=new_alice)
        fresh.start(timeout=10)
        fresh.close()
        run_id = agg.run_id
    try:
        kinds = [(e["kind"], e["detail"].get("reason")) for e in st.events(run_id, deployment=True)]
        assert ("credential_revoked", None) in kinds
        assert ("refused", "revoked") in kinds  # the disconnect and the refused reconnect
        checks = [e for e in st.events(run_id) if e["detail"].get("stage") == "credential-check"]
        assert [(e["agent_id"], e["detail"]["reason"]) for e in checks] == [
            (bob_id, "revoked"),
            (alice.agent_id, "replaced"),
        ]
    finally:
        st.close()


# ---------------------------------------------------------------------------- CLI
def test_credentials_cli_round_trip_and_cli_aggregator_requires_auth(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json
    import subprocess
    import sys

    from fedstack.testing import AggregatorProcess

    db = tmp_path / "cli.db"

    def fedstack(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "fedstack", *args], capture_output=True, text=True, timeout=60
        )

    add = fedstack("credentials", "add", "site-1", "--db", str(db))
    assert add.returncode == 0, add.stderr
    token = add.stdout.strip()
    assert len(token) >= 40 and "FEDSTACK_TOKEN" in add.stderr
    again = fedstack("credentials", "add", "site-1", "--db", str(db))
    assert again.returncode == 2 and "already has a credential" in again.stderr
    listed = json.loads(fedstack("credentials", "list", "--db", str(db), "--json").stdout)
    assert [(c["name"], c["source"], c["revoked"]) for c in listed] == [("site-1", "issued", False)]
    assert token not in json.dumps(listed)
    # the aggregator CLI requires authentication by default; FEDSTACK_TOKEN is the credential
    agg = AggregatorProcess(tmp_path, "--db", str(db), "--rounds", "1", "--finish-grace", "2")
    agg.start()
    try:
        with pytest.raises(RegistrationRefused) as err:
            Agent(agg.url, name="site-1").start(timeout=10)
        assert err.value.code == "auth-required"
        monkeypatch.setenv("FEDSTACK_TOKEN", token)
        a = Agent(agg.url, name="site-1")
        a.send_initial_model(m(0))
        a.start(timeout=10)
        gm = a.wait_for_global_model(10)
        a.send_trained_model({"w": gm["w"] + 2}, 1)
        np.testing.assert_array_equal(a.wait_for_global_model(10)["w"], 2)
        a.close()
        assert agg.wait(30) == 0
    finally:
        agg.close()
    revoke = fedstack("credentials", "revoke", "site-1", "--db", str(db))
    assert revoke.returncode == 0 and "revoked" in revoke.stdout
    listed = json.loads(fedstack("credentials", "list", "--db", str(db), "--json").stdout)
    assert listed[0]["revoked"] is True
    rotated = fedstack("credentials", "add", "site-1", "--db", str(db), "--json")
    new_token = json.loads(rotated.stdout)["token"]
    assert new_token != token
    events = json.loads(fedstack("db", "events", "--db", str(db), "--json").stdout)
    kinds = [e["kind"] for e in events]
    for kind in ("credential_issued", "authenticated", "refused", "credential_revoked"):
        assert kind in kinds, kinds
    stored = b"".join(p.read_bytes() for p in tmp_path.glob("cli.db*") if p.is_file())
    assert token.encode() not in stored and new_token.encode() not in stored


def test_auth_config_and_cli_defaults() -> None:
    from fedstack.cli.aggregator import parse_aggregator_args

    assert AggregatorConfig().auth == "required"
    assert AggregatorConfig.from_mapping({"auth": "off"}).auth == "off"
    with pytest.raises(ConfigError):
        AggregatorConfig(auth="maybe")
    with pytest.raises(ConfigError):
        AggregatorConfig(enrollment_token="short")
    assert "enroll-me" not in repr(AggregatorConfig(enrollment_token="enroll-me-please-0123"))
    assert parse_aggregator_args([]).auth == "required"  # no flag: the config's default
    assert parse_aggregator_args(["--auth", "off"]).auth == "off"


def test_aggregator_flags_override_the_config_file(tmp_path: Path) -> None:
    from fedstack.cli.aggregator import parse_aggregator_args

    conf = tmp_path / "agg.toml"
    conf.write_text(
        "[aggregator]\nthreshold = 0.5\nupload_budget_bytes = 1000\ninline_blob_bytes = 0\n"
    )
    cfg = parse_aggregator_args(["--config", str(conf)])
    assert (cfg.threshold, cfg.upload_budget_bytes, cfg.inline_blob_bytes) == (0.5, 1000, 0)
    cfg = parse_aggregator_args(
        [
            "--config",
            str(conf),
            "--threshold",
            "0.75",
            "--upload-budget-bytes",
            "4096",
            "--fanout-budget-bytes",
            "8192",
            "--no-operator-api",
            "--auth",
            "off",
        ]
    )
    assert (cfg.threshold, cfg.upload_budget_bytes, cfg.fanout_budget_bytes) == (0.75, 4096, 8192)
    assert cfg.operator_api is False and cfg.auth == "off"
    assert cfg.inline_blob_bytes == 0  # not overridden: the file's value stays


# ---------------------------------------------------------------------------- store
def test_store_authentication_rules(tmp_path: Path) -> None:
    from fedstack.store import CredentialRefused

    st = Store(str(tmp_path / "s.db"))
    try:
        token = st.issue_credential("a")
        assert st.authenticate("a", token, "x", auth="required").source == "issued"

        def reason(name: str, tok: str | None, **kw: Any) -> str:
            with pytest.raises(CredentialRefused) as err:
                st.authenticate(name, tok, "x", **kw)
            return f"{err.value.code}/{err.value.reason}"

        assert reason("a", None, auth="required") == "auth-required/no-token"
        assert reason("a", token + "x", auth="required") == "bad-credential/wrong-token"
        assert reason("a", token + "x", auth="off") == "bad-credential/wrong-token"
        assert reason("b", token, auth="required") == "bad-credential/unknown-agent"
        assert (
            reason("b", token, auth="required", enrollment=False) == "bad-credential/bad-enrollment"
        )
        st.register_agent("c", None, "x")  # auth off: no credential
        assert reason("c", token, auth="required") == "bad-credential/no-credential"
        st.revoke_credential("a")
        assert reason("a", token, auth="required") == "revoked/revoked"
        assert reason("a", token, auth="off") == "revoked/revoked"
        assert reason("a", "wrong", auth="required") == "bad-credential/wrong-token"
        with pytest.raises(StoreError):
            st.revoke_credential("nobody")
        fresh = st.issue_credential("a")  # a revoked credential can be re-issued
        assert st.authenticate("a", fresh, "x", auth="required").agent_id
        assert reason("a", token, auth="required") == "bad-credential/wrong-token"
    finally:
        st.close()
