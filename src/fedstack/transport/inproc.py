"""An in-process transport: the same messages as the WebSocket transport, without sockets.

The simulator runs the real aggregator and the real agents in one process; their
connections are pairs of :class:`InProcConnection` with the interface of
:class:`~fedstack.transport.ws.WSConnection` (``recv``/``write``/``send``/``drain``/
``close``/``abort``). Every message is still encoded by :mod:`fedstack.wire` and decoded
(and validated) by the receiver, so nothing is shared between the two ends but bytes.

The two ends may live on different event loops (each :class:`~fedstack.agent.Agent` runs
its own loop in a thread): a message is copied once into a buffer (of the server's
:class:`~fedstack.buffers.BufferPool`, reused once nothing views it) and handed to the
peer's loop with ``call_soon_threadsafe``. A sender that will never change a message's
buffers again (the agent's upload: its own copy of the trained model) writes it with
``frozen=True``; the parts are then handed over as read-only
:class:`~fedstack.wire.segments.Segments`, without a copy.

A server is registered under a name with :func:`serve`; ``inproc://NAME`` URLs reach it
through :func:`connect` (and so through :func:`fedstack.transport.ws.connect`, which the
agent uses).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from fedstack.buffers import BufferPool
from fedstack.errors import ConnectionClosed, MessageTooLarge
from fedstack.wire.segments import Segments

Buffer = bytes | bytearray | memoryview

__all__ = ["InProcConnection", "InProcServer", "connect", "serve"]

POOL_BYTES = 2 << 30
"""Message buffers (of 1 MiB and more) a server keeps for reuse: a fresh buffer's pages
must be faulted in and zeroed by the kernel, which costs more than the copy into it."""

_servers: dict[str, InProcServer] = {}
_servers_lock = threading.Lock()
_ids = itertools.count(1)


class InProcConnection:
    """One end of an in-process connection (see the module docstring)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        max_message_bytes: int,
        remote_address: str,
        pool: BufferPool | None = None,
    ) -> None:
        self._loop = loop
        self._pool = pool
        self.max_message_bytes = max_message_bytes
        self.remote_address = remote_address
        self.peer: InProcConnection | None = None
        self._messages: collections.deque[memoryview | Segments] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False
        self._error: MessageTooLarge | None = None
        self.close_code = 1006
        self.close_reason = ""
        self.bytes_sent = 0
        self.bytes_received = 0

    # ------------------------------------------------------------------ delivery (own loop)
    def _deliver(self, data: memoryview | Segments) -> None:
        if self._closed:
            return
        self._messages.append(data)
        self.bytes_received += data.nbytes
        self._wake()

    def _too_large(self, length: int) -> None:
        if self._error is None:
            self._error = MessageTooLarge(length, self.max_message_bytes)
        self._wake()

    def _peer_closed(self, code: int, reason: str) -> None:
        if not self._closed:
            self._closed = True
            self.close_code, self.close_reason = code, reason
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _to_peer(self, fn: Callable[..., None], *args: Any) -> None:
        peer = self.peer
        if peer is None:
            return
        if peer._loop is self._loop:
            fn(*args)
            return
        with contextlib.suppress(RuntimeError):  # the peer's loop is closed: it is gone
            peer._loop.call_soon_threadsafe(fn, *args)

    # ------------------------------------------------------------------ WSConnection API
    @property
    def is_open(self) -> bool:
        return not self._closed

    def admit(self, fragment_cap: int | None = None, *, account: str | None = None) -> None:
        """Nothing to lift in-process (messages are never fragmented, no receive budget);
        kept so that owners can treat both transports alike."""

    def cooling(self) -> float:
        """No receive budget in-process: never cooling down."""
        return 0.0

    def penalize(self) -> None:
        """No receive budget in-process: nothing to penalise."""

    async def recv(self) -> memoryview | Segments:
        """The next complete message.

        Raises:
            ConnectionClosed: the connection ended.
            MessageTooLarge: the peer sent a message over this end's limit.
        """
        while not self._messages:
            if self._error is not None:
                raise self._error
            if self._closed:
                raise ConnectionClosed(self.close_code, self.close_reason)
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._messages.popleft()

    def write(self, parts: Sequence[Buffer], *, frozen: bool = False) -> None:
        """Queue one message made of ``parts``: copied once into a writable buffer, or,
        with ``frozen=True`` (the caller never changes these buffers again), handed over
        as read-only :class:`Segments` without a copy.

        Raises:
            ConnectionClosed: the connection is closed.
        """
        if self._closed or self.peer is None:
            raise ConnectionClosed(self.close_code, self.close_reason)
        views = [memoryview(p).cast("B") for p in parts]
        length = sum(v.nbytes for v in views)
        if length > self.peer.max_message_bytes:
            # as over a socket: the receiver refuses it (its recv raises), not the sender
            self.bytes_sent += length
            self._to_peer(self.peer._too_large, length)
            return
        self.bytes_sent += length
        if frozen:
            self._to_peer(self.peer._deliver, Segments(views))
            return
        buf = self._pool.take(length) if self._pool else np.empty(length, dtype=np.uint8)
        off = 0
        for v in views:
            buf[off : off + v.nbytes] = np.frombuffer(v, dtype=np.uint8)
            off += v.nbytes
        self._to_peer(self.peer._deliver, buf.data)

    async def send(self, parts: Sequence[Buffer]) -> None:
        self.write(parts)

    async def drain(self) -> None:
        """Messages are handed over at once: nothing to wait for."""

    async def close(self, code: int | None = None, reason: str = "", timeout: float = 2.0) -> None:
        self._shutdown(1000 if code is None else code, reason)

    def abort(self) -> None:
        self._shutdown(1006, "aborted")

    def _shutdown(self, code: int, reason: str) -> None:
        if not self._closed:
            self._closed = True
            self.close_code, self.close_reason = code, reason
            if self.peer is not None:
                self._to_peer(self.peer._peer_closed, code, reason)
        self._wake()


