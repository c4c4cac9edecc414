"""Issue 12's accuracy acceptance: digits, Dirichlet(0.5) over 9 agents, 20 rounds; a
horizontal federation of 3 aggregators x 3 agents ends within 1 accuracy point of one
aggregator with the same 9 agents.

The federated run starts its agents so that the clusters begin round 1 together (as
``fedstack demo --aggregators`` does): sync synthesis waits only for the members the store
shows at the round with agents, and a digits round (milliseconds) is much shorter than a
heartbeat. Both federations run in this process on one event loop: real :class:`Aggregator` objects
(the 3 members each with its OWN :class:`Store` on one SQLite file, ``synthesis`` sync) on
real loopback sockets, and 9 real :class:`Agent` objects through the book's API (their
async form), each training :class:`DigitsLinearTrainer` on its share. Everything is
seeded (partition, initial model, minibatch order, aggregator seed), so a run is
deterministic up to the order of floating-point additions.

With FedAvg and every agent in every round, a sample-weighted synthesis of the clusters'
sample-weighted averages IS the sample-weighted average over all agents, so the two
federations should compute the same global models up to rounding; the test also checks
the federation's structure in the store (one semi-global model per member and round,
the global model made from them).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fedstack import Agent, AggregatorConfig, FederationFinished, Store, aio
from fedstack.aggregator import Aggregator
from fedstack.store import Member
from fedstack.trainers.digits import DigitsLinearTrainer, evaluate_global
from fedstack.types import Weights

AGENTS = 9
ROUNDS = 20
PARTITION = "dirichlet:0.5"
SEED = 0
TIMEOUT = 60.0


def _config(db: Path, run_name: str, min_agents: int, name: str | None) -> AggregatorConfig:
    fed: dict[str, Any] = (
        {
            "name": name,
            "synthesis": "sync",
            "synthesis_timeout": 30.0,
            "federation_heartbeat": 0.2,
            "liveness_timeout": 5.0,
        }
        if name is not None
        else {}
    )
    return AggregatorConfig(
        host="127.0.0.1",
        port=0,
        db=str(db),
        run_name=run_name,
        rounds=ROUNDS,
        threshold=1.0,
        min_agents=min_agents,
        round_timeout=TIMEOUT,
        auth="off",
        finish_grace=5.0,
        seed=SEED,
        **fed,
    )


async def _agent(url: str, index: int, out: dict[int, Weights]) -> int:
    """One agent until the federation finishes; returns how many models it trained."""
    trainer = DigitsLinearTrainer(index=index, num_agents=AGENTS, partition=PARTITION, seed=SEED)
    agent = Agent(url, name=f"agent-{index}", max_backoff=0.5, connect_timeout=TIMEOUT)
    agent.send_initial_model(trainer.initial_weights(), trainer.num_samples)
    fits = 0
    try:
        await agent.start_async(timeout=TIMEOUT)
        while True:
            try:
                gm = await agent.wait_for_global_model_async(timeout=TIMEOUT)
            except FederationFinished:
                break
            if agent.finished:
                out[index] = {k: np.array(v) for k, v in gm.items()}
                break
            weights, n, metrics = trainer.fit(gm, {})
            agent.send_trained_model(weights, n, metrics)
            fits += 1
        await agent.flush_async(timeout=TIMEOUT)
    finally:
        await agent.close_async()
    return fits


async def _federation(
    db: Path, run_name: str, clusters: list[list[int]], federated: bool, staged: bool = True
) -> dict[str, Any]:
    stores = [await asyncio.to_thread(Store, str(db)) for _ in clusters]
    aggs = [
        Aggregator(
            _config(db, run_name, len(c), f"m{j + 1}" if federated else None), store=stores[j]
        )
        for j, c in enumerate(clusters)
    ]
    finals: dict[int, Weights] = {}
    t0 = time.monotonic()
    try:
        for agg in aggs:  # one after the other: the first creates the run
            await agg.start()
        home = {i: aggs[j] for j, c in enumerate(clusters) for i in c}
        agents: list[asyncio.Future[int]] = []

        def start(i: int) -> None:
            agents.append(asyncio.ensure_future(_agent(home[i].url, i, finals)))

        if not (federated and staged):
            for i in home:
                start(i)
        else:
            # a synchronous start, as `fedstack demo --aggregators` does: the first agent
            # brings the first model; once every member holds it, the other members'
            # agents; once the store shows them with their clusters, the first member's
            # remaining agents (a member seen without agents is not waited for)
            first, rest = clusters[0][0], clusters[0][1:]
            start(first)
            await _until(stores[0], aggs, lambda m: m.version >= 0)
            for c in clusters[1:]:
                for i in c:
                    start(i)
            await _until(
                stores[0],
                aggs,
                lambda m: m.id == aggs[0].aggregator_id or m.active_agents >= len(clusters[1]),
            )
            for i in rest:
                start(i)
        fits = await asyncio.wait_for(asyncio.gather(*agents), 2 * TIMEOUT)
        await asyncio.wait_for(asyncio.gather(*(a.wait_finished() for a in aggs)), TIMEOUT)
        run_id = aggs[0].run_id
        rounds = await asyncio.to_thread(stores[0].rounds, run_id)
        semi = await asyncio.to_thread(stores[0].models, run_id, "semi-global")
        final_id = rounds[-1]["model_id"]
        final = await asyncio.to_thread(stores[0].load_weights, final_id)
        parents = await asyncio.to_thread(stores[0].parents, final_id)
    finally:
        for agg in aggs:
            await agg.stop()
        for s in stores:
            await asyncio.to_thread(s.close)
    return {
        "seconds": time.monotonic() - t0,
        "fits": fits,
        "rounds": rounds,
        "semi": semi,
        "final": final,
        "parents": parents,
        "received": finals,
        "run_ids": {a.run_id for a in aggs},
        "member_ids": [a.aggregator_id for a in aggs],
    }


async def _until(store: Store, aggs: list[Aggregator], ok: Callable[[Member], bool]) -> None:
    """Wait until the store shows every member satisfying ``ok`` (bounded)."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        view = await asyncio.to_thread(store.federation_view, aggs[0].run_id, 1, liveness=5.0)
        if len(view.members) == len(aggs) and all(ok(m) for m in view.members):
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the members did not reach the expected state in time")


