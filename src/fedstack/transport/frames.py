"""RFC 6455 frames, sans-I/O: bytes in, events out; messages in, bytes out.

:class:`FrameParser` is fed the way :class:`asyncio.BufferedProtocol` is: the caller asks
:meth:`FrameParser.get_buffer` where to put the next bytes, receives into it, and reports
how many arrived with :meth:`FrameParser.buffer_updated`, which returns the events those
bytes completed. While a big frame's payload arrives, the buffer handed out is the message
buffer itself, so a large message is received without any copy and unmasked in place.

Only what fedstack speaks is accepted: binary messages (possibly fragmented), ping, pong
and close. Everything else ends the stream with a :class:`Violation` event carrying the
error (:class:`~fedstack.errors.RemoteProtocolError`, or
:class:`~fedstack.errors.MessageTooLarge` for a size limit); the parser then ignores what
follows, and the caller closes with :attr:`Violation.close_code`.

Memory is accounted for, not just bounded: every byte of a message buffer is charged to
the optional receive budget (see :mod:`fedstack.transport.budget`) before it is allocated,
fragments included. A fragmented message grows its buffer geometrically (each byte is
copied O(1) times on average). Until :meth:`FrameParser.admit` is called, a fragmented
message may not exceed ``fragment_cap`` bytes, no message may exceed ``first_cap``
(what registration plausibly needs) and every message from :data:`STRANGER_CHARGE_BYTES`
up is charged: a peer that has not registered holds little, and nothing big uncounted.

Work per frame is bounded by bytes: a message may be cut into :data:`FREE_FRAGMENTS`
frames, and beyond that its frames must carry :data:`MIN_FRAGMENT_AVERAGE` bytes on
average (a flood of empty or tiny continuation frames is a violation, not CPU burnt).
"""

from __future__ import annotations

import os
import struct
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from fedstack.errors import MessageTooLarge, RemoteProtocolError
from fedstack.transport.budget import Hold

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
SCRATCH_BYTES = 256 * 1024
"""Size of the receive buffer used for headers and small frames."""
DIRECT_MIN = SCRATCH_BYTES // 4
"""A payload with more than this left to arrive is received straight into its message."""
FIRST_FRAGMENT_BYTES = 64 * 1024
"""Initial capacity of a fragmented message's buffer (it then doubles as needed)."""
STRANGER_CHARGE_BYTES = 64 * 1024
"""Before :meth:`FrameParser.admit`, messages from this size up are charged to the budget
even below its ``min_bytes``."""
FREE_FRAGMENTS = 64
"""Frames a message may be cut into whatever their sizes."""
MIN_FRAGMENT_AVERAGE = 1024
"""Beyond :data:`FREE_FRAGMENTS`, a message's frames must carry this many bytes on average."""
CLOSE_CODES = frozenset({1000, 1001, 1002, 1003, *range(1007, 1015)})
"""Close codes a peer may send (besides 3000-4999, for applications)."""

Buffer = bytes | bytearray | memoryview


class ReceiveBudget(Protocol):
    """What the parser needs of a :class:`~fedstack.transport.budget.ByteBudget`."""

    def counts(self, nbytes: int) -> bool: ...

    def request(self, n: int, granted: Callable[[], None], *, held: int = 0) -> bool: ...

    def cancel(self, granted: Callable[[], None]) -> bool: ...

    def release(self, n: int) -> None: ...


Limit = int | Callable[[], int]
"""A size limit, or a callable giving the limit in force now."""


@dataclass(frozen=True, slots=True)
class Message:
    """A complete binary message. ``data`` views a buffer owned by this message alone;
    ``hold`` (if the message was charged to the budget) is released when that buffer is
    freed, or earlier by whoever knows the reader is done with it."""

    data: memoryview
    hold: Hold | None = None


@dataclass(frozen=True, slots=True)
class Ping:
    payload: bytes


@dataclass(frozen=True, slots=True)
class Pong:
    payload: bytes


@dataclass(frozen=True, slots=True)
class Close:
    """The peer's close frame: ``code`` 1005 when it gave none."""

    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class Violation:
    """The peer broke the protocol; nothing after this is parsed."""

    error: RemoteProtocolError

    @property
    def close_code(self) -> int:
        return 1009 if isinstance(self.error, MessageTooLarge) else 1002


