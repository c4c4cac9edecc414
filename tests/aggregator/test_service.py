"""The round owner, driven by feeding it events, with a fake clock and no sockets.

Each test starts a real :class:`Aggregator` on the in-process transport (nothing listens)
with a SQLite store in a temporary folder, makes sessions over a recording fake
connection, and puts events on the owner's queue as connections would.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedstack import AggregatorConfig, Store
from fedstack.aggregator.events import (
    AgentJoined,
    AgentLeft,
    DeadlineFired,
    Event,
    FederationStarted,
    PollReceived,
    UploadReceived,
)
from fedstack.aggregator.registry import Session
from fedstack.aggregator.rounds import UploadStatus
from fedstack.aggregator.service import Aggregator, AggregatorFailed
from fedstack.errors import ConnectionClosed
from fedstack.wire import (
    Bye,
    Error,
    GlobalModel,
    Message,
    ModelUpload,
    NotReady,
    Poll,
    UploadAck,
    Welcome,
    decode,
)


class FakeClock:
    """Monotonic seconds that move only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeConn:
    """A connection that records what the aggregator wrote to it."""

    def __init__(self, address: str = "10.0.0.1:4242") -> None:
        self.remote_address = address
        self.sent: list[Message] = []
        self.closed = False
        self.aborted = False

    def write(self, parts: Sequence[Any], *, frozen: bool = False) -> None:
        self.sent.append(decode(b"".join(bytes(p) for p in parts)))

    async def send(self, parts: Sequence[Any]) -> None:
        self.write(parts)

    async def drain(self) -> None:
        return None

    async def close(self, code: int | None = None, reason: str = "", timeout: float = 1.0) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    @property
    def is_open(self) -> bool:
        return not (self.closed or self.aborted)


def sent(s: Session) -> list[Message]:
    """What the aggregator wrote to ``s`` (a session over a :class:`FakeConn`)."""
    conn = s.conn
    assert isinstance(conn, FakeConn)
    return conn.sent


def w(v: float) -> dict[str, np.ndarray]:
    return {"w": np.full(4, v, np.float32)}


