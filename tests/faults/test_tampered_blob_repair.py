"""Issue 16 finding 13: a tampered blob is repaired by storing the same content again.

Blobs are content-addressed: the digest names the bytes. A stored copy whose bytes no
longer match (a damaged disk, an edit behind the store's back) is detected on read; when
the same content is stored again (an agent re-sends it, the next global model equals it),
the store writes it over the damaged copy instead of keeping the damage forever. Both
kinds of blob: a file in the blob directory and a small blob inlined in the database.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import update

from fedstack.errors import CorruptBlob
from fedstack.store import Store
from fedstack.store import schema as s
from fedstack.wire.tensors import structure


def _weights() -> dict[str, np.ndarray]:
    return {"w": np.arange(64, dtype=np.float32)}


@pytest.mark.parametrize("inline", [0, 1 << 20], ids=["file", "inline"])
def test_tampered_blob_is_repaired_by_the_same_content(tmp_path: Path, inline: int) -> None:
    store = Store(str(tmp_path / "fed.db"), inline_blob_bytes=inline)
    try:
        run = store.open_run("r", {}, "agg")
        agent, _ = store.register_agent("a0", None, "127.0.0.1:1")
        w = _weights()
        store.init_federation(
            run.id,
            agent_id=agent,
            structure=structure(w),
            init_weights=True,
            initial=w,
            global_weights=w,
            num_samples=1,
            metrics={},
            aggregator_id="agg",
        )

        def put(uid: str) -> str:
            rec, _ = store.add_upload(
                run.id,
                agent_id=agent,
                upload_id=uid,
                round=1,
                base_version=0,
                num_samples=1,
                metrics={},
                weights=_weights(),
                status="buffered",
            )
            return rec.model_id

        first = put("u1")
        stored = store.put_blob(w)  # (digest, size) of the file; None: inlined
        digest = None if stored is None else stored[0]
        with store.engine.begin() as c:
            row = c.execute(s.blob_data.select()).first()
            if inline:
                assert row is not None
                digest = row.digest
                data = bytearray(row.data)
                data[-1] ^= 0x01
                c.execute(
                    update(s.blob_data)
                    .where(s.blob_data.c.digest == digest)
                    .values(data=bytes(data))
                )
        assert digest is not None
        if not inline:
            path = store.blobs.path(digest)
            raw = bytearray(path.read_bytes())
            raw[-1] ^= 0x01
            path.chmod(0o644)
            path.write_bytes(bytes(raw))
        with pytest.raises(CorruptBlob):
            store.load_weights(first)
        put("u2")  # the same content again: the damaged copy is replaced
        got = store.load_weights(first)
        assert np.array_equal(got["w"], w["w"])
    finally:
        store.close()
