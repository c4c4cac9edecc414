"""`fedstack db VIEW` and `fedstack credentials list` only read; `fedstack db upgrade` migrates.

The views and ``credentials list`` open the store read-only: a mistyped path, another
application's SQLite file, an empty file, a file that is not SQLite and a store of another
schema revision are refused (exit 2, one clear line, no traceback) and left exactly as they
were; a store on read-only media is read. ``credentials add``/``revoke`` write, but refuse
to turn another application's file into a store.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from fedstack.cli import db as db_cli
from fedstack.cli.main import main as cli_main
from fedstack.store import Store, migrations

VIEWS = [
    "runs",
    "agents",
    "aggregators",
    "events",
    "models",
    "rounds",
    "lineage",
    "metrics",
    "plot",
    "export",
]
READERS = [["db", v] for v in VIEWS] + [["credentials", "list"]]
WRITERS = [["credentials", "add", "alice"], ["credentials", "revoke", "alice"]]


def _argv(cmd: list[str], db: Path, tmp: Path) -> list[str]:
    extra = ["--out", str(tmp / "plot.png")] if cmd[-1] == "plot" else []
    if cmd[-1] == "export":  # a run to TensorBoard: nothing is written before the store opens
        extra = ["--to", "tensorboard", "--uri", str(tmp / "tb")]
    return [*cmd, "--db", str(db), *extra]


def _fingerprint(path: Path) -> tuple[str, str, list[str]]:
    """The file's bytes (hash), journal mode and tables, read without changing them."""
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        mode = con.execute("PRAGMA journal_mode").fetchone()[0]
        tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master ORDER BY name")]
    finally:
        con.close()
    return digest, mode, tables


def _foreign_db(path: Path) -> Path:
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)")
    con.execute("INSERT INTO notes (body) VALUES ('keep me')")
    con.commit()
    con.close()
    return path


