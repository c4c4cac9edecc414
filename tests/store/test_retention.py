"""Retention of local models in the store (:meth:`Store.prune_local_models`, issue 16
finding 5): pruned records stay without weights, blobs no longer named are deleted, a
blob another record still names is kept."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

from fedstack.errors import StoreError
from fedstack.store import Store, UploadRecord
from fedstack.store import schema as s
from fedstack.wire.tensors import structure


def weights(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"w": rng.standard_normal((3, 4)).astype(np.float32), "b": rng.standard_normal(4)}


def init_run(store: Store) -> tuple[str, str, str]:
    run = store.open_run("r", {}, "agg")
    agent, _ = store.register_agent("a0", None, "127.0.0.1:1")
    w = weights(0)
    gid = store.init_federation(
        run.id,
        agent_id=agent,
        structure=structure(w),
        init_weights=True,
        initial=w,
        global_weights=w,
        num_samples=1,
        metrics={},
        aggregator_id="agg",
    )
    return run.id, agent, gid


def upload(store: Store, run: str, agent: str, uid: str, rnd: int, seed: int) -> UploadRecord:
    rec, _ = store.add_upload(
        run,
        agent_id=agent,
        upload_id=uid,
        round=rnd,
        base_version=rnd - 1,
        num_samples=1,
        metrics={},
        weights=weights(seed),
        status="buffered",
    )
    return rec


def commit(store: Store, run: str, rnd: int, inputs: list[str], base: str, seed: int) -> str:
    return store.commit_round(
        run,
        round=rnd,
        weights=weights(seed),
        inputs=inputs,
        base_model_id=base,
        num_samples=1,
        metrics={},
        started=1.0,
        finished=2.0,
        aggregator_id="agg",
    )


@pytest.mark.parametrize("inline", [0, 1 << 20], ids=["files", "inline"])
def test_prune_keeps_records_and_shared_blobs(tmp_path: Path, inline: int) -> None:
    store = Store(str(tmp_path / "fed.db"), inline_blob_bytes=inline)
    try:
        run, agent, gid = init_run(store)
        base = gid
        recs = []
        for rnd in (1, 2, 3):
            # round 3's upload has the content of round 1's: that blob must survive
            rec = upload(store, run, agent, f"u{rnd}", rnd, seed=1 if rnd in (1, 3) else 10 + rnd)
            recs.append(rec)
            base = commit(store, run, rnd, [rec.model_id], base, seed=50 + rnd)
        pruned, deleted = store.prune_local_models(run, 2)
        assert pruned == 2 and deleted == 1  # round 2's blob; round 1's is shared
        assert store.prune_local_models(run, 2) == (0, 0)  # idempotent
        with store.engine.connect() as c:
            blobs = dict(
                c.execute(
                    select(s.models.c.upload_id, s.models.c.blob).where(
                        s.models.c.upload_id.in_(["u1", "u2", "u3"])
                    )
                ).all()
            )
        assert blobs["u1"] == "" and blobs["u2"] == ""
        for r in recs[:2]:
            with pytest.raises(StoreError, match="not kept"):
                store.load_weights(r.model_id)
        kept = store.load_weights(recs[2].model_id)  # the shared blob is intact
        assert all((kept[k] == v).all() for k, v in weights(1).items())
        assert store.load_weights(gid)  # global models are never pruned
        for rnd in (1, 2):
            assert store.global_model_id(run, rnd) is not None
    finally:
        store.close()


def test_retention_looks_blobs_up_by_index(tmp_path: Path) -> None:
    """Which blobs are still referenced is answered from indexes of a migrated store,
    not by scanning every model (the query plan of the statements retention runs)."""
    store = Store(str(tmp_path / "r.db"))
    wanted = ["a" * 64, "b" * 64]
    try:
        with store.engine.connect() as c:
            for col, index in (
                (s.models.c.blob, "ix_models_blob"),
                (s.models.c.extra_blob, "ix_models_extra_blob"),
                (s.rounds.c.state_blob, "ix_rounds_state_blob"),
            ):
                q = select(col).distinct().where(col.in_(wanted))
                sql = str(q.compile(store.engine, compile_kwargs={"literal_binds": True}))
                plan = " ".join(r[-1] for r in c.exec_driver_sql("EXPLAIN QUERY PLAN " + sql))
                assert index in plan and "SCAN" not in plan, plan
    finally:
        store.close()
