"""Differential privacy on digits: test accuracy against epsilon, central and local DP.

Every federation is a :func:`fedstack.sim.simulate` run: the real aggregator and agent code
(in-process transport), the aggregator evaluating each global model on the 360-image
held-out test split.

- **Central DP-FedAvg** (``--dp central`` on the aggregator, :mod:`fedstack.privacy.dp`):
  the digits linear model (``DigitsLinearTrainer``), ``--agents`` agents of which
  ``--per-round`` train each round, noise multipliers ``--central-z`` (0 = clipping only,
  epsilon infinite), clip ``--clip``. The accountant assumes Poisson sampling with rate
  ``q = per_round / agents``; the simulator samples exactly ``per_round`` agents without
  replacement, the usual approximation (McMahan et al. 2018 do the same). Epsilon is
  agent-level (one agent's whole data set is the unit protected), at ``--delta``.
- **Local DP-SGD** (Opacus on the agents, :mod:`fedstack.privacy.dpsgd`): the torch MLP
  (``DigitsMLPTrainer`` with ``dp_noise_multiplier``), every agent every round, noise
  multipliers ``--local-z`` (0 = plain SGD). Epsilon is record-level (one training image),
  each agent's own, at ``--delta``; the table shows the largest over the agents
  (``max_dp_epsilon`` of the last round).

Accuracy of a run = the mean test accuracy of its last 3 global models. Prints a table
(mode, z, epsilon, accuracy), writes ``results/dp_digits.png`` (accuracy against epsilon,
log scale; the no-noise runs as dashed lines) and ``results/dp_digits.json``.

    .venv/bin/python experiments/dp_digits.py            # ~1-2 min on 2 cores
    .venv/bin/python experiments/dp_digits.py --quick    # ~20 s
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from common import RESULTS_DIR, format_table, log, save_json

from fedstack.sim import simulate


def _accuracy(history: list[dict[str, Any]], last: int = 3) -> float:
    accs = [h["metrics"].get("eval_accuracy") for h in history[-last:]]
    return float(np.mean([a for a in accs if a is not None]))


def central(args: argparse.Namespace, db: str) -> list[dict[str, Any]]:
    rows = []
    for z in args.central_z:
        t0 = time.perf_counter()
        options: dict[str, Any] = {
            "dp": "central",
            "dp_noise_multiplier": z,
            "dp_clip": args.clip,
            "dp_delta": args.delta,
            "dp_sampling_rate": args.per_round / args.agents,
        }
        res = simulate(
            "fedstack.trainers.digits:DigitsLinearTrainer",
            {"seed": args.seed, "partition": args.partition},
            num_agents=args.agents,
            per_round=args.per_round,
            rounds=args.rounds,
            evaluator="fedstack.trainers.digits:evaluate_global",
            db=db,
            backend="inline",
            seed=args.seed,
            aggregator_options=options,
        )
        last = res.history[-1]["metrics"]
        eps = float(last.get("dp_epsilon", math.inf))
        rows.append(
            {
                "mode": "central",
                "z": z,
                "epsilon": eps,
                "accuracy": _accuracy(res.history),
                "noise_std": float(last["dp_noise_std"]),
                "seconds": time.perf_counter() - t0,
            }
        )
        log(f"central z={z:g}: eps={eps:.4g} acc={rows[-1]['accuracy']:.4f}")
    return rows


def local(args: argparse.Namespace, db: str) -> list[dict[str, Any]]:
    rows = []
    for z in args.local_z:
        t0 = time.perf_counter()
        trainer_args: dict[str, Any] = {
            "seed": args.seed,
            "partition": args.partition,
            "lr": args.local_lr,
            "batch_size": 32,
        }
        if z > 0:
            trainer_args.update(dp_noise_multiplier=z, dp_max_grad_norm=1.0, dp_delta=args.delta)
        res = simulate(
            "fedstack.trainers.torch_digits:DigitsMLPTrainer",
            trainer_args,
            num_agents=args.local_agents,
            rounds=args.local_rounds,
            evaluator="fedstack.trainers.torch_digits:evaluate_global_mlp",
            db=db,
            backend="inline",
            seed=args.seed,
        )
        last = res.history[-1]["metrics"]
        eps = float(last.get("max_dp_epsilon", math.inf))
        rows.append(
            {
                "mode": "local",
                "z": z,
                "epsilon": eps,
                "accuracy": _accuracy(res.history),
                "noise_std": z * 1.0,
                "seconds": time.perf_counter() - t0,
            }
        )
        log(f"local z={z:g}: eps={eps:.4g} acc={rows[-1]['accuracy']:.4f}")
    return rows


def plot(rows: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    for mode, color in (("central", "tab:blue"), ("local", "tab:orange")):
        pts = sorted((r["epsilon"], r["accuracy"]) for r in rows if r["mode"] == mode)
        finite = [(e, a) for e, a in pts if math.isfinite(e)]
        label = (
            "central DP-FedAvg (agent-level eps)"
            if mode == "central"
            else ("local DP-SGD (record-level eps, worst agent)")
        )
        if finite:
            ax.plot(*zip(*finite, strict=True), "o-", color=color, label=label)
        for e, a in pts:
            if not math.isfinite(e):
                ax.axhline(a, color=color, linestyle="--", linewidth=1, label=f"{mode}: no noise")
    ax.set_xscale("log")
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("epsilon (log scale)")
    ax.set_ylabel("test accuracy")
    ax.set_title("digits: accuracy against privacy spent")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer rounds and noise levels")
    p.add_argument("--agents", type=int, default=20)
    p.add_argument("--per-round", type=int, default=10)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--central-z", type=float, nargs="+", default=[0.0, 0.5, 1.0, 2.0])
    p.add_argument("--local-agents", type=int, default=10)
    p.add_argument("--local-rounds", type=int, default=10)
    p.add_argument("--local-lr", type=float, default=0.5)
    p.add_argument("--local-z", type=float, nargs="+", default=[0.0, 0.7, 1.0, 2.0])
    p.add_argument("--delta", type=float, default=1e-3, help="below 1 / agents")
    p.add_argument("--partition", default="iid")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "dp_digits.png")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.local_rounds = 10, 4
        args.central_z, args.local_z = [0.0, 1.0, 2.0], [0.0, 1.0]
    logging.getLogger("fedstack").setLevel(logging.WARNING)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        rows = central(args, f"{work}/central.db") + local(args, f"{work}/local.db")
    table = format_table(
        ["mode", "z", "epsilon", "accuracy", "noise std", "seconds"],
        [
            [r["mode"], r["z"], r["epsilon"], r["accuracy"], r["noise_std"], r["seconds"]]
            for r in rows
        ],
        title=(
            f"digits, delta = {args.delta:g}; central: {args.agents} agents, "
            f"{args.per_round} per round, {args.rounds} rounds, clip {args.clip:g}; local: "
            f"{args.local_agents} agents, {args.local_rounds} rounds, max grad norm 1"
        ),
    )
    print(table)
    js = save_json(
        args.out.with_suffix(".json"), {"args": vars(args) | {"out": str(args.out)}, "rows": rows}
    )
    try:
        png: Path | str = plot(rows, args.out)
    except ImportError:
        png = "no plot (matplotlib is not installed: pip install -e '.[plot]')"
    log(f"wrote {js} and {png} in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
