"""Issue 16 finding 7, fan-out side: an agent that does not read holds at most one
global model's bytes, however many versions are published meanwhile."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np

from fedstack.aggregator.delivery import Delivery, Published
from fedstack.aggregator.fanout import Fanout
from fedstack.aggregator.registry import Session

MB = 1 << 20


class StuckConn:
    """A connection whose peer reads nothing until ``release`` is set."""

    remote_address = "127.0.0.1:1"

    def __init__(self) -> None:
        self.writes: list[int] = []
        self.release = asyncio.Event()
        self.aborted = False

    def write(self, parts: list[Any], *, frozen: bool = False) -> None:
        self.writes.append(sum(memoryview(p).nbytes for p in parts))

    async def drain(self) -> None:
        await self.release.wait()

    def abort(self) -> None:
        self.aborted = True


def test_pushes_to_an_agent_that_does_not_read_fold_into_one() -> None:
    async def main() -> tuple[StuckConn, int, int, int]:
        fan = Fanout(64 * MB)
        latest: list[Published] = []
        delivery = Delivery(fan, lambda: latest[-1], 30.0, dict, 0)
        conn = StuckConn()
        session = Session("a", "a", conn, "x")  # type: ignore[arg-type]
        weights = {"w": np.zeros(MB // 2, np.float32)}  # 2 MiB: budgeted
        tasks = []
        for v in range(10):  # ten rounds finish while the agent reads nothing
            latest.append(Published(v, v + 1, f"m{v}", weights, {}, False))
            tasks.append(asyncio.create_task(delivery.push(session, v)))
            await asyncio.sleep(0.01)
        held_while_stuck, writes_while_stuck = fan.budget.used, len(conn.writes)
        conn.release.set()  # it reads again: the latest version follows the first
        await asyncio.wait_for(asyncio.gather(*tasks), 5)
        return conn, held_while_stuck, writes_while_stuck, session.known_version

    conn, held, writes, known = asyncio.run(main())
    assert writes == 1  # before: one 2 MiB model per version, all queued on the socket
    assert held <= 2 * MB + 4096
    assert len(conn.writes) == 2 and known == 9  # then only the newest version
    assert not conn.aborted
