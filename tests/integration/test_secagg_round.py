"""Secure aggregation (SecAgg+) end to end: a real aggregator with ``secagg`` and real
agents over 127.0.0.1.

The global model equals plain weighted FedAvg within the stated quantisation bound; no
stored upload and no message the aggregator received is (or correlates with) one agent's
update; agents dropping after the key exchange or after their masked input leave the
round with the exact sum of the survivors; below the threshold the attempt fails cleanly
(``secagg_failed``, no model, nothing partial) and the retry aggregates the rest.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedstack import Agent, AggregatorConfig, FederationFinished, Store
from fedstack.errors import ConfigError, ConnectionClosed, FedstackError
from fedstack.privacy.secagg import SecAggParams
from fedstack.testing import aggregator_thread
from fedstack.wire import Message, ModelUpload, SecAggForward, SecAggUnmask
from fedstack.wire import session as protocol
from fedstack.wire.messages import SECAGG_MASKED

P = 20_000
N = 10
CLIP = 8.0
BITS = 22


def _update(i: int) -> np.ndarray[Any, Any]:
    return np.random.default_rng(100 + i).normal(0.0, 0.5, P).astype(np.float32)


def _samples(i: int) -> int:
    return 10 + 7 * i


class Capture:
    """Every message an aggregator-side protocol session received."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.messages: list[Message] = []
        self.lock = threading.Lock()
        original = protocol.AggregatorSession.receive

        def receive(session: protocol.AggregatorSession, msg: Message) -> protocol.Event:
            with self.lock:
                self.messages.append(msg)
            return original(session, msg)

        monkeypatch.setattr(protocol.AggregatorSession, "receive", receive)