Event = Message | Ping | Pong | Close | Violation

# parser states
_HEADER, _PAYLOAD, _WAITING, _DONE = range(4)


def _noop() -> None:
    pass


def _violation(message: str) -> RemoteProtocolError:
    return RemoteProtocolError(message, "bad-frame")


def unmask(buf: np.ndarray[Any, Any], key: bytes) -> None:
    """XOR ``buf`` (uint8) with the 4-byte mask ``key`` in place."""
    n4 = buf.size // 4 * 4
    k = np.frombuffer(key, dtype=np.uint8)
    if n4:
        words = buf[:n4].view(np.uint32)
        np.bitwise_xor(words, k.view(np.uint32)[0], out=words)
    if buf.size > n4:
        buf[n4:] ^= k[: buf.size - n4]


def mask_into(dst: np.ndarray[Any, Any], src: Buffer, key: bytes, phase: int) -> None:
    """Write ``src`` XOR the mask (starting at mask position ``phase``) into ``dst``."""
    s = np.frombuffer(src, dtype=np.uint8)
    k = np.frombuffer((key * 2)[phase : phase + 4], dtype=np.uint8)
    n4 = s.size // 4 * 4
    if n4:
        np.bitwise_xor(s[:n4].view(np.uint32), k.view(np.uint32)[0], out=dst[:n4].view(np.uint32))
    if s.size > n4:
        np.bitwise_xor(s[n4:], k[: s.size - n4], out=dst[n4 : s.size])


def frame_header(opcode: int, length: int, mask: bytes | None, fin: bool = True) -> bytes:
    """The header of one frame (with the masking key appended if ``mask``)."""
    b0 = (0x80 if fin else 0) | opcode
    mbit = 0x80 if mask is not None else 0
    if length < 126:
        head = struct.pack("!BB", b0, mbit | length)
    elif length < 1 << 16:
        head = struct.pack("!BBH", b0, mbit | 126, length)
    else:
        head = struct.pack("!BBQ", b0, mbit | 127, length)
    return head + mask if mask is not None else head


def serialize(
    opcode: int, parts: Sequence[Buffer], *, mask: bool, fin: bool = True, key: bytes | None = None
) -> list[Buffer]:
    """One frame carrying ``parts`` back to back, as buffers to write in order.

    Server frames (``mask=False``) reference ``parts`` without copying; client frames are
    masked with ``key`` (random if None) while copied once into a new buffer.
    """
    length = sum(memoryview(p).nbytes for p in parts)
    if not mask:
        return [frame_header(opcode, length, None, fin), *parts]
    key = os.urandom(4) if key is None else key
    out = np.empty(length, dtype=np.uint8)
    off = 0
    for p in parts:
        n = memoryview(p).nbytes
        mask_into(out[off : off + n], p, key, off % 4)
        off += n
    return [frame_header(opcode, length, key, fin), out.data]


def close_payload(code: int, reason: str = "") -> bytes:
    """A close frame's payload (the reason cut to fit a control frame, on a character)."""
    raw = reason.encode()[:123].decode("utf-8", "ignore").encode()
    return struct.pack("!H", code) + raw


