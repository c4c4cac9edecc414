"""Schema migrations of the store, through Alembic, run from code (no ``alembic.ini``).

:func:`upgrade` brings a database to :data:`HEAD`; the aggregator (through
:class:`~fedstack.store.Store`) calls it when it opens a store. A database already at
:data:`HEAD` is recognised without loading Alembic. The revisions live in ``versions/``;
a new one is written with :func:`config` and ``alembic.command.revision``, for SQLite
and PostgreSQL alike (``render_as_batch`` makes SQLite's ``ALTER TABLE`` work).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Engine, inspect, text

from fedstack.errors import StoreError

if TYPE_CHECKING:
    from alembic.config import Config

HEAD = "0003"
"""The revision this fedstack's schema (:mod:`fedstack.store.schema`) is at."""

VERSION_TABLE = "alembic_version"
_HERE = Path(__file__).resolve().parent


def config(engine: Engine | None = None) -> Config:
    """An Alembic configuration built in code: this directory as the script location and,
    if given, ``engine`` as the database (its connection is handed to ``env.py``)."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(_HERE))
    cfg.set_main_option("version_table", VERSION_TABLE)
    if engine is not None:
        cfg.attributes["engine"] = engine
    return cfg


def current(engine: Engine) -> str | None:
    """The revision the database is at; None if it has no fedstack schema.

    Raises:
        sqlalchemy.exc.SQLAlchemyError: the database cannot be read.
    """
    with engine.connect() as c:
        if not inspect(c).has_table(VERSION_TABLE):
            return None
        return c.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalar()


def upgrade(engine: Engine, revision: str = "head") -> str | None:
    """Bring the database to ``revision`` (creating the schema in an empty database).

    Returns:
        The revision the database was at before (None: it had no fedstack schema).

    Raises:
        sqlalchemy.exc.SQLAlchemyError: a migration failed (it is rolled back where the
            database supports transactional DDL).
        StoreError: Alembic cannot go from the database's revision to ``revision`` (a
            revision this fedstack does not know, e.g. written by a newer one).
    """
    before = current(engine)
    if revision == "head" and before == HEAD:
        return before
    quiet = logging.getLogger("alembic")  # its INFO lines say nothing an operator needs
    level = quiet.level
    quiet.setLevel(max(level, logging.WARNING))
    try:
        from alembic import command
        from alembic.util import CommandError

        try:
            command.upgrade(config(engine), revision)
        except CommandError as exc:
            raise StoreError(
                f"cannot migrate the schema from revision {before} to {revision}: {exc}"
            ) from None
    finally:
        quiet.setLevel(level)
    return before
