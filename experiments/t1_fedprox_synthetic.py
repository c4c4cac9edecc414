"""T1: FedProx on Synthetic(alpha, beta) with stragglers (Li et al., MLSys 2020, Fig. 1-2).

Reproduces ``/work/shared/docs/literature.md`` section 8, T1, with the protocol of section
1.4: 30 devices from :mod:`fedstack.data.synthetic`, K = 10 devices per round sampled
uniformly without replacement (seeded by seed and round, so every method sees the same
devices and stragglers), multinomial logistic regression 60 -> 10 (Glorot-uniform kernel,
zero bias), local minibatch SGD with E = 20 epochs, batch 10, lr 0.01, sample-weighted
averaging, evaluation every round on all 30 devices (training loss = sample-weighted mean of
the per-device mean losses; test accuracy = correct / test samples over all devices).

Methods (the server side is the real strategy object of fedstack):

- ``fedavg``: strategy ``fedavg``; stragglers are dropped (at 90 % one device reports);
- ``fedprox mu=0`` / ``fedprox mu=1``: strategy ``fedprox`` (server = FedAvg); the agents
  minimise ``f_k(w) + mu/2 ||w - w_t||^2`` with the proximal SGD step
  ``w <- w - lr (grad f_k(w) + mu (w - w_t))`` (the paper's PGD optimiser), ``mu`` read
  from ``strategy.agent_config()["fedprox_mu"]`` as a real agent would; stragglers send
  the result of ``uniform{1..E-1}`` epochs.

Without stragglers FedProx mu=0 is FedAvg exactly (same selections, same local work, same
minibatch orders), so that run is not repeated.

Acceptance: on Synthetic(1,1) with 90 % stragglers FedProx mu=1 ends with a lower training
loss than FedAvg in every seed. The other T1 targets are printed as informational checks.

    .venv/bin/python experiments/t1_fedprox_synthetic.py                  # the full grid
    .venv/bin/python experiments/t1_fedprox_synthetic.py --rounds 50 --datasets 1,1 \\
        --stragglers 0.9 --seeds 0 1 2                                     # the acceptance only
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from common import (
    RESULTS_DIR,
    Curve,
    FederationConfig,
    History,
    Job,
    LocalResult,
    Panel,
    StragglerMode,
    Task,
    default_workers,
    format_table,
    log,
    mean_sd,
    pass_fail,
    run_federation,
    run_jobs,
    save_json,
    save_plot,
)

from fedstack.data.synthetic import load_synthetic, parse_synthetic
from fedstack.types import Metrics, Weights

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]

DATASETS = ["iid", "0,0", "0.5,0.5", "1,1"]
METHODS = ["fedavg", "fedprox mu=0", "fedprox mu=1"]
NUM_FEATURES = 60
NUM_CLASSES = 10


# --------------------------------------------------------------------------------- model
def augment(x: F64) -> F64:
    """Features with a trailing 1 column, so the bias is the kernel's last row."""
    return np.hstack([x, np.ones((len(x), 1))])


def to_weights(theta: F64) -> Weights:
    return {"kernel": theta[:NUM_FEATURES].copy(), "bias": theta[NUM_FEATURES].copy()}


def from_weights(weights: Mapping[str, Any]) -> F64:
    return np.vstack(
        [
            np.asarray(weights["kernel"], dtype=np.float64),
            np.asarray(weights["bias"], dtype=np.float64)[None, :],
        ]
    )


def glorot_init(seed: int) -> Weights:
    """TF's default dense init: Glorot-uniform kernel, zero bias (seeded like the paper)."""
    limit = math.sqrt(6.0 / (NUM_FEATURES + NUM_CLASSES))
    rng = np.random.default_rng(123 + seed)
    kernel = rng.uniform(-limit, limit, (NUM_FEATURES, NUM_CLASSES))
    return {"kernel": kernel, "bias": np.zeros(NUM_CLASSES)}


