"""Helpers of tests/trackers (imported by bare name): reading a run back from the store,
from MLflow (its client) and from TensorBoard event files (its event reader), as
``{name: {step: value}}`` for the run and for each agent; and a small federation of real
agents to make runs with. (MLflow and TensorBoard are imported here, at collection, not
first in a test thread while an aggregator's tracker thread imports them too.)"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
from mlflow.tracking import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

from fedstack import Agent, FederationFinished, Store

Series = dict[str, dict[int, float]]
"""metric name -> {round: value}"""

RNG = np.random.default_rng(3)
W_TRUE = np.array([1.0, -2.0, 0.5, 3.0], np.float32)
DATA = []
for _k in range(2):
    _x = RNG.normal(loc=0.5 * _k, size=(30, 4)).astype(np.float32)
    DATA.append((_x, _x @ W_TRUE + 1.5))
X_ALL = np.concatenate([d[0] for d in DATA])
Y_ALL = np.concatenate([d[1] for d in DATA])
ODD_KEY = "loss/../odd key\u202e"
"""An agent-chosen metric name no tracker takes as it is."""


def _loss(m: dict[str, np.ndarray]) -> float:
    return float(np.mean((X_ALL @ m["w"] + m["b"] - Y_ALL) ** 2))


def evaluate(weights: dict[str, np.ndarray]) -> dict[str, Any]:
    """The aggregator's central evaluation: the loss on all data (and a text metric)."""
    return {"loss": _loss(weights), "accuracy": 1.0 / (1.0 + _loss(weights)), "note": "x"}


def agent_loop(
    url: str, k: int, *, hold: threading.Event | None = None, hold_before: int = 0
) -> None:
    """Agent ``agent-k``: a few gradient steps per round; before training on global version
    ``hold_before`` it waits for ``hold``."""
    x, y = DATA[k]
    agent = Agent(url, name=f"agent-{k}")
    agent.send_initial_model({"w": np.zeros(4, np.float32), "b": np.zeros((), np.float32)})
    agent.start()
    while True:
        try:
            gm = agent.wait_for_global_model(60)
        except FederationFinished:
            break
        if hold is not None and agent.version == hold_before:
            assert hold.wait(60)
        m: dict[str, np.ndarray] = {n: np.array(v, dtype=np.float32) for n, v in gm.items()}
        for _ in range(3):
            r = x @ m["w"] + m["b"] - y
            m["w"] = (m["w"] - 0.05 * (2 * x.T @ r / len(y))).astype(np.float32)
            m["b"] = m["b"] - 0.05 * np.float32(2 * r.mean())
        metrics = {"train_loss": _loss(m), "local_steps": 3 + k, ODD_KEY: 0.25 * k, "opt": "sgd"}
        agent.send_trained_model(m, len(y), metrics)
    agent.close()


def federation(url: str, **kw: Any) -> list[threading.Thread]:
    threads = [threading.Thread(target=agent_loop, args=(url, k), kwargs=kw) for k in range(2)]
    for t in threads:
        t.start()
    return threads


def store_series(db: Path, run_id: str) -> tuple[Series, dict[str, Series]]:
    """What the store says: each round's figures and numeric metrics (``fedstack db
    rounds``), each aggregated upload's sample count and numeric metrics per agent."""
    store = Store.open_readonly(str(db))
    try:
        run: Series = {}
        for r in store.rounds(run_id):
            values = {
                **r["metrics"],
                **{k: r[k] for k in ("seconds", "num_updates", "num_samples")},
            }
            for key, v in values.items():
                if isinstance(v, int | float):
                    run.setdefault(key, {})[r["round"]] = float(v)
        agents: dict[str, Series] = {}
        for m in store.models(run_id, "local"):
            if m["status"] != "aggregated":
                continue
            series = agents.setdefault(m["agent"], {})
            for key, v in {**m["metrics"], "num_samples": m["num_samples"]}.items():
                if isinstance(v, int | float):
                    series.setdefault(key, {})[m["round"]] = float(v)
        return run, agents
    finally:
        store.close()


def mlflow_series(uri: str, run_id: str) -> tuple[Any, Series, dict[str, Series]]:
    """The MLflow run of fedstack run ``run_id`` and its nested agent runs, read with
    MLflow's client; every step must be logged once."""
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("fedstack")
    assert exp is not None
    found = client.search_runs([exp.experiment_id], f"tags.`fedstack.run_id` = '{run_id}'")
    assert len(found) == 1, found
    parent = found[0]

    def series(mlrun: Any) -> Series:
        out: Series = {}
        for key in mlrun.data.metrics:
            history = client.get_metric_history(mlrun.info.run_id, key)
            steps = [h.step for h in history]
            assert len(steps) == len(set(steps)), (key, steps)  # nothing logged twice
            out[key] = {h.step: h.value for h in history}
        return out

    children = client.search_runs(
        [exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    agents = {c.info.run_name: series(c) for c in children}
    assert len(agents) == len(children)
    return parent, series(parent), agents


def tensorboard_series(directory: Path) -> Series:
    """The scalars of one TensorBoard run directory, read with TensorBoard's event
    reader; every step must be written once."""
    acc = EventAccumulator(str(directory), size_guidance={SCALARS: 0})
    acc.Reload()
    out: Series = {}
    for tag in acc.Tags()["scalars"]:
        events = acc.Scalars(tag)
        steps = [e.step for e in events]
        assert len(steps) == len(set(steps)), (tag, steps)
        out[tag] = {e.step: e.value for e in events}
    return out


def mlflow_key(key: str) -> str:
    from fedstack.trackers.base import safe_key

    return safe_key(key)


def as_float32(series: Series) -> Series:
    return {k: {s: float(np.float32(v)) for s, v in steps.items()} for k, steps in series.items()}
