"""Hostile input is refused with an error reply while real agents keep training."""

from __future__ import annotations

import asyncio
import os
import pickle
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedstack import Agent, AggregatorConfig, FederationFinished, Store
from fedstack.errors import ConnectionClosed
from fedstack.testing import aggregator_thread
from fedstack.transport import connect
from fedstack.wire import Error, GlobalModel, ModelUpload, Participate, Welcome, decode, encode

LIMIT = 1 << 20


class Boom:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, ("touch /tmp/fedstack-pwned",))


async def _attack(url: str, payloads: list[bytes | list[Any]], *, participate: bool) -> list[Any]:
    """Send payloads on one connection; return the replies, then 'closed' if it closed."""
    conn = await connect(url, max_message_bytes=1 << 26)
    replies: list[Any] = []
    try:
        if participate:
            conn.write(encode(Participate(agent_name=f"attacker-{os.urandom(3).hex()}")))
            welcome = decode(await asyncio.wait_for(conn.recv(), 10))
            assert isinstance(welcome, Welcome)
        for p in payloads:
            await conn.send(p if isinstance(p, list) else [p])
            reply = decode(await asyncio.wait_for(conn.recv(), 10))
            while isinstance(reply, GlobalModel):  # pushed to every joined agent
                reply = decode(await asyncio.wait_for(conn.recv(), 10))
            replies.append(reply)
        try:
            while isinstance(decode(await asyncio.wait_for(conn.recv(), 1)), GlobalModel):
                pass
        except ConnectionClosed:
            replies.append("closed")
        except TimeoutError:
            replies.append("open")
    except ConnectionClosed:
        replies.append("closed")
    finally:
        conn.abort()
    return replies


def _upload(model: dict[str, Any]) -> list[Any]:
    return encode(
        ModelUpload(upload_id=os.urandom(8).hex(), base_version=0, num_samples=1, model=model)
    )


@pytest.fixture()
def federation(tmp_path: Path):  # type: ignore[no-untyped-def]
    cfg = AggregatorConfig(
        auth="off",
        port=0,
        db=str(tmp_path / "f.db"),
        rounds=6,
        min_agents=2,
        max_message_bytes=LIMIT,
        finish_grace=5,
    )
    with aggregator_thread(cfg) as agg:
        results: dict[str, list[int]] = {}

        def honest(name: str) -> None:
            a = Agent(f"ws://127.0.0.1:{agg.port}", name=name)
            a.send_initial_model({"w": np.zeros(8, np.float32)})
            a.start()
            seen = []
            while True:
                try:
                    gm = a.wait_for_global_model(60)
                except FederationFinished:
                    break
                seen.append(a.version)
                a.send_trained_model({"w": gm["w"] + 1}, 5)
            a.close()
            results[name] = seen

        threads = [threading.Thread(target=honest, args=(n,)) for n in ("h1", "h2")]
        for t in threads:
            t.start()
        yield agg, results, threads, tmp_path


def test_hostile_inputs_refused_while_agents_train(federation) -> None:  # type: ignore[no-untyped-def]
    agg, results, threads, tmp_path = federation
    url = f"ws://127.0.0.1:{agg.port}"
    marker = Path("/tmp/fedstack-pwned")
    marker.unlink(missing_ok=True)
    while agg.structure is None:  # wait until the honest agents fixed the structure
        threading.Event().wait(0.01)

    async def attacks() -> dict[str, list[Any]]:
        out = {}
        out["malformed"] = await _attack(url, [b"\x00\x01garbage-frame"], participate=False)
        out["pickle"] = await _attack(url, [pickle.dumps(Boom())], participate=False)
        out["pickle_after_join"] = await _attack(
            url, [pickle.dumps({"w": [1, 2]})], participate=True
        )
        out["wrong_shape"] = await _attack(
            url, [_upload({"w": np.zeros(9, np.float32)})], participate=True
        )
        out["wrong_dtype"] = await _attack(
            url, [_upload({"w": np.zeros(8, np.float64)})], participate=True
        )
        out["non_finite"] = await _attack(
            url,
            [_upload({"w": np.array([1, np.nan, 0, 0, 0, 0, 0, 0], np.float32)})],
            participate=True,
        )
        out["extra_tensor"] = await _attack(
            url,
            [_upload({"w": np.zeros(8, np.float32), "x": np.zeros(1, np.float32)})],
            participate=True,
        )
        out["oversized"] = await _attack(url, [b"\x00" * (2 * LIMIT)], participate=True)
        out["truncated"] = await _attack(
            url, [_upload({"w": np.zeros(8, np.float32)})[0][:20]], participate=True
        )
        return out

    out = asyncio.run(attacks())
    for t in threads:
        t.join(120)
    # protocol violations: an error reply, then the connection is closed
    for case, code in [
        ("malformed", "malformed"),
        ("pickle", "malformed"),
        ("pickle_after_join", "malformed"),
        ("oversized", "too-large"),
        ("truncated", "malformed"),
    ]:
        replies = out[case]
        assert isinstance(replies[0], Error), (case, replies)
        assert replies[0].code == code and replies[0].fatal, (case, replies[0])
        assert replies[-1] == "closed", case
    # invalid models: an error reply naming the problem; the connection stays usable
    for case, words in [
        ("wrong_shape", "shape"),
        ("wrong_dtype", "dtype"),
        ("non_finite", "NaN"),
        ("extra_tensor", "unexpected"),
    ]:
        replies = out[case]
        assert isinstance(replies[0], Error) and replies[0].code == "invalid-model", case
        assert words in replies[0].message, (case, replies[0].message)
        assert not replies[0].fatal and replies[-1] == "open"
    assert not marker.exists(), "a pickle payload was executed"
    # the honest federation finished correctly
    assert results["h1"] == list(range(7)) and results["h2"] == list(range(7))
    store = Store(str(tmp_path / "f.db"))
    run = store.latest_run_id()
    assert run is not None
    rounds = store.rounds(run)
    assert [r["round"] for r in rounds] == [1, 2, 3, 4, 5, 6]
    final = store.load_weights(rounds[-1]["model_id"])
    np.testing.assert_array_equal(final["w"], np.full(8, 6, np.float32))
    refusals = [e for e in store.events(run) if e["kind"] in ("refused", "upload_refused")]
    assert len(refusals) >= 9  # every refusal is recorded with its reason
    assert all(e["detail"].get("reason") or e["detail"].get("message") for e in refusals)
    store.close()
