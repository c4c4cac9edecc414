"""Runners shared by ``bench/flower_compare.py`` and ``bench/overhead_probe.py``.

Every framework runs in processes started by the benchmark and is measured the same way:

- **wall time**: from launching the first process to the moment the run's final global
  model has been evaluated (deployments: the server side's timestamp / the store row; the
  single-process runs, fedstack's simulation and the framework-free loop: to the
  process's exit, which also counts their teardown);
- **per-round time**: the interval between two consecutive new global models (rounds
  2..N; round 1 includes start-up);
- **peak memory of the process tree**: the total RSS of every process started for the
  run (all descendants of the benchmark process, plus anything left in the sessions it
  started), sampled every 0.1 s with psutil; the maximum of that sum. Shared pages count
  once per process, as RSS does, for every framework alike.

Everything is bounded by timeouts and torn down by process group (SIGTERM, then SIGKILL),
also on failure. Only 127.0.0.1 is used. The worker entry point below runs the
framework-free loops in their own process::

    .venv/bin/python bench/fedbench_common.py framework-free --task digits --rounds 20 \\
        --agents 10 --out /tmp/ff.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS = BENCH / "results"
FLOWER_APP = BENCH / "flower_apps" / "fsbench"
FLOWER_SIM_DRIVER = BENCH / "flower_apps" / "run_flower_sim.py"
FEDSTACK_PY = sys.executable

# The runs' names (the keys of every benchmark's table and JSON).
FF = "framework-free loop"
FS_SIM = "fedstack simulation"
FS_DEP = "fedstack deployment"
FL_SIM = "Flower simulation (Ray)"
FL_DEP = "Flower deployment"

DIGITS_TRAINER = "fedstack.trainers.torch_digits:DigitsMLPTrainer"
DIGITS_EVALUATOR = "fedstack.trainers.torch_digits:evaluate_global_mlp"
PROBE_TRAINER = "fedstack.testing.probe:ProbeTrainer"
PROBE_EVALUATOR = "fedstack.testing.probe:evaluate_probe"

# The task, fixed for every framework (PERF.md's anchor workload).
DIGITS = {"partition": "dirichlet:0.5", "seed": 0, "epochs": 1, "lr": 0.05, "batch_size": 32}
PROBE = {"params": 25_000_000, "delta": 0.001}

# Telemetry / usage reporting off: this machine has no internet, and a phone-home that
# times out would only slow Flower down. Everything else is Flower's defaults.
FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "RAY_USAGE_STATS_ENABLED": "0"}


# --- measuring ----------------------------------------------------------------------------


class TreeMemory:
    """Peak total RSS of the benchmark's descendants (and of the sessions it started).

    The benchmark process itself is not counted; runs happen one after the other, so
    during a run its descendants are exactly that run's processes.
    """

    def __init__(self, interval: float = 0.1) -> None:
        self.peak = 0
        self.sids: set[int] = set()
        self._me = psutil.Process(os.getpid())
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def processes(self) -> list[psutil.Process]:
        """The run's live processes."""
        found: dict[int, psutil.Process] = {}
        try:
            for p in self._me.children(recursive=True):
                found[p.pid] = p
        except psutil.Error:
            pass
        if self.sids:
            for pid in psutil.pids():
                if pid in found or pid == self._me.pid:
                    continue
                try:
                    if os.getsid(pid) in self.sids:
                        found[pid] = psutil.Process(pid)
                except (OSError, psutil.Error):
                    pass
        return list(found.values())

    def _run(self) -> None:
        while not self._stop.is_set():
            total = 0
            for p in self.processes():
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            self._stop.wait(self._interval)

    def stop(self) -> int:
        """Stop sampling; the peak in bytes."""
        self._stop.set()
        self._thread.join(5)
        return self.peak


