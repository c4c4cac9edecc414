"""Secure aggregation's per-round cost: fedstack's SecAgg+ against plain FedAvg and against
Flower's SecAgg+ workflow, on the same task in the same run (issue 14).

The task (``bench/secagg_task.py``, the same module on both sides): every agent's
"training" returns the global model plus a fixed synthetic update of ``P`` float32
parameters (uniform in [-0.01, 0.01], seeded by the agent's index) and ``100 + index``
samples, instantly. Training costs nothing, so a round's wall time is the aggregation's
cost: the SecAgg+ protocol's four phases (or plain FedAvg's upload and mean).

For every configuration ``(N agents, P parameters, dropped)`` three runs, one after the
other, each in its own process with a timeout, each 3 rounds of which rounds 2-3 are
measured (round 1 carries the start-up: imports, Ray, connections):

1. **fedstack plain FedAvg** (the baseline): ``fedstack.sim.simulate`` — the real
   aggregator and real agents in one process over the in-process transport (every
   message encoded, decoded and validated), the inline backend, weighted FedAvg, SQLite
   store. With ``dropped`` = d > 0 the baseline is plain FedAvg over the N − d agents that
   upload (a dropped agent costs plain FedAvg nothing but the wait for it, which is a
   timeout setting, not a cost).
2. **fedstack SecAgg+**: either *engine* — the real aggregator with secure aggregation
   and real agents (see ``fedstack_secagg_mode``), d agents dropping after the key
   sharing (before their masked input) — or, when the engine is not available, *library*
   — ``fedstack.privacy.secagg``'s ``AgentSession`` x N and ``ServerSession`` driven
   through the four phases in one process (every agent's work and the server's, one
   after the other: the protocol's whole CPU cost, without messaging). The table says
   which.
3. **Flower SecAgg+**: flwr 1.42's ``SecAggPlusWorkflow`` inside ``DefaultWorkflow`` in a
   ServerApp (legacy FedAvg, every node every round, no federated evaluation) with
   ``secaggplus_mod`` on the ClientApp, on Flower's simulation engine
   (``run_simulation``, Ray, Flower's default resources unless ``--flower-client-cpus``)
   in Flower's own pinned venv (``bench/.flower-venv``, built by ``bench/flower_env.py``);
   ``bench/flower_apps/secagg``. The same settings as fedstack's: num_shares = fedstack's
   k + 1 share holders, reconstruction_threshold = fedstack's t, clipping_range 8,
   quantization_range 2**22, modulus_range 2**32, max_weight 1000. Dropping nodes (the
   last d partition ids) raise in the ``collect_masked_vectors`` stage (a mod outside
   ``secaggplus_mod``), i.e. after sharing their keys: Flower's engine answers with an
   error message at once, and the workflow rebuilds their pairwise masks. Per-round time:
   between the central ``evaluate_fn`` calls that follow each round.

Every run's final model is checked against the exact weighted FedAvg of the surviving
agents' updates (``max_abs_error`` in the JSON; SecAgg+ is exact up to quantisation).

Run::

    .venv/bin/python bench/secagg_cost.py --quick     # N = 10, 50; P = 1e5; 0 and 10 % dropped
    .venv/bin/python bench/secagg_cost.py             # N = 10, 50, 100; P = 1e5, 1e6; 0, 10 %

Prints one table (N, P, dropped, fedstack plain s/round, fedstack SecAgg+ s/round, Flower
SecAgg+ s/round, Flower/fedstack), writes ``bench/results/secagg_cost.json`` and
``bench/plots/secagg_cost.png``. The machine has 2 cores and other work may run on it:
the figures are wall times on a shared machine (see bench/README.md).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import fedbench_common as fc  # noqa: E402

REPO = BENCH.parent
RESULTS = BENCH / "results"
PLOTS = BENCH / "plots"
FLOWER_DRIVER = BENCH / "flower_apps" / "run_flower_secagg.py"
FLOWER_APP_DIR = BENCH / "flower_apps" / "secagg"

TRAINER = "secagg_task:SyntheticUpdateTrainer"
EVALUATOR = "secagg_task:evaluate_mean"
ROUNDS = 3
SEED = 0
CLIP = 8.0
QUANT_BITS = 22
MAX_WEIGHT = 1000.0
DROP_STAGE = "collect_masked_vectors"

PLAIN = "fedstack plain FedAvg"
SECAGG = "fedstack SecAgg+"
FLOWER = "Flower SecAgg+"
FLOWER_PLAIN = "Flower plain FedAvg"


# --- the protocol's parameters, identical on both sides -------------------------------------


def graph_settings(n: int) -> dict[str, int]:
    """fedstack's SecAgg+ graph for ``n`` agents with the default parameters: degree k,
    ``k + 1`` share holders per agent (Flower's ``num_shares``), threshold t (Flower's
    ``reconstruction_threshold``). Taken from ``fedstack.privacy.secagg.SecAggParams`` when
    it is installed; else the design's formulas (k = smallest even >= 2 ceil(log2 n),
    capped at n - 1; t = floor((k + 1) / 2) + 1)."""
    try:
        from fedstack.privacy.secagg import SecAggParams

        p = SecAggParams(clip=CLIP, quant_bits=QUANT_BITS, max_weight=MAX_WEIGHT)
        k, t = p.degree(n), p.holders_threshold(n)
    except ImportError:
        k = 2 * math.ceil(math.log2(max(n, 2)))
        k = min(k + (k % 2), n - 1)
        t = min(k + 1, (k + 1) // 2 + 1)
    return {"k": k, "num_shares": k + 1, "threshold": t}


def dropped_count(n: int, fraction: float) -> int:
    """Agents dropping out of every round for a drop fraction."""
    return int(round(n * fraction))


# --- workers (run in their own process: `secagg_cost.py worker ...`) ------------------------


def _max_abs_error(final: Any, survivors: list[int], params: int, rounds: int) -> float:
    import numpy as np
    import secagg_task

    expected = rounds * secagg_task.expected_mean_update(survivors, params, SEED)
    return float(np.abs(np.asarray(final, dtype=np.float64) - expected).max())


def worker_plain(agents: int, params: int, rounds: int, db: str) -> dict[str, Any]:
    """Plain weighted FedAvg through fedstack's simulator (real aggregator and agents)."""
    from fedstack.buffers import keep_freed_memory
    from fedstack.sim import simulate

    keep_freed_memory()
    cpu: list[float] = []
    res = simulate(
        TRAINER,
        {"params": params, "seed": SEED},
        num_agents=agents,
        rounds=rounds,
        strategy="fedavg",
        evaluator=EVALUATOR,
        db=db,
        transport="inproc",
        backend="inline",
        seed=SEED,
        round_timeout=3600.0,
        progress=lambda *_: cpu.append(time.process_time()),
    )
    ends = [float(r["finished"]) for r in res.history]
    return {
        "round_ends": ends,
        "round_cpu": cpu,
        "simulator_round_seconds": res.round_seconds,
        "max_abs_error": _max_abs_error(
            res.final_weights["w"], list(range(agents)), params, rounds
        ),
        "how": "fedstack.sim.simulate (inproc transport, inline backend, fedavg)",
    }


