"""The store's database connection: URLs, SQLite settings and error translation.

:class:`Txn` is the one way the store opens a transaction: it turns every SQLAlchemy error
into :class:`~fedstack.errors.StoreError` (:class:`~fedstack.errors.StoreConflict` for a
constraint violation) whose message names the kind of failure, never the SQL text, its
parameters or a database password; the details go to the ``fedstack.store`` debug log.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

from sqlalchemy import Engine, make_url
from sqlalchemy.exc import DatabaseError, IntegrityError, OperationalError, SQLAlchemyError

from fedstack.errors import StoreConflict, StoreError, StoreUnavailable

log = logging.getLogger("fedstack.store")


def redacted(url: str) -> str:
    """``url`` without its password, for messages and logs."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (SQLAlchemyError, ValueError):
        return "<unparsable database URL>"


def resolve_url(path_or_url: str) -> tuple[str, Path | None]:
    """A database argument -> (SQLAlchemy URL, SQLite file path or None)."""
    if "://" in path_or_url:
        if path_or_url.startswith("sqlite:///") and path_or_url != "sqlite:///:memory:":
            return path_or_url, Path(path_or_url[len("sqlite:///") :])
        return path_or_url, None
    path = Path(path_or_url).expanduser().resolve()
    return f"sqlite:///{path}", path


def sqlite_readonly_uri(path: Path) -> str:
    """An SQLite URI (for ``sqlite3.connect(..., uri=True)``) opening ``path`` read-only.

    ``mode=ro``: SQLite never creates, writes or changes the journal mode of the file.
    On read-only media (its directory cannot be written) without a ``-shm`` file, also
    ``immutable=1``: SQLite cannot read a WAL database there otherwise, and nothing there
    can change the file while it is read.
    """
    uri = f"file:{quote(str(path))}?mode=ro"
    if not os.access(path.parent, os.W_OK) and not Path(f"{path}-shm").exists():
        uri += "&immutable=1"
    return uri


