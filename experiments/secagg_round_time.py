"""Per-round wall time of secure aggregation (``secagg``) against plain FedAvg: a real
aggregator and N real agents over 127.0.0.1 in one process, a fixed synthetic update of P
float32 parameters per agent (no training), 3 rounds; the store's round seconds.

    PYTHONPATH=src python experiments/secagg_round_time.py [--agents 10] [--params 100000 1000000]

(The full comparison with Flower's SecAgg+ is ``bench/secagg_cost.py``.)
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile

import numpy as np

from fedstack import Agent, AggregatorConfig, FederationFinished
from fedstack.aggregator import Aggregator


async def run(n: int, p: int, secagg: bool, rounds: int = 3) -> list[float]:
    with tempfile.TemporaryDirectory() as d:
        cfg = AggregatorConfig(
            port=0,
            host="127.0.0.1",
            db=f"{d}/x.db",
            rounds=rounds,
            min_agents=n,
            secagg=secagg,
            auth="off",
            finish_grace=0.0,
        )
        agg = Aggregator(cfg)
        await agg.start()
        url = f"ws://127.0.0.1:{agg.port}"
        updates = [np.random.default_rng(i).normal(0, 0.1, p).astype(np.float32) for i in range(n)]

        async def one(i: int) -> None:
            a = Agent(url, name=f"a{i}")
            a.send_initial_model({"w": np.zeros(p, np.float32)})
            await a.start_async(timeout=60)
            try:
                while True:
                    gm = await a.wait_for_global_model_async(timeout=120)
                    if a.finished:
                        return
                    a.send_trained_model({"w": gm["w"] + updates[i]}, 10)
            except FederationFinished:
                return
            finally:
                await a.close_async()

        await asyncio.gather(*(one(i) for i in range(n)))
        await asyncio.wait_for(agg.wait_finished(), 60)
        assert agg.store is not None
        seconds = [float(r["seconds"]) for r in agg.store.rounds(agg.run_id)]
        await agg.stop()
        return seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--agents", type=int, default=10)
    p.add_argument("--params", type=int, nargs="+", default=[100_000, 1_000_000])
    args = p.parse_args()
    for params in args.params:
        for secagg in (False, True):
            secs = asyncio.run(run(args.agents, params, secagg))
            print(
                f"agents={args.agents} params={params:,} secagg={secagg}: round seconds "
                f"{[round(s, 3) for s in secs]} (rounds 2-3 median {np.median(secs[1:]):.3f})"
            )


if __name__ == "__main__":
    main()
