"""``--target-metric NAME>=VALUE|NAME<=VALUE`` (book row 30): the run ends after the round
that reaches it, every agent gets that round's model as the final one and exits cleanly,
and an aggregator restarted after it does not train on."""

from __future__ import annotations

import concurrent.futures
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fedstack import Agent, AggregatorConfig, Store
from fedstack.aggregator.config import TargetMetric
from fedstack.cli.aggregator import parse_aggregator_args
from fedstack.errors import ConfigError, FederationFinished
from fedstack.testing import aggregator_thread

MODEL = {"w": np.zeros(4, np.float32)}


def _train(url: str, name: str) -> tuple[list[int], bool]:
    """An agent whose reported ``loss`` is 1 / (version + 1): the versions it trained
    on, and whether it saw FederationFinished (then it left cleanly)."""
    agent = Agent(url, name=name, token=f"token-of-{name}-0123456789")
    agent.send_initial_model(MODEL)
    agent.start(timeout=20)
    versions: list[int] = []
    try:
        while True:
            try:
                gm = agent.wait_for_global_model(timeout=30)
            except FederationFinished:
                return versions, True
            versions.append(agent.version)
            agent.send_trained_model({"w": gm["w"] + 1}, 10, {"loss": 1.0 / (agent.version + 1)})
    finally:
        agent.close()


def _config(tmp_path: Path, **kw: object) -> AggregatorConfig:
    return AggregatorConfig(
        host="127.0.0.1",
        port=0,
        db=str(tmp_path / "agg.db"),
        min_agents=2,
        rounds=50,
        auth="off",
        finish_grace=5.0,
        heartbeat_interval=1.0,
        **kw,
    )


def test_the_round_reaching_the_target_is_the_last_and_a_restart_does_not_train_on(
    tmp_path: Path,
) -> None:
    cfg = _config(tmp_path, target_metric="mean_loss<=0.3")
    with aggregator_thread(cfg) as agg:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            runs = list(pool.map(lambda n: _train(agg.url, n), ["a1", "a2"]))
        assert agg.state.finished and agg.state.version == 4
    # loss 1/(v+1) <= 0.3 first for the uploads trained on v3, i.e. round 4: v4 is final
    for versions, finished in runs:
        assert versions == [0, 1, 2, 3, 4] and finished
    store = Store(cfg.db)
    try:
        (run,) = store.list_runs()
        rounds = store.rounds(run["id"])
        assert [r["round"] for r in rounds] == [1, 2, 3, 4]
        assert rounds[-1]["metrics"]["mean_loss"] <= 0.3 < rounds[-2]["metrics"]["mean_loss"]
    finally:
        store.close()

    # killed before it marked the run finished (no finish_grace passed): restarted, it
    # resumes the run as over, hands a late agent the final model and trains no more
    with aggregator_thread(cfg) as agg:
        assert agg.state.finished and agg.state.version == 4
        late = Agent(agg.url, name="a3", token="token-of-a3-0123456789")
        late.send_initial_model(MODEL)
        late.start(timeout=20)
        try:
            late.wait_for_global_model(timeout=20)
            assert late.version == 4 and late.finished
            assert not late.send_trained_model({"w": np.ones(4, np.float32)}, 10, {"loss": 0.0})
            with pytest.raises(FederationFinished):
                late.wait_for_global_model(timeout=20)
        finally:
            late.close()
    store = Store(cfg.db)
    try:
        assert [r["round"] for r in store.rounds(run["id"])] == [1, 2, 3, 4]
    finally:
        store.close()


def test_target_metric_is_parsed_and_refused_with_a_clear_error() -> None:
    t = TargetMetric.parse(" eval_accuracy >= 0.9 ")
    assert (t.name, t.op, t.value, str(t)) == ("eval_accuracy", ">=", 0.9, "eval_accuracy>=0.9")
    assert t.reached({"eval_accuracy": 0.9}) and not t.reached({"eval_accuracy": 0.89})
    assert t.reached({"other": 1.0}) is None and t.reached({"eval_accuracy": "x"}) is None
    assert not t.reached({"eval_accuracy": float("nan")})
    low = TargetMetric.parse("mean_train_loss<=1e-2")
    assert low.reached({"mean_train_loss": 0.01}) and not low.reached({"mean_train_loss": 0.02})
    for bad in ("acc>0.9", "acc=>0.9", ">=0.9", "acc>=", "acc>=nan", "acc>=inf", "a b>=1"):
        with pytest.raises(ConfigError, match="NAME>=VALUE or NAME<=VALUE"):
            AggregatorConfig(target_metric=bad)
    cfg = parse_aggregator_args(["--target-metric", "eval_accuracy>=0.95"])
    assert cfg.target == TargetMetric("eval_accuracy", ">=", 0.95)
    env = parse_aggregator_args([], {"FEDSTACK_TARGET_METRIC": "mean_loss<=0.5"})
    assert env.target == TargetMetric("mean_loss", "<=", 0.5)
    with pytest.raises(ConfigError, match="not supported with name or upstream"):
        AggregatorConfig(target_metric="mean_loss<=0.5", name="m1")
    from fedstack.aggregator import Aggregator

    with pytest.raises(ConfigError, match="set evaluator too"):
        Aggregator(AggregatorConfig(target_metric="eval_accuracy>=0.9"))


def test_cli_run_ends_at_an_evaluator_target_and_every_process_exits_0(tmp_path: Path) -> None:
    """`fedstack aggregator --target-metric eval_accuracy>=0.85` with the digits evaluator
    and `fedstack agents` (two processes): the round reaching it is the last one, and the
    aggregator and every agent exit with status 0."""
    ready = tmp_path / "ready.json"
    db = tmp_path / "agg.db"
    agg = subprocess.Popen(
        [
            *(sys.executable, "-m", "fedstack", "-q", "aggregator"),
            *("--host", "127.0.0.1", "--port", "0", "--db", str(db), "--auth", "off"),
            *("--rounds", "40", "--min-agents", "2", "--finish-grace", "10"),
            *("--evaluator", "fedstack.trainers.digits:evaluate_global"),
            *("--target-metric", "eval_accuracy>=0.85", "--ready-file", str(ready)),
        ],
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "agg.log", "wb"),
    )
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert agg.poll() is None, (tmp_path / "agg.log").read_text()[-2000:]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        port = json.loads(ready.read_text())["port"]
        agents = subprocess.run(
            [
                *(sys.executable, "-m", "fedstack", "-q", "agents", "--count", "2"),
                *("--url", f"ws://127.0.0.1:{port}", "--token", "shared-test-token-0123"),
                *("--trainer", "fedstack.trainers.digits:DigitsLinearTrainer"),
                *("--trainer-arg", "partition=iid", "--trainer-arg", "epochs=1"),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert agents.returncode == 0, agents.stderr[-3000:]
        assert agg.wait(60) == 0, (tmp_path / "agg.log").read_text()[-3000:]
    finally:
        if agg.poll() is None:
            agg.kill()
            agg.wait()
    store = Store(str(db))
    try:
        (run,) = store.list_runs()
        assert run["status"] == "finished"
        acc = [r["metrics"]["eval_accuracy"] for r in store.rounds(run["id"])]
    finally:
        store.close()
    assert 1 < len(acc) < 40, acc
    assert acc[-1] >= 0.85 and all(a < 0.85 for a in acc[:-1]), acc
