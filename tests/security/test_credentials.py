"""The credential policy on its own, over rows in memory (no database): the rules live in
fedstack.security.credentials, the store only keeps the rows."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import pytest

from fedstack.errors import CredentialRefused, RegistrationRefused, StoreError
from fedstack.security import credentials as cr


class MemoryRows:
    def __init__(self) -> None:
        self.agents: dict[str, dict[str, Any]] = {}
        self.events: list[tuple[str, dict[str, Any]]] = []

    def by_name(self, name: str) -> Mapping[str, Any] | None:
        return next((dict(r) for r in self.agents.values() if r["name"] == name), None)

    def by_hash(self, token_hash: str) -> Mapping[str, Any] | None:
        return next((dict(r) for r in self.agents.values() if r["token_hash"] == token_hash), None)

    def insert(self, **values: Any) -> None:
        self.agents[values["id"]] = {"role": "agent", "revoked_at": None, **values}

    def update(self, agent_id: str, **values: Any) -> None:
        self.agents[agent_id].update(values)

    def event(self, kind: str, detail: Mapping[str, Any], agent_id: str) -> None:
        self.events.append((kind, dict(detail)))


class MemoryStore:
    token_salt = b"s" * 32

    def __init__(self) -> None:
        self.rows = MemoryRows()

    @contextlib.contextmanager
    def credential_rows(self) -> Iterator[MemoryRows]:
        yield self.rows


def reason(store: MemoryStore, name: str, token: str | None, **kw: Any) -> str:
    with pytest.raises(CredentialRefused) as info:
        cr.authenticate_agent(store, name, token, "addr", **kw)
    assert isinstance(info.value, RegistrationRefused)
    return f"{info.value.code}/{info.value.reason}"


def test_first_use_binding_when_auth_is_off() -> None:
    st = MemoryStore()
    reg = cr.authenticate_agent(st, "a", "t0k3n-value", "addr")
    assert (
        reg.new
        and reg.source == "first-use"
        and reg.credential == cr.hash_token(st.token_salt, "t0k3n-value")
    )
    assert "t0k3n-value" not in str(
        list(st.rows.agents.values())[0].values()
    )  # only a hash is kept
    assert cr.authenticate_agent(st, "a", "t0k3n-value", "addr").agent_id == reg.agent_id
    assert reason(st, "a", "other") == "bad-credential/wrong-token"
    assert reason(st, "a", None) == "bad-credential/no-token"


def test_required_auth_enrollment_and_revocation() -> None:
    st = MemoryStore()
    strong = "x" * cr.MIN_ENROLLED_TOKEN_CHARS
    assert reason(st, "a", None, auth="required") == "auth-required/no-token"
    assert reason(st, "a", strong, auth="required") == "bad-credential/unknown-agent"
    assert (
        reason(st, "a", strong, auth="required", enrollment=False)
        == "bad-credential/bad-enrollment"
    )
    assert reason(st, "a", "short", auth="required", enrollment=True) == "weak-token/weak-token"
    reg = cr.authenticate_agent(st, "a", strong, "addr", auth="required", enrollment=True)
    assert reg.source == "enrolled"
    assert cr.revoke_credential(st, "a") is True and cr.revoke_credential(st, "a") is False
    assert reason(st, "a", strong, auth="required") == "revoked/revoked"
    assert [k for k, _ in st.rows.events] == ["credential_revoked"]
    with pytest.raises(ValueError):
        cr.authenticate_agent(st, "a", strong, "addr", auth="maybe")


def test_operator_and_agent_credentials_never_cross() -> None:
    st = MemoryStore()
    ops = cr.issue_credential(st, "ops", role="operator")
    agent = cr.issue_credential(st, "a")
    assert cr.authenticate_operator(st, ops, "addr").name == "ops"
    with pytest.raises(CredentialRefused, match="agent credential"):
        cr.authenticate_operator(st, agent, "addr")
    assert reason(st, "ops", ops) == "bad-credential/operator-credential"
    with pytest.raises(StoreError, match="already has a credential"):
        cr.issue_credential(st, "a")
    assert cr.issue_credential(st, "a", replace=True) != agent
    with pytest.raises(StoreError, match="name of an agent"):
        cr.issue_credential(st, "a", role="operator")
    with pytest.raises(CredentialRefused) as info:
        cr.authenticate_operator(st, "unknown", "addr")
    assert info.value.reason == "wrong-token"
