"""fedstack against Flower, side by side, on the same digits task in the same run.

The task (PERF.md's anchor workload, identical for everyone, literally the same code):
scikit-learn's digits, 80/20 stratified split (seed 0), the training part across 10 agents
by Dirichlet(0.5) label skew (seed 0), the PyTorch MLP 64-128-10 of
``fedstack.trainers.torch_digits.DigitsMLPTrainer``, 1 local epoch of SGD (lr 0.05,
batch 32) per round, sample-weighted FedAvg over all 10 agents every round, 20 rounds,
central evaluation of each global model on the held-out split
(``evaluate_global_mlp``). The Flower apps (``bench/flower_apps/fsbench``) import the
same trainer, partition and evaluator from fedstack, installed into Flower's own venv,
and keep each node's minibatch generator in its Context, so every framework computes the
same models (the accuracies agree to float rounding).

Five runs, one after the other, each measured the same way (see ``fedbench_common``):

1. the framework-free loop: one process, the 10 trainers' ``fit`` in sequence, the
   weighted average, the evaluation; no networking (the per-round reference);
2. fedstack simulation: ``fedstack sim`` (in-process transport, local backend), one process;
3. fedstack deployment: ``fedstack aggregator`` + 10 ``fedstack agent`` processes over
   loopback WebSockets (``--auth off``, SQLite store);
4. Flower simulation engine: ``flwr.simulation.run_simulation`` (Ray backend, defaults);
5. Flower deployment engine: ``flower-superlink --insecure`` + 10 ``flower-supernode
   --insecure --node-config "partition-id=i num-partitions=10"`` + ``flwr run <app>
   <connection> --stream``, all Flower defaults, 127.0.0.1 and free ports.

Flower runs only in ``bench/.flower-venv`` (``flwr[simulation]==1.42.0``, created on first
use by ``bench/flower_env.py``). Flower's own FedAvg is used with ``fraction_train=1.0``,
``min_train_nodes=min_available_nodes=10`` and ``fraction_evaluate=0.0`` (the task
evaluates centrally, as fedstack does; skipping client-side evaluation only saves Flower
time). Telemetry is off on both Flower and Ray (no internet here).

Run::

    .venv/bin/python bench/flower_compare.py                 # everything, ~10-12 min
    .venv/bin/python bench/flower_compare.py --quick         # 5 rounds, no Flower deployment
    .venv/bin/python bench/flower_compare.py --skip-flower-deployment --rounds 20

Prints a table and the acceptance checks (PASS/FAIL), writes
``bench/results/flower_compare.json`` (with Flower's exact versions and every command).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fedbench_common as fc  # noqa: E402
from fedbench_common import FF, FL_DEP, FL_SIM, FS_DEP, FS_SIM  # noqa: E402
from flower_env import ensure_flower_venv  # noqa: E402


def _fmt(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def print_table(runs: dict[str, dict[str, Any]], metric: str = "eval_accuracy") -> None:
    head = (
        f"{'run':<26} {'wall s':>8} {'round 1 s':>9} {'round s (mean r2+)':>19} "
        f"{'median':>8} {'final ' + metric.removeprefix('eval_'):>14} {'peak MB':>8} "
        f"{'runs':>4}  {'range of round s (mean r2+)':>27}"
    )
    print(head)
    print("-" * len(head))
    for name, r in runs.items():
        if not r.get("ok"):
            print(f"{name:<26} {r.get('error', 'failed')[:200]}")
            continue
        final = r["final_metrics"].get(metric)
        print(
            f"{name:<26} {_fmt(r['wall_seconds']):>8} {_fmt(r['first_round_seconds']):>9} "
            f"{_fmt(r['mean_round_after_first'], 4):>19} "
            f"{_fmt(r['median_round_after_first'], 4):>8} {_fmt(final, 4):>14} "
            f"{r['peak_tree_rss_bytes'] / 1e6:>8.0f} {r.get('runs', 1):>4}  "
            f"{_range(r.get('mean_round_after_first_range')):>27}"
        )


def _range(v: list[float] | None) -> str:
    return "-" if not v else f"{v[0]:.4f} - {v[1]:.4f}"


def _check(label: str, ok: bool | None, detail: str) -> dict[str, Any]:
    status = "n/a " if ok is None else ("PASS" if ok else "FAIL")
    print(f"  [{status}] {label}: {detail}")
    return {"check": label, "status": status.strip(), "detail": detail}


def _get(runs: dict[str, dict[str, Any]], name: str, key: str) -> Any:
    r = runs.get(name) or {}
    if not r.get("ok"):
        return None
    if key.startswith("eval_"):
        return r["final_metrics"].get(key)
    return r.get(key)


def acceptance(runs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's acceptance items, each PASS / FAIL / n/a (a run missing)."""
    out = []
    w = {n: _get(runs, n, "wall_seconds") for n in runs}
    rnd = {n: _get(runs, n, "mean_round_after_first") for n in runs}
    acc = {n: _get(runs, n, "eval_accuracy") for n in runs}

    def ratio(a: str, b: str, src: dict[str, Any]) -> float | None:
        return None if src.get(a) is None or not src.get(b) else src[a] / src[b]

    r = ratio(FS_SIM, FL_SIM, w)
    out.append(
        _check(
            "fedstack simulation wall < 1/4 of Flower simulation",
            None if r is None else r < 0.25,
            "missing run"
            if r is None
            else f"{w[FS_SIM]:.2f} s / {w[FL_SIM]:.2f} s = {r:.3f} (target < 0.25)",
        )
    )
    r = ratio(FS_DEP, FL_SIM, w)
    out.append(
        _check(
            "fedstack deployment wall < Flower simulation wall",
            None if r is None else r < 1.0,
            "missing run"
            if r is None
            else f"{w[FS_DEP]:.2f} s / {w[FL_SIM]:.2f} s = {r:.3f} (target < 1)",
        )
    )
    r = ratio(FS_DEP, FL_DEP, w)
    out.append(
        _check(
            "fedstack deployment wall < 1/20 of Flower deployment",
            None if r is None else r < 0.05,
            "missing run"
            if r is None
            else f"{w[FS_DEP]:.2f} s / {w[FL_DEP]:.2f} s = {r:.4f} (target < 0.05)",
        )
    )
    for name in (FS_DEP, FS_SIM):
        r = ratio(name, FF, rnd)
        out.append(
            _check(
                f"{name} per-round (after round 1) within 2x framework-free",
                None if r is None else r <= 2.0,
                "missing run"
                if r is None
                else f"{rnd[name]:.4f} s / {rnd[FF]:.4f} s = {r:.2f}x (target <= 2)",
            )
        )
    for fs in (FS_DEP, FS_SIM):
        for fl in (FL_SIM, FL_DEP):
            a, b = acc.get(fs), acc.get(fl)
            diff = None if a is None or b is None else abs(a - b)
            out.append(
                _check(
                    f"final accuracy {fs} vs {fl} within 1 point",
                    None if diff is None else diff <= 0.01,
                    "missing run"
                    if diff is None
                    else f"{a:.4f} vs {b:.4f} (|diff| {diff * 100:.2f} points)",
                )
            )
    return out