def _run(
    tmp_path: Path,
    behaviour: dict[int, str],
    *,
    timeout: float = 20.0,
    rounds: int = 1,
    max_attempts: int = 5,
    late_agent: bool = False,
) -> tuple[Store, str, dict[int | str, Any]]:
    """Run ``rounds`` secure rounds with N agents; ``behaviour[i]`` makes agent i drop
    ("after-shares": it leaves when its neighbours' shares arrive; "after-masked": it
    leaves when asked to unmask). Returns the store (read-only), the run id and what
    each agent saw."""
    cfg = AggregatorConfig(
        auth="off",
        port=0,
        db=str(tmp_path / "s.db"),
        rounds=rounds,
        min_agents=N,
        finish_grace=3,
        secagg=True,
        secagg_timeout=timeout,
        secagg_clip=CLIP,
        secagg_quant_bits=BITS,
        secagg_max_attempts=max_attempts,
        heartbeat_interval=1.0,
    )
    seen: dict[int | str, Any] = {}
    with aggregator_thread(cfg) as agg:
        url = f"ws://127.0.0.1:{agg.port}"

        def agent(i: int) -> None:
            a = Agent(url, name=f"a{i}")
            a.send_initial_model({"w": np.zeros(P, np.float32)})
            a.start(60)
            core = a._core
            drop = behaviour.get(i)
            if drop is not None:
                sa = core.secagg
                assert sa is not None
                inner = sa.on_message

                def on_message(msg: Message, agent_id: str | None) -> list[Message]:
                    if (drop == "after-shares" and isinstance(msg, SecAggForward)) or (
                        drop == "after-masked" and isinstance(msg, SecAggUnmask)
                    ):
                        core.close()  # leaves: no masked input / no unmask shares
                        return []
                    out: list[Message] = inner(msg, agent_id)
                    return out

                sa.on_message = on_message
            try:
                while True:
                    gm = a.wait_for_global_model(90)
                    seen.setdefault(i, []).append(a.version)
                    a.send_trained_model({"w": gm["w"] + _update(i)}, _samples(i))
            except (FederationFinished, ConnectionClosed, FedstackError, TimeoutError):
                pass
            finally:
                a.close(5)

        threads = [threading.Thread(target=agent, args=(i,), daemon=True) for i in range(N)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 120
        while not agg.state.finished and time.monotonic() < deadline:
            time.sleep(0.05)
            if late_agent and len(threads) == N and agg.secagg is not None and agg.secagg.paused:
                time.sleep(0.5)  # paused: no new attempt until an agent joins
                seen["paused_attempts"] = agg.secagg.attempts
                late = threading.Thread(target=agent, args=(N,), daemon=True)
                late.start()
                threads.append(late)
        run_id = agg.run_id
        for t in threads:
            t.join(30)
    store = Store.open_readonly(cfg.db)
    return store, run_id, seen


def _fedavg(agents: list[int]) -> np.ndarray[Any, Any]:
    n = np.array([_samples(i) for i in agents], np.float64)
    ups = np.stack([_update(i).astype(np.float64) for i in agents])
    out: np.ndarray[Any, Any] = (n[:, None] * ups).sum(0) / n.sum()
    return out


def _bound(survivors: int, agents: list[int]) -> float:
    """Per coordinate: the library's bound on the weighted sum, over the total weight."""
    params = SecAggParams(clip=CLIP, quant_bits=BITS)
    weight = sum(min(_samples(i), params.max_weight) / params.max_weight for i in agents)
    return params.error_bound(survivors) / weight * 1.5 + 1e-6  # + the weight's own error


def _corr(a: np.ndarray[Any, Any], b: np.ndarray[Any, Any]) -> float:
    a = a.astype(np.float64) - a.mean()
    b = b.astype(np.float64) - b.mean()
    d = float(np.linalg.norm(a) * np.linalg.norm(b))
    return 0.0 if d == 0 else float(a @ b) / d


def _global(store: Store, run_id: str, version: int) -> np.ndarray[Any, Any]:
    gid = store.global_model_id(run_id, version)
    assert gid is not None
    return np.asarray(store.load_weights(gid)["w"], np.float64)


def _uploads(store: Store, run_id: str) -> list[dict[str, Any]]:
    """Every stored upload (not the first agent's initial model, not global models)."""
    return [m for m in store.models(run_id) if m["kind"] == "local" and m["status"] != "initial"]


def _events(store: Store, run_id: str, kind: str) -> list[dict[str, Any]]:
    return [e for e in store.events(run_id) if e["kind"] == kind]


def test_secure_round_is_weighted_fedavg_and_hides_every_update(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cap = Capture(monkeypatch)
    store, run_id, seen = _run(tmp_path, {})
    try:
        got = _global(store, run_id, 1)
        want = _fedavg(list(range(N)))
        err = float(np.max(np.abs(got - want)))
        assert err <= _bound(N, list(range(N))), err
        assert err > 0  # quantised: not a plain FedAvg of the raw updates
        rounds = store.rounds(run_id)
        assert len(rounds) == 1
        m = rounds[0]["metrics"]
        assert m["secagg_agents"] == N and m["secagg_dropped"] == 0
        ev = _events(store, run_id, "secagg_round")
        assert len(ev) == 1 and len(ev[0]["detail"]["agents"]) == N
        assert ev[0]["detail"]["dropped"] == []
        # lineage: the round's inputs are the N stored masked inputs
        parents = [p for p in store.parents(rounds[0]["model_id"]) if p["relation"] == "input"]
        assert len(parents) == N
        updates = [_update(i) for i in range(N)]
        # every stored upload (not the global models: the aggregate is the output)
        uploads = _uploads(store, run_id)
        assert len(uploads) >= N
        for rec in uploads:
            w = store.load_weights(rec["id"])
            assert set(w) == {SECAGG_MASKED}, set(w)
            vec = np.asarray(w[SECAGG_MASKED])
            assert vec.dtype == np.uint32 and vec.shape == (P + 1,)
            for u in updates:
                assert abs(_corr(vec[:P], u)) < 0.05
        # every message the aggregator received
        uploads_seen = 0
        with cap.lock:
            messages = list(cap.messages)
        for msg in messages:
            if isinstance(msg, ModelUpload):
                uploads_seen += 1
                for arr in msg.model.values():
                    assert np.asarray(arr).dtype == np.uint32
                    for u in updates:
                        assert abs(_corr(np.asarray(arr)[:P], u)) < 0.05
            for value in vars(msg).values():
                if isinstance(value, bytes):
                    for u in updates:
                        assert u.tobytes()[:64] not in value
        assert uploads_seen >= N
        # no plain upload was ever sent
        assert not any(isinstance(msg, ModelUpload) and "w" in msg.model for msg in messages)
        assert all(seen.get(i) for i in range(N))
    finally:
        store.close()


def test_dropouts_after_shares_and_after_masked_input(tmp_path: Path) -> None:
    behaviour = {1: "after-shares", 4: "after-shares", 7: "after-shares", 9: "after-masked"}
    store, run_id, _ = _run(tmp_path, behaviour)
    try:
        survivors = [i for i in range(N) if behaviour.get(i) != "after-shares"]
        got = _global(store, run_id, 1)
        want = _fedavg(survivors)
        err = float(np.max(np.abs(got - want)))
        assert err <= _bound(len(survivors), survivors), err
        ev = _events(store, run_id, "secagg_round")
        assert len(ev) == 1
        detail = ev[0]["detail"]
        assert len(detail["agents"]) == len(survivors) == 7
        assert len(detail["dropped"]) == 3
        m = store.rounds(run_id)[0]["metrics"]
        assert m["secagg_agents"] == 7 and m["secagg_dropped"] == 3
        assert not _events(store, run_id, "secagg_failed")
    finally:
        store.close()


def test_below_threshold_fails_cleanly_then_retries(tmp_path: Path) -> None:
    # 6 of 10 leave after the key exchange: 4 masked inputs < t = 5 of 9 holders
    behaviour = {i: "after-shares" for i in (0, 2, 3, 5, 6, 8)}
    store, run_id, _ = _run(tmp_path, behaviour, timeout=2.0)
    try:
        failed = _events(store, run_id, "secagg_failed")
        assert failed, "the first attempt must fail"
        assert failed[0]["detail"]["code"] == "secagg-too-few"
        first = failed[0]["detail"]["session"]
        # nothing partial: the failed attempt's masked inputs are never aggregated
        voided = [m for m in _uploads(store, run_id) if m["status"] != "aggregated"]
        assert len(voided) == 4 and all(m["status"] == "stale" for m in voided)
        # the retry (a new session, the same trained updates) made the round from the 4
        rounds = store.rounds(run_id)
        assert len(rounds) == 1
        assert rounds[0]["metrics"]["secagg_session"] != first
        survivors = [1, 4, 7, 9]
        got = _global(store, run_id, 1)
        err = float(np.max(np.abs(got - _fedavg(survivors))))
        assert err <= _bound(4, survivors), err
        parents = [p for p in store.parents(rounds[0]["model_id"]) if p["relation"] == "input"]
        assert {p["status"] for p in parents} == {"aggregated"} and len(parents) == 4
    finally:
        store.close()


def test_after_max_attempts_the_round_waits_for_a_join(tmp_path: Path) -> None:
    behaviour = {i: "after-shares" for i in (0, 2, 3, 5, 6, 8)}
    store, run_id, seen = _run(tmp_path, behaviour, timeout=1.0, max_attempts=1, late_agent=True)
    try:
        assert len(_events(store, run_id, "secagg_failed")) == 1
        assert seen["paused_attempts"] == 2  # the next attempt exists but was not started
        rounds = store.rounds(run_id)
        assert len(rounds) == 1 and rounds[0]["metrics"]["secagg_agents"] == 5
        survivors = [1, 4, 7, 9, N]
        err = float(np.max(np.abs(_global(store, run_id, 1) - _fedavg(survivors))))
        assert err <= _bound(5, survivors), err
    finally:
        store.close()


def test_secagg_refuses_a_strategy_that_needs_individual_updates(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="median"):
        from fedstack.aggregator import Aggregator

        Aggregator(
            AggregatorConfig(db=str(tmp_path / "m.db"), secagg=True, strategy="median", port=0)
        )
