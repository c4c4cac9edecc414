"""The WebSocket transport: our server and client, and interop with the ``websockets`` library.

Everything runs on 127.0.0.1 with port 0. pytest-asyncio is not used: each test runs its
own event loop with ``asyncio.run`` (and, where it matters, ``uvloop.run``).
"""

from __future__ import annotations

import asyncio
import base64
import os
import struct
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import numpy as np
import pytest
import uvloop
from websockets.asyncio.client import connect as ws_connect
from websockets.asyncio.server import serve as ws_serve
from websockets.exceptions import ConnectionClosed as WSLibClosed

from fedstack.errors import ConnectionClosed, MessageTooLarge, RemoteProtocolError
from fedstack.transport.ws import WSConnection, connect, serve

pytestmark = pytest.mark.timeout(60)

MB = 1 << 20
T = 10.0  # generous bound on any single await; tests finish far sooner

RUNNERS = {"asyncio": asyncio.run, "uvloop": uvloop.run}


def run(coro: Coroutine[Any, Any, Any], runner: str = "asyncio") -> Any:
    return RUNNERS[runner](coro)


def payload(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


async def echo(conn: WSConnection) -> None:
    while True:
        msg = await conn.recv()
        await conn.send([msg])


async def start(
    handler: Callable[[WSConnection], Awaitable[None]] = echo, max_bytes: int = 64 * MB
) -> tuple[asyncio.Server, str, int]:
    server = await serve(handler, "127.0.0.1", 0, max_message_bytes=max_bytes)
    port = server.sockets[0].getsockname()[1]
    return server, f"ws://127.0.0.1:{port}/", port


async def stop(server: asyncio.Server) -> None:
    server.close()
    await asyncio.wait_for(server.wait_closed(), T)


def lib_connect(url: str, **kw: Any) -> Any:
    kw.setdefault("max_size", None)
    return ws_connect(url, compression=None, proxy=None, ping_interval=None, **kw)


# ---------------------------------------------------------------------------- raw frames
def frame(opcode: int, data: bytes, *, fin: bool = True, mask: bool = True, rsv: int = 0) -> bytes:
    b0 = (0x80 if fin else 0) | rsv | opcode
    n = len(data)
    mbit = 0x80 if mask else 0
    if n < 126:
        head = struct.pack("!BB", b0, mbit | n)
    elif n < 1 << 16:
        head = struct.pack("!BBH", b0, mbit | 126, n)
    else:
        head = struct.pack("!BBQ", b0, mbit | 127, n)
    if not mask:
        return head + data
    key = os.urandom(4)
    masked = bytes(b ^ key[i % 4] for i, b in enumerate(data))
    return head + key + masked


def handshake_request(port: int) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


async def raw_open(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(handshake_request(port))
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), T)
    assert head.startswith(b"HTTP/1.1 101"), head
    return reader, writer


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bool, bytes]:
    b0, b1 = await asyncio.wait_for(reader.readexactly(2), T)
    assert not b1 & 0x80, "server frames must not be masked"
    n = b1 & 0x7F
    if n == 126:
        n = struct.unpack("!H", await reader.readexactly(2))[0]
    elif n == 127:
        n = struct.unpack("!Q", await reader.readexactly(8))[0]
    return b0 & 0x0F, bool(b0 & 0x80), await asyncio.wait_for(reader.readexactly(n), T)


def close_code(data: bytes) -> int:
    return int(struct.unpack("!H", data[:2])[0])


# ---------------------------------------------------------------------------- our server + client
@pytest.mark.parametrize("runner", list(RUNNERS))
def test_echo_small_and_boundary_sizes(runner: str) -> None:
    sizes = [0, 1, 2, 3, 4, 5, 125, 126, 127, 65535, 65536, 65537, 300_000]

    async def main() -> None:
        server, url, _ = await start()
        conn = await connect(url, max_message_bytes=64 * MB)
        try:
            for n in sizes:
                data = payload(n, seed=n)
                await conn.send([data])
                got = await asyncio.wait_for(conn.recv(), T)
                assert isinstance(got, memoryview)
                assert got.nbytes == n and bytes(got) == data, n
        finally:
            await conn.close()
            await stop(server)

    run(main(), runner)


