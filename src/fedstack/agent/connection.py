"""The agent's connection loop: the I/O half of the asyncio core.

:class:`AgentConnection` opens one connection at a time to an aggregator and moves
messages between it and the :class:`~fedstack.agent.core.AgentCore` (whose protocol
session checks everything): it sends ``participate`` and waits for the welcome, sends the
pending upload (again after every reconnect, with the same id), polls when delivery is by
polling, sends heartbeats at the welcome's interval, reads with a lease of three heartbeat
intervals, says ``bye`` when the agent closes (or moves), and reconnects with capped
exponential backoff and full jitter. A failed connection is diagnosed for TLS problems no
retry can fix (they stop the agent with a :class:`~fedstack.errors.TLSError`).

Failover. With several known aggregators (:class:`~fedstack.agent.urls.KnownAggregators`:
the given URLs, then those learned from the welcomes), a failure starts a *cycle*: when
the aggregator that welcomed the agent refuses connections or drops the connection, the
cycle tries it first, once, then the others in order; when it stopped answering (the read
lease expired) it goes last. Within a cycle the next URL is tried at once; the backoff is
applied per full cycle, so an agent reaches a live member within a few heartbeat
intervals. With several URLs the welcome is awaited at most ``max(60 s,
connect_timeout)``. A welcome from another member of the same run continues the
federation: credentials, the pending upload (re-sent with the same upload_id: "already
received" if it was stored) and the known version are kept. :meth:`AgentCore.move_to
<fedstack.agent.core.AgentCore.move_to>` makes the loop leave with ``bye`` and go to the
given URL at once.

It runs on the core's event loop and touches the core from there only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time

from fedstack.agent.core import CLIENT, AgentCore, ClientState
from fedstack.agent.urls import safe_url
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
        core = self.core
        backoff = 0.05
        cycle: list[str] = []  # the URLs still to try in this cycle (KnownAggregators.cycle)
        while not core.closing:
            moving = core.moving is not None
            if moving:  # move_to(): its URL first, at once (home is that URL)
                core.moving = None
                cycle = core.known.cycle()
            if not cycle:
                cycle = core.known.cycle()
            url = cycle.pop(0)
            if url != core.url:
                if not moving:
                    log.info(
                        "%s: failing over from %s to %s",
                        core.name,
                        safe_url(core.url),
                        safe_url(url),
                    )
                core.url = url
            conn: Connection | None = None
            welcomes = core.welcomes
            lease_expired = False
            try:
                conn = await connect(
                    url,
                    max_message_bytes=core.limits.max_message_bytes,
                    open_timeout=core.connect_timeout,
                    ssl=core.ssl_for(url),
                )
                done = await self._run_session(conn)
                backoff = 0.05
                if done:
                    return
                continue  # moving: to the new URL without waiting
            except RegistrationRefused as exc:
                core.error = exc
                return
            except (OSError, ConnectionClosed, TimeoutError, ProtocolError) as exc:
                fatal = None if conn is not None else await self._tls_fatal(exc, url)
                if fatal is not None:  # a certificate problem: retrying cannot fix it
                    log.error("%s: %s", core.name, fatal)
                    core.error = fatal
                    return
                if core.closing or core.gm_final:
                    # after the final model the aggregator goes away: nothing to reconnect to
                    return
                welcomed = core.welcomes > welcomes
                lease_expired = isinstance(exc, TimeoutError) and welcomed
                lasted = time.monotonic() - core.welcomed_at
                if welcomed and lasted >= 3 * core.session.heartbeat_interval:
                    backoff = 0.05  # it was a stable connection: the backoff starts over
                level = logging.ERROR if isinstance(exc, RemoteProtocolError) else logging.INFO
                more = bool(cycle) and core.welcomes == welcomes and core.moving is None
                log.log(
                    level,
                    "%s: connection to %s lost (%s); %s",
                    core.name,
                    safe_url(url),
                    str(exc) or type(exc).__name__,
                    "trying the next aggregator" if more else f"retrying in {backoff:.2f} s",
                )
            except Exception as exc:
                # never leave the training loop waiting on a dead connection
                log.exception("%s: agent connection failed", core.name)
                core.error = FedstackError(f"agent {core.name} stopped: {exc!r}")
                return
            finally:
                if conn is not None:
                    conn.abort()
            core.reconnects += 1
            if core.moving is not None:
                continue
            if core.welcomes > welcomes:
                # the aggregator that welcomed us is gone: a new cycle, from it (or, if it
                # stopped answering, from the next one); after the backoff below
                cycle = core.known.cycle(url, demote=url if lease_expired else None)
            elif cycle:
                continue  # the next URL of this cycle, at once: backoff is per full cycle
            # capped exponential backoff with full jitter, interruptible by close() and
            # move_to()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._until_closing(), backoff * (0.5 + random.random()))
            backoff = min(backoff * 2, core.max_backoff)

    async def _tls_fatal(self, exc: BaseException, url: str) -> TLSError | None:
        """A TLSError if opening the connection failed for a TLS reason (wrong CA, host name
        not in the certificate, client certificate refused or missing, ws:// to a TLS-only
        port), None if the failure may be transient."""
        if self.core.closing:
            return None
        try:
            return await diagnose(
                url,
                exc,
                self.core.ssl_for(url),
                ca=self.core.ca,
                client_cert=self.core.client_cert,
                timeout=min(2.0, self.core.connect_timeout),
            )
        except Exception:  # the diagnosis must never stop the reconnect loop
            log.debug("%s: TLS diagnosis failed", self.core.name, exc_info=True)
            return None

    async def _until_closing(self) -> None:
        assert self.core.wake is not None
        while not self.core.closing and self.core.moving is None:
            await self.core.wake.wait()
            self.core.wake.clear()

    async def _run_session(self, conn: Connection) -> bool:
        """Run one connection. Returns True when the agent is done (closed or finished),
        False when it leaves to move to another aggregator."""
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
        # with other aggregators to go to, one that does not welcome us in time is left
        wait = 3600.0 if len(self.core.known.all) == 1 else max(60.0, self.core.connect_timeout)
        event = s.receive_bytes(await asyncio.wait_for(conn.recv(), wait))
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
                if self.core.moving is not None:  # move_to(): leave for another aggregator
                    with contextlib.suppress(Exception):
                        conn.write(s.send(Bye(reason="agent moving")))
                        await asyncio.wait_for(conn.close(), 2.0)
                    return False
                while self.core.outbox:  # secure aggregation's messages, in order
                    conn.write(s.send(self.core.outbox.pop(0)))
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
