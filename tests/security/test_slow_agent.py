"""Issue 16 finding 7: a slow agent does not hold the shared upload budget.

A registered agent announces a big upload (its frame header takes bytes of the shared
receive budget) and then sends it at a trickle, far below ``min_transfer_rate``. The
aggregator drops it within a few rate windows, so an honest agent whose uploads need the
same budget goes on with its rounds; without the minimum rate the trickle held the budget
for ``10 x send_timeout``.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from fedstack import Agent, AggregatorConfig, FederationFinished
from fedstack.aggregator.pacing import RATE_WINDOW, TooSlow, deadline_for, drain_paced
from fedstack.errors import ConnectionClosed
from fedstack.testing import aggregator_thread
from fedstack.transport import connect
from fedstack.transport.ws import WSConnection
from fedstack.wire import Participate, Welcome, decode, encode

pytestmark = pytest.mark.serial  # rates and stalls: run alone (see pyproject)

ROUNDS = 4
MODEL = 300_000  # float32: 1.2 MB, a budgeted upload
ANNOUNCED = 1_500_000  # the slow upload's size: with an honest upload, over the budget


def _honest(url: str, versions: list[tuple[float, int]]) -> None:
    a = Agent(url, name="honest")
    a.send_initial_model({"w": np.zeros(MODEL, np.float32)})
    a.start()
    try:
        while True:
            try:
                gm = a.wait_for_global_model(60)
            except FederationFinished:
                break
            versions.append((time.monotonic(), a.version))
            a.send_trained_model({"w": gm["w"] + 1}, 5)
    finally:
        a.close()


async def _trickle(url: str, seconds: float) -> float | None:
    """Register, announce a big upload, send it at ~8 KB/s; the seconds until the
    aggregator closed the connection (None: still open after ``seconds``)."""
    conn = await connect(url, max_message_bytes=1 << 24)
    try:
        conn.write(encode(Participate(agent_name="slowpoke")))
        while not isinstance(decode(await asyncio.wait_for(conn.recv(), 10)), Welcome):
            pass
        assert isinstance(conn, WSConnection)
        transport = conn.transport
        assert transport is not None
        # one masked binary frame of ANNOUNCED bytes, its payload sent slowly
        transport.write(bytes([0x82, 0x80 | 127]) + ANNOUNCED.to_bytes(8, "big") + os.urandom(4))
        start = time.monotonic()
        while time.monotonic() - start < seconds:
            if transport.is_closing() or not conn.is_open:
                return time.monotonic() - start
            transport.write(os.urandom(4096))
            await asyncio.sleep(0.5)
        return None
    except ConnectionClosed:
        return time.monotonic() - start
    finally:
        conn.abort()


def test_slow_uploader_is_dropped_and_honest_rounds_go_on(tmp_path: Path) -> None:
    cfg = AggregatorConfig(
        auth="off",
        port=0,
        db=str(tmp_path / "f.db"),
        rounds=ROUNDS,
        min_agents=1,
        threshold=0.5,  # the slow agent does not have to contribute
        heartbeat_interval=1.0,
        send_timeout=5.0,  # without a minimum rate: held for 10 x 5 s
        upload_budget_bytes=2 << 20,
        max_message_bytes=16 << 20,
        min_transfer_rate=256 * 1024,
        finish_grace=2,
    )
    versions: list[tuple[float, int]] = []
    with aggregator_thread(cfg) as agg:
        url = f"ws://127.0.0.1:{agg.port}"
        honest = threading.Thread(target=_honest, args=(url, versions))
        honest.start()
        deadline = time.monotonic() + 20
        while (not versions or versions[-1][1] < 1) and time.monotonic() < deadline:
            time.sleep(0.01)  # the honest agent had round 1 before the attack
        assert versions, "the honest agent never got a global model"
        attack_start = time.monotonic()
        closed_after = asyncio.run(_trickle(url, 20.0))
        honest.join(40)
        assert not honest.is_alive()
    assert closed_after is not None, "the trickling agent held its upload for 20 s"
    assert closed_after < 4 * RATE_WINDOW + 3 * cfg.heartbeat_interval
    last = max(v for _, v in versions)
    assert last == ROUNDS
    finished = next(t for t, v in versions if v == ROUNDS)
    assert finished - attack_start < 15, "the honest rounds waited for the slow agent"


class _StuckTransport:
    def get_write_buffer_size(self) -> int:
        return 1 << 20  # nothing ever leaves the buffer


class _StuckConn:
    transport = _StuckTransport()

    async def drain(self) -> None:
        await asyncio.sleep(3600)


def test_a_reader_that_never_reads_is_dropped_after_a_window() -> None:
    async def main() -> float:
        start = time.monotonic()
        with pytest.raises(TooSlow):
            await drain_paced(_StuckConn(), 1 << 20, 120.0, 64 * 1024)
        return time.monotonic() - start

    took = asyncio.run(main())
    assert took < 2 * RATE_WINDOW  # not the send timeout's 120 s


def test_deadlines_scale_with_size() -> None:
    assert deadline_for(1 << 20, 120.0, 0) == 120.0
    assert deadline_for(1 << 20, 120.0, 1024) == 1024.0
    assert deadline_for(1024, 120.0, 1024) == 120.0