def _refused(argv: list[str], capsys: pytest.CaptureFixture[str], *needles: str) -> str:
    rc = cli_main(argv)  # an uncaught exception (a traceback) fails the test here
    out, err = capsys.readouterr()
    assert rc == 2, (rc, out, err)
    assert err.startswith("fedstack: error: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


def test_every_view_is_covered() -> None:
    names = {c.name for c in db_cli.app.registered_commands}
    assert names == {*VIEWS, "upgrade"}


@pytest.mark.parametrize("cmd", READERS, ids=" ".join)
def test_a_mistyped_path_is_refused_and_nothing_is_created(
    cmd: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "typo" / "fedstak.db"
    _refused(_argv(cmd, db, tmp_path), capsys, "no fedstack store at", str(db))
    assert not db.exists() and not db.parent.exists()
    assert not (tmp_path / "plot.png").exists()


@pytest.mark.parametrize("cmd", READERS + WRITERS + [["db", "upgrade"]], ids=" ".join)
def test_another_applications_sqlite_file_is_refused_and_left_unchanged(
    cmd: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = _foreign_db(tmp_path / "notes.db")
    before = _fingerprint(db)
    assert before[1] == "delete"
    _refused(_argv(cmd, db, tmp_path), capsys, "not a fedstack store")
    assert _fingerprint(db) == before  # bytes, journal mode (not WAL) and tables
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.db"]  # no -wal, no .blobs


@pytest.mark.parametrize("cmd", READERS, ids=" ".join)
def test_an_empty_file_is_refused_and_stays_empty(
    cmd: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "empty.db"
    db.touch()
    _refused(_argv(cmd, db, tmp_path), capsys, "not a fedstack store")
    assert db.stat().st_size == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.db"]


@pytest.mark.parametrize("cmd", [*READERS, WRITERS[0]], ids=" ".join)
def test_a_file_that_is_not_sqlite_is_refused_by_name(
    cmd: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "notes.txt"
    db.write_bytes(b"not a database, just notes\n" * 10)
    _refused(_argv(cmd, db, tmp_path), capsys, "file is not a database")
    assert db.read_bytes() == b"not a database, just notes\n" * 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def _store_at(db: Path, revision: str | None = None) -> None:
    st = Store(str(db))
    st.open_run("r1", {}, "agg")
    st.issue_credential("alice")
    if revision is not None:
        with st.engine.begin() as c:
            c.exec_driver_sql("UPDATE alembic_version SET version_num = ?", (revision,))
    st.close()  # the last connection: SQLite folds the WAL back into the file


@pytest.mark.parametrize("cmd", READERS, ids=" ".join)
def test_a_store_of_another_schema_revision_is_not_migrated(
    cmd: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "old.db"
    _store_at(db, revision="0000")  # as if written by another fedstack version
    before = _fingerprint(db)
    _refused(_argv(cmd, db, tmp_path), capsys, "schema 0000", "fedstack db upgrade")
    assert _fingerprint(db) == before


def test_upgrade_reports_what_it_did_and_refuses_an_unknown_revision(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "new" / "f.db"
    assert cli_main(["db", "upgrade", "--db", str(db), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report == {
        "db": str(db),
        "created": True,
        "from": None,
        "to": migrations.HEAD,
        "changed": True,
    }
    assert db.is_file()
    assert cli_main(["db", "upgrade", "--db", str(db)]) == 0
    assert f"is up to date (schema {migrations.HEAD})" in capsys.readouterr().out

    empty = tmp_path / "empty.db"  # an existing file without schema is migrated explicitly
    empty.touch()
    assert cli_main(["db", "upgrade", "--db", str(empty), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["created"], report["from"], report["to"]) == (False, None, migrations.HEAD)
    assert cli_main(["credentials", "list", "--db", str(empty), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []

    old = tmp_path / "old.db"
    _store_at(old, revision="0000")
    _refused(["db", "upgrade", "--db", str(old)], capsys, "cannot migrate the schema", "0000")


def test_views_read_a_store_without_writing_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "f.db"
    assert cli_main(["db", "upgrade", "--db", str(db)]) == 0
    assert cli_main(["-q", "credentials", "add", "alice", "--db", str(db)]) == 0
    capsys.readouterr()
    before = _fingerprint(db)
    assert before[1] == "wal"
    assert cli_main(["credentials", "list", "--db", str(db), "--json"]) == 0
    assert [r["name"] for r in json.loads(capsys.readouterr().out)] == ["alice"]
    assert cli_main(["db", "agents", "--db", str(db), "--json"]) == 0
    assert [r["name"] for r in json.loads(capsys.readouterr().out)] == ["alice"]
    assert _fingerprint(db) == before


# ------------------------------------------------------------------ read-only media
def _readonly_runner(directory: Path) -> list[str] | None:
    """A command prefix that runs its command with ``directory`` mounted read-only (a
    private mount namespace: works as root, where chmod would not stop a write), or None."""
    unshare = shutil.which("unshare")
    if unshare is None or sys.platform != "linux":
        return None
    d = str(directory)
    script = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"'
    prefix = [unshare, "-rm", "sh", "-c", script, d]
    try:
        probe = subprocess.run(
            [*prefix, "sh", "-c", f'! touch "{d}/probe"'], capture_output=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return prefix if probe.returncode == 0 and not (directory / "probe").exists() else None


def _run(prefix: list[str], *argv: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    return subprocess.run(
        [*prefix, sys.executable, "-m", "fedstack", *argv],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def test_a_store_on_read_only_media_is_read_and_writes_are_refused_clearly(
    tmp_path: Path,
) -> None:
    media = tmp_path / "media"
    media.mkdir()
    db = media / "f.db"
    _store_at(db)
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    prefix = _readonly_runner(media)
    if prefix is None:
        if os.geteuid() == 0:
            pytest.skip("needs unshare(1) with mount namespaces: root ignores chmod")
        media.chmod(0o555)
        db.chmod(0o444)
        prefix = []
    # as on a snapshot: no WAL index (-shm) to share, which SQLite needs to read a WAL
    # database unless the file is opened immutable
    assert sorted(p.name for p in media.iterdir()) == ["f.db", "f.db.blobs"]
    try:
        runs = _run(prefix, "db", "runs", "--db", str(db), "--json")
        assert runs.returncode == 0, runs.stderr
        assert [r["name"] for r in json.loads(runs.stdout)] == ["r1"]
        creds = _run(prefix, "credentials", "list", "--db", str(db), "--json")
        assert creds.returncode == 0, creds.stderr
        assert [r["name"] for r in json.loads(creds.stdout)] == ["alice"]
        for argv in (["credentials", "add", "bob"], ["db", "upgrade"]):
            out = _run(prefix, *argv, "--db", str(db))
            assert out.returncode == 2, out
            assert "cannot be written" in out.stderr and "Traceback" not in out.stderr
    finally:
        media.chmod(0o755)
        db.chmod(0o644)
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before


def test_a_path_with_url_characters_is_the_file_used(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "a%20b?#" / "s.db"  # in URL text: "a b", then a query and a fragment
    db.parent.mkdir()
    assert cli_main(["-q", "db", "upgrade", "--db", str(db)]) == 0
    assert cli_main(["-q", "credentials", "add", "alice", "--db", str(db)]) == 0
    capsys.readouterr()
    assert cli_main(["credentials", "list", "--db", str(db), "--json"]) == 0
    assert [r["name"] for r in json.loads(capsys.readouterr().out)] == ["alice"]
    assert db.is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["a%20b?#"]