class Procs:
    """Processes of one run, each in its own session; torn down together."""

    def __init__(self, mem: TreeMemory, logdir: Path) -> None:
        self.mem = mem
        self.logdir = logdir
        self.procs: list[subprocess.Popen[bytes]] = []
        self.commands: list[str] = []

    def spawn(
        self,
        cmd: Sequence[str],
        log_name: str,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
    ) -> subprocess.Popen[bytes]:
        full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        self.commands.append(shlex.join(cmd))
        with open(self.logdir / log_name, "wb") as log:
            p = subprocess.Popen(
                list(cmd),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=full_env,
                cwd=cwd,
                start_new_session=True,
            )
        self.procs.append(p)
        self.mem.sids.add(p.pid)
        return p

    def teardown(self, grace: float = 10.0) -> None:
        """SIGTERM every process group, wait up to ``grace`` s, SIGKILL what is left."""
        for p in self.procs:
            if p.poll() is None:
                _killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for p in self.procs:
            _killpg(p.pid, signal.SIGKILL)
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        for q in self.mem.processes():  # anything that escaped its process group
            try:
                q.kill()
            except psutil.Error:
                pass


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (best effort: nothing holds it afterwards)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def round_stats(round_ends: list[float]) -> dict[str, Any]:
    """Per-round times from the absolute times at which each round's global model landed."""
    rounds = [b - a for a, b in zip(round_ends, round_ends[1:], strict=False)]
    return {
        "round_seconds_after_first": rounds,
        "mean_round_after_first": statistics.fmean(rounds) if rounds else None,
        "median_round_after_first": statistics.median(rounds) if rounds else None,
    }


def _result(
    name: str,
    t0: float,
    end: float | None,
    round_ends: list[float],
    final: dict[str, Any],
    peak: int,
    commands: list[str],
    **extra: Any,
) -> dict[str, Any]:
    return {
        "name": name,
        "ok": True,
        "wall_seconds": None if end is None else end - t0,
        "first_round_seconds": round_ends[0] - t0 if round_ends else None,
        **round_stats(round_ends),
        "rounds_completed": len(round_ends),
        "final_metrics": final,
        "peak_tree_rss_bytes": peak,
        "commands": commands,
        **extra,
    }


def failed(name: str, error: str, **extra: Any) -> dict[str, Any]:
    """The record of a run that could not be measured."""
    return {"name": name, "ok": False, "error": error, **extra}


def _tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


# --- the framework-free loop (worker) ------------------------------------------------------


def _framework_free_digits(rounds: int, agents: int) -> tuple[list[float], dict[str, Any]]:

    from fedstack.trainers.torch_digits import DigitsMLPTrainer, evaluate_global_mlp

    trainers = [
        DigitsMLPTrainer(index=i, num_agents=agents, **DIGITS)  # type: ignore[arg-type]
        for i in range(agents)
    ]
    weights = trainers[0].initial_weights()
    ends: list[float] = []
    metrics: dict[str, Any] = {}
    for version in range(rounds):
        weights = weighted_mean([t.fit(weights, {"version": version}) for t in trainers])
        metrics = {f"eval_{k}": v for k, v in evaluate_global_mlp(weights).items()}
        ends.append(time.time())
    return ends, metrics


def _framework_free_probe(rounds: int, agents: int) -> tuple[list[float], dict[str, Any]]:
    from fedstack.testing.probe import ProbeTrainer, evaluate_probe

    trainers = [
        ProbeTrainer(index=i, num_agents=agents, **PROBE)  # type: ignore[arg-type]
        for i in range(agents)
    ]
    w = trainers[0].initial_weights()["w"]
    acc = np.empty_like(w)
    ends: list[float] = []
    metrics: dict[str, Any] = {}
    for version in range(rounds):
        acc.fill(0.0)
        total = float(agents)
        for t in trainers:  # each agent's "training", then its weighted share of the mean
            trained, n, _ = t.fit({"w": w}, {"version": version})
            update = trained["w"]
            update *= np.float32(n / total)
            acc += update
            del update
        w, acc = acc, w
        metrics = {f"eval_{k}": v for k, v in evaluate_probe({"w": w}).items()}
        ends.append(time.time())
    return ends, metrics


def framework_free_worker(task: str, rounds: int, agents: int, out: str) -> None:
    """The framework-free loop: the same trainers' fit() in sequence, FedAvg, evaluation."""
    if task == "digits":
        ends, metrics = _framework_free_digits(rounds, agents)
    else:
        ends, metrics = _framework_free_probe(rounds, agents)
    Path(out).write_text(json.dumps({"round_ends": ends, "final_metrics": metrics}))


