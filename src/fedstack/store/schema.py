"""SQLAlchemy tables of the model store.

Changes go through a migration (:mod:`fedstack.store.migrations`): a new revision in
``migrations/versions/`` and its id in :data:`fedstack.store.migrations.HEAD`.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    UniqueConstraint,
)

metadata = MetaData()

SAMPLES = BigInteger().with_variant(Integer(), "sqlite")
"""Sample counts: a round's or a cluster's sum over its agents passes 2**31 - 1 (215 agents
at the default cap of 10 million each), so 64 bits on PostgreSQL; SQLite's INTEGER is
64 bits already (revision 0003)."""

meta = Table(
    # deployment-wide values: the salt of the credential hashes ("token_salt")
    "fedstack_meta",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("value", String(256), nullable=False),
)

blob_data = Table(
    # tensor blobs up to the store's inline limit, content-addressed like the blob files
    # (the digest of the same bytes): written in the transaction of the row that names them
    "blob_data",
    metadata,
    Column("digest", String(64), primary_key=True),
    Column("size", Integer, nullable=False),
    Column("data", LargeBinary, nullable=False),
)

runs = Table(
    "runs",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("name", String(128), nullable=False, index=True),
    Column("created", Float, nullable=False),
    Column("status", String(16), nullable=False),  # running | finished
    Column("config", JSON, nullable=False),
    Column("structure", JSON, nullable=True),  # [[name, dtype, shape], ...]
    Column("init_weights", Boolean, nullable=True),
    Column("version", Integer, nullable=False),  # version of the latest global model, -1: none
    Column("aggregator_id", String(32), nullable=False),
)

agents = Table(
    "agents",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("name", String(128), nullable=False, unique=True),
    Column("token_hash", String(128), nullable=True),
    Column("created", Float, nullable=False),
    Column("last_seen", Float, nullable=False),
    Column("last_address", String(128), nullable=False),
    # operator-issued credentials (see fedstack.security.credentials)
    Column("credential_source", String(16), nullable=True),  # issued | enrolled | first-use
    Column("credential_created", Float, nullable=True),
    Column("revoked_at", Float, nullable=True),  # set: the credential is revoked
    # agent | operator (an operator credential opens the operator API, never a
    # federation; an agent credential never opens the operator API)
    Column("role", String(16), nullable=False, default="agent", server_default="agent"),
)

models = Table(
    "models",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("run_id", String(32), ForeignKey("runs.id"), nullable=False),
    Column("kind", String(16), nullable=False),  # local | cluster | semi-global
    Column("producer", String(32), nullable=False),  # agent id or aggregator id
    Column("round", Integer, nullable=False),
    Column("base_version", Integer, nullable=True),
    Column("num_samples", SAMPLES, nullable=False),
    Column("metrics", JSON, nullable=False),
    Column("blob", String(64), nullable=False),
    Column("nbytes", Integer, nullable=False),
    Column("created", Float, nullable=False),
    # local: initial | buffered | aggregated | stale | duplicate | late | rejected;
    # cluster: global; semi-global: delivered | synthesized | late
    Column("status", String(16), nullable=False),
    Column("upload_id", String(64), nullable=True, unique=True),
    Column("extra_blob", String(64), nullable=True),  # extra named arrays (strategy data)
    # local models in a federation: the member aggregator holding it (revision 0002)
    Column("cluster", String(32), nullable=True),
)
Index("ix_models_run_kind_round", models.c.run_id, models.c.kind, models.c.round)
Index("ix_models_run_status", models.c.run_id, models.c.status)
# retention asks which blobs are still referenced (revision 0002)
Index("ix_models_blob", models.c.blob)
Index("ix_models_extra_blob", models.c.extra_blob)
Index("ix_models_run_status_cluster", models.c.run_id, models.c.status, models.c.cluster)

lineage = Table(
    "lineage",
    metadata,
    Column("child_id", String(32), ForeignKey("models.id"), primary_key=True),
    Column("parent_id", String(32), ForeignKey("models.id"), primary_key=True),
    Column("relation", String(16), nullable=False),  # input | base
)

rounds = Table(
    "rounds",
    metadata,
    Column("run_id", String(32), ForeignKey("runs.id"), primary_key=True),
    Column("round", Integer, primary_key=True),
    Column("started", Float, nullable=False),
    Column("finished", Float, nullable=False),
    Column("seconds", Float, nullable=False),
    Column("model_id", String(32), ForeignKey("models.id"), nullable=False),
    Column("num_updates", Integer, nullable=False),
    Column("num_samples", SAMPLES, nullable=False),
    Column("metrics", JSON, nullable=False),
    Column("strategy_state", JSON, nullable=True),  # the strategy's scalars after the round
    Column("state_blob", String(64), nullable=True),  # ... and its arrays
)
Index("ix_rounds_state_blob", rounds.c.state_blob)

aggregators = Table(
    # the members of a run's federation (revision 0002): one row per (run, name), taken
    # over by a restarted member of that name; times on the database's clock
    "aggregators",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("run_id", String(32), ForeignKey("runs.id"), nullable=False),
    Column("name", String(128), nullable=False),
    Column("url", String(512), nullable=False),
    Column("upstream", String(512), nullable=True),
    Column("started", Float, nullable=False),
    Column("heartbeat", Float, nullable=False),
    Column("status", String(16), nullable=False),  # live | stopped
    Column("active_agents", Integer, nullable=False),
    Column("version", Integer, nullable=False),  # the global version the member is at
    # the latest round whose cluster is complete here (the sync synthesis barrier)
    Column("ready_round", Integer, nullable=False, default=-1, server_default="-1"),
    UniqueConstraint("run_id", "name", name="uq_aggregators_run_name"),
)

cluster_rounds = Table(
    # a member's cluster round: its semi-global model (revision 0002)
    "cluster_rounds",
    metadata,
    Column("run_id", String(32), ForeignKey("runs.id"), primary_key=True),
    Column("aggregator_id", String(32), primary_key=True),
    Column("round", Integer, primary_key=True),
    Column("model_id", String(32), ForeignKey("models.id"), nullable=False),
    Column("num_updates", Integer, nullable=False),
    Column("num_samples", SAMPLES, nullable=False),
    Column("started", Float, nullable=False),
    Column("finished", Float, nullable=False),
    Column("metrics", JSON, nullable=False),
    Column("strategy_state", JSON, nullable=True),  # the strategy's scalars after the round
    Column("state_blob", String(64), nullable=True),  # ... and its arrays
    Column("status", String(16), nullable=False),  # delivered | synthesized | late
)
Index("ix_cluster_rounds_run_round", cluster_rounds.c.run_id, cluster_rounds.c.round)

events = Table(
    "events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("time", Float, nullable=False),
    Column("run_id", String(32), nullable=True),
    Column("agent_id", String(32), nullable=True),
    Column("kind", String(32), nullable=False),
    Column("detail", JSON, nullable=False),
)