def warm_up(flower_python: Path | None) -> None:
    """Read torch / scikit-learn into the page cache once, so no run pays a cold disk."""
    code = "import torch, sklearn.datasets, numpy"
    cmds = [[sys.executable, "-c", code]]
    if flower_python is not None:
        cmds.append([str(flower_python), "-c", code + ", flwr.simulation, ray"])
    for cmd in cmds:
        subprocess.run(cmd, capture_output=True, timeout=300, check=False)


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--agents", type=int, default=10)
    ap.add_argument(
        "--quick", action="store_true", help="5 rounds and no Flower deployment (about a minute)"
    )
    ap.add_argument("--skip-flower-deployment", action="store_true")
    ap.add_argument("--skip-flower-simulation", action="store_true")
    ap.add_argument("--skip-fedstack-simulation", action="store_true")
    ap.add_argument("--skip-fedstack-deployment", action="store_true")
    ap.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="runs of each entry, interleaved; the table shows medians and ranges (default 3)",
    )
    ap.add_argument(
        "--flower-deployment-repeat",
        type=int,
        default=1,
        help="runs of Flower's deployment engine (6-12 min each; default 1)",
    )
    ap.add_argument("--timeout", type=float, default=1200.0, help="per run, seconds")
    ap.add_argument("--keep-workdir", action="store_true", help="keep logs and stores")
    ap.add_argument("--out", default=str(fc.RESULTS / "flower_compare.json"))
    args = ap.parse_args()
    if args.quick:
        args.rounds = min(args.rounds, 5)
        args.skip_flower_deployment = True
        args.repeat = 1
    if args.rounds < 2:
        ap.error("--rounds must be at least 2 (round 1 is left out of the per-round time)")

    need_flower = not (args.skip_flower_deployment and args.skip_flower_simulation)
    flower: dict[str, Any] = {}
    if need_flower:
        print("preparing bench/.flower-venv (pinned Flower) ...", flush=True)
        flower = ensure_flower_venv()
    flower_python = Path(flower["venv"]) / "bin" / "python" if flower else None
    workdir = fc.new_workdir("fs-flower-compare-")
    print(
        f"flower_compare: digits, {args.agents} agents, Dirichlet(0.5), MLP 64-128-10, "
        f"{args.rounds} rounds; {os.cpu_count()} CPUs; flwr {flower.get('versions', {})}; "
        f"work folder {workdir}",
        flush=True,
    )
    warm_up(flower_python)

    plan: list[tuple[str, Any, tuple[Any, ...]]] = [(FF, fc.run_framework_free, ())]
    if not args.skip_fedstack_simulation:
        plan.append((FS_SIM, fc.run_fedstack_sim, ()))
    if not args.skip_fedstack_deployment:
        plan.append((FS_DEP, fc.run_fedstack_deployment, ()))
    if not args.skip_flower_simulation:
        plan.append((FL_SIM, fc.run_flower_sim, (flower_python,)))
    if not args.skip_flower_deployment:
        plan.append((FL_DEP, fc.run_flower_deployment, (flower_python,)))

    t_start = time.monotonic()
    if args.repeat < 1 or args.flower_deployment_repeat < 1:
        ap.error("--repeat and --flower-deployment-repeat must be at least 1")
    once = (FL_DEP,) if args.flower_deployment_repeat < args.repeat else ()
    runs = fc.run_plan(
        plan,
        "digits",
        args.rounds,
        args.agents,
        workdir,
        args.timeout,
        repeats=max(args.repeat, args.flower_deployment_repeat),
        once=once,
    )

    print()
    print(
        f"digits, {args.agents} agents, {args.rounds} rounds (wall: launch -> final global "
        "model evaluated; single-process runs: -> exit)"
    )
    print_table(runs)
    print()
    print("acceptance (issue 5, benchmark 1):")
    checks = acceptance(runs)
    result = {
        "benchmark": "flower_compare",
        "task": {
            "dataset": "sklearn digits, 80/20 stratified split seed 0",
            "agents": args.agents,
            "rounds": args.rounds,
            "partition": "dirichlet:0.5",
            "model": "MLP 64-128-10 (fedstack.trainers.torch_digits.build_mlp)",
            "local": fc.DIGITS,
            "strategy": "sample-weighted FedAvg, all agents every round",
            "evaluation": "central, fedstack.trainers.torch_digits:evaluate_global_mlp",
        },
    }
    fc.save_result(
        result,
        flower=flower,
        runs=runs,
        checks=checks,
        t_start=t_start,
        out=Path(args.out),
        workdir=workdir,
        keep=args.keep_workdir,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
