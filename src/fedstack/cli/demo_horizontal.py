"""``fedstack demo --aggregators K``: a horizontal federation on one host.

K aggregators named ``a1``..``aK`` share ONE SQLite file and one run name
(``--synthesis sync``), each on its own loopback port; the demo's agents are spread over
them round-robin (agent ``i`` starts at aggregator ``i % K``) and each is given every
member's URL, its own first, so it can fail over. Each member aggregates its cluster into
a semi-global model per round; the semi-global models of a round are synthesised
(sample-weighted) into the global model. The demo follows the store and prints, per
round, the accuracy of every member's semi-global model (models of kind
``"semi-global"``, evaluated here on the digits test split) and of the global model.

Why subprocesses and not several :class:`~fedstack.aggregator.Aggregator` objects in the
demo's process: a federation member is meant to be its own process (possibly on its own
host), so this is what a user would deploy, several processes sharing one SQLite file is
the configuration the embedded default promises to support, every member gets its own
interpreter (no GIL shared by K round owners and their aggregation threads, so the two
cores of a small machine are used), and a crash of one member shows up as a failed
process with its own log in ``WORKDIR/logs/aN.log`` instead of taking the demo down.
The cost is one interpreter start per member, paid in parallel. The first member is
started alone (it creates the run) and the others once it is ready.

The agents start in three steps so that the clusters begin round 1 together: ``agent-1``
(a1's) brings the first model; once every member holds it (the store shows version 0 in
each member's row), the agents of a2..aK; once the store shows those members with their
whole clusters, a1's remaining agents. Without this, a demo round (tens of milliseconds of
training) is much shorter than the federation's coordination intervals (heartbeats,
following the run's version): sync synthesis waits only for the members its store view
shows at the round with agents, so a member whose agents connected a moment later could
trail the others for several rounds (in a 10-round demo, often all of them), its
semi-global models arriving after the global model of their round was made (stored as
``late``) and the global model made from the other clusters alone. With one agent in a1's cluster
(``--agents`` = K) a1 may still run its first rounds alone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.live import Live
from rich.table import Table

from fedstack.cli.demo import (
    EVALUATOR,
    DemoArgs,
    DemoError,
    agent_args,
    finish,
    spawn,
    stop,
    wait_ready,
)
from fedstack.cli.output import console
from fedstack.names import safe_text
from fedstack.store import Member, Store
from fedstack.types import Metrics, Weights

__all__ = ["run_horizontal"]

LIVENESS = 5.0
"""Seconds of heartbeat silence after which the store calls a member dead (display only)."""
ROUND_TIMEOUT = 120.0
"""A cluster round's deadline (s): generous, the demo's clusters are all connected."""
HEARTBEAT = 0.2
"""Seconds between two heartbeats of a member (default 1 s). A demo round takes well under
a second, and sync synthesis waits only for the members whose last heartbeat shows agents:
at 1 s the first rounds could be synthesised before a member that is just getting its
agents is seen with them."""


@dataclass
class _Member:
    name: str
    proc: subprocess.Popen[bytes]
    ready: Path
    log: Path
    port: int = 0
    run_id: str = ""
    agents: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"


def _evaluate(weights: Weights) -> Metrics:
    from fedstack.trainers.digits import evaluate_global

    return evaluate_global(weights)


def _aggregator_args(
    name: str, args: DemoArgs, db: Path, run_name: str, cluster: int, ready: Path
) -> list[str]:
    return [
        "aggregator",
        "--name",
        name,
        "--synthesis",
        "sync",
        "--federation-heartbeat",
        str(HEARTBEAT),
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--db",
        str(db),
        "--run-name",
        run_name,
        "--rounds",
        str(args.rounds),
        "--threshold",
        "1.0",
        "--min-agents",
        str(cluster),
        "--round-timeout",
        str(ROUND_TIMEOUT),
        "--delivery",
        args.delivery,
        "--evaluator",
        EVALUATOR,
        "--finish-grace",
        "10",
        "--ready-file",
        str(ready),
        "--auth",
        "off",  # a local demonstration: loopback agents without credentials
    ]


def run_horizontal(args: DemoArgs, k: int) -> int:
    """Run the demo with ``k`` > 1 aggregators; print the table and summary (and the JSON
    line with ``--json``). Returns 0; raises :class:`DemoError` when the run fails."""
    work = Path(args.workdir).resolve()
    (work / "logs").mkdir(parents=True, exist_ok=True)
    db = work / "fedstack.db"
    run_name = f"demo-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    say = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    say(
        f"fedstack demo: {k} aggregators (horizontal federation, sync synthesis), "
        f"{args.agents} agents x {args.rounds} rounds, digits ({args.partition}), "
        f"{args.delivery} delivery; work folder {work}"
    )
    names = [f"a{j + 1}" for j in range(k)]
    clusters = [[i for i in range(args.agents) if i % k == j] for j in range(k)]
    t0 = time.monotonic()
    members: list[_Member] = []
    procs: list[subprocess.Popen[bytes]] = []
    try:
        Store(str(db)).close()  # the schema exists before any member opens the file
        for j, name in enumerate(names):
            ready = work / f"{name}.ready"
            ready.unlink(missing_ok=True)
            log = work / "logs" / f"{name}.log"
            proc = spawn(_aggregator_args(name, args, db, run_name, len(clusters[j]), ready), log)
            members.append(_Member(name, proc, ready, log))
            procs.append(proc)
            if j == 0:  # the first one creates the run; the others join it
                _ready(members[0], deadline=t0 + 60)
        for m in members[1:]:
            _ready(m, deadline=t0 + 60)
        run_id = members[0].run_id
        if any(m.run_id != run_id for m in members):
            raise DemoError("the aggregators did not join the same run; see the logs")
        urls = [m.url for m in members]

        def start_agent(i: int) -> None:
            j = i % k
            name = f"agent-{i + 1}"
            members[j].agents.append(name)
            mine = urls[j:] + urls[:j]  # its own aggregator first, then the others
            procs.append(spawn(agent_args(args, i, mine), work / "logs" / f"{name}.log"))

        # a synchronous start (see the module docstring): agent-1 brings the first model
        # to a1; once every member holds it, the other members' agents; once the store
        # shows those members with their whole clusters, a1's remaining agents
        start_agent(0)
        _wait_members(
            db, run_id, members, lambda m: m.version >= 0, time.monotonic() + 60, "the first model"
        )
        for i in range(1, args.agents):
            if i % k != 0:
                start_agent(i)
        cluster_size = {n: len(c) for n, c in zip(names[1:], clusters[1:], strict=True)}
        _wait_members(
            db,
            run_id,
            members,
            lambda m: m.active_agents >= cluster_size.get(m.name, 0),
            time.monotonic() + 60,
            "their agents",
        )
        for i in range(k, args.agents, k):
            start_agent(i)
        rows = _follow(db, run_id, args, names, members, procs, say, deadline=t0 + args.timeout)
        finish(procs, work / "logs")
    finally:
        stop(procs)
    wall = time.monotonic() - t0
    final = rows[-1]["accuracy"] if rows else None
    per_member: list[dict[str, Any]] = [
        {
            "name": m.name,
            "url": m.url,
            "agents": m.agents,
            "final_accuracy": (rows[-1]["aggregators"].get(m.name) or {}).get("accuracy")
            if rows
            else None,
        }
        for m in members
    ]
    if any(not a["in_global"] for r in rows for a in r["aggregators"].values()):
        say("* late: delivered after the global model of its round was made (not in it)")
    say("")
    if final is None:
        say("no round completed")
    else:
        say(f"final global accuracy {final:.4f} after {len(rows)} rounds in {wall:.1f} s")
        for pm in per_member:
            acc = pm["final_accuracy"]
            say(
                f"  {pm['name']} ({len(pm['agents'])} agents, {pm['url']}): semi-global "
                + (f"accuracy {acc:.4f}" if acc is not None else "model missing")
            )
    say(f"database: {db}  (run {run_name})")
    say(f"inspect it: fedstack db aggregators --db {db}   |   fedstack db lineage --db {db}")
    if args.json:
        print(
            json.dumps(
                {
                    "final_accuracy": final,
                    "rounds": rows,
                    "aggregators": per_member,
                    "wall_seconds": wall,
                    "db": str(db),
                    "run_id": run_id,
                    "agents": args.agents,
                    "partition": args.partition,
                    "synthesis": "sync",
                }
            )
        )
    return 0


def _ready(m: _Member, deadline: float) -> None:
    info = wait_ready(m.ready, m.proc, deadline, log=m.log)
    m.port = int(info["port"])
    m.run_id = str(info["run_id"])


def _wait_members(
    db: Path,
    run_id: str,
    members: list[_Member],
    ok: Callable[[Member], bool],
    deadline: float,
    what: str,
) -> None:
    """Return once the store shows every member (all of ``members``) satisfying ``ok``."""
    store = Store(str(db))
    try:
        while time.monotonic() < deadline:
            view = store.federation_view(run_id, 1, liveness=LIVENESS)
            if len(view.members) >= len(members) and all(ok(m) for m in view.members):
                return
            dead = [m for m in members if m.proc.poll() is not None]
            if dead:
                raise DemoError(f"aggregator {dead[0].name} exited; see {dead[0].log}")
            time.sleep(0.02)
    finally:
        store.close()
    raise DemoError(f"the aggregators did not all get {what} in time; see {members[0].log.parent}")


def _round_row(store: Store, run_id: str, r: dict[str, Any], previous: float) -> dict[str, Any]:
    """One round of the table: the global model's accuracy (the aggregators' evaluation,
    or, when the store has none yet, the same function run here) and each member's
    semi-global model's; ``seconds`` from ``previous`` (the previous global model's time)
    to this one."""
    rnd = int(r["round"])
    acc = r["metrics"].get("eval_accuracy")
    if not isinstance(acc, float):
        acc = float(_evaluate(store.load_weights(r["model_id"]))["accuracy"])
    view = store.federation_view(run_id, rnd, liveness=LIVENESS)
    members: dict[str, dict[str, Any]] = {}
    for sg in sorted(view.semi_globals, key=lambda s: s.name):
        if sg.round != rnd:
            continue
        members[sg.name] = {
            "accuracy": float(_evaluate(store.load_weights(sg.model_id))["accuracy"]),
            "agents": sg.num_updates,
            "num_samples": sg.num_samples,
            # False: delivered after the global model of its round was made (late)
            "in_global": sg.status == "synthesized",
        }
    finished = float(r["finished"])
    return {
        "round": rnd,
        "accuracy": float(acc),
        "seconds": max(0.0, finished - previous),
        "agents": r["num_updates"],
        "train_seconds": r["metrics"].get("max_train_seconds", 0.0),
        "synthesis_seconds": r["metrics"].get("synthesis_seconds"),
        "aggregators": members,
        "finished": finished,
    }


def _follow(
    db: Path,
    run_id: str,
    args: DemoArgs,
    names: list[str],
    members: list[_Member],
    procs: list[subprocess.Popen[bytes]],
    say: Any,
    deadline: float,
) -> list[dict[str, Any]]:
    """Print each round as its global model lands in the store."""
    store = Store(str(db))
    shown: list[dict[str, Any]] = []
    out = console(sys.stderr if args.json else sys.stdout)
    live = Live(_table(shown, names), console=out, auto_refresh=False) if out.is_terminal else None
    if live is None:
        say(
            f"{'round':>5}  {'agents':>6}  {'global':>8}  "
            + "  ".join(f"{n:>8}" for n in names)
            + f"  {'round s':>8}  {'train s':>8}"
        )
    else:
        live.start()
    try:
        while len(shown) < args.rounds:
            if time.monotonic() > deadline:
                raise DemoError(f"the demo did not finish within {args.timeout:.0f} s")
            for r in store.rounds(run_id)[len(shown) :]:
                prev = shown[-1]["finished"] if shown else _first_model_time(store, run_id)
                row = _round_row(store, run_id, r, prev)
                shown.append(row)
                if live is None:
                    say(_line(row, names))
                else:
                    live.update(_table(shown, names), refresh=True)
            dead = [p for p in procs if p.poll() not in (None, 0)]
            if dead:
                raise DemoError(
                    f"a federation process exited with code {dead[0].returncode}; "
                    f"see {db.parent / 'logs'}"
                )
            if all(m.proc.poll() is not None for m in members) and len(shown) < args.rounds:
                if len(store.rounds(run_id)) == len(shown):
                    raise DemoError("the aggregators stopped before the last round")
            time.sleep(0.05)
    finally:
        if live is not None:
            live.stop()
        store.close()
    for row in shown:
        row.pop("finished")
    return shown


def _first_model_time(store: Store, run_id: str) -> float:
    """When the federation's first model (version 0) was stored."""
    gid = store.global_model_id(run_id, 0)
    row = store.model(gid) if gid is not None else None
    return float(row["created"]) if row is not None else time.time()


def _acc(row: dict[str, Any], name: str) -> str:
    m = row["aggregators"].get(name)
    if m is None:
        return "-"
    return f"{m['accuracy']:.4f}" + ("" if m["in_global"] else "*")


def _line(row: dict[str, Any], names: list[str]) -> str:
    return (
        f"{row['round']:>5}  {row['agents']:>6}  {row['accuracy']:>8.4f}  "
        + "  ".join(f"{_acc(row, n):>8}" for n in names)
        + f"  {row['seconds']:>8.3f}  {row['train_seconds']:>8.3f}"
    )


def _table(rows: list[dict[str, Any]], names: list[str]) -> Table:
    t = Table(title="fedstack demo: horizontal federation", title_justify="left")
    for col in ("round", "agents", "global", *(safe_text(n) for n in names), "round s", "train s"):
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(
            str(r["round"]),
            str(r["agents"]),
            f"{r['accuracy']:.4f}",
            *(_acc(r, n) for n in names),
            f"{r['seconds']:.3f}",
            f"{r['train_seconds']:.3f}",
        )
    return t