async def until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    """Let the owner run until ``cond()`` (bounded)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        assert loop.time() < end, "condition not reached"
        await asyncio.sleep(0.001)


class Harness:
    def __init__(self, agg: Aggregator, store: Store, clock: FakeClock) -> None:
        self.agg, self.store, self.clock = agg, store, clock

    async def post(self, ev: Event) -> None:
        await self.agg._post(ev)

    async def join(self, name: str) -> Session:
        agent_id, _ = self.store.register_agent(name, None, "test")
        s = Session(agent_id, name, FakeConn(), "10.0.0.1:4242")  # type: ignore[arg-type]
        joined = asyncio.get_running_loop().create_future()
        await self.post(AgentJoined(s, joined))
        await joined
        if self.agg.owner.published is not None:  # as a connection does once it counts
            await self.agg.delivery.welcome(s)
        return s

    async def start_federation(self, first: Session) -> None:
        glob = w(0)
        gid = self.store.init_federation(
            self.agg.run_id,
            agent_id=first.agent_id,
            structure=[("w", "float32", (4,))],
            init_weights=True,
            initial=glob,
            global_weights=glob,
            num_samples=1,
            metrics={},
            aggregator_id=self.agg.aggregator_id,
        )
        done = asyncio.get_running_loop().create_future()
        await self.post(FederationStarted([("w", "float32", (4,))], glob, gid, done))
        await done
        for s in list(self.agg.sessions.values()):  # the ones that waited for the model
            await self.agg.delivery.welcome(s)

    def upload(self, s: Session, v: float, base: int = 0, uid: str | None = None) -> UploadReceived:
        msg = ModelUpload(
            upload_id=uid or uuid.uuid4().hex,
            base_version=base,
            model=w(v),
            num_samples=1,
            metrics={"v": v},
        )
        return UploadReceived(s, msg, None)


@contextlib.asynccontextmanager
async def started(tmp_path: Path) -> AsyncIterator[Harness]:
    clock = FakeClock()
    store = Store(str(tmp_path / "s.db"))
    cfg = AggregatorConfig(
        auth="off",
        transport="inproc",
        run_name=f"t-{uuid.uuid4().hex}",
        db=str(tmp_path / "s.db"),
        rounds=5,
        min_agents=1,
        threshold=1.0,
        round_timeout=30.0,
        finish_grace=0.1,
        heartbeat_interval=30,
    )
    agg = Aggregator(cfg, store=store, clock=clock)
    await agg.start()
    try:
        yield Harness(agg, store, clock)
    finally:
        await agg.stop()
        store.close()


def owner_test(fn: Callable[[Harness], Coroutine[Any, Any, None]]) -> Callable[[Path], None]:
    """A test of the owner: ``fn(harness)`` on a fresh aggregator, bounded in time."""

    def test(tmp_path: Path) -> None:
        async def main() -> None:
            async with started(tmp_path) as h:
                await fn(h)

        asyncio.run(asyncio.wait_for(main(), 60))

    test.__name__ = fn.__name__
    test.__doc__ = fn.__doc__
    return test


def run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 60))


@owner_test
async def test_federation_starts_and_a_round_completes_in_arrival_order(harness: Harness) -> None:
    h, agg = harness, harness.agg
    a, b = await h.join("a"), await h.join("b")
    await h.start_federation(a)
    assert agg.state.version == 0 and agg.statistics().active_agents == 2
    ups = [h.upload(a, 2), h.upload(b, 4)]
    for up in ups:
        await h.post(up)
    acks = [await up.reply for up in ups]
    # persisted before acknowledged: each acknowledged upload is in the store
    stored = {m["upload_id"] for m in h.store.models(agg.run_id, "local")}
    assert {up.msg.upload_id for up in ups} <= stored
    assert [type(x) for x in acks] == [UploadAck, UploadAck]
    assert [x.status for x in acks if isinstance(x, UploadAck)] == ["accepted", "accepted"]
    await agg.wait_for_version(1)
    np.testing.assert_array_equal(agg.global_weights["w"], 3.0)  # type: ignore[index]
    assert [r["num_updates"] for r in h.store.rounds(agg.run_id)] == [2]
    stats = agg.statistics()
    assert (stats.version, stats.round, stats.contributors, stats.rounds_completed) == (1, 2, 0, 1)


@owner_test
async def test_group_commit_batch_ends_where_the_round_is_ready(harness: Harness) -> None:
    """Uploads queued behind a stored batch: the next batch stops at the one that completes
    the round; an agent's second upload in it is a duplicate; the rest count next round."""
    h, agg = harness, harness.agg
    agg.state.threshold = 0.5  # 4 agents: 2 complete a round
    s = [await h.join(f"a{i}") for i in range(4)]
    await h.start_federation(s[0])
    batches: list[int] = []
    real = h.store.add_uploads

    def add_uploads(run_id: str, uploads: Any) -> Any:
        batches.append(len(uploads))
        return real(run_id, uploads)

    h.store.add_uploads = add_uploads  # type: ignore[method-assign]
    ups = [h.upload(s[0], 1), h.upload(s[0], 9), h.upload(s[1], 3), h.upload(s[2], 5)]
    for up in ups:  # all queued before the owner runs: one batch
        agg._events.put_nowait(up)
    replies = [await up.reply for up in ups]
    statuses = [r.status for r in replies if isinstance(r, UploadAck)]
    assert statuses == [
        UploadStatus.CURRENT,
        UploadStatus.DUPLICATE,
        UploadStatus.CURRENT,
        UploadStatus.NEXT,
    ]
    assert batches == [3, 1]  # the batch ended at the upload that made round 1 ready
    np.testing.assert_array_equal(agg.global_weights["w"], 2.0)  # type: ignore[index]
    assert agg.state.version == 1 and list(agg.state.contributors) == [s[2].agent_id]


@owner_test
async def test_deadline_uses_the_injected_clock(harness: Harness) -> None:
    h, agg = harness, harness.agg
    a, _ = await h.join("a"), await h.join("hung")
    await h.start_federation(a)
    up = h.upload(a, 7)
    await h.post(up)
    await up.reply
    await h.post(DeadlineFired())
    await asyncio.sleep(0.05)
    assert agg.state.version == 0  # 1 of 2, the deadline (30 s of fake time) not reached
    h.clock.advance(29.0)
    await h.post(DeadlineFired())
    await asyncio.sleep(0.05)
    assert agg.state.version == 0
    h.clock.advance(1.0)
    await h.post(DeadlineFired())
    await asyncio.wait_for(agg.wait_for_version(1), 5)
    np.testing.assert_array_equal(agg.global_weights["w"], 7.0)  # type: ignore[index]


