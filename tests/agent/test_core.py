"""The agent's asyncio core against a hostile aggregator (issue 16, finding 12), and the
synchronous facade's waits (no condition variable: futures the core completes).

The fake aggregators are WebSocket servers on 127.0.0.1 that speak through an
:class:`~fedstack.wire.session.AggregatorSession` and send what no honest aggregator does.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import pytest

from fedstack import Agent, AggregatorConfig
from fedstack.agent import ClientState
from fedstack.errors import ConnectionClosed
from fedstack.testing import aggregator_thread
from fedstack.transport import WSConnection
from fedstack.transport.ws import serve
from fedstack.wire import Error, GlobalModel, Heartbeat, Message, Welcome
from fedstack.wire.session import AggregatorSession, HeartbeatReceived, UploadReceived

MODEL = {"w": np.arange(3, dtype=np.float32)}


def welcome(**kw: Any) -> Welcome:
    fields: dict[str, Any] = dict(
        agent_id="a" * 32,
        aggregator_id="evil",
        run_id="r1",
        version=0,
        round=1,
        model_id="m0",
        model=MODEL,
        delivery="push",
        heartbeat_interval=0.2,
    )
    fields.update(kw)
    return Welcome(**fields)


class FakeAggregator:
    """Welcomes each connection with ``first`` then sends ``then``; counts connections
    and heartbeats."""

    def __init__(
        self, first: Welcome, then: list[Message], after_upload: list[Message] | None = None
    ) -> None:
        self.first, self.then = first, then
        self.after_upload = after_upload or []
        self.connections = 0
        self.heartbeats = 0

    async def handle(self, conn: WSConnection) -> None:
        self.connections += 1
        s = AggregatorSession()
        s.receive_bytes(await conn.recv())
        conn.write(s.send(self.first))
        for msg in self.then:
            await asyncio.sleep(0.05)
            conn.write(s.send(msg))
        try:
            while True:
                event = s.receive_bytes(await asyncio.wait_for(conn.recv(), 5.0))
                if isinstance(event, UploadReceived):
                    for msg in self.after_upload:
                        conn.write(s.send(msg))
                if isinstance(event, HeartbeatReceived):
                    self.heartbeats += 1
                    assert event.reply is not None
                    conn.write(s.send(event.reply))  # the echo keeps the agent's lease
        except Exception:
            conn.abort()


async def with_fake(fake: FakeAggregator, body: Callable[[str], Awaitable[None]]) -> None:
    server = await serve(fake.handle, "127.0.0.1", 0, max_message_bytes=1 << 20)
    port = server.sockets[0].getsockname()[1]
    try:
        await body(f"ws://127.0.0.1:{port}")
    finally:
        server.close()


@pytest.mark.parametrize(
    "bad",
    [
        GlobalModel(version=1, model_id="m1", model={"w": np.array([0, np.nan, 1], np.float32)}),
        GlobalModel(version=1, model_id="m1", model={"w": np.array([np.inf, 0, 1], np.float32)}),
        GlobalModel(version=1, model_id="m1", model={"w": np.zeros(4, np.float32)}),
        GlobalModel(version=1, model_id="m1", model={"w": np.zeros(3, np.float64)}),
        GlobalModel(version=1, model_id="m1", model={"v": np.zeros(3, np.float32)}),
        GlobalModel(version=2**62, model_id="m1", model=MODEL),
    ],
    ids=["nan", "inf", "shape", "dtype", "name", "version"],
)
def test_a_hostile_global_model_never_reaches_training(bad: GlobalModel) -> None:
    fake = FakeAggregator(welcome(), [bad])

    async def body(url: str) -> None:
        a = Agent(url, name="victim", max_backoff=0.2)
        a.send_initial_model(MODEL)
        await a.start_async(timeout=5)
        try:
            gm = await a.wait_for_global_model_async(timeout=5)
            np.testing.assert_array_equal(gm["w"], MODEL["w"])  # v0, from the welcome
            with pytest.raises(TimeoutError):
                await a.wait_for_global_model_async(timeout=1.0)
            assert a.version == 0
            assert fake.connections >= 2  # dropped the liar's connection and came back
        finally:
            await a.close_async()

    asyncio.run(with_fake(fake, body))


@pytest.mark.parametrize("interval", [0.0, -1.0, 1e-6, 1e12])
def test_an_absurd_heartbeat_interval_is_refused_without_a_tight_loop(interval: float) -> None:
    fake = FakeAggregator(welcome(heartbeat_interval=interval), [])

    async def body(url: str) -> None:
        a = Agent(url, name="victim", max_backoff=0.5)
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            await a.start_async(timeout=2.0)
        elapsed = time.monotonic() - t0
        # reconnections back off (0.05 s doubling to 0.5 s, jittered): a handful, not
        # thousands; and not one heartbeat was sent at the absurd interval
        assert 2 <= fake.connections <= 12, (fake.connections, elapsed)
        assert fake.heartbeats == 0
        assert a.agent_id is None  # nothing was taken from the refused welcome

    asyncio.run(with_fake(fake, body))


def test_a_backward_version_on_one_connection_is_refused() -> None:
    fake = FakeAggregator(
        welcome(),
        [
            GlobalModel(version=3, model_id="m3", model=MODEL),
            GlobalModel(version=2, model_id="m2", model={"w": np.full(3, 9, np.float32)}),
        ],
    )

    async def body(url: str) -> None:
        a = Agent(url, name="victim", max_backoff=0.2)
        await a.start_async(timeout=5)
        try:
            await a.wait_for_global_model_async(timeout=5)  # v0, the welcome's
            await a.wait_for_global_model_async(timeout=5)
            assert a.version == 3
            with pytest.raises(TimeoutError):  # v2 never comes through
                await a.wait_for_global_model_async(timeout=1.0)
            assert a.version == 3 and fake.connections >= 2
        finally:
            await a.close_async()

    asyncio.run(with_fake(fake, body))


def test_heartbeats_go_out_at_the_welcomes_interval() -> None:
    fake = FakeAggregator(welcome(heartbeat_interval=0.1), [])

    async def body(url: str) -> None:
        a = Agent(url, name="alive")
        await a.start_async(timeout=5)
        try:
            await asyncio.sleep(0.65)
            assert 3 <= fake.heartbeats <= 8, fake.heartbeats
            assert fake.connections == 1
        finally:
            await a.close_async()

    asyncio.run(with_fake(fake, body))


def test_a_refused_upload_keeps_a_newer_model_waiting() -> None:
    """A newer global model arrives, then the upload trained on the old one is refused:
    the new model stays ready for the trainer (the client state stays gm_ready)."""
    fake = FakeAggregator(
        welcome(),
        [],
        after_upload=[
            GlobalModel(version=1, model_id="m1", model={"w": np.full(3, 5, np.float32)}),
            Error(code="invalid-model", message="does not fit the strategy"),
        ],
    )

    async def body(url: str) -> None:
        a = Agent(url, name="a", max_backoff=0.2)
        refused: list[Error] = []
        a.on_refusal = refused.append
        await a.start_async(timeout=5)
        try:
            gm = await a.wait_for_global_model_async(timeout=5)
            assert a.send_trained_model({"w": gm["w"] + 1}, 1)
            for _ in range(100):
                if refused:
                    break
                await asyncio.sleep(0.02)
            assert [e.code for e in refused] == ["invalid-model"]
            assert a._pending is None and a.state == ClientState.gm_ready
            np.testing.assert_array_equal((await a.wait_for_global_model_async(2))["w"], 5)
        finally:
            await a.close_async()

    asyncio.run(with_fake(fake, body))


# ---------------------------------------------------------------------- the sync facade
def test_close_from_another_thread_ends_a_blocked_wait(tmp_path: Any) -> None:
    cfg = AggregatorConfig(auth="off", port=0, db=str(tmp_path / "f.db"), min_agents=2)
    with aggregator_thread(cfg) as agg:
        a = Agent(f"ws://127.0.0.1:{agg.port}", name="a")
        a.send_initial_model(MODEL)
        a.start()
        a.wait_for_global_model(5)  # v0; v1 needs a second agent: never comes
        errors: list[BaseException] = []

        def blocked() -> None:
            try:
                a.wait_for_global_model()  # no timeout
            except BaseException as exc:
                errors.append(exc)

        t = threading.Thread(target=blocked)
        t.start()
        time.sleep(0.3)
        assert t.is_alive()
        a.close()
        t.join(5)
        assert not t.is_alive()
        assert len(errors) == 1 and isinstance(errors[0], ConnectionClosed)
        assert not [th for th in threading.enumerate() if th.name == "fedstack-agent-a"]


def test_waits_in_several_threads_see_the_same_changes(tmp_path: Any) -> None:
    """flush in one thread and wait_for_global_model in another, both woken by the core."""
    cfg = AggregatorConfig(auth="off", port=0, db=str(tmp_path / "f.db"), rounds=2)
    with aggregator_thread(cfg) as agg:
        a = Agent(f"ws://127.0.0.1:{agg.port}", name="a")
        a.send_initial_model(MODEL)
        a.start()
        gm = a.wait_for_global_model(5)
        got: dict[str, Any] = {}

        def flush() -> None:
            a.flush(10)
            got.setdefault("flush", None)

        flusher = threading.Thread(target=flush)
        waiter = threading.Thread(target=lambda: got.setdefault("gm", a.wait_for_global_model(10)))
        waiter.start()
        assert a.send_trained_model({"w": gm["w"] + 1}, 1)
        flusher.start()
        flusher.join(10)
        waiter.join(10)
        assert "flush" in got and a._pending is None and len(a.acknowledged) == 1
        np.testing.assert_array_equal(got["gm"]["w"], MODEL["w"] + 1)
        a.close()


def test_heartbeat_reply_is_the_aggregators_echo() -> None:
    """The session suggests the reply; the fake echoes it like the real aggregator."""
    s = AggregatorSession()
    from fedstack.wire import Participate

    s.receive(Participate(agent_name="x"))
    s.send(welcome())
    event = s.receive(Heartbeat(seq=9))
    assert isinstance(event, HeartbeatReceived) and event.reply == Heartbeat(seq=9)
