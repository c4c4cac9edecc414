"""A test agent with a state directory, run as a subprocess by test_persistence.py.

    python persist_agent_proc.py --url URL --name N --state-dir DIR [--report FILE]

"Training" adds 1 to every weight. The report (JSON) holds the agent id, every version
received and every acknowledgement (upload id, status, message).

``AddOne`` is the same training as a Trainer, for ``fedstack agent --trainer
persist_agent_proc:AddOne`` (with this directory on PYTHONPATH).
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np

from fedstack import Agent, FederationFinished


def initial() -> dict[str, np.ndarray]:
    return {"w": np.zeros((4, 3), np.float32)}


class AddOne:
    def __init__(self, delay: str = "0") -> None:
        self.delay = float(delay)

    def initial_weights(self) -> dict[str, np.ndarray]:
        return initial()

    def fit(self, weights: dict[str, np.ndarray], config: dict[str, Any]) -> Any:
        time.sleep(self.delay)
        return {k: v + 1 for k, v in weights.items()}, 10, {"v": config["version"]}

    def evaluate(self, weights: dict[str, np.ndarray], config: dict[str, Any]) -> Any:
        return {"w0": float(weights["w"].flat[0])}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--state-dir", required=True)
    p.add_argument("--report")
    args = p.parse_args()
    agent = Agent(args.url, name=args.name, state_dir=args.state_dir, max_backoff=0.5)
    agent.send_initial_model(initial())
    agent.start(timeout=60)
    print("started", agent.agent_id, flush=True)
    versions = []
    gm: dict[str, np.ndarray] = {}
    try:
        while True:
            try:
                gm = agent.wait_for_global_model(timeout=60)
            except FederationFinished:
                break
            versions.append(agent.version)
            trained = {k: v + 1 for k, v in gm.items()}
            sent = agent.send_trained_model(trained, num_samples=10, metrics={"v": agent.version})
            print("sent" if sent else "discarded", agent.version, flush=True)
    finally:
        agent.close()
    if args.report:
        with open(args.report, "w") as f:
            json.dump(
                {
                    "agent_id": agent.agent_id,
                    "versions": versions,
                    "acked": [[a.upload_id, a.status, a.message] for a in agent.acknowledged],
                    "final": {k: v.tolist() for k, v in gm.items()},
                },
                f,
            )


if __name__ == "__main__":
    main()
