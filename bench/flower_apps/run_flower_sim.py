"""Run the fsbench Flower App on Flower's simulation engine (``run_simulation``, Ray).

Executed by the benchmarks with ``bench/.flower-venv/bin/python``; the task configuration
comes as JSON in ``FSBENCH_FLOWER_CONFIG`` (``run_simulation`` takes no run config). The
backend configuration is Flower's default (Ray, default client resources).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "fsbench"))

from flwr.simulation import run_simulation  # noqa: E402
from fsbench_flower.client_app import app as client_app  # noqa: E402
from fsbench_flower.server_app import app as server_app  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--num-supernodes", type=int, required=True)
    args = ap.parse_args()
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=args.num_supernodes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