def worker_secagg_library(agents: int, params: int, dropped: int, rounds: int) -> dict[str, Any]:
    """fedstack's SecAgg+ library: N AgentSessions and a ServerSession in one process,
    each round a new session through the four phases; the last ``dropped`` agents stop
    after sharing their keys (they never send a masked input)."""
    import secagg_task

    from fedstack.privacy.secagg import (
        AgentSession,
        SecAggParams,
        ServerSession,
        apply_update,
        flatten_update,
    )

    sp = SecAggParams(clip=CLIP, quant_bits=QUANT_BITS, max_weight=MAX_WEIGHT)
    trainers = [
        secagg_task.SyntheticUpdateTrainer(params=params, seed=SEED, index=i, num_agents=agents)
        for i in range(agents)
    ]
    names = [f"agent-{i:03d}" for i in range(agents)]
    drops = set(range(agents - dropped, agents))
    weights = trainers[0].initial_weights()
    ends: list[float] = []
    cpu: list[float] = []
    phases: list[dict[str, float]] = []
    for rnd in range(1, rounds + 1):
        session = f"bench:{rnd}:0"
        t = [time.perf_counter()]
        # agents train (instant) and flatten their update, as the engine's agents do
        updates = []
        for tr in trainers:
            new, n, _ = tr.fit(weights, {})
            updates.append((flatten_update(new, weights), float(n)))
        server = ServerSession(sp, session, vector_length=params + 1)
        sessions = {nm: AgentSession(sp, session, nm) for nm in names}
        for nm, a in sessions.items():
            server.add_keys(nm, a.advertise())
        rosters = server.close_keys()
        t.append(time.perf_counter())
        for nm, roster in rosters.items():
            server.add_shares(nm, sessions[nm].share_keys(roster))
        forwarded = server.close_shares()
        t.append(time.perf_counter())
        for i, nm in enumerate(names):
            if nm not in forwarded and nm not in rosters:
                continue
            sessions[nm].receive_shares(forwarded.get(nm, {}))
            if i in drops:
                continue
            vec, w = updates[i]
            server.add_masked(nm, sessions[nm].mask(vec, w))
        survivors, gone = server.close_masked()
        t.append(time.perf_counter())
        for nm in survivors:
            b, sk = sessions[nm].unmask(survivors, gone)
            server.add_unmask(nm, b, sk)
        total, weight, _ = server.finish()
        weights = apply_update(weights, total, weight)
        t.append(time.perf_counter())
        ends.append(time.time())
        cpu.append(time.process_time())
        phases.append(
            {
                "keys": t[1] - t[0],
                "shares": t[2] - t[1],
                "masked": t[3] - t[2],
                "unmask": t[4] - t[3],
            }
        )
        del server, sessions, updates
    survivors_idx = [i for i in range(agents) if i not in drops]
    return {
        "round_ends": ends,
        "round_cpu": cpu,
        "phase_seconds": phases,
        "max_abs_error": _max_abs_error(weights["w"], survivors_idx, params, rounds),
        # the library's stated bound on Σ w_i x_i, divided by W = Σ w_i: on the mean's
        # coordinates, per round; the final model carries `rounds` of them
        "error_bound": rounds
        * sp.error_bound(agents - dropped)
        / sum(min(secagg_task.num_samples(i), MAX_WEIGHT) / MAX_WEIGHT for i in survivors_idx),
        "how": "fedstack.privacy.secagg library, N AgentSessions + ServerSession, one process",
    }


