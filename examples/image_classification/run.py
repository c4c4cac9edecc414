"""Chapter 6: image classification in a federation, one agent against two.

Starts an aggregator (``python -m fedstack aggregator``) and N agents, each a process
running this file with ``--agent``. Every agent runs the book's image-classification
engine (:class:`fedstack.trainers.torch_cifar.BookImageTrainer`): per round it trains on
a random sample of its training data (CIFAR-10: 8,000 images), and prints and records
the accuracy of the global model it received and of its trained local model on the
whole test set (CIFAR-10: the 10,000 test images) in ``WORK_DIR/<n>-agents/metrics.csv``.
``--compare`` runs one agent and then two and writes the table ``accuracy.csv`` and the
plot ``accuracy.png`` (needs matplotlib)::

    python examples/image_classification/run.py --compare                 # digits, offline
    python examples/image_classification/run.py --compare --dataset cifar10 --data-dir DIR
    python examples/image_classification/run.py --report WORK_DIR         # table + plot again
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

EVALUATORS = {
    "digits": "fedstack.trainers.torch_digits:evaluate_global_cnn",
    "cifar10": "fedstack.trainers.torch_cifar:evaluate_global_cifar_cnn",
}
DEFAULT_ROUNDS = {"digits": 20, "cifar10": 50}
CSV_FIELDS = ["round", "agent", "global_accuracy", "local_accuracy", "num_samples"]
LABELS = {1: "One Agent", 2: "Two Agents"}
LAST_ROUNDS = 10
"""The comparison averages the global model's accuracy over this many last rounds."""


# --- agent side ---------------------------------------------------------------------------


