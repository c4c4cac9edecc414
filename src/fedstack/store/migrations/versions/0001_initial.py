"""The store's first schema: runs, agents and credentials, models, lineage, rounds,
events, inline blobs and the deployment's meta values.

Revision ID: 0001
Revises:
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "fedstack_meta",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("value", sa.String(256), nullable=False),
    )
    op.create_table(
        "blob_data",
        sa.Column("digest", sa.String(64), primary_key=True),
        sa.Column("size", sa.Integer, nullable=False),
        sa.Column("data", sa.LargeBinary, nullable=False),
    )
    op.create_table(
        "runs",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("created", sa.Float, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("config", sa.JSON, nullable=False),
        sa.Column("structure", sa.JSON, nullable=True),
        sa.Column("init_weights", sa.Boolean, nullable=True),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("aggregator_id", sa.String(32), nullable=False),
    )
    op.create_index("ix_runs_name", "runs", ["name"])
    op.create_table(
        "agents",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("name", sa.String(128), nullable=False, unique=True),
        sa.Column("token_hash", sa.String(128), nullable=True),
        sa.Column("created", sa.Float, nullable=False),
        sa.Column("last_seen", sa.Float, nullable=False),
        sa.Column("last_address", sa.String(128), nullable=False),
        sa.Column("credential_source", sa.String(16), nullable=True),
        sa.Column("credential_created", sa.Float, nullable=True),
        sa.Column("revoked_at", sa.Float, nullable=True),
        sa.Column("role", sa.String(16), nullable=False, server_default="agent"),
    )
    op.create_table(
        "models",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("run_id", sa.String(32), sa.ForeignKey("runs.id"), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("producer", sa.String(32), nullable=False),
        sa.Column("round", sa.Integer, nullable=False),
        sa.Column("base_version", sa.Integer, nullable=True),
        sa.Column("num_samples", sa.Integer, nullable=False),
        sa.Column("metrics", sa.JSON, nullable=False),
        sa.Column("blob", sa.String(64), nullable=False),
        sa.Column("nbytes", sa.Integer, nullable=False),
        sa.Column("created", sa.Float, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("upload_id", sa.String(64), nullable=True, unique=True),
        sa.Column("extra_blob", sa.String(64), nullable=True),
    )
    op.create_index("ix_models_run_kind_round", "models", ["run_id", "kind", "round"])
    op.create_index("ix_models_run_status", "models", ["run_id", "status"])
    op.create_table(
        "lineage",
        sa.Column("child_id", sa.String(32), sa.ForeignKey("models.id"), primary_key=True),
        sa.Column("parent_id", sa.String(32), sa.ForeignKey("models.id"), primary_key=True),
        sa.Column("relation", sa.String(16), nullable=False),
    )
    op.create_table(
        "rounds",
        sa.Column("run_id", sa.String(32), sa.ForeignKey("runs.id"), primary_key=True),
        sa.Column("round", sa.Integer, primary_key=True),
        sa.Column("started", sa.Float, nullable=False),
        sa.Column("finished", sa.Float, nullable=False),
        sa.Column("seconds", sa.Float, nullable=False),
        sa.Column("model_id", sa.String(32), sa.ForeignKey("models.id"), nullable=False),
        sa.Column("num_updates", sa.Integer, nullable=False),
        sa.Column("num_samples", sa.Integer, nullable=False),
        sa.Column("metrics", sa.JSON, nullable=False),
        sa.Column("strategy_state", sa.JSON, nullable=True),
        sa.Column("state_blob", sa.String(64), nullable=True),
    )
    op.create_table(
        "events",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("time", sa.Float, nullable=False),
        sa.Column("run_id", sa.String(32), nullable=True),
        sa.Column("agent_id", sa.String(32), nullable=True),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("detail", sa.JSON, nullable=False),
    )


def downgrade() -> None:
    for table in (
        "events",
        "rounds",
        "lineage",
        "models",
        "agents",
        "runs",
        "blob_data",
        "fedstack_meta",
    ):
        op.drop_table(table)
