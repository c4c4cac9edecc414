"""The agent's state machine (book section 5.3) and its stale-result rules, over loopback."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from fedstack import Agent, AggregatorConfig, ClientState, FederationFinished, Store
from fedstack.errors import RegistrationRefused
from fedstack.testing import aggregator_thread


def wait_until(cond: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


def m(v: float) -> dict[str, np.ndarray]:
    return {"w": np.full(3, v, np.float32)}


@pytest.mark.parametrize("delivery", ["push", "poll"])
def test_state_transitions(tmp_path: Path, delivery: str) -> None:
    cfg = AggregatorConfig(
        auth="off", port=0, db=str(tmp_path / "f.db"), rounds=2, delivery=delivery, finish_grace=2
    )
    with aggregator_thread(cfg) as agg:
        a = Agent(f"ws://127.0.0.1:{agg.port}", name="a")
        assert a.state == ClientState.waiting_gm
        a.send_initial_model(m(1))
        # (mypy keeps the narrowing of the assert above across send_initial_model())
        assert a.state == ClientState.sending  # type: ignore[comparison-overlap]
        a.start()
        assert a.state == ClientState.gm_ready  # sending -> gm_ready (welcome)
        assert a.delivery == delivery
        gm = a.wait_for_global_model(5)
        assert a.state == ClientState.training and a.version == 0  # gm_ready -> training
        np.testing.assert_array_equal(gm["w"], 1)
        a.send_trained_model(m(3), 2, {"acc": np.float32(0.5)})
        assert a.state in (ClientState.sending, ClientState.waiting_gm, ClientState.gm_ready)
        # sending -> waiting_gm (acknowledged) -> gm_ready (pushed or answered to a poll)
        wait_until(lambda: a.state == ClientState.gm_ready)
        assert len(a.acknowledged) == 1 and a.acknowledged[0].status == "accepted"
        np.testing.assert_array_equal(a.wait_for_global_model(5)["w"], 3)
        a.send_trained_model(m(5), 2)
        np.testing.assert_array_equal(a.wait_for_global_model(5)["w"], 5)  # final model
        assert a.send_trained_model(m(7), 2) is False  # nothing to train for any more
        with pytest.raises(FederationFinished):
            a.wait_for_global_model(5)
        a.close()
        store = Store(str(tmp_path / "f.db"))
        local = store.models(agg.run_id, "local")
        assert [x["metrics"] for x in local if x["round"] == 1] == [{"acc": 0.5}]
        store.close()


def test_push_discards_result_trained_on_stale_model(tmp_path: Path) -> None:
    """Book A3-14 / C5-07: a newer global model arrived during training -> discard."""
    cfg = AggregatorConfig(
        auth="off", port=0, db=str(tmp_path / "f.db"), threshold=0.5, rounds=3, finish_grace=2
    )
    with aggregator_thread(cfg) as agg:
        url = f"ws://127.0.0.1:{agg.port}"
        fast, slow = Agent(url, name="fast"), Agent(url, name="slow")
        fast.send_initial_model(m(0))
        fast.start()
        slow.start()
        wait_until(lambda: len(agg.sessions) == 2)
        fast.wait_for_global_model(5)
        slow.wait_for_global_model(5)  # slow is now "training" on version 0
        fast.send_trained_model(m(2), 1)  # threshold 0.5 of 2 agents: aggregates alone
        wait_until(lambda: slow.state == ClientState.gm_ready)  # pushed during training
        assert slow.send_trained_model(m(100), 1) is False  # stale result discarded
        np.testing.assert_array_equal(slow.wait_for_global_model(5)["w"], 2)
        assert slow.version == 1
        fast.close()
        slow.close()
        store = Store(str(tmp_path / "f.db"))
        producers = {
            x["producer"] for x in store.models(agg.run_id, "local") if x["status"] != "initial"
        }
        assert slow.agent_id not in producers  # the discarded model never left the agent
        store.close()


@pytest.mark.parametrize("policy,status", [("next", "accepted-late"), ("drop", "stale-dropped")])
def test_poll_stale_upload_follows_staleness_policy(
    tmp_path: Path, policy: str, status: str
) -> None:
    """Book A3-14: in polling mode a training agent does not poll, so its late result is
    uploaded; the aggregator's staleness policy decides (next round, or store only)."""
    cfg = AggregatorConfig(
        auth="off",
        port=0,
        db=str(tmp_path / "f.db"),
        threshold=0.5,
        rounds=3,
        delivery="poll",
        staleness=policy,
        finish_grace=2,
    )
    with aggregator_thread(cfg) as agg:
        url = f"ws://127.0.0.1:{agg.port}"
        fast, slow = Agent(url, name="fast"), Agent(url, name="slow")
        fast.send_initial_model(m(0))
        fast.start()
        slow.start()
        wait_until(lambda: len(agg.sessions) == 2)
        fast.wait_for_global_model(5)
        slow.wait_for_global_model(5)
        fast.send_trained_model(m(2), 1)
        wait_until(lambda: agg.state.version == 1)
        assert slow.state == ClientState.training  # polling: nothing arrived meanwhile
        assert slow.send_trained_model(m(6), 1) is True  # trained on version 0: stale
        wait_until(lambda: len(slow.acknowledged) == 1)
        assert slow.acknowledged[0].status == status
        store = Store(str(tmp_path / "f.db"))
        late = [x for x in store.models(agg.run_id, "local") if x["agent"] == "slow"]
        assert len(late) == 1 and late[0]["base_version"] == 0 and late[0]["round"] == 2
        if policy == "next":
            # counted in round 2, which it completes alone (threshold 0.5 of 2 agents)
            wait_until(lambda: agg.state.version == 2)
            r2 = store.rounds(agg.run_id)[1]
            np.testing.assert_array_equal(store.load_weights(r2["model_id"])["w"], 6)
            assert [p["id"] for p in store.parents(r2["model_id"]) if p["relation"] == "input"] == [
                late[0]["id"]
            ]
        else:
            time.sleep(0.3)
            assert agg.state.version == 1 and late[0]["status"] == "stale"
        store.close()
        fast.close()
        slow.close()


