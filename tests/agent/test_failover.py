"""Agents that span several aggregators: failover, learned URLs, move_to (issue 12).

Real aggregators on 127.0.0.1 (subprocesses that are SIGKILLed, or in-process threads)
sharing one SQLite store and run name, real sockets, and the deterministic agents of the
fault suite (``tests/faults/faultlib.py``: the final model of a run depends only on the
seeds and the number of rounds, so a run with a failover must end bit-identical to
:func:`faultlib.simulate`). :class:`Proxy` is a TCP proxy that can lose what an aggregator
sends on the connections open now (the upload is stored, its acknowledgement lost) or go
silent like a hung host.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "faults"))

import faultlib  # noqa: E402

from fedstack import Agent, FederationFinished, Store  # noqa: E402
from fedstack.agent.urls import MAX_LEARNED, check_urls  # noqa: E402
from fedstack.errors import ConfigError  # noqa: E402
from fedstack.testing import AggregatorProcess, aggregator_thread, free_port  # noqa: E402
from fedstack.transport import WSConnection  # noqa: E402
from fedstack.transport.ws import serve  # noqa: E402
from fedstack.wire import ModelUpload, UploadAck, Welcome  # noqa: E402
from fedstack.wire.session import (  # noqa: E402
    AggregatorSession,
    HeartbeatReceived,
    UploadReceived,
    Welcomed,
)

T = TypeVar("T")
HEARTBEAT = 1.0  # the aggregators' heartbeat interval: the agents' read lease is 3 of them


# ---------------------------------------------------------------------- a TCP proxy
class Proxy:
    """Forwards 127.0.0.1:``port`` to the aggregator at ``upstream`` (asyncio, a thread).

    :meth:`mute` drops what the aggregator sends on the connections open now (later ones
    are forwarded); :meth:`blackhole` makes every connection, open or new, silent and
    never closed (a hung host). When the aggregator closes a connection (or dies), the
    agent's side is closed too, unless blackholed."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.port = 0
        self.black = False
        self._muted: set[int] = set()
        self._open: set[int] = set()
        self._ids = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="proxy")

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def __enter__(self) -> Proxy:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def mute(self) -> None:
        self._muted |= self._open

    def blackhole(self) -> None:
        self.black = True

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()
        server.close()
        for task in asyncio.all_tasks(self._loop):
            task.cancel()
        with contextlib.suppress(BaseException):
            self._loop.run_until_complete(asyncio.sleep(0))

    async def _handle(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        if self.black:
            await asyncio.Event().wait()  # accepted, never answered
        try:
            ur, uw = await asyncio.open_connection("127.0.0.1", self.upstream)
        except OSError:
            cw.close()
            return
        self._ids += 1
        cid = self._ids
        self._open.add(cid)

        async def pump(r: asyncio.StreamReader, w: asyncio.StreamWriter, down: bool) -> None:
            with contextlib.suppress(OSError):
                while data := await r.read(65536):
                    if self.black or (down and cid in self._muted):
                        continue
                    w.write(data)
                    await w.drain()
            while self.black:  # a hung host never closes anything
                await asyncio.sleep(3600)
            w.close()

        try:
            await asyncio.gather(pump(cr, uw, False), pump(ur, cw, True))
        finally:
            self._open.discard(cid)


# ---------------------------------------------------------------------- agents
@dataclass
class LoopAgent:
    """A deterministic thread agent (faultlib's training) given several URLs."""

    agent: Agent
    seed: int
    before_send: Callable[[LoopAgent, int], None] | None = None
    after_send: Callable[[LoopAgent, int], None] | None = None
    report: dict[str, Any] = field(default_factory=dict)
    error: list[BaseException] = field(default_factory=list)
    thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, daemon=True, name=self.agent.name)
        self.thread.start()

    def _run(self) -> None:
        a, rep = self.agent, self.report
        rep["versions"], rep["received"] = [], []
        try:
            a.send_initial_model(faultlib.initial_model())
            a.start(timeout=30)
            while True:
                try:
                    gm = a.wait_for_global_model(timeout=40)
                except FederationFinished:
                    break
                rep["versions"].append(a.version)
                rep["received"].append((a.version, time.monotonic(), a.url))
                rep["final"] = {k: v.tolist() for k, v in gm.items()}
                if self.before_send is not None:
                    self.before_send(self, a.version)
                a.send_trained_model(faultlib.train(gm, self.seed), faultlib.samples(self.seed), {})
                if self.after_send is not None:
                    self.after_send(self, a.version)
        except BaseException as exc:
            self.error.append(exc)
        finally:
            rep["acked"] = [[x.upload_id, x.status] for x in list(a.acknowledged)]
            a.close(timeout=5)

    def join(self, timeout: float) -> None:
        assert self.thread is not None
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"{self.agent.name} still running"
        assert not self.error, f"{self.agent.name} failed: {self.error!r}"


