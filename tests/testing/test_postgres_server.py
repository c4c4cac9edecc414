"""fedstack.testing.postgres: a real throwaway server starts on 127.0.0.1, isolates tests
by database, survives restart and stop/start with its data, and leaves nothing behind."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from fedstack.testing.postgres import PostgresServer, find_bindir, unavailable_reason

psycopg = pytest.importorskip("psycopg")


def _skip_without_postgres() -> None:
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)


def test_bindir_has_the_tools() -> None:
    _skip_without_postgres()
    bindir = find_bindir()
    assert bindir is not None
    assert all((bindir / t).exists() for t in ("initdb", "pg_ctl", "postgres"))


def test_databases_are_isolated(postgres: PostgresServer) -> None:
    a, b = postgres.create_database(), postgres.create_database()
    assert a != b and a.startswith("postgresql+psycopg://fed@127.0.0.1:")
    name_a = a.rsplit("/", 1)[1]
    with psycopg.connect(postgres.conninfo(name_a), autocommit=True) as con:
        con.execute("CREATE TABLE only_here (x int)")
    with psycopg.connect(postgres.conninfo(b.rsplit("/", 1)[1])) as con:
        assert con.execute("SELECT to_regclass('only_here')").fetchone() == (None,)
    with pytest.raises(ValueError):
        postgres.create_database('x"; DROP DATABASE postgres; --')
    postgres.drop_database(name_a)
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(postgres.conninfo(name_a)).close()


def test_restart_stop_start_keep_the_data_and_close_cleans_up() -> None:
    _skip_without_postgres()
    server = PostgresServer()
    root: Path = server.root
    try:
        with psycopg.connect(server.conninfo(), autocommit=True) as con:
            con.execute("CREATE TABLE kept (x int)")
            con.execute("INSERT INTO kept VALUES (7)")
        con = psycopg.connect(server.conninfo(), autocommit=True)
        server.restart()
        with pytest.raises(psycopg.OperationalError):  # the restart cut the connection
            con.execute("SELECT 1")
        con.close()
        server.stop()
        assert not server.running
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(server.conninfo()).close()
        server.start()
        with psycopg.connect(server.conninfo()) as con2:
            assert con2.execute("SELECT x FROM kept").fetchone() == (7,)
        # only on the loopback interface
        with socket.create_connection(("127.0.0.1", server.port), timeout=5):
            pass
    finally:
        server.close()
    assert not root.exists()
    server.close()  # idempotent
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", server.port), timeout=2).close()
