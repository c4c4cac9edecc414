"""The store on PostgreSQL: the Alembic revisions build the schema, models round-trip,
errors are StoreError, and inspection is read-only. Needs a local PostgreSQL installation
(``initdb``/``pg_ctl``) and psycopg; skipped otherwise. The server is the session's
throwaway cluster on 127.0.0.1 (``postgres`` fixture, tests/conftest.py), a fresh database
per test (``pg_url``)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import func, select, text, update

from fedstack.errors import CorruptBlob, StoreConflict, StoreError, StoreUnavailable
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


def _init(st: Store, w: dict[str, np.ndarray]) -> tuple[str, str, str]:
    run = st.open_run("r", {}, "agg")
    aid, _ = st.register_agent("a", None, "x")
    gid = st.init_federation(
        run.id,
        agent_id=aid,
        structure=[(k, str(v.dtype), v.shape) for k, v in w.items()],
        init_weights=True,
        initial=w,
        global_weights=w,
        num_samples=1,
        metrics={},
        aggregator_id="agg",
    )
    return run.id, aid, gid


def _upload(st: Store, run_id: str, aid: str, uid: str, w: dict[str, np.ndarray]) -> str:
    blob = st.put_blob(w)  # the aggregator's upload path: big blobs first, then the record
    rec, _ = st.add_upload(
        run_id,
        agent_id=aid,
        upload_id=uid,
        round=1,
        base_version=0,
        num_samples=1,
        metrics={},
        weights=w,
        status="buffered",
        blob=blob,
    )
    return rec.model_id


def _tamper(st: Store, digest: str) -> None:
    with st.engine.begin() as c:
        c.execute(
            update(s.blob_data)
            .where(s.blob_data.c.digest == digest)
            .values(data=text("overlay(data placing '\\xfffe'::bytea from 200)"))
        )


def test_every_blob_lives_in_postgresql_without_blob_dir(pg_url: str, tmp_path: Path) -> None:
    small = {"w": np.arange(6, dtype=np.float32)}
    big = {"w": np.arange(300_000, dtype=np.float64)}  # 2.4 MB: far over the inline limit
    st = Store(pg_url, inline_blob_bytes=1 << 10)  # no blob_dir: the database holds them all
    try:
        assert st.blobs_in_database
        with pytest.raises(StoreError):
            _ = st.blobs
        run_id, aid, gid = _init(st, small)
        mid = _upload(st, run_id, aid, "u-big", big)
        mid2 = _upload(st, run_id, aid, "u-big-again", big)  # same content: stored once
        gid2 = st.commit_round(
            run_id,
            round=1,
            weights=big,
            inputs=[mid, mid2],
            base_model_id=gid,
            num_samples=2,
            metrics={},
            started=0.0,
            finished=1.0,
            aggregator_id="agg",
            strategy_state={"momentum": np.ones(5), "lr": 0.1},
        )
        with st.engine.connect() as c:
            sizes = dict(c.execute(select(s.blob_data.c.digest, s.blob_data.c.size)).all())
            blobs = {
                m: c.execute(select(s.models.c.blob).where(s.models.c.id == m)).scalar_one()
                for m in (gid, mid, mid2, gid2)
            }
        assert blobs[mid] == blobs[mid2] == blobs[gid2] and set(blobs.values()) <= set(sizes)
        assert sizes[blobs[mid]] > 2_400_000 and len(sizes) == 3  # small, big, strategy state
        np.testing.assert_array_equal(st.load_weights(mid)["w"], big["w"])
        np.testing.assert_array_equal(st.load_weights(gid)["w"], small["w"])
        resume = st.resume_state(run_id)
        assert resume.strategy_state is not None and resume.strategy_state["lr"] == 0.1
        np.testing.assert_array_equal(resume.strategy_state["momentum"], np.ones(5))
        out = st.export_model(gid2, tmp_path / "m.safetensors")
        from fedstack.wire import tensorfile

        np.testing.assert_array_equal(
            tensorfile.decode(memoryview(out.read_bytes()))[0]["w"], big["w"]
        )
        assert not any(tmp_path.glob("**/*.blobs"))  # no blob directory anywhere
        # integrity: a damaged copy is detected on read, and storing the content repairs it
        _tamper(st, blobs[mid])
        with pytest.raises(CorruptBlob):
            st.load_weights(mid)
        with pytest.raises(StoreError):
            st.export_model(mid, tmp_path / "bad.safetensors")
        _upload(st, run_id, aid, "u-big-third", big)  # put_blob: its own transaction
        np.testing.assert_array_equal(st.load_weights(mid)["w"], big["w"])
        _tamper(st, blobs[gid])
        with pytest.raises(CorruptBlob):
            st.load_weights(gid)
        _upload(st, run_id, aid, "u-small", small)  # inlined with its record
        np.testing.assert_array_equal(st.load_weights(gid)["w"], small["w"])
    finally:
        st.close()
    ro = Store.open_readonly(pg_url)  # inspection needs no blob_dir either
    try:
        np.testing.assert_array_equal(ro.load_weights(mid)["w"], big["w"])
    finally:
        ro.close()
    from fedstack.cli.main import main as cli_main

    # the operator's commands need no --blob-dir either
    assert cli_main(["db", "upgrade", "--db", pg_url]) == 0
    assert cli_main(["db", "models", "--db", pg_url, "--json"]) == 0


def test_same_blob_stored_concurrently_by_two_stores(pg_url: str) -> None:
    w = {"w": np.arange(50_000, dtype=np.float32)}
    a, b = Store(pg_url), Store(pg_url)
    try:
        barrier = threading.Barrier(2)
        results: list[object] = []

        def put(st: Store) -> None:
            barrier.wait(10)
            try:
                results.append(st.put_blob(w))
            except Exception as exc:  # the assertion below shows it
                results.append(exc)

        threads = [threading.Thread(target=put, args=(st,)) for st in (a, b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert len(results) == 2 and results[0] == results[1], results
        digest = results[0][0]  # type: ignore[index]
        np.testing.assert_array_equal(b.get_blob(digest)["w"], w["w"])
    finally:
        a.close()
        b.close()


def test_blob_over_the_database_limit_is_refused(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fedstack.store.repository as repository

    st = Store(pg_url)
    try:
        monkeypatch.setattr(repository, "MAX_DATABASE_BLOB_BYTES", 4096)
        with pytest.raises(StoreError, match="blob_dir"):
            st.put_blob({"w": np.zeros(2048, dtype=np.float32)})
        assert st.put_blob({"w": np.zeros(16, dtype=np.float32)}) is not None
    finally:
        st.close()


def test_pruned_blobs_leave_the_database(pg_url: str) -> None:
    st = Store(pg_url)
    try:
        w = {"w": np.zeros(4, dtype=np.float32)}
        run_id, aid, gid = _init(st, w)
        local = {"w": np.full(4, 3.0, dtype=np.float32)}
        mid = _upload(st, run_id, aid, "u1", local)
        st.commit_round(
            run_id,
            round=1,
            weights=w,
            inputs=[mid],
            base_model_id=gid,
            num_samples=1,
            metrics={},
            started=0.0,
            finished=1.0,
            aggregator_id="agg",
        )
        assert st.prune_local_models(run_id, 1) == (1, 1)
        with st.engine.connect() as c:
            assert c.execute(select(func.count()).select_from(s.blob_data)).scalar() == 1
    finally:
        st.close()


def test_store_recovers_by_itself_across_restart_and_outage(tmp_path: Path) -> None:
    from fedstack.testing.postgres import PostgresServer, unavailable_reason

    if (reason := unavailable_reason()) is not None:
        pytest.skip(reason)
    w = {"w": np.arange(6, dtype=np.float32)}
    with PostgresServer() as server:  # its own: the session's server is shared
        st = Store(server.url)
        try:
            run_id, aid, gid = _init(st, w)
            row = st.model(gid)
            assert row is not None
            digest = row["blob"]
            server.restart()  # every pooled connection is cut: the pre-ping replaces them
            np.testing.assert_array_equal(st.load_weights(gid)["w"], w["w"])
            server.stop()
            t0 = time.monotonic()
            for uid in ("down-1", "down-2"):
                with pytest.raises(StoreUnavailable) as info:
                    _upload(st, run_id, aid, uid, w)
                assert "127.0.0.1" not in str(info.value) and "INSERT" not in str(info.value)
            with pytest.raises(StoreUnavailable):
                st.load_weights(gid)
            with pytest.raises(StoreUnavailable):
                st.get_blob(digest)  # the binary read path
            assert time.monotonic() - t0 < 15  # fails fast, never hangs
            server.start()
            mid = _upload(st, run_id, aid, "up-again", w)
            np.testing.assert_array_equal(st.load_weights(mid)["w"], w["w"])
            assert st.find_upload("down-1") is None  # nothing half-stored
        finally:
            st.close()


def test_engine_options_for_postgresql_only() -> None:
    from fedstack.store.database import engine_options

    opts = engine_options("postgresql+psycopg://u@db.example:5432/fed?connect_timeout=2")
    assert opts["pool_pre_ping"] is True
    args = opts["connect_args"]
    assert "connect_timeout" not in args  # the URL's own value is kept
    assert args["keepalives"] == 1 and args["keepalives_idle"] > 0
    assert engine_options("postgresql+asyncpg://u@h/fed") == {"pool_pre_ping": True}
    assert engine_options("sqlite:///fed.db") == {}


def test_sample_counts_past_32_bits_on_postgresql(pg_url: str) -> None:
    """A round's sample count is the sum over its agents: past 2**31 - 1 with 215 agents
    at the default cap (10 million each). The commit must store it (before revision 0003
    the INTEGER column refused it: "numeric value out of range", retried for ever); a
    store made at revision 0002 is upgraded in place."""
    from sqlalchemy import create_engine, inspect

    engine = create_engine(pg_url)
    try:
        migrations.upgrade(engine, "0002")  # a store of the previous fedstack
    finally:
        engine.dispose()
    st = Store(pg_url)
    try:
        with st.engine.connect() as c:
            kinds = {
                t: next(
                    col["type"] for col in inspect(c).get_columns(t) if col["name"] == "num_samples"
                )
                for t in ("models", "rounds", "cluster_rounds")
            }
        assert all(str(k) == "BIGINT" for k in kinds.values()), kinds
        w = {"w": np.zeros(3, dtype=np.float32)}
        run_id, aid, gid = _init(st, w)
        rec, _ = st.add_upload(
            run_id,
            agent_id=aid,
            upload_id="u-many",
            round=1,
            base_version=0,
            num_samples=3_000_000_000,
            metrics={},
            weights=w,
            status="buffered",
        )
        st.commit_round(
            run_id,
            round=1,
            weights=w,
            inputs=[rec.model_id],
            base_model_id=gid,
            num_samples=6_000_000_000,
            metrics={},
            started=0.0,
            finished=1.0,
            aggregator_id="agg",
        )
        assert [r["num_samples"] for r in st.rounds(run_id)] == [6_000_000_000]
        assert st.find_upload("u-many").num_samples == 3_000_000_000  # type: ignore[union-attr]
    finally:
        st.close()
