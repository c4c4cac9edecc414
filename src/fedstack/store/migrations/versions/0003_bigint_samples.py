"""Sample counts in 64 bits: ``models.num_samples``, ``rounds.num_samples`` and
``cluster_rounds.num_samples`` become BIGINT on PostgreSQL (a round's sum over its agents
passes 2**31 - 1: 215 agents at the default cap of 10 million each; the commit failed
with "numeric value out of range" and was retried for ever). SQLite's INTEGER holds 64
bits already: nothing changes there.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_TABLES = ("models", "rounds", "cluster_rounds")


def upgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        return
    for table in _TABLES:
        op.alter_column(
            table,
            "num_samples",
            type_=sa.BigInteger(),
            existing_type=sa.Integer(),
            existing_nullable=False,
        )


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        return
    for table in _TABLES:
        op.alter_column(
            table,
            "num_samples",
            type_=sa.Integer(),
            existing_type=sa.BigInteger(),
            existing_nullable=False,
        )