@dataclass
class SingleRun:
    """One run that is one process (and its children)."""

    rc: int | None  # None: killed after the timeout
    t0: float
    end: float
    peak: int
    commands: list[str]

    def failure(self, name: str, timeout: float, log: Path) -> dict[str, Any] | None:
        """The record of a run that timed out or exited non-zero; None if it succeeded."""
        if self.rc is None:
            return failed(name, f"did not finish within {timeout:.0f} s")
        if self.rc != 0:
            return failed(name, f"exited with {self.rc}: {_tail(log)}")
        return None


def weighted_mean(results: Sequence[tuple[Any, ...]]) -> dict[str, Any]:
    """Sample-weighted FedAvg of ``fit`` results ``(weights, num_samples, ...)``, in
    float64, cast back to each tensor's dtype (the framework-free loops' aggregation)."""
    total = float(sum(r[1] for r in results))
    first = results[0][0]
    return {
        k: (sum(r[0][k].astype(np.float64) * r[1] for r in results) / total).astype(first[k].dtype)
        for k in first
    }


def run_single(
    cmd: Sequence[str],
    workdir: Path,
    log_name: str,
    timeout: float,
    env: dict[str, str] | None = None,
) -> SingleRun:
    """Run ``cmd`` to its end (at most ``timeout`` s), sampling the peak memory of its tree."""
    mem = TreeMemory()
    procs = Procs(mem, workdir)
    t0 = time.time()
    rc: int | None = None
    try:
        p = procs.spawn(cmd, log_name, env=env)
        with contextlib.suppress(subprocess.TimeoutExpired):
            rc = p.wait(timeout=timeout)
        end = time.time()
    finally:
        procs.teardown()
        peak = mem.stop()
    return SingleRun(rc, t0, end, peak, procs.commands)


def run_framework_free(
    task: str, rounds: int, agents: int, workdir: Path, timeout: float
) -> dict[str, Any]:
    """The framework-free loop as a subprocess of this interpreter (fedstack's venv)."""
    name = FF
    out = workdir / f"framework-free-{task}.json"
    cmd = [
        FEDSTACK_PY,
        str(Path(__file__).resolve()),
        "framework-free",
        "--task",
        task,
        "--rounds",
        str(rounds),
        "--agents",
        str(agents),
        "--out",
        str(out),
    ]
    log = workdir / f"framework-free-{task}.log"
    r = run_single(cmd, workdir, log.name, timeout)
    if (bad := r.failure(name, timeout, log)) is not None:
        return bad
    data = json.loads(out.read_text())
    return _result(name, r.t0, r.end, data["round_ends"], data["final_metrics"], r.peak, r.commands)


# --- fedstack ------------------------------------------------------------------------------


def _trainer_args(task: str, agents: int) -> dict[str, Any]:
    return dict(DIGITS) if task == "digits" else dict(PROBE)


