"""WebSocket (RFC 6455) transport with a bulk path built for big models.

The HTTP upgrade handshake is done by the ``websockets`` library's sans-I/O protocol
objects. After it, frames are parsed here by an :class:`asyncio.BufferedProtocol` that
lets the event loop ``recv`` a large frame's payload *directly* into a buffer allocated for
exactly that message (no intermediate copies), unmasks it in place with numpy, and hands
it to the codec, which builds arrays as views of it. Outgoing messages are written as one
binary frame from the codec's list of buffers (client frames are masked while they are
copied once into the frame buffer, as RFC 6455 requires). With uvloop this moves a
100 MB model at several GB/s over loopback; ``bench/transfer.py`` measures it.

Frames are never interleaved: a frame is queued on the transport in one synchronous step.
Buffers given to :meth:`WSConnection.send` must not be mutated afterwards.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import ssl as ssl_mod
import struct
import weakref
from collections.abc import Awaitable, Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

import numpy as np
from websockets.client import ClientProtocol
from websockets.datastructures import Headers
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.uri import parse_uri

from fedstack.errors import ConnectionClosed, MessageTooLarge, RemoteProtocolError
from fedstack.transport.budget import ByteBudget, Hold
from fedstack.transport.http import (
    HttpError,
    HttpHandler,
    HttpRequest,
    HttpResponse,
    error_response,
    parse_request,
)

_HS_LOG = logging.getLogger("fedstack.transport.handshake")
_HS_LOG.setLevel(logging.WARNING)

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
_MAX_HANDSHAKE = 16 * 1024
HANDSHAKE_TIMEOUT = 10.0
"""Seconds a server connection may take to complete its HTTP upgrade (slow-loris guard)."""
_SCRATCH = 256 * 1024
_QUEUE_HIGH = 8  # complete messages buffered before we stop reading (backpressure)
_HTTP_DISCARD = 1 << 20  # bytes read (and dropped) after a plain HTTP request before we abort

Buffer = bytes | bytearray | memoryview


def _mask_into(dst: np.ndarray[Any, Any], src: Buffer, key: bytes, phase: int) -> None:
    """Write ``src`` XOR the mask (starting at mask position ``phase``) into ``dst``."""
    s = np.frombuffer(src, dtype=np.uint8)
    k = np.frombuffer((key * 2)[phase : phase + 4], dtype=np.uint8)
    n4 = s.size // 4 * 4
    if n4:
        np.bitwise_xor(
            s[:n4].view(np.uint32), k.view(np.uint32)[0], out=dst[:n4].view(np.uint32)
        )
    if s.size > n4:
        np.bitwise_xor(s[n4:], k[: s.size - n4], out=dst[n4 : s.size])


def _unmask(buf: np.ndarray[Any, Any], key: bytes) -> None:
    """XOR ``buf`` with the 4-byte mask ``key`` in place."""
    n4 = buf.size // 4 * 4
    k = np.frombuffer(key, dtype=np.uint8)
    if n4:
        words = buf[:n4].view(np.uint32)
        np.bitwise_xor(words, k.view(np.uint32)[0], out=words)
    if buf.size > n4:
        buf[n4:] ^= k[: buf.size - n4]


def _frame_header(opcode: int, length: int, mask: bytes | None) -> bytes:
    b0 = 0x80 | opcode
    mbit = 0x80 if mask is not None else 0
    if length < 126:
        head = struct.pack("!BB", b0, mbit | length)
    elif length < 1 << 16:
        head = struct.pack("!BBH", b0, mbit | 126, length)
    else:
        head = struct.pack("!BBQ", b0, mbit | 127, length)
    return head + mask if mask is not None else head


class WSConnection(asyncio.BufferedProtocol):
    """One WebSocket connection, client or server side.

    Use :func:`connect` or :func:`serve` to make one; then ``await recv()`` gives each
    binary message as a ``memoryview`` and ``await send(parts)`` sends one.
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
    ) -> None:
        self.client = client
        # big incoming messages take bytes of this budget (shared by the server's
        # connections) from their first frame header until they are freed or the reader
        # asks for the next message; when it is spent, reading stops (TCP backpressure)
        self._budget = receive_budget
        self._deferred: tuple[int, bool, int] | None = None  # (opcode, fin, length) waiting
        self._stash = bytearray()  # bytes read after a deferred header
        self._msg_hold: Hold | None = None  # of the message being assembled
        self._last_hold: Hold | None = None  # of the last message recv() returned
        self._holds: collections.deque[tuple[memoryview, Hold]] = collections.deque()
        self._http_handler = http_handler
        self._http = False  # a plain HTTP request is being answered: drop further input
        self._http_task: asyncio.Task[None] | None = None
        self._http_discarded = 0
        self._http_replied = False
        self._http_eof = False
        self.handshake_timeout = handshake_timeout
        self.max_message_bytes = max_message_bytes
        self._on_open = on_open
        self._uri = uri
        self.transport: asyncio.Transport | None = None
        self.remote_address: str = ""
        self.request: Request | None = None
        self._open = False
        self._closed = False
        self.close_code = 1006
        self.close_reason = ""
        self._handshake = bytearray()
        self._hs_proto: ServerProtocol | ClientProtocol | None = None
        self._hs_timer: asyncio.TimerHandle | None = None
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed_future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # frame parser state
        # np.empty: pages are touched only as data arrives (1,000 idle connections do not
        # cost 1,000 x 256 KiB of resident memory)
        self._scratch = np.empty(_SCRATCH, dtype=np.uint8).data
        self._hdr = bytearray()
        self._need_hdr = 2
        self._in_payload = False
        self._opcode = 0
        self._fin = False
        self._mask: bytes | None = None
        self._payload_len = 0
        self._payload_start = 0  # where this frame's payload starts in the target buffer
        self._filled = 0  # bytes of this frame's payload received
        self._msg: np.ndarray[Any, Any] | None = None  # data message being assembled
        self._msg_len = 0
        self._ctrl = bytearray()
        self._messages: collections.deque[memoryview] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._paused_reading = False
        self._paused_writing = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._error: RemoteProtocolError | None = None
        self.bytes_received = 0
        self.bytes_sent = 0

    # ------------------------------------------------------------------ asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.remote_address = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        if not self.client:
            # drain() waits until the transport handed every byte to the kernel, so a
            # sender that holds a byte budget until drain() returns holds it truly
            if self.transport is not None:
                self.transport.set_write_buffer_limits(high=64 * 1024, low=0)
            self._hs_timer = asyncio.get_running_loop().call_later(
                self.handshake_timeout or HANDSHAKE_TIMEOUT, self._handshake_expired)
        if self.client:
            assert self._uri is not None and self.transport is not None
            proto = ClientProtocol(parse_uri(self._uri), max_size=None, logger=_HS_LOG)
            self._hs_proto = proto
            proto.send_request(proto.connect())
            for chunk in proto.data_to_send():
                self.transport.write(chunk)

    def _handshake_expired(self) -> None:
        if not self._open and self.transport is not None:
            self.close_reason = "handshake timeout"
            self.transport.abort()

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._in_payload and self._payload_len - self._filled > _SCRATCH // 4:
            target = self._payload_target()
            start = self._payload_start + self._filled
            return target.data[start : self._payload_start + self._payload_len]
        return memoryview(self._scratch)

    def buffer_updated(self, nbytes: int) -> None:
        self.bytes_received += nbytes
        if self._error is not None:
            return  # broken stream: ignore the rest until the owner closes
        try:
            if self._in_payload and self._payload_len - self._filled > _SCRATCH // 4:
                # received straight into the payload buffer
                self._filled += nbytes
                if self._filled == self._payload_len:
                    self._end_frame()
                return
            self._feed(memoryview(self._scratch)[:nbytes])
        except RemoteProtocolError as exc:
            # Stop reading; recv() raises this so the owner can reply with an error
            # message before it closes the connection.
            self._error = exc
            if self.transport is not None:
                self.transport.pause_reading()
            self._wake()

    def eof_received(self) -> bool | None:
        if self._http and not self._http_replied:
            self._http_eof = True
            return True  # the client finished sending: keep the socket open for the answer
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._release_budget()
        if self._hs_timer is not None:
            self._hs_timer.cancel()
        if not self.opened.done():
            self.opened.set_exception(ConnectionClosed(self.close_code, self.close_reason or
                                                       "closed during handshake"))
            self.opened.exception()  # mark retrieved
        if not self.closed_future.done():
            self.closed_future.set_result(None)
        self._wake()
        for w in self._drain_waiters:
            if not w.done():
                w.set_result(None)
        self._drain_waiters.clear()

    def pause_writing(self) -> None:
        self._paused_writing = True

    def resume_writing(self) -> None:
        self._paused_writing = False
        for w in self._drain_waiters:
            if not w.done():
                w.set_result(None)
        self._drain_waiters.clear()

    # ------------------------------------------------------------------ parsing
    def _payload_target(self) -> np.ndarray[Any, Any]:
        if self._opcode in (OP_BINARY, OP_CONT):
            assert self._msg is not None
            return self._msg
        return np.frombuffer(self._ctrl, dtype=np.uint8)

    def _feed(self, data: memoryview) -> None:
        if self._deferred is not None:  # read before pause_reading took effect
            self._stash += data
            return
        pos, n = 0, len(data)
        while pos < n and not self._closed:
            if self._http:  # one request per connection; its body (if any) is never read
                self._http_discarded += n - pos
                if self._http_discarded > _HTTP_DISCARD:
                    self._abort("too much data after an HTTP request")
                return
            if not self._open:
                pos = self._feed_handshake(data, pos)
                continue
            if not self._in_payload:
                take = min(self._need_hdr - len(self._hdr), n - pos)
                self._hdr += data[pos : pos + take]
                pos += take
                if len(self._hdr) == self._need_hdr:
                    self._parse_header()
                    if self._deferred is not None:  # waiting for the receive budget
                        self._stash += data[pos:]
                        return
                continue
            take = min(self._payload_len - self._filled, n - pos)
            target = self._payload_target()
            start = self._payload_start + self._filled
            target[start : start + take] = np.frombuffer(data[pos : pos + take], dtype=np.uint8)
            self._filled += take
            pos += take
            if self._filled == self._payload_len:
                self._end_frame()

    def _feed_handshake(self, data: memoryview, pos: int) -> int:
        before = len(self._handshake)
        self._handshake += data[pos:]
        end = self._handshake.find(b"\r\n\r\n", max(0, before - 3))
        if end < 0:
            if len(self._handshake) > _MAX_HANDSHAKE:
                if self._http_handler is not None and not self.client:
                    self._http = True
                    self._handshake.clear()
                    self._reply_http(error_response(431, "request head too large",
                                                    f"at most {_MAX_HANDSHAKE} bytes"))
                    return len(data)
                self._abort("handshake too large")
            return len(data)
        consumed = end + 4 - before  # bytes of this chunk that belong to the handshake
        del self._handshake[end + 4 :]
        self._finish_handshake()
        return pos + consumed

    def _finish_handshake(self) -> None:
        assert self.transport is not None
        raw = bytes(self._handshake)
        self._handshake.clear()
        if self.client:
            proto = self._hs_proto
            assert isinstance(proto, ClientProtocol)
            proto.receive_data(raw)
            events = proto.events_received()
            if proto.state is not State.OPEN or not events:
                why = proto.handshake_exc or "no response"
                self._abort(f"WebSocket handshake failed: {why}")
                return
        else:
            if self._http_handler is not None and self._route_http(raw):
                return
            sproto = ServerProtocol(max_size=None, logger=_HS_LOG)
            sproto.receive_data(raw)
            events = sproto.events_received()
            if not events or not isinstance(events[0], Request):
                self._abort("bad WebSocket handshake request")
                return
            self.request = events[0]
            response: Response = sproto.accept(self.request)
            if response.status_code != 101:
                response = Response(
                    response.status_code, response.reason_phrase,
                    Headers([("Content-Length", str(len(response.body)))]), response.body,
                )
            sproto.send_response(response)
            for chunk in sproto.data_to_send():
                self.transport.write(chunk)
            if response.status_code != 101:
                self.transport.close()
                return
        self._hs_proto = None
        self._open = True
        if self._hs_timer is not None:
            self._hs_timer.cancel()
        if not self.opened.done():
            self.opened.set_result(None)
        if self._on_open is not None:
            self._on_open(self)

    # ------------------------------------------------------------------ plain HTTP
    def _route_http(self, raw: bytes) -> bool:
        """Serve ``raw`` with the HTTP handler unless it is a WebSocket upgrade.

        Returns True if the request was taken (answered now or by a task).
        """
        assert self._http_handler is not None and self.transport is not None
        tls = self.transport.get_extra_info("sslcontext") is not None
        try:
            req = parse_request(raw, self.remote_address, tls)
        except HttpError as exc:
            self._http = True
            self._reply_http(exc.response)
            return True
        if req.is_websocket_upgrade:
            return False
        self._http = True
        self._http_task = asyncio.get_running_loop().create_task(self._run_http(req))
        return True

    async def _run_http(self, req: HttpRequest) -> None:
        assert self._http_handler is not None
        try:
            response = await self._http_handler(req)
        except Exception:
            logging.getLogger("fedstack.transport").exception(
                "HTTP handler failed on %s %s from %s", req.method, req.path[:200],
                self.remote_address)
            response = error_response(500, "internal error", "see the aggregator's log")
        self._reply_http(response)

    def _reply_http(self, response: HttpResponse) -> None:
        """Write ``response`` and close; the handshake deadline still bounds the linger."""
        transport = self.transport
        if transport is None or transport.is_closing() or self._http_replied:
            return
        self._http_replied = True
        transport.write(response.serialize())
        self.bytes_sent += len(response.body)
        if transport.can_write_eof() and not self._http_eof:
            # half-close and drain what the client still sends (an unread request body
            # would make the kernel reset the connection before the client reads the
            # answer); EOF from the client, or the handshake deadline, ends it
            transport.write_eof()
        else:
            transport.close()

    def _parse_header(self) -> None:
        h = self._hdr
        b0, b1 = h[0], h[1]
        masked = bool(b1 & 0x80)
        len7 = b1 & 0x7F
        need = 2 + (2 if len7 == 126 else 8 if len7 == 127 else 0) + (4 if masked else 0)
        if len(h) < need:
            self._need_hdr = need
            return
        if b0 & 0x70:
            raise RemoteProtocolError("reserved bits set (no extension negotiated)", "bad-frame")
        opcode = b0 & 0x0F
        fin = bool(b0 & 0x80)
        if masked == self.client:
            raise RemoteProtocolError("client frames must be masked, server's not", "bad-frame")
        if len7 == 126:
            length = struct.unpack_from("!H", h, 2)[0]
        elif len7 == 127:
            length = struct.unpack_from("!Q", h, 2)[0]
        else:
            length = len7
        self._mask = bytes(h[need - 4 : need]) if masked else None
        self._hdr = bytearray()
        self._need_hdr = 2
        if opcode >= 0x8:
            if length > 125 or not fin:
                raise RemoteProtocolError("invalid control frame", "bad-frame")
            self._ctrl = bytearray(length)
            self._payload_start = 0
        elif opcode == OP_BINARY or opcode == OP_CONT:
            if opcode == OP_BINARY and self._msg is not None:
                raise RemoteProtocolError("new message before the previous one ended", "bad-frame")
            if opcode == OP_CONT and self._msg is None:
                raise RemoteProtocolError("continuation frame without a message", "bad-frame")
            total = self._msg_len + length
            if total > self.max_message_bytes:
                raise MessageTooLarge(total, self.max_message_bytes)
            if self._msg is None:
                if self._budget is not None and self._budget.counts(length):
                    hold = Hold(self._budget, length)
                    if not self._budget.request(length, self._budget_granted):
                        self._deferred = (opcode, fin, length)
                        self._msg_hold = hold
                        if self.transport is not None:
                            self.transport.pause_reading()
                        return
                    self._msg_hold = hold
                self._msg = np.empty(length, dtype=np.uint8)
            elif total > self._msg.size:
                grown = np.empty(total, dtype=np.uint8)
                grown[: self._msg_len] = self._msg[: self._msg_len]
                self._msg = grown
            self._payload_start = self._msg_len
        elif opcode == OP_TEXT:
            raise RemoteProtocolError("text frames are not part of the protocol", "bad-frame")
        else:
            raise RemoteProtocolError(f"unknown opcode {opcode}", "bad-frame")
        self._start_payload(opcode, fin, length)

    def _budget_granted(self) -> None:
        """The receive budget took the bytes of the deferred message: go on reading."""
        if self._deferred is None or self._closed:
            if self._msg_hold is not None:
                self._msg_hold.release()
                self._msg_hold = None
            return
        opcode, fin, length = self._deferred
        self._deferred = None
        self._msg = np.empty(length, dtype=np.uint8)
        self._payload_start = 0
        stash, self._stash = self._stash, bytearray()
        try:
            self._start_payload(opcode, fin, length)
            if stash:
                self._feed(memoryview(stash))
        except RemoteProtocolError as exc:
            self._error = exc
            self._wake()
            return
        if (self.transport is not None and not self._paused_reading
                and self._deferred is None and self._error is None):
            self.transport.resume_reading()

    def _release_budget(self) -> None:
        if self._deferred is not None and self._budget is not None:
            self._budget.cancel(self._budget_granted)
        for hold in (self._msg_hold, self._last_hold):
            if hold is not None:
                hold.release()
        self._msg_hold = self._last_hold = None

    def _start_payload(self, opcode: int, fin: bool, length: int) -> None:
        self._opcode = opcode
        self._fin = fin
        self._payload_len = length
        self._filled = 0
        self._in_payload = True
        if length == 0:
            self._end_frame()

    def _end_frame(self) -> None:
        self._in_payload = False
        opcode = self._opcode
        if opcode >= 0x8:
            payload = bytes(self._ctrl)
            if self._mask is not None:
                buf = np.frombuffer(bytearray(payload), dtype=np.uint8)
                _unmask(buf, self._mask)
                payload = buf.tobytes()
            self._control(opcode, payload)
            return
        assert self._msg is not None
        if self._mask is not None:
            _unmask(self._msg[self._payload_start : self._payload_start + self._payload_len],
                    self._mask)
        self._msg_len += self._payload_len
        if self._fin:
            msg = self._msg.data[: self._msg_len]
            if self._msg_hold is not None:
                # released when the buffer is freed (or when recv() is called again)
                weakref.finalize(self._msg, self._msg_hold.release)
                self._holds.append((msg, self._msg_hold))
                self._msg_hold = None
            self._msg = None
            self._msg_len = 0
            self._messages.append(msg)
            if len(self._messages) >= _QUEUE_HIGH and self.transport and not self._paused_reading:
                self._paused_reading = True
                self.transport.pause_reading()
            self._wake()

    def _control(self, opcode: int, payload: bytes) -> None:
        if opcode == OP_PING:
            self._write_frame(OP_PONG, [payload])
        elif opcode == OP_CLOSE:
            code, reason = 1005, ""
            if len(payload) >= 2:
                code = struct.unpack_from("!H", payload)[0]
                reason = payload[2:].decode("utf-8", "replace")
            self.close_code, self.close_reason = code, reason
            if not self._closed:
                self._write_frame(OP_CLOSE, [payload[:2]])
                self._closed = True
                if self.transport is not None:
                    self.transport.close()
            self._wake()

    # ------------------------------------------------------------------ public API
    @property
    def in_message(self) -> bool:
        """A big message is arriving or waiting for the receive budget (the peer is not
        silent: it is sending, or held back by us)."""
        return self._deferred is not None or self._msg is not None

    @property
    def is_open(self) -> bool:
        return self._open and not self._closed

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def recv(self) -> memoryview:
        """The next complete binary message.

        Raises:
            ConnectionClosed: the connection ended (``code``/``reason`` from the peer).
        """
        while not self._messages:
            if self._error is not None:
                raise self._error
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
        if self._holds and self._holds[0][0] is msg:
            self._last_hold = self._holds.popleft()[1]
        if (self._paused_reading and len(self._messages) < _QUEUE_HIGH // 2 and self.transport
                and self._deferred is None):
            self._paused_reading = False
            self.transport.resume_reading()
        return msg

    def _write_frame(self, opcode: int, parts: Sequence[Buffer]) -> int:
        assert self.transport is not None
        length = sum(memoryview(p).nbytes for p in parts)
        if self.client:
            key = os.urandom(4)
            out = np.empty(length, dtype=np.uint8)
            off = 0
            for p in parts:
                n = memoryview(p).nbytes
                _mask_into(out[off : off + n], p, key, off % 4)
                off += n
            self.transport.writelines([_frame_header(opcode, length, key), out.data])
        else:
            self.transport.writelines([_frame_header(opcode, length, None), *parts])
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
        self._write_frame(OP_BINARY, parts)

    async def send(self, parts: Sequence[Buffer]) -> None:
        """Send one binary message made of ``parts`` (sent back to back, not copied).

        Raises:
            ConnectionClosed: the connection is closed.
        """
        if self._closed or self.transport is None or self.transport.is_closing():
            raise ConnectionClosed(self.close_code, self.close_reason)
        self._write_frame(OP_BINARY, parts)
        await self.drain()

    async def drain(self) -> None:
        """Wait until the transport's write buffer is below its high-water mark."""
        while self._paused_writing and not self._closed:
            fut = asyncio.get_running_loop().create_future()
            self._drain_waiters.append(fut)
            await fut

    def _abort(self, reason: str) -> None:
        self.close_reason = self.close_reason or reason
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
        if code is None:
            if self._error is None:
                code = 1000
            else:
                code = 1009 if isinstance(self._error, MessageTooLarge) else 1002
                reason = reason or self._error.code
        if not self._closed and self._open:
            self.close_code, self.close_reason = code, reason
            self._write_frame(OP_CLOSE, [struct.pack("!H", code) + reason.encode()[:120]])
            self._closed = True
            self._wake()
        self.transport.close()
        try:
            await asyncio.wait_for(asyncio.shield(self.closed_future), timeout)
        except TimeoutError:
            self.transport.abort()

    def abort(self) -> None:
        """Drop the connection at once, without a close frame."""
        if self.transport is not None:
            self.transport.abort()


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
) -> asyncio.Server:
    """Listen on ``host:port``; run ``handler(conn)`` in a task for each opened connection.

    A connection that has not completed its HTTP upgrade (and TLS handshake) within
    ``handshake_timeout`` seconds is dropped. With ``http_handler``, a request that is not
    a WebSocket upgrade is answered with ``await http_handler(request)`` (see
    :mod:`fedstack.transport.http`) and the connection closes; the whole exchange must fit
    in ``handshake_timeout`` too. Without it such requests get the upgrade error as before.
    ``receive_budget`` bounds the bytes of big incoming messages held at once over all the
    connections (see :mod:`fedstack.transport.budget`).
    """
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()

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
        return WSConnection(client=False, max_message_bytes=max_message_bytes, on_open=on_open,
                            handshake_timeout=handshake_timeout, http_handler=http_handler,
                            receive_budget=receive_budget)

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
        _, proto = await loop.create_connection(
            factory, host, port, ssl=ssl if secure else None
        )
        await proto.opened
        return proto

    return await asyncio.wait_for(open_(), open_timeout)
