"""Blob writes of the same content from several threads at once (uploads are written
outside the aggregator's lock, and two agents may upload identical models)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from fedstack.store import BlobStore


def test_same_blob_written_concurrently_by_many_threads(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path / "b", fsync=False)
    weights = {"w": np.arange(50_000, dtype=np.float32)}
    with ThreadPoolExecutor(8) as pool:
        results = set(pool.map(lambda _: blobs.put(weights), range(64)))
    assert len(results) == 1
    [(digest, _size)] = results
    np.testing.assert_array_equal(blobs.get(digest)["w"], weights["w"])
    assert [p.name for p in (tmp_path / "b").rglob("*") if p.is_file()] == [f"{digest}.safetensors"]
