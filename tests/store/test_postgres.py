"""The store on PostgreSQL: the Alembic revisions build the schema, models round-trip,
errors are StoreError, and inspection is read-only. Needs a local PostgreSQL installation
(``initdb``/``pg_ctl``) and psycopg; skipped otherwise. The server is a throwaway cluster
on 127.0.0.1, stopped at the end."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from fedstack.errors import StoreConflict, StoreError
from fedstack.store import Store, migrations
from fedstack.store import schema as s
from fedstack.testing import free_port

pytest.importorskip("psycopg")


def _bindir() -> Path | None:
    found = shutil.which("pg_ctl")
    candidates = [str(Path(found).resolve().parent)] if found else []
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    for c in candidates:
        if (Path(c) / "initdb").exists() and (Path(c) / "pg_ctl").exists():
            return Path(c)
    return None


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    bindir = _bindir()
    if bindir is None:
        pytest.skip("no PostgreSQL installation")
    prefix: list[str] = []
    if os.geteuid() == 0:  # initdb refuses root: run the cluster as the postgres user
        if shutil.which("runuser") is None:
            pytest.skip("running as root without runuser")
        prefix = ["runuser", "-u", "postgres", "--"]
    # not under pytest's tmp_path: its parents are private to this user
    root = Path(tempfile.mkdtemp(prefix="fedstack-pg-"))
    try:
        if prefix:
            shutil.chown(root, "postgres")
        yield from _cluster(bindir, root, prefix)
    finally:
        for _ in range(20):  # the server's last processes may still be exiting
            shutil.rmtree(root, ignore_errors=True)
            if not root.exists():
                break
            time.sleep(0.1)


def _cluster(bindir: Path, root: Path, prefix: list[str]) -> Iterator[str]:
    def run(*args: str) -> int:
        return subprocess.run([*prefix, *args], capture_output=True, timeout=120).returncode

    data, port = root / "data", free_port()
    if run(str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "fed"):
        pytest.skip("initdb failed")
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1"
    if run(
        str(bindir / "pg_ctl"),
        "-D",
        str(data),
        "-l",
        str(root / "log"),
        "-w",
        "-o",
        options,
        "start",
    ):
        pytest.skip("PostgreSQL did not start")
    try:
        yield f"postgresql+psycopg://fed@127.0.0.1:{port}/postgres"
    finally:
        run(str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")


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