def test_same_name_and_token_is_the_same_agent(tmp_path: Path) -> None:
    cfg = AggregatorConfig(auth="off", port=0, db=str(tmp_path / "f.db"), finish_grace=1)
    with aggregator_thread(cfg) as agg:
        url = f"ws://127.0.0.1:{agg.port}"
        a = Agent(url, name="site-1", token="secret-1")
        a.send_initial_model(m(0))
        a.start()
        first_id = a.agent_id
        a.close()
        b = Agent(url, name="site-1", token="secret-1")
        b.start()
        assert b.agent_id == first_id
        b.close()
        intruder = Agent(url, name="site-1", token="guess")
        with pytest.raises(RegistrationRefused):
            intruder.start(timeout=10)
        intruder.close()
        store = Store(str(tmp_path / "f.db"))
        assert [x["name"] for x in store.list_agents()] == ["site-1"]
        store.close()


def test_continuous_operation_without_max_rounds(tmp_path: Path) -> None:
    cfg = AggregatorConfig(auth="off", port=0, db=str(tmp_path / "f.db"), rounds=None)
    with aggregator_thread(cfg) as agg:
        a = Agent(f"ws://127.0.0.1:{agg.port}", name="a")
        a.send_initial_model(m(0))
        a.start()
        for _ in range(12):
            gm = a.wait_for_global_model(5)
            a.send_trained_model({"w": gm["w"] + 1}, 1)
        np.testing.assert_array_equal(a.wait_for_global_model(5)["w"], 12)
        a.close()
        wait_until(lambda: not agg.sessions)
        assert not agg.state.finished and agg.state.version == 12
        assert not agg._finished.is_set()


def test_start_times_out_clearly_without_aggregator() -> None:
    from fedstack.testing import free_port

    a = Agent(f"ws://127.0.0.1:{free_port()}", name="lonely", max_backoff=0.2)
    with pytest.raises(TimeoutError, match="aggregator running"):
        a.start(timeout=1.0)


# ---------------------------------------------------------------- on an event loop, no thread
@pytest.mark.parametrize("delivery", ["push", "poll"])
def test_async_api_runs_agents_on_the_aggregators_loop(tmp_path: Path, delivery: str) -> None:
    """start_async / wait_for_global_model_async / flush_async / close_async: two agents as
    tasks of the loop that also runs the aggregator (no agent thread), same protocol."""
    import asyncio
    import threading

    from fedstack import Aggregator

    async def main() -> tuple[list[float], list[int], list[str]]:
        cfg = AggregatorConfig(
            auth="off",
            port=0,
            db=str(tmp_path / "a.db"),
            rounds=3,
            min_agents=2,
            threshold=1.0,
            delivery=delivery,
            finish_grace=0.0,
        )
        agg = Aggregator(cfg)
        await agg.start()

        async def one(name: str, step: float) -> list[int]:
            a = Agent(f"ws://127.0.0.1:{agg.port}", name=name)
            a.send_initial_model(m(0))
            await a.start_async(timeout=10)
            versions: list[int] = []
            try:
                while True:
                    try:
                        gm = await a.wait_for_global_model_async(timeout=10)
                    except FederationFinished:
                        return versions
                    versions.append(a.version)
                    if a.finished:
                        return versions
                    a.send_trained_model({"w": gm["w"] + step}, 1)
                    await a.flush_async(timeout=10)
                    assert a.acknowledged[-1].upload_id
            finally:
                await a.close_async()

        try:
            results = await asyncio.gather(one("x", 1.0), one("y", 3.0))
            agent_threads = [
                t.name for t in threading.enumerate() if t.name.startswith("fedstack-agent-")
            ]
            await asyncio.wait_for(agg.wait_finished(), 10)
            assert agg.global_weights is not None
            final = [float(v) for v in agg.global_weights["w"]]
        finally:
            await agg.stop()
        return final, [len(r) for r in results], agent_threads

    final, seen, agent_threads = asyncio.run(main())
    assert final == [6.0, 6.0, 6.0]  # three rounds of the mean step (1 + 3) / 2
    assert seen == [4, 4]  # v0..v3, the last one final
    assert agent_threads == []  # the agents ran as tasks, not threads


