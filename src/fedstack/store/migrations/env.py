"""Alembic's environment for the store: runs on the engine handed over by
:func:`fedstack.store.migrations.config` (or on ``sqlalchemy.url`` when set)."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Engine, create_engine

from fedstack.store.schema import metadata

cfg = context.config
engine = cfg.attributes.get("engine")
if not isinstance(engine, Engine):
    engine = create_engine(cfg.get_main_option("sqlalchemy.url") or "sqlite://")

with engine.connect() as connection:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        version_table=cfg.get_main_option("version_table") or "alembic_version",
        render_as_batch=True,  # SQLite alters a table by copying it
    )
    with context.begin_transaction():
        context.run_migrations()