class FrameParser:
    """Incremental parser of the frames one side of a connection receives.

    Args:
        client: True on the client side (frames must arrive unmasked), False on the
            server side (frames must be masked).
        max_message_bytes: the largest message accepted.
        fragment_cap: the largest message accepted in several frames until :meth:`admit`
            (None: ``max_message_bytes``).
        first_cap: the largest message accepted at all until :meth:`admit` (None: no
            more than ``max_message_bytes``); a callable is asked at each message.
        budget: charged for every message buffer it counts, before it is allocated. If it
            has a ``hold(n)`` method (a :class:`~fedstack.transport.budget.Tab`), a
            complete message's :class:`Hold` comes from it.
        on_granted: called (on the budget's event loop) when a budget request that made
            the parser wait was granted; the caller then calls :meth:`resume`.
    """

    def __init__(
        self,
        *,
        client: bool,
        max_message_bytes: int,
        fragment_cap: int | None = None,
        first_cap: Limit | None = None,
        budget: ReceiveBudget | None = None,
        on_granted: Callable[[], None] | None = None,
    ) -> None:
        self.client = client
        self.first_cap = first_cap
        self.max_message_bytes = max_message_bytes
        self.fragment_cap = max_message_bytes if fragment_cap is None else fragment_cap
        self._admitted = fragment_cap is None and first_cap is None
        self._budget = budget
        self._on_granted = on_granted
        # np.empty: pages are touched only as data arrives
        self._scratch = np.empty(SCRATCH_BYTES, dtype=np.uint8)
        self._direct = False  # the last buffer handed out was the message itself
        self._state = _HEADER
        self._hdr = bytearray()
        self._need = 2
        self._opcode = 0
        self._fin = False
        self._key: bytes | None = None
        self._length = 0
        self._start = 0  # where this frame's payload starts in its target
        self._filled = 0
        self._ctrl = np.empty(125, dtype=np.uint8)
        self._msg: np.ndarray[Any, Any] | None = None  # the message being assembled
        self._msg_len = 0
        self._charged = 0  # budget bytes taken for self._msg
        self._frames = 0  # frames of self._msg so far
        self._pending: tuple[int, int] | None = None  # (new capacity, bytes) asked for
        self._stash = bytearray()  # received while waiting for the budget
        self.dropped_partial = False
        """An incomplete message holding budget bytes was dropped by :meth:`close`."""
        # one bound method, so that cancel() finds it by identity
        self._granted_cb: Callable[[], None] = self._granted

    # ------------------------------------------------------------------ state
    @property
    def in_message(self) -> bool:
        """A data message is being assembled or is waiting for the budget."""
        return self._msg is not None or self._state == _WAITING

    @property
    def holding(self) -> bool:
        """An incomplete message holds budget bytes."""
        return self._charged > 0 and self._msg is not None

    @property
    def progress(self) -> tuple[int, int | None]:
        """Of the data message being assembled: the bytes received so far, and its total
        size when known (its last frame is arriving; None: more fragments may follow).
        ``(0, None)`` when no message holds a buffer."""
        if self._msg is None:
            return 0, None
        if self._state == _PAYLOAD and self._opcode < 0x8:
            got = self._msg_len + self._filled
            return got, self._msg_len + self._length if self._fin else None
        return self._msg_len, None

    @property
    def waiting(self) -> bool:
        """Parsing is suspended until the budget grants (stop reading meanwhile)."""
        return self._state == _WAITING

    @property
    def done(self) -> bool:
        """A close frame or a violation ended the stream."""
        return self._state == _DONE

    @property
    def capacity(self) -> int:
        """Bytes of the message buffer being assembled (0 when none)."""
        return 0 if self._msg is None else int(self._msg.size)

    def admit(self, fragment_cap: int | None = None) -> None:
        """Allow fragmented messages up to ``fragment_cap`` (default: the message limit),
        and charge the budget only for the messages it counts."""
        self.fragment_cap = self.max_message_bytes if fragment_cap is None else fragment_cap
        self._admitted = True

    def charge_to(self, budget: ReceiveBudget | None) -> None:
        """Charge messages that begin from now on to ``budget`` (before the first frame:
        e.g. once the peer's address is known)."""
        self._budget = budget

    def close(self) -> None:
        """Stop: free the message being assembled and give its budget back."""
        self.dropped_partial = self.dropped_partial or self.holding
        self._state = _DONE
        self._drop_message()
        self._stash = bytearray()
        self._on_granted = None  # no reference cycle keeps the parser (or its owner) alive
        self._granted_cb = _noop

    # ------------------------------------------------------------------ receiving
    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """Where the next received bytes go (write at most its length, from its start)."""
        if (
            self._state == _PAYLOAD
            and self._opcode < 0x8
            and self._length - self._filled > DIRECT_MIN
        ):
            assert self._msg is not None
            self._direct = True
            start = self._start + self._filled
            return self._msg.data[start : self._start + self._length]
        self._direct = False
        return self._scratch.data

    def buffer_updated(self, nbytes: int) -> list[Event]:
        """``nbytes`` were written at the start of the last :meth:`get_buffer`; the events
        they complete, in order."""
        events: list[Event] = []
        if self._direct:
            self._direct = False
            if self._state == _PAYLOAD:
                self._filled += nbytes
                if self._filled == self._length:
                    self._guard(self._end_frame, events)
            return events
        self._guard(lambda ev: self._feed(self._scratch.data[:nbytes], ev), events)
        return events

    def feed(self, data: Buffer) -> list[Event]:
        """Parse ``data`` (copied through :meth:`get_buffer`); the events it completes."""
        events: list[Event] = []
        view = memoryview(data).cast("B")
        pos = 0
        while pos < len(view):
            buf = self.get_buffer()
            n = min(len(buf), len(view) - pos)
            buf[:n] = view[pos : pos + n]
            events += self.buffer_updated(n)
            pos += n
        return events

    def resume(self) -> list[Event]:
        """After ``on_granted``: take the granted bytes and parse what was held back."""
        events: list[Event] = []
        if self._state != _WAITING or self._pending is None:
            return events
        cap, nbytes = self._pending
        self._pending = None
        self._charged += nbytes
        self._state = _HEADER
        stash, self._stash = self._stash, bytearray()

        def go(ev: list[Event]) -> None:
            self._grow(cap)
            self._begin_payload()
            if self._length == 0:
                self._end_frame(ev)
            if stash:
                self._feed(memoryview(stash), ev)

        self._guard(go, events)
        return events

    def _granted(self) -> None:
        if self._state != _WAITING:  # closed meanwhile: give the bytes back
            if self._pending is not None and self._budget is not None:
                self._budget.release(self._pending[1])
            self._pending = None
            return
        if self._on_granted is not None:
            self._on_granted()

    def _guard(self, step: Callable[[list[Event]], None], events: list[Event]) -> None:
        try:
            step(events)
        except RemoteProtocolError as exc:
            self.close()
            # no traceback: it would hold this frame, hence ``events`` and every message
            # in it, in a reference cycle that only the garbage collector frees
            events.append(Violation(exc.with_traceback(None)))

    def _feed(self, data: memoryview, events: list[Event]) -> None:
        pos, n = 0, len(data)
        while pos < n:
            state = self._state
            if state == _HEADER:
                take = min(self._need - len(self._hdr), n - pos)
                self._hdr += data[pos : pos + take]
                pos += take
                if len(self._hdr) == self._need:
                    self._header(events)
            elif state == _PAYLOAD:
                take = min(self._length - self._filled, n - pos)
                start = self._start + self._filled
                target = self._msg if self._opcode < 0x8 else self._ctrl
                assert target is not None
                target[start : start + take] = np.frombuffer(data[pos : pos + take], dtype=np.uint8)
                self._filled += take
                pos += take
                if self._filled == self._length:
                    self._end_frame(events)
            elif state == _WAITING:
                self._stash += data[pos:]
                return
            else:
                return

    def _header(self, events: list[Event]) -> None:
        h = self._hdr
        b0, b1 = h[0], h[1]
        if b0 & 0x70:
            raise _violation("reserved bits set (no extension negotiated)")
        opcode = b0 & 0x0F
        fin = bool(b0 & 0x80)
        masked = bool(b1 & 0x80)
        if opcode == OP_TEXT:
            raise _violation("text frames are not part of the protocol")
        if opcode not in (OP_CONT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG):
            raise _violation(f"unknown opcode {opcode}")
        if masked == self.client:
            raise _violation("client frames must be masked, server's not")
        len7 = b1 & 0x7F
        if opcode >= 0x8 and (len7 > 125 or not fin):
            raise _violation("invalid control frame")
        need = 2 + (2 if len7 == 126 else 8 if len7 == 127 else 0) + (4 if masked else 0)
        if len(h) < need:
            self._need = need
            return
        if len7 == 126:
            length = struct.unpack_from("!H", h, 2)[0]
        elif len7 == 127:
            length = struct.unpack_from("!Q", h, 2)[0]
            if length >> 63:
                raise _violation("64-bit frame length with the top bit set")
        else:
            length = len7
        self._key = bytes(h[need - 4 : need]) if masked else None
        self._hdr = bytearray()
        self._need = 2
        self._opcode, self._fin, self._length = opcode, fin, length
        if opcode >= 0x8:
            self._start = 0
            self._begin_payload()
            if length == 0:
                self._end_frame(events)
            return
        if opcode == OP_BINARY and self._msg is not None:
            raise _violation("new message before the previous one ended")
        if opcode == OP_CONT and self._msg is None:
            raise _violation("continuation frame without a message")
        total = self._msg_len + length
        if total > self.max_message_bytes:
            raise MessageTooLarge(total, self.max_message_bytes)
        fragmented = not fin or self._msg is not None
        if fragmented and total > self.fragment_cap:
            raise MessageTooLarge(total, self.fragment_cap)
        if not self._admitted and self.first_cap is not None:
            first = self.first_cap if isinstance(self.first_cap, int) else self.first_cap()
            if total > first:
                raise MessageTooLarge(total, first)
        if fragmented:
            self._frames += 1
            if self._frames > FREE_FRAGMENTS + total // MIN_FRAGMENT_AVERAGE:
                raise _violation(
                    f"{self._frames} fragments for {total} bytes (tiny-fragment flood)"
                )
        cap = self.capacity
        limit = min(self.fragment_cap, self.max_message_bytes)
        if self._msg is None:
            cap = length if fin else min(limit, max(length, FIRST_FRAGMENT_BYTES))
        elif total > cap:  # geometric growth: each byte is copied O(1) times on average
            cap = min(limit, max(total, 2 * cap))
        if not self._charge(cap):
            return  # waiting for the budget
        self._grow(cap)
        self._begin_payload()
        if length == 0:
            self._end_frame(events)

    def _charge(self, cap: int) -> bool:
        """Take budget bytes for a buffer of ``cap`` bytes; False: wait for the grant."""
        budget = self._budget
        counted = budget is not None and (
            budget.counts(cap) or (not self._admitted and cap >= STRANGER_CHARGE_BYTES)
        )
        if budget is None or not counted or cap <= self._charged:
            return True
        more = cap - self._charged
        if budget.request(more, self._granted_cb, held=self._charged):
            self._charged = cap
            return True
        self._pending = (cap, more)
        self._state = _WAITING
        return False

    def _grow(self, cap: int) -> None:
        if self._msg is None:
            self._msg = np.empty(cap, dtype=np.uint8)
            self._msg_len = 0
        elif cap > self._msg.size:
            grown = np.empty(cap, dtype=np.uint8)
            grown[: self._msg_len] = self._msg[: self._msg_len]
            self._msg = grown
        self._start = self._msg_len

    def _begin_payload(self) -> None:
        self._filled = 0
        self._state = _PAYLOAD
        if self._length == 0 and self._opcode < 0x8:
            self._state = _HEADER  # _end_frame follows at once

    def _end_frame(self, events: list[Event]) -> None:
        self._state = _HEADER
        key, length = self._key, self._length
        if self._opcode >= 0x8:
            payload = self._ctrl[:length]
            if key is not None:
                unmask(payload, key)
            self._control(self._opcode, payload.tobytes(), events)
            return
        msg = self._msg
        assert msg is not None
        if key is not None and length:
            unmask(msg[self._start : self._start + length], key)
        self._msg_len += length
        if not self._fin:
            return
        hold: Hold | None = None
        if self._charged and self._budget is not None:
            make = getattr(self._budget, "hold", None)
            hold = make(self._charged) if make is not None else Hold(self._budget, self._charged)
            weakref.finalize(msg, hold.release)  # freed buffer -> bytes back
        events.append(Message(msg.data[: self._msg_len], hold))
        self._msg = None
        self._msg_len = self._charged = self._frames = 0

    def _control(self, opcode: int, payload: bytes, events: list[Event]) -> None:
        if opcode == OP_PING:
            events.append(Ping(payload))
        elif opcode == OP_PONG:
            events.append(Pong(payload))
        else:
            code, reason = 1005, ""
            if len(payload) == 1:
                raise _violation("close frame with a 1-byte payload")
            if len(payload) >= 2:
                code = struct.unpack_from("!H", payload)[0]
                if code not in CLOSE_CODES and not 3000 <= code <= 4999:
                    raise _violation(f"invalid close code {code}")
                try:
                    reason = payload[2:].decode("utf-8")
                except UnicodeDecodeError:
                    raise _violation("close reason is not UTF-8") from None
            self.close()
            events.append(Close(code, reason))

    def _drop_message(self) -> None:
        if self._pending is not None and self._budget is not None:
            if self._budget.cancel(self._granted_cb):
                self._pending = None
            # else: granted already; _granted gives the bytes back
        if self._charged and self._budget is not None:
            self._budget.release(self._charged)
        self._charged = self._frames = 0
        self._msg = None
        self._msg_len = 0