def worker_secagg_engine(
    agents: int, params: int, dropped: int, rounds: int, db: str, phase_timeout: float = 60.0
) -> dict[str, Any]:
    """fedstack's SecAgg+ through the real aggregator and agents: fedstack's simulator
    (``fedstack.sim``: in-process transport, inline backend, agents connected for the whole
    run) with the aggregator's ``secagg`` settings on. The last ``dropped`` agents leave in
    every round when their neighbours' shares arrive (after sharing their own keys, before
    their masked input: the costly drop), and reconnect at once as new agents, which train
    on the next global model and take part in the next round (and drop again)."""
    import asyncio

    import secagg_task

    from fedstack.agent.client import Agent
    from fedstack.buffers import keep_freed_memory
    from fedstack.errors import FederationFinished, FedstackError
    from fedstack.sim import engine as sim_engine
    from fedstack.sim.backends import create_backend
    from fedstack.wire import Message, SecAggForward

    dropping = set(range(agents - dropped, agents))

    class SecAggSimulation(sim_engine._Simulation):  # the simulator, secure aggregation on
        def __init__(self, **kw: Any) -> None:
            super().__init__(**kw)
            self.config = self.config.replace(
                secagg=True,
                secagg_clip=CLIP,
                secagg_quant_bits=QUANT_BITS,
                secagg_max_weight=MAX_WEIGHT,
                secagg_timeout=phase_timeout,
            )
            self.drops = 0

        async def _persistent_agent(self, idx: int, initial: bool) -> None:
            if idx not in dropping:
                await super()._persistent_agent(idx, initial)
                return
            generation = 0
            while self.failure is None:
                name = f"sim-{idx:0{self.width}d}" + (f"-r{generation}" if generation else "")
                agent = Agent(self.url, name=name, max_backoff=1.0, connect_timeout=30.0)
                if initial and generation == 0:
                    assert self.initial is not None
                    agent.send_initial_model(self.initial)
                gone = asyncio.Event()
                loop = asyncio.get_running_loop()
                try:
                    await agent.start_async(timeout=self.round_timeout)
                    core = agent._core
                    sa = core.secagg
                    if sa is None:
                        raise sim_engine.SimError("the aggregator did not turn secagg on")
                    inner = sa.on_message

                    def on_message(
                        msg: Message,
                        agent_id: str | None,
                        core: Any = core,
                        inner: Any = inner,
                        gone: asyncio.Event = gone,
                        loop: asyncio.AbstractEventLoop = loop,
                    ) -> list[Message]:
                        if isinstance(msg, SecAggForward):  # leave: no masked input
                            core.close()
                            loop.call_soon_threadsafe(gone.set)
                            return []
                        out: list[Message] = inner(msg, agent_id)
                        return out

                    sa.on_message = on_message
                    while not gone.is_set():
                        waiter = asyncio.ensure_future(
                            agent.wait_for_global_model_async(timeout=self.round_timeout)
                        )
                        left = asyncio.ensure_future(gone.wait())
                        await asyncio.wait([waiter, left], return_when=asyncio.FIRST_COMPLETED)
                        left.cancel()
                        if not waiter.done():
                            waiter.cancel()
                            break
                        try:
                            gm = waiter.result()
                        except FederationFinished:
                            return
                        if agent.finished:
                            return
                        await self._train(agent, idx, gm)
                        del gm
                except (TimeoutError, FedstackError, OSError):
                    if not gone.is_set():
                        raise
                finally:
                    await agent.close_async()
                self.drops += 1
                generation += 1

    keep_freed_memory()
    cpu: list[float] = []
    t0 = time.perf_counter()
    be = create_backend("inline", None, trainer=TRAINER)
    try:
        sim = SecAggSimulation(
            trainer=TRAINER,
            trainer_args={"params": params, "seed": SEED},
            num_agents=agents,
            per_round=agents,
            rounds=rounds,
            strategy="fedavg",
            strategy_params={},
            federation={},
            evaluator=EVALUATOR,
            db=db,
            run_name=f"secagg-bench-{os.getpid()}",
            transport="inproc",
            backend=be,
            seed=SEED,
            delivery="push",
            durable=False,
            round_timeout=3600.0,
            persistent=True,
            progress=lambda *_: cpu.append(time.process_time()),
            t0=t0,
        )
        res = sim_engine._run(sim.run())
    finally:
        be.close()
    ends = [float(r["finished"]) for r in res.history]
    metrics = [
        {k: v for k, v in (r.get("metrics") or {}).items() if k.startswith("secagg")}
        for r in res.history
    ]
    survivors = [i for i in range(agents) if i not in dropping]
    from fedstack.privacy.secagg import SecAggParams

    sp = SecAggParams(clip=CLIP, quant_bits=QUANT_BITS, max_weight=MAX_WEIGHT)
    return {
        "round_ends": ends,
        "round_cpu": cpu,
        "simulator_round_seconds": res.round_seconds,
        "round_metrics": metrics,
        "drops": sim.drops,
        "max_abs_error": _max_abs_error(res.final_weights["w"], survivors, params, rounds),
        "error_bound": rounds
        * sp.error_bound(agents - dropped)
        / sum(min(secagg_task.num_samples(i), MAX_WEIGHT) / MAX_WEIGHT for i in survivors),
        "how": "fedstack.sim's simulator with the aggregator's secagg on (inproc transport, "
        "inline backend, real Aggregator and Agents)",
    }


