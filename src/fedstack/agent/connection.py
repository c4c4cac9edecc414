"""The agent's connection loop: the I/O half of the asyncio core.

:class:`AgentConnection` opens one connection at a time to the aggregator and moves
messages between it and the :class:`~fedstack.agent.core.AgentCore` (whose protocol
session checks everything): it sends ``participate`` and waits for the welcome, sends the
pending upload (again after every reconnect, with the same id), polls when delivery is by
polling, sends heartbeats at the welcome's interval, reads with a lease of three heartbeat
intervals, says ``bye`` when the agent closes, and reconnects with capped exponential
backoff and full jitter. A failed connection is diagnosed for TLS problems no retry can
fix (they stop the agent with a :class:`~fedstack.errors.TLSError`).

It runs on the core's event loop and touches the core from there only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random

from fedstack.agent.core import CLIENT, AgentCore, ClientState
from fedstack.errors import (
    ConnectionClosed,
    FedstackError,
    LocalProtocolError,
    ProtocolError,
    RegistrationRefused,
    RemoteProtocolError,
    TLSError,
)
from fedstack.security.tls import diagnose
from fedstack.transport import Connection, connect
from fedstack.wire import Bye, Heartbeat, Poll
from fedstack.wire.session import Refused, Welcomed

log = logging.getLogger("fedstack.agent")


class AgentConnection:
    """The connection loop of ``core`` (see the module docstring): ``await run()``."""

    def __init__(self, core: AgentCore) -> None:
        self.core = core

    async def run(self) -> None:
        """Connect, and reconnect, until closed, finished or refused for good; then
        wake every waiter (nothing more will come)."""
        self.core.wake = asyncio.Event()
        try:
            await self._connection()
        finally:  # waiters re-check: nothing more will come from this connection
            self.core.stopped = True
            self.core.notify()

    async def _connection(self) -> None:
        backoff = 0.05
        while not self.core.closing:
            conn: Connection | None = None
            try:
                conn = await connect(
                    self.core.url,
                    max_message_bytes=self.core.limits.max_message_bytes,
                    open_timeout=self.core.connect_timeout,
                    ssl=self.core.ssl,
                )
                done = await self._run_session(conn)
                backoff = 0.05
                if done:
                    return
            except RegistrationRefused as exc:
                self.core.error = exc
                return
            except (OSError, ConnectionClosed, TimeoutError, ProtocolError) as exc:
                fatal = None if conn is not None else await self._tls_fatal(exc)
                if fatal is not None:  # a certificate problem: retrying cannot fix it
                    log.error("%s: %s", self.core.name, fatal)
                    self.core.error = fatal
                    return
                if self.core.closing or self.core.gm_final:
                    # after the final model the aggregator goes away: nothing to reconnect to
                    return
                level = logging.ERROR if isinstance(exc, RemoteProtocolError) else logging.INFO
                log.log(
                    level,
                    "%s: connection to %s lost (%s); retrying in %.2f s",
                    self.core.name,
                    self.core.url,
                    exc or type(exc).__name__,
                    backoff,
                )
            except Exception as exc:
                # never leave the training loop waiting on a dead connection
                log.exception("%s: agent connection failed", self.core.name)
                self.core.error = FedstackError(f"agent {self.core.name} stopped: {exc!r}")
                return
            finally:
                if conn is not None:
                    conn.abort()
            self.core.reconnects += 1
            # capped exponential backoff with full jitter, interruptible by close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._until_closing(), backoff * (0.5 + random.random()))
            backoff = min(backoff * 2, self.core.max_backoff)

    async def _tls_fatal(self, exc: BaseException) -> TLSError | None:
        """A TLSError if opening the connection failed for a TLS reason (wrong CA, host name
        not in the certificate, client certificate refused or missing, ws:// to a TLS-only
        port), None if the failure may be transient."""
        if self.core.closing:
            return None
        try:
            return await diagnose(
                self.core.url,
                exc,
                self.core.ssl,
                ca=self.core.ca,
                client_cert=self.core.client_cert,
                timeout=min(2.0, self.core.connect_timeout),
            )
        except Exception:  # the diagnosis must never stop the reconnect loop
            log.debug("%s: TLS diagnosis failed", self.core.name, exc_info=True)
            return None

    async def _until_closing(self) -> None:
        assert self.core.wake is not None
        while not self.core.closing:
            await self.core.wake.wait()
            self.core.wake.clear()

    async def _run_session(self, conn: Connection) -> bool:
        """Run one connection. Returns True when the agent is done (closed or finished)."""
        assert self.core.wake is not None
        s = self.core.session
        s.reconnect()
        conn.write(
            s.send(
                s.participate(
                    self.core.name,
                    token=self.core.token,
                    enrollment=self.core.enrollment,
                    model=self.core.initial,
                    init_weights=self.core.init_weights,
                    num_samples=self.core.initial_samples,
                    metrics=self.core.initial_metrics,
                    client=CLIENT,
                )
            )
        )
        await conn.drain()
        event = s.receive_bytes(await asyncio.wait_for(conn.recv(), 3600.0))
        if isinstance(event, Refused):
            err = event.error
            if event.permanent:
                raise RegistrationRefused(
                    f"{self.core.url} refused {self.core.name!r}: {err.message}", code=err.code
                )
            # e.g. the aggregator's store is unavailable: a transient failure, retry
            raise RemoteProtocolError(
                f"{self.core.url} could not register {self.core.name!r} now: {err.message}",
                code=err.code,
            )
        assert isinstance(event, Welcomed)
        self.core.on_welcome(event.message, event.new_model)
        del event  # its model (a view of the message buffer) is the agent's, not the frame's
        interval = s.heartbeat_interval
        reader = asyncio.create_task(self._reader(conn, 3 * interval))
        wake = self.core.wake
        reader.add_done_callback(lambda _: wake.set())
        heart = asyncio.create_task(self._heartbeat(conn, interval))
        try:
            while True:
                if reader.done():
                    return reader.result()  # raises the reader's exception if it failed
                if self.core.closing:
                    with contextlib.suppress(Exception):
                        conn.write(s.send(Bye(reason="agent closing")))
                        await asyncio.wait_for(conn.close(), 2.0)
                    return True
                upload = s.upload_to_send()
                if upload is not None:
                    # the upload's arrays are the agent's own copies, never changed:
                    # the in-process transport may hand them over without copying
                    conn.write(s.send(upload), frozen=True)
                    del upload
                    await conn.drain()
                    continue
                if self.core.state == ClientState.waiting_gm and s.poll_due():
                    conn.write(
                        s.send(Poll(known_version=s.known_version, wait=self.core.poll_wait))
                    )
                await self.core.wake.wait()  # set by the reader (also when it ends) and _kick
                self.core.wake.clear()
        finally:
            heart.cancel()
            reader.cancel()
            with contextlib.suppress(BaseException):
                await reader

    async def _reader(self, conn: Connection, lease: float) -> bool:
        assert self.core.wake is not None
        while True:
            async with asyncio.timeout(lease):  # not wait_for: no task per message
                raw = await conn.recv()
            event = self.core.session.receive_bytes(raw)
            del raw
            self.core.on_event(event)
            del event
            self.core.wake.set()

    async def _heartbeat(self, conn: Connection, interval: float) -> None:
        seq = 0
        while True:
            await asyncio.sleep(interval)
            seq += 1
            try:
                conn.write(self.core.session.send(Heartbeat(seq=seq)))
            except (ConnectionClosed, LocalProtocolError):
                return
