"""Credential policy: who may join a federation and who may use the operator API.

The rules, in one place (the store only keeps the rows, see :class:`CredentialRows`):

- A credential is stored as its HMAC-SHA256 under a per-deployment salt (:func:`hash_token`);
  issued and enrolled tokens carry 256 bits of randomness, so a fast keyed hash is enough.
  The token itself is never stored.
- ``auth="required"``: an agent must present a token. A known name must present its
  credential (issued by the operator, bound at enrollment or, before auth was required, at
  first use); an unknown name is registered only with a valid enrollment token, its own
  token (at least :data:`MIN_ENROLLED_TOKEN_CHARS` characters) becoming its credential.
- ``auth="off"``: the first registration binds the name to the token it presents (if any)
  and a later one with another token is refused (first-use binding).
- In both modes a revoked credential is refused, and an operator credential never joins a
  federation; only an unrevoked operator credential opens the operator API.
- An issued credential replaces a valid one only when asked to (``replace``); a name is
  either an agent's or an operator's.

Refusals raise :class:`~fedstack.errors.CredentialRefused`, whose wire ``code`` never tells
an unknown name from a wrong token, and whose ``reason`` is precise for the audit trail.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
import uuid
from collections.abc import Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

from fedstack.errors import CredentialRefused, StoreConflict, StoreError

AUTH_MODES = ("required", "off")
ROLES = ("agent", "operator")
MIN_ENROLLED_TOKEN_CHARS = 16
_UNKNOWN_OR_WRONG = "unknown agent name or wrong credential"

__all__ = [
    "AUTH_MODES",
    "MIN_ENROLLED_TOKEN_CHARS",
    "ROLES",
    "CredentialRefused",
    "CredentialRows",
    "CredentialStore",
    "Operator",
    "Registration",
    "authenticate_agent",
    "authenticate_operator",
    "fingerprint",
    "hash_token",
    "issue_credential",
    "revoke_credential",
]


def hash_token(salt: bytes, token: str) -> str:
    """The stored form of a credential: HMAC-SHA256 of ``token`` under ``salt``."""
    return "s1$" + hmac.new(salt, token.encode(), hashlib.sha256).hexdigest()


def fingerprint(stored_hash: str | None) -> str | None:
    """A short, non-secret identifier of a credential (for the audit trail and listings)."""
    return None if stored_hash is None else stored_hash.rpartition("$")[2][:10]


@dataclass(frozen=True, slots=True)
class Registration:
    """An accepted registration: who, and with which credential."""

    agent_id: str
    new: bool
    source: str | None  # issued | enrolled | first-use | None (no credential, auth off)
    credential: str | None  # the stored hash at registration (None: no credential)

    @property
    def fingerprint(self) -> str | None:
        return fingerprint(self.credential)


@dataclass(frozen=True, slots=True)
class Operator:
    """An authenticated operator (see :func:`authenticate_operator`)."""

    operator_id: str
    name: str
    credential: str  # the stored hash

    @property
    def fingerprint(self) -> str | None:
        return fingerprint(self.credential)


class CredentialRows(Protocol):
    """The SQL the policy needs, inside one transaction (the store implements it).

    Rows are mappings with the ``agents`` table's columns (``id``, ``name``, ``role``,
    ``token_hash``, ``credential_source``, ``revoked_at``, ...).
    """

    def by_name(self, name: str) -> Mapping[str, Any] | None: ...

    def by_hash(self, token_hash: str) -> Mapping[str, Any] | None: ...

    def insert(self, **values: Any) -> None: ...

    def update(self, agent_id: str, **values: Any) -> None: ...

    def event(self, kind: str, detail: Mapping[str, Any], agent_id: str) -> None: ...


class CredentialStore(Protocol):
    """What the policy needs of a store: the salt and a transaction over the rows."""

    @property
    def token_salt(self) -> bytes: ...

    def credential_rows(self) -> AbstractContextManager[CredentialRows]: ...


def new_id() -> str:
    return uuid.uuid4().hex


def authenticate_agent(
    store: CredentialStore,
    name: str,
    token: str | None,
    address: str,
    *,
    auth: str = "off",
    enrollment: bool | None = None,
) -> Registration:
    """Check agent ``name``'s credential and record the connection (see the module rules).

    ``enrollment``: None = no enrollment token presented, False = a wrong one, True = a
    valid one.

    Raises:
        CredentialRefused: with the wire ``code`` and the audit ``reason``.
        StoreError: the store failed.
        ValueError: ``auth`` is not one of :data:`AUTH_MODES`.
    """
    if auth not in AUTH_MODES:
        raise ValueError(f"auth {auth!r} must be one of {AUTH_MODES}")
    for attempt in range(2):
        try:
            return _authenticate(store, name, token, address, auth == "required", enrollment)
        except StoreConflict as exc:  # a concurrent first registration of this name
            if attempt:
                raise StoreError(f"cannot register agent {name!r}: {exc}") from exc
    raise AssertionError("unreachable")


def _authenticate(
    store: CredentialStore,
    name: str,
    token: str | None,
    address: str,
    required: bool,
    enrollment: bool | None,
) -> Registration:
    now = time.time()
    th = hash_token(store.token_salt, token) if token else None
    fp = fingerprint(th)
    with store.credential_rows() as rows:
        row = rows.by_name(name)
        if required and not token:
            raise CredentialRefused(
                f"agent {name!r}: authentication required (pass the agent's token, "
                "e.g. FEDSTACK_TOKEN)",
                "auth-required",
                "no-token",
                source=None if row is None else row["credential_source"],
            )
        if row is None:
            source = _new_agent_source(name, token, th, required, enrollment)
            agent_id = new_id()
            rows.insert(
                id=agent_id,
                name=name,
                token_hash=th,
                created=now,
                last_seen=now,
                last_address=address,
                credential_source=source,
                credential_created=now if th is not None else None,
            )
            return Registration(agent_id, True, source, th)
        if row["role"] == "operator":  # an operator credential never joins a federation
            raise CredentialRefused(
                f"agent {name!r}: {_UNKNOWN_OR_WRONG}",
                "bad-credential",
                "operator-credential",
                credential=fp,
            )
        stored: str | None = row["token_hash"]
        source = row["credential_source"]
        if stored is None:
            if required:
                raise CredentialRefused(
                    f"agent {name!r}: {_UNKNOWN_OR_WRONG}",
                    "bad-credential",
                    "no-credential",
                    credential=fp,
                )
        elif th is None or not hmac.compare_digest(stored, th):
            message = (
                f"agent {name!r}: {_UNKNOWN_OR_WRONG}"
                if required
                else f"agent name {name!r} is registered with a different credential"
            )
            raise CredentialRefused(
                message,
                "bad-credential",
                "no-token" if token is None else "wrong-token",
                credential=fp,
                source=source,
            )
        if row["revoked_at"] is not None:
            raise CredentialRefused(
                f"agent {name!r}: its credential was revoked",
                "revoked",
                "revoked",
                credential=fp,
                source=source,
            )
        values: dict[str, Any] = {"last_seen": now, "last_address": address}
        if stored is None and th is not None:  # auth off: bind on first use
            values.update(token_hash=th, credential_source="first-use", credential_created=now)
            stored, source = th, "first-use"
        rows.update(str(row["id"]), **values)
        return Registration(str(row["id"]), False, source, stored)


def _new_agent_source(
    name: str, token: str | None, th: str | None, required: bool, enrollment: bool | None
) -> str | None:
    """How an unknown name gets its credential, or the refusal."""
    if not required:
        return "first-use" if th is not None else None
    if enrollment is not True:
        raise CredentialRefused(
            f"agent {name!r}: {_UNKNOWN_OR_WRONG}",
            "bad-credential",
            "unknown-agent" if enrollment is None else "bad-enrollment",
            credential=fingerprint(th),
        )
    if token is None or len(token) < MIN_ENROLLED_TOKEN_CHARS:
        raise CredentialRefused(
            f"agent {name!r}: an enrolling agent's own token must have at least "
            f"{MIN_ENROLLED_TOKEN_CHARS} characters",
            "weak-token",
            "weak-token",
            credential=fingerprint(th),
            source="enrolled",
        )
    return "enrolled"


def authenticate_operator(store: CredentialStore, token: str | None, address: str) -> Operator:
    """Check a bearer token for the operator API; record the use (``last_seen``).

    Raises:
        CredentialRefused: ``reason`` ``no-token``, ``wrong-token`` (unknown),
            ``agent-credential`` (an agent's token) or ``revoked``.
        StoreError: the store failed.
    """
    if not token:
        raise CredentialRefused("operator token required", "auth-required", "no-token")
    th = hash_token(store.token_salt, token)
    fp = fingerprint(th)
    with store.credential_rows() as rows:
        row = rows.by_hash(th)
        if row is None or not hmac.compare_digest(str(row["token_hash"]), th):
            raise CredentialRefused(
                "unknown operator token", "bad-credential", "wrong-token", credential=fp
            )
        if row["role"] != "operator":
            raise CredentialRefused(
                "an agent credential cannot use the operator API",
                "forbidden",
                "agent-credential",
                credential=fp,
                source=str(row["name"]),
            )
        if row["revoked_at"] is not None:
            raise CredentialRefused(
                f"the credential of operator {row['name']!r} was revoked",
                "revoked",
                "revoked",
                credential=fp,
                source=str(row["name"]),
            )
        rows.update(str(row["id"]), last_seen=time.time(), last_address=address[:128])
    return Operator(str(row["id"]), str(row["name"]), th)


def issue_credential(
    store: CredentialStore, name: str, *, replace: bool = False, role: str = "agent"
) -> str:
    """Issue a new credential for ``name`` (created if unknown); return the token.

    Only a hash is stored: the token cannot be shown again. A name that already has a valid
    credential keeps it unless ``replace``; a revoked one gets a new credential.

    Raises:
        StoreError: a bad name, a name of the other role, a valid credential without
            ``replace``, or the store failed.
        ValueError: ``role`` is not one of :data:`ROLES`.
    """
    if role not in ROLES:
        raise ValueError(f"role {role!r} must be one of {ROLES}")
    if not name or name != name.strip() or len(name) > 128:
        raise StoreError("an agent name must have 1-128 characters, no surrounding blanks")
    token = secrets.token_urlsafe(32)
    th = hash_token(store.token_salt, token)
    now = time.time()
    with store.credential_rows() as rows:
        row = rows.by_name(name)
        replaced = None
        if row is None:
            agent_id = new_id()
            rows.insert(
                id=agent_id,
                name=name,
                token_hash=th,
                created=now,
                last_seen=now,
                last_address="",
                credential_source="issued",
                credential_created=now,
                role=role,
            )
        else:
            agent_id = str(row["id"])
            if row["role"] != role:
                raise StoreError(
                    f"{name!r} is the name of an {row['role']}, not an {role}; choose another name"
                )
            if row["token_hash"] is not None and row["revoked_at"] is None:
                if not replace:
                    raise StoreError(
                        f"agent {name!r} already has a credential "
                        f"({row['credential_source'] or 'first-use'}, "
                        f"{fingerprint(row['token_hash'])}); revoke it first or replace it"
                    )
                replaced = fingerprint(row["token_hash"])
            rows.update(
                agent_id,
                token_hash=th,
                credential_source="issued",
                credential_created=now,
                revoked_at=None,
            )
        rows.event(
            "credential_issued",
            {
                "name": name,
                "credential": fingerprint(th),
                "source": "issued",
                "replaced": replaced,
                "role": role,
            },
            agent_id,
        )
    return token


def revoke_credential(store: CredentialStore, name: str, *, role: str | None = None) -> bool:
    """Revoke ``name``'s credential: its reconnects are refused and connected aggregators
    close its connection at their next check. False if it was already revoked. ``role``:
    only a credential of this role (a name of the other role is "no agent").

    Raises:
        StoreError: no such name (of that role), or the store failed.
    """
    now = time.time()
    with store.credential_rows() as rows:
        row = rows.by_name(name)
        if row is None or (role is not None and row["role"] != role):
            raise StoreError(f"no {role or 'agent'} {name!r}")
        if row["revoked_at"] is not None:
            return False
        rows.update(str(row["id"]), revoked_at=now)
        rows.event(
            "credential_revoked",
            {
                "name": name,
                "credential": fingerprint(row["token_hash"]),
                "source": row["credential_source"],
                "role": row["role"],
            },
            str(row["id"]),
        )
    return True
