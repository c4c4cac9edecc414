"""The simulator runs the real aggregator and agents: results land in the same store,
sampling is honest, per-agent state survives between rounds, backends and transports
agree bit for bit on a deterministic task."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedstack.cli.main import main as cli_main
from fedstack.errors import ConfigError
from fedstack.sim import SimError, simulate
from fedstack.store import Store

from . import stateless

FORGETFUL = f"{stateless.__name__}:ForgetfulDigits"
FAILING = f"{stateless.__name__}:FailingTrainer"

SYNTH = "fedstack.trainers.synthetic:SyntheticTrainer"
DIGITS = "fedstack.trainers.digits:DigitsLinearTrainer"
EXACT = {"precision": "float64"}  # order-independent sums: arrival order cannot matter


def _inputs_per_round(db: Path, run_id: str) -> dict[int, list[str]]:
    store = Store(str(db))
    try:
        out: dict[int, list[str]] = {}
        for m in store.models(run_id, kind="cluster"):
            if m["round"] == 0:
                continue
            parents = store.parents(m["id"])
            out[m["round"]] = [p["agent"] for p in parents if p["relation"] == "input"]
        return out
    finally:
        store.close()


def test_ten_thousand_agents_one_hundred_per_round(tmp_path: Path) -> None:
    db = tmp_path / "sim.db"
    res = simulate(
        SYNTH,
        {"max_samples": 60, "data": "iid", "lr": 0.1},
        num_agents=10_000,
        per_round=100,
        rounds=10,
        db=str(db),
        workers=0,
        seed=3,
    )
    assert res.rounds == 10
    assert [r["round"] for r in res.history] == list(range(1, 11))
    assert all(r["metrics"]["num_updates"] == 100 for r in res.history)
    assert res.fits == 1000
    # sampling without replacement within a round, seeded across rounds: ~951 distinct
    assert 900 <= res.agents_trained <= 1000
    store = Store(str(db))
    try:
        agents = {a["name"] for a in store.list_agents()}
        events = Counter(e["kind"] for e in store.events(res.run_id))
    finally:
        store.close()
    assert len(agents) == res.agents_trained
    assert all(name.startswith("sim-") and len(name) == 8 for name in agents)
    assert events["joined"] == 1000 and events["left"] == 1000
    # the training loss falls as the global model improves
    losses = [r["metrics"]["mean_train_loss"] for r in res.history]
    assert losses[-1] < losses[0]


def test_results_are_in_the_store_for_fedstack_db(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "sim.db"
    res = simulate(
        DIGITS,
        {"partition": "dirichlet:0.5"},
        num_agents=6,
        per_round=3,
        rounds=4,
        evaluator="fedstack.trainers.digits:evaluate_global",
        db=str(db),
        workers=0,
    )
    capsys.readouterr()
    assert cli_main(["db", "rounds", "--db", str(db), "--run", res.run_id, "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]
    rows = rows[0] if len(rows) == 1 and isinstance(rows[0], list) else rows
    assert [r["round"] for r in rows] == [1, 2, 3, 4]
    assert all("eval_accuracy" in r["metrics"] for r in rows)
    assert res.final_metrics["eval_accuracy"] == rows[-1]["metrics"]["eval_accuracy"]
    assert float(res.final_metrics["eval_accuracy"]) > 0.5
    # and the plots work on it unchanged
    png = tmp_path / "rounds.png"
    assert cli_main(["db", "plot", "--db", str(db), "--run", res.run_id, "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    # the lineage: every cluster model made from exactly the 3 agents sampled that round
    per_round = _inputs_per_round(db, res.run_id)
    assert sorted(per_round) == [1, 2, 3, 4]
    assert all(len(set(v)) == 3 for v in per_round.values())


def _final(**kw: Any) -> dict[str, np.ndarray]:
    res = simulate(
        DIGITS,
        {"partition": "dirichlet:0.5", "epochs": 2},
        num_agents=8,
        rounds=3,
        strategy_params=EXACT,
        **kw,
    )
    return res.final_weights


def test_backends_and_transports_agree_bit_for_bit(tmp_path: Path) -> None:
    inline = _final(db=str(tmp_path / "a.db"), workers=0)
    pooled = _final(db=str(tmp_path / "b.db"), workers=2)
    sockets = _final(db=str(tmp_path / "c.db"), workers=0, transport="loopback")
    polled = _final(db=str(tmp_path / "d.db"), workers=0, delivery="poll")
    for other in (pooled, sockets, polled):
        assert set(other) == set(inline)
        for k in inline:
            np.testing.assert_array_equal(other[k], inline[k])


def test_per_agent_state_is_kept_between_rounds(tmp_path: Path) -> None:
    """The digits trainer's minibatch generator advances between fits; with 2 workers an
    agent's later fits must continue its own stream (the simulator carries the state),
    which the inline run does by construction. Without it, sampled agents would restart
    their stream each time they are picked."""
    kw: dict[str, Any] = dict(num_agents=12, per_round=4, rounds=6, strategy_params=EXACT, seed=5)
    a = simulate(DIGITS, {"partition": "iid"}, db=str(tmp_path / "a.db"), workers=0, **kw)
    b = simulate(DIGITS, {"partition": "iid"}, db=str(tmp_path / "b.db"), workers=2, **kw)
    for k in a.final_weights:
        np.testing.assert_array_equal(a.final_weights[k], b.final_weights[k])
    # and the state matters: the same run with every agent's generator reset differs
    c = simulate(FORGETFUL, {"partition": "iid"}, db=str(tmp_path / "c.db"), workers=0, **kw)
    assert any(not np.array_equal(a.final_weights[k], c.final_weights[k]) for k in a.final_weights)


def test_a_failing_trainer_stops_the_simulation_with_its_error(tmp_path: Path) -> None:
    with pytest.raises(SimError, match="boom in fit"):
        simulate(
            FAILING,
            {},
            num_agents=4,
            per_round=2,
            rounds=3,
            db=str(tmp_path / "f.db"),
            workers=0,
            round_timeout=30,
        )
    with pytest.raises(SimError, match="boom in fit"):
        simulate(
            FAILING,
            {},
            num_agents=3,
            rounds=3,
            db=str(tmp_path / "g.db"),
            workers=0,
            round_timeout=30,
        )


def test_bad_arguments_are_config_errors(tmp_path: Path) -> None:
    db = str(tmp_path / "x.db")
    with pytest.raises(ConfigError, match="per_round"):
        simulate(DIGITS, num_agents=3, per_round=4, rounds=1, db=db)
    with pytest.raises(ConfigError, match="fraction"):
        simulate(DIGITS, num_agents=3, fraction=1.5, rounds=1, db=db)
    with pytest.raises(ConfigError, match="transport"):
        simulate(DIGITS, num_agents=3, rounds=1, db=db, transport="carrier-pigeon")
    with pytest.raises(ConfigError, match="backend"):
        simulate(DIGITS, num_agents=3, rounds=1, db=db, backend="cloud")


def test_sim_cli_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "cli.db"
    rc = cli_main(
        [
            "sim",
            "--agents",
            "200",
            "--fraction",
            "0.05",
            "--rounds",
            "3",
            "--trainer",
            SYNTH,
            "--trainer-arg",
            "max_samples=40",
            "--workers",
            "0",
            "--db",
            str(db),
            "--json",
        ]
    )
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["rounds"] == 3 and out["fits"] == 30 and len(out["round_seconds"]) == 3
    assert out["db"] == str(db) and db.exists()


def test_a_strategy_that_can_never_aggregate_is_a_config_error(tmp_path: Path) -> None:
    """Bulyan (f=1) needs 4f+3 = 7 updates; FedBuff aggregates every 10: with 6 agents a
    round would wait forever, so the simulator refuses the configuration at once."""
    with pytest.raises(ConfigError, match="needs at least 7 updates.*6 agents train"):
        simulate(
            SYNTH,
            {"max_samples": 50},
            num_agents=6,
            rounds=2,
            strategy="bulyan",
            db=str(tmp_path / "a.db"),
            workers=0,
        )
    with pytest.raises(ConfigError, match="aggregates every 10 updates.*sample at least 10"):
        simulate(
            SYNTH,
            {"max_samples": 50},
            num_agents=12,
            per_round=6,
            rounds=2,
            strategy="fedbuff",
            db=str(tmp_path / "b.db"),
            workers=0,
        )


@pytest.mark.parametrize("per_round", [4, 2])  # agents kept connected / sampled per round
def test_a_refused_upload_stops_the_simulation_with_the_aggregators_reason(
    tmp_path: Path, per_round: int
) -> None:
    """FedNova needs each update's local step count; a trainer that does not report it is
    refused by the aggregator. The simulation stops with that reason right away instead
    of waiting out the round timeout."""
    import time

    t = time.monotonic()
    with pytest.raises(SimError, match="refused sim-.*local_steps"):
        simulate(
            SYNTH,
            {"max_samples": 50},
            num_agents=4,
            per_round=per_round,
            rounds=2,
            strategy="fednova",
            db=str(tmp_path / "a.db"),
            workers=0,
            round_timeout=120,
        )
    assert time.monotonic() - t < 15  # not the 120 s round timeout
