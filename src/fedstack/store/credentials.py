"""The SQL of the credential policy: the ``agents`` rows, in one transaction, for
:mod:`fedstack.security.credentials` (which holds the rules). A mixin of
:class:`~fedstack.store.Store` keeping the method names the aggregator and the CLI call.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping
from typing import Any

from sqlalchemy import insert, select, update

from fedstack.security import credentials
from fedstack.security.credentials import Operator, Registration
from fedstack.store import schema as s


class Credentials:
    """The credential methods of :class:`~fedstack.store.Store`."""

    _salt: bytes

    def _begin(self) -> Any:  # provided by Store: a transaction that raises StoreError
        raise NotImplementedError

    @property
    def token_salt(self) -> bytes:
        """The deployment's salt of the credential hashes (see
        :mod:`fedstack.security.credentials`)."""
        return self._salt

    def hash_token(self, token: str) -> str:
        """The stored form of a credential (:func:`fedstack.security.credentials.hash_token`)."""
        return credentials.hash_token(self._salt, token)

    @contextlib.contextmanager
    def credential_rows(self) -> Iterator[AgentRows]:
        """One transaction over the ``agents`` rows, for the credential policy."""
        with self._begin() as c:
            yield AgentRows(c)

    def register_agent(
        self,
        name: str,
        token: str | None,
        address: str,
        *,
        auth: str = "off",
        enrollment: bool | None = None,
    ) -> tuple[str, bool]:
        """The stable id of agent ``name``: :meth:`authenticate` as ``(agent id, new)``."""
        reg = self.authenticate(name, token, address, auth=auth, enrollment=enrollment)
        return reg.agent_id, reg.new

    def authenticate(
        self,
        name: str,
        token: str | None,
        address: str,
        *,
        auth: str = "off",
        enrollment: bool | None = None,
    ) -> Registration:
        """Check agent ``name``'s credential and record the connection: the policy of
        :func:`fedstack.security.credentials.authenticate_agent` over this store.

        Raises:
            CredentialRefused: (a :class:`RegistrationRefused`) with the wire ``code`` and
                the audit ``reason``.
            StoreError: the database failed.
        """
        return credentials.authenticate_agent(
            self, name, token, address, auth=auth, enrollment=enrollment
        )

    def issue_credential(self, name: str, *, replace: bool = False, role: str = "agent") -> str:
        """Issue a new credential for ``name``; return the token (see
        :func:`fedstack.security.credentials.issue_credential`)."""
        return credentials.issue_credential(self, name, replace=replace, role=role)

    def revoke_credential(self, name: str, *, role: str | None = None) -> bool:
        """Revoke ``name``'s credential; False if it was revoked already (see
        :func:`fedstack.security.credentials.revoke_credential`)."""
        return credentials.revoke_credential(self, name, role=role)

    def authenticate_operator(self, token: str | None, address: str) -> Operator:
        """Check a bearer token for the operator API (see
        :func:`fedstack.security.credentials.authenticate_operator`).

        Raises:
            CredentialRefused: the token does not open the operator API.
        """
        return credentials.authenticate_operator(self, token, address)


class AgentRows:
    """The ``agents`` rows in one transaction (implements
    :class:`fedstack.security.credentials.CredentialRows`)."""

    def __init__(self, conn: Any) -> None:
        self._c = conn

    def by_name(self, name: str) -> Mapping[str, Any] | None:
        row = self._c.execute(select(s.agents).where(s.agents.c.name == name)).mappings().first()
        return None if row is None else dict(row)

    def by_hash(self, token_hash: str) -> Mapping[str, Any] | None:
        row = (
            self._c.execute(select(s.agents).where(s.agents.c.token_hash == token_hash))
            .mappings()
            .first()
        )
        return None if row is None else dict(row)

    def insert(self, **values: Any) -> None:
        self._c.execute(insert(s.agents).values(**values))

    def update(self, agent_id: str, **values: Any) -> None:
        self._c.execute(update(s.agents).where(s.agents.c.id == agent_id).values(**values))

    def event(self, kind: str, detail: Mapping[str, Any], agent_id: str) -> None:
        self._c.execute(
            insert(s.events).values(
                time=time.time(), run_id=None, agent_id=agent_id, kind=kind, detail=dict(detail)
            )
        )
