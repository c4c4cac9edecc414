"""The book's minimal example (chapter 6): agents that "train" by returning fixed arrays.

Run an aggregator, then two agents::

    fedstack aggregator --port 8765 --db minimal.db --rounds 3 --min-agents 2 --auth off
    python examples/minimal/minimal_engine.py --name a1
    python examples/minimal/minimal_engine.py --name a2

Agent ``a1`` returns model1=[[1,2,3],[4,5,6]], model2=[[1,2],[3,4]] and ``a2`` returns
[[3,4,5],[6,7,8]], [[3,4],[5,6]]; with equal sample counts the global model is
model1=[[2,3,4],[5,6,7]], model2=[[2,3],[4,5]] (the mean).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from fedstack import Agent, FederationFinished
from fedstack.types import Weights

MODELS = {
    "a1": {"model1": [[1, 2, 3], [4, 5, 6]], "model2": [[1, 2], [3, 4]]},
    "a2": {"model1": [[3, 4, 5], [6, 7, 8]], "model2": [[3, 4], [5, 6]]},
}


def init_models(name: str) -> Weights:
    """The template model (the book's ``init_models``)."""
    fixed = MODELS.get(name, MODELS["a1"])
    return {k: np.array(v, dtype=np.float32) for k, v in fixed.items()}


def training(name: str, models: Weights, sleep: float = 0.0) -> Weights:
    """The book's stand-in for training: wait, then return the agent's fixed arrays."""
    time.sleep(sleep)
    return init_models(name)


def run(url: str, name: str, sleep: float = 0.0) -> list[tuple[int, Weights]]:
    """Run the minimal engine until the federation finishes; return the global models seen."""
    agent = Agent(url, name=name)
    agent.send_initial_model(init_models(name))
    agent.start_fl_client()
    seen: list[tuple[int, Weights]] = []
    try:
        while True:
            try:
                gm = agent.wait_for_global_model()
            except FederationFinished:
                break
            seen.append((agent.version, {k: np.array(v) for k, v in gm.items()}))
            print(
                f"{name}: global model v{agent.version}: "
                + ", ".join(f"{k}={v.tolist()}" for k, v in gm.items()),
                flush=True,
            )
            agent.send_trained_model(training(name, gm, sleep), num_samples=1)
    finally:
        agent.close()
    return seen


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="ws://127.0.0.1:8765")
    p.add_argument("--name", default="a1")
    p.add_argument("--sleep", type=float, default=0.0, help="seconds of pretend training")
    args = p.parse_args()
    run(args.url, args.name, args.sleep)


if __name__ == "__main__":
    main()
