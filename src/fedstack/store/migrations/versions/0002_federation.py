"""The horizontal federation: the members of a run (``aggregators``), their cluster
rounds and semi-global models (``cluster_rounds``), and the member holding each local
model (``models.cluster``); and indexes on the blob columns (retention asks which blobs
are still referenced).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "aggregators",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("run_id", sa.String(32), sa.ForeignKey("runs.id"), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("url", sa.String(512), nullable=False),
        sa.Column("upstream", sa.String(512), nullable=True),
        sa.Column("started", sa.Float, nullable=False),
        sa.Column("heartbeat", sa.Float, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("active_agents", sa.Integer, nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("ready_round", sa.Integer, nullable=False, server_default="-1"),
        sa.UniqueConstraint("run_id", "name", name="uq_aggregators_run_name"),
    )
    op.create_table(
        "cluster_rounds",
        sa.Column("run_id", sa.String(32), sa.ForeignKey("runs.id"), primary_key=True),
        sa.Column("aggregator_id", sa.String(32), primary_key=True),
        sa.Column("round", sa.Integer, primary_key=True),
        sa.Column("model_id", sa.String(32), sa.ForeignKey("models.id"), nullable=False),
        sa.Column("num_updates", sa.Integer, nullable=False),
        sa.Column("num_samples", sa.Integer, nullable=False),
        sa.Column("started", sa.Float, nullable=False),
        sa.Column("finished", sa.Float, nullable=False),
        sa.Column("metrics", sa.JSON, nullable=False),
        sa.Column("strategy_state", sa.JSON, nullable=True),
        sa.Column("state_blob", sa.String(64), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
    )
    op.create_index("ix_cluster_rounds_run_round", "cluster_rounds", ["run_id", "round"])
    # a nullable column without a default: a plain ALTER TABLE ADD COLUMN on SQLite too
    op.add_column("models", sa.Column("cluster", sa.String(32), nullable=True))
    op.create_index("ix_models_run_status_cluster", "models", ["run_id", "status", "cluster"])
    # retention's "is this blob still referenced?" (no scan of every model)
    op.create_index("ix_models_blob", "models", ["blob"])
    op.create_index("ix_models_extra_blob", "models", ["extra_blob"])
    op.create_index("ix_rounds_state_blob", "rounds", ["state_blob"])


def downgrade() -> None:
    op.drop_index("ix_rounds_state_blob", table_name="rounds")
    op.drop_index("ix_models_extra_blob", table_name="models")
    op.drop_index("ix_models_blob", table_name="models")
    op.drop_index("ix_models_run_status_cluster", table_name="models")
    with op.batch_alter_table("models") as batch:
        batch.drop_column("cluster")
    op.drop_index("ix_cluster_rounds_run_round", table_name="cluster_rounds")
    op.drop_table("cluster_rounds")
    op.drop_table("aggregators")