# --- runners (in the benchmark's process) ----------------------------------------------------


def _per_round(round_ends: list[float]) -> dict[str, Any]:
    """Rounds 2..R from the absolute end times of rounds 1..R."""
    rounds = [b - a for a, b in zip(round_ends, round_ends[1:], strict=False)]
    return {
        "round_seconds": rounds,
        "seconds_per_round": statistics.fmean(rounds) if rounds else None,
    }


def _run_worker(
    name: str, args: list[str], workdir: Path, tag: str, timeout: float
) -> dict[str, Any]:
    out = workdir / f"{tag}.json"
    out.unlink(missing_ok=True)
    cmd = [fc.FEDSTACK_PY, str(Path(__file__).resolve()), "worker", *args, "--out", str(out)]
    log = workdir / f"{tag}.log"
    r = fc.run_single(cmd, workdir, log.name, timeout)
    if (bad := r.failure(name, timeout, log)) is not None:
        return bad
    data: dict[str, Any] = json.loads(out.read_text())
    cpu = data.get("round_cpu") or []
    cpu_rounds = [b - a for a, b in zip(cpu, cpu[1:], strict=False)]
    return {
        "name": name,
        "ok": True,
        **data,
        **_per_round(data["round_ends"]),
        "cpu_seconds_per_round": statistics.fmean(cpu_rounds) if cpu_rounds else None,
        "wall_seconds": r.end - r.t0,
        "peak_tree_rss_bytes": r.peak,
        "commands": r.commands,
    }


