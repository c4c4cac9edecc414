"""WebSocket (RFC 6455) transport: asyncio glue around the sans-I/O frame parser.

:class:`WSConnection` is an :class:`asyncio.BufferedProtocol`. Before the WebSocket opens it
reads an HTTP request (server side: parsed by h11, see :mod:`fedstack.transport.http`; the
upgrade is answered by the ``websockets`` library's sans-I/O handshake) or the upgrade
response (client side). After it, every byte goes to a
:class:`~fedstack.transport.frames.FrameParser`, which lets the event loop ``recv`` a large
frame's payload *directly* into a buffer allocated for exactly that message and unmasks it
in place; the codec then builds arrays as views of it. Outgoing messages are written as one
binary frame from the codec's list of buffers (client frames are masked while they are
copied once, as RFC 6455 requires). With uvloop this moves a 100 MB model at several GB/s
over loopback; ``bench/transfer.py`` measures it.

Frames are never interleaved: a frame is queued on the transport in one synchronous step.
Buffers given to :meth:`WSConnection.send` must not be mutated afterwards.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import ssl as ssl_mod
from collections.abc import Awaitable, Callable, Sequence
from urllib.parse import urlsplit

import numpy as np
from websockets.http11 import Request

from fedstack.errors import ConnectionClosed, MessageTooLarge, RemoteProtocolError
from fedstack.transport import frames
from fedstack.transport.budget import ByteBudget, Hold, Tab
from fedstack.transport.frames import (
    OP_BINARY,
    OP_CLOSE,
    OP_PONG,
    Close,
    Event,
    FrameParser,
    Limit,
    Message,
    Ping,
    Violation,
)
from fedstack.transport.handshake import ClientHandshake, Refused, Routed, ServerHandshake
from fedstack.transport.http import HttpHandler, HttpRequest, HttpResponse, error_response
from fedstack.transport.limits import ConnectionGate
from fedstack.transport.standing import host_of

HANDSHAKE_TIMEOUT = 10.0
"""Seconds a server connection may take to complete its HTTP upgrade (slow-loris guard)."""
UNREGISTERED_FRAGMENT_BYTES = 64 * 1024
"""A server connection's fragmented messages are capped at this until it is admitted."""
_HS_CHUNK = 64 * 1024
_QUEUE_HIGH = 8  # complete messages buffered before we stop reading (backpressure)
_HTTP_DISCARD = 1 << 20  # bytes read (and dropped) after a plain HTTP request before we abort

Buffer = bytes | bytearray | memoryview


