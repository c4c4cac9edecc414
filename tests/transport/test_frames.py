"""The sans-I/O frame parser and serializer: golden bytes, round trips, every violation.

No sockets and no event loop: bytes go in through ``feed``/``get_buffer``, events come out.
"""

from __future__ import annotations

import gc
import os
import struct
import time
import weakref
from collections.abc import Callable

import numpy as np
import pytest

from fedstack.errors import MessageTooLarge, RemoteProtocolError
from fedstack.transport import frames
from fedstack.transport.frames import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    Close,
    Event,
    FrameParser,
    Message,
    Ping,
    Pong,
    Violation,
    mask_into,
    unmask,
)

MB = 1 << 20
KEY = bytes([0x37, 0xFA, 0x21, 0x3D])  # RFC 6455 section 5.7


def wire(opcode: int, data: bytes, *, mask: bool = True, fin: bool = True, rsv: int = 0) -> bytes:
    """One frame as a client (masked) or server (unmasked) sends it."""
    out = b"".join(bytes(p) for p in frames.serialize(opcode, [data], mask=mask, fin=fin, key=KEY))
    return bytes([out[0] | rsv]) + out[1:]


def server(max_bytes: int = 64 * MB, **kw: object) -> FrameParser:
    return FrameParser(client=False, max_message_bytes=max_bytes, **kw)  # type: ignore[arg-type]


