"""``fedstack demo``: a whole federation on embedded defaults.

One aggregator and N agents run as separate processes talking over loopback WebSockets;
scikit-learn's bundled digits are split across the agents (IID or Dirichlet label skew);
the aggregator keeps everything in an SQLite store in the work folder and evaluates each
global model on the held-out test split. The demo prints a live per-round table from the
store and a summary.

``--aggregators K`` (K > 1) runs a horizontal federation instead
(:mod:`fedstack.cli.demo_horizontal`): K aggregator processes sharing the SQLite file, the
agents spread over them. K = 1 (the default) is the single-aggregator demo above.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from rich.live import Live
from rich.table import Table

from fedstack.cli.options import JsonFlag
from fedstack.cli.output import console, quiet_logs
from fedstack.data.digits import partition_digits
from fedstack.data.partition import parse_partition
from fedstack.errors import FedstackError
from fedstack.store import Store

TRAINER = "fedstack.trainers.digits:DigitsLinearTrainer"
EVALUATOR = "fedstack.trainers.digits:evaluate_global"


class DemoError(FedstackError):
    """The demo could not run or finish."""


@dataclass(frozen=True)
class DemoArgs:
    """The demo's options, checked."""

    agents: int
    rounds: int
    partition: str
    workdir: str
    seed: int
    delivery: str
    timeout: float
    json: bool


def spawn(args: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    """``python -m fedstack ARGS`` in its own session, output to ``log_path``."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "fedstack", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )


def cmd_demo(
    agents: Annotated[
        int | None,
        typer.Option(
            "--agents",
            help="agent processes (default 3; with --aggregators K > 1: 2 per aggregator)",
        ),
    ] = None,
    aggregators: Annotated[
        int,
        typer.Option(
            "--aggregators",
            help="aggregator processes; K > 1 runs a horizontal federation sharing one "
            "SQLite file (semi-global models synthesised into the global model)",
        ),
    ] = 1,
    rounds: Annotated[int, typer.Option("--rounds")] = 10,
    partition: Annotated[
        str,
        typer.Option(
            "--partition",
            help="iid, dirichlet:ALPHA, shards:K, quantity:ALPHA or the book's keep ratios "
            "keep:sel=S,def=D[,map=0-2/3-5/6-9][,overlap=true]",
        ),
    ] = "dirichlet:0.5",
    workdir: Annotated[str, typer.Option("--workdir")] = "fedstack-demo",
    seed: Annotated[int, typer.Option("--seed")] = 0,
    delivery: Annotated[Literal["push", "poll"], typer.Option("--delivery")] = "push",
    timeout: Annotated[float, typer.Option("--timeout", help="give up after this many s")] = 600.0,
    json_: JsonFlag = False,
) -> int:
    """Run a whole federation on bundled data.

    One aggregator and --agents agent processes over loopback WebSockets, scikit-learn's
    digits split across the agents (--partition), an SQLite store in --workdir; a live
    round table, then a summary (--json: one JSON line of results at the end).
    With --aggregators K > 1: K aggregators (a1..aK) on the same SQLite file form one
    federation, the agents spread over them; the table adds each aggregator's
    semi-global model's accuracy.
    """
    if aggregators < 1:
        raise DemoError("--aggregators must be at least 1")
    if agents is None:
        agents = 3 if aggregators == 1 else 2 * aggregators
    args = DemoArgs(agents, rounds, partition, workdir, seed, delivery, timeout, json_)
    if args.json:
        quiet_logs()
    if args.agents < 1 or args.rounds < 1:
        raise DemoError("--agents and --rounds must be at least 1")
    parse_partition(args.partition)  # fail early on a bad spec
    # ... or on one the digits cannot satisfy for this many agents (e.g. keep ratios
    # adding up to more than a class without overlap=true)
    partition_digits(0, args.agents, args.partition, args.seed)
    if aggregators > 1:
        from fedstack.cli.demo_horizontal import run_horizontal

        if args.agents < aggregators:
            raise DemoError(
                f"--agents ({args.agents}) must be at least --aggregators ({aggregators}): "
                "every aggregator needs a cluster"
            )
        return run_horizontal(args, aggregators)
    work = Path(args.workdir).resolve()
    (work / "logs").mkdir(parents=True, exist_ok=True)
    db = work / "fedstack.db"
    ready = work / "aggregator.ready"
    ready.unlink(missing_ok=True)
    run_name = f"demo-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    say = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    say(
        f"fedstack demo: {args.agents} agents x {args.rounds} rounds, digits "
        f"({args.partition}), {args.delivery} delivery; work folder {work}"
    )
    t0 = time.monotonic()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        agg = spawn(
            [
                "aggregator",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--db",
                str(db),
                "--rounds",
                str(args.rounds),
                "--threshold",
                "1.0",
                "--min-agents",
                str(args.agents),
                "--round-timeout",
                "120",
                "--delivery",
                args.delivery,
                "--evaluator",
                EVALUATOR,
                "--run-name",
                run_name,
                "--finish-grace",
                "10",
                "--ready-file",
                str(ready),
                "--auth",
                "off",  # a local demonstration: loopback agents without credentials
            ],
            work / "logs" / "aggregator.log",
        )
        procs.append(agg)
        info = wait_ready(ready, agg, deadline=t0 + 60)
        url = f"ws://127.0.0.1:{info['port']}"
        for i in range(args.agents):
            procs.append(spawn(agent_args(args, i, [url]), work / "logs" / f"agent-{i + 1}.log"))
        rows = _follow(db, info["run_id"], args, agg, procs, say, deadline=t0 + args.timeout)
        finish(procs, work / "logs")
    finally:
        stop(procs)
    wall = time.monotonic() - t0
    final = rows[-1]["accuracy"] if rows else None
    say("")
    say(
        f"final global accuracy {final:.4f} after {len(rows)} rounds in {wall:.1f} s"
        if final is not None
        else "no round completed"
    )
    say(f"database: {db}  (run {run_name})")
    say(f"inspect it: fedstack db rounds --db {db}   |   fedstack db lineage --db {db}")
    if args.json:
        print(
            json.dumps(
                {
                    "final_accuracy": final,
                    "rounds": rows,
                    "wall_seconds": wall,
                    "db": str(db),
                    "run_id": info["run_id"],
                    "agents": args.agents,
                    "partition": args.partition,
                }
            )
        )
    return 0


def agent_args(args: DemoArgs, i: int, urls: list[str]) -> list[str]:
    """The ``fedstack agent`` arguments of demo agent ``i`` (name ``agent-{i + 1}``): the
    digits trainer on its part of the partition, trying ``urls`` in order."""
    return [
        "agent",
        *(a for u in urls for a in ("--url", u)),
        "--name",
        f"agent-{i + 1}",
        "--trainer",
        TRAINER,
        "--trainer-arg",
        f"index={i}",
        "--trainer-arg",
        f"num_agents={args.agents}",
        "--trainer-arg",
        f"partition={args.partition}",
        "--trainer-arg",
        f"seed={args.seed}",
    ]


def finish(procs: list[subprocess.Popen[bytes]], logs: Path) -> None:
    """Wait for the demo's processes to exit; DemoError if any failed."""
    for p in procs:
        p.wait(timeout=60)
    bad = [p for p in procs if p.returncode != 0]
    if bad:
        raise DemoError(f"{len(bad)} process(es) failed; see the logs in {logs}")


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    """Stop whatever of ``procs`` still runs (SIGTERM to its process group, then SIGKILL)."""
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=10)


