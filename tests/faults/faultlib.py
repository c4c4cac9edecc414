"""Shared pieces of the fault-injection suite.

- a deterministic "training" step: ``w + 0.1 * (target_k - w)`` with ``target_k`` a pure
  function of the agent's seed, so the federation's result depends only on the seeds and
  the number of rounds, never on timing (with ``threshold 1.0`` and ``min_agents`` = the
  number of agents, every round aggregates exactly one update per agent, each trained on
  the previous global model; FedAvg accumulates in float64, so arrival order does not
  change a bit of the result);
- thread agents (:func:`start_thread_agent`) and the subprocess agent script
  (``agent_det.py``) running that loop and reporting every acknowledged upload;
- :func:`check_run`: the invariants every fault trial asserts.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedstack import Agent, FederationFinished, Store

HERE = Path(__file__).resolve().parent
AGENT_SCRIPT = HERE / "agent_det.py"
SHAPES: dict[str, tuple[int, ...]] = {"w": (6, 4), "b": (4,)}
N_AGENTS = 3
STRATEGY_PARAMS = {"precision": "float64"}  # order-independent FedAvg (see module doc)


def aggregator_supports(flag: str) -> bool:
    """Whether ``fedstack aggregator`` knows ``flag`` (e.g. ``--auth``), as the code is now."""
    from fedstack.cli.main import command

    agg = command().commands["aggregator"]
    return any(flag in p.opts or flag in p.secondary_opts for p in agg.params)


def auth_off_args() -> list[str]:
    """``--auth off`` if the aggregator has an auth option (it may default to required)."""
    return ["--auth", "off"] if aggregator_supports("--auth") else []


def auth_off_config() -> dict[str, Any]:
    """``auth="off"`` for :class:`AggregatorConfig` if that field exists."""
    from dataclasses import fields

    from fedstack import AggregatorConfig

    return {"auth": "off"} if "auth" in {f.name for f in fields(AggregatorConfig)} else {}


def aggregator_args(db: Path, rounds: int, *extra: str) -> list[str]:
    """CLI arguments of a test aggregator; ``auth`` is turned off through a config file
    (works whether or not the CLI has an ``--auth`` flag yet)."""
    cfg = db.with_name(db.name + ".config.json")
    cfg.write_text(json.dumps(auth_off_config()))
    return [
        "--config",
        str(cfg),
        "--db",
        str(db),
        "--rounds",
        str(rounds),
        "--min-agents",
        str(N_AGENTS),
        "--threshold",
        "1.0",
        "--heartbeat-interval",
        "1",
        "--finish-grace",
        "5",
        "--strategy-param",
        "precision=float64",
        *extra,
    ]


def aggregator_config(db: Path, rounds: int, **kw: Any) -> Any:
    from fedstack import AggregatorConfig

    base: dict[str, Any] = dict(
        port=0,
        db=str(db),
        rounds=rounds,
        min_agents=N_AGENTS,
        threshold=1.0,
        heartbeat_interval=1.0,
        finish_grace=5.0,
        strategy_params=dict(STRATEGY_PARAMS),
    )
    base.update(auth_off_config())
    base.update(kw)
    return AggregatorConfig(**base)


# ---------------------------------------------------------------------- training
def initial_model() -> dict[str, np.ndarray]:
    return {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}


def target(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1000 + seed)
    return {k: rng.uniform(-1, 1, s).astype(np.float32) for k, s in SHAPES.items()}


def train(gm: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    """A pure function of the global model and the agent's seed."""
    t = target(seed)
    return {
        k: (gm[k].astype(np.float64) + 0.1 * (t[k].astype(np.float64) - gm[k])).astype(np.float32)
        for k in SHAPES
    }


def samples(seed: int) -> int:
    return 10 + seed


def agent_loop(
    agent: Agent,
    seed: int,
    report: dict[str, Any],
    *,
    delay: float = 0.0,
    timeout: float = 60.0,
    on_round: Callable[[], None] | None = None,
) -> None:
    """Train on every global model until the federation finishes; fill ``report``."""
    report.setdefault("versions", [])
    while True:
        try:
            gm = agent.wait_for_global_model(timeout=timeout)
        except FederationFinished:
            break
        report["versions"].append(agent.version)
        report["final"] = {k: v.tolist() for k, v in gm.items()}
        if delay:
            time.sleep(delay)
        if agent.send_trained_model(train(gm, seed), samples(seed), {"seed": seed}):
            pending = agent._pending  # the upload id, if not acknowledged already
            if pending is not None:
                report.setdefault("sent", []).append(pending.upload_id)
        report["acked"] = [[a.upload_id, a.status] for a in list(agent.acknowledged)]
        if on_round is not None:
            on_round()
    report["acked"] = [[a.upload_id, a.status] for a in list(agent.acknowledged)]
    report["reconnects"] = agent.reconnects


