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
import pytest

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

# 1-2 s phase timeouts: an honest agent starved of CPU by a test on the other worker for
# longer is (rightly) taken for dropped, so these run with the serial tests
pytestmark = pytest.mark.serial

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
        min_agents=3,  # the three honest agents (the attacker makes 4 in round 1)
        finish_grace=3,
        secagg=True,
        secagg_timeout=2.0,
    )
    with aggregator_thread(cfg) as agg:
        url = f"ws://127.0.0.1:{agg.port}"
        versions: dict[str, list[int]] = {}
        mallory_joined = threading.Event()  # round 1 needs all 4 active agents' keys

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
                    mallory_joined.wait(30)
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
            mallory_joined.set()
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


# ---------------------------------------------------------------- attacker trial fixes
def _tamper(mode: str, sa: Any, ids: dict[str, str]) -> None:
    """Make agent ``sa`` (a SecAggAgent) malicious: ``mode`` alters what it sends."""
    inner_msg, inner_adv = sa.on_message, sa._maybe_advertise

    def tamper(msgs: list[Message]) -> list[Message]:
        out: list[Message] = []
        for m in msgs:
            if isinstance(m, SecAggKeys) and mode == "loworder":
                m = SecAggKeys(session=m.session, c_pk=bytes(32), s_pk=m.s_pk, b_commit=m.b_commit)
            elif isinstance(m, SecAggKeys) and mode == "badcommit":
                m = SecAggKeys(session=m.session, c_pk=m.c_pk, s_pk=m.s_pk, b_commit=bytes(32))
            elif isinstance(m, SecAggShares) and mode == "garbageshare":
                m = SecAggShares(
                    session=m.session,
                    shares={k: v[:16] + os.urandom(len(v) - 16) for k, v in m.shares.items()},
                )
            elif isinstance(m, ModelUpload) and mode == "negweight" and sa.attempts == 1:
                arr = np.array(m.model[SECAGG_MASKED], copy=True)
                arr[-1] -= np.uint32(200000)  # the survivors' total weight becomes negative
                m = ModelUpload(
                    upload_id=m.upload_id,
                    base_version=m.base_version,
                    num_samples=0,
                    metrics=m.metrics,
                    model={SECAGG_MASKED: arr},
                )
            elif isinstance(m, SecAggShares) and mode == "negweight" and sa.attempts == 2:
                sh = dict(m.shares)  # attempt 2: knock h1 out to get a second sum without it
                if ids.get("h1") in sh:
                    sh[ids["h1"]] = sh[ids["h1"]][:16] + os.urandom(len(sh[ids["h1"]]) - 16)
                m = SecAggShares(session=m.session, shares=sh)
            out.append(m)
        return out

    sa.on_message = lambda msg, aid: tamper(inner_msg(msg, aid))
    sa._maybe_advertise = lambda: tamper(inner_adv())


def _malicious_run(
    tmp_path: Path,
    mode: str,
    *,
    rounds: int,
    min_agents: int,
    limit: float = 20.0,
    delays: dict[str, float] | None = None,
) -> tuple[Store, str, dict[str, str]]:
    """3 honest agents h1..h3 (adding +i) and mallory (+9, altered by ``mode``) run
    ``rounds`` secure rounds (at most ``limit`` s). ``delays``: seconds an agent trains."""
    cfg = AggregatorConfig(
        auth="off",
        port=0,
        db=str(tmp_path / f"{mode}.db"),
        rounds=rounds,
        min_agents=min_agents,
        finish_grace=2,
        secagg=True,
        secagg_timeout=1.0,
    )
    ids: dict[str, str] = {}
    with aggregator_thread(cfg) as agg:
        url = f"ws://127.0.0.1:{agg.port}"

        def agent(name: str, i: int) -> None:
            a = Agent(url, name=name)
            a.send_initial_model({"w": np.zeros(P, np.float32)})
            a.start(30)
            assert a._core.session is not None
            ids[name] = str(a._core.session.agent_id)
            if name == "mallory" and mode:
                _tamper(mode, a._core.secagg, ids)
            try:
                while True:
                    gm = a.wait_for_global_model(limit + 5)
                    time.sleep((delays or {}).get(name, 0.0))
                    a.send_trained_model({"w": gm["w"] + i}, 10)
            except (FederationFinished, ConnectionClosed, FedstackError, TimeoutError):
                pass
            finally:
                a.close(3)

        names = [("h1", 1), ("h2", 2), ("h3", 3), ("mallory", 9)]
        threads = [threading.Thread(target=agent, args=nv, daemon=True) for nv in names]
        for t in threads:
            t.start()
        deadline = time.monotonic() + limit
        while not agg.state.finished and time.monotonic() < deadline:
            time.sleep(0.05)
        run_id = agg.run_id
        finished = agg.state.finished
    for t in threads:
        t.join(10)
    assert finished, f"{mode}: the run did not finish in {limit} s"
    return Store.open_readonly(cfg.db), run_id, ids


def _events(store: Store, run_id: str, kind: str) -> list[dict[str, Any]]:
    return [e for e in store.events(run_id=run_id) if e["kind"] == kind]