def test_async_waits_time_out_clearly() -> None:
    import asyncio

    from fedstack.testing import free_port

    async def main() -> None:
        a = Agent(f"ws://127.0.0.1:{free_port()}", name="lonely", max_backoff=0.2)
        t = time.monotonic()
        with pytest.raises(TimeoutError, match="aggregator running"):
            await a.start_async(timeout=0.5)
        assert time.monotonic() - t < 3
        with pytest.raises(RuntimeError, match="already started"):
            await a.start_async()

    asyncio.run(main())


def test_send_owned_model_never_lets_a_later_change_reach_the_upload(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """send_owned_model sends a fresh array uncopied (the in-process transport hands it
    over as it is), but an array the caller still holds is copied first: changing it
    right after the call must not change what the aggregator receives and stores."""
    import asyncio

    from fedstack import Aggregator

    async def main() -> tuple[list[float], list[float], list[float]]:
        cfg = AggregatorConfig(
            auth="off",
            transport="inproc",
            db=str(tmp_path / "a.db"),
            rounds=1,
            min_agents=1,
            threshold=1.0,
            finish_grace=0.0,
        )
        agg = Aggregator(cfg)
        # the aggregator stores only the extra arrays its strategy reads: keep them all
        monkeypatch.setattr(type(agg.strategy), "reads_extra", None)
        await agg.start()
        a = Agent(agg.url, name="owner")
        a.send_initial_model(m(0))
        try:
            await a.start_async(timeout=10)
            await a.wait_for_global_model_async(timeout=10)
            kept = np.full(3, 5.0, np.float32)
            fresh = np.full(2, 7.0, np.float32)
            assert a.send_owned_model({"w": kept}, 1, extra={"e": fresh})
            kept += 100.0  # the caller keeps working on its array at once
            del fresh
            await a.flush_async(timeout=10)
            await asyncio.wait_for(agg.wait_finished(), 10)
            assert agg.global_weights is not None
            final = [float(v) for v in agg.global_weights["w"]]
        finally:
            await a.close_async()
            await agg.stop()
        store = Store(str(tmp_path / "a.db"))
        try:
            local = [r for r in store.models(kind="local") if r["round"] == 1]
            assert len(local) == 1
            w = store.load_weights(local[0]["id"])["w"]
            e = store.load_extra(local[0]["id"])["e"]
        finally:
            store.close()
        return final, [float(v) for v in w], [float(v) for v in e]

    final, stored, extra = asyncio.run(main())
    assert final == [5.0, 5.0, 5.0]
    assert stored == [5.0, 5.0, 5.0]
    assert extra == [7.0, 7.0]


def test_an_agent_keeps_no_global_model_it_handed_over(tmp_path: Path) -> None:
    """Neither the agent nor its connection keeps a global model (or the welcome's) once
    the trainer has it: over the in-process transport, the message buffers of round r
    are free again when round r+1 is fanned out, so the buffers in use stay at one per
    agent (plus what is in flight) instead of growing with every copy held."""
    import asyncio

    from fedstack import Aggregator

    n_agents, rounds = 3, 6
    big = 600_000  # float32: 2.4 MB messages, pooled

    async def main() -> tuple[int, int]:
        cfg = AggregatorConfig(
            auth="off",
            transport="inproc",
            db=str(tmp_path / "a.db"),
            rounds=rounds,
            min_agents=n_agents,
            threshold=1.0,
            finish_grace=0.0,
        )
        agg = Aggregator(cfg)
        await agg.start()

        async def one(i: int) -> None:
            a = Agent(agg.url, name=f"a{i}")
            a.send_initial_model({"w": np.zeros(big, np.float32)})
            await a.start_async(timeout=10)
            try:
                while True:
                    try:
                        gm = await a.wait_for_global_model_async(timeout=10)
                    except FederationFinished:
                        return
                    if a.finished:
                        return
                    a.send_owned_model({"w": gm["w"] + 1.0}, 1)
                    del gm
            finally:
                await a.close_async()

        try:
            await asyncio.gather(*(one(i) for i in range(n_agents)))
            await asyncio.wait_for(agg.wait_finished(), 10)
            pool = agg._inproc.pool  # type: ignore[union-attr]
            return len(pool._bufs), pool.reused
        finally:
            await agg.stop()

    buffers, reused = asyncio.run(main())
    # welcome + `rounds` global models went to each agent: all but ~2 per agent reused
    assert buffers <= 2 * n_agents, buffers
    assert reused >= (rounds + 1) * n_agents - 2 * n_agents, reused
