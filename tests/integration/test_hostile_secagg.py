"""Hostile secure-aggregation messages are refused with a clear error while honest agents
complete their secure rounds: garbage keys, replays (another or an old session, a second
advertisement), messages out of phase, shares that are not bound to the session, shares
for an unknown agent or of the wrong size, a masked input from an agent outside the
session, a plain upload, an oversized share map."""

from __future__ import annotations

import asyncio
import os
import struct
import threading
import time
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from fedstack import Agent, AggregatorConfig, FederationFinished, Store
from fedstack.errors import ConnectionClosed, FedstackError
from fedstack.testing import aggregator_thread
from fedstack.transport import connect
from fedstack.wire import (
    Error,
    Message,
    ModelUpload,
    Participate,
    SecAggForward,
    SecAggKeys,
    SecAggRoster,
    SecAggShares,
    SecAggStart,
    SecAggUnmaskShares,
    Welcome,
    decode,
    encode,
)
from fedstack.wire.messages import PROTOCOL_VERSION, SECAGG_MASKED, SECAGG_SESSION

P = 64


class Peer:
    """A raw connection speaking the wire protocol by hand (a hostile agent)."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.seen: list[Message] = []
        self.backlog: list[Message] = []

    async def send(self, msg: Message) -> None:
        await self.conn.send(encode(msg))

    async def next(self, kind: type[Message], timeout: float = 20.0) -> Any:
        """The next message of ``kind`` (others wait in ``backlog``)."""
        for i, msg in enumerate(self.backlog):
            if isinstance(msg, kind):
                return self.backlog.pop(i)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            assert left > 0, f"no {kind.__name__} in time; saw {[m.TYPE for m in self.seen]}"
            msg = decode(await asyncio.wait_for(self.conn.recv(), left))
            self.seen.append(msg)
            if isinstance(msg, kind):
                return msg
            self.backlog.append(msg)

    async def refused(self, msg: Message) -> Error:
        await self.send(msg)
        err: Error = await self.next(Error)
        assert not err.fatal, err
        return err


def _raw_shares(session: str, entries: int) -> bytes:
    """A hand-made secagg_shares with ``entries`` shares, as a hostile agent sends it."""
    header = {
        "t": "secagg_shares",
        "f": {"session": session, "shares": {f"a{i}": b"x" * 92 for i in range(entries)}},
        "x": {},
    }
    packed: bytes = msgpack.packb(header, use_bin_type=True)
    out = struct.pack("<2sBBI", b"FS", PROTOCOL_VERSION, 0, len(packed)) + packed
    return out + bytes(-len(out) % 64)


async def _join(url: str, name: str) -> Peer:
    conn = await connect(url, max_message_bytes=1 << 24)
    peer = Peer(conn)
    await peer.send(Participate(agent_name=name))
    welcome = await peer.next(Welcome)
    assert welcome.config.get("secagg") is True
    return peer


def test_hostile_secagg_messages_refused_and_honest_rounds_complete(tmp_path: Path) -> None:
    cfg = AggregatorConfig(
        auth="off",
        port=0,
        db=str(tmp_path / "h.db"),
        rounds=2,
        min_agents=4,  # the three honest agents and the attacker
        finish_grace=3,
        secagg=True,
        secagg_timeout=2.0,
    )
    with aggregator_thread(cfg) as agg:
        url = f"ws://127.0.0.1:{agg.port}"
        versions: dict[str, list[int]] = {}

        def honest(name: str, i: int) -> None:
            a = Agent(url, name=name)
            a.send_initial_model({"w": np.zeros(P, np.float32)})
            a.start(60)
            if name == "h1":  # slow to mask: the masked phase lasts a second
                sa = a._core.secagg
                inner = sa.on_message

                def slow(msg: Message, agent_id: str | None) -> list[Message]:
                    if isinstance(msg, SecAggForward):
                        time.sleep(1.0)
                    out: list[Message] = inner(msg, agent_id)
                    return out

                sa.on_message = slow
            try:
                while True:
                    gm = a.wait_for_global_model(60)
                    versions.setdefault(name, []).append(a.version)
                    a.send_trained_model({"w": gm["w"] + i}, 10)
            except (FederationFinished, ConnectionClosed, FedstackError, TimeoutError):
                pass
            finally:
                a.close(5)

        threads = [
            threading.Thread(target=honest, args=(f"h{i}", i), daemon=True) for i in (1, 2, 3)
        ]
        for t in threads:
            t.start()
        while agg.structure is None:
            time.sleep(0.01)

        async def attack() -> dict[str, Any]:
            out: dict[str, Any] = {}
            peer = await _join(url, "mallory")
            start: SecAggStart = await peer.next(SecAggStart)
            s = start.session
            # an oversized share map never reaches the session: the decoder refuses it
            big = await _join(url, "mallory2")
            await big.conn.send([_raw_shares(s, 300)])  # (the encoder would refuse it)
            try:
                out["oversized"] = await big.next(Error)
            except ConnectionClosed:
                out["oversized"] = "closed"
            big.conn.abort()
            keys = {"c_pk": os.urandom(32), "s_pk": os.urandom(32), "b_commit": os.urandom(32)}
            out["other_session"] = await peer.refused(SecAggKeys(session=s + "x", **keys))
            out["garbage_key"] = await peer.refused(
                SecAggKeys(session=s, c_pk=b"\x01" * 5, s_pk=keys["s_pk"], b_commit=b"")
            )
            out["shares_in_keys_phase"] = await peer.refused(
                SecAggShares(session=s, shares={"x": b"\x00" * 92})
            )
            out["unmask_in_keys_phase"] = await peer.refused(
                SecAggUnmaskShares(session=s, b_shares={}, sk_shares={})
            )
            out["plain_upload"] = await peer.refused(
                ModelUpload(
                    upload_id="plain-1",
                    base_version=0,
                    num_samples=5,
                    model={"w": np.ones(P, np.float32)},
                )
            )
            await peer.send(SecAggKeys(session=s, **keys))  # accepted: mallory is in U1
            out["second_advertisement"] = await peer.refused(SecAggKeys(session=s, **keys))
            roster: SecAggRoster = await peer.next(SecAggRoster)
            out["roster"] = roster
            neighbour = sorted(roster.keys)[0]
            out["unbound_share"] = await peer.refused(
                SecAggShares(session=s, shares={j: os.urandom(92) for j in roster.keys})
            )
            out["share_for_unknown"] = await peer.refused(
                SecAggShares(session=s, shares={"nobody": os.urandom(92)})
            )
            out["short_share"] = await peer.refused(
                SecAggShares(session=s, shares={neighbour: b"\x00" * 10})
            )
            # the shares phase closes without mallory (timeout); the honest three go on (h1
            # takes a second to upload its masked input: mallory's arrives in that phase)
            masked = np.zeros(P + 1, np.uint32)
            deadline = time.monotonic() + 20
            while agg.secagg is not None and agg.secagg.phase != "masked":
                assert time.monotonic() < deadline
                await asyncio.sleep(0.005)
            out["masked_not_member"] = await peer.refused(
                ModelUpload(
                    upload_id="masked-1",
                    base_version=0,
                    num_samples=0,
                    metrics={SECAGG_SESSION: s},
                    model={SECAGG_MASKED: masked},
                )
            )
            # round 1 is made by the honest agents: afterwards a message of its session is
            # a replay
            while agg.state.version < 1 and time.monotonic() < deadline + 20:
                await asyncio.sleep(0.05)
            out["old_session"] = await peer.refused(
                SecAggShares(session=s, shares={neighbour: os.urandom(92)})
            )
            peer.conn.abort()
            return out

        out = asyncio.run(attack())
        for t in threads:
            t.join(90)
        run_id = agg.run_id
        assert agg.state.version == 2, agg.state.version
    for case, code in [
        ("other_session", "secagg-replay"),
        ("garbage_key", "secagg-bad-key"),
        ("shares_in_keys_phase", "secagg-phase"),
        ("unmask_in_keys_phase", "secagg-phase"),
        ("plain_upload", "invalid-model"),
        ("second_advertisement", "secagg-phase"),  # its keys closed phase 1
        ("unbound_share", "secagg-replay"),
        ("share_for_unknown", "secagg-unknown-agent"),
        ("short_share", "secagg-bad-share"),
        ("masked_not_member", "invalid-model"),
        ("old_session", "secagg-replay"),
    ]:
        err = out[case]
        assert isinstance(err, Error) and err.code == code, (case, err)
        assert err.message, case
    assert "secure aggregation" in out["plain_upload"].message
    assert "did not share keys" in out["masked_not_member"].message
    oversized = out["oversized"]
    assert oversized == "closed" or (oversized.fatal and oversized.code == "malformed")
    assert all(versions.get(f"h{i}") for i in (1, 2, 3))
    store = Store.open_readonly(cfg.db)
    try:
        rounds = store.rounds(run_id)
        assert [r["round"] for r in rounds] == [1, 2]
        assert rounds[0]["metrics"]["secagg_agents"] == 3  # mallory never made it to U2
        # nothing of mallory's was stored as an input
        for r in rounds:
            parents = [p for p in store.parents(r["model_id"]) if p["relation"] == "input"]
            assert {p["agent"] for p in parents} == {"h1", "h2", "h3"}
        # the honest sum: FedAvg of +1, +2, +3 over two rounds (equal weights)
        gid = store.global_model_id(run_id, 2)
        assert gid is not None
        np.testing.assert_allclose(store.load_weights(gid)["w"], 4.0, atol=1e-3)
    finally:
        store.close()