def wait_ready(
    ready: Path, agg: subprocess.Popen[bytes], deadline: float, log: Path | None = None
) -> dict[str, Any]:
    """The aggregator's ready file (port, run id), once written; DemoError (pointing at
    ``log``) if it exits or ``deadline`` (monotonic) passes first."""
    log = log or ready.parent / "logs" / "aggregator.log"
    while time.monotonic() < deadline:
        if ready.exists():
            data: dict[str, Any] = json.loads(ready.read_text())
            return data
        if agg.poll() is not None:
            raise DemoError(f"the aggregator exited with code {agg.returncode}; see {log}")
        time.sleep(0.02)
    raise DemoError(f"the aggregator did not start in time; see {log}")


def _follow(
    db: Path,
    run_id: str,
    args: DemoArgs,
    agg: subprocess.Popen[bytes],
    procs: list[subprocess.Popen[bytes]],
    say: Any,
    deadline: float,
) -> list[dict[str, Any]]:
    """Print each round as its evaluated global model lands in the store."""
    store = Store(str(db))
    shown: list[dict[str, Any]] = []
    out = console(sys.stderr if args.json else sys.stdout)
    live = Live(_round_table(shown), console=out, auto_refresh=False) if out.is_terminal else None
    if live is None:
        say(f"{'round':>5}  {'agents':>6}  {'accuracy':>8}  {'round s':>8}  {'train s':>8}")
    else:
        live.start()
    try:
        while len(shown) < args.rounds:
            if time.monotonic() > deadline:
                raise DemoError(f"the demo did not finish within {args.timeout:.0f} s")
            for r in store.rounds(run_id)[len(shown) :]:
                acc = r["metrics"].get("eval_accuracy")
                if acc is None:
                    break
                row = {
                    "round": r["round"],
                    "accuracy": acc,
                    "seconds": r["seconds"],
                    "agents": r["num_updates"],
                    "train_seconds": r["metrics"].get("max_train_seconds", 0.0),
                }
                shown.append(row)
                if live is None:
                    say(
                        f"{row['round']:>5}  {row['agents']:>6}  {acc:>8.4f}  "
                        f"{row['seconds']:>8.3f}  {row['train_seconds']:>8.3f}"
                    )
                else:
                    live.update(_round_table(shown), refresh=True)
            dead = [p for p in procs if p.poll() not in (None, 0)]
            if dead:
                raise DemoError(
                    f"a federation process exited with code {dead[0].returncode}; "
                    f"see {db.parent / 'logs'}"
                )
            if agg.poll() is not None and len(shown) < args.rounds:
                if len(store.rounds(run_id)) == len(shown):
                    raise DemoError("the aggregator stopped before the last round")
            time.sleep(0.05)
    finally:
        if live is not None:
            live.stop()
        store.close()
    return shown


def _round_table(rows: list[dict[str, Any]]) -> Table:
    t = Table(title="fedstack demo", title_justify="left")
    for col in ("round", "agents", "accuracy", "round s", "train s"):
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(
            str(r["round"]),
            str(r["agents"]),
            f"{r['accuracy']:.4f}",
            f"{r['seconds']:.3f}",
            f"{r['train_seconds']:.3f}",
        )
    return t
