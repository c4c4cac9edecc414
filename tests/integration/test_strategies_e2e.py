"""Every registered strategy runs end to end in a real federation, selected from config.

An aggregator (real sockets, SQLite store) and three agents that fit a small linear
regression each on their own data; each strategy is chosen by name with its parameters,
as a user would write them in the aggregator's config. Agents send the extra arrays the
strategy needs (SCAFFOLD control variates, FedCurv statistics) and the metrics it reads
(FedNova's local step count).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedstack import Agent, AggregatorConfig, FederationFinished, Store
from fedstack.strategies import names
from fedstack.testing import aggregator_thread

ROUNDS = 4
STEPS = 5
LR = 0.05
PARAMS: dict[str, dict[str, Any]] = {
    "fedprox": {"mu": 0.1},
    "krum": {"f": 0},
    "multikrum": {"f": 0},
    "bulyan": {"f": 0},
    "trimmed_mean": {"beta": 0.0},
    "normclip": {"bound": 10.0},
    "fedbuff": {"k": 2},
    "fedasync": {"alpha": 0.6},
    "fedadam": {"server_lr": 0.1},
    "fedyogi": {"server_lr": 0.1},
    "fedadagrad": {"server_lr": 1.0},
    "scaffold": {"num_agents": 3},
}

RNG = np.random.default_rng(0)
W_TRUE = np.array([1.0, -2.0, 0.5, 3.0], np.float32)
DATA = []
for k in range(3):
    x = RNG.normal(loc=0.5 * k, size=(40, 4)).astype(np.float32)
    DATA.append((x, x @ W_TRUE + 1.5))
X_ALL = np.concatenate([d[0] for d in DATA])
Y_ALL = np.concatenate([d[1] for d in DATA])


def loss(m: dict[str, np.ndarray]) -> float:
    return float(np.mean((X_ALL @ m["w"] + m["b"] - Y_ALL) ** 2))


def grads(m: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    r = x @ m["w"] + m["b"] - y
    return {"w": 2 * x.T @ r / len(y), "b": np.asarray(2 * r.mean())}


def agent_loop(url: str, k: int, strategy: str, out: dict[str, Any]) -> None:
    x, y = DATA[k]
    agent = Agent(url, name=f"agent-{k}")
    agent.send_initial_model({"w": np.zeros(4, np.float32), "b": np.zeros((), np.float64)})
    agent.start()
    c_i = {"w": np.zeros(4), "b": np.zeros(())}  # SCAFFOLD agent control variate
    sent = 0
    while True:
        try:
            gm = agent.wait_for_global_model(60)
        except FederationFinished:
            break
        m = {n: np.array(v, dtype=np.float64) for n, v in gm.items()}
        cfg = agent.federation_config
        extra_in = agent.global_extra
        mu = float(cfg.get("fedprox_mu", 0.0))
        steps = 1 if strategy == "fedsgd" else STEPS  # FedSGD: one gradient step
        for _ in range(steps):
            g = grads(m, x, y)
            for n in m:
                step = g[n] + mu * (m[n] - gm[n])
                if strategy == "scaffold":
                    step = step - c_i[n] + extra_in[f"c/{n}"]
                m[n] = m[n] - LR * step
        trained = {n: m[n].astype(gm[n].dtype) for n in m}
        extra: dict[str, np.ndarray] = {}
        if strategy == "scaffold":
            for n in m:  # option II of Karimireddy et al.
                new_c = c_i[n] - extra_in[f"c/{n}"] + (gm[n] - m[n]) / (steps * LR)
                extra[f"dc/{n}"] = (new_c - c_i[n]).astype(gm[n].dtype)
                c_i[n] = new_c
        if strategy == "fedcurv":
            for n in m:
                fisher = np.full(np.shape(gm[n]), 0.5, dtype=gm[n].dtype)
                extra[f"u/{n}"] = fisher
                extra[f"v/{n}"] = (fisher * trained[n]).astype(gm[n].dtype)
        metrics = {"local_steps": steps, "train_loss": loss(trained)}
        if agent.send_trained_model(trained, len(y), metrics, extra=extra or None):
            sent += 1
    agent.close()
    out[f"agent-{k}"] = {"sent": sent, "config": dict(agent.federation_config)}


# ckks-fedavg sums CKKS ciphertexts of agents holding the key (a plain float model is not
# one): tests/privacy/test_ckks_federation.py runs it end to end with encrypting agents
PLAIN_STRATEGIES = [n for n in names() if n != "ckks-fedavg"]


@pytest.mark.parametrize("transport", ["tcp", "inproc"])
@pytest.mark.parametrize("strategy", PLAIN_STRATEGIES)
def test_strategy_end_to_end(tmp_path: Path, strategy: str, transport: str) -> None:
    """Over WebSockets, and over the in-process transport (the simulator's), where uploads
    reach the strategy as read-only views of the agent's own arrays."""
    cfg = AggregatorConfig(
        port=0,
        db=str(tmp_path / "f.db"),
        rounds=ROUNDS,
        min_agents=3,
        threshold=1.0,
        strategy=strategy,
        strategy_params=PARAMS.get(strategy, {}),
        finish_grace=5,
        round_timeout=20,
        auth="off",
        transport=transport,
    )
    out: dict[str, Any] = {}
    with aggregator_thread(cfg) as agg:
        url = f"ws://127.0.0.1:{agg.port}" if transport == "tcp" else agg.url
        threads = [
            threading.Thread(target=agent_loop, args=(url, k, strategy, out)) for k in range(3)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not any(t.is_alive() for t in threads)
        run_id = agg.run_id
        assert agg.strategy.name == strategy
    assert len(out) == 3
    if strategy in ("fedasync", "fedbuff"):
        # asynchronous: fast agents may fill every round before a slow one's first upload
        # (it then gets the final model and has nothing left to send)
        per_round = PARAMS[strategy].get("k", 1)
        assert sum(v["sent"] for v in out.values()) >= ROUNDS * per_round
    else:
        assert all(v["sent"] >= 1 for v in out.values())
    store = Store(str(tmp_path / "f.db"))
    rounds = store.rounds(run_id)
    assert [r["round"] for r in rounds] == list(range(1, ROUNDS + 1))
    initial = store.load_weights(store.global_model_id(run_id, 0) or "")
    final = store.load_weights(rounds[-1]["model_id"])
    assert final["w"].dtype == np.float32 and final["b"].dtype == np.float64
    assert final["b"].shape == ()
    assert all(np.isfinite(v).all() for v in final.values())
    assert loss(final) < 0.8 * loss(initial), (strategy, loss(initial), loss(final))
    if strategy == "fedprox":
        assert out["agent-0"]["config"]["fedprox_mu"] == 0.1
    store.close()