def loss_and_correct(theta: F64, x: F64, y: I64) -> tuple[float, int]:
    """Summed cross-entropy and number of correct predictions of ``theta`` on ``(x, y)``."""
    z = x @ theta
    z -= z.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(z).sum(axis=1))
    loss = float((log_norm - z[np.arange(len(y)), y]).sum())
    return loss, int((z.argmax(axis=1) == y).sum())


def prox_sgd(
    theta0: F64,
    x: F64,
    y: I64,
    *,
    epochs: int,
    lr: float,
    mu: float,
    batch_size: int,
    rng: np.random.Generator,
) -> F64:
    """Minibatch SGD on ``f_k(w) + mu/2 ||w - w_t||^2`` from ``w_t = theta0``.

    Each step is ``w <- w - lr (grad f_k(w; batch) + mu (w - w_t))`` (FedProx's
    ``PerturbedGradientDescent``; ``mu = 0`` is plain SGD), ``f_k`` being the mean
    cross-entropy of the batch; every epoch visits the shuffled data in batches of
    ``batch_size`` (the last one may be smaller), as the reference's ``batch_data``.
    """
    theta = theta0.copy()
    n = len(y)
    rows = np.arange(batch_size)
    shrink = 1.0 - lr * mu
    pull = (lr * mu) * theta0
    for _ in range(epochs):
        order = rng.permutation(n)
        xs, ys = x[order], y[order]
        for start in range(0, n, batch_size):
            xb, yb = xs[start : start + batch_size], ys[start : start + batch_size]
            m = len(yb)
            z = xb @ theta
            z -= z.max(axis=1, keepdims=True)
            np.exp(z, out=z)
            z *= (lr / m) / z.sum(axis=1, keepdims=True)  # lr * softmax / m
            z[rows[:m], yb] -= lr / m  # lr * (softmax - onehot) / m = lr * d loss / d logits
            if mu:
                theta *= shrink  # theta - lr * mu * (theta - theta0)
                theta += pull
            theta -= xb.T @ z
    return theta


# ------------------------------------------------------------------------------ one run
def run_one(
    dataset: str,
    method: str,
    stragglers: float,
    seed: int,
    rounds: int,
    epochs: int,
    batch_size: int,
    lr: float,
    clients_per_round: int,
    progress: bool,
) -> dict[str, Any]:
    """One federation; returns its evaluation series (picklable, for the process pool)."""
    train_sets, test_sets = load_synthetic(dataset, seed=seed)
    train_data = [(augment(x), y) for x, y in train_sets]
    test_data = [(augment(x), y) for x, y in test_sets]
    n_train = sum(len(y) for _, y in train_data)
    n_test = sum(len(y) for _, y in test_data)

    def train(task: Task) -> LocalResult:
        x, y = train_data[task.agent]
        mu = float(task.config.get("fedprox_mu", 0.0))
        theta = prox_sgd(
            from_weights(task.weights),
            x,
            y,
            epochs=task.epochs,
            lr=lr,
            mu=mu,
            batch_size=batch_size,
            rng=task.rng,
        )
        return LocalResult(
            to_weights(theta), len(y), {"train_loss": loss_and_correct(theta, x, y)[0] / len(y)}
        )

    def evaluate(weights: Weights) -> Metrics:
        theta = from_weights(weights)
        train_loss = train_correct = test_correct = 0.0
        for x, y in train_data:
            loss, correct = loss_and_correct(theta, x, y)
            train_loss += loss
            train_correct += correct
        for x, y in test_data:
            test_correct += loss_and_correct(theta, x, y)[1]
        return {
            "train_loss": train_loss / n_train,
            "train_accuracy": train_correct / n_train,
            "test_accuracy": test_correct / n_test,
        }

    mode: StragglerMode
    if method == "fedavg":
        strategy, params, mode = "fedavg", {}, "drop"
    else:
        mu = float(method.split("mu=")[1])
        strategy, params, mode = "fedprox", {"mu": mu}, "partial"
    config = FederationConfig(
        rounds=rounds,
        num_agents=len(train_data),
        agents_per_round=clients_per_round,
        epochs=epochs,
        stragglers=stragglers,
        straggler_mode=mode,
        seed=seed,
    )
    label = f"[{dataset} {method} stragglers={stragglers:.0%} seed={seed}]"
    history = run_federation(
        strategy,
        glorot_init(seed),
        train,
        evaluate,
        config,
        strategy_params=params,
        label=label,
        progress=progress,
    )
    train_seconds = sum(r["train_seconds"] for r in history.rounds)
    aggregate_seconds = sum(r["aggregate_seconds"] for r in history.rounds)
    return {
        **history.to_json(),
        "train_seconds": train_seconds,
        "aggregate_seconds": aggregate_seconds,
        "num_train": n_train,
        "num_test": n_test,
        "reported": [r["reported"] for r in history.rounds],
    }


