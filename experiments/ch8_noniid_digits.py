"""Chapter 8 on digits: IID FedAvg ~ centralised training, non-IID skew degrades FedAvg.

The book (chapter 8, book_spec §8.4 and §14 row 55) splits a centralised problem into
random disjoint subsets (IID) and finds FedAvg as good as centralised training; with
class-label-skewed local datasets FedAvg degrades, the more so the stronger the skew.
This script reproduces both findings on scikit-learn's bundled digits, with the real
aggregator and agent code: every federation is a :func:`fedstack.sim.simulate` run
(in-process transport, FedAvg, every agent every round, the aggregator evaluating each
global model on the 360-image held-out test split).

- Centralised: the same trainer holding the whole training split, ``rounds`` fits of the
  same local epochs (so it sees the data as many times as the federation does).
- FedAvg on each ``--partitions`` spec (:func:`fedstack.data.partition.parse_partition`):
  ``iid``, Dirichlet label skew of decreasing alpha, pathological one-class shards, and
  the book's per-class keep ratios (``keep:sel=0.55,def=0.05``: each agent keeps 55 % of
  its own classes and 5 % of every other one; disjoint for 10 agents).
- Accuracy of a run = the mean test accuracy of the last ``--last`` global models.

Acceptance: IID FedAvg within ``--tolerance`` of centralised training in every seed, and
FedAvg on the most skewed Dirichlet split (smallest alpha) at least ``--min-drop`` below
IID FedAvg (mean over seeds). The exit status is 1 when it fails.

    .venv/bin/python experiments/ch8_noniid_digits.py                  # ~1 min on 2 cores
    .venv/bin/python experiments/ch8_noniid_digits.py --model cnn --rounds 40
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from common import (
    RESULTS_DIR,
    Curve,
    Job,
    Panel,
    default_workers,
    format_table,
    log,
    mean_sd,
    pass_fail,
    run_jobs,
    save_json,
    save_plot,
)

from fedstack.data.digits import load_digits_split
from fedstack.data.partition import parse_partition
from fedstack.errors import FedstackError
from fedstack.plugins import load_callable
from fedstack.sim import simulate

MODELS: dict[str, tuple[str, str]] = {
    "linear": (
        "fedstack.trainers.digits:DigitsLinearTrainer",
        "fedstack.trainers.digits:evaluate_global",
    ),
    "mlp": (
        "fedstack.trainers.torch_digits:DigitsMLPTrainer",
        "fedstack.trainers.torch_digits:evaluate_global_mlp",
    ),
    "cnn": (
        "fedstack.trainers.torch_digits:DigitsCNNTrainer",
        "fedstack.trainers.torch_digits:evaluate_global_cnn",
    ),
}
CENTRAL = "centralised"
PARTITIONS = [
    "iid",
    "dirichlet:1.0",
    "dirichlet:0.3",
    "dirichlet:0.1",
    "shards:1",
    "keep:sel=0.55,def=0.05",
]
_DIRICHLET = re.compile(r"^dirichlet:(.+)$")


def trainer_args(seed: int, epochs: int | None, partition: str) -> dict[str, Any]:
    args: dict[str, Any] = {"partition": partition, "seed": seed}
    if epochs is not None:
        args["epochs"] = epochs
    return args


def run_central(model: str, seed: int, rounds: int, epochs: int | None) -> dict[str, Any]:
    """The trainer on the whole training split for ``rounds`` fits; accuracy per fit."""
    trainer_spec, evaluator_spec = MODELS[model]
    trainer = load_callable(trainer_spec)(
        index=0, num_agents=1, **trainer_args(seed, epochs, "iid")
    )
    evaluate = load_callable(evaluator_spec)
    weights = trainer.initial_weights()
    accuracy = []
    for _ in range(rounds):
        weights, _, _ = trainer.fit(weights, {})
        accuracy.append(float(evaluate(weights)["accuracy"]))
    return {"accuracy": accuracy, "samples": int(trainer.num_samples)}


def run_fedavg(
    model: str, partition: str, seed: int, agents: int, rounds: int, epochs: int | None
) -> dict[str, Any]:
    """One FedAvg federation through the simulator; accuracy per round."""
    logging.getLogger().setLevel(logging.WARNING)
    trainer_spec, evaluator_spec = MODELS[model]
    with tempfile.TemporaryDirectory(prefix="ch8-") as tmp:
        result = simulate(
            trainer_spec,
            trainer_args(seed, epochs, partition),
            num_agents=agents,
            rounds=rounds,
            strategy="fedavg",
            evaluator=evaluator_spec,
            db=str(Path(tmp) / "sim.db"),
            transport="inproc",
            backend="inline",
            seed=seed,
        )
    accuracy = [float(row["metrics"]["eval_accuracy"]) for row in result.history]
    if len(accuracy) != rounds:
        raise RuntimeError(f"{partition} seed {seed}: {len(accuracy)} of {rounds} rounds stored")
    return {"accuracy": accuracy, "wall_seconds": result.wall_seconds}


def skew(partition: str, agents: int, seed: int) -> dict[str, Any]:
    """Class histograms of the agents' shares and the mean share of an agent's top class."""
    _, y_train, _, _ = load_digits_split()
    parts = parse_partition(partition)(y_train, agents, seed)
    hist = [np.bincount(y_train[p], minlength=10).tolist() for p in parts]
    top = float(np.mean([max(h) / sum(h) for h in hist]))
    return {"histograms": hist, "top_class_share": top, "rows": sum(map(sum, hist))}


def alpha_of(partition: str) -> float | None:
    match = _DIRICHLET.match(partition.strip().lower())
    return float(match.group(1)) if match else None


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", choices=list(MODELS), default="linear")
    p.add_argument("--agents", type=int, default=10)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--epochs", type=int, default=None, help="local epochs (trainer default)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--partitions", nargs="+", default=PARTITIONS)
    p.add_argument("--last", type=int, default=5, help="accuracy = mean of the last N rounds")
    p.add_argument("--tolerance", type=float, default=0.03, help="|IID - centralised| bound")
    p.add_argument("--min-drop", type=float, default=0.02, help="IID - most skewed Dirichlet")
    p.add_argument("--workers", type=int, default=default_workers())
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--out", default=str(RESULTS_DIR))
    args = p.parse_args(argv)
    if args.agents < 1 or args.rounds < 1 or not 1 <= args.last <= args.rounds:
        p.error("--agents, --rounds must be >= 1 and 1 <= --last <= --rounds")
    for spec in args.partitions:
        try:
            skew(spec, args.agents, args.seeds[0])  # refuse a bad spec before running
        except FedstackError as exc:
            p.error(f"--partitions {spec!r}: {exc}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    labels = [CENTRAL, *args.partitions]
    jobs = [
        Job(
            (CENTRAL, s),
            run_central,
            {"model": args.model, "seed": s, "rounds": args.rounds, "epochs": args.epochs},
        )
        for s in args.seeds
    ] + [
        Job(
            (p, s),
            run_fedavg,
            {
                "model": args.model,
                "partition": p,
                "seed": s,
                "agents": args.agents,
                "rounds": args.rounds,
                "epochs": args.epochs,
            },
        )
        for p in args.partitions
        for s in args.seeds
    ]
    log(
        f"ch8: {args.model} model, {args.agents} agents, {args.rounds} rounds, "
        f"{len(jobs)} runs on {args.workers} worker(s)"
    )
    started = time.perf_counter()
    results = run_jobs(jobs, args.workers)
    wall = time.perf_counter() - started

    def final(label: str, seed: int) -> float:
        return float(np.mean(results[(label, seed)]["accuracy"][-args.last :]))

    def finals(label: str) -> list[float]:
        return [final(label, s) for s in args.seeds]

    def area(label: str) -> float:
        return float(np.mean([np.mean(results[(label, s)]["accuracy"]) for s in args.seeds]))

    skews = {p: skew(p, args.agents, args.seeds[0]) for p in args.partitions}
    iid_mean = float(np.mean(finals("iid"))) if "iid" in args.partitions else float("nan")
    rows = []
    for label in labels:
        row: list[Any] = [label]
        row.append("-" if label == CENTRAL else f"{skews[label]['top_class_share']:.2f}")
        row += [f"{v:.3f}" for v in finals(label)]
        row += [
            mean_sd(finals(label)),
            f"{float(np.mean(finals(label))) - iid_mean:+.3f}",
            f"{area(label):.3f}",
        ]
        rows.append(row)
    print(
        format_table(
            [
                "run",
                "top class share",
                *[f"seed {s}" for s in args.seeds],
                "accuracy",
                "vs IID",
                "mean over rounds",
            ],
            rows,
            f"Chapter 8 on digits ({args.model}, {args.agents} agents, FedAvg, {args.rounds} "
            f"rounds): test accuracy = mean of the last {args.last} global models",
        )
    )
    print()

    checks: dict[str, Any] = {}
    dirichlets = sorted(
        ((a, p) for p in args.partitions if (a := alpha_of(p)) is not None), reverse=True
    )
    ok_iid = ok_drop = None
    if "iid" in args.partitions:
        gaps = [i - c for i, c in zip(finals("iid"), finals(CENTRAL), strict=True)]
        ok_iid = all(abs(g) <= args.tolerance for g in gaps)
        detail = ", ".join(f"seed {s}: {g:+.3f}" for s, g in zip(args.seeds, gaps, strict=True))
        checks["iid_close_to_centralised"] = {"ok": ok_iid, "gaps": gaps, "detail": detail}
        print(
            f"  {pass_fail(ok_iid)}: IID FedAvg within {args.tolerance} of centralised in every "
            f"seed ({detail})"
        )
    if "iid" in args.partitions and dirichlets:
        alpha, worst = dirichlets[-1]
        drop = iid_mean - float(np.mean(finals(worst)))
        ok_drop = drop >= args.min_drop
        checks["dirichlet_degrades"] = {"ok": ok_drop, "partition": worst, "drop": drop}
        print(
            f"  {pass_fail(ok_drop)}: FedAvg on Dirichlet({alpha:g}) at least {args.min_drop} "
            f"below IID (IID {iid_mean:.3f}, Dirichlet({alpha:g}) "
            f"{np.mean(finals(worst)):.3f}, drop {drop:+.3f})"
        )
    if len(dirichlets) > 1:
        ladder = [float(np.mean(finals(p))) for _, p in dirichlets]
        ordered = all(b <= a + 0.005 for a, b in zip(ladder, ladder[1:], strict=False))
        checks["severity_order"] = {
            "ok": ordered,
            "ladder": dict(zip([p for _, p in dirichlets], ladder, strict=True)),
        }
        print(
            f"  info {pass_fail(ordered)}: accuracy falls as alpha falls (slack 0.005): "
            + ", ".join(f"{p} {v:.3f}" for (_, p), v in zip(dirichlets, ladder, strict=True))
        )
    acceptance = None if ok_iid is None or ok_drop is None else ok_iid and ok_drop
    if acceptance is None:
        print("ACCEPTANCE not evaluated (needs the iid partition and a dirichlet:ALPHA one)")
    else:
        print(
            f"ACCEPTANCE {pass_fail(acceptance)}: IID FedAvg ~ centralised, Dirichlet skew "
            "degrades FedAvg"
        )
    checks["acceptance"] = acceptance
    print(f"\ntime: {wall:.1f} s wall on {args.workers} worker(s)")

    paths = [
        save_json(
            out / "ch8_results.json",
            {
                "config": {k: v for k, v in vars(args).items() if k != "out"},
                "wall_seconds": wall,
                "checks": checks,
                "final": {label: finals(label) for label in labels},
                "curves": {
                    label: {str(s): results[(label, s)]["accuracy"] for s in args.seeds}
                    for label in labels
                },
                "skew": skews,
            },
        )
    ]
    if not args.no_plot:
        x = list(range(1, args.rounds + 1))
        curves = []
        for label in labels:
            runs = np.array([results[(label, s)]["accuracy"] for s in args.seeds])
            curves.append(
                Curve(
                    label,
                    x,
                    runs.mean(axis=0).tolist(),
                    runs.min(axis=0).tolist(),
                    runs.max(axis=0).tolist(),
                    style="--" if label == CENTRAL else "-",
                )
            )
        paths.append(
            save_plot(
                out / "ch8_accuracy.png",
                [
                    Panel(
                        f"{args.model}, {args.agents} agents, FedAvg",
                        curves,
                        ylabel="test accuracy",
                        ylim=(0.5, 1.0),
                    )
                ],
                ncols=1,
                panel_size=(7.0, 4.5),
                title="Chapter 8 on digits: IID vs non-IID FedAvg (mean, band = min..max of seeds)",
            )
        )
    log("wrote " + ", ".join(str(p) for p in paths))
    return 1 if acceptance is False else 0


if __name__ == "__main__":
    sys.exit(main())
