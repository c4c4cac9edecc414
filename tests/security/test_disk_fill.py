"""Issue 16 finding 5: an authenticated agent cannot fill the aggregator's disk.

One agent floods a round with uploads of an 8-float model, each under a new upload id and
each carrying a 16 KiB ``extra`` array the strategy (FedAvg) never reads. The extra arrays
are not stored, and what the store holds of that agent's round stays within its storage
quota; the uploads beyond it are refused with ``quota-exceeded``. With
``keep_local_models = "last"``, only the last K rounds' local models keep their weights and
the blobs of the others are deleted.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import func, select

from fedstack import Agent, AggregatorConfig, FederationFinished, Store
from fedstack.aggregator.quotas import RECORD_BYTES, auto_quota
from fedstack.aggregator.retention import prune_up_to
from fedstack.store import schema
from fedstack.testing import aggregator_thread
from fedstack.transport import connect
from fedstack.wire import (
    Error,
    GlobalModel,
    ModelUpload,
    Participate,
    UploadAck,
    Welcome,
    decode,
    encode,
)

QUOTA = 64 * 1024
FLOOD = 150
EXTRA_BYTES = 16 * 1024


def stored_bytes(db: str, blob_dir: Path) -> tuple[int, int]:
    """(bytes of blob data in the database and the blob directory, local model records)."""
    store = Store(db, blob_dir)
    try:
        with store.engine.connect() as c:
            inline = c.execute(select(func.coalesce(func.sum(schema.blob_data.c.size), 0))).scalar()
            rows = c.execute(
                select(func.count()).where(schema.models.c.kind == "local")
            ).scalar_one()
    finally:
        store.close()
    files = sum(p.stat().st_size for p in blob_dir.rglob("*") if p.is_file())
    return int(inline or 0) + files, int(rows)


async def flood(url: str) -> dict[str, int]:
    conn = await connect(url, max_message_bytes=1 << 22)
    codes: dict[str, int] = {}
    rng = np.random.default_rng(0)
    try:
        conn.write(encode(Participate(agent_name="filler", model={"w": np.zeros(8, np.float32)})))
        assert isinstance(decode(await asyncio.wait_for(conn.recv(), 10)), Welcome)
        for i in range(FLOOD):
            up = ModelUpload(
                upload_id=f"flood-{i}",
                base_version=0,
                num_samples=1,
                model={"w": rng.standard_normal(8).astype(np.float32)},
                extra={"junk": rng.standard_normal(EXTRA_BYTES // 4).astype(np.float32)},
            )
            await conn.send(encode(up))
            while True:
                reply: Any = decode(await asyncio.wait_for(conn.recv(), 10))
                if not isinstance(reply, GlobalModel):
                    break
            key = reply.code if isinstance(reply, Error) else "ack"
            assert isinstance(reply, (Error, UploadAck)), reply
            codes[key] = codes.get(key, 0) + 1
    finally:
        conn.abort()
    return codes


@pytest.mark.parametrize("configured", [True, False], ids=["configured", "automatic"])
def test_upload_flood_stays_within_the_storage_quota(tmp_path: Path, configured: bool) -> None:
    quota = QUOTA if configured else auto_quota(8 * 4, 1 << 40)
    blob_dir = tmp_path / "blobs"
    cfg = AggregatorConfig(
        auth="off",
        port=0,
        db=str(tmp_path / "f.db"),
        blob_dir=str(blob_dir),
        rounds=2,
        min_agents=2,  # the flooder alone never completes the round
        agent_round_storage_bytes=QUOTA if configured else None,
    )
    with aggregator_thread(cfg) as agg:
        url = f"ws://127.0.0.1:{agg.port}"
        while True:  # settle: the store as it is before the flood
            before = stored_bytes(cfg.db, blob_dir)
            if before[1] == 0:
                break
            time.sleep(0.05)
        codes = asyncio.run(flood(url))
        after = stored_bytes(cfg.db, blob_dir)
    grown, records = after[0] - before[0], after[1] - before[1]
    # the unguarded aggregator stored every extra array: FLOOD x 16 KiB
    assert grown <= quota, f"the store grew by {grown} bytes over a quota of {quota}"
    assert records <= quota // RECORD_BYTES + 1
    assert codes.get("quota-exceeded", 0) >= FLOOD - quota // RECORD_BYTES - 1, codes
    assert codes.get("ack", 0) >= 1, codes


def _honest(url: str, name: str, seed: int) -> None:
    a = Agent(url, name=name)
    a.send_initial_model({"w": np.zeros(64, np.float32)})
    a.start()
    try:
        while True:
            try:
                gm = a.wait_for_global_model(30)
            except FederationFinished:
                break
            a.send_trained_model({"w": gm["w"] + np.float32(seed + 1)}, 5)
    finally:
        a.close()


def test_retention_keeps_only_the_last_rounds_local_weights(tmp_path: Path) -> None:
    rounds, keep = 5, 2
    blob_dir = tmp_path / "blobs"
    cfg = AggregatorConfig(
        auth="off",
        port=0,
        db=str(tmp_path / "f.db"),
        blob_dir=str(blob_dir),
        inline_blob_bytes=0,  # every model a file: the deleted ones must be gone from disk
        rounds=rounds,
        min_agents=2,
        finish_grace=10,
        keep_local_models="last",
        keep_local_rounds=keep,
    )

    def local_models() -> list[tuple[int, str, str]]:
        store = Store(cfg.db, blob_dir)
        try:
            with store.engine.connect() as c:
                return [
                    (int(r[0]), str(r[1]), str(r[2]))
                    for r in c.execute(
                        select(schema.models.c.round, schema.models.c.blob, schema.models.c.status)
                        .where(schema.models.c.kind == "local")
                        .order_by(schema.models.c.round)
                    )
                ]
        finally:
            store.close()

    with aggregator_thread(cfg) as agg:
        url = f"ws://127.0.0.1:{agg.port}"
        threads = [threading.Thread(target=_honest, args=(url, f"h{i}", i)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert agg.state.version == rounds
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # pruning runs in the background
            if all(
                b == "" for r, b, st in local_models() if r <= rounds - keep and st != "initial"
            ):
                break
            time.sleep(0.05)
        models = local_models()
        store = Store(cfg.db, blob_dir)
        try:
            for rnd, blob, status in models:
                if status == "initial":
                    continue
                if rnd <= rounds - keep:
                    assert blob == "", f"round {rnd}'s local weights were kept"
                else:
                    assert blob and store.blobs.path(blob).exists(), f"round {rnd} lost its weights"
            kept = {b for _, b, _ in models if b}
            with store.engine.connect() as c:
                kept |= set(
                    c.execute(
                        select(schema.models.c.blob).where(schema.models.c.kind == "cluster")
                    ).scalars()
                )
        finally:
            store.close()
    on_disk = {p.name for p in blob_dir.rglob("*") if p.is_file() and not p.name.startswith(".")}
    assert len(on_disk) <= len(kept), "blobs of pruned local models are still on disk"
    assert sum(1 for r, _, st in models if st != "initial" and r > rounds - keep) == 2 * keep


def test_retention_policies() -> None:
    assert prune_up_to("all", 3, 10) is None
    assert prune_up_to("last", 3, 10) == 7
    assert prune_up_to("last", 3, 2) is None
    assert prune_up_to("metadata", 3, 10) == 10
