"""Secure aggregation across restarts: an aggregator restarted in the middle of a session
abandons the attempt (its masked inputs are voided) and the round completes in a new
one; an agent restarted with a plain upload in its state directory never sends it."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedstack import Agent, AggregatorConfig, FederationFinished, Store
from fedstack.agent.state import AgentStateDir
from fedstack.errors import ConnectionClosed, FedstackError
from fedstack.testing import aggregator_thread, free_port
from fedstack.wire import Message, ModelUpload, SecAggForward
from fedstack.wire import session as protocol
from fedstack.wire.messages import SECAGG_MASKED

P = 32


def _agent_loop(a: Agent, step: float, seen: list[int]) -> None:
    try:
        while True:
            gm = a.wait_for_global_model(60)
            seen.append(a.version)
            a.send_trained_model({"w": gm["w"] + step}, 10)
    except (FederationFinished, ConnectionClosed, FedstackError, TimeoutError):
        pass
    finally:
        a.close(5)


def test_restart_mid_session_abandons_the_attempt_and_completes_the_round(
    tmp_path: Path,
) -> None:
    cfg = AggregatorConfig(
        auth="off",
        port=free_port(),
        db=str(tmp_path / "r.db"),
        rounds=1,
        min_agents=3,
        finish_grace=3,
        secagg=True,
        secagg_timeout=60.0,  # the stuck agent holds the first attempt until the restart
    )
    stuck = threading.Event()
    seen: dict[int, list[int]] = {0: [], 1: [], 2: []}
    threads: list[threading.Thread] = []
    with aggregator_thread(cfg) as agg:
        url = f"ws://127.0.0.1:{agg.port}"
        for i in range(3):
            a = Agent(url, name=f"a{i}", max_backoff=0.3)
            a.send_initial_model({"w": np.zeros(P, np.float32)})
            a.start(30)
            if i == 2:  # the first time its neighbours' shares arrive it does nothing
                sa = a._core.secagg
                inner = sa.on_message

                def hang(msg: Message, agent_id: str | None, inner: Any = inner) -> list[Message]:
                    if isinstance(msg, SecAggForward) and not stuck.is_set():
                        stuck.set()
                        return []
                    out: list[Message] = inner(msg, agent_id)
                    return out

                sa.on_message = hang
            t = threading.Thread(target=_agent_loop, args=(a, float(i + 1), seen[i]), daemon=True)
            t.start()
            threads.append(t)
        deadline = time.monotonic() + 30
        while len(agg.state.contributors) < 2:  # a0, a1 stored their masked inputs
            assert time.monotonic() < deadline, agg.state.contributors
            time.sleep(0.02)
        first = agg.secagg.session if agg.secagg is not None else None
        assert agg.state.version == 0
    # restarted on the same store and port: the agents reconnect
    with aggregator_thread(cfg) as agg:
        deadline = time.monotonic() + 60
        while not agg.state.finished:
            assert time.monotonic() < deadline, "the round did not complete after the restart"
            time.sleep(0.05)
        run_id = agg.run_id
        for t in threads:
            t.join(30)
    store = Store.open_readonly(cfg.db)
    try:
        events = store.events(run_id)
        abandoned = [e for e in events if e["kind"] == "secagg_abandoned"]
        assert abandoned and abandoned[0]["detail"]["masked_inputs"] == 2
        rounds = store.rounds(run_id)
        assert len(rounds) == 1
        assert rounds[0]["metrics"]["secagg_agents"] == 3
        assert rounds[0]["metrics"]["secagg_session"] != first
        uploads = [
            m for m in store.models(run_id) if m["kind"] == "local" and m["status"] != "initial"
        ]
        assert sorted(m["status"] for m in uploads) == ["aggregated"] * 3 + ["stale"] * 2
        gid = store.global_model_id(run_id, 1)
        assert gid is not None
        np.testing.assert_allclose(store.load_weights(gid)["w"], 2.0, atol=1e-3)  # (1+2+3)/3
    finally:
        store.close()


def test_a_restored_plain_upload_is_never_sent_under_secagg(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    received: list[Message] = []
    original = protocol.AggregatorSession.receive

    def receive(session: protocol.AggregatorSession, msg: Message) -> protocol.Event:
        received.append(msg)
        return original(session, msg)

    monkeypatch.setattr(protocol.AggregatorSession, "receive", receive)
    state = tmp_path / "state-a0"
    # what an agent of a run without secure aggregation left behind when it crashed
    disk = AgentStateDir(state, "a0")
    plain = ModelUpload(
        upload_id="plain-pending",
        base_version=0,
        num_samples=10,
        model={"w": np.full(P, 7.0, np.float32)},
    )
    disk.save_pending(plain, None)
    cfg = AggregatorConfig(
        auth="off",
        port=0,
        db=str(tmp_path / "p.db"),
        rounds=1,
        min_agents=2,
        finish_grace=3,
        secagg=True,
        secagg_timeout=10.0,
    )
    with aggregator_thread(cfg) as agg:
        url = f"ws://127.0.0.1:{agg.port}"
        seen: dict[int, list[int]] = {0: [], 1: []}
        agents = []
        for i in range(2):
            a = Agent(url, name=f"a{i}", state_dir=state if i == 0 else None)
            a.send_initial_model({"w": np.zeros(P, np.float32)})
            a.start(30)
            agents.append(a)
        threads = [
            threading.Thread(target=_agent_loop, args=(a, 1.0, seen[i]), daemon=True)
            for i, a in enumerate(agents)
        ]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while not agg.state.finished:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        for t in threads:
            t.join(30)
    uploads = [m for m in received if isinstance(m, ModelUpload)]
    assert uploads and all(set(m.model) == {SECAGG_MASKED} for m in uploads)
    assert not any(m.upload_id == "plain-pending" for m in uploads)
    assert AgentStateDir(state, "a0").load_pending() is None  # discarded, not kept
