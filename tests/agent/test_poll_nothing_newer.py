"""Polling delivery (book row 19): an agent asks with the version it has; before the round
is aggregated the aggregator answers "nothing newer" (``not_ready``, the book's ack), after
it the new global model. Real aggregator, real WebSockets on 127.0.0.1, the agent's real
protocol session (:class:`~fedstack.wire.session.AgentSession`) driven by hand."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np

from fedstack import AggregatorConfig
from fedstack.aggregator import Aggregator
from fedstack.transport import Connection, connect
from fedstack.wire import ModelUpload, NotReady, Participate, Poll
from fedstack.wire.session import (
    AgentSession,
    Event,
    GlobalModelReceived,
    HeartbeatReceived,
    NotReadyReceived,
    UploadAcknowledged,
    Welcomed,
)

MODEL = {"w": np.zeros(4, np.float32)}


class RawAgent:
    """One agent connection speaking the protocol step by step."""

    def __init__(self, conn: Connection, name: str) -> None:
        self.conn, self.name = conn, name
        self.session = AgentSession()

    @classmethod
    async def join(cls, url: str, name: str) -> tuple[RawAgent, Welcomed]:
        agent = cls(await connect(url, max_message_bytes=1 << 20), name)
        agent.send(
            Participate(
                agent_name=name,
                token=f"{name}-token-0123456789",
                model=MODEL,
                init_weights=True,
                num_samples=1,
                known_version=-1,
                client="row19-test",
            )
        )
        welcome = await agent.next(timeout=10)
        assert isinstance(welcome, Welcomed)
        return agent, welcome

    def send(self, msg: object) -> None:
        self.conn.write(self.session.send(msg))  # type: ignore[arg-type]

    async def next(self, timeout: float) -> Event:
        """The next event that is not a heartbeat."""
        while True:
            event = self.session.receive_bytes(await asyncio.wait_for(self.conn.recv(), timeout))
            if not isinstance(event, HeartbeatReceived):
                return event

    async def poll(self, known: int, wait: float = 0.0, timeout: float = 10) -> Event:
        self.send(Poll(known_version=known, wait=wait))
        return await self.next(timeout)

    async def upload(self, value: float, n: int) -> None:
        self.send(
            ModelUpload(
                upload_id=f"{self.name}-1",
                base_version=0,
                num_samples=n,
                metrics={},
                model={"w": np.full(4, value, np.float32)},
            )
        )
        ack = await self.next(10)
        assert isinstance(ack, UploadAcknowledged) and ack.message.status == "accepted"


def test_poll_gets_nothing_newer_before_aggregation_and_the_model_after(tmp_path: Path) -> None:
    cfg = AggregatorConfig(
        host="127.0.0.1",
        port=0,
        db=str(tmp_path / "agg.db"),
        delivery="poll",
        min_agents=2,
        auth="off",
    )

    async def main() -> None:
        agg = Aggregator(cfg)
        await agg.start()
        try:
            a, wa = await RawAgent.join(agg.url, "a")
            b, _ = await RawAgent.join(agg.url, "b")
            assert wa.message.delivery == "poll" and wa.message.version == 0

            # nothing newer than v0: the answer is not_ready (version 0, round 1 open)
            ev = await a.poll(known=0)
            assert isinstance(ev, NotReadyReceived)
            assert isinstance(ev.message, NotReady)
            assert (ev.message.version, ev.message.round) == (0, 1)

            await a.upload(1.0, n=1)  # one of the two uploads the round needs
            ev = await a.poll(known=0)
            assert isinstance(ev, NotReadyReceived) and ev.message.version == 0

            # a long poll is held (no answer while nothing is newer) ...
            a.send(Poll(known_version=0, wait=30.0))
            held = asyncio.ensure_future(a.next(timeout=20))
            await asyncio.sleep(0.3)
            assert not held.done()
            # ... and answered with the new global model as soon as the round is aggregated
            await b.upload(4.0, n=3)
            ev = await held
            assert isinstance(ev, GlobalModelReceived) and ev.new
            assert ev.message.version == 1
            np.testing.assert_array_equal(ev.message.model["w"], np.full(4, 3.25, np.float32))

            # an agent asking with v0 after the aggregation gets v1 at once
            ev = await b.poll(known=0)
            assert isinstance(ev, GlobalModelReceived) and ev.message.version == 1
            # and asking with v1, nothing newer again: round 2 is open
            ev = await b.poll(known=1)
            assert isinstance(ev, NotReadyReceived)
            assert (ev.message.version, ev.message.round) == (1, 2)
            for agent in (a, b):
                agent.conn.abort()
        finally:
            await agg.stop()

    asyncio.run(main())
