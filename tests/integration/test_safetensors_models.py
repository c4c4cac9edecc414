"""A global model stored by the aggregator opens with the safetensors library (numpy and
PyTorch) and equals what the agents received."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from example_loader import load_example

from fedstack import AggregatorConfig, Store
from fedstack.testing import aggregator_thread

engine = load_example("examples/minimal/minimal_engine.py")


def test_stored_global_models_load_with_safetensors(tmp_path: Path) -> None:
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    cfg = AggregatorConfig(
        auth="off",
        port=0,
        db=str(tmp_path / "f.db"),
        rounds=2,
        min_agents=2,
        finish_grace=5,
        inline_blob_bytes=0,
    )
    received: dict[str, list[tuple[int, dict[str, np.ndarray]]]] = {}
    with aggregator_thread(cfg) as agg:
        url = f"ws://127.0.0.1:{agg.port}"
        threads = [
            threading.Thread(target=lambda n=n: received.__setitem__(n, engine.run(url, n)))
            for n in ("a1", "a2")
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads)
        run_id = agg.run_id
    store = Store(str(tmp_path / "f.db"))
    try:
        cluster = {m["round"]: m for m in store.models(run_id, "cluster")}
        assert sorted(cluster) == [0, 1, 2]
        for name in ("a1", "a2"):
            for version, gm in received[name]:
                path = store.blobs.path(cluster[version]["blob"])
                loaded = safetensors_numpy.load_file(str(path))
                assert set(loaded) == set(gm), (name, version)
                for k, v in gm.items():
                    assert loaded[k].dtype == v.dtype and loaded[k].shape == v.shape
                    np.testing.assert_array_equal(loaded[k], v)
        torch = pytest.importorskip("torch")
        safetensors_torch = pytest.importorskip("safetensors.torch")
        final = safetensors_torch.load_file(str(store.blobs.path(cluster[2]["blob"])))
        for k, v in received["a1"][-1][1].items():
            assert isinstance(final[k], torch.Tensor)
            np.testing.assert_array_equal(final[k].numpy(), v)
    finally:
        store.close()
