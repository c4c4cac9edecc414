"""Hostile peers against the WebSocket server (issue 16 findings 1, 2, 10 and 11).

Each test reproduces an attack at a bounded size over 127.0.0.1 and checks the bound the
server must keep: budgeted fragments, a capped pre-registration message, freed buffers of
aborted uploads, clean answers to malformed HTTP, and pongs that respect backpressure.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import socket
import struct
import time
import tracemalloc
from typing import Any

import pytest

from fedstack.errors import MessageTooLarge
from fedstack.transport import ws
from fedstack.transport.budget import ByteBudget
from fedstack.transport.frames import OP_BINARY, OP_CONT, OP_PING, serialize
from fedstack.transport.http import HttpRequest, HttpResponse, json_response

pytestmark = pytest.mark.timeout(60)

MB = 1 << 20
T = 10.0


def handshake_request(port: int) -> bytes:
    return (
        f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


async def raw_open(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(handshake_request(port))
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), T)
    assert head.startswith(b"HTTP/1.1 101"), head
    return reader, writer


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bool, bytes]:
    b0, b1 = await asyncio.wait_for(reader.readexactly(2), T)
    n = b1 & 0x7F
    if n == 126:
        n = struct.unpack("!H", await reader.readexactly(2))[0]
    elif n == 127:
        n = struct.unpack("!Q", await reader.readexactly(8))[0]
    return b0 & 0x0F, bool(b0 & 0x80), await asyncio.wait_for(reader.readexactly(n), T)


def close_code(data: bytes) -> int:
    return int(struct.unpack("!H", data[:2])[0])


def frame(opcode: int, data: bytes, fin: bool = True) -> bytes:
    return b"".join(bytes(p) for p in serialize(opcode, [data], mask=True, fin=fin))


def header(opcode: int, length: int, fin: bool = True) -> bytes:
    """A masked frame header with an all-zero key (the payload then goes as is)."""
    b0 = (0x80 if fin else 0) | opcode
    if length < 126:
        head = struct.pack("!BB", b0, 0x80 | length)
    elif length < 1 << 16:
        head = struct.pack("!BBH", b0, 0x80 | 126, length)
    else:
        head = struct.pack("!BBQ", b0, 0x80 | 127, length)
    return head + b"\0\0\0\0"


async def start(handler: Any, **kw: Any) -> tuple[asyncio.Server, int]:
    server = await ws.serve(
        handler, "127.0.0.1", 0, max_message_bytes=kw.pop("max_bytes", 64 * MB), **kw
    )
    return server, server.sockets[0].getsockname()[1]


def test_fragments_before_registration_are_capped() -> None:
    """Before the first message is accepted, a fragmented message holds at most 64 KiB."""
    seen: list[BaseException] = []

    async def handler(conn: ws.WSConnection) -> None:
        try:
            await conn.recv()
        except Exception as exc:
            seen.append(exc)
            raise

    async def main() -> None:
        server, port = await start(handler)
        reader, writer = await raw_open(port)
        try:
            writer.write(frame(OP_BINARY, b"x" * 1000, fin=False))
            for _ in range(64):  # 64 x 16 KiB: 1 MiB of continuation frames
                writer.write(frame(OP_CONT, bytes(16 * 1024), fin=False))
            try:  # a close frame, unless the reset for unread bytes overtakes it
                op, _fin, data = await read_frame(reader)
                assert op == 0x8 and close_code(data) == 1009
            except (ConnectionResetError, asyncio.IncompleteReadError):
                pass
            for _ in range(100):
                if seen:
                    break
                await asyncio.sleep(0.01)
            assert len(seen) == 1 and isinstance(seen[0], MessageTooLarge), seen
            assert seen[0].limit == ws.UNREGISTERED_FRAGMENT_BYTES
        finally:
            writer.close()
            server.close()

    asyncio.run(main())


def test_every_held_byte_of_fragmented_uploads_is_budgeted() -> None:
    """Two registered peers send 8 MiB fragmented messages they never finish, against a
    4 MiB receive budget: the server holds no byte the budget does not count, and not
    the 16 MiB the peers sent."""
    budget = ByteBudget(4 * MB, min_bytes=MB)
    conns: list[ws.WSConnection] = []

    async def handler(conn: ws.WSConnection) -> None:
        conns.append(conn)
        await conn.recv()  # "registration"
        await conn.recv()  # admitted: the attack follows

    async def main() -> None:
        server, port = await start(handler, receive_budget=budget)
        peers = [await raw_open(port) for _ in range(2)]
        try:
            for _, writer in peers:
                writer.write(frame(OP_BINARY, b"hello"))
            await asyncio.sleep(0.2)

            async def attack(writer: asyncio.StreamWriter) -> None:
                writer.write(header(OP_BINARY, 10, fin=False) + bytes(10))
                for _ in range(128):  # 128 x 64 KiB = 8 MiB, never finished
                    writer.write(header(OP_CONT, 64 * 1024, fin=False) + bytes(64 * 1024))
                    await writer.drain()

            tasks = [asyncio.create_task(attack(w)) for _, w in peers]
            await asyncio.wait(tasks, timeout=3.0)
            held = sum(c._parser.capacity for c in conns)  # noqa: SLF001
            assert held <= budget.used <= 2 * budget.limit, (held, budget.used)
            assert not all(t.done() for t in tasks)  # someone is held back by TCP
            for t in tasks:
                t.cancel()
        finally:
            for _, writer in peers:
                writer.transport.abort()
            for c in conns:  # (paused readers do not see the peer go: the owner's timeout)
                c.abort()
            server.close()
        for _ in range(100):
            if budget.used == 0:
                break
            await asyncio.sleep(0.01)
        assert budget.used == 0

    asyncio.run(main())


def test_tiny_continuations_do_not_freeze_the_server() -> None:
    """A 16 MiB fragment followed by 3,000 continuation frames of 7 bytes copied the whole
    message once per frame, on the event loop."""
    gaps: list[float] = []
    got: list[int] = []

    async def handler(conn: ws.WSConnection) -> None:
        await conn.recv()
        got.append((await conn.recv()).nbytes)

    async def ticker(stop: asyncio.Event) -> None:
        last = time.perf_counter()
        while not stop.is_set():
            await asyncio.sleep(0.005)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    async def main() -> None:
        server, port = await start(handler)
        reader, writer = await raw_open(port)
        stop = asyncio.Event()
        tick = asyncio.create_task(ticker(stop))
        try:
            writer.write(frame(OP_BINARY, b"hello"))
            await asyncio.sleep(0.1)
            writer.write(header(OP_BINARY, 16 * MB, fin=False) + bytes(16 * MB))
            tail = b"".join(header(OP_CONT, 7, fin=False) + bytes(7) for _ in range(2999))
            writer.write(tail + header(OP_CONT, 7) + bytes(7))
            await writer.drain()
            for _ in range(1000):
                if got:
                    break
                await asyncio.sleep(0.01)
            assert got == [16 * MB + 7 * 3000]
        finally:
            stop.set()
            await tick
            writer.close()
            server.close()

    asyncio.run(main())
    assert max(gaps) < 1.0, max(gaps)


def test_an_aborted_upload_frees_its_buffer_with_its_budget_bytes() -> None:
    """Something still refers to the connection (a reference cycle, a session), the
    garbage collector is off: the aborted message's buffer is freed all the same."""
    budget = ByteBudget(1 << 30, min_bytes=MB)
    kept: list[ws.WSConnection] = []

    async def handler(conn: ws.WSConnection) -> None:
        kept.append(conn)
        try:
            await conn.recv()
        except Exception:  # noqa: BLE001 - the abort is the point
            pass

    async def main() -> int:
        server, port = await start(handler, receive_budget=budget)
        base = tracemalloc.get_traced_memory()[0]
        _reader, writer = await raw_open(port)
        writer.write(header(OP_BINARY, 32 * MB) + bytes(4 * MB))
        await writer.drain()
        for _ in range(500):
            if budget.used:
                break
            await asyncio.sleep(0.01)
        assert budget.used == 32 * MB
        writer.transport.abort()
        for _ in range(500):
            if budget.used == 0:
                break
            await asyncio.sleep(0.01)
        assert budget.used == 0
        held = tracemalloc.get_traced_memory()[0] - base
        server.close()
        return held

    gc.disable()
    tracemalloc.start()
    try:
        held = asyncio.run(main())
    finally:
        tracemalloc.stop()
        gc.enable()
    assert kept and held < 8 * MB, held