@pytest.mark.parametrize("runner", list(RUNNERS))
def test_echo_50_mb_exact_bytes(runner: str) -> None:
    n = 50 * MB + 13

    async def main() -> None:
        server, url, _ = await start(max_bytes=64 * MB)
        conn = await connect(url, max_message_bytes=64 * MB)
        try:
            data = np.random.default_rng(5).integers(0, 256, n, dtype=np.uint8)
            # sent from several parts (as the codec does), received as one message
            await conn.send([data[:7].data, data[7 : 30 * MB].data, data[30 * MB :].data])
            got = await asyncio.wait_for(conn.recv(), 30)
            assert got.nbytes == n
            assert np.array_equal(np.frombuffer(got, dtype=np.uint8), data)
            assert conn.bytes_sent >= n and conn.bytes_received >= n
        finally:
            await conn.close()
            await stop(server)

    run(main(), runner)


def test_interleaved_messages_in_both_directions() -> None:
    async def handler(conn: WSConnection) -> None:
        # the server sends its own stream while echoing the client's
        for i in range(20):
            conn.write([b"S%03d" % i + payload(i * 1000, i)])
            got = await conn.recv()
            await conn.send([b"E" + bytes(got)])

    async def main() -> None:
        server, url, _ = await start(handler)
        conn = await connect(url, max_message_bytes=64 * MB)
        try:
            received: list[bytes] = []

            async def reader() -> None:
                for _ in range(40):
                    received.append(bytes(await asyncio.wait_for(conn.recv(), T)))

            task = asyncio.create_task(reader())
            for i in range(20):
                await conn.send([b"C%03d" % i + payload(i * 777, 100 + i)])
            await asyncio.wait_for(task, T)
            from_server = [m for m in received if m[:1] == b"S"]
            echoes = [m for m in received if m[:1] == b"E"]
            assert from_server == [b"S%03d" % i + payload(i * 1000, i) for i in range(20)]
            assert echoes == [b"EC%03d" % i + payload(i * 777, 100 + i) for i in range(20)]
        finally:
            await conn.close()
            await stop(server)

    run(main())


def test_many_queued_messages_survive_backpressure() -> None:
    go = None

    async def handler(conn: WSConnection) -> None:
        assert go is not None
        await go.wait()  # let the client's messages pile up (reading pauses at 8)
        got = [bytes(await conn.recv()) for _ in range(30)]
        await conn.send([b"".join(g[:4] for g in got)])

    async def main() -> None:
        nonlocal go
        go = asyncio.Event()
        server, url, _ = await start(handler)
        conn = await connect(url, max_message_bytes=64 * MB)
        try:
            for i in range(30):
                await conn.send([b"%04d" % i + payload(20_000, i)])
            go.set()
            summary = bytes(await asyncio.wait_for(conn.recv(), T))
            assert summary == b"".join(b"%04d" % i for i in range(30))
        finally:
            await conn.close()
            await stop(server)

    run(main())


def test_connection_loss_makes_recv_raise_connection_closed() -> None:
    async def handler(conn: WSConnection) -> None:
        await conn.recv()
        conn.abort()  # drop the TCP connection without a close frame

    async def main() -> None:
        server, url, _ = await start(handler)
        conn = await connect(url, max_message_bytes=MB)
        try:
            await conn.send([b"bye"])
            with pytest.raises(ConnectionClosed) as info:
                await asyncio.wait_for(conn.recv(), T)
            assert info.value.code == 1006
            assert not conn.is_open
            with pytest.raises(ConnectionClosed):
                await conn.recv()  # and keeps raising
            with pytest.raises(ConnectionClosed):
                await conn.send([b"x"])
        finally:
            await stop(server)

    run(main())


def test_client_loss_makes_server_recv_raise_connection_closed() -> None:
    result: asyncio.Future[BaseException | None] | None = None

    async def handler(conn: WSConnection) -> None:
        assert result is not None
        try:
            await asyncio.wait_for(conn.recv(), T)
        except BaseException as exc:  # noqa: BLE001 - recorded and checked below
            result.set_result(exc)
            raise
        result.set_result(None)

    async def main() -> None:
        nonlocal result
        result = asyncio.get_running_loop().create_future()
        server, url, _ = await start(handler)
        conn = await connect(url, max_message_bytes=MB)
        conn.abort()
        exc = await asyncio.wait_for(result, T)
        assert isinstance(exc, ConnectionClosed)
        await stop(server)

    run(main())


