"""Central DP through real aggregator runs: the stored epsilon is dp-accounting's own,
``fedstack db rounds`` and the dashboard show it, and the epsilon budget refuses a run at
start or ends it before the round that would exceed it (also after a restart)."""

from __future__ import annotations

import concurrent.futures
import json
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import dp_accounting
import numpy as np
import pytest
from dp_accounting.rdp import RdpAccountant

from fedstack import Agent, Store
from fedstack.cli.main import main as cli_main
from fedstack.errors import FederationFinished
from fedstack.testing import aggregator_thread, small_config

with warnings.catch_warnings():  # Starlette would rather have httpx2 (same API)
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

MODEL = {"w": np.zeros(16, np.float32)}
Z, Q, DELTA, CLIP = 1.1, 0.5, 1e-5, 0.5


def _library_epsilon(z: float, q: float, rounds: int, delta: float) -> float:
    """dp-accounting's own epsilon, computed here without fedstack."""
    accountant = RdpAccountant()
    accountant.compose(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), rounds
    )
    return float(accountant.get_epsilon(delta))


def _train(url: str, name: str, seed: int, max_versions: int = 10) -> list[int]:
    """An agent moving the model by a random step each round until the run ends (or it
    trained ``max_versions`` times: a run that does not end fails, it does not hang)."""
    rng = np.random.default_rng(seed)
    agent = Agent(url, name=name, token=f"token-of-{name}-0123456789")
    agent.send_initial_model(MODEL)
    agent.start(timeout=20)
    versions: list[int] = []
    try:
        while True:
            try:
                gm = agent.wait_for_global_model(timeout=30)
            except FederationFinished:
                return versions
            versions.append(agent.version)
            if len(versions) > max_versions:
                return versions
            step = rng.normal(size=16).astype(np.float32)
            agent.send_trained_model({"w": gm["w"] + step}, 10, {"loss": 1.0})
    finally:
        agent.close()


def _federation(url: str, agents: int = 2) -> list[list[int]]:
    with concurrent.futures.ThreadPoolExecutor(agents) as pool:
        futures = [pool.submit(_train, url, f"a{i}", i) for i in range(agents)]
        return [f.result(timeout=120) for f in futures]


def _rounds(db: Path) -> list[dict[str, Any]]:
    store = Store(str(db))
    try:
        (run,) = store.list_runs()
        return list(store.rounds(run["id"]))
    finally:
        store.close()


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    db = tmp_path_factory.mktemp("dp-run") / "agg.db"
    cfg = small_config(
        db,
        min_agents=2,
        rounds=3,
        dp="central",
        dp_noise_multiplier=Z,
        dp_clip=CLIP,
        dp_delta=DELTA,
        dp_sampling_rate=Q,
    )
    with aggregator_thread(cfg) as agg:
        _federation(agg.url)
        assert agg.state.finished and agg.state.version == 3
    return db


def test_stored_epsilon_is_the_accountant_librarys(dp_run: Path) -> None:
    rounds = _rounds(dp_run)
    assert [r["round"] for r in rounds] == [1, 2, 3]
    for r in rounds:
        m = r["metrics"]
        assert m["dp_epsilon"] == pytest.approx(
            _library_epsilon(Z, Q, r["round"], DELTA), rel=1e-12
        )
        assert m["dp_delta"] == DELTA and m["dp_clip"] == CLIP and m["num_updates"] == 2
        assert m["dp_noise_std"] == pytest.approx(Z * CLIP / 2)
    assert rounds[0]["metrics"]["dp_epsilon"] < rounds[2]["metrics"]["dp_epsilon"]


