"""Every database error leaves the store as StoreError, with a message free of SQL text and
parameters (the details go to the debug log)."""

from __future__ import annotations

import logging
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import event

from fedstack.errors import StoreConflict, StoreError
from fedstack.store import Store

SECRET = "zz-parameter-value-zz"


def assert_clean(exc: BaseException) -> None:
    text = str(exc)
    assert isinstance(exc, StoreError), type(exc)
    for leak in ("INSERT", "SELECT", "UPDATE", "[SQL", "parameters", SECRET, "sqlalche.me"):
        assert leak not in text, text


def test_constraint_violation_is_a_conflict(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    st = Store(str(tmp_path / "f.db"))
    try:
        with (
            caplog.at_level(logging.DEBUG, logger="fedstack.store"),
            pytest.raises(StoreConflict) as info,
        ):
            st.add_upload(
                "no-such-run",
                agent_id="a",
                upload_id="u-1",
                round=1,
                base_version=0,
                num_samples=1,
                metrics={"m": SECRET},
                weights={"w": np.zeros(2)},
                status="buffered",
            )
        assert_clean(info.value)
        assert "FOREIGN KEY constraint failed" in str(info.value)
        assert (
            SECRET in caplog.text
        )  # the details are in the debug log  # the details are in the debug log
    finally:
        st.close()


def test_a_locked_database(tmp_path: Path) -> None:
    st = Store(str(tmp_path / "f.db"))
    event.listen(st.engine, "connect", lambda conn, _rec: conn.execute("PRAGMA busy_timeout=50"))
    st.engine.dispose()
    blocker = sqlite3.connect(tmp_path / "f.db", isolation_level=None)
    try:
        blocker.execute("BEGIN EXCLUSIVE")
        with pytest.raises(StoreError, match="locked") as info:
            st.open_run(SECRET, {"k": SECRET}, "agg")
        assert_clean(info.value)
    finally:
        blocker.close()
        st.close()


def test_a_removed_database(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    st = Store(str(tmp_path / "d" / "f.db"))
    st.open_run("r", {}, "agg")
    st.engine.dispose()
    shutil.rmtree(tmp_path / "d")
    try:
        with pytest.raises(StoreError) as info:
            st.open_run(SECRET, {}, "agg")
        assert_clean(info.value)
        with pytest.raises(StoreError) as info:
            st.list_runs()
        assert_clean(info.value)
        with pytest.raises(StoreError) as info:
            st.checkpoint()
        assert_clean(info.value)
    finally:
        st.close()


def test_a_database_emptied_behind_the_store(tmp_path: Path) -> None:
    st = Store(str(tmp_path / "f.db"))
    st.engine.dispose()
    for p in tmp_path.glob("f.db*"):
        if p.is_file():
            p.unlink()
    try:
        with pytest.raises(StoreError, match="no such table") as info:
            st.register_agent(SECRET, SECRET, "x")
        assert_clean(info.value)
    finally:
        st.close()


def test_an_unreachable_server_names_no_password(tmp_path: Path) -> None:
    pytest.importorskip("psycopg")
    url = f"postgresql+psycopg://fed:{SECRET}@127.0.0.1:1/fed?connect_timeout=2"
    with pytest.raises(StoreError) as info:
        Store(url, blob_dir=tmp_path / "blobs")
    assert_clean(info.value)
