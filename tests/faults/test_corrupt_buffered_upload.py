"""Issue 16 finding 13 (b): one corrupt buffered-upload blob does not stop the aggregator
from starting.

An agent's upload is buffered (the round needs two), the aggregator stops, the upload's
blob file is damaged on disk. The restarted aggregator starts, sets that one upload aside
(``quarantined`` in the store, an ``upload_quarantined`` audit event, a warning) and the
run goes on: two honest agents then complete its rounds.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

from fedstack import Agent, AggregatorConfig, FederationFinished, Store
from fedstack.store import schema
from fedstack.testing import aggregator_thread
from fedstack.transport import connect
from fedstack.wire import GlobalModel, ModelUpload, Participate, UploadAck, Welcome, decode, encode


def _config(tmp_path: Path) -> AggregatorConfig:
    return AggregatorConfig(
        auth="off",
        port=0,
        db=str(tmp_path / "f.db"),
        blob_dir=str(tmp_path / "blobs"),
        inline_blob_bytes=0,  # every model a file: the one damaged below
        rounds=2,
        min_agents=2,
        finish_grace=2,
    )


async def _buffer_one_upload(url: str) -> None:
    conn = await connect(url, max_message_bytes=1 << 20)
    try:
        model = {"w": np.zeros(4, np.float32)}
        conn.write(encode(Participate(agent_name="a1", model=model)))
        assert isinstance(decode(await asyncio.wait_for(conn.recv(), 10)), Welcome)
        up = ModelUpload(
            upload_id="buffered-1",
            base_version=0,
            num_samples=3,
            model={"w": np.ones(4, np.float32)},
        )
        await conn.send(encode(up))
        while True:
            reply = decode(await asyncio.wait_for(conn.recv(), 10))
            if not isinstance(reply, GlobalModel):
                break
        assert isinstance(reply, UploadAck) and reply.status == "accepted", reply
    finally:
        conn.abort()


def _honest(url: str, name: str, seen: dict[str, int]) -> None:
    a = Agent(url, name=name)
    a.start()
    try:
        while True:
            try:
                gm = a.wait_for_global_model(30)
            except FederationFinished:
                break
            a.send_trained_model({"w": gm["w"] + 1}, 5)
            seen[name] = a.version
    finally:
        a.close()


def test_corrupt_buffered_upload_is_quarantined_and_run_resumes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = _config(tmp_path)
    with aggregator_thread(cfg) as agg:
        asyncio.run(_buffer_one_upload(f"ws://127.0.0.1:{agg.port}"))
    store = Store(cfg.db, cfg.blob_dir)
    try:
        with store.engine.connect() as c:
            digest = c.execute(
                select(schema.models.c.blob).where(schema.models.c.upload_id == "buffered-1")
            ).scalar_one()
        path = store.blobs.path(digest)
    finally:
        store.close()
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit of its weights: the hash no longer matches
    path.chmod(0o644)
    path.write_bytes(bytes(data))

    caplog.set_level(logging.WARNING, logger="fedstack.aggregator")
    seen: dict[str, int] = {}
    with aggregator_thread(cfg) as agg:  # start() must not fail
        assert agg.state.contributors == {}
        url = f"ws://127.0.0.1:{agg.port}"
        threads = [threading.Thread(target=_honest, args=(url, n, seen)) for n in ("h1", "h2")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert agg.state.version == 2
    assert any("quarantined" in r.getMessage() for r in caplog.records)
    store = Store(cfg.db, cfg.blob_dir)
    try:
        with store.engine.connect() as c:
            status = c.execute(
                select(schema.models.c.status).where(schema.models.c.upload_id == "buffered-1")
            ).scalar_one()
            kinds = c.execute(select(schema.events.c.kind)).scalars().all()
    finally:
        store.close()
    assert status == "quarantined"
    assert "upload_quarantined" in kinds
