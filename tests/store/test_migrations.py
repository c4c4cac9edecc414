"""Schema migrations through Alembic, and opening a store for inspection only."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from fedstack.errors import StoreError
from fedstack.store import Store, migrations
from fedstack.store import schema as s


def test_head_constant_is_the_newest_revision() -> None:
    assert ScriptDirectory.from_config(migrations.config()).get_current_head() == migrations.HEAD


def test_a_new_store_is_at_head_and_its_tables_are_exactly_the_schema(tmp_path: Path) -> None:
    st = Store(str(tmp_path / "f.db"))
    try:
        assert migrations.current(st.engine) == migrations.HEAD
        with st.engine.connect() as c:
            diffs = compare_metadata(MigrationContext.configure(c), s.metadata)
        assert diffs == []  # the revisions build what schema.py declares, nothing else
        with st.engine.connect() as c:
            assert c.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    finally:
        st.close()


def test_reopening_keeps_data_and_salt(tmp_path: Path) -> None:
    st = Store(str(tmp_path / "f.db"))
    token = st.issue_credential("a")
    salt = st.token_salt
    st.close()
    st = Store(str(tmp_path / "f.db"))
    try:
        assert st.token_salt == salt and len(salt) == 32
        assert st.authenticate("a", token, "x", auth="required").agent_id
    finally:
        st.close()


def test_open_readonly_creates_nothing_at_a_missing_path(tmp_path: Path) -> None:
    path = tmp_path / "typo" / "f.db"
    with pytest.raises(StoreError, match="no fedstack store"):
        Store.open_readonly(str(path))
    assert not path.parent.exists()


def test_open_readonly_refuses_a_foreign_sqlite_file_and_leaves_it_alone(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE notes (x TEXT)")
    con.commit()
    con.close()
    before = path.read_bytes()
    with pytest.raises(StoreError, match="not a fedstack store"):
        Store.open_readonly(str(path))
    assert path.read_bytes() == before
    con = sqlite3.connect(path)
    try:
        assert con.execute("PRAGMA journal_mode").fetchone() == ("delete",)
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert tables == {"notes"}
    finally:
        con.close()
    assert not (tmp_path / "other.db.blobs").exists()


def test_open_readonly_reads_and_refuses_writes(tmp_path: Path) -> None:
    st = Store(str(tmp_path / "f.db"))
    run = st.open_run("r", {}, "agg")
    st.close()
    ro = Store.open_readonly(str(tmp_path / "f.db"))
    try:
        assert [r["id"] for r in ro.list_runs()] == [run.id]
        with pytest.raises(StoreError) as info:
            ro.open_run("other", {}, "agg")
        assert "INSERT" not in str(info.value) and "readonly" in str(info.value)
    finally:
        ro.close()


def test_without_migrate_an_out_of_date_store_is_refused(tmp_path: Path) -> None:
    st = Store(str(tmp_path / "f.db"))
    with st.engine.begin() as c:
        c.exec_driver_sql("UPDATE alembic_version SET version_num = '0000'")
    st.close()
    with pytest.raises(StoreError, match=f"expected {migrations.HEAD}"):
        Store(str(tmp_path / "f.db"), migrate=False)


def test_a_store_created_by_the_migration_stores_models(tmp_path: Path) -> None:
    st = Store(str(tmp_path / "f.db"), inline_blob_bytes=1 << 16)
    try:
        run = st.open_run("r", {}, "agg")
        agent, _ = st.register_agent("a", None, "x")
        w = {"w": np.arange(6, dtype=np.float32)}
        gid = st.init_federation(
            run.id,
            agent_id=agent,
            structure=[("w", "float32", (6,))],
            init_weights=True,
            initial=w,
            global_weights=w,
            num_samples=1,
            metrics={},
            aggregator_id="agg",
        )
        np.testing.assert_array_equal(st.load_weights(gid)["w"], w["w"])
    finally:
        st.close()


def test_a_store_opened_while_another_process_creates_its_schema_waits_for_it(
    tmp_path: Path,
) -> None:
    """Several aggregators started together on a new file (the demo, the failover tests):
    the second one to open it must wait for the schema the first is creating, not take
    the half-made schema (alembic_version without the store's tables) for another
    application's file (seen once in CI: "it holds another application's tables
    (alembic_version)")."""
    import threading

    from sqlalchemy import create_engine

    from fedstack.store.database import sqlite_setup_lock

    db = tmp_path / "fed.db"
    opened: list[object] = []

    def open_store() -> None:
        try:
            Store(str(db)).close()
            opened.append("ok")
        except StoreError as exc:
            opened.append(exc)

    with sqlite_setup_lock(db):  # "the first aggregator", mid-migration
        con = sqlite3.connect(db)
        con.execute("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL)")
        con.commit()
        con.close()
        second = threading.Thread(target=open_store)
        second.start()
        second.join(0.5)
        assert second.is_alive() and not opened, opened  # waiting, not refusing
        engine = create_engine(f"sqlite:///{db}")
        migrations.upgrade(engine)
        engine.dispose()
    second.join(30)
    assert opened == ["ok"]