@dataclass
class ThreadAgent:
    name: str
    seed: int
    agent: Agent
    thread: threading.Thread
    report: dict[str, Any] = field(default_factory=dict)
    error: list[BaseException] = field(default_factory=list)


def start_thread_agent(
    url: str,
    name: str,
    seed: int,
    *,
    delay: float = 0.0,
    max_backoff: float = 0.3,
    start_timeout: float = 60.0,
) -> ThreadAgent:
    agent = Agent(url, name=name, max_backoff=max_backoff, connect_timeout=3.0)
    agent.send_initial_model(initial_model())
    ta = ThreadAgent(name, seed, agent, threading.Thread(daemon=True, name=f"agent-{name}"))

    def run() -> None:
        try:
            agent.start(timeout=start_timeout)
            agent_loop(agent, seed, ta.report, delay=delay)
        except BaseException as exc:  # reported to the test
            ta.error.append(exc)
        finally:
            agent.close(timeout=5)

    ta.thread = threading.Thread(target=run, daemon=True, name=f"agent-{name}")
    ta.thread.start()
    return ta


def join_all(agents: list[ThreadAgent], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for a in agents:
        a.thread.join(max(0.1, deadline - time.monotonic()))
    alive = [a.name for a in agents if a.thread.is_alive()]
    assert not alive, f"agents still running after {timeout} s: {alive}"
    errors = {a.name: a.error for a in agents if a.error}
    assert not errors, f"agents failed: {errors}"


def agent_cmd(
    url: str,
    name: str,
    seed: int,
    report: Path,
    *,
    delay: float = 0.0,
    state_dir: Path | None = None,
) -> list[str]:
    cmd = [
        sys.executable,
        str(AGENT_SCRIPT),
        "--url",
        url,
        "--name",
        name,
        "--seed",
        str(seed),
        "--report",
        str(report),
        "--delay",
        str(delay),
    ]
    if state_dir is not None:
        cmd += ["--state-dir", str(state_dir)]
    return cmd


def read_report(path: Path) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads(path.read_text())
        return data
    except (OSError, ValueError):
        return {}


def write_json(path: Path, data: object) -> None:
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)


# ---------------------------------------------------------------------- observation
class Observer:
    """Reads a run's progress from the store while an aggregator writes it."""

    def __init__(self, db: Path) -> None:
        self.db = db
        self.store: Store | None = None

    def _store(self) -> Store:
        if self.store is None:
            self.store = Store(str(self.db))
        return self.store

    def progress(self) -> tuple[int, int]:
        """(rounds committed, uploads buffered for the round in progress)."""
        if not self.db.exists():
            return 0, 0
        store = self._store()
        run = store.latest_run_id()
        if run is None:
            return 0, 0
        info = store.get_run(run)
        buffered = sum(1 for m in store.models(run, "local") if m["status"] == "buffered")
        return max(info.version, 0), buffered

    def close(self) -> None:
        if self.store is not None:
            self.store.close()


def wait_for(cond: Callable[[], bool], timeout: float, step: float = 0.005) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(step)
    return False


