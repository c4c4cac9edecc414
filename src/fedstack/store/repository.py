"""The store's API: runs, agents, models, lineage, rounds and events over SQLAlchemy.

SQLite (a file) is the default; any SQLAlchemy URL works (PostgreSQL for several
aggregators). Metadata lives in tables. Tensors (blobs, content-addressed by their BLAKE3
digest and checked on every read) live in a :class:`BlobStore` directory beside an SQLite
file (``<db>.blobs/``; small ones in the database, see ``inline_blob_bytes``); on
PostgreSQL without ``blob_dir``, ALL of them live in the database (table ``blob_data``),
so every aggregator host reaches them through the database alone (at most
:data:`~fedstack.store.database.MAX_DATABASE_BLOB_BYTES`, about 1 GiB, per blob); with
``blob_dir`` (a directory every aggregator shares), as for SQLite. Other URLs need
``blob_dir``. Every method that writes runs in one transaction and returns only after it
committed: the aggregator calls them before it acknowledges anything. Every database error leaves as
:class:`~fedstack.errors.StoreError` without SQL text or parameters.

The schema is brought up to date through Alembic (:mod:`fedstack.store.migrations`) when
a store opens, unless it is opened for inspection (:meth:`Store.open_readonly`). The
credential rules live in :mod:`fedstack.security.credentials`; this module keeps their SQL.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import sqlite3
import time
import uuid
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import (
    URL,
    Engine,
    bindparam,
    create_engine,
    delete,
    event,
    false,
    func,
    insert,
    pool,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import SQLAlchemyError

from fedstack.errors import (
    CorruptBlob,
    CredentialRefused,
    DatabaseReplaced,
    StoreConflict,
    StoreError,
    TensorFileError,
)
from fedstack.files import atomic_write
from fedstack.security.credentials import (
    AUTH_MODES,
    MIN_ENROLLED_TOKEN_CHARS,
    ROLES,
    Operator,
    Registration,
    fingerprint,
)
from fedstack.store import migrations
from fedstack.store import schema as s
from fedstack.store.blobs import (
    BlobStore,
    decode_weights,
    digest_matches,
    digest_of,
    encode_weights,
)
from fedstack.store.credentials import Credentials
from fedstack.store.database import (
    MAX_DATABASE_BLOB_BYTES,
    Txn,
    engine_options,
    is_postgresql,
    postgres_readonly,
    read_blob_postgres,
    redacted,
    resolve_url,
    sqlite_foreign,
    sqlite_pragmas,
    sqlite_pragmas_fast,
    sqlite_pragmas_readonly,
    sqlite_readonly_uri,
    sqlite_setup_lock,
    store_error,
)
from fedstack.store.federation import Federation
from fedstack.store.queries import Queries
from fedstack.store.records import UploadRecord, split_state
from fedstack.store.records import upload_record as _upload
from fedstack.types import Metrics, Weights
from fedstack.wire.tensors import structure as structure_of

log = logging.getLogger("fedstack.store")

__all__ = [
    "AUTH_MODES",
    "MIN_ENROLLED_TOKEN_CHARS",
    "ROLES",
    "CredentialRefused",
    "Operator",
    "Registration",
    "ResumeState",
    "RunInfo",
    "Store",
    "UploadRecord",
    "fingerprint",
    "resolve_url",
    "split_state",
]

# The statements of the hot paths (every upload, every round), built once: SQLAlchemy
# then reuses their compiled form and cache keys instead of rebuilding them per call.
_FIND_UPLOAD = select(s.models).where(s.models.c.upload_id == bindparam("upload_id"))
_BLOB_DATA = select(s.blob_data.c.data).where(s.blob_data.c.digest == bindparam("d"))
_INSERT_BLOB = insert(s.blob_data)
_UPSERT = sqlite_insert(s.blob_data)
_INSERT_BLOB_OR_REPAIR = _UPSERT.on_conflict_do_update(
    index_elements=[s.blob_data.c.digest],
    set_={"size": _UPSERT.excluded.size, "data": _UPSERT.excluded.data},
    where=s.blob_data.c.data != _UPSERT.excluded.data,
)
"""Content-addressed: the same bytes once; a stored copy that differs from them (damaged or
tampered: the digest names the content) is repaired by storing the content again."""
_PG_INSERT_BLOB = (
    postgresql_insert(s.blob_data)
    .on_conflict_do_nothing(index_elements=[s.blob_data.c.digest])
    .returning(s.blob_data.c.digest)
)
"""PostgreSQL: the same bytes once, whoever stores them first (two aggregators storing the
same content at once do not conflict); no row returned: a copy was there (compared)."""
_REPAIR_BLOB = (
    update(s.blob_data)
    .where(s.blob_data.c.digest == bindparam("d"))
    .values(size=bindparam("b_size"), data=bindparam("b_data"))
)
_INSERT_MODEL = insert(s.models)
_INSERT_LINEAGE = insert(s.lineage)
_INSERT_ROUND = insert(s.rounds)
_INSERT_EVENT = insert(s.events)
_RUN_VERSION = select(s.runs.c.version).where(s.runs.c.id == bindparam("run_id"))
_SET_RUN_VERSION = (
    update(s.runs).where(s.runs.c.id == bindparam("b_run")).values(version=bindparam("b_version"))
)
_MARK_AGGREGATED = (
    update(s.models)
    .where(s.models.c.id.in_(bindparam("b_ids", expanding=True)))
    .values(status="aggregated")
)
_ROUND_METRICS = select(s.rounds.c.metrics, s.rounds.c.model_id).where(
    s.rounds.c.run_id == bindparam("b_run"), s.rounds.c.round == bindparam("b_round")
)
_SET_ROUND_METRICS = (
    update(s.rounds)
    .where(s.rounds.c.run_id == bindparam("b_run"), s.rounds.c.round == bindparam("b_round"))
    .values(metrics=bindparam("b_metrics"))
)
_SET_MODEL_METRICS = (
    update(s.models)
    .where(s.models.c.id == bindparam("b_model"))
    .values(metrics=bindparam("b_metrics"))
)
_SET_STATUS = (
    update(s.models)
    .where(s.models.c.id == bindparam("b_model"))
    .values(status=bindparam("b_status"))
)
_QUARANTINE_INFO = select(s.models.c.producer, s.models.c.upload_id).where(
    s.models.c.id == bindparam("model_id")
)
_LOCK_RUNS = update(s.runs).where(false()).values(status=s.runs.c.status)
"""Touches nothing, but takes SQLite's write lock: what follows reads current data."""
_PG_LOCK_NAME = select(func.pg_advisory_xact_lock(bindparam("b_key")))
_MODEL_BLOB = select(s.models.c.blob).where(s.models.c.id == bindparam("model_id"))
_MODEL_EXTRA = select(s.models.c.extra_blob).where(s.models.c.id == bindparam("model_id"))