def central_accuracy(dataset: str, seed: int) -> float:
    """Pooled multinomial LR (scikit-learn, C = 1e4) tested on the pooled test data."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    train_sets, test_sets = load_synthetic(dataset, seed=seed)
    x = np.vstack([x for x, _ in train_sets])
    y = np.concatenate([y for _, y in train_sets])
    model = LogisticRegression(C=1e4, max_iter=500)  # within ~0.01 of the converged fit
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(x, y)
    xt = np.vstack([x for x, _ in test_sets])
    yt = np.concatenate([y for _, y in test_sets])
    return float(model.score(xt, yt))


# ---------------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--rounds", type=int, default=200, help="rounds per run (paper: 200)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument(
        "--datasets",
        nargs="+",
        default=DATASETS,
        help="'iid' and/or 'ALPHA,BETA' (default: iid 0,0 0.5,0.5 1,1)",
    )
    p.add_argument("--stragglers", type=float, nargs="+", default=[0.0, 0.5, 0.9])
    p.add_argument(
        "--methods", nargs="+", default=METHODS, help="'fedavg' and/or 'fedprox mu=X' (quote it)"
    )
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=10)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--clients-per-round", type=int, default=10)
    p.add_argument(
        "--workers",
        type=int,
        default=default_workers(),
        help="parallel runs (default: the CPUs available)",
    )
    p.add_argument(
        "--no-central", action="store_true", help="skip the pooled scikit-learn reference fit"
    )
    p.add_argument(
        "--progress",
        action="store_true",
        help="per-round progress lines of every run (default: one line per run)",
    )
    p.add_argument("--out", default=str(RESULTS_DIR), help="directory for PNG and JSON")
    p.add_argument(
        "--report-only",
        metavar="JSON",
        help="run nothing: print the tables and checks and redraw the plots from "
        "a t1_results.json written before (its settings replace the options)",
    )
    args = p.parse_args(argv)
    for d in args.datasets:
        parse_synthetic(d)
    for m in args.methods:
        if m != "fedavg" and not m.startswith("fedprox mu="):
            p.error(f"unknown method {m!r}")
    return args


def load_results(args: argparse.Namespace) -> tuple[dict[tuple[Any, ...], Any], float]:
    """The runs of a saved ``t1_results.json``; its settings are copied into ``args``."""
    import json

    saved = json.loads(Path(args.report_only).read_text())
    for key in (
        "rounds",
        "seeds",
        "datasets",
        "stragglers",
        "methods",
        "epochs",
        "batch_size",
        "lr",
        "clients_per_round",
        "workers",
        "no_central",
    ):
        setattr(args, key, saved["config"][key])
    results: dict[tuple[Any, ...], Any] = {}
    for record in saved["runs"]:
        results[(record["dataset"], record["method"], record["stragglers"], record["seed"])] = (
            record
        )
    for dataset, values in saved["central_accuracy"].items():
        for seed, value in zip(args.seeds, values, strict=True):
            results[("central", dataset, seed)] = value
    return results, float(saved["wall_seconds"])


def method_label(method: str) -> str:
    return {"fedavg": "FedAvg (drop)"}.get(
        method, method.replace("fedprox", "FedProx").replace("mu=", "μ=")
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    common = {
        "rounds": args.rounds,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "clients_per_round": args.clients_per_round,
        "progress": args.progress,
    }
    jobs: list[Job] = []
    for dataset in args.datasets:
        for seed in args.seeds:
            if not args.no_central:
                jobs.append(
                    Job(
                        ("central", dataset, seed),
                        central_accuracy,
                        {"dataset": dataset, "seed": seed},
                        cost=2.0,
                    )
                )
            for d in args.stragglers:
                for method in args.methods:
                    if d == 0.0 and method == "fedprox mu=0" and "fedavg" in args.methods:
                        continue  # identical to FedAvg without stragglers
                    work = 1.0 if d == 0 else (1 - d) + (d * 0.5 if method != "fedavg" else 0)
                    jobs.append(
                        Job(
                            (dataset, method, d, seed),
                            run_one,
                            {
                                "dataset": dataset,
                                "method": method,
                                "stragglers": d,
                                "seed": seed,
                                **common,
                            },
                            cost=work,
                        )
                    )
    if args.report_only:
        results, wall = load_results(args)
    else:
        log(f"T1: {len(jobs)} jobs on {args.workers} worker(s), {args.rounds} rounds each")
        started = time.perf_counter()
        results = run_jobs(jobs, args.workers)
        wall = time.perf_counter() - started

    def run(dataset: str, method: str, d: float, seed: int) -> dict[str, Any] | None:
        key = (dataset, method, d, seed)
        if key not in results and d == 0.0 and method == "fedprox mu=0":
            key = (dataset, "fedavg", d, seed)
        return results.get(key)

    # ---- the table
    rows = []
    for dataset in args.datasets:
        for d in args.stragglers:
            for method in args.methods:
                runs = [run(dataset, method, d, s) for s in args.seeds]
                if any(r is None for r in runs):
                    continue
                losses = [h["evals"][-1]["train_loss"] for h in runs if h]
                accs = [h["evals"][-1]["test_accuracy"] for h in runs if h]
                cells = [f"{lo:.3f} / {a:.3f}" for lo, a in zip(losses, accs, strict=True)]
                note = " (= FedAvg)" if d == 0.0 and method == "fedprox mu=0" else ""
                rows.append(
                    [
                        dataset,
                        f"{d:.0%}",
                        method_label(method) + note,
                        *cells,
                        mean_sd(losses),
                        mean_sd(accs),
                    ]
                )
    headers = [
        "dataset",
        "stragglers",
        "method",
        *[f"seed {s}: loss / acc" for s in args.seeds],
        "train loss",
        "test acc",
    ]
    print(
        format_table(
            headers,
            rows,
            f"T1: final training loss / test accuracy after {args.rounds} rounds "
            f"(30 devices, K={args.clients_per_round}, E={args.epochs}, "
            f"batch {args.batch_size}, lr {args.lr})",
        )
    )
    central: dict[str, list[float]] = {}
    if not args.no_central:
        crow = []
        for dataset in args.datasets:
            central[dataset] = [results[("central", dataset, s)] for s in args.seeds]
            crow.append([dataset, *[f"{c:.3f}" for c in central[dataset]]])
        print()
        print(
            format_table(
                ["dataset", *[f"seed {s}" for s in args.seeds]],
                crow,
                "Pooled central LR (scikit-learn, C=1e4, lbfgs <= 500 iterations) "
                "test accuracy, same draws",
            )
        )

    # ---- checks
    print()
    checks: dict[str, Any] = {}
    acceptance = None
    if (
        "1,1" in args.datasets
        and 0.9 in args.stragglers
        and {"fedavg", "fedprox mu=1"} <= set(args.methods)
    ):
        pairs = [
            (run("1,1", "fedprox mu=1", 0.9, s), run("1,1", "fedavg", 0.9, s)) for s in args.seeds
        ]
        lines = [
            (s, p["evals"][-1]["train_loss"], a["evals"][-1]["train_loss"])
            for s, (p, a) in zip(args.seeds, pairs, strict=True)
            if p and a
        ]
        acceptance = len(args.seeds) >= 1 and all(p < a for _, p, a in lines)
        detail = ", ".join(f"seed {s}: {p:.3f} vs {a:.3f}" for s, p, a in lines)
        checks["acceptance"] = {"ok": acceptance, "detail": detail}
        print(
            f"ACCEPTANCE {pass_fail(acceptance)}: Synthetic(1,1), 90% stragglers, final "
            f"training loss FedProx μ=1 < FedAvg in every seed ({detail})"
        )
    else:
        print(
            "ACCEPTANCE not evaluated (needs dataset 1,1, stragglers 0.9, fedavg and "
            "'fedprox mu=1')"
        )
    info = informational_checks(args, run, central)
    checks["info"] = info
    for name, (ok, detail) in info.items():
        print(f"  info {pass_fail(ok)}: {name} ({detail})")
    train_s = sum(r["train_seconds"] for k, r in results.items() if k[0] != "central")
    agg_s = sum(r["aggregate_seconds"] for k, r in results.items() if k[0] != "central")
    n_rounds = sum(args.rounds for k in results if k[0] != "central")
    print(
        f"\ntime: {wall:.0f} s wall on {args.workers} worker(s); local training "
        f"{train_s:.0f} s, strategy (begin/add/result) {agg_s:.2f} s = "
        f"{1e3 * agg_s / max(1, n_rounds):.3f} ms per round over {n_rounds} rounds"
    )

    # ---- plots and JSON
    paths = plot(args, run, out)
    payload = {
        "config": {k: v for k, v in vars(args).items() if k not in {"out", "report_only"}},
        "wall_seconds": wall,
        "central_accuracy": central,
        "checks": checks,
        "runs": [
            {"dataset": k[0], "method": k[1], "stragglers": k[2], "seed": k[3], **v}
            for k, v in results.items()
            if k[0] != "central"
        ],
    }
    paths.append(save_json(out / "t1_results.json", payload))
    for p in paths:
        log(f"wrote {p}")
    return 0 if acceptance in (True, None) else 1


def informational_checks(
    args: argparse.Namespace, run: Any, central: Mapping[str, list[float]]
) -> dict[str, tuple[bool, str]]:
    """The other T1 targets of literature.md section 8 (reported, not the acceptance)."""
    info: dict[str, tuple[bool, str]] = {}
    seeds = args.seeds

    def final(dataset: str, method: str, d: float, key: str) -> list[float]:
        runs = [run(dataset, method, d, s) for s in seeds]
        return [h["evals"][-1][key] for h in runs if h]

    methods = set(args.methods)
    if {"fedavg", "fedprox mu=1"} <= methods and 0.0 in args.stragglers:
        hetero = [d for d in args.datasets if d != "iid"]
        wins, total, gains = 0, 0, []
        for d in hetero:
            prox, avg = (
                final(d, "fedprox mu=1", 0.0, "train_loss"),
                final(d, "fedavg", 0.0, "train_loss"),
            )
            wins += sum(p < a for p, a in zip(prox, avg, strict=True))
            total += len(prox)
            gains.append(
                np.mean(final(d, "fedprox mu=1", 0.0, "test_accuracy"))
                - np.mean(final(d, "fedavg", 0.0, "test_accuracy"))
            )
        if total:
            info["target 1a: heterogeneous, no stragglers, loss μ=1 < FedAvg every seed"] = (
                wins == total,
                f"{wins}/{total}",
            )
            info[
                "target 1b: heterogeneous, no stragglers, mean acc gain μ=1 - FedAvg >= "
                "+0.04 ([D] +0.04..+0.06)"
            ] = (
                bool(min(gains) >= 0.04),
                ", ".join(f"{d}: {g:+.3f}" for d, g in zip(hetero, gains, strict=True)),
            )
        if "iid" in args.datasets:
            iid_avg, iid_prox = (
                float(np.mean(final("iid", m, 0.0, "test_accuracy")))
                for m in ("fedavg", "fedprox mu=1")
            )
            info["target 2: IID, FedAvg acc > μ=1 acc"] = (
                iid_avg > iid_prox,
                f"{iid_avg:.3f} vs {iid_prox:.3f}",
            )
    if "1,1" in args.datasets and 0.9 in args.stragglers and set(METHODS) <= methods:
        a, z, p = (final("1,1", m, 0.9, "train_loss") for m in METHODS)
        ok = all(x >= y >= w for x, y, w in zip(a, z, p, strict=True))
        info["target 3a: (1,1) 90% loss FedAvg >= μ=0 >= μ=1 every seed"] = (
            ok,
            "; ".join(f"{x:.3f} >= {y:.3f} >= {w:.3f}" for x, y, w in zip(a, z, p, strict=True)),
        )
        half = min(100, args.rounds)
        gain = [run("1,1", "fedprox mu=1", 0.9, s)["evals"] for s in seeds]
        base = [run("1,1", "fedavg", 0.9, s)["evals"] for s in seeds]
        diff = [_at(g, half) - _at(b, half) for g, b in zip(gain, base, strict=True)]
        info[f"target 3b: (1,1) 90% acc μ=1 - FedAvg >= +0.05 at round {half}"] = (
            float(np.mean(diff)) >= 0.05,
            f"mean {np.mean(diff):+.3f}, per seed " + ", ".join(f"{x:+.3f}" for x in diff),
        )
    if "1,1" in central and "fedprox mu=1" in methods and 0.0 in args.stragglers:
        accs = final("1,1", "fedprox mu=1", 0.0, "test_accuracy")
        ratios = [a / c for a, c in zip(accs, central["1,1"], strict=True)]
        info["target 4: (1,1) μ=1 acc >= 0.9 x central"] = (
            min(ratios) >= 0.9,
            ", ".join(f"{r:.2f}" for r in ratios),
        )
    return info


def _at(evals: list[dict[str, Any]], round: int) -> float:
    values = [e["test_accuracy"] for e in evals if e["round"] <= round]
    return float(values[-1])


def plot(args: argparse.Namespace, run: Any, out: Path) -> list[Path]:
    paths = []
    for key, ylabel, name, logy in (
        ("train_loss", "training loss", "t1_train_loss", True),
        ("test_accuracy", "test accuracy", "t1_test_accuracy", False),
    ):
        panels = []
        for dataset in args.datasets:
            for d in args.stragglers:
                curves = []
                for method in args.methods:
                    hs = [run(dataset, method, d, s) for s in args.seeds]
                    if any(h is None for h in hs):
                        continue
                    label = method_label(method)
                    if d == 0.0 and "fedprox mu=0" in args.methods:
                        if method == "fedprox mu=0":
                            continue  # the same run as FedAvg
                        if method == "fedavg":
                            label = "FedAvg = FedProx μ=0"
                    h0 = History("", hs[0]["evals"])
                    xs = h0.series(key)[0]
                    ys = np.array([History("", h["evals"]).series(key)[1] for h in hs])
                    curves.append(
                        Curve(
                            label,
                            xs,
                            ys.mean(0).tolist(),
                            ys.min(0).tolist(),
                            ys.max(0).tolist(),
                            color=f"C{args.methods.index(method)}",
                        )
                    )
                title = (
                    "Synthetic-IID" if dataset == "iid" else f"Synthetic({dataset})"
                ) + f", {d:.0%} stragglers"
                panels.append(
                    Panel(
                        title, curves, ylabel=ylabel, logy=logy, ylim=None if logy else (0.0, 1.0)
                    )
                )
        paths.append(
            save_plot(
                out / f"{name}.png",
                panels,
                ncols=len(args.stragglers),
                title=f"T1 FedProx Synthetic: {ylabel} (mean over seeds "
                f"{' '.join(map(str, args.seeds))}, band = min..max)",
            )
        )
    return paths


if __name__ == "__main__":
    sys.exit(main())
