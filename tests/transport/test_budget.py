"""Memory-bounded receive and fan-out: byte budgets shared by many connections."""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import numpy as np
import pytest

from fedstack.aggregator.fanout import Fanout
from fedstack.transport import ws
from fedstack.transport.budget import ByteBudget

MB = 1 << 20


def _payload(i: int, n: int) -> np.ndarray[Any, Any]:
    return np.full(n, i % 251, dtype=np.uint8)


def test_budget_admits_one_oversized_request_and_is_fifo() -> None:
    async def main() -> None:
        b = ByteBudget(10, min_bytes=1)
        await b.acquire(25)  # nothing held: admitted although larger than the budget
        order: list[int] = []

        async def want(i: int, n: int) -> None:
            await b.acquire(n)
            order.append(i)

        tasks = [asyncio.create_task(want(i, n)) for i, n in enumerate((6, 3, 5))]
        await asyncio.sleep(0.01)
        assert order == [] and b.used == 25
        b.release(25)
        await asyncio.sleep(0.01)
        assert order == [0, 1] and b.used == 9  # 5 more would not fit: FIFO, no overtaking
        b.release(6)
        await asyncio.sleep(0.01)
        assert order == [0, 1, 2] and b.used == 8
        await asyncio.gather(*tasks)

    asyncio.run(main())


@pytest.mark.timeout(60)
def test_uploads_received_within_budget() -> None:
    """10 clients send 20 MB each at once; the server never holds more than the budget."""
    n_clients, size, limit = 10, 20 * MB, 45 * MB

    async def main() -> None:
        budget = ByteBudget(limit, min_bytes=MB)
        got: dict[str, str] = {}
        peak_live = [0]

        async def handler(conn: ws.WSConnection) -> None:
            msg = await conn.recv()
            peak_live[0] = max(peak_live[0], budget.used)
            await asyncio.sleep(0.05)  # "processing" while the bytes are held
            got[hashlib.sha256(msg).hexdigest()] = conn.remote_address
            del msg
            await conn.close()

        server = await ws.serve(
            handler, "127.0.0.1", 0, max_message_bytes=1 << 30, receive_budget=budget
        )
        port = server.sockets[0].getsockname()[1]

        async def client(i: int) -> str:
            c = await ws.connect(f"ws://127.0.0.1:{port}", max_message_bytes=1 << 30)
            data = _payload(i, size)
            await asyncio.wait_for(c.send([data.data]), 30)
            await asyncio.wait_for(c.closed_future, 30)
            return hashlib.sha256(data.data).hexdigest()

        sent = await asyncio.gather(*(client(i) for i in range(n_clients)))
        server.close()
        assert set(sent) <= set(got) and len(got) == len(set(sent))
        assert budget.peak <= limit, budget.peak
        assert budget.waited > 0  # the budget really held connections back
        assert budget.used == 0  # everything was given back

    asyncio.run(main())


@pytest.mark.timeout(60)
def test_fanout_encodes_once_and_stays_within_budget() -> None:
    """One 20 MB global model to 10 agents with a 45 MB budget: at most 2 sends in flight,
    and the bytes buffered by the server's transports never exceed the budget."""
    n_clients, limit = 10, 45 * MB
    weights = {"w": np.arange(5 * MB, dtype=np.float32)}  # 20 MB

    async def main() -> None:
        fan = Fanout(limit)
        conns: list[ws.WSConnection] = []
        max_buffered = [0]
        ready = asyncio.Event()

        async def handler(conn: ws.WSConnection) -> None:
            conns.append(conn)
            if len(conns) == n_clients:
                ready.set()
            await asyncio.wait_for(conn.closed_future, 60)

        server = await ws.serve(handler, "127.0.0.1", 0, max_message_bytes=1 << 30)
        port = server.sockets[0].getsockname()[1]
        clients = [
            await ws.connect(f"ws://127.0.0.1:{port}", max_message_bytes=1 << 30)
            for _ in range(n_clients)
        ]
        await asyncio.wait_for(ready.wait(), 10)

        stop = asyncio.Event()

        async def sample() -> None:
            while not stop.is_set():
                total = sum(
                    c.transport.get_write_buffer_size() for c in conns if c.transport is not None
                )
                max_buffered[0] = max(max_buffered[0], total)
                await asyncio.sleep(0)

        sampler = asyncio.create_task(sample())

        async def push(conn: ws.WSConnection) -> None:
            parts, size = fan.encoded(1, "m1", weights, False, None)
            await fan.send(conn, parts, size, 30)

        async def receive(c: ws.WSConnection) -> int:
            await asyncio.sleep(0.02)  # slow readers: the budget must hold the others back
            return (await asyncio.wait_for(c.recv(), 30)).nbytes

        sizes = await asyncio.gather(*(push(c) for c in conns), *(receive(c) for c in clients))
        stop.set()
        await sampler
        for c in clients:
            c.abort()
        server.close()
        assert fan.encodings == 1
        assert all(s is not None and s > 20 * MB for s in sizes[n_clients:])
        assert fan.budget.peak <= limit
        assert max_buffered[0] <= limit, max_buffered[0]
        assert fan.budget.used == 0

    asyncio.run(main())
