"""Issue 16 finding 7: a slow agent never delays the others' rounds beyond the round deadline.

An agent in good standing (it completed an upload) announces an upload larger than the
whole trusted upload pool and sends it above ``min_transfer_rate``: alone in its
pool, it is admitted, and every honest upload waits behind it. At that rate the upload
would hold the pool for ``size / rate`` seconds (here ~32 s; hours for a big model), so
the minimum rate alone does not help. With a round deadline, an upload that holds bytes
others wait for and would end after the deadline is cut with the reason ``overdue``,
a strike for its identity, and the honest rounds go on.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from fedstack import Agent, AggregatorConfig, FederationFinished
from fedstack.aggregator.pacing import RATE_WINDOW, Overdue, ReceiveWatch, TooSlow, check_period
from fedstack.aggregator.service import Aggregator
from fedstack.errors import ConnectionClosed
from fedstack.testing import aggregator_thread
from fedstack.transport import connect
from fedstack.transport.budget import PROBATION_POOL, TRUSTED_POOL, ByteBudget
from fedstack.transport.standing import NEW, SUSPECT, TRUSTED
from fedstack.transport.ws import WSConnection
from fedstack.wire import Error, ModelUpload, Participate, UploadAck, Welcome, decode, encode

pytestmark = [pytest.mark.timeout(90), pytest.mark.serial]  # rates and stalls: run alone

MODEL = 300_000  # float32: 1.2 MB, a budgeted upload
POOL = 2 << 20  # the trusted upload pool
BIG = 3 << 20  # the slow upload: larger than the whole pool
MIN_RATE = 32 * 1024
RATE = 3 * MIN_RATE  # the slow upload: well above the minimum rate, ~32 s for BIG
EVERY = 0.1
ROUND_TIMEOUT = 2.0
OVERDUE = "overdue"  # the documented code and close reason (fedstack.aggregator.pacing)
OBSERVE = 8.0  # seconds of honest rounds looked at from the start of the slow upload


def _honest(name: str, url: str, stamps: list[float], stop: threading.Event) -> None:
    a = Agent(url, name=name)
    a.send_initial_model({"w": np.zeros(MODEL, np.float32)})
    a.start()
    try:
        while not stop.is_set():
            try:
                gm = a.wait_for_global_model(30)
            except (FederationFinished, TimeoutError):
                break
            stamps.append(time.monotonic())
            time.sleep(0.05)  # a modest pace: the machine is shared
            a.send_trained_model({"w": gm["w"] + 1}, 5)
    finally:
        a.close()


def _header(n: int) -> bytes:
    """A masked binary frame header (all-zero key) announcing ``n`` bytes."""
    return bytes([0x82, 0x80 | 127]) + n.to_bytes(8, "big") + b"\0" * 4


class _Slow:
    """What the slow agent saw."""

    agent_id = ""
    tier_before = -1
    started = 0.0
    closed_after: float | None = None
    codes: list[str]
    close_reason = ""

    def __init__(self) -> None:
        self.codes = []


async def _slow_agent(url: str, agg: Aggregator, seconds: float, out: _Slow) -> None:
    """Register, complete one honest upload (good standing), then announce ``BIG`` bytes
    and send them at three times the minimum rate, reading everything the aggregator sends,
    until the connection is closed or ``seconds`` passed."""
    conn = await connect(url, max_message_bytes=1 << 24)
    assert isinstance(conn, WSConnection)
    replies: asyncio.Queue[object] = asyncio.Queue()

    async def reader() -> None:
        try:
            while True:
                msg = decode(await conn.recv())
                if isinstance(msg, Error):
                    out.codes.append(msg.code)
                await replies.put(msg)
        except ConnectionClosed as exc:
            out.close_reason = exc.reason

    conn.write(encode(Participate(agent_name="slowpoke")))
    reading = asyncio.get_running_loop().create_task(reader())
    try:
        while not isinstance(welcome := await asyncio.wait_for(replies.get(), 10), Welcome):
            pass
        out.agent_id = welcome.agent_id
        upload = ModelUpload(
            upload_id=uuid.uuid4().hex,
            base_version=welcome.version,
            num_samples=1,
            model={"w": np.zeros(MODEL, np.float32)},
        )
        conn.write(encode(upload))
        while not isinstance(await asyncio.wait_for(replies.get(), 10), UploadAck | Error):
            pass
        standing = agg.upload_budget.standing
        out.tier_before = standing.account(f"agent {out.agent_id}").tier()
        t = conn.transport
        assert t is not None
        out.started = time.monotonic()
        t.write(_header(BIG))
        sent = 0
        while (elapsed := time.monotonic() - out.started) < seconds:
            if t.is_closing() or not conn.is_open:
                out.closed_after = elapsed
                break
            due = min(BIG, int(RATE * (elapsed + EVERY)))  # paced by the clock, not the sleeps
            t.write(bytes(due - sent))
            sent = due
            await asyncio.sleep(EVERY)
        await asyncio.wait_for(asyncio.shield(reading), 3)  # the error and close reason
    except TimeoutError:
        pass
    finally:
        conn.abort()
        reading.cancel()
        await asyncio.gather(reading, return_exceptions=True)


def test_an_upload_holding_others_past_the_round_deadline_is_cut(tmp_path: Path) -> None:
    cfg = AggregatorConfig(
        auth="off",
        port=0,
        db=str(tmp_path / "f.db"),
        rounds=100_000,
        min_agents=1,
        threshold=0.5,  # the two honest uploads make a round, the slow one is not needed
        heartbeat_interval=1.0,
        send_timeout=30.0,  # without the fix: the slow upload may take 10 x 30 s
        upload_budget_bytes=POOL,
        max_message_bytes=16 << 20,
        min_transfer_rate=MIN_RATE,
        round_timeout=ROUND_TIMEOUT,
        finish_grace=1,
    )
    stamps: list[float] = []
    stop = threading.Event()
    slow = _Slow()
    with aggregator_thread(cfg) as agg:
        url = f"ws://127.0.0.1:{agg.port}"
        honest = [
            threading.Thread(target=_honest, args=(f"honest-{i}", url, stamps, stop))
            for i in range(2)
        ]
        for h in honest:
            h.start()
        try:
            deadline = time.monotonic() + 20
            while len(stamps) < 6 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert len(stamps) >= 6, "the honest agents never got going"
            asyncio.run(_slow_agent(url, agg, OBSERVE, slow))
            time.sleep(max(0.0, slow.started + OBSERVE - time.monotonic()))
            standing = agg.upload_budget.standing
            tier_after = standing.account(f"agent {slow.agent_id}").tier()
            honest_tiers = [
                standing.account(f"agent {s.agent_id}").tier()
                for s in agg.sessions.values()
                if s.name.startswith("honest")
            ]
        finally:
            stop.set()
            for h in honest:
                h.join(40)
    assert slow.tier_before == TRUSTED, "the slow agent was not in good standing"
    start, end = slow.started, slow.started + OBSERVE
    during = [t for t in stamps if start <= t <= end]
    marks = [start, *during, end]
    longest = max(b - a for a, b in zip(marks, marks[1:], strict=False))
    # before the fix: the honest uploads waited behind the slow one for the whole
    # observation (it would have taken ~32 s), not a single honest round
    assert longest < ROUND_TIMEOUT + 1.5, f"honest rounds stalled {longest:.2f} s"
    assert len(during) >= 10, f"only {len(during)} honest global models in {OBSERVE} s"
    assert slow.closed_after is not None, "the slow upload held the pool the whole time"
    assert slow.closed_after < ROUND_TIMEOUT + 1.5
    assert OVERDUE in slow.codes, slow.codes
    assert slow.close_reason == OVERDUE
    assert tier_after == SUSPECT  # a strike for its identity
    assert honest_tiers == [TRUSTED, TRUSTED]  # honest uploads were never cut


class _Conn:
    """What :class:`ReceiveWatch` reads of a connection, set by hand."""

    def __init__(self, total: int | None) -> None:
        self.total = total
        self.got = 0
        self.bytes_received = 0
        self.in_message = True
        self.waiting_for_budget = False
        self.holds_contended = True

    @property
    def message_progress(self) -> tuple[int, int | None]:
        return self.got, self.total


def test_the_projection_cuts_only_an_upload_that_holds_others_past_the_deadline() -> None:
    conn = _Conn(total=10_000_000)
    watch = ReceiveWatch(conn, 0)
    conn.got = 1000
    watch.check_deadline(100.0, 110.0, 10.0)  # first seen: nothing judged yet
    conn.got = 1_001_000  # 1 MB/s: 9 s left, ends at 110 s: in time
    watch.check_deadline(101.0, 110.0, 10.0)
    conn.got = 1_501_000  # 750 kB/s since first seen: ends after 112 s, beyond 110 s
    conn.holds_contended = False  # nobody waits: it may take its time
    watch.check_deadline(102.0, 110.0, 10.0)
    conn.holds_contended = True
    conn.waiting_for_budget = True  # held back by the budget itself: not judged
    watch.check_deadline(102.0, 110.0, 10.0)
    conn.waiting_for_budget = False
    watch.check_deadline(102.0, None, 10.0)  # no round deadline: today's behaviour
    with pytest.raises(Overdue, match="round deadline"):
        watch.check_deadline(102.0, 110.0, 10.0)


def test_a_round_stuck_past_its_deadline_gives_an_upload_a_round_timeout() -> None:
    """Past the deadline (a round that waits for more agents), a fresh upload is judged
    against its own start plus the round timeout, not cut at once; once that passed while
    others wait, it is cut whatever its projection."""
    conn = _Conn(total=None)  # fragmented: its size is not known
    watch = ReceiveWatch(conn, 0)
    conn.got = 10
    watch.check_deadline(50.0, 40.0, 5.0)  # deadline 10 s ago
    conn.got = 20
    watch.check_deadline(54.0, 40.0, 5.0)  # until 55 s: in time
    with pytest.raises(Overdue, match="past the round deadline"):
        watch.check_deadline(55.0, 40.0, 5.0)


def test_the_minimum_rate_is_judged_over_whole_windows_of_short_checks() -> None:
    conn = _Conn(total=None)
    watch = ReceiveWatch(conn, 1000)
    for _ in range(3):  # 1.5 s of a 2 s window: not judged yet
        watch.check(0.5)
    conn.bytes_received = 1999  # < 1000 B/s over the window
    with pytest.raises(TooSlow):
        watch.check(0.5)
    assert check_period(None) == RATE_WINDOW
    assert check_period(2.0) == 0.5
    assert check_period(300.0) == RATE_WINDOW


def test_contention_is_seen_by_the_pool_that_holds_the_bytes() -> None:
    async def main() -> None:
        budget = ByteBudget(100, min_bytes=1, probation=10)
        assert budget.request(150, lambda: None, tier=TRUSTED)  # alone: oversized
        assert not budget.contended(TRUSTED_POOL) and not budget.contended(PROBATION_POOL)
        assert not budget.request(15, lambda: None, tier=NEW)  # oversized too: held back
        assert budget.contended(TRUSTED_POOL)  # it holds the probation request back too
        assert not budget.contended(PROBATION_POOL)  # the probation pool holds nothing
        assert not budget.request(20, lambda: None, tier=TRUSTED)
        assert budget.contended(TRUSTED_POOL)

    asyncio.run(main())