def payload(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def drip(p: FrameParser, data: bytes, step: int) -> list[Event]:
    events: list[Event] = []
    for i in range(0, len(data), step):
        events += p.feed(data[i : i + step])
    return events


def message_bytes(events: list[Event]) -> list[bytes]:
    return [bytes(e.data) for e in events if isinstance(e, Message)]


# ---------------------------------------------------------------------------- mask helpers
@pytest.mark.parametrize("phase", range(4))
@pytest.mark.parametrize("n", [*range(10), 31, 64, 1001])
def test_mask_into_matches_xor_reference(n: int, phase: int) -> None:
    key = bytes([0x12, 0xA5, 0xFF, 0x3C])
    src = payload(n, seed=n)
    dst = np.full(n + 8, 0x77, dtype=np.uint8)
    mask_into(dst[3 : 3 + n], src, key, phase)  # an unaligned destination
    want = bytes(b ^ key[(phase + i) % 4] for i, b in enumerate(src))
    assert dst[3 : 3 + n].tobytes() == want
    assert (dst[:3] == 0x77).all() and (dst[3 + n :] == 0x77).all()  # nothing else touched


@pytest.mark.parametrize("offset", range(4))
@pytest.mark.parametrize("n", [*range(10), 33, 1000])
def test_unmask_matches_xor_reference(n: int, offset: int) -> None:
    key = os.urandom(4)
    src = payload(n, seed=n + 7)
    buf = np.zeros(n + 8, dtype=np.uint8)
    buf[offset : offset + n] = np.frombuffer(src, dtype=np.uint8)
    unmask(buf[offset : offset + n], key)
    assert buf[offset : offset + n].tobytes() == bytes(b ^ key[i % 4] for i, b in enumerate(src))
    assert not buf[:offset].any() and not buf[offset + n :].any()


def test_mask_parts_continue_the_phase() -> None:
    # Sending a message in parts masks each part at the phase where the previous ended.
    key = os.urandom(4)
    parts = [payload(5, 1), payload(7, 2), payload(1, 3), payload(12, 4)]
    out = np.empty(sum(map(len, parts)), dtype=np.uint8)
    off = 0
    for p in parts:
        mask_into(out[off : off + len(p)], p, key, off % 4)
        off += len(p)
    unmask(out, key)
    assert out.tobytes() == b"".join(parts)


# ---------------------------------------------------------------------------- golden bytes
def test_serialize_matches_the_rfc_examples() -> None:
    # RFC 6455 5.7: a single-frame unmasked and masked text message "Hello"
    assert wire(OP_TEXT, b"Hello", mask=False) == bytes.fromhex("810548656c6c6f")
    assert wire(OP_TEXT, b"Hello") == bytes.fromhex("818537fa213d7f9f4d5158")
    # fragmented unmasked text message, unmasked ping and masked pong
    assert wire(OP_TEXT, b"Hel", mask=False, fin=False) == bytes.fromhex("010348656c")
    assert wire(OP_CONT, b"lo", mask=False) == bytes.fromhex("80026c6f")
    assert wire(OP_PING, b"Hello", mask=False) == bytes.fromhex("890548656c6c6f")
    assert wire(OP_PONG, b"Hello") == bytes.fromhex("8a8537fa213d7f9f4d5158")
    # 256 bytes and 64 KiB binary messages in a single unmasked frame
    assert wire(OP_BINARY, bytes(256), mask=False)[:4] == bytes.fromhex("827e0100")
    assert wire(OP_BINARY, bytes(65536), mask=False)[:10] == bytes.fromhex("827f0000000000010000")


@pytest.mark.parametrize("n, head", [(0, 2), (125, 2), (126, 4), (65535, 4), (65536, 10)])
def test_header_length_encodings(n: int, head: int) -> None:
    assert len(frames.frame_header(OP_BINARY, n, None)) == head
    assert len(frames.frame_header(OP_BINARY, n, KEY)) == head + 4


def test_server_frames_reference_the_parts_without_copying() -> None:
    parts: list[bytes | bytearray | memoryview] = [b"ab", bytearray(b"cd"), memoryview(b"ef")]
    out = frames.serialize(OP_BINARY, parts, mask=False)
    assert out[0] == b"\x82\x06" and all(a is b for a, b in zip(out[1:], parts, strict=True))


def test_close_payload_cuts_the_reason_on_a_character() -> None:
    p = frames.close_payload(1000, "é" * 100)
    assert len(p) <= 125 and struct.unpack("!H", p[:2])[0] == 1000
    p[2:].decode("utf-8")  # still valid UTF-8


# ---------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("n", [0, 1, 2, 3, 4, 5, 125, 126, 127, 65535, 65536, 65537, 300_000])
@pytest.mark.parametrize("client_to_server", [True, False])
def test_round_trip_every_length_encoding(n: int, client_to_server: bool) -> None:
    data = payload(n, n)
    p = FrameParser(client=not client_to_server, max_message_bytes=MB)
    out = frames.serialize(OP_BINARY, [data[: n // 3], data[n // 3 :]], mask=client_to_server)
    raw = b"".join(bytes(x) for x in out)
    events = p.feed(raw)
    assert len(events) == 1 and isinstance(events[0], Message)
    assert bytes(events[0].data) == data and events[0].hold is None
    # the same bytes dripped in small pieces give the same message
    for step in (1, 7, 4096):
        if n > 70_000 and step < 4096:
            continue
        assert message_bytes(drip(p, raw, step)) == [data]


def test_big_payload_is_received_into_its_message_buffer() -> None:
    n = 2 * MB
    data = payload(n, 3)
    p = server()
    raw = wire(OP_BINARY, data)
    assert p.feed(raw[:100]) == []
    buf = p.get_buffer(-1)
    assert buf.nbytes == n - (100 - 14)  # the rest of the payload: straight into the message
    assert p.capacity == n
    buf[: buf.nbytes] = raw[100:]
    (msg,) = p.buffer_updated(buf.nbytes)
    assert isinstance(msg, Message) and bytes(msg.data) == data  # unmasked in place
    assert msg.data.obj is not None and msg.data.nbytes == n


def test_several_messages_in_one_chunk_and_fragments_with_control_frames_between() -> None:
    p = server()
    raw = (
        wire(OP_BINARY, b"m1")
        + wire(OP_BINARY, b"m2")
        + wire(OP_BINARY, b"hello ", fin=False)
        + wire(OP_PING, b"ping!")
        + wire(OP_CONT, b"", fin=False)
        + wire(OP_PONG, b"pong")
        + wire(OP_CONT, b"fragmented ", fin=False)
        + wire(OP_CONT, b"world")
    )
    for step in (len(raw), 1, 3):
        events = drip(p, raw, step)
        assert [type(e) for e in events] == [Message, Message, Ping, Pong, Message]
        assert message_bytes(events) == [b"m1", b"m2", b"hello fragmented world"]
        assert events[2] == Ping(b"ping!") and events[3] == Pong(b"pong")


def test_big_fragments_grow_the_buffer_geometrically() -> None:
    p = server()
    parts = [payload(300_000, i) for i in range(6)]
    raw = b"".join(
        wire(OP_BINARY if i == 0 else OP_CONT, d, fin=i == 5) for i, d in enumerate(parts)
    )
    caps: list[int] = []
    events: list[Event] = []
    for i in range(0, len(raw), 50_000):
        events += p.feed(raw[i : i + 50_000])
        caps.append(p.capacity)
    assert message_bytes(events) == [b"".join(parts)]
    grown = sorted({c for c in caps if c})
    assert len(grown) <= 4 and all(b >= 2 * a for a, b in zip(grown, grown[1:], strict=False))


def test_close_frame_ends_the_stream() -> None:
    p = server()
    events = p.feed(
        wire(OP_CLOSE, struct.pack("!H", 1001) + "bye ü".encode()) + wire(OP_BINARY, b"after")
    )
    assert events == [Close(1001, "bye ü")] and p.done
    assert p.feed(wire(OP_BINARY, b"more")) == []
    assert server().feed(wire(OP_CLOSE, b"")) == [Close(1005, "")]


# ---------------------------------------------------------------------------- violations
VIOLATIONS: list[tuple[str, bytes, type[RemoteProtocolError]]] = [
    ("rsv1", wire(OP_BINARY, b"abc", rsv=0x40), RemoteProtocolError),
    ("rsv2", wire(OP_BINARY, b"abc", rsv=0x20), RemoteProtocolError),
    ("rsv3", wire(OP_BINARY, b"abc", rsv=0x10), RemoteProtocolError),
    *[
        (f"opcode {op}", wire(op, b"abc"), RemoteProtocolError)
        for op in (3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF)
    ],
    ("text", wire(OP_TEXT, b"abc"), RemoteProtocolError),
    ("unmasked client frame", wire(OP_BINARY, b"abc", mask=False), RemoteProtocolError),
    ("long ping", wire(OP_PING, b"a" * 126), RemoteProtocolError),
    ("fragmented ping", wire(OP_PING, b"a", fin=False), RemoteProtocolError),
    ("long close", wire(OP_CLOSE, struct.pack("!H", 1000) + b"x" * 124), RemoteProtocolError),
    ("continuation first", wire(OP_CONT, b"abc"), RemoteProtocolError),
    (
        "new message inside a fragmented one",
        wire(OP_BINARY, b"a", fin=False) + wire(OP_BINARY, b"b"),
        RemoteProtocolError,
    ),
    ("too large", wire(OP_BINARY, bytes(1025)), MessageTooLarge),
    (
        "too large by fragments",
        wire(OP_BINARY, bytes(600), fin=False) + wire(OP_CONT, bytes(600)),
        MessageTooLarge,
    ),
    ("64-bit length top bit", b"\x82\xff" + struct.pack("!Q", 1 << 63) + KEY, RemoteProtocolError),
    ("1-byte close", wire(OP_CLOSE, b"\x03"), RemoteProtocolError),
    *[
        (f"close code {c}", wire(OP_CLOSE, struct.pack("!H", c)), RemoteProtocolError)
        for c in (0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535)
    ],
    (
        "close reason not UTF-8",
        wire(OP_CLOSE, struct.pack("!H", 1000) + b"\xff\xfe"),
        RemoteProtocolError,
    ),
]


@pytest.mark.parametrize("name, bad, kind", VIOLATIONS, ids=[v[0] for v in VIOLATIONS])
def test_every_violation_is_a_documented_error_after_the_good_events(
    name: str, bad: bytes, kind: type[RemoteProtocolError]
) -> None:
    for step in (len(bad) + 8, 1):
        p = server(max_bytes=1024)
        events = drip(p, wire(OP_BINARY, b"ok") + bad + wire(OP_BINARY, b"ignored"), step)
        assert message_bytes(events) == [b"ok"], name
        assert isinstance(events[-1], Violation), name
        err = events[-1].error
        assert type(err) is kind, (name, err)
        assert events[-1].close_code == (1009 if kind is MessageTooLarge else 1002)
        assert err.code in ("bad-frame", "too-large")
        assert p.done and p.capacity == 0 and not p.in_message  # buffers dropped
        assert p.feed(wire(OP_BINARY, b"later")) == []


def test_masked_frame_to_a_client_is_a_violation() -> None:
    p = FrameParser(client=True, max_message_bytes=MB)
    (ev,) = p.feed(wire(OP_BINARY, b"abc", mask=True))
    assert isinstance(ev, Violation) and "masked" in str(ev.error)


def test_valid_close_codes_are_accepted() -> None:
    for code in (
        1000,
        1001,
        1002,
        1003,
        1007,
        1008,
        1009,
        1010,
        1011,
        1012,
        1013,
        1014,
        3000,
        4999,
    ):
        assert server().feed(wire(OP_CLOSE, struct.pack("!H", code))) == [Close(code, "")]


# ---------------------------------------------------------------------------- hardening
class FakeBudget:
    """A synchronous receive budget that records what is held."""

    def __init__(self, limit: int, min_bytes: int = 1) -> None:
        self.limit, self.min_bytes, self.used = limit, min_bytes, 0
        self.waiting: list[tuple[int, Callable[[], None]]] = []

    def counts(self, nbytes: int) -> bool:
        return nbytes >= self.min_bytes

    def request(self, n: int, granted: Callable[[], None], *, held: int = 0) -> bool:
        if self.used <= held or self.used + n <= self.limit:
            self.used += n
            return True
        self.waiting.append((n, granted))
        return False

    def cancel(self, granted: Callable[[], None]) -> bool:
        before = len(self.waiting)
        self.waiting = [w for w in self.waiting if w[1] is not granted]
        return len(self.waiting) < before

    def release(self, n: int) -> None:
        self.used -= n
        assert self.used >= 0

    def grant_all(self) -> None:
        waiting, self.waiting = self.waiting, []
        for n, cb in waiting:
            self.used += n
            cb()


def fragmented(first: int, cont: int, count: int, final: bool = True) -> bytes:
    out = [wire(OP_BINARY, bytes(first), fin=False)]
    out += [wire(OP_CONT, bytes(cont), fin=False)] * (count - 1)
    out.append(wire(OP_CONT, bytes(cont), fin=final))
    return b"".join(out)


def test_every_byte_of_a_fragmented_message_is_charged_to_the_budget() -> None:
    """Issue 16 finding 1: continuation frames were not charged (only the first frame)."""
    budget = FakeBudget(1 << 40, min_bytes=256 * 1024)
    p = server(budget=budget)
    raw = fragmented(10, 64 * 1024, 100, final=False)
    for i in range(0, len(raw), 10_000):
        p.feed(raw[i : i + 10_000])
        if p.capacity >= budget.min_bytes:
            assert budget.used >= p.capacity, (budget.used, p.capacity)
    assert p.capacity >= 100 * 64 * 1024
    (msg,) = p.feed(wire(OP_CONT, b"end"))
    assert isinstance(msg, Message) and msg.hold is not None
    assert budget.used >= msg.data.nbytes
    del msg
    gc.collect()
    assert budget.used == 0  # the buffer freed: its bytes went back


def test_growth_waits_for_the_budget_and_resumes() -> None:
    budget = FakeBudget(MB, min_bytes=1)
    other = budget.request(MB // 2, lambda: None)  # someone else holds half
    assert other
    granted: list[int] = []
    p = server(budget=budget, on_granted=lambda: granted.append(1))
    parts = [payload(200_000, i) for i in range(5)]
    raw = b"".join(
        wire(OP_BINARY if i == 0 else OP_CONT, d, fin=i == 4) for i, d in enumerate(parts)
    )
    events = p.feed(raw)
    assert events == [] and p.waiting and p.in_message
    assert budget.used <= budget.limit
    budget.release(MB // 2)
    budget.grant_all()
    assert granted == [1]
    events = p.resume()
    while p.waiting:  # grows again: the others are gone, so it is admitted alone
        budget.grant_all()
        events += p.resume()
    assert message_bytes(events) == [b"".join(parts)]


def test_closing_a_waiting_parser_withdraws_its_request() -> None:
    budget = FakeBudget(100, min_bytes=1)
    assert budget.request(100, lambda: None)
    p = server(budget=budget)
    assert p.feed(wire(OP_BINARY, bytes(50))) == [] and p.waiting
    p.close()
    assert budget.waiting == [] and budget.used == 100


def test_an_aborted_message_frees_its_buffer_with_its_budget_bytes() -> None:
    """Issue 16 finding 2: the buffer of an aborted upload must go with its budget bytes,
    without waiting for the garbage collector."""
    budget = FakeBudget(1 << 40, min_bytes=1)
    p = server(budget=budget)
    p.feed(wire(OP_BINARY, bytes(4 * MB))[: 2 * MB])
    assert p.in_message and budget.used == 4 * MB
    buf = weakref.ref(p._msg)
    gc.disable()
    try:
        p.close()
        assert budget.used == 0
        assert buf() is None
    finally:
        gc.enable()


def test_a_violation_does_not_keep_the_earlier_messages_alive() -> None:
    """The violation's traceback once held the parser's frame and so every message of
    the same read, in a cycle only the garbage collector frees."""
    budget = FakeBudget(1 << 40, min_bytes=1)
    p = server(budget=budget)
    gc.disable()
    try:
        events = p.feed(wire(OP_BINARY, bytes(70_000)) + wire(OP_TEXT, b"bad"))
        assert [type(e) for e in events] == [Message, Violation]
        assert budget.used == 70_000
        del events
        assert budget.used == 0
    finally:
        gc.enable()


def test_fragments_before_admission_are_capped() -> None:
    p = server(fragment_cap=64 * 1024)
    big = payload(1 << 20)
    assert message_bytes(p.feed(wire(OP_BINARY, big))) == [big]  # one frame: fine
    events = p.feed(fragmented(10, 32 * 1024, 3))
    assert isinstance(events[-1], Violation) and isinstance(events[-1].error, MessageTooLarge)
    assert events[-1].error.limit == 64 * 1024
    q = server(fragment_cap=64 * 1024)
    q.admit()
    assert message_bytes(q.feed(fragmented(10, 32 * 1024, 3))) == [bytes(10 + 3 * 32 * 1024)]


def test_strangers_messages_are_charged_from_64_kib() -> None:
    """Before admission, a message below the budget's min_bytes but from 64 KiB up is
    counted all the same (strangers hold nothing big uncounted)."""
    budget = FakeBudget(1 << 40, min_bytes=MB)
    p = server(budget=budget, fragment_cap=64 * 1024)
    p.feed(wire(OP_BINARY, bytes(100_000))[:50_000])
    assert budget.used == 100_000
    p.feed(wire(OP_BINARY, bytes(100_000))[50_000:])
    gc.collect()
    assert budget.used == 0
    assert p.feed(wire(OP_BINARY, bytes(1000))) and budget.used == 0  # small: not counted
    p.admit()
    p.feed(wire(OP_BINARY, bytes(100_000))[:50_000])
    assert budget.used == 0  # admitted: only what the budget counts


def test_many_tiny_continuations_after_a_big_fragment_are_cheap() -> None:
    """Issue 16 finding 1: each continuation frame copied the whole message so far (a
    16 MiB fragment then 3,000 frames of 7 bytes: 48 GB of copying)."""
    p = server(max_bytes=64 * MB)
    raw = fragmented(16 * MB, 7, 3000)
    t0 = time.perf_counter()
    events = p.feed(raw)
    elapsed = time.perf_counter() - t0
    assert [m.nbytes for m in (e.data for e in events if isinstance(e, Message))] == [
        16 * MB + 7 * 3000
    ]
    assert elapsed < 3.0, elapsed
