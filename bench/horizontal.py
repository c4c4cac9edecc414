"""Horizontal federation: round time against the number of aggregators, and synthesis time.

    .venv/bin/python bench/horizontal.py [--quick] [--agents-per-aggregator N]
        [--aggregators 1,2,4] [--rounds R] [--params P] [--repeat N] [--plot FILE]
        [--store sqlite|postgresql] [--synthesis sync|async]

For each K in ``--aggregators`` (default 1, 2, 4) at a fixed number of live agents per
aggregator (default 250, so 1,000 at K = 4), three kinds of run on 127.0.0.1, each
aggregator a real ``fedstack aggregator`` subprocess and each cluster's agents one load
generator subprocess (:mod:`fedstack.testing.loadgen`: the real protocol over real
WebSockets, "training" = +0.001 on a 1e4-parameter float32 model):

- **federated**: K members ``a1..aK`` of one federation (``--name``, one SQLite file, one
  run name, ``--synthesis sync``), every round needs every agent of every cluster;
- **independent** (the reference measured in the same run): K standalone aggregators with
  the same clusters, each on its own SQLite file, at the same time: the same machine load
  without the federation (no shared database, no synthesis, no waiting for each other);
- **single**: one standalone aggregator with one cluster (= independent at K = 1): the
  issue's "single aggregator with the same cluster size".

Round time = the interval between consecutive global models in the store (``finished``
of round r minus round r - 1), median over the intervals between consecutive COMPLETE
rounds (made from every cluster's agents) among rounds 2..R, the intervals from round 3
on (``WARMUP`` = 2): the first rounds include the agents joining and, in a federation,
the members settling into step (a member whose agents were all connected a moment later
than the others' trails them for a few rounds: see ``fedstack.cli.demo_horizontal``).
Synthesis time = the median of the global rounds' ``synthesis_seconds`` metric (recorded
by the member that synthesised: reading the semi-global models, the weighted
combination, the commit); synthesis latency = from the last semi-global model a global
model was made from to that global model (what the federation adds after the slowest
cluster's round: polling the store, synthesis, commit). Printed ratios: federated /
single (what the issue bounds: synthesis adds at most 10 %) and federated / independent
(the federation's cost at equal load: on a machine with fewer cores than processes the
single-aggregator ratio also measures K clusters sharing the CPU). ``complete``: the
share of the measured federated rounds whose global model was made from every cluster's
agents. ``--store postgresql`` runs every aggregator on a throwaway local PostgreSQL
server instead (the multi-host configuration; fsync off there).

``--repeat N`` interleaves the kinds (independent, federated, per K, N times) so a noisy
minute hits all alike; medians are reported. ``--quick``: 50 agents per aggregator,
K = 1 and 2, 8 rounds. Results: table on stdout, JSON in bench/results/horizontal.json,
``--plot FILE`` a PNG (matplotlib: the ``plot`` extra).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _live import save  # noqa: E402

from fedstack.store import Store  # noqa: E402

START_TIMEOUT = 60.0
WARMUP = 2
"""Rounds left out of the figures (joining, members settling into step)."""


def _aggregator(
    d: Path, tag: str, db: str, agents: int, rounds: int, timeout: float, fed: list[str]
) -> tuple[subprocess.Popen[bytes], Path]:
    ready = d / f"{tag}.ready"
    args = [
        sys.executable,
        "-m",
        "fedstack",
        "-q",
        "aggregator",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--db",
        db,
        "--auth",
        "off",
        "--min-agents",
        str(agents),
        "--threshold",
        "1.0",
        "--rounds",
        str(rounds),
        "--round-timeout",
        str(timeout),
        "--finish-grace",
        "2",
        "--ready-file",
        str(ready),
        *fed,
    ]
    with open(d / f"{tag}.log", "wb") as log:
        proc = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1")
        )
    return proc, ready


def _wait_ready(d: Path, tag: str, proc: subprocess.Popen[bytes], ready: Path) -> int:
    deadline = time.monotonic() + START_TIMEOUT
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            log = (d / f"{tag}.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"aggregator {tag} did not start: {log}")
        time.sleep(0.02)
    port: int = json.loads(ready.read_text())["port"]
    return port


def run_once(
    k: int,
    agents: int,
    rounds: int,
    params: int,
    *,
    federated: bool,
    synthesis: str = "sync",
    timeout: float = 300.0,
    new_db: Callable[[Path, str], str] | None = None,
) -> dict[str, Any]:
    """One run of ``k`` aggregators with ``agents`` live agents each (see the module
    docstring); returns its round times, synthesis times and errors. ``new_db(dir, tag)``
    makes a fresh database (default: an SQLite file in ``dir``)."""
    with tempfile.TemporaryDirectory(prefix="fedstack-horizontal-") as tmp:
        d = Path(tmp)
        make = new_db or (lambda d, tag: str(d / f"{tag}.db"))
        names = [f"a{j + 1}" for j in range(k)]
        dbs = [make(d, "fed")] * k if federated else [make(d, n) for n in names]
        if federated:
            Store(dbs[0]).close()  # the schema exists before the members start
        procs: list[subprocess.Popen[bytes]] = []
        loads: list[subprocess.Popen[bytes]] = []
        try:
            ports = []
            for j, name in enumerate(names):
                fed = (
                    ["--name", name, "--run-name", "bench", "--synthesis", synthesis]
                    if federated
                    else []
                )
                proc, ready = _aggregator(d, name, dbs[j], agents, rounds, timeout, fed)
                procs.append(proc)
                if federated and j == 0:  # the first member creates the run
                    ports.append(_wait_ready(d, name, proc, ready))
            for j, name in enumerate(names):
                if not (federated and j == 0):
                    ports.append(_wait_ready(d, name, procs[j], d / f"{name}.ready"))
            t0 = time.perf_counter()
            for j, port in enumerate(ports):
                with open(d / f"lg{j}.log", "wb") as lg_log:  # files: no pipe fills up
                    loads.append(
                        subprocess.Popen(
                            [
                                sys.executable,
                                "-m",
                                "fedstack.testing.loadgen",
                                "--url",
                                f"ws://127.0.0.1:{port}",
                                "--agents",
                                str(agents),
                                "--rounds",
                                str(rounds),
                                "--params",
                                str(params),
                                "--timeout",
                                str(timeout),
                                "--name-prefix",
                                f"m{j + 1}",
                                "--json",
                                str(d / f"lg{j}.json"),
                                "-q",
                            ],
                            stdout=lg_log,
                            stderr=subprocess.STDOUT,
                        )
                    )
            lg_errors = 0
            for j, lg in enumerate(loads):
                lg.wait(timeout=timeout + 60)
                out = d / f"lg{j}.json"
                report = json.loads(out.read_text()) if out.exists() else {"error_count": 1}
                lg_errors += int(report.get("error_count", 1))
                if not out.exists():
                    tail = (d / f"lg{j}.log").read_text(errors="replace")[-1000:]
                    print(f"load generator {j} failed: {tail}", file=sys.stderr)
            wall = time.perf_counter() - t0
            for p in procs:
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.send_signal(signal.SIGTERM)
                    p.wait(30)
            per_db = [_rounds(db, federated) for db in (dbs[:1] if federated else dbs)]
            agg_errors = sum(
                1
                for n in names
                for ln in (d / f"{n}.log").read_text(errors="replace").splitlines()
                if "Traceback" in ln or " ERROR " in ln
            )
        finally:
            for child in [*procs, *loads]:
                if child.poll() is None:
                    child.kill()
                    child.wait(10)
    need = agents * (k if federated else 1)  # a complete round: every cluster's agents
    for rows in per_db:
        for r in rows:
            r["complete"] = r["num_updates"] >= need
    # steady state: past the warm-up, consecutive complete rounds only (a federation's
    # members may need a few rounds to fall into step; "complete_rounds" says how many)
    steady = [[r for r in rows[WARMUP - 1 :] if r["complete"]] for rows in per_db]
    medians = [_median_interval(rows) for rows in steady]
    synth = [
        float(r["metrics"]["synthesis_seconds"])
        for rows in steady
        for r in rows[1:]
        if isinstance(r["metrics"].get("synthesis_seconds"), int | float)
    ]
    latency = [
        float(r["synthesis_latency"])
        for rows in steady
        for r in rows[1:]
        if r.get("synthesis_latency") is not None
    ]
    full = [r["complete"] for rows in per_db for r in rows[WARMUP:]]
    return {
        "k": k,
        "federated": federated,
        "complete_rounds": sum(full) / len(full) if full else None,
        "synthesis_latency_seconds": statistics.median(latency) if latency else None,
        "agents_per_aggregator": agents,
        "rounds_completed": [len(rows) for rows in per_db],
        "round_seconds": statistics.mean(medians) if medians else float("nan"),
        "round_seconds_per_run": medians,
        "synthesis_seconds": statistics.median(synth) if synth else None,
        "wall_seconds": wall,
        "errors": lg_errors + agg_errors,
        "rounds": per_db,
    }


def _rounds(db: str, federated: bool) -> list[dict[str, Any]]:
    """The run's global rounds; federated: with ``synthesis_latency`` = from the last
    semi-global model the global model was made from to the global model (wall clock)."""
    store = Store(db)
    try:
        run_id = store.latest_run_id()
        rows = store.rounds(run_id) if run_id is not None else []
        out = []
        for r in rows:
            row = {
                "round": r["round"],
                "finished": r["finished"],
                "seconds": r["seconds"],
                "num_updates": r["num_updates"],
                "metrics": {
                    k: v for k, v in r["metrics"].items() if isinstance(v, int | float | str)
                },
            }
            if federated and run_id is not None:
                used = str(r["metrics"].get("synthesis_members", "")).split(",")
                view = store.federation_view(run_id, r["round"], liveness=5.0)
                last = [sg.finished for sg in view.semi_globals if sg.name in used]
                row["synthesis_latency"] = r["finished"] - max(last) if last else None
            out.append(row)
        return out
    finally:
        store.close()


def _median_interval(rows: list[dict[str, Any]]) -> float:
    """Median interval between consecutive rounds of ``rows`` (nan: fewer than two)."""
    gaps = [
        b["finished"] - a["finished"]
        for a, b in zip(rows, rows[1:], strict=False)
        if b["round"] == a["round"] + 1
    ]
    return statistics.median(gaps) if gaps else float("nan")


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--quick", action="store_true", help="50 agents per aggregator, K = 1, 2, 6 rounds"
    )
    p.add_argument("--agents-per-aggregator", type=int, default=250)
    p.add_argument("--aggregators", default="1,2,4", help="comma-separated K values")
    p.add_argument("--rounds", type=int, default=10, help=f"at least {WARMUP + 2}")
    p.add_argument("--params", type=int, default=10**4, help="model parameters (float32)")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--synthesis", choices=("sync", "async"), default="sync")
    p.add_argument(
        "--store",
        choices=("sqlite", "postgresql"),
        default="sqlite",
        help="sqlite: files on this host (a federation shares one); postgresql: a throwaway "
        "local server (fedstack.testing.postgres; fsync off), a fresh database per run",
    )
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--plot", metavar="FILE", help="write a PNG plot here")
    args = p.parse_args()
    if args.quick:
        args.agents_per_aggregator, args.aggregators, args.rounds = 50, "1,2", 8
    if args.rounds < WARMUP + 2:
        p.error(f"--rounds must be at least {WARMUP + 2}")
    ks = [int(x) for x in args.aggregators.split(",") if x.strip()]
    n = args.agents_per_aggregator
    print(
        f"horizontal federation: {n} live agents per aggregator, {args.rounds} rounds, "
        f"{args.params:.0e} float32 parameters, {args.synthesis} synthesis, {args.store}, "
        f"{args.repeat} repeat(s)"
    )
    runs: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        new_db: Callable[[Path, str], str] | None = None
        if args.store == "postgresql":
            from fedstack.testing.postgres import PostgresServer

            pg = stack.enter_context(PostgresServer())

            def new_db(d: Path, tag: str) -> str:
                return pg.create_database()

        for rep in range(args.repeat):
            for k in ks:
                for federated in (False, True):
                    r = run_once(
                        k,
                        n,
                        args.rounds,
                        args.params,
                        federated=federated,
                        synthesis=args.synthesis,
                        timeout=args.timeout,
                        new_db=new_db,
                    )
                    r["repeat"] = rep
                    runs.append(r)
                    kind = "federated" if federated else "independent"
                    synth = r["synthesis_seconds"]
                    print(
                        f"  K={k} {kind:<11} round {r['round_seconds']:.3f} s"
                        + (f", synthesis {synth:.4f} s" if synth is not None else "")
                        + f", errors {r['errors']}"
                    )
    rows = summarize(runs, ks)
    print()
    print(
        f"{'K':>3} {'agents':>7} {'federated s':>12} {'independent s':>14} {'single s':>9} "
        f"{'fed/single':>11} {'fed/indep':>10} {'synthesis s':>12} {'latency s':>10} "
        f"{'latency/round':>14} {'complete':>9}"
    )
    for row in rows:
        print(
            f"{row['k']:>3} {row['agents']:>7} {row['federated_seconds']:>12.3f} "
            f"{row['independent_seconds']:>14.3f} {row['single_seconds']:>9.3f} "
            f"{row['ratio_vs_single']:>11.3f} {row['ratio_vs_independent']:>10.3f} "
            f"{_fmt(row['synthesis_seconds'], 12, 4)} "
            f"{_fmt(row['synthesis_latency_seconds'], 10, 4)} {_fmt(row['latency_share'], 14, 3)} "
            f"{_fmt(row['complete_rounds'], 9, 2)}"
        )
    out = {"config": vars(args), "table": rows, "runs": runs}
    print(f"\nwrote {save('horizontal', out)}")
    if args.plot:
        plot(rows, Path(args.plot), n)
    return 0 if all(r["errors"] == 0 for r in runs) else 1


def _fmt(v: float | None, width: int, digits: int) -> str:
    return f"{'-':>{width}}" if v is None else f"{v:>{width}.{digits}f}"


def summarize(runs: list[dict[str, Any]], ks: list[int]) -> list[dict[str, Any]]:
    """Per K, the medians over repeats and the ratios (see the module docstring)."""

    def med(k: int, federated: bool, key: str) -> float | None:
        vals = [r[key] for r in runs if r["k"] == k and r["federated"] == federated]
        vals = [v for v in vals if v is not None]
        return statistics.median(vals) if vals else None

    single = med(1, False, "round_seconds") if 1 in ks else None
    rows = []
    for k in ks:
        fed = med(k, True, "round_seconds") or float("nan")
        ind = med(k, False, "round_seconds") or float("nan")
        synth = med(k, True, "synthesis_seconds")
        latency = med(k, True, "synthesis_latency_seconds")
        complete = med(k, True, "complete_rounds")
        ref = single if single is not None else float("nan")
        rows.append(
            {
                "k": k,
                "agents": k * next(r["agents_per_aggregator"] for r in runs),
                "federated_seconds": fed,
                "independent_seconds": ind,
                "single_seconds": ref,
                "ratio_vs_single": fed / ref,
                "ratio_vs_independent": fed / ind,
                "synthesis_seconds": synth,
                "synthesis_share": None if synth is None else synth / fed,
                "synthesis_latency_seconds": latency,
                "latency_share": None if latency is None else latency / fed,
                "complete_rounds": complete,
            }
        )
    return rows


def plot(rows: list[dict[str, Any]], path: Path, n: int) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[plot]'): no plot")
        return
    ks = [r["k"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    a.plot(ks, [r["federated_seconds"] for r in rows], "o-", label="federated (sync synthesis)")
    a.plot(ks, [r["independent_seconds"] for r in rows], "s--", label="K independent aggregators")
    a.axhline(rows[0]["single_seconds"], color="gray", ls=":", label="single aggregator")
    a.set(
        xlabel="aggregators K",
        ylabel="round time (s)",
        title=f"round time vs aggregators ({n} live agents each)",
        xticks=ks,
    )
    a.set_ylim(bottom=0)
    a.legend()
    a.grid(True, alpha=0.3)
    synth = [r["synthesis_seconds"] or 0.0 for r in rows]
    latency = [r["synthesis_latency_seconds"] or 0.0 for r in rows]
    x = list(range(len(ks)))
    b.bar([i - 0.2 for i in x], synth, 0.4, label="synthesis (metric)", color="tab:orange")
    b.bar([i + 0.2 for i in x], latency, 0.4, label="last semi-global -> global", color="tab:red")
    for i, r in enumerate(rows):
        b.annotate(
            f"{r['ratio_vs_single']:.2f}x single\n{r['ratio_vs_independent']:.2f}x indep.",
            (i, max(synth[i], latency[i])),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    b.set_xticks(x, [str(k) for k in ks])
    b.legend(fontsize=8)
    b.set(xlabel="aggregators K", ylabel="seconds per round (median)", title="synthesis")
    b.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
