"""`fedstack sim --aggregator-setting KEY=VALUE`: the simulator runs the privacy options of
the real aggregator (secure aggregation, central DP) from the command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fedstack.cli.main import main
from fedstack.store import Store


def _rounds(db: Path) -> list[dict[str, Any]]:
    store = Store.open_readonly(str(db))
    try:
        run = store.latest_run_id()
        assert run is not None
        return [r["metrics"] for r in store.rounds(run)]
    finally:
        store.close()


def test_sim_runs_secure_aggregation_and_central_dp(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["sim", "--agents", "4", "--rounds", "2", "--json"]
    secagg = tmp_path / "secagg.db"
    setting = ["--aggregator-setting", "secagg=true", "--aggregator-setting", "secagg_timeout=10"]
    assert main([*base, *setting, "--db", str(secagg)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rounds"] == 2
    assert [m["secagg_agents"] for m in _rounds(secagg)] == [4, 4]
    dp = tmp_path / "dp.db"
    settings = ["dp=central", "dp_noise_multiplier=1.0", "dp_clip=1.0", "dp_delta=1e-5"]
    args = [a for s in settings for a in ("--aggregator-setting", s)]
    assert main([*base, *args, "--db", str(dp)]) == 0
    eps = [m["dp_epsilon"] for m in _rounds(dp)]
    assert len(eps) == 2 and 0 < eps[0] < eps[1]


def test_sim_refuses_a_setting_it_owns(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code = main(
        ["sim", "--agents", "2", "--rounds", "1", "--aggregator-setting", "rounds=3",
         "--db", str(tmp_path / "x.db")]
    )  # fmt: skip
    assert code == 2
    assert "--aggregator-setting) may not set rounds" in capsys.readouterr().err