def test_malformed_http_gets_4xx_and_no_traceback(caplog: pytest.LogCaptureFixture) -> None:
    async def api(req: HttpRequest) -> HttpResponse:
        return json_response(200, {"path": req.path, "query": dict(req.query)})

    async def handler(conn: ws.WSConnection) -> None:
        await conn.recv()

    cases = [
        (
            b"GET /a?" + b"&".join(b"k%d=v" % i for i in range(30)) + b" HTTP/1.1\r\n"
            b"Host: x\r\n\r\n",
            400,
        ),
        (b"GET //[ HTTP/1.1\r\nHost: x\r\n\r\n", 200),
        (b"GET http://[/ HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET /x HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 40000 + b"\r\n\r\n", 431),
        (b"G\x00T /x HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"get /x HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET /x HTTP/1.1\r\n\r\n", 400),
    ]

    def send(port: int, data: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            out = b""
            while chunk := s.recv(65536):
                out += chunk
            return out

    async def main() -> None:
        server, port = await start(handler, http_handler=api)
        try:
            for data, want in cases:
                reply = await asyncio.to_thread(send, port, data)
                assert reply.startswith(b"HTTP/1.1 %d " % want), (data[:40], reply[:60])
        finally:
            server.close()

    with caplog.at_level(logging.DEBUG):
        asyncio.run(main())
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


def test_ping_flood_does_not_grow_the_write_buffer() -> None:
    """A peer that sends pings and never reads: pongs wait for the write buffer to drain,
    and only the latest is kept."""
    conns: list[ws.WSConnection] = []
    peak = [0]

    async def handler(conn: ws.WSConnection) -> None:
        sock = conn.transport.get_extra_info("socket") if conn.transport else None
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        conns.append(conn)
        while True:
            await conn.recv()

    async def main() -> None:
        server, port = await start(handler)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", port))
        sock.setblocking(False)
        reader, writer = await asyncio.open_connection(sock=sock)
        try:
            writer.write(handshake_request(port))
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), T)
            ping = frame(OP_PING, b"p" * 125)
            for _ in range(200):  # 200 x 100 pings of 125 bytes: 2.6 MB of pongs asked
                writer.write(ping * 100)
                await writer.drain()
                if conns and conns[0].transport is not None:
                    peak[0] = max(peak[0], conns[0].transport.get_write_buffer_size())
            await asyncio.sleep(0.1)
            conn = conns[0]
            assert conn.transport is not None
            peak[0] = max(peak[0], conn.transport.get_write_buffer_size())
            assert conn.pongs_dropped > 0
        finally:
            writer.transport.abort()
            server.close()

    asyncio.run(main())
    assert peak[0] <= 64 * 1024 + 256, peak[0]


_SERVER = """
import asyncio, resource, sys
resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
from fedstack.transport import ws

async def echo(conn):
    while True:
        await conn.send([await conn.recv()])

async def main():
    server = await ws.serve(echo, "127.0.0.1", 0, max_message_bytes=1 << 20,
                            handshake_timeout=30)
    print(server.sockets[0].getsockname()[1], flush=True)
    await asyncio.sleep(40)

asyncio.run(main())
"""


def test_idle_strangers_cannot_exhaust_descriptors() -> None:
    """Issue 16 finding 4: 300 idle sockets against a server limited to 256 descriptors;
    an agent connecting afterwards is served (the oldest strangers are dropped), and so is
    an agent that was already there."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", _SERVER], stdout=subprocess.PIPE, text=True)
    idle: list[socket.socket] = []
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        url = f"ws://127.0.0.1:{port}/"

        async def echo_once(conn: ws.WSConnection, data: bytes) -> bytes:
            await conn.send([data])
            return bytes(await asyncio.wait_for(conn.recv(), T))

        async def main() -> None:
            early = await ws.connect(url, max_message_bytes=MB, open_timeout=T)
            assert await echo_once(early, b"early") == b"early"
            for _ in range(300):
                s = socket.socket()
                s.setblocking(False)
                try:
                    s.connect(("127.0.0.1", port))
                except BlockingIOError:
                    pass
                idle.append(s)
            await asyncio.sleep(1.0)
            late = await ws.connect(url, max_message_bytes=MB, open_timeout=T)
            assert await echo_once(late, b"late") == b"late"
            assert await echo_once(early, b"still") == b"still"
            await late.close()
            await early.close()

        asyncio.run(main())
        dropped = 0
        for s in idle[:50]:  # the oldest strangers were closed by the server
            s.setblocking(True)
            s.settimeout(2)
            try:
                dropped += s.recv(1) == b""
            except (ConnectionResetError, TimeoutError):
                dropped += 1
        assert dropped >= 40, dropped
    finally:
        for s in idle:
            s.close()
        proc.kill()
        proc.wait()
