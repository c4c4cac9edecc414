"""A throwaway PostgreSQL server for tests and benchmarks.

:class:`PostgresServer` runs a real PostgreSQL cluster (``initdb`` + ``pg_ctl``) in a
temporary directory, listening on 127.0.0.1 only (TCP on a free port, its Unix socket in
that directory), with ``trust`` authentication for the one user it was initialised with.
Run as root, every PostgreSQL command goes through ``runuser -u postgres --`` (``initdb``
refuses root) and the directory is handed to that user. The server is always stopped and
its directory removed: on :meth:`~PostgresServer.close`, on leaving the ``with`` block, and
at interpreter exit or garbage collection for a server left open.

The binaries are looked up on ``PATH``, then in Debian's ``/usr/lib/postgresql/*/bin``
(the ``postgresql`` package does not put ``initdb`` on ``PATH``), newest version first.
:func:`unavailable_reason` says why no server can be started here (pytest skips on it);
:class:`PostgresUnavailable` is raised when one cannot be.

Example::

    with PostgresServer() as pg:
        url = pg.create_database("test_one")   # a fresh, isolated database
        store = Store(url)
        ...
        pg.restart()                           # pg_ctl restart: connections are cut
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
import weakref
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

from fedstack.testing import free_port

__all__ = ["PostgresServer", "PostgresUnavailable", "find_bindir", "unavailable_reason"]

RUN_AS = "postgres"
"""The system user the cluster runs as when this process is root."""

FAST_SETTINGS: Mapping[str, str] = {
    # a throwaway cluster: durability buys nothing, speed does (2 shared cores)
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "200",
}

NO_INSTALLATION = (
    "no PostgreSQL installation (initdb/pg_ctl neither on PATH nor in /usr/lib/postgresql/*/bin)"
)

_IDENT = re.compile(r"[a-z_][a-z0-9_]{0,62}")


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server can be started here; the message says why."""


def find_bindir() -> Path | None:
    """The directory holding ``initdb``, ``pg_ctl`` and ``postgres``; None if none does.

    ``PATH`` first (a symlink is followed to its real directory), then
    ``/usr/lib/postgresql/<version>/bin``, highest version first.
    """
    candidates: list[Path] = []
    found = shutil.which("pg_ctl")
    if found:
        candidates.append(Path(found).resolve().parent)
        candidates.append(Path(found).parent)
    versions = glob.glob("/usr/lib/postgresql/*/bin")
    candidates += [Path(p) for p in sorted(versions, key=_version_key, reverse=True)]
    for c in candidates:
        if all(os.access(c / tool, os.X_OK) for tool in ("initdb", "pg_ctl", "postgres")):
            return c
    return None


def _version_key(path: str) -> tuple[int, ...]:
    parts = Path(path).parent.name.split(".")
    return tuple(int(p) if p.isdigit() else -1 for p in parts)


def _run_prefix() -> list[str]:
    """The command prefix that runs PostgreSQL's tools as a non-root user, if needed."""
    if os.geteuid() != 0:
        return []
    runuser = shutil.which("runuser")
    if runuser is None:
        raise PostgresUnavailable("running as root without runuser (initdb refuses root)")
    try:
        import pwd

        pwd.getpwnam(RUN_AS)
    except KeyError:
        raise PostgresUnavailable(
            f"running as root and there is no {RUN_AS!r} user (initdb refuses root)"
        ) from None
    return [runuser, "-u", RUN_AS, "--"]


def unavailable_reason() -> str | None:
    """Why no server can be started here (no binaries, root without runuser, no psycopg);
    None if one can be (it may still fail to start: :class:`PostgresUnavailable`)."""
    if find_bindir() is None:
        return NO_INSTALLATION
    try:
        _run_prefix()
    except PostgresUnavailable as exc:
        return str(exc)
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg (PostgreSQL driver) is not installed"
    return None