def test_db_rounds_shows_dp_epsilon(dp_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["db", "rounds", "--db", str(dp_run)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "dp_epsilon" in lines[0].split()
    at = lines[0].index("dp_epsilon")  # empty cells (accuracy: no evaluator) are blank
    shown = [float(line[at:].split()[0]) for line in lines[2:] if line.strip()]
    want = [_library_epsilon(Z, Q, n, DELTA) for n in (1, 2, 3)]
    assert shown == pytest.approx(want, rel=1e-3)
    assert cli_main(["db", "rounds", "--db", str(dp_run), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["dp_epsilon"] for r in rows] == pytest.approx(want, rel=1e-12)


def test_dashboard_shows_privacy_spent(dp_run: Path) -> None:
    from fedstack.dashboard import dashboard_middleware, dashboard_routes
    from fedstack.operator import create_app

    store = Store.open_readonly(str(dp_run))
    try:
        (run,) = store.list_runs()
        app = create_app(dashboard_routes(store), middleware=dashboard_middleware())
        with TestClient(app) as client:
            res = client.get(f"/runs/{run['id']}")
            series = client.get(f"/runs/{run['id']}/series").json()
    finally:
        store.close()
    assert res.status_code == 200
    html = res.text
    eps3 = _library_epsilon(Z, Q, 3, DELTA)
    assert 'id="privacy-spent"' in html and "privacy spent &epsilon; =" in html
    assert f'<span id="dp-epsilon">{eps3:.4g}</span>' in html
    assert '<span id="dp-delta">1e-05</span>' in html
    assert html.count('<td class="dp-epsilon">') == 3 and 'th class="dp-epsilon"' in html
    assert [r["dp_epsilon"] for r in series["rounds"]] == pytest.approx(
        [_library_epsilon(Z, Q, n, DELTA) for n in (1, 2, 3)]
    )


def test_a_run_over_budget_is_refused_at_start(tmp_path: Path) -> None:
    budget = 5.0
    fits = max(n for n in range(1, 40) if _library_epsilon(1.0, 1.0, n, DELTA) <= budget)
    args = ["aggregator", "--db", str(tmp_path / "agg.db"), "--port", "0", "--dp", "central"]
    args += ["--dp-noise-multiplier", "1.0", "--dp-clip", "1", "--dp-delta", str(DELTA)]
    args += ["--dp-epsilon-budget", str(budget)]
    # a process (with a timeout), so that an aggregator that wrongly starts fails the test
    proc = subprocess.run(
        [sys.executable, "-m", "fedstack", *args, "--rounds", str(fits + 1)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert f"at most {fits} rounds fit: use --rounds {fits}" in proc.stderr
    assert not (tmp_path / "agg.db").exists()  # refused before anything started


def test_the_budget_ends_the_run_before_exceeding_it_and_a_restart_keeps_counting(
    tmp_path: Path,
) -> None:
    z = 1.0
    eps = [_library_epsilon(z, 1.0, n, DELTA) for n in (1, 2, 3, 4)]
    budget = (eps[2] + eps[3]) / 2  # 3 rounds fit, the 4th would exceed it
    cfg = small_config(
        tmp_path / "agg.db",
        min_agents=2,
        dp="central",
        dp_noise_multiplier=z,
        dp_clip=CLIP,
        dp_delta=DELTA,
        dp_epsilon_budget=budget,
    )
    with aggregator_thread(cfg) as agg:
        versions = _federation(agg.url)
        assert agg.state.finished and agg.state.version == 3
    assert versions == [[0, 1, 2, 3], [0, 1, 2, 3]]  # final model received, clean exit
    rounds = _rounds(tmp_path / "agg.db")
    assert [r["metrics"]["dp_budget_exhausted"] for r in rounds] == [0, 0, 1]
    assert rounds[-1]["metrics"]["dp_epsilon"] == pytest.approx(eps[2]) and eps[2] <= budget
    # restarted: the stored rounds count, the run is over and no round is added
    with aggregator_thread(cfg) as agg:
        assert agg.state.finished and agg.state.version == 3
        assert _federation(agg.url, 1) == [[3]]
    assert len(_rounds(tmp_path / "agg.db")) == 3


def test_the_simulator_runs_central_dp(tmp_path: Path) -> None:
    from fedstack.errors import ConfigError
    from fedstack.sim import simulate

    options = {"dp": "central", "dp_noise_multiplier": Z, "dp_clip": CLIP, "dp_delta": DELTA}
    res = simulate(
        "fedstack.trainers.digits:DigitsLinearTrainer",
        {"epochs": 1},
        num_agents=4,
        rounds=2,
        db=str(tmp_path / "sim.db"),
        backend="inline",
        aggregator_options={**options, "dp_sampling_rate": 0.5},
    )
    eps = [h["metrics"]["dp_epsilon"] for h in res.history]
    assert eps == pytest.approx([_library_epsilon(Z, 0.5, n, DELTA) for n in (1, 2)])
    with pytest.raises(ConfigError, match="may not set min_agents"):
        simulate(
            "fedstack.trainers.digits:DigitsLinearTrainer",
            num_agents=2,
            rounds=1,
            db=str(tmp_path / "sim2.db"),
            aggregator_options={**options, "min_agents": 1},
        )
