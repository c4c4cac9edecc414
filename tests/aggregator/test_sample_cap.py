"""Book row 61 (and X-19): one update per agent per round, duplicates counted once; the
self-reported sample count (the FedAvg weight) is capped, with a sensible default.

A real aggregator on 127.0.0.1; the agents are the agent's protocol session driven by hand,
so that they can do what the library agent never does (upload twice in a round, claim
absurd sample counts)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from fedstack import AggregatorConfig, Store
from fedstack.aggregator import Aggregator
from fedstack.cli.aggregator import parse_aggregator_args
from fedstack.errors import ConfigError
from fedstack.transport import Connection, connect
from fedstack.wire import ModelUpload, Participate
from fedstack.wire.session import (
    AgentSession,
    Event,
    GlobalModelReceived,
    HeartbeatReceived,
    RequestRefused,
    UploadAcknowledged,
    Welcomed,
)

MODEL = {"w": np.zeros(4, np.float32)}


class Raw:
    def __init__(self, conn: Connection) -> None:
        self.conn, self.session = conn, AgentSession()

    @classmethod
    async def join(cls, url: str, name: str) -> Raw:
        raw = cls(await connect(url, max_message_bytes=1 << 20))
        raw.conn.write(
            raw.session.send(
                Participate(
                    agent_name=name,
                    token=f"{name}-token-0123456789",
                    model=MODEL,
                    init_weights=True,
                    num_samples=1,
                    known_version=-1,
                    client="row61-test",
                )
            )
        )
        assert isinstance(await raw.next(), Welcomed)
        return raw

    async def next(self) -> Event:
        while True:
            ev = self.session.receive_bytes(await asyncio.wait_for(self.conn.recv(), 10))
            if not isinstance(ev, HeartbeatReceived):
                return ev

    async def upload(self, upload_id: str, value: float, n: int) -> Event:
        self.conn.write(
            self.session.send(
                ModelUpload(
                    upload_id=upload_id,
                    base_version=0,
                    num_samples=n,
                    metrics={},
                    model={"w": np.full(4, value, np.float32)},
                )
            )
        )
        return await self.next()


def _config(tmp_path: Path, **kw: object) -> AggregatorConfig:
    return AggregatorConfig(
        host="127.0.0.1",
        port=0,
        db=str(tmp_path / "agg.db"),
        min_agents=2,
        rounds=1,
        auth="off",
        finish_grace=0,
        **kw,
    )


def test_the_default_cap_is_sensible_and_bounded() -> None:
    cfg = AggregatorConfig()
    assert cfg.max_num_samples == 10_000_000  # far above a real silo's round, far below 2^31
    # every accepted count fits the store's integer columns on every database
    assert AggregatorConfig(max_num_samples=2**31 - 1).max_num_samples == 2**31 - 1
    with pytest.raises(ConfigError, match=r"max_num_samples = 2147483648 is refused"):
        AggregatorConfig(max_num_samples=2**31)
    assert parse_aggregator_args(["--max-num-samples", "5000"]).max_num_samples == 5000


def test_duplicates_count_once_and_claims_above_the_cap_are_refused(tmp_path: Path) -> None:
    cfg = _config(tmp_path, max_num_samples=1000, threshold=0.5)  # 2 of the 3 agents

    async def main() -> tuple[str, np.ndarray]:
        agg = Aggregator(cfg)
        await agg.start()
        try:
            a, b, c = [await Raw.join(agg.url, n) for n in ("a", "b", "c")]
            # above the cap: refused, named, and nothing of it counts
            ev = await c.upload("c-1", 1000.0, 1001)
            assert isinstance(ev, RequestRefused) and ev.error.code == "invalid-model"
            assert "num_samples 1001 is outside 0..1000" in ev.error.message
            ev = await c.upload("c-2", 1000.0, 2**40)  # absurd: same answer
            assert isinstance(ev, RequestRefused) and ev.error.code == "invalid-model"
            assert agg.state.contributors == {}

            ev = await a.upload("a-1", 1.0, 1000)  # exactly the cap: accepted
            assert isinstance(ev, UploadAcknowledged) and ev.message.status == "accepted"
            ev = await a.upload("a-2", 500.0, 1000)  # a second update in the same round
            assert isinstance(ev, UploadAcknowledged) and ev.message.status == "duplicate"
            ev = await a.upload("a-1", 1.0, 1000)  # the first one re-sent (a retry)
            assert isinstance(ev, UploadAcknowledged)
            assert (ev.message.status, ev.message.message) == ("accepted", "already received")
            assert len(agg.state.contributors) == 1  # a counts once: the round still waits
            assert agg.state.version == 0

            ev = await b.upload("b-1", 4.0, 500)
            assert isinstance(ev, UploadAcknowledged) and ev.message.status == "accepted"
            gm = await a.next()
            while not isinstance(gm, GlobalModelReceived):
                gm = await a.next()
            for raw in (a, b, c):
                raw.conn.abort()
            return agg.run_id, gm.message.model["w"]
        finally:
            await agg.stop()

    run_id, w = asyncio.run(main())
    # FedAvg of a's FIRST update (1.0, 1000 samples) and b's (4.0, 500): 2.0; a's duplicate
    # (500.0) and c's refused claims are not in it
    np.testing.assert_allclose(w, np.full(4, 2.0, np.float32), rtol=1e-6)
    store = Store(cfg.db)
    try:
        (rnd,) = store.rounds(run_id)
        assert (rnd["num_updates"], rnd["num_samples"]) == (2, 1500)
        local = {m["upload_id"]: m["status"] for m in store.models(run_id, "local")}
        assert local["a-2"] == "duplicate" and "c-1" not in local and "c-2" not in local
        assert local["a-1"] in ("buffered", "aggregated") and local["b-1"] in (
            "buffered",
            "aggregated",
        )
    finally:
        store.close()