# ---------------------------------------------------------------------- invariants
def check_run(
    db: Path | str,
    rounds: int,
    reports: list[dict[str, Any]],
    reference: dict[str, np.ndarray] | None,
    *,
    n_agents: int = N_AGENTS,
) -> dict[str, Any]:
    """Assert the fault-trial invariants on a finished run; return a summary.

    - one run, finished, rounds 1..R contiguous (no gaps, no duplicates);
    - no cluster model computed twice: one cluster row per round, each round's lineage
      inputs are exactly the local models marked aggregated for that round (one per agent,
      each trained on the previous global model), and its num_updates matches;
    - every acknowledged upload is in the store; nothing left buffered;
    - the final model is bit-identical to the fault-free reference.
    """
    store = Store(str(db))
    try:
        runs = store.list_runs()
        assert len(runs) == 1, f"expected one run, got {len(runs)}"
        assert runs[0]["status"] == "finished", runs[0]["status"]
        run_id = runs[0]["id"]
        rows = store.rounds(run_id)
        assert [r["round"] for r in rows] == list(range(1, rounds + 1)), (
            f"rounds not contiguous: {[r['round'] for r in rows]}"
        )
        cluster = store.models(run_id, "cluster")
        per_round: dict[int, int] = {}
        for m in cluster:
            per_round[m["round"]] = per_round.get(m["round"], 0) + 1
        twice = {r: n for r, n in per_round.items() if n > 1}
        assert not twice, f"cluster model computed more than once: {twice}"
        assert sorted(per_round) == list(range(0, rounds + 1)), sorted(per_round)
        local = store.models(run_id, "local")
        by_id = {m["id"]: m for m in local}
        aggregated_by_round: dict[int, set[str]] = {}
        for m in local:
            if m["status"] == "aggregated":
                aggregated_by_round.setdefault(m["round"], set()).add(m["id"])
        for r in rows:
            inputs = {p["id"] for p in store.parents(r["model_id"]) if p["relation"] == "input"}
            assert inputs == aggregated_by_round.get(r["round"], set()), (
                f"round {r['round']}: inputs differ from that round's aggregated uploads"
            )
            assert len(inputs) == r["num_updates"] == n_agents, (r["round"], len(inputs))
            producers = {by_id[i]["producer"] for i in inputs}
            assert len(producers) == n_agents, f"round {r['round']}: an agent counted twice"
            assert all(by_id[i]["base_version"] == r["round"] - 1 for i in inputs)
        left = [m["upload_id"] for m in local if m["status"] == "buffered"]
        assert not left, f"uploads still buffered after the run finished: {left}"
        stored = {m["upload_id"]: m for m in local if m["upload_id"]}
        acked = 0
        for rep in reports:
            for upload_id, _status in rep.get("acked", []):
                acked += 1
                assert upload_id in stored, f"acknowledged upload {upload_id} not in the store"
        final = store.load_weights(rows[-1]["model_id"])
        if reference is not None:
            for k, v in reference.items():
                assert final[k].dtype == v.dtype
                assert np.array_equal(final[k], v), f"final {k} differs from the reference"
            for rep in reports:
                if "final" in rep and rep.get("versions", [None])[-1] == rounds:
                    for k, v in reference.items():
                        assert np.array_equal(np.asarray(rep["final"][k], v.dtype), v)
        statuses: dict[str, int] = {}
        for m in local:
            statuses[m["status"]] = statuses.get(m["status"], 0) + 1
        return {"run_id": run_id, "final": final, "acked": acked, "statuses": statuses}
    finally:
        store.close()


def simulate(rounds: int, n_agents: int = N_AGENTS) -> dict[str, np.ndarray]:
    """The federation's result computed directly (FedAvg over the agents' trained models)."""
    w = initial_model()
    for _ in range(rounds):
        acc = {k: np.zeros(s, np.float64) for k, s in SHAPES.items()}
        total = 0
        for seed in range(n_agents):
            t = train(w, seed)
            n = samples(seed)
            total += n
            for k in SHAPES:
                acc[k] += n * t[k].astype(np.float64)
        w = {k: (acc[k] / total).astype(np.float32) for k in SHAPES}
    return w


def reference_run(tmp: Path, rounds: int) -> dict[str, np.ndarray]:
    """A fault-free federation (in-process aggregator, thread agents): its final model."""
    from fedstack.testing import aggregator_thread

    db = tmp / "reference.db"
    with aggregator_thread(aggregator_config(db, rounds)) as agg:
        url = f"ws://127.0.0.1:{agg.port}"
        agents = [start_thread_agent(url, f"agent-{i}", i) for i in range(N_AGENTS)]
        join_all(agents, 60)
        finish_thread_aggregator(agg)
    summary = check_run(db, rounds, [a.report for a in agents], None)
    final: dict[str, np.ndarray] = summary["final"]
    return final


def finish_thread_aggregator(agg: Any, timeout: float = 30.0) -> None:
    """``await agg.wait_finished()`` on the aggregator's own loop (marks the run finished)."""
    import asyncio

    assert agg._driver is not None
    loop = agg._driver.get_loop()
    asyncio.run_coroutine_threadsafe(agg.wait_finished(), loop).result(timeout)