Handler = Callable[[InProcConnection], Awaitable[None]]


class InProcServer:
    """A named in-process endpoint; :meth:`close` unregisters it."""

    def __init__(
        self, name: str, handler: Handler, loop: asyncio.AbstractEventLoop, max_message_bytes: int
    ) -> None:
        self.name = name
        self.url = f"inproc://{name}"
        self._handler = handler
        self._loop = loop
        self.max_message_bytes = max_message_bytes
        self._tasks: set[asyncio.Task[None]] = set()
        self._conns: set[InProcConnection] = set()
        self.closed = False
        # message buffers of this server's connections, reused once nothing views them
        self.pool = BufferPool(POOL_BYTES)

    def _accept(self, conn: InProcConnection) -> None:
        async def run() -> None:
            try:
                await self._handler(conn)
            finally:
                if conn.is_open:
                    conn.abort()
                self._conns.discard(conn)

        self._conns.add(conn)
        task = self._loop.create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def close(self) -> None:
        """Stop accepting connections and drop the open ones."""
        self.closed = True
        with _servers_lock:
            if _servers.get(self.name) is self:
                del _servers[self.name]
        for conn in list(self._conns):
            self._loop.call_soon_threadsafe(conn.abort)
        self.pool.clear()


async def serve(
    handler: Handler, name: str | None = None, *, max_message_bytes: int
) -> InProcServer:
    """Register an in-process server; ``inproc://NAME`` then reaches ``handler``."""
    name = name or f"aggregator-{next(_ids)}"
    server = InProcServer(name, handler, asyncio.get_running_loop(), max_message_bytes)
    with _servers_lock:
        if name in _servers and not _servers[name].closed:
            raise OSError(f"an in-process server named {name!r} is already running")
        _servers[name] = server
    return server


async def connect(
    url: str, *, max_message_bytes: int, open_timeout: float = 10.0
) -> InProcConnection:
    """Open a connection to the in-process server named by ``inproc://NAME``.

    Raises:
        ConnectionRefusedError: no server of that name is running (the agent retries,
            as it does when a TCP port is closed).
    """
    parts = urlsplit(url)
    name = parts.netloc or parts.path.lstrip("/")
    with _servers_lock:
        server = _servers.get(name)
    if server is None or server.closed:
        raise ConnectionRefusedError(f"no in-process aggregator named {name!r} is running")
    loop = asyncio.get_running_loop()
    cid = next(_ids)
    client = InProcConnection(loop, max_message_bytes, f"inproc:{name}", server.pool)
    srv_end = InProcConnection(
        server._loop, server.max_message_bytes, f"inproc:client-{cid}", server.pool
    )
    client.peer, srv_end.peer = srv_end, client
    if server._loop is loop:
        server._accept(srv_end)
    else:
        try:
            server._loop.call_soon_threadsafe(server._accept, srv_end)
        except RuntimeError:
            raise ConnectionRefusedError(f"in-process aggregator {name!r} stopped") from None
    return client