def run_plain(n: int, p: int, d: int, workdir: Path, timeout: float) -> dict[str, Any]:
    tag = f"plain-{n}-{p}-{d}"
    db = workdir / f"{tag}.db"
    args = ["plain", "--agents", str(n - d), "--params", str(p), "--rounds", str(ROUNDS)]
    res = _run_worker(PLAIN, [*args, "--db", str(db)], workdir, tag, timeout)
    res["agents_uploading"] = n - d
    return res


def fedstack_secagg_mode() -> str:
    """``engine`` when fedstack's aggregator can run secure aggregation in the simulator,
    ``library`` when only the library is there, ``none`` otherwise."""
    try:
        import fedstack.privacy.secagg  # noqa: F401
    except ImportError:
        return "none"

    from fedstack.aggregator.config import AggregatorConfig

    fields = getattr(AggregatorConfig, "__dataclass_fields__", {})
    return "engine" if "secagg" in fields else "library"


def run_secagg(n: int, p: int, d: int, workdir: Path, timeout: float, mode: str) -> dict[str, Any]:
    if mode == "none":
        return fc.failed(SECAGG, "fedstack.privacy.secagg is not available on this branch")
    tag = f"secagg-{mode}-{n}-{p}-{d}"
    args = [
        f"secagg-{mode}",
        "--agents",
        str(n),
        "--params",
        str(p),
        "--dropped",
        str(d),
        "--rounds",
        str(ROUNDS),
    ]
    if mode == "engine":
        args += ["--db", str(workdir / f"{tag}.db")]
    res = _run_worker(SECAGG, args, workdir, tag, timeout)
    res["mode"] = mode
    return res


def run_flower(
    n: int,
    p: int,
    d: int,
    workdir: Path,
    timeout: float,
    flower_python: Path,
    client_cpus: float | None,
    secagg: bool = True,
) -> dict[str, Any]:
    """Flower's SecAgg+ workflow (or, ``secagg=False``, Flower's plain FedAvg over the
    ``n - d`` nodes that upload) on Flower's simulation engine."""
    import numpy as np

    name = FLOWER if secagg else FLOWER_PLAIN
    if not secagg:
        n, d = n - d, 0
    g = graph_settings(n)
    tag = f"flower-{'secagg' if secagg else 'plain'}-{n}-{p}-{d}"
    events = workdir / f"{tag}.jsonl"
    final = workdir / f"{tag}-final.npy"
    events.unlink(missing_ok=True)
    final.unlink(missing_ok=True)
    cfg = {
        "secagg": secagg,
        "num-agents": n,
        "num-rounds": ROUNDS,
        "params": p,
        "seed": SEED,
        "dropped": d,
        "drop-stage": DROP_STAGE,
        "num-shares": g["num_shares"],
        "threshold": g["threshold"],
        "clipping-range": CLIP,
        "quantization-range": 2**QUANT_BITS,
        "modulus-range": 2**32,
        "max-weight": MAX_WEIGHT,
        "out": str(events),
        "final": str(final),
    }
    home = workdir / "flwr-home"
    home.mkdir(parents=True, exist_ok=True)
    env = {
        **fc.FLOWER_ENV,
        "FLWR_HOME": str(home),
        "PATH": f"{flower_python.parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": f"{BENCH}{os.pathsep}{FLOWER_APP_DIR}",
        "FSSECAGG_FLOWER_CONFIG": json.dumps(cfg),
    }
    cmd = [str(flower_python), str(FLOWER_DRIVER), "--num-supernodes", str(n)]
    if client_cpus is not None:
        cmd += ["--client-cpus", str(client_cpus)]
    log = workdir / f"{tag}.log"
    r = fc.run_single(cmd, workdir, log.name, timeout, env=env)
    ends: dict[int, float] = {}
    done = False
    if events.exists():
        for line in events.read_text().splitlines():
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if ev.get("event") == "round" and int(ev["round"]) >= 1:
                ends[int(ev["round"])] = float(ev["t"])
            done = done or ev.get("event") == "serverapp-end"
    if r.rc is None:
        return fc.failed(name, f"did not finish within {timeout:.0f} s ({len(ends)} rounds)")
    if r.rc != 0 or not done or len(ends) < ROUNDS:
        return fc.failed(
            name, f"exited with {r.rc} after {len(ends)} round(s): {fc._tail(log, 1500)}"
        )
    round_ends = [ends[i] for i in sorted(ends)]
    out: dict[str, Any] = {
        "name": name,
        "ok": True,
        "round_ends": round_ends,
        **_per_round(round_ends),
        "wall_seconds": r.end - r.t0,
        "peak_tree_rss_bytes": r.peak,
        "commands": r.commands,
        "settings": {k: v for k, v in cfg.items() if k not in ("out", "final")},
        "client_cpus": client_cpus,
    }
    if final.exists():
        out["max_abs_error"] = _max_abs_error(np.load(final), list(range(n - d)), p, ROUNDS)
    return out