def say(line: str) -> None:
    """Print one whole line at once (the agents share the terminal)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def run_agent(ready: Path, index: int, args: argparse.Namespace, out: Path) -> None:
    """One agent: for every global model received, evaluate it, train, report.

    It connects once the aggregator has written ``ready`` (its port, as JSON)."""
    from fedstack import Agent, FederationFinished
    from fedstack.trainers.torch_cifar import BookImageTrainer

    trainer = BookImageTrainer(  # imports torch and loads the data while the aggregator starts
        index,
        args.agents,
        dataset=args.dataset,
        data_dir=args.data_dir,
        partition=args.partition,
        samples_per_round=args.samples_per_round,
        seed=args.seed,
        threads=args.threads,
    )
    name = f"a{index + 1}"
    deadline = time.monotonic() + 60
    while not ready.exists():
        if time.monotonic() > deadline:
            raise SystemExit(f"[{name}] the aggregator did not start within 60 s")
        time.sleep(0.05)
    port = int(json.loads(ready.read_text())["port"])  # written atomically
    agent = Agent(f"ws://127.0.0.1:{port}", name=name)
    agent.send_initial_model(trainer.initial_weights())
    agent.start()
    round_ = 0
    try:
        while True:
            global_model = agent.wait_for_global_model()  # FederationFinished ends the loop
            round_ += 1
            weights, num_samples, metrics = trainer.fit(global_model, {})
            say(
                f"[{name}] round {round_}: global accuracy {metrics['global_accuracy']:.3f}, "
                f"local accuracy {metrics['local_accuracy']:.3f} ({num_samples} samples, "
                f"{metrics['train_seconds']:.1f} s)"
            )
            row = [round_, name, metrics["global_accuracy"], metrics["local_accuracy"], num_samples]
            with out.open("a", newline="") as f:  # one short append per row: safe to share
                csv.writer(f).writerow(row)
            if not agent.send_trained_model(weights, num_samples, metrics):
                say(f"[{name}] round {round_}: update unused (stale or final)")
    except FederationFinished:
        say(f"[{name}] federation finished after {round_} rounds")
    finally:
        agent.close()


# --- orchestration ------------------------------------------------------------------------


def wait_ready(ready: Path, process: subprocess.Popen[bytes], timeout: float = 60.0) -> int:
    """Wait until the aggregator listens (it writes ``ready``), or fail if it died;
    return its port."""
    deadline = time.monotonic() + timeout
    while not ready.exists():
        if process.poll() is not None:
            raise RuntimeError(f"aggregator exited with code {process.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"aggregator not ready within {timeout:.0f} s")
        time.sleep(0.05)
    return int(json.loads(ready.read_text())["port"])


def agent_command(
    index: int, num_agents: int, args: argparse.Namespace, out: Path, ready: Path
) -> list[str]:
    cmd = [
        sys.executable, __file__, "--agent", "--ready-file", str(ready), "--index", str(index),
        "--agents", str(num_agents), "--dataset", args.dataset, "--partition", args.partition,
        "--seed", str(args.seed), "--threads", str(args.threads), "--csv", str(out),
    ]  # fmt: skip
    if args.data_dir is not None:
        cmd += ["--data-dir", str(args.data_dir)]
    if args.samples_per_round is not None:
        cmd += ["--samples-per-round", str(args.samples_per_round)]
    return cmd


def run_federation(num_agents: int, args: argparse.Namespace, out_dir: Path) -> Path:
    """Run an aggregator and ``num_agents`` agents to the end; return the metrics CSV."""
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics_csv = out_dir / "metrics.csv"
    with metrics_csv.open("w", newline="") as f:
        csv.writer(f).writerow(CSV_FIELDS)
    ready = out_dir / "aggregator.ready"
    ready.unlink(missing_ok=True)
    print(f"== {num_agents} agent(s), {args.rounds} rounds on {args.dataset}, in {out_dir}")
    aggregator_cmd = [
        sys.executable, "-m", "fedstack", "aggregator",
        "--host", "127.0.0.1", "--port", "0", "--db", str(out_dir / "fedstack.db"),
        "--rounds", str(args.rounds), "--threshold", "1.0", "--min-agents", str(num_agents),
        "--evaluator", EVALUATORS[args.dataset], "--ready-file", str(ready),
        "--auth", "off",  # a local experiment on 127.0.0.1: no credentials
    ]  # fmt: skip
    env = dict(os.environ)
    if args.data_dir is not None:  # for the CIFAR-10 evaluator
        env["CIFAR10_DIR"] = str(args.data_dir)
    log_path = out_dir / "aggregator.log"
    processes: list[subprocess.Popen[bytes]] = []
    with log_path.open("wb") as log:
        aggregator = subprocess.Popen(aggregator_cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        processes.append(aggregator)
        try:
            for index in range(num_agents):  # they connect once the aggregator is ready
                cmd = agent_command(index, num_agents, args, metrics_csv, ready)
                processes.append(subprocess.Popen(cmd))
            port = wait_ready(ready, aggregator)
            print(f"   aggregator on ws://127.0.0.1:{port}", flush=True)
            agents = processes[1:]
            while any(a.poll() is None for a in agents):
                failed = [a.returncode for a in agents if a.returncode not in (None, 0)]
                if failed:
                    raise RuntimeError(f"an agent exited with code {failed[0]}")
                if aggregator.poll() not in (None, 0):
                    raise RuntimeError(f"the aggregator exited with code {aggregator.returncode}")
                time.sleep(0.2)
            failed = [a.returncode for a in agents if a.returncode != 0]
            if failed:
                raise RuntimeError(f"an agent exited with code {failed[0]}")
            try:
                aggregator.wait(timeout=30)  # it exits after the last round
            except subprocess.TimeoutExpired:
                pass  # terminated below
        except RuntimeError as exc:
            raise SystemExit(f"federation failed: {exc} (see {log_path})") from exc
        finally:
            for process in processes:
                if process.poll() is None:
                    process.terminate()
                    process.wait(timeout=10)
    return metrics_csv


# --- results ------------------------------------------------------------------------------


def accuracy_per_round(metrics_csv: Path) -> dict[int, float]:
    """Mean over agents of the received global model's test accuracy, per round."""
    values: dict[int, list[float]] = defaultdict(list)
    with metrics_csv.open(newline="") as f:
        for row in csv.DictReader(f):
            values[int(row["round"])].append(float(row["global_accuracy"]))
    return {r: sum(v) / len(v) for r, v in sorted(values.items())}


def last_rounds_mean(curve: dict[int, float], last: int = LAST_ROUNDS) -> float:
    """Mean accuracy over the ``last`` highest rounds of ``curve``."""
    rounds = sorted(curve)[-last:]
    return sum(curve[r] for r in rounds) / len(rounds)


def label(num_agents: int) -> str:
    return LABELS.get(num_agents, f"{num_agents} Agents")


