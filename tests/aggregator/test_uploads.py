"""Uploads: batch planning (pure) and the committer (the store thread only stores)."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures as cf
import functools
import threading
import weakref
from typing import Any

import numpy as np
import pytest

from fedstack.aggregator.events import BatchCommitted, UploadReceived
from fedstack.aggregator.registry import Session
from fedstack.aggregator.rounds import RoundState, UploadStatus
from fedstack.aggregator.uploads import Committer, check_upload, plan_batch, upload_id_problem
from fedstack.errors import InvalidUpdate
from fedstack.store import UploadRecord
from fedstack.strategies import FedAvg, Update
from fedstack.wire import ModelUpload


def session(agent: str) -> Session:
    return Session(agent, agent, None, "x")  # type: ignore[arg-type]


def upload(agent: str, base: int = 2, uid: str = "") -> UploadReceived:
    msg = ModelUpload(
        upload_id=uid or f"{agent}-{base}",
        base_version=base,
        model={"w": np.ones(2, np.float32)},
        num_samples=3,
        metrics={},
    )
    fut: asyncio.Future[Any] = asyncio.Future(loop=asyncio.new_event_loop())
    return UploadReceived(session(agent), msg, None, fut)


def state(**kw: Any) -> RoundState:
    st = RoundState(
        threshold=kw.pop("threshold", 1.0),
        min_agents=1,
        round_timeout=None,
        max_rounds=None,
        staleness_policy=kw.pop("staleness", "next"),
        **kw,
    )
    st.start(2, 0.0)
    return st


def test_plan_batch_stops_at_the_upload_that_makes_the_round_ready() -> None:
    st = state(threshold=0.5)  # 4 active: 2 make a round
    q = collections.deque([upload("a"), upload("a", uid="again"), upload("b", base=1), upload("c")])
    batch = plan_batch(q, st, now=0.0, active=4)
    assert [(p.upload.session.agent_id, p.status) for p in batch] == [
        ("a", UploadStatus.CURRENT),
        ("a", UploadStatus.DUPLICATE),
        ("b", UploadStatus.NEXT),
    ]
    assert [u.session.agent_id for u in q] == ["c"]  # left for the next round
    assert batch[2].update.staleness == 1 and batch[2].round == 3
    assert st.contributors == {}  # planning does not count: the owner counts once stored


def test_plan_batch_drop_policy_and_finished_federation() -> None:
    st = state(staleness="drop")
    batch = plan_batch(collections.deque([upload("a", base=0)]), st, 0.0, 2)
    assert batch[0].status is UploadStatus.DROP and batch[0].status.stored == "stale"
    st.max_rounds = 2
    batch = plan_batch(collections.deque([upload("a", base=2)]), st, 0.0, 2)
    assert batch[0].status is UploadStatus.FINISHED and batch[0].status.stored == "late"


def test_check_upload_refuses_what_cannot_count() -> None:
    msg = ModelUpload(
        upload_id="u",
        base_version=3,
        model={"w": np.ones(2, np.float32)},
        num_samples=1,
        metrics={},
    )
    kw: dict[str, Any] = {
        "agent_id": "a",
        "version": 2,
        "round": 3,
        "structure": [("w", "float32", (2,))],
        "global_weights": {"w": np.zeros(2, np.float32)},
        "strategy": FedAvg(),
        "max_num_samples": 10,
    }
    with pytest.raises(InvalidUpdate, match="never issued"):
        check_upload(msg, **kw)
    with pytest.raises(InvalidUpdate, match="num_samples"):
        check_upload(
            ModelUpload(upload_id="u", base_version=1, model=msg.model, num_samples=11, metrics={}),
            **kw,
        )
    check_upload(
        ModelUpload(upload_id="u", base_version=1, model=msg.model, num_samples=1, metrics={}), **kw
    )
    assert upload_id_problem("") and upload_id_problem("x" * 65)
    assert upload_id_problem("x" * 64) is None


class RecordingAccumulator:
    def __init__(self) -> None:
        self.threads: list[str] = []
        self.updates: list[Update] = []

    def add(self, update: Update) -> None:
        self.threads.append(threading.current_thread().name)
        self.updates.append(update)


class FakeStore:
    def __init__(self) -> None:
        self.threads: list[str] = []

    def add_uploads(self, run_id: str, uploads: Any) -> list[tuple[UploadRecord, bool]]:
        self.threads.append(threading.current_thread().name)
        return [
            (
                UploadRecord(
                    f"m-{u['upload_id']}",
                    u["agent_id"],
                    u["upload_id"],
                    u["round"],
                    u["base_version"],
                    u["num_samples"],
                    u["status"],
                    u["metrics"],
                ),
                u["upload_id"] != "seen",
            )
            for u in uploads
        ]


@pytest.mark.parametrize("big", [False, True])
def test_committer_stores_on_the_store_thread_and_counts_elsewhere(big: bool) -> None:
    store, acc = FakeStore(), RecordingAccumulator()
    db_thread = cf.ThreadPoolExecutor(1, thread_name_prefix="fedstack-store")
    compute_thread = cf.ThreadPoolExecutor(1, thread_name_prefix="fedstack-compute")

    async def main() -> BatchCommitted:
        loop = asyncio.get_running_loop()
        posted: asyncio.Queue[BatchCommitted] = asyncio.Queue()

        async def db(fn: Any, *args: Any, **kw: Any) -> Any:
            return await loop.run_in_executor(db_thread, functools.partial(fn, *args, **kw))

        async def compute(fn: Any, *args: Any, nbytes: int = 0) -> Any:
            if big:
                return await loop.run_in_executor(compute_thread, functools.partial(fn, *args))
            return fn(*args)

        committer = Committer(
            db=db,
            compute=compute,
            store=lambda: store,  # type: ignore[arg-type,return-value]
            run_id=lambda: "r",
            gate=None,
            gate_check=lambda w: None,
            accumulator=lambda: acc,  # type: ignore[arg-type,return-value]
            post=posted.put,
        )
        task = asyncio.ensure_future(committer.run())
        st = state()
        q = collections.deque([upload("a"), upload("b", uid="seen"), upload("c", base=1)])
        committer.submit(plan_batch(q, st, 0.0, 5))
        ev = await asyncio.wait_for(posted.get(), 10)
        task.cancel()
        return ev

    try:
        ev = asyncio.run(main())
    finally:
        db_thread.shutdown()
        compute_thread.shutdown()
    assert ev.error is None
    assert [created for _, created, _ in ev.results] == [True, False, True]
    assert store.threads == ["fedstack-store_0"]  # one transaction for the batch
    # only what this batch stored is counted, with its model id, never on the store thread
    assert [u.model_id for u in acc.updates] == ["m-a-2", "m-c-1"]
    assert acc.threads and not any(t.startswith("fedstack-store") for t in acc.threads)
    assert all(t.startswith("fedstack-compute") for t in acc.threads) == big


class CountingAccumulator:
    """Counts updates without keeping them (a real accumulator keeps sums, not models)."""

    def __init__(self) -> None:
        self.added = 0

    def add(self, update: Update) -> None:
        self.added += 1


def test_committer_lets_go_of_a_committed_batch() -> None:
    """An upload's receive buffer holds bytes of the upload budget until it is freed: a
    committer that kept its last batch while waiting for the next one would hold back the
    next big upload until some other batch came (uploads received one by one)."""
    store, acc = FakeStore(), CountingAccumulator()

    async def main() -> list[bool]:
        posted: asyncio.Queue[BatchCommitted] = asyncio.Queue()

        async def inline(fn: Any, *args: Any, nbytes: int = 0, **kw: Any) -> Any:
            return fn(*args, **kw)

        committer = Committer(
            db=inline,
            compute=inline,
            store=lambda: store,  # type: ignore[arg-type,return-value]
            run_id=lambda: "r",
            gate=None,
            gate_check=lambda w: None,
            accumulator=lambda: acc,  # type: ignore[arg-type,return-value]
            post=posted.put,
        )
        task = asyncio.ensure_future(committer.run())
        ups = [upload("a"), upload("b")]
        buffers = [weakref.ref(u.msg.model["w"]) for u in ups]
        committer.submit(plan_batch(collections.deque(ups), state(), 0.0, 5))
        del ups
        async with asyncio.timeout(10):
            ev = await posted.get()
        assert ev.error is None and [created for _, created, _ in ev.results] == [True, True]
        del ev  # the owner is done with the batch
        await asyncio.sleep(0)  # the committer waits for the next batch
        alive = [ref() is not None for ref in buffers]
        task.cancel()
        return alive

    assert asyncio.run(main()) == [False, False]
    assert acc.added == 2