@owner_test
async def test_an_agent_leaving_lowers_what_the_round_needs(harness: Harness) -> None:
    h, agg = harness, harness.agg
    a, b = await h.join("a"), await h.join("b")
    await h.start_federation(a)
    up = h.upload(a, 5)
    await h.post(up)
    await up.reply
    assert agg.statistics().needed == 2
    await h.post(AgentLeft(b))
    await asyncio.wait_for(agg.wait_for_version(1), 5)
    assert agg.statistics().active_agents == 1


@owner_test
async def test_long_poll_answered_by_the_new_version_or_by_its_expiry(harness: Harness) -> None:
    h, agg = harness, harness.agg
    a, b = await h.join("a"), await h.join("b")
    await h.start_federation(a)
    conn_b = b.conn
    assert isinstance(conn_b, FakeConn)
    conn_b.sent.clear()
    await h.post(PollReceived(b, Poll(known_version=0, wait=60.0)))
    await h.post(PollReceived(a, Poll(known_version=0, wait=10.0)))
    await asyncio.sleep(0.02)
    assert conn_b.sent == []  # waiting
    h.clock.advance(11.0)  # a's poll expires, b's does not
    await h.post(DeadlineFired())
    conn_a = a.conn
    assert isinstance(conn_a, FakeConn)
    await until(lambda: any(isinstance(m, NotReady) for m in conn_a.sent))
    assert conn_b.sent == []
    ups = [h.upload(a, 1), h.upload(b, 3)]
    for up in ups:
        await h.post(up)
    await agg.wait_for_version(1)
    await until(lambda: any(isinstance(m, GlobalModel) for m in conn_b.sent))
    gm = next(m for m in conn_b.sent if isinstance(m, GlobalModel))
    assert gm.version == 1
    np.testing.assert_array_equal(gm.model["w"], 2.0)


@owner_test
async def test_a_reconnect_replaces_the_old_session(harness: Harness) -> None:
    h, agg = harness, harness.agg
    first = await h.join("a")
    again = Session(first.agent_id, "a", FakeConn(), "x")  # type: ignore[arg-type]
    joined = asyncio.get_running_loop().create_future()
    await h.post(AgentJoined(again, joined))
    await joined
    assert isinstance(first.conn, FakeConn) and first.conn.aborted
    assert agg.sessions[first.agent_id] is again
    await h.post(AgentLeft(first))  # the old connection's goodbye does not remove the new
    await asyncio.sleep(0.02)
    assert agg.sessions[first.agent_id] is again


@owner_test
async def test_welcome_carries_the_model_only_when_the_agent_lacks_it(harness: Harness) -> None:
    h = harness
    a = await h.join("a")
    await h.start_federation(a)
    late = Session(a.agent_id, "a", FakeConn(), "x", known_version=0)  # type: ignore[arg-type]
    await h.agg.delivery.welcome(late)
    fresh = Session(a.agent_id, "a", FakeConn(), "x")  # type: ignore[arg-type]
    await h.agg.delivery.welcome(fresh)
    (w1,), (w2,) = sent(late), sent(fresh)
    assert isinstance(w1, Welcome) and w1.model is None
    assert isinstance(w2, Welcome) and w2.model is not None and w2.version == 0


@owner_test
async def test_store_failure_fails_the_batch_and_nothing_counts(harness: Harness) -> None:
    from fedstack.errors import StoreError

    h, agg = harness, harness.agg
    a, _ = await h.join("a"), await h.join("b")
    await h.start_federation(a)

    def broken(run_id: str, uploads: Any) -> Any:
        raise StoreError("database unavailable (injected)")

    h.store.add_uploads = broken  # type: ignore[method-assign]
    up = h.upload(a, 1)
    await h.post(up)
    with pytest.raises(StoreError):
        await up.reply
    assert agg.state.contributors == {}
    del h.store.add_uploads  # the store is back: the re-sent upload counts
    again = h.upload(a, 1, uid=up.msg.upload_id)
    await h.post(again)
    reply = await again.reply
    assert isinstance(reply, UploadAck) and reply.status == "accepted"
    assert list(agg.state.contributors) == [a.agent_id]