def test_clean_close_reports_code_and_reason_to_peer() -> None:
    async def handler(conn: WSConnection) -> None:
        await conn.recv()
        await conn.close(4000, "server says bye")

    async def main() -> None:
        server, url, _ = await start(handler)
        conn = await connect(url, max_message_bytes=MB)
        try:
            await conn.send([b"hi"])
            with pytest.raises(ConnectionClosed) as info:
                await asyncio.wait_for(conn.recv(), T)
            assert info.value.code == 4000
            assert info.value.reason == "server says bye"
        finally:
            await stop(server)

    run(main())


def test_our_client_refuses_oversized_message_and_closes_1009() -> None:
    async def handler(conn: WSConnection) -> None:
        await conn.send([payload(5000)])
        await conn.recv()

    async def main() -> None:
        server, url, _ = await start(handler)
        conn = await connect(url, max_message_bytes=4096)
        try:
            with pytest.raises(MessageTooLarge) as info:
                await asyncio.wait_for(conn.recv(), T)
            assert (info.value.size, info.value.limit) == (5000, 4096)
            await conn.close()
            assert conn.close_code == 1009
        finally:
            await stop(server)

    run(main())


def test_connect_refused_and_bad_url() -> None:
    async def main() -> None:
        server, _, port = await start()
        await stop(server)  # the port is free again: nobody listens
        with pytest.raises(OSError):
            await connect(f"ws://127.0.0.1:{port}/", max_message_bytes=MB, open_timeout=T)
        with pytest.raises(ValueError):
            await connect("http://127.0.0.1:1/", max_message_bytes=MB)

    run(main())


# ---------------------------------------------------------------------------- interop
def test_websockets_client_to_our_server_binary_and_fragmented() -> None:
    async def main() -> None:
        server, url, _ = await start()
        try:
            async with lib_connect(url) as ws:
                for n in (0, 10, 70_000, 2 * MB):
                    data = payload(n, n)
                    await ws.send(data)
                    got = await asyncio.wait_for(ws.recv(), T)
                    assert isinstance(got, bytes) and got == data
                # a fragmented message: small fragments, then big ones (direct receive path)
                chunks = [payload(3, 1), payload(1, 2), b"", payload(200, 3)]
                await ws.send(chunks)
                assert await asyncio.wait_for(ws.recv(), T) == b"".join(chunks)
                big = [payload(300_000, i) for i in range(5)]
                await ws.send(big)
                assert await asyncio.wait_for(ws.recv(), T) == b"".join(big)
        finally:
            await stop(server)

    run(main())


