"""Who is connected: agent sessions, registration, credentials and refusals.

:class:`Registry` authenticates a ``participate`` message against the store, refuses
what it must (with an audit record, rate-limited per source by :class:`RefusalAudit`),
and re-checks the connected agents' credentials every heartbeat interval
(:meth:`Registry.watch_credentials`). It holds the ``sessions`` map, but only the round
owner adds and removes sessions (:meth:`Registry.add`, :meth:`Registry.remove`): the
number of active agents is round state.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fedstack.aggregator.audit import RefusalAudit
from fedstack.aggregator.config import AggregatorConfig
from fedstack.aggregator.tasks import TaskScope
from fedstack.errors import ConnectionClosed, RegistrationRefused, RemoteProtocolError, StoreError
from fedstack.store import CredentialRefused, Store
from fedstack.store.repository import fingerprint
from fedstack.transport import Connection
from fedstack.wire import Error, GlobalModel, Message, Participate, encode
from fedstack.wire.session import AggregatorSession, State

if TYPE_CHECKING:
    from fedstack.operator.metrics import AggregatorMetrics

log = logging.getLogger("fedstack.aggregator")

Db = Callable[..., Awaitable[Any]]
"""Runs a store call off the event loop: ``await db(fn, *args, **kwargs)`` (the
aggregator gives the registry its own thread, so that a flood of registrations never
queues in front of the uploads)."""


@dataclass(eq=False)
class Session:
    """One registered agent's connection. Fields other than ``known_version``,
    ``last_seen`` and ``welcomed`` never change after registration."""

    agent_id: str
    name: str
    conn: Connection
    address: str
    known_version: int = -1
    welcomed: bool = False
    last_seen: float = field(default_factory=time.monotonic)
    credential: str | None = None  # stored hash it registered with (re-checked periodically)
    source: str | None = None  # issued | enrolled | first-use | None
    scope: TaskScope = field(default_factory=lambda: TaskScope("connection"))
    """Replies and pushes to this agent; closed when the connection ends."""
    protocol: AggregatorSession | None = None
    """The connection's protocol session: every message written goes through it (None:
    written unchecked, e.g. in tests)."""

    def write(self, msg: Message) -> None:
        """Queue ``msg`` on the connection now (frames keep program order).

        Raises:
            ConnectionClosed: the session is over (e.g. the aggregator said bye).
            LocalProtocolError: the protocol does not allow ``msg`` now.
        """
        self._check_open()
        self.conn.write(encode(msg) if self.protocol is None else self.protocol.send(msg))

    def _check_open(self) -> None:
        if self.protocol is not None and self.protocol.state is State.CLOSED:
            raise ConnectionClosed(1001, "the session is over")

    def write_parts(
        self, parts: list[bytes | memoryview], kind: type[Message] = GlobalModel
    ) -> None:
        """Queue an already encoded ``kind`` message (e.g. the shared global model).

        Raises:
            ConnectionClosed: the session is over.
            LocalProtocolError: the protocol does not allow it now.
        """
        self._check_open()
        if self.protocol is not None:
            self.protocol.send_encoded(kind, parts)
        self.conn.write(parts)

    async def send(self, msg: Message, timeout: float) -> None:
        self.write(msg)
        async with asyncio.timeout(timeout):  # not wait_for: no task per message
            await self.conn.drain()


class Registry:
    """Registration, the sessions map, refusals and the credential watcher.

    Args:
        config: the aggregator's settings (auth mode, enrollment token, intervals).
        db: runs a store call (on the registry's own thread).
        store: a callable returning the open store (the aggregator opens it in ``start``).
        run_id: a callable returning the run id.
    """

    def __init__(
        self,
        config: AggregatorConfig,
        db: Db,
        store: Callable[[], Store | None],
        run_id: Callable[[], str],
        metrics: AggregatorMetrics | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics
        self._db = db
        self._store = store
        self._run_id = run_id
        self.sessions: dict[str, Session] = {}
        """Agent id -> its counted session. Mutated only by the round owner."""
        self.audit = RefusalAudit(self._write_event)

    async def _write_event(
        self, kind: str, detail: dict[str, Any], run_id: str | None, agent_id: str | None
    ) -> None:
        store = self._store()
        assert store is not None
        await self._db(store.log_event, kind, detail, run_id=run_id, agent_id=agent_id)

    # ------------------------------------------------------------------ owner-only
    def add(self, session: Session) -> Session | None:
        """Count ``session`` (the owner calls this); returns the session it replaces."""
        old = self.sessions.get(session.agent_id)
        self.sessions[session.agent_id] = session
        return old if old is not session else None

    def remove(self, session: Session) -> bool:
        """Stop counting ``session`` (the owner calls this); False if it did not count."""
        if self.sessions.get(session.agent_id) is session:
            del self.sessions[session.agent_id]
            return True
        return False

    # ------------------------------------------------------------------ registration
    async def authenticate(self, conn: Connection, msg: Participate) -> Session | None:
        """Check ``msg``'s credential; a new :class:`Session` (not counted yet), or None
        after refusing the connection (the refusal is audited and sent)."""
        store = self._store()
        assert store is not None
        name = msg.agent_name.strip()
        if not name or len(name) > 128:
            raise RemoteProtocolError("agent_name must have 1-128 characters", code="bad-name")
        cfg = self.config
        enrollment: bool | None = None  # not presented
        if msg.enrollment is not None:
            enrollment = cfg.enrollment_token is not None and hmac.compare_digest(
                msg.enrollment.encode(), cfg.enrollment_token.encode()
            )
        audit: dict[str, Any] = {
            "name": name,
            "auth": cfg.auth,
            "client": msg.client[:64],
            "enrollment": {None: "none", True: "valid", False: "invalid"}[enrollment],
        }
        try:
            reg = await self._db(
                store.authenticate,
                name,
                msg.token,
                conn.remote_address,
                auth=cfg.auth,
                enrollment=enrollment,
            )
        except CredentialRefused as exc:
            log.warning(
                "refused agent %r from %s: %s (%s)", name, conn.remote_address, exc, exc.reason
            )
            await self.refuse(
                conn,
                exc.code,
                str(exc),
                None,
                {
                    **audit,
                    "stage": "auth",
                    "reason": exc.reason,
                    "credential": exc.credential,
                    "source": exc.source,
                },
            )
            return None
        except RegistrationRefused as exc:
            log.warning("refused agent %r from %s: %s", name, conn.remote_address, exc)
            await self.refuse(conn, exc.code, str(exc), None, {**audit, "stage": "auth"})
            return None
        except StoreError as exc:
            # the database is away: nothing is wrong with the agent, it should retry
            log.error("cannot register %r now, the store is unavailable: %s", name, exc)
            await self.refuse(
                conn, "unavailable", "the aggregator's store is unavailable; retry later", None
            )
            return None
        with contextlib.suppress(StoreError):
            await self._db(
                store.log_event,
                "authenticated",
                {
                    **audit,
                    "address": conn.remote_address,
                    "source": reg.source,
                    "credential": reg.fingerprint,
                    "new": reg.new,
                },
                run_id=self._run_id(),
                agent_id=reg.agent_id,
            )
        if reg.new:
            log.debug("agent %s is new", name)
        return Session(
            reg.agent_id,
            name,
            conn,
            conn.remote_address,
            known_version=msg.known_version,
            credential=reg.credential,
            source=reg.source,
        )

    async def refuse(
        self,
        conn: Connection,
        code: str,
        message: str,
        session: Session | None,
        detail: dict[str, Any] | None = None,
        agent_id: str | None = None,
    ) -> None:
        """Audit the refusal (rate-limited), send a fatal ``code`` error, close ``conn``."""
        if self.metrics is not None:
            self.metrics.count_refusal(code)
        # the audit record first: closing may wait for the peer, and an aggregator that
        # stops meanwhile must not lose it
        with contextlib.suppress(StoreError):
            await self.audit.record(
                "refused",
                {
                    "code": code,
                    "message": message[:500],
                    "address": conn.remote_address,
                    **(detail or {}),
                },
                address=conn.remote_address,
                run_id=self._run_id(),
                agent_id=session.agent_id if session else agent_id,
            )
        with contextlib.suppress(Exception):
            await asyncio.wait_for(
                conn.send(encode(Error(code=code, message=message, fatal=True))), 5.0
            )
        with contextlib.suppress(Exception):
            await conn.close(1009 if code == "too-large" else 1008, code, timeout=1.0)

    def find(self, name: str) -> list[Session]:
        """The counted sessions of agents called ``name``."""
        return [s for s in self.sessions.values() if s.name == name]

    # ------------------------------------------------------------------ credentials
    async def watch_credentials(
        self, disconnect: Callable[[Session, str], Awaitable[None]]
    ) -> None:
        """Every heartbeat interval, one query re-checks the connected agents' credentials;
        for an agent whose credential was revoked (or replaced), ``await disconnect(s,
        why)``. Runs until cancelled; a store error skips one check (logged)."""
        interval = self.config.heartbeat_interval
        while True:
            await asyncio.sleep(interval)
            store = self._store()
            sessions = [s for s in self.sessions.values() if s.welcomed]
            if not sessions or store is None:
                continue
            try:
                status = await self._db(store.credential_status, [s.agent_id for s in sessions])
            except StoreError as exc:
                log.warning("cannot re-check credentials: %s", exc)
                continue
            for s in sessions:
                stored, revoked = status.get(s.agent_id, (None, True))
                if not revoked and stored == s.credential:
                    continue
                why = "revoked" if revoked else "replaced"
                log.warning("credential of agent %s was %s: disconnecting it", s.name, why)
                await disconnect(s, why)


def refusal_detail(s: Session, detail: dict[str, Any]) -> dict[str, Any]:
    """``detail`` plus the session's credential fingerprint and source, for the audit."""
    return {**detail, "credential": fingerprint(s.credential), "source": s.source}
