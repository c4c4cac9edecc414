"""A test agent run as a subprocess: "training" adds 1 to every weight after a delay.

    python agent_proc.py --url URL --name N [--delay S] [--report FILE] [--idle]

With ``--idle`` it joins and then never uploads (a hung or killed agent in tests).
The report (JSON) lists every version it received and every acknowledged upload id.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from fedstack import Agent, FederationFinished


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--delay", type=float, default=0.05)
    p.add_argument("--report")
    p.add_argument("--idle", action="store_true")
    args = p.parse_args()
    agent = Agent(args.url, name=args.name, max_backoff=0.5)
    agent.send_initial_model({"w": np.zeros((4, 3), np.float32), "b": np.zeros(3, np.float64)})
    agent.start(timeout=60)
    print("started", flush=True)
    if args.idle:
        while True:
            time.sleep(1)
    versions = []
    discarded = 0
    try:
        while True:
            try:
                gm = agent.wait_for_global_model(timeout=120)
            except FederationFinished:
                break
            versions.append(agent.version)
            time.sleep(args.delay)
            trained = {k: v + 1 for k, v in gm.items()}
            if not agent.send_trained_model(trained, num_samples=10, metrics={"v": agent.version}):
                discarded += 1
    finally:
        agent.close()
    if args.report:
        with open(args.report, "w") as f:
            json.dump(
                {
                    "versions": versions,
                    "acked": [a.upload_id for a in agent.acknowledged],
                    "final": {k: v.tolist() for k, v in gm.items()},
                    "reconnects": agent.reconnects,
                    "discarded": discarded,
                },
                f,
            )


if __name__ == "__main__":
    main()