def new_id() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True, slots=True)
class RunInfo:
    id: str
    name: str
    status: str
    version: int
    structure: list[tuple[str, str, tuple[int, ...]]] | None
    init_weights: bool | None
    aggregator_id: str
    config: dict[str, Any]
    resumed: bool


@dataclass(frozen=True, slots=True)
class ResumeState:
    version: int
    global_model_id: str | None
    buffered: list[UploadRecord]
    strategy_state: dict[str, Any] | None  # None: no round committed yet
    global_extra: Weights


class Store(Credentials, Queries, Federation):
    """One deployment's persistent store (one database for every start of the aggregator)."""

    _file_id: tuple[int, int] | None = None  # the SQLite file opened (see check_database)

    def __init__(
        self,
        db: str,
        blob_dir: str | Path | None = None,
        *,
        durable: bool = True,
        inline_blob_bytes: int = 0,
        migrate: bool = True,
        readonly: bool = False,
    ) -> None:
        """Open (or create) the store.

        ``blob_dir``: where tensor blobs are files. Default: ``<db>.blobs`` beside an SQLite
        file; on PostgreSQL, None keeps EVERY blob in the database (reachable from every
        aggregator host; at most :data:`~fedstack.store.database.MAX_DATABASE_BLOB_BYTES`
        each), while a directory every aggregator shares keeps those over
        ``inline_blob_bytes`` in files there. Required for other URLs.
        ``durable=False`` (the simulator's default) skips the fsyncs: SQLite runs with
        ``synchronous=NORMAL`` and blobs are not synced, so a power cut may lose the last
        commits (never corrupt the database). Deployments keep the default.
        ``inline_blob_bytes``: see the attribute. ``migrate``: bring the schema to this
        fedstack's version (Alembic) and create the database if needed; an existing SQLite
        file that is not a fedstack store (another application's tables, not SQLite) is
        refused, never converted. With False, the database must already be a fedstack
        store at that version. ``readonly``: see :meth:`open_readonly`.

        Raises:
            StoreError: the database cannot be opened, is not a fedstack store (an SQLite
                file; any database without ``migrate``) or its schema cannot be brought up
                to date.
        """
        self.durable = durable
        self.readonly = readonly
        self.inline_blob_bytes = inline_blob_bytes
        """Blobs up to this size go into the database (table ``blob_data``), in the same
        transaction as the row that names them: no file, no extra fsync. 0: all files."""
        self.url, self.path = resolve_url(db)
        # a plain path goes to SQLite as it is: in URL text, "?", "#" and "%" would be parsed
        engine_url: str | URL = (
            URL.create("sqlite", database=str(self.path)) if "://" not in db else self.url
        )
        db = redacted(self.url) if self.path is None else str(self.path)  # for messages
        if blob_dir is None and self.path is not None:
            blob_dir = self.path.with_name(self.path.name + ".blobs")
        elif blob_dir is None and not is_postgresql(self.url):
            raise StoreError(
                f"{db}: give blob_dir (a directory every aggregator can reach) "
                "when the database is neither an SQLite file nor PostgreSQL"
            )
        self.schema_from: str | None = None
        """The schema revision the database had when this store opened it (None: no
        fedstack schema yet); after a migration the database is at ``migrations.HEAD``."""
        with ExitStack() as setup:
            if self.path is not None:
                if not migrate and not self.path.is_file():
                    raise StoreError(f"no fedstack store at {self.path} (no such file)")
                if (
                    migrate
                    and self.path.exists()
                    and not (os.access(self.path, os.W_OK) and os.access(self.path.parent, os.W_OK))
                ):
                    raise StoreError(
                        f"{self.path} cannot be written (read-only file system or no "
                        "permission); open it read-only to inspect it"
                    )
                if not readonly:
                    try:
                        self.path.parent.mkdir(parents=True, exist_ok=True)
                    except OSError as exc:
                        raise StoreError(
                            f"cannot create {self.path.parent}: {exc.strerror}"
                        ) from exc
                if migrate:
                    # several aggregators starting on one new file: one checks and migrates
                    # while the others wait, so none sees a schema half made (alembic_version
                    # without the store's tables) and takes it for another application's file
                    setup.enter_context(sqlite_setup_lock(self.path))
                    reason = sqlite_foreign(self.path, s.meta.name)
                    if reason is not None:
                        raise StoreError(
                            f"{self.path} is not a fedstack store: it {reason}; "
                            "refusing to convert it (give the path of a fedstack "
                            "store or of a new file)"
                        )
            self._files = (
                None
                if blob_dir is None
                else BlobStore(blob_dir, fsync=durable, create=not readonly)
            )
            """The blob directory; None: every blob lives in the database (PostgreSQL)."""
            try:
                if readonly and self.path is not None:  # mode=ro: SQLite itself writes nothing
                    uri = sqlite_readonly_uri(self.path)
                    self.engine: Engine = create_engine(
                        "sqlite://",
                        poolclass=pool.QueuePool,
                        creator=lambda: sqlite3.connect(uri, uri=True, check_same_thread=False),
                    )
                else:
                    self.engine = create_engine(engine_url, future=True, **engine_options(self.url))
            except (SQLAlchemyError, ImportError) as exc:
                log.debug("cannot create the engine for %s", db, exc_info=True)
                raise StoreError(f"cannot open database {db!r} ({type(exc).__name__})") from None
            self._sqlite = self.engine.dialect.name == "sqlite"
            self._postgres = self.engine.dialect.name == "postgresql"
            if readonly and self.engine.dialect.name == "postgresql":
                event.listen(self.engine, "connect", postgres_readonly)
            if self._sqlite:
                pragmas = (
                    sqlite_pragmas_readonly
                    if readonly
                    else sqlite_pragmas
                    if durable
                    else sqlite_pragmas_fast
                )
                event.listen(self.engine, "connect", pragmas)
            self._salt = b""
            if migrate:
                for attempt in range(3):  # concurrent first starts of several aggregators
                    try:
                        self.schema_from = migrations.upgrade(self.engine)
                        break
                    except StoreError:
                        self.engine.dispose()
                        raise
                    except SQLAlchemyError as exc:
                        if attempt == 2:
                            self.engine.dispose()
                            raise store_error(
                                f"cannot bring database {db!r} up to date", exc
                            ) from None
                        time.sleep(0.05 * (attempt + 1))
            else:
                try:
                    current = migrations.current(self.engine)
                except SQLAlchemyError as exc:
                    self.engine.dispose()
                    raise store_error(f"cannot read database {db!r}", exc) from None
                self.schema_from = current
                if current is None:
                    self.engine.dispose()
                    raise StoreError(f"{db!r} is not a fedstack store (no fedstack schema)")
                if current != migrations.HEAD:
                    self.engine.dispose()
                    raise StoreError(
                        f"{db!r} is not a fedstack store of this version (schema {current}, "
                        f"expected {migrations.HEAD}); `fedstack db upgrade --db DB` or the "
                        "aggregator brings it up to date"
                    )
        self._salt = self._load_salt(create=not readonly)
        self._file_id = self._sqlite_file_id()

    @property
    def blobs(self) -> BlobStore:
        """The blob directory.

        Raises:
            StoreError: this store keeps every blob in the database (PostgreSQL without
                ``blob_dir``): see :attr:`blobs_in_database`.
        """
        if self._files is None:
            raise StoreError("this store keeps its blobs in the database (no blob directory)")
        return self._files

    @property
    def blobs_in_database(self) -> bool:
        """True if every blob lives in the database (PostgreSQL without ``blob_dir``)."""
        return self._files is None

    def _sqlite_file_id(self) -> tuple[int, int] | None:
        """(device, inode) of the SQLite file (None: not an SQLite file)."""
        if self.path is None or not self._sqlite:
            return None
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_dev, st.st_ino)

    def check_database(self) -> None:
        """Check that the SQLite file this store opened is still the one at its path
        (a stat: cheap enough to call every second and before every round commit). A
        no-op for other databases.

        Raises:
            DatabaseReplaced: the file was deleted, or another file took its path (SQLite
                would go on writing to the unlinked file: every later write, credentials
                included, would be lost on restart).
        """
        if self._file_id is None:
            return
        try:
            st = os.stat(self.path)  # type: ignore[arg-type]
        except FileNotFoundError:
            raise DatabaseReplaced(
                f"the database file {self.path} was deleted while the store had it open"
            ) from None
        except OSError:
            return  # e.g. a permission change: the open file is still the store
        if (st.st_dev, st.st_ino) != self._file_id:
            raise DatabaseReplaced(
                f"the database file {self.path} was replaced by another file while the "
                "store had it open"
            )

    @classmethod
    def open_readonly(cls, db: str, blob_dir: str | Path | None = None) -> Store:
        """Open an existing store for inspection: no migration, no database or directory
        created, SQLite's journal mode untouched and every write refused (SQLite opens the
        file with ``mode=ro`` and ``query_only``, ``immutable`` on read-only media;
        PostgreSQL's ``default_transaction_read_only``).

        Raises:
            StoreError: there is no fedstack store of this version at ``db``.
        """
        return cls(db, blob_dir, migrate=False, readonly=True)

    def _load_salt(self, *, create: bool) -> bytes:
        """The per-deployment salt of the credential hashes (made on the first open)."""
        for attempt in range(2):
            try:
                with Txn(self.engine) as c:  # not _begin(): subclasses wrap that
                    salt = c.execute(
                        select(s.meta.c.value).where(s.meta.c.key == "token_salt")
                    ).scalar()
                    if salt is None and create:
                        salt = secrets.token_hex(32)
                        c.execute(insert(s.meta).values(key="token_salt", value=salt))
                return b"" if salt is None else bytes.fromhex(str(salt))
            except StoreConflict:  # a concurrent first open inserted it
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        self.engine.dispose()

    # ------------------------------------------------------------------ runs
    def open_run(self, name: str, config: Mapping[str, Any], aggregator_id: str) -> RunInfo:
        """Resume the latest unfinished run called ``name``, or start a new one.

        Serialised per name (the members of a federation start at the same time and must
        all get the same run): SQLite takes its write lock first, PostgreSQL an advisory
        lock on the name, before the run is looked up.
        """
        with self._begin() as c:
            row = self._lock_run_name(c, name)
            if row is not None:
                if not row["config"] and config:
                    # a run made by `fedstack model register`: the first aggregator to
                    # open it records its settings, as for a run it starts
                    c.execute(
                        update(s.runs).where(s.runs.c.id == row["id"]).values(config=dict(config))
                    )
                    row = {**row, "config": dict(config)}
                return _run_info(row, resumed=True)
            run_id = new_id()
            values = dict(
                id=run_id,
                name=name,
                created=time.time(),
                status="running",
                config=dict(config),
                structure=None,
                init_weights=None,
                version=-1,
                aggregator_id=aggregator_id,
            )
            c.execute(insert(s.runs).values(**values))
            return _run_info(values, resumed=False)

    def _lock_run_name(self, c: Any, name: str) -> Mapping[str, Any] | None:
        """In transaction ``c``: serialise on run name ``name`` (SQLite's write lock,
        PostgreSQL's advisory lock on the name), then its latest running run's row."""
        if self._sqlite:
            c.execute(_LOCK_RUNS)
        elif self.engine.dialect.name == "postgresql":
            key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)
            c.execute(_PG_LOCK_NAME, {"b_key": key})
        row: Mapping[str, Any] | None = (
            c.execute(
                select(s.runs)
                .where(s.runs.c.name == name, s.runs.c.status == "running")
                .order_by(s.runs.c.created.desc())
                .limit(1)
            )
            .mappings()
            .first()
        )
        return row

    def register_model(
        self,
        run_name: str,
        weights: Weights,
        *,
        init_weights: bool = True,
        detail: Mapping[str, Any] | None = None,
    ) -> tuple[RunInfo, str]:
        """The operator's base model for run ``run_name``: it fixes the run's model
        structure (names, dtypes, shapes) instead of the first agent, and its weights
        (``init_weights``; else zeros of its structure) are global model version 0.

        The run is the latest running run of that name (one an aggregator opened before
        any agent brought a model), or a new one that the aggregator started with
        ``--run-name run_name`` resumes. ``detail`` goes into the ``model_registered``
        event (e.g. the file it came from). Returns (the run, global model 0's id).

        Raises:
            StoreConflict: the run has a model already (its structure is fixed: finish the
                run or register under another run name).
        """
        initial = {k: np.asarray(v) for k, v in weights.items()}
        glob = initial if init_weights else {k: np.zeros_like(v) for k, v in initial.items()}
        structure = structure_of(initial)
        staged = self._stage(glob)
        now = time.time()
        global_id = new_id()
        with self._begin() as c:
            row = self._lock_run_name(c, run_name)
            if row is not None and int(row["version"]) >= 0:
                raise StoreConflict(
                    f"run {run_name!r} ({str(row['id'])[:8]}) has a model already (global "
                    f"version {row['version']}): its structure is fixed; finish that run or "
                    "register the model under another run name"
                )
            if row is None:
                run_id, aggregator_id = new_id(), new_id()
                c.execute(
                    insert(s.runs).values(
                        id=run_id,
                        name=run_name,
                        created=now,
                        status="running",
                        config={},
                        structure=None,
                        init_weights=None,
                        version=-1,
                        aggregator_id=aggregator_id,
                    )
                )
            else:
                run_id, aggregator_id = str(row["id"]), str(row["aggregator_id"])
            self._write_inline(c, staged)
            c.execute(
                insert(s.models).values(
                    id=global_id,
                    run_id=run_id,
                    kind="cluster",
                    producer=aggregator_id,
                    round=0,
                    base_version=None,
                    num_samples=0,
                    metrics={},
                    blob=staged.digest,
                    nbytes=staged.size,
                    created=now,
                    status="global",
                    upload_id=None,
                )
            )
            c.execute(
                update(s.runs)
                .where(s.runs.c.id == run_id)
                .values(
                    structure=[[n, d, list(sh)] for n, d, sh in structure],
                    init_weights=init_weights,
                    version=0,
                )
            )
            c.execute(
                _INSERT_EVENT,
                {
                    "time": now,
                    "run_id": run_id,
                    "agent_id": None,
                    "kind": "model_registered",
                    "detail": {
                        **dict(detail or {}),
                        "model_id": global_id,
                        "digest": staged.digest,
                        "tensors": len(structure),
                        "parameters": int(sum(int(np.prod(sh)) for _, _, sh in structure)),
                        "init_weights": init_weights,
                    },
                },
            )
            final = c.execute(select(s.runs).where(s.runs.c.id == run_id)).mappings().one()
            return _run_info(final, resumed=row is not None), global_id

    def get_run(self, run_id: str) -> RunInfo:
        with self._begin() as c:
            row = c.execute(select(s.runs).where(s.runs.c.id == run_id)).mappings().first()
        if row is None:
            raise StoreError(f"no run {run_id}")
        return _run_info(row, resumed=True)

    def finish_run(self, run_id: str) -> None:
        with self._begin() as c:
            c.execute(update(s.runs).where(s.runs.c.id == run_id).values(status="finished"))

    # ------------------------------------------------------------------ models
    def init_federation(
        self,
        run_id: str,
        *,
        agent_id: str,
        structure: list[tuple[str, str, tuple[int, ...]]],
        init_weights: bool,
        initial: Weights,
        global_weights: Weights,
        num_samples: int,
        metrics: Metrics,
        aggregator_id: str,
    ) -> str:
        """Record the first model (it fixes the structure) and global model version 0.

        Returns the id of global model 0.

        Raises:
            StoreConflict: the run has its first model already (another member of a
                federation recorded it first; read the run again).
        """
        local = self._stage(initial)
        glob = self._stage(global_weights)
        local_blob, local_n, glob_blob, glob_n = local.digest, local.size, glob.digest, glob.size
        now = time.time()
        local_id, global_id = new_id(), new_id()
        with self._begin() as c:
            self._write_inline(c, local, glob)
            c.execute(
                insert(s.models).values(
                    id=local_id,
                    run_id=run_id,
                    kind="local",
                    producer=agent_id,
                    round=0,
                    base_version=None,
                    num_samples=num_samples,
                    metrics=dict(metrics),
                    blob=local_blob,
                    nbytes=local_n,
                    created=now,
                    status="initial",
                    upload_id=None,
                )
            )
            c.execute(
                insert(s.models).values(
                    id=global_id,
                    run_id=run_id,
                    kind="cluster",
                    producer=aggregator_id,
                    round=0,
                    base_version=None,
                    num_samples=num_samples,
                    metrics={},
                    blob=glob_blob,
                    nbytes=glob_n,
                    created=now,
                    status="global",
                    upload_id=None,
                )
            )
            c.execute(
                insert(s.lineage).values(child_id=global_id, parent_id=local_id, relation="input")
            )
            started = c.execute(
                update(s.runs)
                .where(s.runs.c.id == run_id, s.runs.c.version == -1)
                .values(
                    structure=[[n, d, list(sh)] for n, d, sh in structure],
                    init_weights=init_weights,
                    version=0,
                )
            ).rowcount
            if started != 1:  # another member of a federation started the run first
                raise StoreConflict(f"run {run_id} already has its first model")
        return global_id

    def add_upload(
        self,
        run_id: str,
        *,
        agent_id: str,
        upload_id: str,
        round: int,
        base_version: int,
        num_samples: int,
        metrics: Metrics,
        weights: Weights,
        status: str,
        blob: tuple[str, int] | None = None,
        extra: Weights | None = None,
    ) -> tuple[UploadRecord, bool]:
        """Persist a local model. Idempotent by ``upload_id``.

        ``blob`` is the (digest, size) of ``weights`` if they were already put in the blob
        store (saves hashing them twice).

        Returns:
            (the stored record, True if this call stored it; False if it was there already).
        """
        return self.add_uploads(
            run_id,
            [
                {
                    "agent_id": agent_id,
                    "upload_id": upload_id,
                    "round": round,
                    "base_version": base_version,
                    "num_samples": num_samples,
                    "metrics": metrics,
                    "weights": weights,
                    "status": status,
                    "blob": blob,
                    "extra": extra,
                }
            ],
        )[0]

    def add_uploads(
        self, run_id: str, uploads: Sequence[Mapping[str, Any]]
    ) -> list[tuple[UploadRecord, bool]]:
        """Several :meth:`add_upload` calls (each a mapping of its keyword arguments) in
        ONE transaction: one commit, one fsync (group commit). Falls back to one call per
        upload if one of them was stored before (a re-sent upload). Returns what each call
        would have returned, in order; an upload_id given twice is stored once. A mapping
        may also give ``"cluster"``: the federation member holding the upload (see
        :meth:`~fedstack.store.federation.Federation.claim_uploads`)."""
        staged = []
        for up in uploads:
            blob = up.get("blob")
            st = _Staged(blob[0], blob[1]) if blob is not None else self._stage(up["weights"])
            extra = up.get("extra")
            staged.append((st, self._stage(extra) if extra else None))
        out: list[tuple[UploadRecord, bool]] = []
        now = time.time()
        try:
            with self._begin() as c:
                first: dict[str, UploadRecord] = {}
                for up, (st, extra_st) in zip(uploads, staged, strict=True):
                    uid = up["upload_id"]
                    if uid in first:
                        out.append((first[uid], False))
                        continue
                    self._write_inline(c, st, extra_st)
                    model_id = new_id()
                    metrics = dict(up["metrics"])
                    c.execute(
                        _INSERT_MODEL,
                        {
                            "id": model_id,
                            "run_id": run_id,
                            "kind": "local",
                            "producer": up["agent_id"],
                            "round": up["round"],
                            "base_version": up["base_version"],
                            "num_samples": up["num_samples"],
                            "metrics": metrics,
                            "blob": st.digest,
                            "nbytes": st.size,
                            "created": now,
                            "status": up["status"],
                            "upload_id": uid,
                            "extra_blob": extra_st.digest if extra_st else None,
                            "cluster": up.get("cluster"),
                        },
                    )
                    rec = UploadRecord(
                        model_id,
                        up["agent_id"],
                        uid,
                        up["round"],
                        up["base_version"],
                        up["num_samples"],
                        up["status"],
                        metrics,
                        up.get("cluster"),
                    )
                    first[uid] = rec
                    out.append((rec, True))
        except StoreConflict as exc:
            # upload_id is unique: an upload stored before (a re-send) fails the whole
            # transaction. The rare path: one by one, the stored record for that one.
            if len(uploads) > 1:
                return [self.add_uploads(run_id, [up])[0] for up in uploads]
            uid = uploads[0]["upload_id"]
            existing = self.find_upload(uid)
            if existing is None:  # another constraint (e.g. an unknown run or agent)
                raise StoreConflict(f"cannot store upload {uid[:64]!r}: {exc}") from exc
            return [(existing, False)]
        return out

    def prune_local_models(self, run_id: str, up_to_round: int) -> tuple[int, int]:
        """Retention: drop the weights (and extra arrays) of ``run_id``'s local models of
        rounds ``<= up_to_round`` that are no longer waiting for a round (``initial`` and
        ``buffered`` ones are kept); their records stay, with an empty ``blob``. Blobs no
        longer referenced by any model or round are then deleted (inlined ones in the same
        transaction, files after it).

        Returns:
            (local models pruned, blobs deleted).
        """
        return self._prune_where(
            s.models.c.run_id == run_id,
            s.models.c.kind == "local",
            s.models.c.round <= up_to_round,
            s.models.c.blob != "",
            s.models.c.status.not_in(("initial", "buffered")),
        )

    def discard_uploads(self, run_id: str, model_ids: Sequence[str]) -> tuple[int, int]:
        """Secure aggregation: the masked inputs ``model_ids`` of a failed attempt are
        never aggregated: still-buffered ones are marked ``stale`` and the weights of
        every stale one are dropped (its record stays, with an empty ``blob``), so failed
        attempts never grow the store beyond their metadata.

        Returns:
            (models whose weights were dropped, blobs deleted).
        """
        ids = list(dict.fromkeys(model_ids))
        if not ids:
            return 0, 0
        self.carry_uploads(run_id, ids, round=0, drop=True)
        return self._prune_where(
            s.models.c.run_id == run_id,
            s.models.c.kind == "local",
            s.models.c.id.in_(ids),
            s.models.c.blob != "",
            s.models.c.status == "stale",
        )

    def _prune_where(self, *where: Any) -> tuple[int, int]:
        """Drop the weights of the models matching ``where`` (see prune_local_models)."""
        with self._begin() as c:
            rows = c.execute(
                select(s.models.c.id, s.models.c.blob, s.models.c.extra_blob).where(*where)
            ).all()
            if not rows:
                return 0, 0
            ids = [r[0] for r in rows]
            digests = {d for r in rows for d in (r[1], r[2]) if d}
            for i in range(0, len(ids), 500):
                c.execute(
                    update(s.models)
                    .where(s.models.c.id.in_(ids[i : i + 500]))
                    .values(blob="", extra_blob=None)
                )
            wanted = list(digests)
            used: set[str] = set()
            for col in (
                s.models.c.blob,
                s.models.c.extra_blob,
                s.rounds.c.state_blob,
                s.cluster_rounds.c.state_blob,
            ):
                used.update(c.execute(select(col).distinct().where(col.in_(wanted))).scalars())
            unused = digests - used
            if unused:
                c.execute(delete(s.blob_data).where(s.blob_data.c.digest.in_(list(unused))))
        if self._files is not None:  # in the database, they went with the transaction
            for d in unused:
                self._files.delete(d)
        return len(ids), len(unused)

    def quarantine_upload(self, run_id: str, model_id: str, reason: str) -> None:
        """Mark a stored local model whose data is damaged ``quarantined`` (it is never
        aggregated nor replayed again) and audit it, in one transaction."""
        with self._begin() as c:
            row = c.execute(_QUARANTINE_INFO, {"model_id": model_id}).first()
            c.execute(_SET_STATUS, {"b_model": model_id, "b_status": "quarantined"})
            c.execute(
                _INSERT_EVENT,
                {
                    "time": time.time(),
                    "run_id": run_id,
                    "agent_id": None if row is None else row[0],
                    "kind": "upload_quarantined",
                    "detail": {
                        "model_id": model_id,
                        "upload_id": None if row is None else row[1],
                        "reason": reason[:500],
                    },
                },
            )

    def find_upload(self, upload_id: str) -> UploadRecord | None:
        with self._begin() as c:
            row = c.execute(_FIND_UPLOAD, {"upload_id": upload_id}).mappings().first()
        return None if row is None else _upload(row)

    def commit_round(
        self,
        run_id: str,
        *,
        round: int,
        weights: Weights,
        inputs: Sequence[str],
        base_model_id: str | None,
        num_samples: int,
        metrics: Metrics,
        started: float,
        finished: float,
        aggregator_id: str,
        strategy_state: Mapping[str, Any] | None = None,
        extra: Weights | None = None,
    ) -> str:
        """Store the cluster model of ``round`` and advance the run, in one transaction.

        The inputs are marked aggregated, their lineage recorded, the round row written
        with the strategy's state (scalars as JSON, arrays as a blob) and the run's version
        set to ``round``. ``extra`` are the arrays sent to agents with the model. Returns
        the cluster model's id.
        """
        staged = self._stage(weights)
        blob, nbytes = staged.digest, staged.size
        scalars, arrays = split_state(strategy_state or {})
        state_staged = self._stage(arrays) if arrays else None
        extra_staged = self._stage(extra) if extra else None
        state_blob = state_staged.digest if state_staged else None
        extra_blob = extra_staged.digest if extra_staged else None
        model_id = new_id()
        self.check_database()  # never commit a round into a deleted file
        with self._begin() as c:
            self._write_inline(c, staged, state_staged, extra_staged)
            version = c.execute(_RUN_VERSION, {"run_id": run_id}).scalar_one()
            if version != round - 1:
                raise StoreError(
                    f"round {round} cannot follow version {version}: another aggregator "
                    "process is writing this run"
                )
            c.execute(
                _INSERT_MODEL,
                {
                    "id": model_id,
                    "run_id": run_id,
                    "kind": "cluster",
                    "producer": aggregator_id,
                    "round": round,
                    "base_version": round - 1,
                    "num_samples": num_samples,
                    "metrics": dict(metrics),
                    "blob": blob,
                    "nbytes": nbytes,
                    "created": finished,
                    "status": "global",
                    "upload_id": None,
                    "extra_blob": extra_blob,
                },
            )
            rows = [{"child_id": model_id, "parent_id": i, "relation": "input"} for i in inputs]
            if base_model_id is not None:
                rows.append({"child_id": model_id, "parent_id": base_model_id, "relation": "base"})
            if rows:
                c.execute(_INSERT_LINEAGE, rows)
            if inputs:
                c.execute(_MARK_AGGREGATED, {"b_ids": list(inputs)})
            c.execute(
                _INSERT_ROUND,
                {
                    "run_id": run_id,
                    "round": round,
                    "started": started,
                    "finished": finished,
                    "seconds": finished - started,
                    "model_id": model_id,
                    "num_updates": len(inputs),
                    "num_samples": num_samples,
                    "metrics": dict(metrics),
                    "strategy_state": scalars,
                    "state_blob": state_blob,
                },
            )
            c.execute(_SET_RUN_VERSION, {"b_run": run_id, "b_version": round})
        return model_id

    def update_round_metrics(self, run_id: str, round: int, metrics: Metrics) -> None:
        """Merge ``metrics`` into the round's (and its cluster model's) metrics."""
        with self._begin() as c:
            row = c.execute(_ROUND_METRICS, {"b_run": run_id, "b_round": round}).first()
            if row is None:
                raise StoreError(f"no round {round} in run {run_id}")
            merged = {**(row[0] or {}), **metrics}
            c.execute(_SET_ROUND_METRICS, {"b_run": run_id, "b_round": round, "b_metrics": merged})
            c.execute(_SET_MODEL_METRICS, {"b_model": row[1], "b_metrics": merged})

    def resume_state(self, run_id: str) -> ResumeState:
        """What an aggregator needs to continue ``run_id`` after a restart."""
        with self._begin() as c:
            version = c.execute(select(s.runs.c.version).where(s.runs.c.id == run_id)).scalar_one()
            gid = c.execute(
                select(s.models.c.id).where(
                    s.models.c.run_id == run_id,
                    s.models.c.kind == "cluster",
                    s.models.c.round == version,
                )
            ).scalar()
            rows = (
                c.execute(
                    select(s.models)
                    .where(
                        s.models.c.run_id == run_id,
                        s.models.c.status == "buffered",
                        s.models.c.round == version + 1,
                    )
                    .order_by(s.models.c.created)
                )
                .mappings()
                .all()
            )
            last = c.execute(
                select(s.rounds.c.strategy_state, s.rounds.c.state_blob, s.models.c.extra_blob)
                .join(s.models, s.models.c.id == s.rounds.c.model_id)
                .where(s.rounds.c.run_id == run_id, s.rounds.c.round == version)
            ).first()
        state: dict[str, Any] | None = None
        extra: Weights = {}
        if last is not None:
            state = dict(last[0] or {})
            if last[1]:
                state.update(self.get_blob(last[1]))
            if last[2]:
                extra = self.get_blob(last[2])
        return ResumeState(int(version), gid, [_upload(r) for r in rows], state, extra)

    def global_model_id(self, run_id: str, version: int) -> str | None:
        with self._begin() as c:
            gid = c.execute(
                select(s.models.c.id).where(
                    s.models.c.run_id == run_id,
                    s.models.c.kind == "cluster",
                    s.models.c.round == version,
                )
            ).scalar()
        return None if gid is None else str(gid)

    def load_extra(self, model_id: str) -> Weights:
        """The extra arrays stored with a model ({} if none)."""
        with self._begin() as c:
            blob = c.execute(_MODEL_EXTRA, {"model_id": model_id}).scalar()
        return {} if blob is None else self.get_blob(blob)

    def load_weights(self, model_id: str) -> Weights:
        with self._begin() as c:
            blob = c.execute(_MODEL_BLOB, {"model_id": model_id}).scalar()
        if blob is None:
            raise StoreError(f"no model {model_id}")
        if blob == "":
            raise StoreError(f"the weights of model {model_id} were not kept (retention)")
        return self.get_blob(blob)

    # ------------------------------------------------------------------ blobs
    def _stage(self, weights: Mapping[str, Any]) -> _Staged:
        """Encode ``weights``: bytes to insert with the row if they go into the database
        (every blob without a blob directory; else up to ``inline_blob_bytes``), else
        written to the blob directory now.

        Raises:
            StoreError: too big for one database value (:data:`MAX_DATABASE_BLOB_BYTES`)
                and no blob directory, or the blob file cannot be written.
        """
        if self._files is None or self.inline_blob_bytes > 0:
            parts = encode_weights(weights)
            size = sum(len(p) if isinstance(p, bytes) else p.nbytes for p in parts)
            if self._files is None or size <= self.inline_blob_bytes:
                if size > MAX_DATABASE_BLOB_BYTES:
                    raise StoreError(
                        f"a blob of {size} bytes is over the {MAX_DATABASE_BLOB_BYTES} bytes "
                        "the database keeps in one value; give the store a blob directory "
                        "(blob_dir, shared by every aggregator) for larger models"
                    )
                data = b"".join(parts)
                return _Staged(digest_of([data])[0], size, data)
        digest, size = self.blobs.put(weights)
        return _Staged(digest, size)

    def _write_inline(self, c: Any, *staged: _Staged | None) -> None:
        for st in staged:
            if st is None or st.data is None:
                continue
            if self._sqlite:  # one statement: the same bytes once, a damaged copy repaired
                c.execute(
                    _INSERT_BLOB_OR_REPAIR, {"digest": st.digest, "size": st.size, "data": st.data}
                )
                continue
            if self._postgres:
                values = {"digest": st.digest, "size": st.size, "data": st.data}
                if c.execute(_PG_INSERT_BLOB, values).first() is not None:
                    continue  # stored now
                stored = read_blob_postgres(c, st.digest)
            else:
                row = c.execute(_BLOB_DATA, {"d": st.digest}).first()
                if row is None:
                    c.execute(_INSERT_BLOB, {"digest": st.digest, "size": st.size, "data": st.data})
                    continue
                stored = bytes(row[0])
            if stored != st.data:  # damaged or tampered: the content repairs it
                c.execute(_REPAIR_BLOB, {"d": st.digest, "b_size": st.size, "b_data": st.data})

    def _blob_bytes(self, c: Any, digest: str) -> bytes | None:
        """The bytes of the database's copy of blob ``digest`` (None: not in the database)."""
        if self._postgres:
            return read_blob_postgres(c, digest)
        row = c.execute(_BLOB_DATA, {"d": digest}).first()
        return None if row is None else bytes(row[0])

    def will_inline(self, weights: Mapping[str, Any]) -> bool:
        """True if ``weights`` are small enough to go into the database with the row that
        names them (checked on the raw sizes, with room for the encoding's header and
        padding); bigger ones go through :meth:`put_blob` first."""
        return (
            self.inline_blob_bytes > 0
            and sum(np.asarray(a).nbytes for a in weights.values()) < self.inline_blob_bytes // 2
        )

    def put_blob(self, weights: Mapping[str, Any]) -> tuple[str, int] | None:
        """Store ``weights`` ahead of :meth:`add_upload` (outside the caller's locks) if
        they are too big to be inlined: in the blob directory, or in the database in a
        transaction of their own when there is none. Returns (digest, size) to hand to
        :meth:`add_upload`; None if they will be inlined.

        Raises:
            StoreError: the blob cannot be stored (see :meth:`_stage`; database errors).
        """
        if self.will_inline(weights):
            return None
        if self._files is not None:
            return self._files.put(weights)
        staged = self._stage(weights)
        with self._begin() as c:
            self._write_inline(c, staged)
        return staged.digest, staged.size

    def get_blob(self, digest: str) -> Weights:
        """The blob ``digest``, from the database or the blob directory; its hash is
        checked either way.

        Raises:
            CorruptBlob: it is missing or its bytes do not match its digest.
            StoreError: it cannot be read.
        """
        with self._begin() as c:
            data = self._blob_bytes(c, digest)
        if data is None:
            if self._files is None:
                raise CorruptBlob(f"blob {digest[:12]} is missing from the database")
            return self._files.get(digest)
        if not digest_matches(digest, data):
            raise CorruptBlob(f"blob {digest[:12]} is corrupt (hash mismatch)")
        try:
            return decode_weights(memoryview(data))
        except TensorFileError as exc:
            raise TensorFileError(f"blob {digest[:12]} is not readable: {exc}") from exc

    def export_model(self, model_id: str, path: str | Path) -> Path:
        """Write model ``model_id`` to ``path`` as a safetensors file (whether its blob is
        a file or in the database), atomically; returns the path. The file opens
        with ``safetensors.numpy.load_file`` or ``safetensors.torch.load_file``.

        Raises:
            StoreError: no such model, its blob is missing or corrupt, or ``path`` cannot
                be written.
        """
        with self._begin() as c:
            digest = c.execute(_MODEL_BLOB, {"model_id": model_id}).scalar()
            data = None if not digest else self._blob_bytes(c, digest)
        if digest is None:
            raise StoreError(f"no model {model_id}")
        if digest == "":
            raise StoreError(f"the weights of model {model_id} were not kept (retention)")
        out = Path(path)
        if data is None:
            if self._files is None:
                raise StoreError(f"blob {digest[:12]} is missing from the database")
            try:
                data = self._files.path(digest).read_bytes()
            except OSError as exc:
                raise StoreError(f"cannot read blob {digest[:12]}: {exc.strerror}") from exc
        if not digest_matches(digest, data):
            raise StoreError(f"blob {digest[:12]} is corrupt (hash mismatch)")
        try:
            atomic_write(out, data, mode=0o644)
        except OSError as exc:
            raise StoreError(f"cannot write {out}: {exc.strerror}") from exc
        return out

    def checkpoint(self) -> None:
        """Copy the SQLite write-ahead log into the database file without blocking
        readers or writers (``PRAGMA wal_checkpoint(PASSIVE)``); a no-op for other
        databases. The aggregator calls it off the critical path after every round."""
        if self.engine.dialect.name != "sqlite":
            return
        try:
            with self.engine.connect() as c:
                c.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)")
        except SQLAlchemyError as exc:
            raise store_error("checkpoint failed", exc) from None

    # ------------------------------------------------------------------ events
    def log_event(
        self,
        kind: str,
        detail: Mapping[str, Any],
        *,
        run_id: str | None = None,
        agent_id: str | None = None,
    ) -> None:
        with self._begin() as c:
            c.execute(
                _INSERT_EVENT,
                {
                    "time": time.time(),
                    "run_id": run_id,
                    "agent_id": agent_id,
                    "kind": kind,
                    "detail": dict(detail),
                },
            )

    # ------------------------------------------------------------------ helpers
    def _begin(self) -> Any:
        return Txn(self.engine)


@dataclass(frozen=True, slots=True)
class _Staged:
    digest: str
    size: int
    data: bytes | None = None  # None: already in the blob directory


def _run_info(row: Mapping[str, Any], resumed: bool) -> RunInfo:
    structure = row["structure"]
    return RunInfo(
        id=row["id"],
        name=row["name"],
        status=row["status"],
        version=int(row["version"]),
        structure=None if structure is None else [(n, d, tuple(sh)) for n, d, sh in structure],
        init_weights=row["init_weights"],
        aggregator_id=row["aggregator_id"],
        config=dict(row["config"]),
        resumed=resumed,
    )
