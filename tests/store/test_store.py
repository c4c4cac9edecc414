"""The model store over a temporary SQLite file."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import func, select

from fedstack.errors import RegistrationRefused, StoreError
from fedstack.store import Store
from fedstack.store import schema as s
from fedstack.types import Weights
from fedstack.wire.tensors import structure


def weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "w": rng.standard_normal((3, 4)).astype(np.float32),
        "b": rng.standard_normal(4),
        "h": rng.standard_normal(5).astype(np.float16),
        "steps": np.array([seed, 2 * seed], dtype=np.int64),
        "mask": np.array([True, False, seed % 2 == 0]),
        "u": np.arange(3, dtype=np.uint16) + seed,
    }


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "fed.db"


@pytest.fixture
def store(db: Path) -> Iterator[Store]:
    st = Store(str(db))
    yield st
    st.close()


def count(store: Store, table: Any, *where: Any) -> int:
    with store.engine.begin() as c:
        return int(c.execute(select(func.count()).select_from(table).where(*where)).scalar_one())


def blob_files(store: Store) -> list[Path]:
    return sorted(p for p in store.blobs.root.rglob("*") if p.is_file())


def init_run(store: Store, name: str = "r") -> tuple[str, str, str]:
    """A run with agent 'a0' and global model 0. Returns (run id, agent id, global id)."""
    run = store.open_run(name, {"threshold": 1.0}, "agg")
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


def upload(
    store: Store,
    run_id: str,
    agent: str,
    uid: str,
    rnd: int,
    seed: int,
    status: str = "buffered",
    base: int | None = None,
) -> Any:
    rec, created = store.add_upload(
        run_id,
        agent_id=agent,
        upload_id=uid,
        round=rnd,
        base_version=rnd - 1 if base is None else base,
        num_samples=10 + seed,
        metrics={"acc": seed / 10},
        weights=weights(seed),
        status=status,
    )
    return rec, created


def commit(
    store: Store, run_id: str, rnd: int, inputs: list[str], base: str | None, seed: int = 99
) -> str:
    return store.commit_round(
        run_id,
        round=rnd,
        weights=weights(seed),
        inputs=inputs,
        base_model_id=base,
        num_samples=20,
        metrics={"loss": 0.5},
        started=100.0,
        finished=102.5,
        aggregator_id="agg",
    )


# ---------------------------------------------------------------------------- runs
def test_open_run_creates_then_resumes_unfinished_run(store: Store) -> None:
    first = store.open_run("exp", {"rounds": 3}, "agg-1")
    assert not first.resumed
    assert (first.name, first.status, first.version) == ("exp", "running", -1)
    assert first.config == {"rounds": 3} and first.structure is None
    again = store.open_run("exp", {"rounds": 99}, "agg-2")
    assert again.resumed and again.id == first.id
    assert again.config == {"rounds": 3}  # the stored run, not the new arguments
    assert again.aggregator_id == "agg-1"
    other = store.open_run("other", {}, "agg-1")
    assert other.id != first.id and not other.resumed
    assert count(store, s.runs) == 2


def test_finished_runs_are_not_resumed(store: Store) -> None:
    first = store.open_run("exp", {}, "agg")
    store.finish_run(first.id)
    assert store.get_run(first.id).status == "finished"
    second = store.open_run("exp", {}, "agg")
    assert not second.resumed and second.id != first.id
    assert store.open_run("exp", {}, "agg").id == second.id
    assert store.latest_run_id() == second.id


def test_resumed_run_has_structure_and_version(store: Store) -> None:
    run_id, agent, gid = init_run(store)
    info = store.open_run("r", {}, "agg")
    assert info.id == run_id and info.version == 0 and info.init_weights is True
    assert info.structure == structure(weights(0))
    assert store.global_model_id(run_id, 0) == gid


def test_get_run_unknown_raises(store: Store) -> None:
    with pytest.raises(StoreError):
        store.get_run("nope")


# ---------------------------------------------------------------------------- agents
def test_register_agent_same_name_and_token(store: Store) -> None:
    aid, new = store.register_agent("alice", "tok", "10.0.0.1:5")
    assert new
    aid2, new2 = store.register_agent("alice", "tok", "10.0.0.2:6")
    assert (aid2, new2) == (aid, False)
    [row] = store.list_agents()
    assert row["last_address"] == "10.0.0.2:6"
    assert "token_hash" not in row


def test_register_agent_different_token_refused(store: Store) -> None:
    store.register_agent("alice", "tok", "a")
    with pytest.raises(RegistrationRefused):
        store.register_agent("alice", "other", "b")
    with pytest.raises(RegistrationRefused):
        store.register_agent("alice", None, "b")  # a bound name needs its token
    assert count(store, s.agents) == 1


def test_register_agent_token_is_bound_on_first_use(store: Store) -> None:
    aid, new = store.register_agent("bob", None, "a")
    assert new
    assert store.register_agent("bob", None, "a") == (aid, False)
    assert store.register_agent("bob", "t1", "a") == (aid, False)  # binds t1
    with store.engine.begin() as c:
        stored = c.execute(select(s.agents.c.token_hash)).scalar_one()
    assert stored == store.hash_token("t1") and "t1" not in stored  # only a hash is kept
    with pytest.raises(RegistrationRefused):
        store.register_agent("bob", "t2", "a")
    with pytest.raises(RegistrationRefused):
        store.register_agent("bob", None, "a")
    assert store.register_agent("bob", "t1", "a") == (aid, False)


def test_distinct_agents_get_distinct_ids(store: Store) -> None:
    a, _ = store.register_agent("a", None, "x")
    b, _ = store.register_agent("b", None, "x")
    assert a != b


# ---------------------------------------------------------------------------- uploads
def test_add_upload_is_idempotent_by_upload_id(store: Store) -> None:
    run_id, agent, _ = init_run(store)
    rec, created = upload(store, run_id, agent, "u-1", 1, 1)
    assert created
    assert (rec.upload_id, rec.round, rec.base_version, rec.num_samples, rec.status) == (
        "u-1",
        1,
        0,
        11,
        "buffered",
    )
    before = count(store, s.models)
    rec2, created2 = upload(store, run_id, agent, "u-1", 1, 2)  # different weights, same id
    assert not created2
    assert rec2 == rec
    assert count(store, s.models) == before
    assert count(store, s.models, s.models.c.upload_id == "u-1") == 1
    assert store.find_upload("u-1") == rec
    assert store.find_upload("nope") is None
    # the stored weights are the first ones
    got = store.load_weights(rec.model_id)
    assert np.array_equal(got["w"], weights(1)["w"])


# ---------------------------------------------------------------------------- rounds
def test_commit_round_writes_lineage_round_and_version(store: Store) -> None:
    run_id, agent, gid = init_run(store)
    b, _ = store.register_agent("a1", None, "x")
    r1, _ = upload(store, run_id, agent, "u-1", 1, 1)
    r2, _ = upload(store, run_id, b, "u-2", 1, 2)
    mid = commit(store, run_id, 1, [r1.model_id, r2.model_id], gid)

    assert store.get_run(run_id).version == 1
    assert store.global_model_id(run_id, 1) == mid
    parents = store.parents(mid)
    assert sorted((p["relation"], p["id"]) for p in parents) == sorted(
        [("input", r1.model_id), ("input", r2.model_id), ("base", gid)]
    )
    assert {p["agent"] for p in parents if p["relation"] == "input"} == {"a0", "a1"}
    for rid in (r1.model_id, r2.model_id):
        m = store.model(rid)
        assert m is not None and m["status"] == "aggregated"
    model = store.model(mid)
    assert model is not None
    assert (model["kind"], model["round"], model["status"], model["base_version"]) == (
        "cluster",
        1,
        "global",
        0,
    )
    [rnd] = store.rounds(run_id)
    assert (rnd["round"], rnd["model_id"], rnd["num_updates"], rnd["num_samples"]) == (
        1,
        mid,
        2,
        20,
    )
    assert rnd["seconds"] == pytest.approx(2.5)
    assert rnd["metrics"] == {"loss": 0.5}
    got = store.load_weights(mid)
    for k, v in weights(99).items():
        assert np.array_equal(got[k], v) and got[k].dtype == v.dtype

    # the next round builds on this one
    r3, _ = upload(store, run_id, agent, "u-3", 2, 3)
    mid2 = commit(store, run_id, 2, [r3.model_id], mid, seed=98)
    assert store.get_run(run_id).version == 2
    assert [r["round"] for r in store.rounds(run_id)] == [1, 2]
    assert ("base", mid) in {(p["relation"], p["id"]) for p in store.parents(mid2)}


@pytest.mark.parametrize("bad_round", [0, 2, 5, -1])
def test_commit_non_consecutive_round_writes_nothing(store: Store, bad_round: int) -> None:
    run_id, agent, gid = init_run(store)
    r1, _ = upload(store, run_id, agent, "u-1", 1, 1)
    counts = {t.name: count(store, t) for t in (s.models, s.lineage, s.rounds)}
    with pytest.raises(StoreError):
        commit(store, run_id, bad_round, [r1.model_id], gid)
    assert {t.name: count(store, t) for t in (s.models, s.lineage, s.rounds)} == counts
    assert store.get_run(run_id).version == 0
    m = store.model(r1.model_id)
    assert m is not None and m["status"] == "buffered"
    # and the right round still commits afterwards
    commit(store, run_id, 1, [r1.model_id], gid)
    with pytest.raises(StoreError):
        commit(store, run_id, 1, [r1.model_id], gid)  # the same round twice
    assert store.get_run(run_id).version == 1


def test_resume_state_returns_buffered_uploads_of_current_round(store: Store) -> None:
    run_id, agent, gid = init_run(store)
    b, _ = store.register_agent("a1", None, "x")
    c, _ = store.register_agent("a2", None, "x")
    r1, _ = upload(store, run_id, agent, "u-1", 1, 1)
    mid = commit(store, run_id, 1, [r1.model_id], gid)
    # round 2 in progress: two buffered, one stale-dropped
    r2, _ = upload(store, run_id, b, "u-2", 2, 2)
    upload(store, run_id, c, "u-3", 2, 3, status="stale", base=0)
    r4, _ = upload(store, run_id, agent, "u-4", 2, 4, base=0)  # stale, accepted ("next")
    state = store.resume_state(run_id)
    assert state.version == 1
    assert state.global_model_id == mid
    assert [r.upload_id for r in state.buffered] == ["u-2", "u-4"]
    assert [r.model_id for r in state.buffered] == [r2.model_id, r4.model_id]
    assert {r.agent_id for r in state.buffered} == {b, agent}
    assert all(r.status == "buffered" and r.round == 2 for r in state.buffered)
    assert state.buffered[1].base_version == 0
    assert state.buffered[0].metrics == {"acc": 0.2}


def test_resume_state_ignores_leftover_buffered_uploads_of_earlier_rounds(store: Store) -> None:
    run_id, agent, gid = init_run(store)
    b, _ = store.register_agent("a1", None, "x")
    r1, _ = upload(store, run_id, agent, "u-1", 1, 1)
    upload(store, run_id, b, "u-late", 1, 2)  # buffered in round 1 but not aggregated
    commit(store, run_id, 1, [r1.model_id], gid)
    upload(store, run_id, agent, "u-3", 2, 3)
    assert [r.upload_id for r in store.resume_state(run_id).buffered] == ["u-3"]


def test_resume_state_of_fresh_run(store: Store) -> None:
    run_id, _, gid = init_run(store)
    state = store.resume_state(run_id)
    assert (state.version, state.global_model_id, state.buffered) == (0, gid, [])


def test_update_round_metrics_merges(store: Store) -> None:
    run_id, agent, gid = init_run(store)
    r1, _ = upload(store, run_id, agent, "u-1", 1, 1)
    mid = commit(store, run_id, 1, [r1.model_id], gid)
    store.update_round_metrics(run_id, 1, {"val_acc": 0.9})
    store.update_round_metrics(run_id, 1, {"val_loss": 0.1, "loss": 0.4})
    want = {"loss": 0.4, "val_acc": 0.9, "val_loss": 0.1}
    assert store.rounds(run_id)[0]["metrics"] == want
    m = store.model(mid)
    assert m is not None and m["metrics"] == want
    with pytest.raises(StoreError):
        store.update_round_metrics(run_id, 7, {"x": 1})


# ---------------------------------------------------------------------------- blobs
def test_load_weights_identical_arrays_and_dtypes(store: Store) -> None:
    run_id, agent, _ = init_run(store)
    w = weights(5)
    w["big_endian"] = np.arange(4, dtype=">i4")
    w["empty"] = np.zeros((0, 2), np.float32)
    rec, _ = store.add_upload(
        run_id,
        agent_id=agent,
        upload_id="u",
        round=1,
        base_version=0,
        num_samples=1,
        metrics={},
        weights=w,
        status="buffered",
    )
    got = store.load_weights(rec.model_id)
    assert list(got) == list(w)
    for k, v in w.items():
        assert got[k].shape == v.shape, k
        assert got[k].dtype.name == v.dtype.name, k
        assert got[k].dtype.str[0] in "<|", k
        assert np.array_equal(got[k], v), k
    with pytest.raises(StoreError):
        store.load_weights("no-such-model")


def test_corrupted_blob_raises_store_error(store: Store) -> None:
    run_id, agent, _ = init_run(store)
    rec, _ = upload(store, run_id, agent, "u-1", 1, 7)
    m = store.model(rec.model_id)
    assert m is not None
    path = store.blobs.path(m["blob"])
    assert path.stat().st_size == m["nbytes"]
    data = bytearray(path.read_bytes())
    for pos in (0, len(data) // 2, len(data) - 1):  # magic, header/data, last byte
        flipped = bytearray(data)
        flipped[pos] ^= 0x01
        path.write_bytes(bytes(flipped))
        with pytest.raises(StoreError):
            store.load_weights(rec.model_id)
    path.write_bytes(bytes(data[:-10]))  # truncated
    with pytest.raises(StoreError):
        store.load_weights(rec.model_id)
    path.unlink()  # missing
    with pytest.raises(StoreError):
        store.load_weights(rec.model_id)
    path.write_bytes(bytes(data))  # restored: readable again
    assert np.array_equal(store.load_weights(rec.model_id)["w"], weights(7)["w"])


def test_same_weights_share_one_blob_file(store: Store) -> None:
    run_id, agent, _ = init_run(store)  # initial == global 0: already shared
    assert len(blob_files(store)) == 1
    before = blob_files(store)
    r1, _ = upload(store, run_id, agent, "u-1", 1, 3)
    r2, _ = upload(store, run_id, agent, "u-2", 1, 3)  # same weights, another upload
    files = blob_files(store)
    assert len(files) == len(before) + 1
    m1, m2 = store.model(r1.model_id), store.model(r2.model_id)
    assert m1 is not None and m2 is not None
    assert m1["blob"] == m2["blob"] and r1.model_id != r2.model_id
    upload(store, run_id, agent, "u-3", 1, 4)
    assert len(blob_files(store)) == len(before) + 2
    assert not [p for p in files if ".tmp" in p.name]


# ---------------------------------------------------------------------------- persistence
def test_database_is_one_persistent_file(db: Path) -> None:
    st = Store(str(db))
    run_id, agent, gid = init_run(st)
    r1, _ = upload(st, run_id, agent, "u-1", 1, 1)
    mid = commit(st, run_id, 1, [r1.model_id], gid)
    st.log_event("hello", {"x": 1}, run_id=run_id)
    st.close()
    assert db.is_file() and db.stat().st_size > 0
    assert (db.parent / "fed.db.blobs").is_dir()

    again = Store(str(db))
    try:
        info = again.open_run("r", {}, "agg-2")
        assert info.resumed and info.id == run_id and info.version == 1
        assert again.register_agent("a0", None, "x") == (agent, False)
        assert again.find_upload("u-1") is not None
        assert again.global_model_id(run_id, 1) == mid
        assert np.array_equal(again.load_weights(mid)["w"], weights(99)["w"])
        assert [e["kind"] for e in again.events(run_id)] == ["hello"]
    finally:
        again.close()
    # the same file through an explicit sqlite URL
    by_url = Store(f"sqlite:///{db}")
    try:
        assert by_url.latest_run_id() == run_id
    finally:
        by_url.close()


def test_non_sqlite_url_needs_blob_dir() -> None:
    with pytest.raises(StoreError):
        Store("mysql+pymysql://user@localhost/db")


def test_small_blobs_live_in_the_database_large_ones_in_files(tmp_path: Path) -> None:
    st = Store(str(tmp_path / "inline.db"), inline_blob_bytes=4096)
    try:
        run_id, agent, gid = init_run(st)
        assert blob_files(st) == []  # the initial and global models are small: inlined
        rec, _ = upload(st, run_id, agent, "u-small", 1, 3)
        assert blob_files(st) == []
        big: Weights = {"w": np.arange(4096, dtype=np.float32)}  # 16 KiB: a file
        rec2, created = st.add_upload(
            run_id,
            agent_id=agent,
            upload_id="u-big",
            round=1,
            base_version=0,
            num_samples=1,
            metrics={},
            weights=big,
            status="buffered",
        )
        assert created and len(blob_files(st)) == 1
        np.testing.assert_array_equal(st.load_weights(rec.model_id)["w"], weights(3)["w"])
        np.testing.assert_array_equal(st.load_weights(rec2.model_id)["w"], big["w"])
        assert st.put_blob(weights(1)) is None and st.put_blob(big) is not None
        # the same content is stored once
        upload(st, run_id, agent, "u-same", 1, 3)
        assert count(st, s.blob_data) == 2  # initial == global (same weights); u-small
        # a damaged row is detected by its hash, never decoded as if it were fine
        digest = st.model(rec.model_id)["blob"]  # type: ignore[index]
        with st.engine.begin() as c:
            c.execute(
                s.blob_data.update()
                .where(s.blob_data.c.digest == digest)
                .values(data=b"FSTB" + b"\0" * 60)
            )
        with pytest.raises(StoreError, match="corrupt"):
            st.load_weights(rec.model_id)
    finally:
        st.close()
    # a store opened without inlining still reads what is inlined
    st = Store(str(tmp_path / "inline.db"))
    try:
        np.testing.assert_array_equal(st.load_weights(rec2.model_id)["w"], big["w"])
        assert st.load_weights(gid)["w"].shape == (3, 4)
    finally:
        st.close()


# ---------------------------------------------------------------------------- checkpoints
def test_checkpoint_moves_the_log_into_the_database_file(
    store: Store, db: Path, tmp_path: Path
) -> None:
    """Commits land in the write-ahead log (the automatic checkpoint waits for 10,000
    pages); Store.checkpoint copies them into the database file itself."""
    import shutil
    import sqlite3

    run_id, agent, _ = init_run(store)
    for i in range(5):
        upload(store, run_id, agent, f"u{i}", 1, i)

    def uploads_in_file_alone() -> int:
        alone = tmp_path / f"alone-{len(list(tmp_path.glob('alone-*')))}.db"
        shutil.copy(db, alone)  # the database file without its -wal: checkpointed data only
        con = sqlite3.connect(alone)
        try:
            n = con.execute("SELECT count(*) FROM models WHERE kind = 'local'").fetchone()[0]
        except sqlite3.OperationalError:  # not even the tables are in the file yet
            n = 0
        con.close()
        return int(n)

    stored = len(store.models(run_id, "local"))
    assert stored == 6  # the five uploads and the initial model
    assert uploads_in_file_alone() < stored
    store.checkpoint()
    assert uploads_in_file_alone() == stored


def test_export_model_writes_safetensors_for_inlined_and_file_blobs(tmp_path: Path) -> None:
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    st = Store(str(tmp_path / "f.db"), inline_blob_bytes=4096)
    try:
        run = st.open_run("r", {}, "agg")
        agent, _ = st.register_agent("a", None, "x")
        small: Weights = {"w": np.arange(6, dtype=np.float32), "b": np.ones(2)}
        gid = st.init_federation(
            run.id,
            agent_id=agent,
            structure=[("w", "float32", (6,))],
            init_weights=True,
            initial=small,
            global_weights=small,
            num_samples=1,
            metrics={},
            aggregator_id="agg",
        )
        big: Weights = {"w": np.arange(4096, dtype=np.float32)}
        rec, _ = st.add_upload(
            run.id,
            agent_id=agent,
            upload_id="u",
            round=1,
            base_version=0,
            num_samples=1,
            metrics={},
            weights=big,
            status="buffered",
        )
        for model_id, want in ((gid, small), (rec.model_id, big)):
            out = st.export_model(model_id, tmp_path / f"{model_id}.safetensors")
            loaded = safetensors_numpy.load_file(str(out))
            assert set(loaded) == set(want)
            for k, v in want.items():
                np.testing.assert_array_equal(loaded[k], v)
        with pytest.raises(StoreError, match="no model"):
            st.export_model("nope", tmp_path / "x.safetensors")
    finally:
        st.close()
