"""Run the fssecagg Flower App (SecAgg+) on Flower's simulation engine (Ray).

Executed by ``bench/secagg_cost.py`` with ``bench/.flower-venv/bin/python``; the run's
settings come as JSON in ``FSSECAGG_FLOWER_CONFIG``. ``--client-cpus`` sets the Ray
backend's per-ClientApp CPUs (Flower's default: 2, i.e. one ClientApp at a time on a
2-core machine).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "secagg"))
sys.path.insert(0, str(HERE.parent))  # bench/: secagg_task

from flwr.simulation import run_simulation  # noqa: E402
from fssecagg_flower.client_app import app as secagg_client_app  # noqa: E402
from fssecagg_flower.client_app import plain_app  # noqa: E402
from fssecagg_flower.server_app import app as server_app  # noqa: E402
from fssecagg_flower.task import config  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--num-supernodes", type=int, required=True)
    ap.add_argument("--client-cpus", type=float, default=None)
    args = ap.parse_args()
    backend_config = None
    if args.client_cpus is not None:
        backend_config = {"client_resources": {"num_cpus": args.client_cpus, "num_gpus": 0.0}}
    client_app = secagg_client_app if config().get("secagg", True) else plain_app
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=args.num_supernodes,
        backend_config=backend_config,  # type: ignore[arg-type]
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
