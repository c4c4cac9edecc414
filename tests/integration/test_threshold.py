"""Threshold semantics over active agents, min_agents, and the round deadline."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from fedstack import Agent, AggregatorConfig
from fedstack.testing import aggregator_thread

HERE = Path(__file__).parent


def wait_until(cond: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


def model(value: float) -> dict[str, np.ndarray]:
    # the structure of agent_proc.py's model (an agent of another one is refused)
    return {"w": np.full((4, 3), value, np.float32), "b": np.full(3, value, np.float64)}


def test_threshold_half_of_four_aggregates_at_second_distinct_upload(tmp_path: Path) -> None:
    cfg = AggregatorConfig(
        auth="off", port=0, db=str(tmp_path / "f.db"), threshold=0.5, rounds=1, finish_grace=2
    )
    with aggregator_thread(cfg) as agg:
        url = f"ws://127.0.0.1:{agg.port}"
        agents = [Agent(url, name=f"a{i}") for i in range(4)]
        agents[0].send_initial_model(model(0))
        for a in agents:
            a.start()
        wait_until(lambda: len(agg.sessions) == 4)
        for a in agents:
            np.testing.assert_array_equal(a.wait_for_global_model(10)["w"], 0)
        assert agg.state.needed(4) == 2

        agents[0].send_trained_model(model(2), 1)
        wait_until(lambda: len(agents[0].acknowledged) == 1)
        assert agents[0].acknowledged[0].status == "accepted"
        # a second upload from the same agent is not a second distinct agent
        assert agents[0].send_trained_model(model(100), 1)
        wait_until(lambda: len(agents[0].acknowledged) == 2)
        assert agents[0].acknowledged[1].status == "duplicate"
        time.sleep(0.3)  # give a wrong implementation the chance to aggregate early
        assert agg.state.version == 0 and len(agg.state.contributors) == 1

        agents[1].send_trained_model(model(4), 1)
        for a in agents:
            gm = a.wait_for_global_model(10)
            np.testing.assert_array_equal(gm["w"], 3)  # mean of 2 and 4, not 100
        assert agg.state.version == 1
        for a in agents:
            a.close()


def _spawn_idle(url: str, name: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "agent_proc.py"), "--url", url, "--name", name, "--idle"],
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == b"started"
    return proc


def test_sync_round_completes_when_an_agent_is_killed(tmp_path: Path) -> None:
    cfg = AggregatorConfig(
        auth="off",
        port=0,
        db=str(tmp_path / "f.db"),
        threshold=1.0,
        rounds=1,
        round_timeout=60,
        finish_grace=2,
    )
    with aggregator_thread(cfg) as agg:
        url = f"ws://127.0.0.1:{agg.port}"
        a = Agent(url, name="alive")
        a.send_initial_model(model(1))
        a.start()
        victim = _spawn_idle(url, "victim")
        try:
            wait_until(lambda: len(agg.sessions) == 2)
            a.wait_for_global_model(10)
            a.send_trained_model(model(5), 1)
            wait_until(lambda: len(a.acknowledged) == 1)
            time.sleep(0.2)
            assert agg.state.version == 0  # waits for the other agent
            t0 = time.monotonic()
            victim.send_signal(signal.SIGKILL)
            gm = a.wait_for_global_model(10)
            # the departed agent left the active set: no need to wait for the deadline
            assert time.monotonic() - t0 < 5
            np.testing.assert_array_equal(gm["w"], 5)
        finally:
            victim.kill()
            victim.wait()
            a.close()


def test_sync_round_completes_at_deadline_when_an_agent_hangs(tmp_path: Path) -> None:
    cfg = AggregatorConfig(
        auth="off",
        port=0,
        db=str(tmp_path / "f.db"),
        threshold=1.0,
        rounds=1,
        round_timeout=1.5,
        heartbeat_interval=30,
        finish_grace=2,
    )
    with aggregator_thread(cfg) as agg:
        url = f"ws://127.0.0.1:{agg.port}"
        a = Agent(url, name="alive")
        a.send_initial_model(model(1))
        a.start()
        hung = _spawn_idle(url, "hung")
        try:
            wait_until(lambda: len(agg.sessions) == 2)
            hung.send_signal(signal.SIGSTOP)  # connection stays open, agent never answers
            a.wait_for_global_model(10)
            t0 = time.monotonic()
            a.send_trained_model(model(7), 1)
            gm = a.wait_for_global_model(10)
            waited = time.monotonic() - t0
            np.testing.assert_array_equal(gm["w"], 7)
            assert 0.5 < waited < 5, waited  # completed by the deadline, not before
            assert len(agg.sessions) == 2  # the hung agent is still connected
        finally:
            hung.send_signal(signal.SIGCONT)
            hung.kill()
            hung.wait()
            a.close()


def test_min_agents_holds_the_first_round(tmp_path: Path) -> None:
    cfg = AggregatorConfig(
        auth="off", port=0, db=str(tmp_path / "f.db"), min_agents=2, rounds=1, finish_grace=2
    )
    with aggregator_thread(cfg) as agg:
        url = f"ws://127.0.0.1:{agg.port}"
        a1 = Agent(url, name="a1")
        a1.send_initial_model(model(0))
        a1.start()
        a1.wait_for_global_model(10)
        a1.send_trained_model(model(2), 1)
        wait_until(lambda: len(a1.acknowledged) == 1)
        time.sleep(0.3)
        assert agg.state.version == 0  # one agent is fewer than min_agents
        a2 = Agent(url, name="a2")
        a2.start()
        a2.wait_for_global_model(10)
        a2.send_trained_model(model(4), 1)
        np.testing.assert_array_equal(a1.wait_for_global_model(10)["w"], 3)
        a1.close()
        a2.close()