def run_fedstack_deployment(
    task: str, rounds: int, agents: int, workdir: Path, timeout: float
) -> dict[str, Any]:
    """``fedstack aggregator`` + ``agents`` agent processes (``fedstack agents``) over
    loopback."""
    from fedstack.store import Store

    name = FS_DEP
    trainer = DIGITS_TRAINER if task == "digits" else PROBE_TRAINER
    evaluator = DIGITS_EVALUATOR if task == "digits" else PROBE_EVALUATOR
    db = workdir / f"fedstack-{task}.db"
    ready = workdir / f"aggregator-{task}.ready"
    ready.unlink(missing_ok=True)
    mem = TreeMemory()
    procs = Procs(mem, workdir)
    fs = [FEDSTACK_PY, "-m", "fedstack"]
    t0 = time.time()
    deadline = time.monotonic() + timeout
    end: float | None = None
    round_ends: list[float] = []
    final: dict[str, Any] = {}
    store: Store | None = None
    try:
        agg = procs.spawn(
            [
                *fs,
                "aggregator",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--db",
                str(db),
                "--rounds",
                str(rounds),
                "--threshold",
                "1.0",
                "--min-agents",
                str(agents),
                "--round-timeout",
                str(int(timeout)),
                "--delivery",
                "push",
                "--evaluator",
                evaluator,
                "--run-name",
                f"bench-{task}",
                "--finish-grace",
                "10",
                "--ready-file",
                str(ready),
                "--auth",
                "off",
            ],
            f"fedstack-{task}-aggregator.log",
        )
        while not ready.exists():
            if agg.poll() is not None or time.monotonic() > deadline:
                return failed(
                    name,
                    "the aggregator did not start: "
                    + _tail(workdir / f"fedstack-{task}-aggregator.log"),
                )
            time.sleep(0.01)
        info = json.loads(ready.read_text())
        url = f"ws://127.0.0.1:{info['port']}"
        # `fedstack agents`: one process per agent (each its own Agent, connection and
        # trainer), forked from a parent that imported the trainer's module once
        targs = [
            a for k, v in _trainer_args(task, agents).items() for a in ("--trainer-arg", f"{k}={v}")
        ]
        procs.spawn(
            [
                *fs,
                "agents",
                "--url",
                url,
                "--count",
                str(agents),
                "--num-agents",
                str(agents),
                "--trainer",
                trainer,
                *targs,
            ],
            f"fedstack-{task}-agents.log",
        )
        store = Store(str(db))
        # Watch for the final evaluated round with one cheap raw query every 20 ms: the
        # machine has 2 cores and the measured processes use both; the harness must not
        # take a share of them (a full store.rounds() per poll took 5-10 % of a core).
        watch = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        last_sql = "SELECT round, metrics FROM rounds WHERE run_id = ? ORDER BY round DESC LIMIT 1"
        while end is None:
            if time.monotonic() > deadline:
                return failed(name, f"did not finish within {timeout:.0f} s")
            last = watch.execute(last_sql, (info["run_id"],)).fetchone()
            if last is not None and last[0] >= rounds and '"eval_' in (last[1] or ""):
                end = time.time()
                watch.close()
                rows = store.rounds(info["run_id"])
                round_ends = [float(r["finished"]) for r in rows]
                final = {
                    k: v
                    for k, v in rows[-1]["metrics"].items()
                    if k.startswith("eval_") or k == "num_updates"
                }
                final["num_updates"] = rows[-1]["num_updates"]
                break
            dead = [p for p in procs.procs if p.poll() not in (None, 0)]
            if dead:
                return failed(
                    name,
                    f"a process exited with {dead[0].returncode}: "
                    + _tail(workdir / f"fedstack-{task}-aggregator.log"),
                )
            time.sleep(0.02)
        # Let the federation finish by itself (agents disconnect, the aggregator exits).
        for p in procs.procs:
            try:
                p.wait(timeout=max(1.0, min(60.0, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                break
        exited = time.time()
    finally:
        if store is not None:
            store.close()
        procs.teardown()
        peak = mem.stop()
    return _result(
        name, t0, end, round_ends, final, peak, procs.commands, seconds_until_all_exited=exited - t0
    )


def run_fedstack_sim(
    task: str, rounds: int, agents: int, workdir: Path, timeout: float
) -> dict[str, Any]:
    """``fedstack sim`` (in-process transport, default backend) as one subprocess."""
    name = FS_SIM
    sim_init = REPO / "src" / "fedstack" / "sim" / "__init__.py"
    if not sim_init.exists():
        return failed(name, "not available yet (src/fedstack/sim/ does not exist)")
    trainer = DIGITS_TRAINER if task == "digits" else PROBE_TRAINER
    evaluator = DIGITS_EVALUATOR if task == "digits" else PROBE_EVALUATOR
    db = workdir / f"fedstack-sim-{task}.db"
    targs = [
        a for k, v in _trainer_args(task, agents).items() for a in ("--trainer-arg", f"{k}={v}")
    ]
    cmd = [
        FEDSTACK_PY,
        "-m",
        "fedstack",
        "sim",
        "--agents",
        str(agents),
        "--per-round",
        str(agents),
        "--rounds",
        str(rounds),
        "--trainer",
        trainer,
        *targs,
        "--evaluator",
        evaluator,
        "--strategy",
        "fedavg",
        "--db",
        str(db),
        "--transport",
        "inproc",
        "--seed",
        "0",
        "--json",
    ]  # default backend: auto
    log = workdir / f"fedstack-sim-{task}.log"
    r = run_single(cmd, workdir, log.name, timeout)
    if (bad := r.failure(name, timeout, log)) is not None:
        return bad
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.startswith("{")]
    try:
        res = json.loads(lines[-1])
    except (IndexError, ValueError):
        return failed(name, f"no JSON result line: {_tail(log)}")
    # Per-round times from the store (when each global model was committed), so they are
    # measured like the deployment's; fall back to the simulator's own round_seconds.
    round_ends: list[float] = []
    try:
        from fedstack.store import Store

        store = Store(str(db))
        try:
            round_ends = [float(r["finished"]) for r in store.rounds(res["run_id"])]
        finally:
            store.close()
    except Exception:  # noqa: BLE001 - informational fallback only
        round_ends = []
    final = {
        k: v
        for k, v in (res.get("final_metrics") or {}).items()
        if k.startswith("eval_") or k == "num_updates"
    }
    out = _result(
        name,
        r.t0,
        r.end,
        round_ends,
        final,
        r.peak,
        r.commands,
        simulator_wall_seconds=res.get("wall_seconds"),
        simulator_round_seconds=res.get("round_seconds"),
    )
    if not round_ends and res.get("round_seconds"):
        rs = list(res["round_seconds"])[1:]
        out.update(
            round_seconds_after_first=rs,
            mean_round_after_first=statistics.fmean(rs),
            median_round_after_first=statistics.median(rs),
            rounds_completed=len(rs) + 1,
        )
    return out


# --- Flower --------------------------------------------------------------------------------


def _flower_config(task: str, rounds: int, agents: int, out: Path) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "task": task,
        "num-rounds": rounds,
        "num-agents": agents,
        "out": str(out),
    }
    if task == "digits":
        cfg.update(
            {
                "partition": DIGITS["partition"],
                "seed": DIGITS["seed"],
                "epochs": DIGITS["epochs"],
                "lr": DIGITS["lr"],
                "batch-size": DIGITS["batch_size"],
            }
        )
    else:
        cfg.update({"probe-params": PROBE["params"], "probe-delta": PROBE["delta"]})
    return cfg


def _read_flower_events(out: Path, rounds: int) -> tuple[list[float], dict[str, Any], bool]:
    ends: dict[int, float] = {}
    final: dict[str, Any] = {}
    done = False
    if out.exists():
        for line in out.read_text().splitlines():
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if ev.get("event") == "round" and ev["round"] >= 1:
                ends[int(ev["round"])] = float(ev["t"])
                if ev["round"] == rounds:
                    final = {f"eval_{k}": v for k, v in ev["metrics"].items()}
            if ev.get("event") == "serverapp-end":
                done = True
    return [ends[r] for r in sorted(ends)], final, done and len(ends) >= rounds


def _flower_env(workdir: Path, venv_bin: Path) -> dict[str, str]:
    home = workdir / "flwr-home"
    home.mkdir(parents=True, exist_ok=True)
    return {
        **FLOWER_ENV,
        "FLWR_HOME": str(home),
        "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}",
    }


def run_flower_sim(
    task: str, rounds: int, agents: int, workdir: Path, timeout: float, flower_python: Path
) -> dict[str, Any]:
    """Flower's simulation engine: ``flwr.simulation.run_simulation`` (Ray backend)."""
    name = FL_SIM
    out = workdir / f"flower-sim-{task}.jsonl"
    out.unlink(missing_ok=True)
    env = _flower_env(workdir, flower_python.parent)
    env["FSBENCH_FLOWER_CONFIG"] = json.dumps(_flower_config(task, rounds, agents, out))
    cmd = [str(flower_python), str(FLOWER_SIM_DRIVER), "--num-supernodes", str(agents)]
    log = workdir / f"flower-sim-{task}.log"
    r = run_single(cmd, workdir, log.name, timeout, env=env)
    if r.rc is None:
        return failed(name, f"did not finish within {timeout:.0f} s")
    round_ends, final, done = _read_flower_events(out, rounds)
    if r.rc != 0 or not done:
        return failed(name, f"exited with {r.rc} after {len(round_ends)} round(s): {_tail(log)}")
    return _result(
        name,
        r.t0,
        round_ends[-1],
        round_ends,
        final,
        r.peak,
        r.commands,
        seconds_until_exit=r.end - r.t0,
        env={k: v for k, v in env.items() if k != "PATH"},
    )


def run_flower_deployment(
    task: str, rounds: int, agents: int, workdir: Path, timeout: float, flower_python: Path
) -> dict[str, Any]:
    """Flower's deployment engine: SuperLink + ``agents`` SuperNodes + ``flwr run``.

    All Flower defaults (subprocess isolation, in-memory state, default runtime dependency
    installation) except what the task fixes; insecure, on 127.0.0.1 with free ports.
    """
    name = FL_DEP
    vbin = flower_python.parent
    out = workdir / f"flower-deploy-{task}.jsonl"
    out.unlink(missing_ok=True)
    env = _flower_env(workdir, vbin)
    port = free_port()
    (Path(env["FLWR_HOME"]) / "config.toml").write_text(
        f'[superlink]\ndefault = "bench"\n\n[superlink.bench]\n'
        f'address = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    cfg = _flower_config(task, rounds, agents, out)
    run_config = " ".join(f"{k}={json.dumps(v)}" for k, v in cfg.items())
    mem = TreeMemory()
    procs = Procs(mem, workdir)
    t0 = time.time()
    deadline = time.monotonic() + timeout
    end: float | None = None
    round_ends: list[float] = []
    final: dict[str, Any] = {}
    try:
        link = procs.spawn(
            [
                str(vbin / "flower-superlink"),
                "--insecure",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            f"flower-{task}-superlink.log",
            env=env,
        )
        _wait_port(port, link, deadline)
        for i in range(agents):
            procs.spawn(
                [
                    str(vbin / "flower-supernode"),
                    "--insecure",
                    "--superlink",
                    f"127.0.0.1:{port}",
                    "--port",
                    str(free_port()),
                    "--node-config",
                    f"partition-id={i} num-partitions={agents}",
                ],
                f"flower-{task}-supernode-{i}.log",
                env=env,
            )
        run = procs.spawn(
            [
                str(vbin / "flwr"),
                "run",
                str(FLOWER_APP),
                "bench",
                "--stream",
                "--run-config",
                run_config,
            ],
            f"flower-{task}-flwr-run.log",
            env=env,
            cwd=str(workdir),
        )
        while True:
            round_ends, final, done = _read_flower_events(out, rounds)
            if done:
                end = round_ends[-1]
                break
            if time.monotonic() > deadline:
                return failed(
                    name,
                    f"did not finish within {timeout:.0f} s ({len(round_ends)} round(s) done)",
                    commands=procs.commands,
                )
            if run.poll() is not None:
                time.sleep(1.0)  # the last lines may still be on their way
                round_ends, final, done = _read_flower_events(out, rounds)
                if done:
                    end = round_ends[-1]
                    break
                return failed(
                    name,
                    f"`flwr run` exited with {run.returncode} after "
                    f"{len(round_ends)} round(s): "
                    + _tail(workdir / f"flower-{task}-flwr-run.log")
                    + _tail(workdir / f"flower-{task}-superlink.log"),
                    commands=procs.commands,
                )
            time.sleep(0.1)
        try:
            run.wait(timeout=max(1.0, min(60.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            pass
        run_exited = time.time()
    finally:
        procs.teardown()
        peak = mem.stop()
    return _result(
        name,
        t0,
        end,
        round_ends,
        final,
        peak,
        procs.commands,
        flwr_run_exited_seconds=run_exited - t0,
        env={k: v for k, v in env.items() if k != "PATH"},
    )


def _wait_port(port: int, proc: subprocess.Popen[bytes], deadline: float) -> None:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


def guarded(fn: Any, name: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Run one measurement; an exception becomes a failed record instead of a crash."""
    try:
        result: dict[str, Any] = fn(*args, **kwargs)
        return result
    except Exception as e:  # noqa: BLE001 - reported in the table and the JSON
        return failed(name, f"{type(e).__name__}: {e}")


def run_plan(
    plan: list[tuple[str, Any, tuple[Any, ...]]],
    task: str,
    rounds: int,
    agents: int,
    workdir: Path,
    timeout: float,
    after_each: Any = None,
    repeats: int = 1,
    once: tuple[str, ...] = (),
) -> dict[str, dict[str, Any]]:
    """Run each ``(name, runner, extra args)`` of ``plan`` (guarded), printing progress;
    ``after_each()`` runs after every run.

    With ``repeats`` > 1 the whole plan runs that many times, interleaved (run 1 of every
    entry, then run 2 of every entry, ...: a noisy minute hits all of them alike), each
    repetition in its own subfolder; entries named in ``once`` run only the first time.
    Each entry's record then holds the median of every time over its runs, their range
    (``<key>_range``) and the runs themselves (``repeats``) — see :func:`combine_runs`.
    """
    results: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in plan}
    for rep in range(repeats):
        where = workdir if repeats == 1 else workdir / f"run{rep + 1}"
        where.mkdir(parents=True, exist_ok=True)
        for name, fn, extra in plan:
            if rep > 0 and name in once:
                continue
            tag = "" if repeats == 1 else f" (run {rep + 1}/{1 if name in once else repeats})"
            print(f"  running {name}{tag} ...", flush=True)
            r = guarded(fn, name, task, rounds, agents, where, timeout, *extra)
            results[name].append(r)
            print(
                f"    {'ok' if r.get('ok') else 'FAILED: ' + r.get('error', '')[:500]}"
                + (f", wall {r['wall_seconds']:.2f} s" if r.get("ok") else "")
                + (
                    f", {r['mean_round_after_first']:.4f} s per round after the first"
                    if r.get("ok") and r.get("mean_round_after_first")
                    else ""
                ),
                flush=True,
            )
            if after_each is not None:
                after_each()
    return {name: combine_runs(rs) for name, rs in results.items()}


_TIMES = (
    "wall_seconds",
    "first_round_seconds",
    "mean_round_after_first",
    "median_round_after_first",
)


def combine_runs(rs: list[dict[str, Any]]) -> dict[str, Any]:
    """One record for several runs of the same entry: the medians of the times, their
    ranges, the highest peak memory, every run's times (``repeats``); a failed run is
    counted (``failed_runs``), and if every run failed the first failure is returned."""
    ok = [r for r in rs if r.get("ok")]
    if len(rs) == 1 or not ok:
        return rs[0]
    out = dict(ok[0])  # final metrics and commands: the same computation every run
    for key in _TIMES:
        vals = [float(r[key]) for r in ok if r.get(key) is not None]
        if vals:
            out[key] = statistics.median(vals)
            out[f"{key}_range"] = [min(vals), max(vals)]
    out["peak_tree_rss_bytes"] = max(int(r["peak_tree_rss_bytes"]) for r in ok)
    out["runs"] = len(ok)
    out["failed_runs"] = len(rs) - len(ok)
    out["repeats"] = [
        {k: r.get(k) for k in (*_TIMES, "peak_tree_rss_bytes", "round_seconds_after_first")}
        for r in ok
    ]
    return out


def save_result(
    result: dict[str, Any],
    *,
    flower: Any,
    runs: Any,
    checks: Any,
    t_start: float,
    out: Path,
    workdir: Path,
    keep: bool,
) -> None:
    """Complete a benchmark's JSON (time, machine, runs, acceptance), write it to ``out``
    and remove the work folder unless ``keep``."""
    import platform
    import shutil

    result.update(
        {
            "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine": {
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "platform": platform.platform(),
            },
            "flower": flower,
            "runs": runs,
            "acceptance": checks,
            "total_seconds": time.monotonic() - t_start,
            "workdir": str(workdir) if keep else None,
        }
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    print(f"\nwrote {out}")
    if not keep:
        shutil.rmtree(workdir, ignore_errors=True)


def new_workdir(prefix: str) -> Path:
    """A fresh work folder for logs, stores and timestamp files."""
    return Path(tempfile.mkdtemp(prefix=prefix))


def main() -> int:
    ap = argparse.ArgumentParser(description="worker entry points of the Flower benchmarks")
    sub = ap.add_subparsers(dest="cmd", required=True)
    ff = sub.add_parser("framework-free")
    ff.add_argument("--task", choices=["digits", "probe"], required=True)
    ff.add_argument("--rounds", type=int, required=True)
    ff.add_argument("--agents", type=int, required=True)
    ff.add_argument("--out", required=True)
    args = ap.parse_args()
    framework_free_worker(args.task, args.rounds, args.agents, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