# --- table, plot, main -----------------------------------------------------------------------


def _fmt(v: float | None, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _spr(r: dict[str, Any]) -> float | None:
    return r.get("seconds_per_round") if r.get("ok") else None


def print_table(rows: list[dict[str, Any]]) -> None:
    flower_plain = any(FLOWER_PLAIN in r["runs"] for r in rows)
    head = (
        f"{'N':>4} {'P':>7} {'dropped':>8} {'k+1/t':>6} {'plain s/rnd':>12} "
        f"{'SecAgg+ s/rnd':>14} {'(how)':>8} {'Flower SecAgg+ s/rnd':>21} "
        f"{'Flower/fedstack':>16}" + (f" {'Flower plain s/rnd':>19}" if flower_plain else "")
    )
    print(head)
    print("-" * len(head))
    for row in rows:
        plain, sec, fl = row["runs"][PLAIN], row["runs"][SECAGG], row["runs"][FLOWER]
        ratio = row.get("ratio_flower_over_fedstack")
        line = (
            f"{row['agents']:>4} {row['params']:>7.0e} "
            f"{str(row['dropped']) + '/' + str(row['agents']):>8} "
            f"{str(row['num_shares']) + '/' + str(row['threshold']):>6} "
            f"{_fmt(_spr(plain)):>12} {_fmt(_spr(sec)):>14} "
            f"{(sec.get('mode') or '-') if sec.get('ok') else 'FAILED':>8} "
            f"{_fmt(_spr(fl)):>21} {_fmt(ratio, 2):>16}"
        )
        if flower_plain:
            line += f" {_fmt(_spr(row['runs'].get(FLOWER_PLAIN, {}))):>19}"
        print(line)
    for row in rows:
        for name, r in row["runs"].items():
            if not r.get("ok"):
                print(
                    f"  N={row['agents']} P={row['params']:.0e} d={row['dropped']} "
                    f"{name}: {r.get('error', 'failed')[:300]}"
                )


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[plot]'): no plot")
        return
    sizes = sorted({r["params"] for r in rows})
    fig, axes = plt.subplots(1, len(sizes), figsize=(6 * len(sizes), 4.5), squeeze=False)
    styles = {
        PLAIN: ("tab:gray", "o"),
        SECAGG: ("tab:blue", "s"),
        FLOWER: ("tab:orange", "^"),
        FLOWER_PLAIN: ("tab:brown", "v"),
    }
    for ax, p in zip(axes[0], sizes, strict=True):
        for drop_frac, ls in ((False, "-"), (True, "--")):
            sel = sorted(
                (r for r in rows if r["params"] == p and (r["dropped"] > 0) == drop_frac),
                key=lambda r: r["agents"],
            )
            if not sel:
                continue
            for name, (color, marker) in styles.items():
                pts = [(r["agents"], _spr(r["runs"].get(name, {}))) for r in sel]
                pts = [(x, y) for x, y in pts if y is not None]
                if not pts:
                    continue
                modes = {r["runs"][name].get("mode") for r in sel} - {None}
                label = name + (f" ({'/'.join(sorted(modes))})" if modes else "")
                label += " (10% dropped)" if drop_frac else ""
                ax.plot(*zip(*pts, strict=True), ls=ls, color=color, marker=marker, label=label)
        ax.set_yscale("log")
        ax.set_xlabel("agents N")
        ax.set_ylabel("seconds per round (rounds 2-3)")
        ax.set_title(f"P = {p:.0e} float32 parameters")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("SecAgg+ per-round cost: fedstack vs Flower 1.42 (2 shared cores)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def plan(
    mode: str, flower_python: Path | None, args: argparse.Namespace
) -> list[tuple[str, Any, tuple[Any, ...]]]:
    """The runs of one configuration: (name, runner, extra arguments)."""
    out: list[tuple[str, Any, tuple[Any, ...]]] = [
        (PLAIN, run_plain, ()),
        (SECAGG, run_secagg, (mode,)),
    ]
    if flower_python is not None:
        out.append((FLOWER, run_flower, (flower_python, args.flower_client_cpus)))
        if args.flower_plain:
            out.append((FLOWER_PLAIN, run_flower, (flower_python, args.flower_client_cpus, False)))
    return out


def combine(rs: list[dict[str, Any]]) -> dict[str, Any]:
    """One record for the repeated runs of an entry: the median of the per-round times
    (and of the CPU times), every run's figure in ``*_runs``; failed runs are counted."""
    ok = [r for r in rs if r.get("ok")]
    if len(rs) == 1 or not ok:
        return rs[0]
    out = dict(ok[0])
    for key in ("seconds_per_round", "cpu_seconds_per_round", "max_abs_error"):
        vals = [float(r[key]) for r in ok if r.get(key) is not None]
        if vals:
            out[f"{key}_runs"] = vals
            out[key] = max(vals) if key == "max_abs_error" else statistics.median(vals)
    out["round_seconds"] = [r.get("round_seconds") for r in ok]
    out["runs"] = len(ok)
    out["failed_runs"] = len(rs) - len(ok)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = ap.add_subparsers(dest="cmd")
    w = sub.add_parser("worker", help="(internal) one measured run in this process")
    w.add_argument("mode", choices=["plain", "secagg-library", "secagg-engine"])
    w.add_argument("--agents", type=int, required=True)
    w.add_argument("--params", type=int, required=True)
    w.add_argument("--dropped", type=int, default=0)
    w.add_argument("--rounds", type=int, default=ROUNDS)
    w.add_argument("--db", default="")
    w.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true", help="N = 10, 50; P = 1e5")
    ap.add_argument("--agents", type=int, nargs="+", help="agent counts (default 10 50 100)")
    ap.add_argument("--params", type=float, nargs="+", help="model sizes (default 1e5 1e6)")
    ap.add_argument("--drop", type=float, nargs="+", default=[0.0, 0.1], help="drop fractions")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per run (default 900)")
    ap.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="runs of every entry per configuration, interleaved; the table shows medians",
    )
    ap.add_argument("--skip-flower", action="store_true")
    ap.add_argument(
        "--flower-client-cpus",
        type=float,
        default=None,
        help="Ray CPUs per Flower ClientApp (default: Flower's own default, 2)",
    )
    ap.add_argument(
        "--flower-plain",
        action="store_true",
        help="also run Flower's plain FedAvg (its simulation engine's own cost, for context)",
    )
    ap.add_argument("--out", default=str(RESULTS / "secagg_cost.json"))
    ap.add_argument("--plot", default=str(PLOTS / "secagg_cost.png"))
    ap.add_argument("--keep", action="store_true", help="keep the work folder (logs, stores)")
    args = ap.parse_args()

    if args.cmd == "worker":
        if args.mode == "plain":
            data = worker_plain(args.agents, args.params, args.rounds, args.db)
        elif args.mode == "secagg-library":
            data = worker_secagg_library(args.agents, args.params, args.dropped, args.rounds)
        else:
            data = worker_secagg_engine(
                args.agents, args.params, args.dropped, args.rounds, args.db
            )
        Path(args.out).write_text(json.dumps(data))
        return 0

    agents = args.agents or ([10, 50] if args.quick else [10, 50, 100])
    sizes = [int(p) for p in (args.params or ([1e5] if args.quick else [1e5, 1e6]))]
    t_start = time.monotonic()
    flower_python: Path | None = None
    flower: dict[str, Any] = {"skipped": True}
    if not args.skip_flower:
        from flower_env import ensure_flower_venv

        info = ensure_flower_venv()
        flower_python = Path(str(info["venv"])) / "bin" / "python"
        flower = {"versions": info["versions"], "notes": info["notes"]}
    mode = fedstack_secagg_mode()
    workdir = fc.new_workdir("secagg-cost-")
    print(f"fedstack SecAgg+ measured through the {mode}; work folder {workdir}", flush=True)
    rows: list[dict[str, Any]] = []
    for p in sizes:
        for n in agents:
            for frac in args.drop:
                d = dropped_count(n, frac)
                g = graph_settings(n)
                print(f"N={n} P={p:.0e} dropped={d} (k+1={g['num_shares']}, t={g['threshold']})")
                tries: dict[str, list[dict[str, Any]]] = {}
                for rep in range(args.repeat):
                    for name, runner, extra in plan(mode, flower_python, args):
                        print(f"  {name} (run {rep + 1}/{args.repeat}) ...", flush=True)
                        r = fc.guarded(runner, name, n, p, d, workdir, args.timeout, *extra)
                        tries.setdefault(name, []).append(r)
                runs = {name: combine(rs) for name, rs in tries.items()}
                if flower_python is None:
                    runs[FLOWER] = fc.failed(FLOWER, "skipped (--skip-flower)")
                for name, r in runs.items():
                    print(
                        f"  {name}: "
                        + (
                            f"{_fmt(_spr(r))} s/round (rounds 2-{ROUNDS}), "
                            + (
                                f"{_fmt(r['cpu_seconds_per_round'])} CPU s/round, "
                                if r.get("cpu_seconds_per_round") is not None
                                else ""
                            )
                            + f"max |error| {_fmt(r.get('max_abs_error'), 8)}"
                            if r.get("ok")
                            else "FAILED: " + r.get("error", "")[:300]
                        ),
                        flush=True,
                    )
                fs, fl = _spr(runs[SECAGG]), _spr(runs[FLOWER])
                rows.append(
                    {
                        "agents": n,
                        "params": p,
                        "drop_fraction": frac,
                        "dropped": d,
                        **g,
                        "runs": runs,
                        "ratio_flower_over_fedstack": fl / fs if fs and fl else None,
                        "ratio_secagg_over_plain": (
                            fs / _spr(runs[PLAIN]) if fs and _spr(runs[PLAIN]) else None
                        ),
                    }
                )
    print()
    print_table(rows)
    compared = [r for r in rows if r["ratio_flower_over_fedstack"] is not None]
    verdict = None
    if compared:
        verdict = all(r["ratio_flower_over_fedstack"] >= 1.0 for r in compared)
        print(
            f"\n[{'PASS' if verdict else 'FAIL'}] fedstack SecAgg+ no slower per round than "
            f"Flower's SecAgg+ at the same settings ({len(compared)}/{len(rows)} "
            "configurations measured on both sides)"
        )
    bounded = [
        r["runs"][SECAGG]
        for r in rows
        if r["runs"][SECAGG].get("ok") and r["runs"][SECAGG].get("error_bound") is not None
    ]
    exact = None
    if bounded:
        exact = all(x["max_abs_error"] <= x["error_bound"] for x in bounded)
        print(
            f"[{'PASS' if exact else 'FAIL'}] fedstack SecAgg+'s final model = the weighted "
            "FedAvg of the surviving agents' updates within the stated quantisation bound "
            f"({len(bounded)} runs; worst error/bound "
            f"{max(x['max_abs_error'] / x['error_bound'] for x in bounded):.2f})"
        )
    if args.plot:
        plot(rows, Path(args.plot))
    result = {
        "benchmark": "secagg_cost",
        "rounds": ROUNDS,
        "measured_rounds": f"2-{ROUNDS}",
        "fedstack_secagg_mode": mode,
        "settings": {
            "clip": CLIP,
            "quant_bits": QUANT_BITS,
            "modulus": 2**32,
            "max_weight": MAX_WEIGHT,
            "drop_stage": DROP_STAGE,
        },
        "rows": rows,
        "no_slower_than_flower": verdict,
        "within_error_bound": exact,
    }
    fc.save_result(
        result,
        flower=flower,
        runs=None,
        checks=None,
        t_start=t_start,
        out=Path(args.out),
        workdir=workdir,
        keep=args.keep,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
