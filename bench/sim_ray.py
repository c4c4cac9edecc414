"""Per-round time of the simulator's backends: local process pool vs Ray actors vs Ray tasks.

    .venv/bin/python bench/sim_ray.py            # needs the ray extra

Two workers each; the median round after the first two (trainers are built in those).
"""

from __future__ import annotations

import statistics
import tempfile
from typing import Any

from fedstack.sim import simulate

DIGITS = "fedstack.trainers.digits:DigitsLinearTrainer"
SYNTH = "fedstack.trainers.synthetic:SyntheticTrainer"
CASES: list[tuple[str, dict[str, Any], int, int | None]] = [
    (DIGITS, {"partition": "dirichlet:0.5", "epochs": 2}, 16, None),
    (SYNTH, {"max_samples": 200}, 1000, 20),
]
BACKENDS: list[tuple[str, str, dict[str, Any]]] = [
    ("local", "local", {}),
    ("ray-actors", "ray", {}),
    ("ray-tasks", "ray", {"actors": False}),
]


def main() -> None:
    for trainer, args, agents, per_round in CASES:
        for label, backend, options in BACKENDS:
            with tempfile.TemporaryDirectory() as d:
                res = simulate(
                    trainer,
                    args,
                    num_agents=agents,
                    per_round=per_round,
                    rounds=15,
                    db=f"{d}/bench.db",
                    backend=backend,
                    workers=2,
                    backend_options=options,
                    seed=1,
                )
            med = statistics.median(res.round_seconds[2:])
            print(
                f"{agents:5d} agents, {per_round or agents:3d}/round  {label:10s}  "
                f"median round {med * 1000:7.1f} ms  setup {res.setup_seconds:5.2f} s",
                flush=True,
            )


if __name__ == "__main__":
    main()