def sqlite_foreign(path: Path, meta_table: str) -> str | None:
    """Why the SQLite file ``path`` must not be made a fedstack store, or None.

    None: it does not exist, has no table yet (an empty file) or has the table
    ``meta_table`` (a fedstack store, of any schema revision). Otherwise the reason: it is
    not an SQLite database, or it holds another application's tables. Read through
    :func:`sqlite_readonly_uri`: nothing is written.
    """
    if not path.exists():
        return None
    try:
        con = sqlite3.connect(sqlite_readonly_uri(path), uri=True)
        try:
            tables = {
                str(name)
                for (name,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
                if not str(name).startswith("sqlite_")
            }
        finally:
            con.close()
    except sqlite3.Error as exc:
        log.debug("cannot read %s as SQLite", path, exc_info=True)
        return f"cannot be read as an SQLite database ({str(exc)[:120] or type(exc).__name__})"
    if not tables or meta_table in tables:
        return None
    shown = ", ".join(sorted(tables)[:5]) + (", ..." if len(tables) > 5 else "")
    return f"holds another application's tables ({shown})"


@contextmanager
def sqlite_setup_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock (``flock``) on the directory of the SQLite file
    ``path``: one process at a time checks and migrates a store there, so a second
    aggregator starting on a new file waits for the first one's schema instead of seeing
    half of it. Never on the database file itself: closing any descriptor of that file
    drops every POSIX lock SQLite holds on it in this process (which corrupts a WAL
    database that other processes use)."""
    try:
        fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise StoreError(f"cannot open {path.parent}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


class Txn:
    """``engine.begin()`` whose database errors leave as :class:`StoreError` (see the
    module docstring)."""

    def __init__(self, engine: Engine) -> None:
        self._cm = engine.begin()

    def __enter__(self) -> Any:
        try:
            return self._cm.__enter__()
        except SQLAlchemyError as exc:
            raise store_error("database unavailable", exc) from None

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any
    ) -> Literal[False]:
        try:
            self._cm.__exit__(exc_type, exc, tb)
        except SQLAlchemyError as e:
            if e is exc:  # raised in the block, re-raised after the rollback
                raise store_error("database operation failed", e) from None
            raise store_error("database write failed", e) from None
        if isinstance(exc, SQLAlchemyError):
            raise store_error("database operation failed", exc) from None
        return False


def store_error(what: str, exc: SQLAlchemyError) -> StoreError:
    """A :class:`StoreError` for ``exc`` naming its kind, never its SQL or parameters."""
    log.debug("%s", what, exc_info=exc)
    orig = getattr(exc, "orig", None)
    reason = type(orig if orig is not None else exc).__name__
    if isinstance(exc, DatabaseError) and type(orig).__module__ == "sqlite3":
        # SQLite's own reasons ("database is locked", "disk I/O error", "no such table:
        # runs", "UNIQUE constraint failed: agents.name", "file is not a database") carry
        # no SQL text or parameters
        reason = str(orig).splitlines()[0][:120] if str(orig) else reason
    if isinstance(exc, IntegrityError):
        return StoreConflict(f"{what}: the write conflicts with stored data ({reason})")
    if getattr(exc, "connection_invalidated", False) or (
        isinstance(exc, OperationalError) and type(orig).__module__.split(".")[0] != "sqlite3"
    ):  # a database server gone or going away (SQLite's operational errors are other)
        return StoreUnavailable(f"{what} ({reason})")
    return StoreError(f"{what} ({reason})")


AUTO_CHECKPOINT_PAGES = 10_000


def sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    # Checkpoints (WAL -> database file) run in the background after every round
    # (Store.checkpoint); the automatic one, inside whichever commit crossed 1,000 pages
    # (a ~7 ms stall every few rounds on the upload path), stays only as a safety net.
    cur.execute(f"PRAGMA wal_autocheckpoint={AUTO_CHECKPOINT_PAGES}")
    cur.close()


def sqlite_pragmas_readonly(dbapi_conn: Any, _record: Any) -> None:
    """Inspection: no journal-mode switch (it writes the file header), no writes at all."""
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA query_only=ON")
    cur.close()


def sqlite_pragmas_fast(dbapi_conn: Any, _record: Any) -> None:
    sqlite_pragmas(dbapi_conn, _record)
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def postgres_readonly(dbapi_conn: Any, _record: Any) -> None:
    """Inspection on PostgreSQL: every transaction of the connection is read-only."""
    cur = dbapi_conn.cursor()
    cur.execute("SET default_transaction_read_only = on")
    cur.close()
    dbapi_conn.commit()


# ---------------------------------------------------------------------- PostgreSQL
MAX_DATABASE_BLOB_BYTES = (1 << 30) - (1 << 16)
"""The largest blob the store keeps in PostgreSQL (1 GiB - 64 KiB): one ``bytea`` value
holds at most 1 GB, and the server allocates a value and its protocol message whole.
Larger blobs are refused with :class:`StoreError` unless the store has a blob directory."""

CONNECT_TIMEOUT = 5
"""Seconds a new PostgreSQL connection may take (libpq ``connect_timeout``) unless the URL
says otherwise: while the server is down, calls fail within this bound instead of hanging."""

KEEPALIVES = {
    # a connection to a server that vanished (host down, network cut) is detected within
    # about 25 s instead of the system's default two hours; a transfer the server stops
    # acknowledging fails after tcp_user_timeout
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 60_000,
}


def is_postgresql(url: str) -> bool:
    """True if the SQLAlchemy URL ``url`` names a PostgreSQL database (any driver)."""
    try:
        return make_url(url).get_backend_name() == "postgresql"
    except (SQLAlchemyError, ValueError):
        return False


def engine_options(url: str) -> dict[str, Any]:
    """``create_engine`` keyword arguments for ``url``: for PostgreSQL, ``pool_pre_ping``
    (a pooled connection the server dropped, e.g. across a restart, is replaced before use:
    the store recovers by itself once the server is back), a connect timeout and TCP
    keepalives (each unless the URL's query sets it). Nothing for other databases."""
    if not is_postgresql(url):
        return {}
    parsed = make_url(url)
    driver = parsed.get_driver_name()
    if driver not in ("psycopg", "psycopg2"):  # libpq's keywords mean nothing to others
        return {"pool_pre_ping": True}
    wanted: dict[str, Any] = {"connect_timeout": CONNECT_TIMEOUT, **KEEPALIVES}
    if driver != "psycopg" or _libpq_version() < 120000:
        del wanted["tcp_user_timeout"]  # libpq 12 and later only
    args = {k: v for k, v in wanted.items() if k not in set(parsed.query)}
    return {"pool_pre_ping": True, "connect_args": args}


def _libpq_version() -> int:
    """The version of the libpq psycopg runs on (e.g. 160002); 0 if unknown."""
    try:
        import psycopg

        return int(psycopg.pq.version())
    except Exception:  # no psycopg, or a libpq it cannot query: assume the oldest
        return 0


def read_blob_postgres(c: Any, digest: str) -> bytes | None:
    """The bytes of blob ``digest`` from table ``blob_data`` on PostgreSQL (None: no such
    row), fetched in binary format inside ``c``'s transaction (a SQLAlchemy connection
    with the psycopg driver): the text format would double them as hex, which the server
    cannot build for a value over 512 MB.

    Raises:
        StoreError: the database failed (its text stays in the debug log).
    """
    raw = c.connection.driver_connection
    if not hasattr(raw, "cursor") or raw.__class__.__module__.split(".")[0] != "psycopg":
        from sqlalchemy import text

        row = c.execute(text("SELECT data FROM blob_data WHERE digest = :d"), {"d": digest}).first()
        return None if row is None else bytes(row[0])
    import psycopg

    try:
        with raw.cursor(binary=True) as cur:
            cur.execute("SELECT data FROM blob_data WHERE digest = %s", (digest,))
            row = cur.fetchone()
    except psycopg.Error as exc:
        # a connection the server dropped is replaced by the pool's pre-ping at next use
        log.debug("cannot read blob %s", digest[:12], exc_info=True)
        kind = StoreUnavailable if isinstance(exc, psycopg.OperationalError) else StoreError
        raise kind(f"database operation failed ({type(exc).__name__})") from None
    return None if row is None else bytes(row[0])
