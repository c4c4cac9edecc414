"""The store on PostgreSQL: the Alembic revisions build the schema, models round-trip,
errors are StoreError, and inspection is read-only. Needs a local PostgreSQL installation
(``initdb``/``pg_ctl``) and psycopg; skipped otherwise. The server is the session's
throwaway cluster on 127.0.0.1 (``postgres`` fixture, tests/conftest.py), a fresh database
per test (``pg_url``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedstack.errors import StoreConflict, StoreError
from fedstack.store import Store, migrations
from fedstack.store import schema as s

pytest.importorskip("psycopg")


def test_store_on_postgresql(pg_url: str, tmp_path: Path) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    st = Store(pg_url, blob_dir=tmp_path / "blobs", inline_blob_bytes=1 << 10)
    try:
        assert migrations.current(st.engine) == migrations.HEAD
        with st.engine.connect() as c:
            assert compare_metadata(MigrationContext.configure(c), s.metadata) == []
        run = st.open_run("r", {}, "agg")
        aid, _ = st.register_agent("a", "token-a", "x")
        small = {"w": np.arange(6, dtype=np.float32)}
        big = {"w": np.arange(4096, dtype=np.float32)}
        gid = st.init_federation(
            run.id,
            agent_id=aid,
            structure=[("w", "float32", (6,))],
            init_weights=True,
            initial=small,
            global_weights=small,
            num_samples=1,
            metrics={},
            aggregator_id="agg",
        )
        np.testing.assert_array_equal(st.load_weights(gid)["w"], small["w"])
        up = {
            "agent_id": aid,
            "round": 1,
            "base_version": 0,
            "num_samples": 1,
            "metrics": {},
            "status": "buffered",
        }
        [(rec, new)] = st.add_uploads(run.id, [{**up, "upload_id": "u1", "weights": big}])
        assert new and st.add_uploads(run.id, [{**up, "upload_id": "u1", "weights": big}])[0] == (
            rec,
            False,
        )
        np.testing.assert_array_equal(st.load_weights(rec.model_id)["w"], big["w"])
        with pytest.raises(StoreConflict) as info:
            st.add_upload(
                "no-run",
                agent_id=aid,
                upload_id="u2",
                round=1,
                base_version=0,
                num_samples=1,
                metrics={"m": "zz-secret"},
                weights=small,
                status="buffered",
            )
        assert "zz-secret" not in str(info.value) and "INSERT" not in str(info.value)
    finally:
        st.close()
    Store(pg_url, blob_dir=tmp_path / "blobs").close()  # already at head: a no-op
    ro = Store.open_readonly(pg_url, blob_dir=tmp_path / "blobs")
    try:
        assert [r["name"] for r in ro.list_runs()] == ["r"]
        with pytest.raises(StoreError):
            ro.open_run("other", {}, "agg")
    finally:
        ro.close()