def _run(
    db: Path, run_name: str, clusters: list[list[int]], federated: bool, staged: bool = True
) -> dict[str, Any]:
    with aio.runner() as r:
        result: dict[str, Any] = r.run(_federation(db, run_name, clusters, federated, staged))
    return result


def test_three_aggregators_match_one(tmp_path: Path) -> None:
    # agents 0-2 on m1, 3-5 on m2, 6-8 on m3: the same 9 data shares in both runs
    fed = _run(tmp_path / "fed.db", "horizontal", [[0, 1, 2], [3, 4, 5], [6, 7, 8]], True)
    one = _run(tmp_path / "one.db", "single", [list(range(AGENTS))], False)

    for res in (fed, one):
        assert [r["round"] for r in res["rounds"]] == list(range(1, ROUNDS + 1))
        assert all(r["num_updates"] == AGENTS for r in res["rounds"])
        assert res["fits"] == [ROUNDS] * AGENTS
        # every agent received the same final global model, the stored one
        assert sorted(res["received"]) == list(range(AGENTS))
        for w in res["received"].values():
            assert all(np.array_equal(w[k], res["final"][k]) for k in res["final"])

    # the federation in the store: one run, three members, a semi-global model per member
    # and round, the global model of the last round made from the three of that round
    assert len(fed["run_ids"]) == 1 and len(set(fed["member_ids"])) == 3
    semi = fed["semi"]
    assert len(semi) == 3 * ROUNDS
    assert {(m["round"], m["producer"]) for m in semi} == {
        (r, a) for r in range(1, ROUNDS + 1) for a in fed["member_ids"]
    }
    inputs = [p for p in fed["parents"] if p["relation"] == "input"]
    assert sorted(p["kind"] for p in inputs) == ["semi-global"] * 3
    assert all(p["round"] == ROUNDS for p in inputs)
    assert sum(p["num_samples"] for p in inputs) == fed["rounds"][-1]["num_samples"]
    assert fed["rounds"][-1]["num_samples"] == one["rounds"][-1]["num_samples"]

    acc_fed = float(evaluate_global(fed["final"])["accuracy"])
    acc_one = float(evaluate_global(one["final"])["accuracy"])
    drift = max(float(np.max(np.abs(fed["final"][k] - one["final"][k]))) for k in one["final"])
    assert acc_one >= 0.90, acc_one
    assert abs(acc_fed - acc_one) <= 0.01, (acc_fed, acc_one, drift)
    # FedAvg of FedAvgs weighted by samples is FedAvg: only rounding tells them apart
    assert drift < 1e-3, drift