class WSConnection(asyncio.BufferedProtocol):
    """One WebSocket connection, client or server side.

    Use :func:`connect` or :func:`serve` to make one; then ``await recv()`` gives each
    binary message as a ``memoryview`` and ``await send(parts)`` sends one.

    A server connection starts unadmitted: its fragmented messages may hold at most
    ``fragment_cap`` bytes until :meth:`admit` is called, or until the reader asks for a
    second message (it accepted the first: the agent registered). Until then, or until
    the owner sends it a message, it also counts as a stranger for the server's
    :class:`~fedstack.transport.limits.ConnectionGate`, which may drop it to make room.

    With a :class:`~fedstack.transport.budget.ByteBudget`, a server connection is charged
    through a :class:`~fedstack.transport.budget.Tab`: as a stranger of its source host
    until :meth:`admit` names the agent's account, and its account takes a strike when the
    peer drops an upload that held budget bytes (or the owner calls :meth:`penalize`).
    Until admitted, no message may exceed ``first_cap`` bytes (what registration needs).
    """

    def __init__(
        self,
        *,
        client: bool,
        max_message_bytes: int,
        on_open: Callable[[WSConnection], None] | None = None,
        uri: str | None = None,
        handshake_timeout: float | None = None,
        http_handler: HttpHandler | None = None,
        receive_budget: ByteBudget | None = None,
        fragment_cap: int | None = None,
        gate: ConnectionGate | None = None,
        first_cap: Limit | None = None,
    ) -> None:
        self.client = client
        self._gate = gate
        self._vouched = gate is None
        self.max_message_bytes = max_message_bytes
        self.handshake_timeout = handshake_timeout
        self._on_open = on_open
        self._uri = uri
        self._http_handler = http_handler
        # big incoming messages take bytes of this budget (shared by the server's
        # connections) from their first frame header until they are freed or the reader
        # asks for the next message; when it is spent, reading stops (TCP backpressure)
        self._parser = FrameParser(
            client=client,
            max_message_bytes=max_message_bytes,
            fragment_cap=fragment_cap,
            first_cap=first_cap,
            budget=receive_budget,
            on_granted=self._budget_granted,
        )
        self._receive_budget = receive_budget
        self._tab: Tab | None = None  # set when the peer's address is known (server side)
        self._penalized = False
        self._local_close = False  # we closed or dropped it (no strike for the peer)
        self._admitted = fragment_cap is None
        self.transport: asyncio.Transport | None = None
        self.remote_address: str = ""
        self.request: Request | None = None
        self._open = False
        self._closed = False
        self.close_code = 1006
        self.close_reason = ""
        # handshake
        self._hs_buf = np.empty(_HS_CHUNK, dtype=np.uint8)
        self._handshake: ServerHandshake | ClientHandshake | None = None
        self._hs_timer: asyncio.TimerHandle | None = None
        # plain HTTP
        self._http = False  # a plain HTTP request is being answered: drop further input
        self._http_task: asyncio.Task[None] | None = None
        self._http_discarded = 0
        self._http_replied = False
        self._http_eof = False
        loop = asyncio.get_running_loop()
        self.opened: asyncio.Future[None] = loop.create_future()
        self.closed_future: asyncio.Future[None] = loop.create_future()
        # messages
        self._last_hold: Hold | None = None  # of the last message recv() returned
        self._holds: collections.deque[tuple[memoryview, Hold]] = collections.deque()
        self._messages: collections.deque[memoryview] = collections.deque()
        self._returned = 0
        self._waiter: asyncio.Future[None] | None = None
        self._queue_full = False
        self._reading_paused = False
        self._paused_writing = False
        self._pending_pong: bytes | None = None
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._error: RemoteProtocolError | None = None
        self.bytes_received = 0
        self.bytes_sent = 0
        self.pongs_dropped = 0

    # ------------------------------------------------------------------ asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        assert self.transport is not None
        peer = transport.get_extra_info("peername")
        self.remote_address = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        if self.client:
            assert self._uri is not None
            client = ClientHandshake(self._uri)
            self._handshake = client
            self.transport.write(client.request())
            return
        # drain() waits until the transport handed every byte to the kernel, so a sender
        # that holds a byte budget until drain() returns holds it truly
        self.transport.set_write_buffer_limits(high=64 * 1024, low=0)
        budget = self._receive_budget
        if isinstance(budget, ByteBudget):
            self._tab = budget.tab(budget.standing.account(self._host_key))
            self._parser.charge_to(self._tab)
        tls = transport.get_extra_info("sslcontext") is not None
        self._handshake = ServerHandshake(
            self.remote_address, tls, http=self._http_handler is not None
        )
        self._hs_timer = asyncio.get_running_loop().call_later(
            self.handshake_timeout or HANDSHAKE_TIMEOUT, self._handshake_expired
        )
        if self._gate is not None:
            self._gate.opened(self)  # may drop the oldest stranger (or this one)

    def _handshake_expired(self) -> None:
        if not self._open and self.transport is not None:
            self.close_reason = "handshake timeout"
            self.transport.abort()

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._open:
            return self._parser.get_buffer(sizehint)
        return self._hs_buf.data

    def buffer_updated(self, nbytes: int) -> None:
        self.bytes_received += nbytes
        if self._open:
            self._handle(self._parser.buffer_updated(nbytes))
        elif not self._closed:
            self._handshake_data(self._hs_buf.data[:nbytes])

    def eof_received(self) -> bool | None:
        if self._http and not self._http_replied:
            self._http_eof = True
            return True  # the client finished sending: keep the socket open for the answer
        return None

    @property
    def _host_key(self) -> str:
        return f"host {host_of(self.remote_address)}"

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._release()
        if self._parser.dropped_partial and not self._local_close:
            self.penalize()  # the peer dropped an upload that held budget bytes
        if self._gate is not None:
            self._gate.closed(self)
        if self._hs_timer is not None:
            self._hs_timer.cancel()
        if not self.opened.done():
            self.opened.set_exception(
                ConnectionClosed(self.close_code, self.close_reason or "closed during handshake")
            )
            self.opened.exception()  # mark retrieved
        if not self.closed_future.done():
            self.closed_future.set_result(None)
        self._wake()
        self._wake_drainers()

    def pause_writing(self) -> None:
        self._paused_writing = True

    def resume_writing(self) -> None:
        self._paused_writing = False
        if self._pending_pong is not None and not self._closed:
            pong, self._pending_pong = self._pending_pong, None
            self._write_frame(OP_PONG, [pong])
        self._wake_drainers()

    def _wake_drainers(self) -> None:
        for w in self._drain_waiters:
            if not w.done():
                w.set_result(None)
        self._drain_waiters.clear()

    # ------------------------------------------------------------------ frames
    def _handle(self, events: list[Event]) -> None:
        for ev in events:
            if isinstance(ev, Message):
                self._messages.append(ev.data)
                if ev.hold is not None:
                    # released when the buffer is freed (or when recv() is called again)
                    self._holds.append((ev.data, ev.hold))
                if len(self._messages) >= _QUEUE_HIGH:
                    self._queue_full = True
                self._wake()
            elif isinstance(ev, Ping):
                self._pong(ev.payload)
            elif isinstance(ev, Close):
                self.close_code, self.close_reason = ev.code, ev.reason
                if not self._closed:
                    self._write_frame(
                        OP_CLOSE, [frames.close_payload(ev.code)[:2]] if ev.code != 1005 else []
                    )
                    self._closed = True
                    if self.transport is not None:
                        self.transport.close()
                self._wake()
            elif isinstance(ev, Violation):
                # Stop reading; recv() raises this so the owner can reply with an error
                # message before it closes the connection.
                self._error = ev.error
                self._wake()
        self._update_reading()

    def _pong(self, payload: bytes) -> None:
        """Answer a ping, unless the peer is not reading: then only the latest ping is
        answered once the write buffer drains (RFC 6455 5.5.3), so a ping flood costs no
        memory."""
        if self._closed:
            return
        if self._paused_writing:
            if self._pending_pong is not None:
                self.pongs_dropped += 1
            self._pending_pong = payload
            return
        self._write_frame(OP_PONG, [payload])

    def _update_reading(self) -> None:
        transport = self.transport
        if transport is None or self._closed:
            return
        pause = self._queue_full or self._parser.waiting or self._error is not None
        if pause != self._reading_paused:
            self._reading_paused = pause
            (transport.pause_reading if pause else transport.resume_reading)()

    def _budget_granted(self) -> None:
        """The receive budget took the bytes the parser waited for: go on reading."""
        self._handle(self._parser.resume())

    def _release(self) -> None:
        """Free the message being assembled and every budget byte this connection holds."""
        self._parser.close()
        if self._last_hold is not None:
            self._last_hold.release()
            self._last_hold = None

    # ------------------------------------------------------------------ handshake
    def _handshake_data(self, data: memoryview) -> None:
        if self._http:  # one request per connection; its body (if any) is never read
            self._http_discarded += len(data)
            if self._http_discarded > _HTTP_DISCARD:
                self._abort("too much data after an HTTP request")
            return
        assert self.transport is not None
        hs = self._handshake
        if isinstance(hs, ClientHandshake):
            try:
                rest = hs.feed(data)
            except ConnectionClosed as exc:
                self._abort(exc.reason)
                return
            if rest is not None:
                self._opened(rest)
            return
        assert hs is not None
        outcome = hs.feed(data)
        if outcome is None:
            return
        if isinstance(outcome, Routed):
            self._http = True
            self._http_task = asyncio.get_running_loop().create_task(
                self._run_http(outcome.request)
            )
        elif isinstance(outcome, Refused):
            if outcome.error is not None:  # a malformed request: answered like HTTP
                self._http = True
                self._reply_http(outcome.response)
            else:  # the upgrade was refused
                self.transport.write(outcome.response)
                self._closed = True
                self.transport.close()
        else:
            self.request = outcome.request
            self.transport.write(outcome.response)
            self._opened(outcome.rest)

    def _opened(self, rest: bytes) -> None:
        self._handshake = None
        self._open = True
        if self._hs_timer is not None:
            self._hs_timer.cancel()
        if not self.opened.done():
            self.opened.set_result(None)
        if self._on_open is not None:
            self._on_open(self)
        if rest:
            self._handle(self._parser.feed(rest))

    # ------------------------------------------------------------------ plain HTTP
    async def _run_http(self, req: HttpRequest) -> None:
        assert self._http_handler is not None
        try:
            response = await self._http_handler(req)
        except Exception:
            logging.getLogger("fedstack.transport").exception(
                "HTTP handler failed on %s %s from %s",
                req.method,
                req.path[:200],
                self.remote_address,
            )
            response = error_response(500, "internal error", "see the aggregator's log")
        self._reply_http(response)

    def _reply_http(self, response: HttpResponse | bytes) -> None:
        """Write ``response`` and close; the handshake deadline still bounds the linger."""
        transport = self.transport
        if transport is None or transport.is_closing() or self._http_replied:
            return
        self._http_replied = True
        wire = response if isinstance(response, bytes) else response.serialize()
        transport.write(wire)
        self.bytes_sent += len(wire)
        if transport.can_write_eof() and not self._http_eof:
            # half-close and drain what the client still sends (an unread request body
            # would make the kernel reset the connection before the client reads the
            # answer); EOF from the client, or the handshake deadline, ends it
            transport.write_eof()
        else:
            transport.close()

    # ------------------------------------------------------------------ public API
    @property
    def in_message(self) -> bool:
        """A big message is arriving or waiting for the receive budget (the peer is not
        silent: it is sending, or held back by us)."""
        return self._parser.in_message

    @property
    def waiting_for_budget(self) -> bool:
        """Reading is suspended until the receive budget grants the bytes of the message
        that is arriving (the peer is held back by us, not slow)."""
        return self._parser.waiting

    @property
    def message_progress(self) -> tuple[int, int | None]:
        """Of the big message arriving: bytes received so far and its total size when known
        (see :attr:`FrameParser.progress`; read it periodically, not per chunk)."""
        return self._parser.progress

    @property
    def holds_contended(self) -> bool:
        """The message arriving holds receive-budget bytes that other connections'
        messages wait for (see :meth:`~fedstack.transport.budget.ByteBudget.contended`)."""
        tab = self._tab
        return tab is not None and self._parser.holding and tab.contended()

    def drop_message(self) -> None:
        """Give up on the message arriving: free its buffer and the budget bytes it holds at
        once, and discard whatever the peer still sends (the caller then closes the
        connection, e.g. after telling the peer why)."""
        self._local_close = True  # dropped by us: the caller decides about a strike
        self._parser.close()

    @property
    def is_open(self) -> bool:
        return self._open and not self._closed

    def admit(self, fragment_cap: int | None = None, *, account: str | None = None) -> None:
        """Lift the cap on fragmented messages (to ``fragment_cap``, default the message
        limit) and on the first message: call once the peer is registered. ``account``
        (e.g. the agent's id) names whose standing the receive budget serves its messages
        by from now on (None: no standing, trusted; see
        :class:`~fedstack.transport.budget.Tab`)."""
        self._admitted = True
        self._parser.admit(fragment_cap)
        if self._tab is not None:
            standing = self._tab.budget.standing
            key = None if account is None else f"agent {account}"
            self._tab.admit(None if key is None else standing.account(key, parent=self._host_key))
        self._vouch()

    def cooling(self) -> float:
        """Seconds left of the cool-down its account serves (0: none; see
        :mod:`fedstack.transport.standing`)."""
        tab = self._tab
        if tab is None:
            return 0.0
        until = tab.account.not_before(stranger=tab.stranger)
        return max(0.0, until - tab.budget.clock())

    def penalize(self) -> None:
        """The peer misbehaved (trickled, went silent mid-upload, broke the protocol; an
        upload it drops while holding budget bytes does this by itself): its account
        takes one strike (once per connection; see :mod:`fedstack.transport.standing`)."""
        if self._tab is not None and not self._penalized:
            self._penalized = True
            self._tab.strike()

    def _vouch(self) -> None:
        """The owner accepted this peer: it no longer counts as a stranger."""
        if not self._vouched:
            self._vouched = True
            if self._gate is not None:
                self._gate.admitted(self)

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def recv(self) -> memoryview:
        """The next complete binary message.

        Raises:
            ConnectionClosed: the connection ended (``code``/``reason`` from the peer).
            RemoteProtocolError: the peer broke the protocol (``MessageTooLarge`` for a
                size limit); :meth:`close` then sends the matching close code.
        """
        if self._returned and not self._admitted:
            self.admit()  # the reader accepted the first message
        while not self._messages:
            if self._error is not None:
                raise _fresh(self._error)
            if self._closed:
                raise ConnectionClosed(self.close_code, self.close_reason)
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        if self._last_hold is not None:  # the reader is done with the previous message
            self._last_hold.release()
            self._last_hold = None
        msg = self._messages.popleft()
        self._returned += 1
        if self._holds and self._holds[0][0] is msg:
            self._last_hold = self._holds.popleft()[1]
        if self._queue_full and len(self._messages) < _QUEUE_HIGH // 2:
            self._queue_full = False
            self._update_reading()
        return msg

    def _write_frame(self, opcode: int, parts: Sequence[Buffer]) -> int:
        assert self.transport is not None
        out = frames.serialize(opcode, parts, mask=self.client)
        self.transport.writelines(out)
        length = (
            memoryview(out[1]).nbytes if self.client else sum(memoryview(p).nbytes for p in parts)
        )
        self.bytes_sent += length
        return length

    def write(self, parts: Sequence[Buffer], *, frozen: bool = False) -> None:
        """Queue one binary message now, without waiting for the peer to take it.
        (``frozen`` matters only to the in-process transport: here the bytes go to the
        socket either way.)

        Raises:
            ConnectionClosed: the connection is closed.
        """
        if self._closed or self.transport is None or self.transport.is_closing():
            raise ConnectionClosed(self.close_code, self.close_reason)
        if not self._vouched:
            self._vouch()  # the owner answers it: not a stranger any more
        self._write_frame(OP_BINARY, parts)

    async def send(self, parts: Sequence[Buffer]) -> None:
        """Send one binary message made of ``parts`` (sent back to back, not copied).

        Raises:
            ConnectionClosed: the connection is closed.
        """
        self.write(parts)
        await self.drain()

    async def drain(self) -> None:
        """Wait until the transport's write buffer is below its high-water mark."""
        while self._paused_writing and not self._closed:
            fut = asyncio.get_running_loop().create_future()
            self._drain_waiters.append(fut)
            await fut

    def _abort(self, reason: str) -> None:
        self.close_reason = self.close_reason or reason
        self._local_close = True
        self._closed = True
        if self.transport is not None:
            self.transport.close()
        self._wake()

    async def close(self, code: int | None = None, reason: str = "", timeout: float = 2.0) -> None:
        """Close: send a close frame, flush, and wait for the peer (bounded).

        Without ``code``: 1000, or 1009/1002 after a too-large or invalid frame.
        """
        if self.transport is None:
            return
        self._local_close = True
        if code is None:
            if self._error is None:
                code = 1000
            else:
                code = 1009 if isinstance(self._error, MessageTooLarge) else 1002
                reason = reason or self._error.code
        if not self._closed and self._open:
            self.close_code, self.close_reason = code, reason
            self._write_frame(OP_CLOSE, [frames.close_payload(code, reason)])
            self._closed = True
            self._wake()
        self.transport.close()
        try:
            await asyncio.wait_for(asyncio.shield(self.closed_future), timeout)
        except TimeoutError:
            self.transport.abort()

    def abort(self) -> None:
        """Drop the connection at once, without a close frame."""
        self._local_close = True
        if self.transport is not None:
            self.transport.abort()