@owner_test
async def test_statistics_is_an_immutable_snapshot(harness: Harness) -> None:
    h = harness
    a = await h.join("a")
    stats = h.agg.statistics(agents=True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.version = 7  # type: ignore[misc]
    assert [x.name for x in stats.agents] == ["a"] and stats.agents[0].agent_id == a.agent_id
    await h.post(AgentLeft(a))
    await until(lambda: h.agg.statistics().active_agents == 0)
    assert stats.active_agents == 1  # the snapshot did not change


async def _test_stop_cancels_and_awaits_every_task(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "s.db"))
    cfg = AggregatorConfig(
        auth="off",
        transport="inproc",
        run_name=f"t-{uuid.uuid4().hex}",
        db=str(tmp_path / "s.db"),
        rounds=2,
        min_agents=1,
        heartbeat_interval=0.01,
    )
    agg = Aggregator(cfg, store=store)
    await agg.start()
    h = Harness(agg, store, FakeClock())
    a = await h.join("a")
    assert len(agg._scope) >= 4  # owner, committer, credential watcher, audit flusher
    waiter = asyncio.ensure_future(agg.wait_for_version(5))
    await agg.stop()
    assert len(agg._scope) == 0 and agg._scope.closed and not agg.connections.tasks
    assert agg._driver is not None and agg._driver.done()
    with pytest.raises(ConnectionClosed):
        await asyncio.wait_for(waiter, 5)
    assert any(isinstance(m, Bye) for m in sent(a))  # told why, before its connection closed
    store.close()


async def _test_a_failing_owner_stops_the_aggregator_loudly(
    tmp_path: Path, monkeypatch: Any
) -> None:
    store = Store(str(tmp_path / "s.db"))
    cfg = AggregatorConfig(
        auth="off", transport="inproc", run_name=f"t-{uuid.uuid4().hex}", db=str(tmp_path / "s.db")
    )
    agg = Aggregator(cfg, store=store)
    await agg.start()

    def boom(ev: Any) -> None:
        raise RuntimeError("owner bug (injected)")

    monkeypatch.setattr(agg.owner, "_apply", boom)
    await agg._post(DeadlineFired())
    with pytest.raises(AggregatorFailed) as err:
        await asyncio.wait_for(agg.wait_finished(), 5)
    assert isinstance(err.value.__cause__, RuntimeError)
    await asyncio.wait_for(agg.stop(), 5)
    assert agg._driver is not None and agg._driver.done() and len(agg._scope) == 0
    store.close()


async def _test_the_credential_watcher_is_restarted_after_a_failure(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "s.db"))
    calls: list[str] = []

    def flaky(agent_ids: Any) -> Any:
        calls.append(threading.current_thread().name)
        if len(calls) == 1:
            raise RuntimeError("driver error (injected), not a StoreError")
        return {i: (None, True) for i in agent_ids}  # every credential revoked

    store.credential_status = flaky  # type: ignore[method-assign]
    cfg = AggregatorConfig(
        auth="off",
        transport="inproc",
        run_name=f"t-{uuid.uuid4().hex}",
        db=str(tmp_path / "s.db"),
        heartbeat_interval=0.02,
    )
    agg = Aggregator(cfg, store=store)
    await agg.start()
    try:
        h = Harness(agg, store, FakeClock())
        a = await h.join("a")
        await h.start_federation(a)  # welcomed: its credential is watched
        await until(lambda: not agg.sessions, timeout=10)  # restarted, then disconnected
        assert len(calls) >= 2
        await until(lambda: any(isinstance(m, Error) and m.code == "revoked" for m in sent(a)))
    finally:
        await agg.stop()
        store.close()


def test_stop_cancels_and_awaits_every_task(tmp_path: Path) -> None:
    run(_test_stop_cancels_and_awaits_every_task(tmp_path))


def test_a_failing_owner_stops_the_aggregator_loudly(tmp_path: Path, monkeypatch: Any) -> None:
    run(_test_a_failing_owner_stops_the_aggregator_loudly(tmp_path, monkeypatch))


def test_the_credential_watcher_is_restarted_after_a_failure(tmp_path: Path) -> None:
    run(_test_the_credential_watcher_is_restarted_after_a_failure(tmp_path))