def test_our_client_to_websockets_server() -> None:
    async def handler(ws: Any) -> None:
        async for msg in ws:
            await ws.send(msg)  # echo
            if msg == b"fragments please":
                await ws.send([b"ab", b"", payload(100_000, 9), b"z"])
            if msg == b"ping me":
                pong = await ws.ping(b"p1")
                await asyncio.wait_for(pong, T)
                await ws.send(b"pong received")

    async def main() -> None:
        async with ws_serve(handler, "127.0.0.1", 0, compression=None, max_size=None) as srv:
            port = srv.sockets[0].getsockname()[1]
            conn = await connect(f"ws://127.0.0.1:{port}/", max_message_bytes=64 * MB)
            try:
                for n in (1, 126, 65536, 3 * MB):
                    data = payload(n, n)
                    await conn.send([data[: n // 2], data[n // 2 :]])
                    assert bytes(await asyncio.wait_for(conn.recv(), T)) == data
                await conn.send([b"fragments please"])
                assert bytes(await asyncio.wait_for(conn.recv(), T)) == b"fragments please"
                frag = bytes(await asyncio.wait_for(conn.recv(), T))
                assert frag == b"ab" + payload(100_000, 9) + b"z"
                await conn.send([b"ping me"])
                assert bytes(await asyncio.wait_for(conn.recv(), T)) == b"ping me"
                assert bytes(await asyncio.wait_for(conn.recv(), T)) == b"pong received"
            finally:
                await conn.close()

    run(main())


def test_text_frame_makes_our_server_close() -> None:
    async def main() -> None:
        server, url, _ = await start()
        try:
            async with lib_connect(url) as ws:
                await ws.send(b"binary is fine")
                assert await asyncio.wait_for(ws.recv(), T) == b"binary is fine"
                await ws.send("text is not")
                with pytest.raises(WSLibClosed) as info:
                    await asyncio.wait_for(ws.recv(), T)
                assert info.value.rcvd is not None
                assert info.value.rcvd.code in (1002, 1003)  # protocol error / unsupported data
        finally:
            await stop(server)

    run(main())


def test_oversized_message_closes_1009_and_server_keeps_serving() -> None:
    async def main() -> None:
        server, url, _ = await start(max_bytes=4096)
        try:
            async with lib_connect(url) as ws:
                await ws.send(payload(4096))  # exactly the limit: fine
                assert await asyncio.wait_for(ws.recv(), T) == payload(4096)
                await ws.send(payload(4097))
                with pytest.raises(WSLibClosed) as info:
                    await asyncio.wait_for(ws.recv(), T)
                assert info.value.rcvd is not None
                assert info.value.rcvd.code == 1009
            # also when the limit is crossed by a later fragment
            async with lib_connect(url) as ws:
                await ws.send([payload(3000), payload(3000)])
                with pytest.raises(WSLibClosed) as info:
                    await asyncio.wait_for(ws.recv(), T)
                assert info.value.rcvd is not None and info.value.rcvd.code == 1009
            # a new connection is served normally
            async with lib_connect(url) as ws:
                await ws.send(b"still here")
                assert await asyncio.wait_for(ws.recv(), T) == b"still here"
            conn = await connect(url, max_message_bytes=MB)
            await conn.send([b"and here"])
            assert bytes(await asyncio.wait_for(conn.recv(), T)) == b"and here"
            await conn.close()
        finally:
            await stop(server)

    run(main())


def test_ping_from_websockets_client_gets_pong() -> None:
    async def main() -> None:
        server, url, _ = await start()
        try:
            async with lib_connect(url) as ws:
                for data in (b"", b"abc", payload(125, 4)):
                    pong = await ws.ping(data)
                    latency = await asyncio.wait_for(pong, T)
                    assert latency >= 0
                await ws.send(b"after pings")
                assert await asyncio.wait_for(ws.recv(), T) == b"after pings"
        finally:
            await stop(server)

    run(main())


def test_websockets_client_clean_close_gives_1000_to_handler() -> None:
    seen: list[int] = []

    async def handler(conn: WSConnection) -> None:
        try:
            while True:
                await conn.send([await conn.recv()])
        except ConnectionClosed as exc:
            seen.append(exc.code)

    async def main() -> None:
        server, url, _ = await start(handler)
        try:
            async with lib_connect(url) as ws:
                await ws.send(b"x")
                await ws.recv()
                await ws.close(1000)
            for _ in range(100):
                if seen:
                    break
                await asyncio.sleep(0.01)
            assert seen == [1000]
        finally:
            await stop(server)

    run(main())


# ---------------------------------------------------------------------------- raw frames
def test_raw_fragments_with_interleaved_ping() -> None:
    async def main() -> None:
        server, _, port = await start()
        reader, writer = await raw_open(port)
        try:
            writer.write(
                frame(0x2, b"hello ", fin=False)
                + frame(0x9, b"ping!")
                + frame(0x0, b"fragmented ", fin=False)
                + frame(0x0, b"world")
            )
            op, fin, data = await read_frame(reader)
            assert (op, fin, data) == (0xA, True, b"ping!")
            op, fin, data = await read_frame(reader)
            assert (op, fin, data) == (0x2, True, b"hello fragmented world")
            # several whole messages in one write, then one dripped byte by byte
            writer.write(b"".join(frame(0x2, b"m%d" % i) for i in range(5)))
            for i in range(5):
                assert await read_frame(reader) == (0x2, True, b"m%d" % i)
            for b in frame(0x2, payload(300, 1)):
                writer.write(bytes([b]))
                await writer.drain()
            assert await read_frame(reader) == (0x2, True, payload(300, 1))
        finally:
            writer.close()
            await stop(server)

    run(main())


@pytest.mark.parametrize(
    ("name", "bad"),
    [
        ("unmasked client frame", frame(0x2, b"abc", mask=False)),
        ("reserved bit", frame(0x2, b"abc", rsv=0x40)),
        ("continuation first", frame(0x0, b"abc")),
        ("new message inside a fragmented one", frame(0x2, b"a", fin=False) + frame(0x2, b"b")),
        ("fragmented ping", frame(0x9, b"a", fin=False)),
        ("long ping", frame(0x9, b"a" * 126)),
        ("unknown opcode", frame(0x3, b"abc")),
        ("text", frame(0x1, b"abc")),
    ],
    ids=lambda v: v if isinstance(v, str) else "",  # the frames carry random masking keys
)
def test_raw_protocol_violations_close_1002(name: str, bad: bytes) -> None:
    async def main() -> None:
        server, _, port = await start()
        reader, writer = await raw_open(port)
        try:
            writer.write(frame(0x2, b"ok") + bad)
            assert await read_frame(reader) == (0x2, True, b"ok")
            op, _fin, data = await read_frame(reader)
            assert op == 0x8, name
            assert close_code(data) in (1002, 1003), name
            assert await asyncio.wait_for(reader.read(), T) == b""  # then the server hangs up
        finally:
            writer.close()
            await stop(server)

    run(main())


def test_raw_close_frame_is_answered() -> None:
    async def main() -> None:
        server, _, port = await start()
        reader, writer = await raw_open(port)
        try:
            writer.write(frame(0x8, struct.pack("!H", 1001) + b"going away"))
            op, _fin, data = await read_frame(reader)
            assert op == 0x8 and close_code(data) == 1001
            assert await asyncio.wait_for(reader.read(), T) == b""
        finally:
            writer.close()
            await stop(server)

    run(main())


def _split_handshake_case(cut_from_end: int) -> None:
    async def main() -> None:
        opened = asyncio.Event()
        conns: list[WSConnection] = []

        def factory() -> WSConnection:
            c = WSConnection(client=False, max_message_bytes=MB, on_open=lambda _c: opened.set())
            conns.append(c)
            return c

        loop = asyncio.get_running_loop()
        server = await loop.create_server(factory, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            req = handshake_request(port)
            first, second = req[:-cut_from_end], req[-cut_from_end:]
            writer.write(first)
            await writer.drain()
            for _ in range(500):  # until the server has read the first part
                if conns and conns[0].bytes_received == len(first):
                    break
                await asyncio.sleep(0.002)
            assert conns[0].bytes_received == len(first)
            writer.write(second)
            await writer.drain()
            for _ in range(500):  # until the server has read everything
                if conns[0].bytes_received == len(req):
                    break
                await asyncio.sleep(0.002)
            assert conns[0].bytes_received == len(req)
            # the server answers in the same callback that got the last byte
            assert opened.is_set(), "the complete handshake request was not recognised"
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), T)
            assert head.startswith(b"HTTP/1.1 101")
        finally:
            writer.close()
            server.close()

    run(main())


@pytest.mark.parametrize("cut", [5, 20])
def test_handshake_split_across_reads(cut: int) -> None:
    _split_handshake_case(cut)


@pytest.mark.parametrize("cut", [1, 2, 3])
def test_handshake_split_inside_terminator(cut: int) -> None:
    _split_handshake_case(cut)


def test_remote_protocol_error_is_raised_by_recv_before_close() -> None:
    seen: list[RemoteProtocolError] = []

    async def handler(conn: WSConnection) -> None:
        try:
            await conn.recv()
        except RemoteProtocolError as exc:
            seen.append(exc)
            raise

    async def main() -> None:
        server, _, port = await start(handler)
        reader, writer = await raw_open(port)
        try:
            writer.write(frame(0x1, b"text"))
            op, _fin, data = await read_frame(reader)
            assert op == 0x8
            assert len(seen) == 1 and seen[0].code == "bad-frame"
        finally:
            writer.close()
            await stop(server)

    run(main())


def test_server_drops_a_connection_that_never_finishes_its_handshake() -> None:
    from fedstack.transport import ws as wsmod

    async def main() -> bytes:
        async def handler(conn: Any) -> None:
            await conn.recv()

        server = await wsmod.serve(
            handler, "127.0.0.1", 0, max_message_bytes=1 << 20, handshake_timeout=0.3
        )
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n")  # ... and never the rest
        data = await asyncio.wait_for(reader.read(), 5)  # EOF once the server gives up
        writer.close()
        server.close()
        return data

    assert asyncio.run(main()) == b""