def _fresh(err: RemoteProtocolError) -> RemoteProtocolError:
    """A new exception like ``err``: raising the stored one would chain the connection to
    itself through the traceback (a cycle that keeps its messages until a GC pass)."""
    if isinstance(err, MessageTooLarge):
        return MessageTooLarge(err.size, err.limit)
    return RemoteProtocolError(str(err), err.code)


Handler = Callable[[WSConnection], Awaitable[None]]


async def serve(
    handler: Handler,
    host: str,
    port: int,
    *,
    max_message_bytes: int,
    ssl: ssl_mod.SSLContext | None = None,
    handshake_timeout: float = HANDSHAKE_TIMEOUT,
    http_handler: HttpHandler | None = None,
    receive_budget: ByteBudget | None = None,
    unregistered_fragment_bytes: int | None = UNREGISTERED_FRAGMENT_BYTES,
    gate: ConnectionGate | None = None,
    first_message_bytes: Limit | None = None,
) -> asyncio.Server:
    """Listen on ``host:port``; run ``handler(conn)`` in a task for each opened connection.

    A connection that has not completed its HTTP upgrade (and TLS handshake) within
    ``handshake_timeout`` seconds is dropped. With ``http_handler``, a request that is not
    a WebSocket upgrade is answered with ``await http_handler(request)`` (see
    :mod:`fedstack.transport.http`) and the connection closes; the whole exchange must fit
    in ``handshake_timeout`` too. Without it such requests get the upgrade error as before.
    ``receive_budget`` bounds the bytes of big incoming messages held at once over all the
    connections (see :mod:`fedstack.transport.budget`). A connection's fragmented messages
    may hold at most ``unregistered_fragment_bytes`` until it is admitted (see
    :class:`WSConnection`; None: no such cap). ``gate`` bounds the connections (default:
    :meth:`ConnectionGate.for_process`): past its bounds the oldest connection that is
    neither registered nor answered is dropped, so strangers cannot exhaust descriptors.
    ``first_message_bytes`` (a size, or a callable asked at each message) caps every
    message of a connection until it is admitted (None: ``max_message_bytes``).
    """
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()
    gate = gate if gate is not None else ConnectionGate.for_process()

    def on_open(conn: WSConnection) -> None:
        async def run() -> None:
            try:
                await handler(conn)
            except RemoteProtocolError:
                pass  # the handler did not deal with it; close() reports the error code
            finally:
                await conn.close() if conn.is_open else conn.abort()

        task = loop.create_task(run())
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    def factory() -> WSConnection:
        return WSConnection(
            client=False,
            max_message_bytes=max_message_bytes,
            on_open=on_open,
            handshake_timeout=handshake_timeout,
            http_handler=http_handler,
            receive_budget=receive_budget,
            fragment_cap=unregistered_fragment_bytes,
            gate=gate,
            first_cap=first_message_bytes,
        )

    return await loop.create_server(factory, host, port, ssl=ssl, backlog=4096)


async def connect(
    url: str,
    *,
    max_message_bytes: int,
    open_timeout: float = 10.0,
    ssl: ssl_mod.SSLContext | None = None,
) -> WSConnection:
    """Open a WebSocket connection to ``url`` (``ws://host:port/path`` or ``wss://``).

    Raises:
        ConnectionClosed, OSError, TimeoutError: the connection could not be opened.
    """
    parts = urlsplit(url)
    host = parts.hostname
    if parts.scheme not in ("ws", "wss") or not host:
        raise ValueError(f"not a WebSocket URL: {url!r} (expected ws://HOST:PORT)")
    secure = parts.scheme == "wss"
    port = parts.port or (443 if secure else 80)
    if secure and ssl is None:
        ssl = ssl_mod.create_default_context()
    loop = asyncio.get_running_loop()

    def factory() -> WSConnection:
        return WSConnection(client=True, max_message_bytes=max_message_bytes, uri=url)

    async def open_() -> WSConnection:
        _, proto = await loop.create_connection(factory, host, port, ssl=ssl if secure else None)
        await proto.opened
        return proto

    return await asyncio.wait_for(open_(), open_timeout)