def loop_agent(urls: list[str], seed: int, **kw: Any) -> LoopAgent:
    agent = Agent(urls, name=f"agent-{seed}", max_backoff=0.3, connect_timeout=2.0)
    return LoopAgent(agent, seed, **kw)


def stored_upload_ids(db: Path) -> dict[str, str]:
    """upload_id -> status of every local model stored so far."""
    if not db.exists():
        return {}
    store = Store(str(db))
    try:
        run = store.latest_run_id()
        if run is None:
            return {}
        return {m["upload_id"]: m["status"] for m in store.models(run, "local") if m["upload_id"]}
    finally:
        store.close()


def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
    assert faultlib.wait_for(cond, timeout, 0.01), f"not reached in {timeout} s: {what}"


@contextlib.contextmanager
def processes(*procs: AggregatorProcess) -> Iterator[None]:
    try:
        yield
    finally:
        for p in procs:
            p.close()


# ---------------------------------------------------------------------- (a) failover
@pytest.mark.parametrize("fault", ["killed", "hung"])
def test_agents_fail_over_to_the_next_aggregator_and_the_run_completes(
    tmp_path: Path, fault: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A and B share the store and the run name; B is started (it resumes the run) once A
    is gone. ``killed``: A is SIGKILLed, its connections close. ``hung``: A's host goes
    silent (connections stay open): the agents notice by their read lease (3 heartbeat
    intervals) and try B first. Agent 0's upload of round K reaches A and is stored but
    its acknowledgement is lost: re-sent to B with the same upload_id, "already
    received", counted once. The final model is the fault-free one."""
    caplog.set_level(logging.INFO, logger="fedstack.agent")
    rounds, k = 5, 2
    db = tmp_path / "fed.db"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    args = faultlib.aggregator_args(db, rounds)
    a = AggregatorProcess(tmp_path / "a", *args)
    b = AggregatorProcess(tmp_path / "b", *args)
    with processes(a, b):
        a.start()
        with Proxy(a.port) as proxy:
            lost: list[str] = []

            def lose_ack(agent: LoopAgent, version: int) -> None:
                if version == k and not lost:
                    proxy.mute()  # A will store this upload; its ack never arrives
                    lost.append("pending")

            # every agent reaches A through the proxy, and knows B
            agents = [
                loop_agent([proxy.url, b.url], 0, before_send=lose_ack),
                loop_agent([proxy.url, b.url], 1),
                loop_agent([proxy.url, b.url], 2),
            ]
            for ag in agents:
                ag.start()
            wait_for(lambda: lost != [] and agents[0].agent._pending is not None, 30, "round k")
            pending = agents[0].agent._pending
            assert pending is not None
            upload_id = pending.upload_id
            wait_for(lambda: upload_id in stored_upload_ids(db), 10, "upload stored by A")
            welcomes = {ag.agent.name: ag.agent._core.welcomes for ag in agents}
            if fault == "hung":
                proxy.blackhole()
            t_fault = time.monotonic()
            a.kill()  # SIGKILL
            b.start()
            t_ready = time.monotonic()
            on_b = lambda: all(  # noqa: E731
                ag.agent.url == b.url and ag.agent._core.welcomes > welcomes[ag.agent.name]
                for ag in agents
            )
            wait_for(on_b, 3 * HEARTBEAT + 5, "every agent welcomed by B")
            t_on_b = time.monotonic()
            for ag in agents:
                ag.join(60)
            assert b.wait(30) == 0
    # within a few heartbeat intervals of the fault (hung: the lease, 3 intervals)
    if fault == "killed":
        assert t_on_b - t_ready < 2 * HEARTBEAT + 1, t_on_b - t_ready
    else:
        assert t_on_b - t_fault < 3 * HEARTBEAT + max(2.0, t_ready - t_fault) + 1
    # re-sent to B, which found it stored ("already received"; the ack may come after a
    # newer upload replaced it as the pending one, so it is seen in the log)
    resent = [
        r.getMessage()
        for r in caplog.records
        if r.getMessage().startswith("agent-0: upload ") and "already received" in r.getMessage()
    ]
    assert resent, caplog.text
    assert stored_upload_ids(db)[upload_id] == "aggregated"
    summary = faultlib.check_run(
        db, rounds, [ag.report for ag in agents], faultlib.simulate(rounds)
    )
    assert summary["acked"] >= rounds * 3 - 3
    for ag in agents:
        assert ag.agent.aggregators == [proxy.url, b.url]  # (standalone: nothing learned)
        assert ag.report["versions"][-1] == rounds
    text = caplog.text
    assert f"failing over from {proxy.url!r} to {b.url!r}" in text
    assert "Traceback" not in a.log_text() + b.log_text()


# ---------------------------------------------------------------------- (b) unreachable
def _one_round(tmp_path: Path) -> Any:
    return faultlib.aggregator_config(tmp_path / "f.db", 1, min_agents=1, finish_grace=2.0)


def _train_once(agent: Agent) -> None:
    gm = agent.wait_for_global_model(10)
    agent.send_trained_model(faultlib.train(gm, 0), 10)
    agent.wait_for_global_model(10)  # the final model
    with pytest.raises(FederationFinished):
        agent.wait_for_global_model(5)


def test_an_unreachable_first_url_the_agent_reaches_the_second(tmp_path: Path) -> None:
    closed = f"ws://127.0.0.1:{free_port()}"  # nothing listens there
    with aggregator_thread(_one_round(tmp_path)) as agg:
        url = f"ws://127.0.0.1:{agg.port}"
        agent = Agent([closed, url], name="a", max_backoff=0.3, connect_timeout=2.0)
        agent.send_initial_model(faultlib.initial_model())
        t0 = time.monotonic()
        agent.start(timeout=10)
        assert time.monotonic() - t0 < 2.0
        try:
            assert agent.url == url and agent.aggregators == [closed, url]
            assert agent.reconnects == 1
            _train_once(agent)
        finally:
            agent.close()


def test_a_silent_first_url_costs_one_connect_timeout(tmp_path: Path) -> None:
    """A host that accepts TCP but never answers (a hung aggregator): the agent gives up
    on it after connect_timeout and goes to the next URL without a backoff first."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # the kernel accepts; nobody ever reads
    try:
        hung = f"ws://127.0.0.1:{silent.getsockname()[1]}"
        with aggregator_thread(_one_round(tmp_path)) as agg:
            url = f"ws://127.0.0.1:{agg.port}"
            agent = Agent([hung, url], name="a", max_backoff=5.0, connect_timeout=1.0)
            agent.send_initial_model(faultlib.initial_model())
            t0 = time.monotonic()
            agent.start(timeout=10)
            elapsed = time.monotonic() - t0
            try:
                assert 0.9 <= elapsed < 1.0 + 2.5, elapsed  # + the TLS diagnosis (<= 1 s)
                assert agent.url == url
                _train_once(agent)
            finally:
                agent.close()
    finally:
        silent.close()


# ---------------------------------------------------------------------- (c) learned URLs
def _welcome(**kw: Any) -> Welcome:
    fields: dict[str, Any] = dict(
        agent_id="a" * 32,
        aggregator_id="agg-a",
        run_id="r1",
        version=0,
        round=1,
        model_id="m0",
        model={"w": np.zeros(3, np.float32)},
        delivery="push",
        heartbeat_interval=1.0,
    )
    fields.update(kw)
    return Welcome(**fields)


def _feed_welcome(agent: Agent, w: Welcome) -> None:
    """Give the agent's core ``w`` as the answer to its participate (no connection)."""
    core = agent._core
    s = core.session
    s.reconnect()
    s.send(
        s.participate(
            agent.name,
            token=None,
            enrollment=None,
            model=None,
            init_weights=True,
            num_samples=1,
            metrics={},
            client="test",
        )
    )
    event = s.receive(w)
    assert isinstance(event, Welcomed)
    core.on_welcome(event.message, event.new_model)


def test_learned_urls_come_from_each_welcome_and_the_given_ones_stay() -> None:
    a, b, c, d = (f"ws://10.0.0.{i}:8765" for i in range(1, 5))
    agent = Agent([a, b], name="x")
    assert agent.aggregators == [a, b] and agent.url == a
    _feed_welcome(agent, _welcome(aggregators=[b, c, d]))
    assert agent.aggregators == [a, b, c, d]  # b is given: not twice
    # a later welcome's list replaces the learned ones (d is no longer live)
    _feed_welcome(agent, _welcome(aggregators=[c]))
    assert agent.aggregators == [a, b, c]
    _feed_welcome(agent, _welcome(aggregators=[]))
    assert agent.aggregators == [a, b]
    # the same host and port under another spelling is the same aggregator
    _feed_welcome(agent, _welcome(aggregators=["ws://10.0.0.2:8765", "ws://10.0.0.1:8765/"]))
    assert agent.aggregators == [a, b]
    # a member listening on every interface that advertises no address: not learned
    _feed_welcome(agent, _welcome(aggregators=["ws://0.0.0.0:8765", "ws://[::]:1", c]))
    assert agent.aggregators == [a, b, c]
    # at most MAX_LEARNED are kept; an entry that is not a usable URL is skipped
    many = [f"ws://10.1.{i // 250}.{i % 250}:1" for i in range(MAX_LEARNED + 10)]
    _feed_welcome(agent, _welcome(aggregators=["ws://nohost:0", *many[: MAX_LEARNED + 10]]))
    assert agent.aggregators == [a, b, *many[:MAX_LEARNED]]


def test_a_learned_url_through_which_the_agent_came_stays_known() -> None:
    a, b, c = (f"ws://10.0.0.{i}:8765" for i in range(1, 4))
    agent = Agent(a, name="x")
    _feed_welcome(agent, _welcome(aggregators=[b, c]))
    agent._core.url = b  # as after a failover to b, whose welcome lists the others
    _feed_welcome(agent, _welcome(aggregator_id="agg-b", aggregators=[a, c]))
    assert agent.aggregators == [a, b, c]
    assert agent._core.known.home == b  # the next failover cycle starts there
    assert agent._core.known.cycle() == [b, a, c]
    assert agent._core.known.cycle(demote=b) == [a, c, b]


def test_an_agent_given_wss_urls_learns_no_clear_text_url(tmp_path: Path) -> None:
    from fedstack.security.tls import make_test_pki

    pki = make_test_pki(tmp_path / "pki")
    a, b = "wss://10.0.0.1:8765", "wss://10.0.0.2:8765"
    agent = Agent(a, name="x", ca=pki.ca)
    _feed_welcome(agent, _welcome(aggregators=["ws://10.0.0.9:8765", b]))
    assert agent.aggregators == [a, b]


def test_a_welcome_listing_a_non_url_is_refused_by_the_session() -> None:
    from fedstack.errors import RemoteProtocolError

    agent = Agent("ws://10.0.0.1:8765", name="x")
    with pytest.raises(RemoteProtocolError):
        _feed_welcome(agent, _welcome(aggregators=["http://10.0.0.2/"]))
    assert agent.aggregators == ["ws://10.0.0.1:8765"]


class FakeMember:
    """A federation member speaking the protocol (an AggregatorSession): welcomes with
    ``aggregators``, records every upload, acknowledges uploads only if ``ack``;
    ``close_all()`` drops its connections and stops listening (it died)."""

    def __init__(self, aggregator_id: str, *, ack: bool, version: int = 0) -> None:
        self.aggregator_id, self.ack, self.version = aggregator_id, ack, version
        self.aggregators: list[str] = []
        self.uploads: list[ModelUpload] = []
        self.conns: list[WSConnection] = []
        self.server: Any = None
        self.url = ""

    async def start(self) -> None:
        self.server = await serve(self.handle, "127.0.0.1", 0, max_message_bytes=1 << 20)
        self.url = f"ws://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    def close_all(self) -> None:
        self.server.close()
        for c in self.conns:
            c.abort()

    async def handle(self, conn: WSConnection) -> None:
        self.conns.append(conn)
        s = AggregatorSession()
        s.receive_bytes(await conn.recv())
        conn.write(
            s.send(
                _welcome(
                    aggregator_id=self.aggregator_id,
                    version=self.version,
                    aggregators=self.aggregators,
                    model={"w": np.full(3, self.version, np.float32)},
                )
            )
        )
        with contextlib.suppress(Exception):
            while True:
                event = s.receive_bytes(await asyncio.wait_for(conn.recv(), 10.0))
                if isinstance(event, UploadReceived):
                    up = event.message
                    self.uploads.append(up)
                    if self.ack:
                        ack = UploadAck(upload_id=up.upload_id, status="accepted", round=1)
                        conn.write(s.send(ack))
                elif isinstance(event, HeartbeatReceived) and event.reply is not None:
                    conn.write(s.send(event.reply))
        conn.abort()


def test_an_agent_fails_over_to_a_learned_member_and_its_upload_follows() -> None:
    """Given only A, the agent learns B from A's welcome; A stores nothing it
    acknowledges and dies: the agent goes to B (same run, another aggregator), re-sends
    the same upload there and continues with B's global model."""

    async def body() -> None:
        a, b = FakeMember("agg-a", ack=False), FakeMember("agg-b", ack=True, version=1)
        await a.start()
        await b.start()
        a.aggregators = [b.url]
        agent = Agent(a.url, name="x", max_backoff=0.2, connect_timeout=2.0)
        agent.send_initial_model({"w": np.zeros(3, np.float32)})
        await agent.start_async(timeout=5)
        try:
            assert agent.aggregators == [a.url, b.url]
            await agent.wait_for_global_model_async(5)
            assert agent.send_trained_model({"w": np.ones(3, np.float32)}, 5)
            for _ in range(200):
                if a.uploads:
                    break
                await asyncio.sleep(0.01)
            a.close_all()
            gm = await agent.wait_for_global_model_async(5)  # B's v1, from its welcome
            np.testing.assert_array_equal(gm["w"], 1)
            assert agent.url == b.url and agent.aggregator_id == "agg-b"
            await agent.flush_async(5)
            assert [u.upload_id for u in b.uploads] == [a.uploads[0].upload_id]
            assert agent.run_id == "r1" and agent.version == 1
        finally:
            await agent.close_async()
            b.close_all()

    asyncio.run(body())


# ---------------------------------------------------------------------- (d) move_to
class Driver:
    """Runs an agent through its sync API, or its async API on a loop in a thread."""

    def __init__(self, agent: Agent, mode: str) -> None:
        self.agent, self.mode = agent, mode
        self.loop: asyncio.AbstractEventLoop | None = None
        if mode == "async":
            self.loop = asyncio.new_event_loop()
            threading.Thread(target=self.loop.run_forever, daemon=True).start()

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(60)

    def start(self) -> None:
        if self.loop is None:
            self.agent.start(timeout=20)
        else:
            self._run(self.agent.start_async(timeout=20))

    def wait(self) -> dict[str, np.ndarray]:
        if self.loop is None:
            return self.agent.wait_for_global_model(20)
        return self._run(self.agent.wait_for_global_model_async(20))

    def send(self, gm: dict[str, np.ndarray], seed: int) -> bool:
        w, n = faultlib.train(gm, seed), faultlib.samples(seed)
        if self.loop is None:
            return self.agent.send_trained_model(w, n)

        async def send() -> bool:
            return self.agent.send_trained_model(w, n)

        return self._run(send())

    def move_to(self, url: str) -> None:
        if self.loop is None:
            self.agent.move_to(url, timeout=20)
        else:
            self._run(self.agent.move_to_async(url, timeout=20))

    def close(self) -> None:
        if self.loop is None:
            self.agent.close()
        else:
            self._run(self.agent.close_async())
            self.loop.call_soon_threadsafe(self.loop.stop)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_move_to_leaves_with_bye_and_the_pending_upload_follows(tmp_path: Path, mode: str) -> None:
    """X trains on A (its upload stored by A, the ack lost), then moves to B, which
    shares A's store and run: bye to A, welcome from B, the same upload re-sent
    ("already received", counted once); Y joins B; the run completes on B with the
    fault-free result."""
    rounds = 3
    db = tmp_path / "f.db"
    cfg = faultlib.aggregator_config(db, rounds, min_agents=2, finish_grace=2.0)
    with aggregator_thread(cfg) as agg_a, Proxy(agg_a.port) as proxy:
        x = Agent(proxy.url, name="agent-0", max_backoff=0.3, connect_timeout=2.0)
        drv = Driver(x, mode)
        x.send_initial_model(faultlib.initial_model())
        drv.start()
        gm = drv.wait()
        proxy.mute()  # A stores the upload; its acknowledgement is lost
        assert drv.send(gm, 0)
        pending = x._pending
        assert pending is not None
        wait_for(lambda: pending.upload_id in stored_upload_ids(db), 10, "stored by A")
        with aggregator_thread(cfg) as agg_b:  # resumes the run, the upload buffered
            b_url = f"ws://127.0.0.1:{agg_b.port}"
            assert agg_b.run_id == agg_a.run_id
            assert len(agg_a.sessions) == 1
            drv.move_to(b_url)
            assert x.url == b_url and x.aggregator_id == agg_b.aggregator_id
            assert x.aggregators == [proxy.url, b_url]
            wait_for(lambda: len(agg_a.sessions) == 0, 5, "X left A")
            y = loop_agent([b_url], 1)
            y.start()
            reports: dict[str, Any] = {"versions": []}
            while True:
                try:
                    gm = drv.wait()
                except FederationFinished:
                    break
                reports["versions"].append(x.version)
                reports["final"] = {k: v.tolist() for k, v in gm.items()}
                drv.send(gm, 0)
            y.join(30)
            faultlib.finish_thread_aggregator(agg_b)
            drv.close()
    acks = [a for a in x.acknowledged if a.upload_id == pending.upload_id]
    assert len(acks) == 1 and acks[0].message == "already received", acks
    reports["acked"] = [[a.upload_id, a.status] for a in x.acknowledged]
    faultlib.check_run(db, rounds, [reports, y.report], faultlib.simulate(rounds, 2), n_agents=2)


def test_move_to_needs_a_started_agent_and_a_url() -> None:
    agent = Agent("ws://127.0.0.1:1", name="x")
    with pytest.raises(RuntimeError):
        agent.move_to("ws://127.0.0.1:2")
    with pytest.raises(RuntimeError):
        asyncio.run(agent.move_to_async("ws://127.0.0.1:2"))


# ---------------------------------------------------------------------- (e) validation
@pytest.mark.parametrize(
    "url",
    [
        "",
        "   ",
        "http://127.0.0.1:8765",
        "127.0.0.1:8765",
        "ws://",
        "ws://:8765",
        "ws://127.0.0.1:99999",
        "ws://127.0.0.1:0",
        "ws://127.0.0.1:notaport",
        "ws://127.0.0.1:87\n65",
        "inproc://",
        "x" * 600,
        [],
        ["ws://127.0.0.1:8765", 3],
        ["ws://127.0.0.1:8765", "ftp://127.0.0.1:21"],
        b"ws://127.0.0.1:8765",
        42,
    ],
    ids=repr,
)
def test_bad_urls_are_refused_with_a_clear_error(url: Any) -> None:
    with pytest.raises(ConfigError) as err:
        Agent(url, name="x")
    assert "\n" not in str(err.value)


def test_good_urls_are_kept_in_order_without_duplicates() -> None:
    urls = ["ws://a:1", " wss://b:2 ", "inproc://sim", "ws://a:1", "ws://c"]
    assert check_urls(urls) == ["ws://a:1", "wss://b:2", "inproc://sim", "ws://c"]
    # one host and port named twice: the later URL wins (a repeated --url overrides)
    assert check_urls(["ws://a:1", "ws://b:2", "wss://A:1"]) == ["wss://A:1", "ws://b:2"]
    agent = Agent(("ws://a:1", "ws://b:2"), name="x")
    assert agent.url == "ws://a:1"
    got = agent.aggregators
    got.append("ws://mutated:1")
    assert agent.aggregators == ["ws://a:1", "ws://b:2"]  # a copy


def test_move_to_refuses_a_bad_url_and_keeps_the_known_ones(tmp_path: Path) -> None:
    with aggregator_thread(_one_round(tmp_path)) as agg:
        url = f"ws://127.0.0.1:{agg.port}"
        agent = Agent(url, name="a")
        agent.send_initial_model(faultlib.initial_model())
        agent.start(timeout=10)
        try:
            with pytest.raises(ConfigError):
                agent.move_to("http://127.0.0.1:1")
            assert agent.aggregators == [url] and agent.url == url
            # moving to a closed port: not welcomed there in time, the agent carries on
            closed = f"ws://127.0.0.1:{free_port()}"
            with pytest.raises(TimeoutError):
                agent.move_to(closed, timeout=1.5)
            assert agent.aggregators == [url, closed]
            wait_for(lambda: agent.url == url and agent._core.welcomes >= 2, 10, "back on A")
            _train_once(agent)
        finally:
            agent.close()


# ---------------------------------------------------------------------- (f) the CLI
def test_the_cli_takes_repeated_urls(tmp_path: Path) -> None:
    from fedstack.cli.main import command
    from fedstack.cli.options import AGENT_OPTIONS

    cmd = command().commands["agent"]
    base = ("--trainer", "m:C", "--name", "n")  # (make_context consumes its list)
    ctx = cmd.make_context("agent", ["--url", "ws://a:1", "--url", "ws://b:2", *base])
    assert ctx.params["url"] == ["ws://a:1", "ws://b:2"]
    names = [p.name for p in AGENT_OPTIONS.parameters]
    opts = AGENT_OPTIONS.build(**{n: ctx.params[n] for n in names})
    assert opts.urls == ("ws://a:1", "ws://b:2") and opts.url == "ws://a:1"
    default = cmd.make_context("agent", list(base))
    opts = AGENT_OPTIONS.build(**{n: default.params[n] for n in names})
    assert opts.urls == ("ws://127.0.0.1:8765",)
    with pytest.raises(ConfigError):
        bad = cmd.make_context("agent", ["--url", "http://a", *base])
        AGENT_OPTIONS.build(**{n: bad.params[n] for n in names})


def test_fedstack_agent_with_two_urls_reaches_the_live_one(tmp_path: Path) -> None:
    """``fedstack agent --url CLOSED --url LIVE``: the agent trains with the live one."""
    closed = f"ws://127.0.0.1:{free_port()}"
    with aggregator_thread(_one_round(tmp_path)) as agg:
        url = f"ws://127.0.0.1:{agg.port}"
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "fedstack",
                "agent",
                "--url",
                closed,
                "--url",
                url,
                "--trainer",
                "fedstack.trainers.digits:DigitsLinearTrainer",
                "--trainer-arg",
                "partition=iid",
                "--name",
                "cli-agent",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        assert '"final": true' in out.stdout, out.stdout
        faultlib.finish_thread_aggregator(agg)
    store = Store(str(tmp_path / "f.db"))
    try:
        run = store.list_runs()[-1]["id"]
        assert [r["round"] for r in store.rounds(run)] == [1]
    finally:
        store.close()
    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedstack",
            "agent",
            "--url",
            "ftp://x",
            "--trainer",
            "m:C",
            "--name",
            "n",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert cli.returncode == 2 and "not an aggregator URL" in cli.stderr, cli.stderr


# ---------------------------------------------------------------------- (g) a federation
FED_HEARTBEAT = 0.2  # the members' heartbeat in the store
FED_LIVENESS = 1.5  # a member silent this long (database clock) is dead


def _member_args(db: Path, name: str, rounds: int) -> list[str]:
    cfg = db.with_name(db.name + ".config.json")
    cfg.write_text(json.dumps(faultlib.auth_off_config()))
    return [
        "--config",
        str(cfg),
        "--db",
        str(db),
        "--run-name",
        "fed",
        "--name",
        name,
        "--rounds",
        str(rounds),
        "--min-agents",
        "1",
        "--threshold",
        "1.0",
        "--heartbeat-interval",
        str(HEARTBEAT),
        "--finish-grace",
        "3",
        "--federation-heartbeat",
        str(FED_HEARTBEAT),
        "--liveness-timeout",
        str(FED_LIVENESS),
        "--synthesis-timeout",
        "10",
        "--strategy-param",
        "precision=float64",
    ]


def _members(db: Path, with_version: bool = False) -> dict[str, tuple[bool, int]]:
    """name -> (live, active agents), or (live, version), of the latest run's members, as
    their heartbeats left them in the store."""
    store = Store(str(db))
    try:
        run = store.latest_run_id()
        if run is None:
            return {}
        return {
            m.name: (m.live, m.version if with_version else m.active_agents)
            for m in store.members(run, liveness=FED_LIVENESS)
        }
    finally:
        store.close()


@pytest.mark.skipif(
    not faultlib.aggregator_supports("--name"), reason="no federation (aggregator --name)"
)
def test_a_federation_member_killed_its_agents_fail_over_to_the_other(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Members a and b of one federation (one SQLite store, run "fed"), two agents each.
    a's agents are given only a's URL and learn b's from the welcome. In round K+1 only
    agent 0 (on a) uploads at first: a stores it (buffered, acknowledged) and is
    SIGKILLed. a's agents fail over to b within a few heartbeat intervals; the others
    then upload; b claims agent 0's upload (held by a, once a is dead) and makes round
    K+1 from all four. The run completes with every round's global model made once,
    every acknowledged upload stored, and the result of a fault-free run (to float32
    rounding: semi-global models are cast once more)."""
    caplog.set_level(logging.INFO, logger="fedstack.agent")
    rounds, k = 5, 2
    db = tmp_path / "fed.db"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = AggregatorProcess(tmp_path / "a", *_member_args(db, "a", rounds))
    b = AggregatorProcess(tmp_path / "b", *_member_args(db, "b", rounds))
    everyone_in, others_may_go = threading.Event(), threading.Event()
    held: list[str] = []  # agent 0's upload of round k+1, held by a when it dies

    def gate(ag: LoopAgent, version: int) -> None:
        if version == 0:  # every round of the reference has all four agents
            assert everyone_in.wait(30)
        # lockstep: train once every live member's row shows this version (a member's
        # row is updated at its heartbeats; sync synthesis waits only for live members
        # whose row shows the previous version)
        wait_for(
            lambda: all(v >= version for live, v in _members(db, True).values() if live),
            20,
            f"live members at version {version}",
        )
        if version == k and ag.seed != 0:
            assert others_may_go.wait(30)

    def after_send(ag: LoopAgent, version: int) -> None:
        if version == k:  # the upload just sent: pending, or already acknowledged
            pending, acked = ag.agent._pending, list(ag.agent.acknowledged)
            held.append(pending.upload_id if pending is not None else acked[-1].upload_id)

    with processes(a, b):
        a.start()
        b.start()
        wait_for(lambda: _members(db) == {"a": (True, 0), "b": (True, 0)}, 10, "members live")
        time.sleep(3 * FED_HEARTBEAT)  # a's next heartbeat lists b among its peers
        agents = [
            loop_agent([a.url], 0, before_send=gate, after_send=after_send),  # learns b
            loop_agent([a.url], 1, before_send=gate),
            loop_agent([b.url, a.url], 2, before_send=gate),
            loop_agent([b.url, a.url], 3, before_send=gate),
        ]
        for ag in agents:
            ag.start()
        wait_for(lambda: _members(db) == {"a": (True, 2), "b": (True, 2)}, 20, "agents in")
        everyone_in.set()
        for ag in agents[:2]:
            assert ag.agent.aggregators == [a.url, b.url]  # b learned from a's welcome
        wait_for(
            lambda: held != [] and stored_upload_ids(db).get(held[0]) == "buffered",
            30,
            "agent 0's upload of round k+1 stored by a",
        )
        welcomes = {ag.agent.name: ag.agent._core.welcomes for ag in agents[:2]}
        t_kill = time.monotonic()
        a.kill()  # SIGKILL
        wait_for(
            lambda: all(
                ag.agent.url == b.url and ag.agent._core.welcomes > welcomes[ag.agent.name]
                for ag in agents[:2]
            ),
            3 * HEARTBEAT + 3,
            "a's agents welcomed by b",
        )
        t_moved = time.monotonic() - t_kill
        others_may_go.set()
        for ag in agents:
            ag.join(60)
        assert b.wait(30) == 0
    assert t_moved < 2 * HEARTBEAT + 1, t_moved
    reports = [ag.report for ag in agents]
    for rep in reports:
        assert rep["versions"] == list(range(rounds + 1)), rep["versions"]
    store = Store(str(db))
    try:
        runs = store.list_runs()
        assert len(runs) == 1 and runs[0]["status"] == "finished", runs
        run_id = runs[0]["id"]
        rows = store.rounds(run_id)
        assert [r["round"] for r in rows] == list(range(1, rounds + 1))  # each global once
        members = [r["metrics"].get("synthesis_members") for r in rows]
        # round k+1: a died holding an acknowledged upload; b delivered a's round for it
        assert members == ["a,b"] * (k + 1) + ["b"] * (rounds - k - 1), members
        local = store.models(run_id, "local")
        stored = {m["upload_id"]: m for m in local if m["upload_id"]}
        for rep in reports:
            for upload_id, _ in rep["acked"]:
                assert upload_id in stored, f"acknowledged upload {upload_id} not stored"
        assert not [m for m in local if m["status"] == "buffered"]
        # held by a, delivered by b as a's semi-global model of round k+1: once
        assert stored[held[0]]["status"] == "aggregated" and stored[held[0]]["round"] == k + 1
        final = store.load_weights(rows[-1]["model_id"])
    finally:
        store.close()
    reference = faultlib.simulate(rounds, 4)
    for name, v in reference.items():
        np.testing.assert_allclose(final[name], v, rtol=0, atol=1e-5)
    assert f"failing over from {a.url!r} to {b.url!r}" in caplog.text


def _lockstep(db: Path, version: int) -> None:
    """Return once every live member's row shows ``version`` (rows are updated at each
    member's heartbeat; sync synthesis waits only for live members whose row shows the
    previous version, so agents that train only then make every round from all)."""
    wait_for(
        lambda: all(v >= version for live, v in _members(db, True).values() if live),
        20,
        f"live members at version {version}",
    )


@pytest.mark.skipif(
    not faultlib.aggregator_supports("--name"), reason="no federation (aggregator --name)"
)
def test_an_agent_moves_between_federation_members_mid_run(tmp_path: Path) -> None:
    """Book row 37: agent 0 trains on member a, moves to member b mid-run (bye to a,
    welcome from b) and continues with the synthesised global model; agent 1 stays on a,
    agent 2 on b. Every round's global model is synthesised from both members and the
    run ends with the fault-free result of three agents."""
    rounds, k = 4, 2
    db = tmp_path / "fed.db"

    def member(name: str) -> Any:
        return faultlib.aggregator_config(
            db,
            rounds,
            min_agents=1,
            finish_grace=1.0,
            run_name="fed",
            name=name,
            federation_heartbeat=FED_HEARTBEAT,
            liveness_timeout=FED_LIVENESS,
            synthesis_timeout=10.0,
        )

    moved = threading.Event()

    def gate(ag: LoopAgent, version: int) -> None:
        _lockstep(db, version)
        if version == k:  # round k+1: agent 0 trains for b, which waits for it
            assert moved.wait(30)

    with aggregator_thread(member("a")) as a, aggregator_thread(member("b")) as b:
        wait_for(lambda: _members(db) == {"a": (True, 0), "b": (True, 0)}, 10, "members live")
        x = Agent(a.url, name="agent-0", max_backoff=0.3, connect_timeout=2.0)
        x.send_initial_model(faultlib.initial_model())
        x.start(timeout=20)
        others = [
            loop_agent([a.url], 1, before_send=gate),
            loop_agent([b.url], 2, before_send=gate),
        ]
        for ag in others:
            ag.start()
        wait_for(lambda: _members(db) == {"a": (True, 2), "b": (True, 1)}, 20, "agents in")
        report: dict[str, Any] = {"versions": []}
        while True:
            try:
                gm = x.wait_for_global_model(30)
            except FederationFinished:
                break
            version = x.version
            report["versions"].append(version)
            report["final"] = {n: v.tolist() for n, v in gm.items()}
            _lockstep(db, version)
            if version == k:
                x.move_to(b.url, timeout=20)
                assert x.url == b.url and x.aggregator_id == b.aggregator_id
                assert x.aggregators == [a.url, b.url]
                wait_for(lambda: len(a.sessions) == 1, 5, "agent 0 left a")
                assert x.run_id == a.run_id and x.version == k
                wait_for(lambda: _members(db)["b"] == (True, 2), 5, "b's heartbeat")
                moved.set()
            x.send_trained_model(faultlib.train(gm, 0), faultlib.samples(0))
        x.close()
        for ag in others:
            ag.join(30)
        report["acked"] = [[u.upload_id, u.status] for u in x.acknowledged]
    assert report["versions"] == list(range(rounds + 1)), report["versions"]
    store = Store(str(db))
    try:
        run_id = store.list_runs()[0]["id"]
        rows = store.rounds(run_id)
        assert [r["round"] for r in rows] == list(range(1, rounds + 1))
        assert [r["metrics"].get("synthesis_members") for r in rows] == ["a,b"] * rounds
        local = {m["upload_id"]: m for m in store.models(run_id, "local")}
        for rep in (report, *(ag.report for ag in others)):
            for upload_id, _ in rep["acked"]:
                assert upload_id in local
        # agent 0's uploads: rounds 1..k held by a, the later ones by b
        x_rounds = sorted(
            (m["round"], m["cluster"])
            for m in local.values()
            if m["producer"] == x.agent_id and m["status"] == "aggregated"
        )
        assert [r for r, _ in x_rounds] == list(range(1, rounds + 1)), x_rounds
        assert [c for _, c in x_rounds] == [a.aggregator_id] * k + [b.aggregator_id] * (rounds - k)
        final = store.load_weights(rows[-1]["model_id"])
    finally:
        store.close()
    for n, v in faultlib.simulate(rounds, 3).items():
        np.testing.assert_allclose(final[n], v, rtol=0, atol=1e-5)