def report(results: dict[int, dict[int, float]], work_dir: Path, dataset: str) -> None:
    """Write the table ``accuracy.csv``, print the comparison and save ``accuracy.png``."""
    rounds = sorted({r for curve in results.values() for r in curve})
    with (work_dir / "accuracy.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["round", *(f"{n}_agents" for n in results)])
        for r in rounds:
            writer.writerow([r, *(results[n].get(r, "") for n in results)])
    print(f"table saved to {work_dir / 'accuracy.csv'}")
    for num_agents, curve in results.items():
        mean, last = last_rounds_mean(curve), min(LAST_ROUNDS, len(curve))
        print(
            f"{label(num_agents)}: mean global accuracy over the last {last} rounds "
            f"{mean:.4f} (round {max(curve)}: {curve[max(curve)]:.4f})"
        )
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for num_agents, curve in results.items():
        ax.plot(list(curve), list(curve.values()), marker=".", label=label(num_agents))
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("Round")
    ax.set_ylabel("Test accuracy of the global model")
    ax.set_title(f"Federated CNN on {'CIFAR-10' if dataset == 'cifar10' else 'digits'}")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(work_dir / "accuracy.png", dpi=120)
    plt.close(fig)
    print(f"plot saved to {work_dir / 'accuracy.png'}")


def results_in(work_dir: Path) -> dict[int, dict[int, float]]:
    """The curves of every ``<n>-agents/metrics.csv`` under ``work_dir``."""
    found: dict[int, dict[int, float]] = {}
    for path in sorted(work_dir.glob("*-agents/metrics.csv")):
        n = path.parent.name.removesuffix("-agents")
        if n.isdigit():
            found[int(n)] = accuracy_per_round(path)
    if not found:
        raise SystemExit(f"no <n>-agents/metrics.csv in {work_dir}")
    return dict(sorted(found.items()))


# --- command line -------------------------------------------------------------------------


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse bad options here, before any process starts."""
    from fedstack.data.cifar import detect_cifar10
    from fedstack.data.partition import parse_partition
    from fedstack.errors import ConfigError

    if args.samples_per_round is not None and args.samples_per_round < 0:
        parser.error("--samples-per-round must be >= 0 (0: all of the agent's data)")
    if args.seed < 0:
        parser.error("--seed must be >= 0")
    if args.threads < 0:
        parser.error("--threads must be >= 0 (0: torch's default)")
    try:
        if args.partition.strip().lower() != "full":
            parse_partition(args.partition)
        if args.dataset == "digits" and args.data_dir is not None:
            parser.error("--data-dir is for --dataset cifar10 (digits come with scikit-learn)")
        if args.dataset == "cifar10":
            if args.data_dir is None:
                parser.error("--dataset cifar10 needs --data-dir (nothing is downloaded)")
            detect_cifar10(args.data_dir)
            args.data_dir = args.data_dir.expanduser().resolve()
    except ConfigError as exc:
        parser.error(str(exc))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--dataset", choices=["digits", "cifar10"], default="digits")
    parser.add_argument(
        "--data-dir",
        type=Path,
        help="CIFAR-10 folder (cifar-10-batches-bin/ or -py/, or its parent)",
    )
    parser.add_argument("--agents", type=positive, default=2, help="number of agents (default 2)")
    parser.add_argument(
        "--rounds", type=positive, help="FL rounds (default: digits 20, cifar10 50)"
    )
    parser.add_argument(
        "--partition",
        default="full",
        help="'full' (every agent holds the whole training set, as in the book), 'iid', "
        "'dirichlet:ALPHA', 'shards:K', ... (a share per agent)",
    )
    parser.add_argument(
        "--samples-per-round",
        type=int,
        help="training images per agent per round, 0 = all (default: cifar10 8000, digits 512)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per agent")
    parser.add_argument("--work-dir", type=Path, help="output folder (default: a new temp dir)")
    parser.add_argument("--compare", action="store_true", help="run one agent, then two")
    parser.add_argument(
        "--report",
        type=Path,
        metavar="WORK_DIR",
        help="only write the table and plot of a past run",
    )
    parser.add_argument("--agent", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--csv", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--ready-file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.agent:
        if args.ready_file is None or args.csv is None:
            parser.error("--agent is run.py's own: it needs --ready-file and --csv")
        run_agent(args.ready_file, args.index, args, args.csv)
        return
    if args.report is not None:
        report(results_in(args.report), args.report, args.dataset)
        return
    check_arguments(parser, args)
    args.rounds = args.rounds or DEFAULT_ROUNDS[args.dataset]
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="fedstack-ch6-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    configurations = [1, 2] if args.compare else [args.agents]
    results = {
        n: accuracy_per_round(run_federation(n, args, work_dir / f"{n}-agents"))
        for n in configurations
    }
    report(results, work_dir, args.dataset)


if __name__ == "__main__":
    main()
