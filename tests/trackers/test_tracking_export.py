"""``fedstack db export --to mlflow|tensorboard --run RUN [--uri URI]``: a past run reads
back from MLflow (its client) and TensorBoard (its event reader) with the store's values,
round by round and agent by agent; exporting again logs nothing twice."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("mlflow")
pytest.importorskip("tensorboard")

from tracker_readback import as_float32, mlflow_series, store_series, tensorboard_series

from fedstack import Store
from fedstack.cli.main import main as cli_main
from fedstack.sim.engine import simulate
from fedstack.testing import free_port
from fedstack.trackers.base import safe_key

DIGITS = "fedstack.trainers.digits:DigitsLinearTrainer"


@pytest.fixture(scope="module")
def past_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A finished run of 5 agents (3 sampled per round), evaluated centrally."""
    db = tmp_path_factory.mktemp("export") / "sim.db"
    res = simulate(
        DIGITS,
        {"partition": "dirichlet:0.5"},
        num_agents=5,
        per_round=3,
        rounds=3,
        evaluator="fedstack.trainers.digits:evaluate_global",
        db=str(db),
        run_name="digits-sim",
        workers=0,
    )
    return db, res.run_id


def _export(db: Path, *args: str) -> int:
    return cli_main(["db", "export", "--db", str(db), *args])


def test_a_past_run_exported_to_mlflow_reads_back_as_the_store_has_it(
    past_run: tuple[Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db, run_id = past_run
    mlruns = tmp_path / "mlruns"  # a directory: MLflow's file store
    assert _export(db, "--run", run_id[:8], "--to", "mlflow", "--uri", str(mlruns)) == 0
    out = capsys.readouterr().out
    assert "exported 3 round(s) of run digits-sim" in out
    run, agents = store_series(db, run_id)
    assert set(run["eval_accuracy"]) == {1, 2, 3} and len(agents) == 5
    assert sum(len(s["num_samples"]) for s in agents.values()) == 9  # 3 of 5 per round

    parent, ml_run, ml_agents = mlflow_series(mlruns.as_uri(), run_id)
    assert parent.info.run_name == "digits-sim" and parent.info.status == "FINISHED"
    assert ml_run == {safe_key(k): v for k, v in run.items()}
    assert ml_agents == agents  # agents' keys here are safe already (train_loss, ...)

    # again, by run name, as JSON: nothing new, nothing logged twice (mlflow_series checks)
    uri = mlruns.as_uri()
    assert _export(db, "--run", "digits-sim", "--to", "mlflow", "--uri", uri, "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rounds"] == 0 and report["last_round"] == 3 and report["run"] == run_id
    assert report["values_added"] == 0
    assert mlflow_series(uri, run_id)[1] == ml_run
    # a metric stored after the export (an evaluation that came late) is added, alone
    store = Store(str(db))
    try:
        store.update_round_metrics(run_id, 2, {"eval_late": 0.5})
    finally:
        store.close()
    assert _export(db, "--run", "digits-sim", "--to", "mlflow", "--uri", uri) == 0
    assert "exported 0 round(s) of run digits-sim (" in capsys.readouterr().out
    assert mlflow_series(uri, run_id)[1] == {**ml_run, "eval_late": {2: 0.5}}
    assert store_series(db, run_id)[0]["eval_late"] == {2: 0.5}


def test_a_past_run_exported_to_tensorboard_reads_back_as_the_store_has_it(
    past_run: tuple[Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db, run_id = past_run
    tb = tmp_path / "tb"
    assert _export(db, "--to", "tensorboard", "--uri", str(tb)) == 0  # the latest run
    assert "exported 3 round(s)" in capsys.readouterr().out
    run, agents = store_series(db, run_id)
    run_dir = tb / f"digits-sim-{run_id[:8]}"
    assert tensorboard_series(run_dir) == as_float32(run)
    assert sorted(p.name for p in (run_dir / "agents").iterdir()) == sorted(agents)
    for name, series in agents.items():
        assert tensorboard_series(run_dir / "agents" / name) == as_float32(series)
    assert _export(db, "--to", "tensorboard", "--uri", str(tb)) == 0
    assert "already holds run digits-sim up to round 3" in capsys.readouterr().out
    assert tensorboard_series(run_dir) == as_float32(run)  # (no step twice: checked)


def test_export_refuses_what_it_cannot_do(
    past_run: tuple[Path, str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    db, run_id = past_run
    assert _export(db, "--run", run_id) == 2
    assert "--to mlflow or --to tensorboard" in capsys.readouterr().err
    assert _export(db, "abc123", "--to", "mlflow") == 2
    assert "not a model" in capsys.readouterr().err
    assert _export(db, "--run", "nope", "--to", "tensorboard", "--uri", str(tmp_path)) == 2
    assert "no run 'nope'" in capsys.readouterr().err
    assert _export(db, "--to", "wandb") == 2
    # the extra not installed: the error names it
    for name in [m for m in sys.modules if m == "mlflow" or m.startswith("mlflow.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "mlflow", None)
    assert _export(db, "--to", "mlflow", "--uri", str(tmp_path / "m")) == 2
    assert "pip install 'fedstack[mlflow]'" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_an_unreachable_server_is_an_error_that_never_shows_its_password(
    past_run: tuple[Path, str],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    db, _ = past_run
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    uri = f"http://operator:s3cr3t-pw@127.0.0.1:{free_port()}"  # nothing listens there
    assert _export(db, "--to", "mlflow", "--uri", uri) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedstack: error: mlflow:http://operator:***@127.0.0.1:"), err
    assert "s3cr3t-pw" not in err and "Traceback" not in err