def test_an_unmasked_sum_is_never_followed_by_a_second_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Differencing across attempts: mallory makes the unmasked total weight negative,
    then (in a retry) knocks h1 out; S1 - S2 would be h1's update. The round ends at the
    first unmasked sum with the model unchanged, and the reason does not carry the weight."""
    import fedstack.privacy.secagg as lib

    sums: list[float] = []
    real = lib.ServerSession.finish

    def spy(self: lib.ServerSession) -> Any:
        out = real(self)
        sums.append(out[1])
        return out

    monkeypatch.setattr(lib.ServerSession, "finish", spy)
    store, run_id, _ = _malicious_run(tmp_path, "negweight", rounds=1, min_agents=4)
    try:
        assert len(sums) == 1 and sums[0] < 0, sums  # one unmasked sum in the round
        r = store.rounds(run_id)[0]
        assert r["metrics"]["secagg_invalid_weight"] == 1.0
        assert r["metrics"]["secagg_agents"] == 0
        gid = store.global_model_id(run_id, 1)
        assert gid is not None
        np.testing.assert_array_equal(store.load_weights(gid)["w"], np.zeros(P, np.float32))
        failed = _events(store, run_id, "secagg_failed")
        assert [f["detail"]["code"] for f in failed] == ["secagg-invalid-weight"]
        assert failed[0]["detail"]["committed_unchanged"] is True
        assert f"{sums[0]:.4f}"[:6] not in failed[0]["detail"]["reason"]
        assert "weight is -" not in failed[0]["detail"]["reason"]
    finally:
        store.close()


def test_fast_untrained_agents_cannot_close_phase_1_before_min_agents(tmp_path: Path) -> None:
    """racer.py: with min_agents = 4, two agents that skip training may not make a round
    without the two that train for longer than secagg_timeout."""
    delays = {"h1": 1.8, "h2": 1.8}
    store, run_id, _ = _malicious_run(tmp_path, "", rounds=1, min_agents=4, delays=delays, limit=20)
    try:
        assert store.rounds(run_id)[0]["metrics"]["secagg_agents"] == 4
    finally:
        store.close()


def test_low_order_key_is_refused_and_its_agent_excluded(tmp_path: Path) -> None:
    store, run_id, ids = _malicious_run(tmp_path, "loworder", rounds=2, min_agents=3)
    try:
        refused = _events(store, run_id, "secagg_refused")
        assert refused and {e["agent_id"] for e in refused} == {ids["mallory"]}
        assert refused[0]["detail"]["code"] == "secagg-bad-key"
        assert "low-order" in refused[0]["detail"]["reason"]
        assert [r["metrics"]["secagg_agents"] for r in store.rounds(run_id)] == [3, 3]
    finally:
        store.close()


def test_forged_shares_are_reported_and_their_sender_excluded(tmp_path: Path) -> None:
    store, run_id, ids = _malicious_run(tmp_path, "garbageshare", rounds=1, min_agents=3)
    try:
        reports = _events(store, run_id, "secagg_report")
        assert reports and all(e["detail"]["accused"] == [ids["mallory"]] for e in reports)
        failed = _events(store, run_id, "secagg_failed")
        assert len(failed) == 1 and list(failed[0]["detail"]["excluded"]) == [ids["mallory"]]
        r = store.rounds(run_id)[0]
        assert r["metrics"]["secagg_agents"] == 3
        gid = store.global_model_id(run_id, 1)
        assert gid is not None
        np.testing.assert_allclose(store.load_weights(gid)["w"], 2.0, atol=1e-3)
    finally:
        store.close()


def test_a_wrong_commitment_excludes_its_agent_for_the_run(tmp_path: Path) -> None:
    store, run_id, ids = _malicious_run(tmp_path, "badcommit", rounds=3, min_agents=3)
    try:
        rounds = store.rounds(run_id)
        # round 1 was unmasked-phase work lost (model unchanged); later rounds are honest
        assert rounds[0]["metrics"]["secagg_void"] == 1.0
        assert [r["metrics"]["secagg_agents"] for r in rounds[1:]] == [3, 3]
        failed = _events(store, run_id, "secagg_failed")
        assert len(failed) == 1 and list(failed[0]["detail"]["excluded"]) == [ids["mallory"]]
        # the failed attempt's masked inputs keep their records, not their vectors
        stale = [m for m in store.models(run_id) if m["status"] == "stale"]
        assert len(stale) == 4 and all(not m["blob"] for m in stale)
    finally:
        store.close()


def test_no_push_to_a_connection_failed_for_a_protocol_breach(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """rawfuzz.py: a round ends just after a hostile agent's protocol breach failed its
    connection; the global model's push to it is skipped quietly (no ERROR, no traceback)."""
    from fedstack.aggregator.delivery import Delivery, Published
    from fedstack.aggregator.fanout import Fanout
    from fedstack.aggregator.registry import Session
    from fedstack.errors import LocalProtocolError

    class Conn:
        remote_address = "127.0.0.1:1"
        aborted = False
        writes = 0

        def write(self, parts: Any, *, frozen: bool = False) -> None:
            self.writes += 1

        async def drain(self) -> None:
            pass

        def abort(self) -> None:
            self.aborted = True

    class Failed:  # the protocol session after a breach (state failed)
        state = None

        def send_encoded(self, kind: Any, parts: Any) -> None:
            raise LocalProtocolError("aggregator may not send global_model in state failed")

    async def main() -> Conn:
        pub = Published(1, 2, "m1", {"w": np.zeros(4, np.float32)}, {}, False)
        delivery = Delivery(Fanout(1 << 20), lambda: pub, 5.0, dict, 0)
        conn = Conn()
        session = Session("a", "mallory", conn, "x", protocol=Failed())  # type: ignore[arg-type]
        await delivery.push(session, 1)
        return conn

    with caplog.at_level("DEBUG", logger="fedstack"):
        conn = asyncio.run(main())
    assert conn.aborted and conn.writes == 0
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "WARNING")]
