"""The in-process transport: same interface and failure modes as the WebSocket one."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Any

import numpy as np
import pytest

from fedstack.errors import ConnectionClosed, MessageTooLarge
from fedstack.transport import connect, inproc


def test_messages_cross_event_loops_in_both_directions() -> None:
    received: list[bytes] = []

    async def server_main(ready: threading.Event, done: threading.Event) -> None:
        async def handler(conn: inproc.InProcConnection) -> None:
            while True:
                try:
                    msg: Any = await conn.recv()
                except ConnectionClosed:
                    done.set()
                    return
                received.append(bytes(msg))
                await conn.send([b"echo:", bytes(msg)])

        server = await inproc.serve(handler, "loops-test", max_message_bytes=1 << 20)
        ready.set()
        while not done.is_set():
            await asyncio.sleep(0.01)
        server.close()

    ready, done = threading.Event(), threading.Event()
    t = threading.Thread(target=asyncio.run, args=(server_main(ready, done),))
    t.start()
    assert ready.wait(5)

    async def client() -> list[bytes]:
        conn = await connect("inproc://loops-test", max_message_bytes=1 << 20)
        out = []
        for i in range(50):
            payload = np.full(1000 + i, i, dtype=np.uint8)
            conn.write([payload.data])
            reply: Any = await asyncio.wait_for(conn.recv(), 5)
            out.append(bytes(reply))
        await conn.close()
        return out

    replies = asyncio.run(client())
    t.join(5)
    assert not t.is_alive()
    assert len(received) == 50
    assert all(r == b"echo:" + bytes([i]) * (1000 + i) for i, r in enumerate(replies))


async def _collecting_server(
    max_bytes: int,
) -> tuple[inproc.InProcServer, inproc.InProcConnection, asyncio.Queue[Any]]:
    """A server that puts every message it receives into a queue, and a client of it."""
    got: asyncio.Queue[Any] = asyncio.Queue()

    async def handler(conn: inproc.InProcConnection) -> None:
        with contextlib.suppress(ConnectionClosed):
            while True:
                await got.put(await conn.recv())

    server = await inproc.serve(handler, max_message_bytes=max_bytes)
    client = await connect(server.url, max_message_bytes=max_bytes)
    assert isinstance(client, inproc.InProcConnection)
    return server, client, got


def test_received_buffers_are_writable_copies() -> None:
    async def main() -> None:
        server, conn, got = await _collecting_server(1 << 20)
        src = bytearray(b"abcdef")
        conn.write([src])
        src[0] = ord("z")  # the sender may reuse its buffer at once
        msg = await asyncio.wait_for(got.get(), 5)
        assert bytes(msg) == b"abcdef"
        assert not msg.readonly
        server.close()

    asyncio.run(main())


def test_too_large_fails_on_the_receiving_side() -> None:
    async def main() -> None:
        errors: list[BaseException] = []

        async def handler(conn: inproc.InProcConnection) -> None:
            try:
                await conn.recv()
            except MessageTooLarge as exc:
                errors.append(exc)

        server = await inproc.serve(handler, max_message_bytes=1024)
        conn = await connect(server.url, max_message_bytes=1 << 20)
        conn.write([b"x" * 2048])  # the sender is not told: the receiver refuses it
        for _ in range(100):
            if errors:
                break
            await asyncio.sleep(0.01)
        assert errors and "2048" in str(errors[0])
        server.close()

    asyncio.run(main())


def test_close_abort_and_refused() -> None:
    async def main() -> None:
        closed: asyncio.Future[tuple[int, str]] = asyncio.get_running_loop().create_future()

        async def handler(conn: inproc.InProcConnection) -> None:
            try:
                await conn.recv()
            except ConnectionClosed as exc:
                closed.set_result((exc.code, exc.reason))

        server = await inproc.serve(handler, "close-test", max_message_bytes=1024)
        with pytest.raises(OSError, match="already running"):
            await inproc.serve(handler, "close-test", max_message_bytes=1024)
        conn = await connect("inproc://close-test", max_message_bytes=1024)
        await conn.close(1000, "bye")
        assert await asyncio.wait_for(closed, 5) == (1000, "bye")
        with pytest.raises(ConnectionClosed):
            conn.write([b"late"])
        server.close()
        with pytest.raises(ConnectionRefusedError, match="close-test"):
            await connect("inproc://close-test", max_message_bytes=1024)
        # a server closing drops its open connections
        server2 = await inproc.serve(handler, "close-test-2", max_message_bytes=1024)
        c2 = await connect(server2.url, max_message_bytes=1024)
        await asyncio.sleep(0.01)
        server2.close()
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(c2.recv(), 5)

    asyncio.run(main())


def test_frozen_messages_are_handed_over_read_only_without_a_copy() -> None:
    from fedstack.wire import Segments

    async def main() -> None:
        server, conn, got = await _collecting_server(1 << 20)
        arr = np.arange(1000, dtype=np.float32)
        conn.write([b"head", arr.data], frozen=True)
        msg = await asyncio.wait_for(got.get(), 5)
        assert isinstance(msg, Segments) and msg.nbytes == 4 + arr.nbytes
        body = np.frombuffer(msg[4:].contiguous(), np.float32)
        assert np.shares_memory(body, arr) and not body.flags.writeable
        np.testing.assert_array_equal(body, arr)
        server.close()

    asyncio.run(main())


def test_big_message_buffers_are_reused_only_when_released() -> None:
    async def main() -> None:
        server, conn, got = await _collecting_server(8 << 20)
        n = 2 << 20
        conn.write([np.full(n, 1, np.uint8).data])
        first = await asyncio.wait_for(got.get(), 5)
        conn.write([np.full(n, 2, np.uint8).data])  # the first is still held: a new buffer
        second = await asyncio.wait_for(got.get(), 5)
        assert bytes(first[:3]) == b"\x01\x01\x01" and bytes(second[:3]) == b"\x02\x02\x02"
        assert server.pool.reused == 0
        del first
        conn.write([np.full(n, 3, np.uint8).data])  # the first's buffer is free now
        third = await asyncio.wait_for(got.get(), 5)
        assert server.pool.reused == 1
        assert bytes(third[-3:]) == b"\x03\x03\x03" and bytes(second[-3:]) == b"\x02\x02\x02"
        server.close()

    asyncio.run(main())