class PostgresServer:
    """A PostgreSQL cluster in a temporary directory on 127.0.0.1 (see the module docstring).

    The server starts in the constructor (``start=False`` to start it later with
    :meth:`start`). :meth:`stop` and :meth:`start` keep the data; :meth:`close` removes it.
    Not thread-safe: one test (or benchmark) drives it.

    Raises:
        PostgresUnavailable: the binaries are missing, ``initdb`` failed or the server
            did not start (the message carries the tail of its log).
    """

    def __init__(
        self,
        *,
        user: str = "fed",
        database: str = "postgres",
        port: int | None = None,
        settings: Mapping[str, str] | None = None,
        start: bool = True,
        timeout: float = 60.0,
    ) -> None:
        """``user``: the superuser (trust authentication, no password); ``database``: the
        one :attr:`url` names (``postgres`` exists from the start); ``settings``: server
        settings on top of :data:`FAST_SETTINGS`; ``timeout``: per ``pg_ctl`` command."""
        if not _IDENT.fullmatch(user):
            raise ValueError(f"unsupported user name {user!r}")
        bindir = find_bindir()
        if bindir is None:
            raise PostgresUnavailable(NO_INSTALLATION)
        self.bindir = bindir
        self.user = user
        self.database = database
        self.port = port or free_port()
        self.timeout = timeout
        self.settings = {**FAST_SETTINGS, **(settings or {})}
        self._prefix = _run_prefix()
        self._databases = 0
        self._lock = threading.Lock()
        self.running = False
        # not under pytest's tmp_path: its parents are private to this user
        self.root = Path(tempfile.mkdtemp(prefix="fedstack-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self._finalizer = weakref.finalize(
            self, _cleanup, self._prefix, bindir, self.data, self.root
        )
        try:
            if self._prefix:
                shutil.chown(self.root, RUN_AS)
            done = self._run(
                "initdb", "-D", str(self.data), "-A", "trust", "-U", user, "-E", "UTF8"
            )
            if done.returncode != 0:
                raise PostgresUnavailable(f"initdb failed: {_tail(done.stdout)}")
            if start:
                self.start()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ addresses
    @property
    def url(self) -> str:
        """``postgresql+psycopg://USER@127.0.0.1:PORT/DB`` of :attr:`database`."""
        return self.url_for(self.database)

    def url_for(self, database: str) -> str:
        """The SQLAlchemy URL of ``database`` on this server."""
        return f"postgresql+psycopg://{self.user}@127.0.0.1:{self.port}/{database}"

    def conninfo(self, database: str | None = None) -> str:
        """A libpq connection string (for ``psycopg.connect``)."""
        db = database or self.database
        return f"host=127.0.0.1 port={self.port} user={self.user} dbname={db} connect_timeout=10"

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the server (after construction with ``start=False`` or a :meth:`stop`);
        returns once it accepts connections."""
        done = self._pg_ctl("start")
        if done.returncode != 0:
            raise PostgresUnavailable(f"PostgreSQL did not start: {self._log_tail()}")
        self.running = True

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``pg_ctl stop -m mode``: "smart", "fast" or "immediate"); the
        data stays: :meth:`start` brings it back on the same port. Every connection is cut."""
        if mode not in ("smart", "fast", "immediate"):
            raise ValueError(f"unknown shutdown mode {mode!r}")
        done = self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")
        if done.returncode != 0 and self._is_running():
            raise RuntimeError(f"pg_ctl stop failed: {_tail(done.stdout)}")
        self.running = False

    def restart(self, mode: str = "fast") -> None:
        """``pg_ctl restart``: every connection is cut; returns once the server accepts
        connections again (same port, same data)."""
        if mode not in ("smart", "fast", "immediate"):
            raise ValueError(f"unknown shutdown mode {mode!r}")
        done = self._pg_ctl("restart", "-m", mode)
        if done.returncode != 0:
            raise RuntimeError(f"pg_ctl restart failed: {self._log_tail()}")
        self.running = True

    def close(self) -> None:
        """Stop the server (if running) and remove its directory. Idempotent."""
        self.running = False
        self._finalizer()

    def __enter__(self) -> PostgresServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ------------------------------------------------------------------ databases
    def create_database(self, name: str | None = None) -> str:
        """Create an empty database (``name``: lower-case letters, digits and ``_``;
        None: a new unique name) and return its URL: tests sharing one server get
        isolation from a database each.

        Raises:
            ValueError: ``name`` is not a plain identifier.
            psycopg.Error: the server refused (e.g. the database exists).
        """
        import psycopg

        with self._lock:
            self._databases += 1
            n = self._databases
        if name is None:
            name = f"db_{os.getpid()}_{n}"
        if not _IDENT.fullmatch(name):
            raise ValueError(f"unsupported database name {name!r}")
        with psycopg.connect(self.conninfo("postgres"), autocommit=True) as con:
            con.execute(f'CREATE DATABASE "{name}"')  # a checked identifier
        return self.url_for(name)

    def drop_database(self, name: str) -> None:
        """Drop ``name`` (closing its connections first)."""
        import psycopg

        if not _IDENT.fullmatch(name):
            raise ValueError(f"unsupported database name {name!r}")
        with psycopg.connect(self.conninfo("postgres"), autocommit=True) as con:
            con.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    # ------------------------------------------------------------------ helpers
    def _pg_ctl(self, command: str, *extra: str) -> subprocess.CompletedProcess[str]:
        options = " ".join(
            [
                f"-p {self.port}",
                f"-k {self.root}",
                "-c listen_addresses=127.0.0.1",
                *(f"-c {k}={v}" for k, v in self.settings.items()),
            ]
        )
        return self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-l",
            str(self.log),
            "-w",
            "-t",
            str(int(self.timeout)),
            "-o",
            options,
            *extra,
            command,
        )

    def _run(self, tool: str, *args: str) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(
                [*self._prefix, str(self.bindir / tool), *args],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=self.timeout + 30,
                cwd=self.root,
            )
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(f"{tool} did not finish in {self.timeout + 30:.0f} s") from exc

    def _is_running(self) -> bool:
        return self._run("pg_ctl", "-D", str(self.data), "status").returncode == 0

    def _log_tail(self) -> str:
        try:
            return _tail(self.log.read_text(errors="replace"))
        except OSError:
            return "(no server log)"


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _cleanup(prefix: list[str], bindir: Path, data: Path, root: Path) -> None:
    """Stop the server if it runs and remove its directory (a finalizer: no ``self``)."""
    if (data / "postmaster.pid").exists():
        try:
            subprocess.run(
                [*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                capture_output=True,
                timeout=60,
                cwd=root,
            )
        except (OSError, subprocess.TimeoutExpired):
            pass
    for _ in range(50):  # the server's last processes may still be exiting
        shutil.rmtree(root, ignore_errors=True)
        if not root.exists():
            break
        time.sleep(0.1)
