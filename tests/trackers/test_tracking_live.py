"""``fedstack aggregator --track``: each committed round reaches MLflow and TensorBoard while
the run goes on, with the same values as the store; a failing or stuck tracker never
fails or holds a round."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("mlflow")
pytest.importorskip("tensorboard")

from tracker_readback import (
    ODD_KEY,
    as_float32,
    evaluate,
    federation,
    mlflow_series,
    store_series,
    tensorboard_series,
)

from fedstack.cli.aggregator import parse_aggregator_args
from fedstack.cli.main import main as cli_main
from fedstack.testing import aggregator_thread, free_port
from fedstack.trackers.base import safe_key
from fedstack.trackers.tensorboard_tracker import TensorBoardTracker

ROUNDS = 3


def _until(check: object, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():  # type: ignore[operator]
                return
        except Exception:  # not there yet (a directory, a run, a key)
            pass
        time.sleep(0.05)
    raise AssertionError("timed out")


def _tags(series: dict[str, dict[int, float]]) -> dict[str, dict[int, float]]:
    """TensorBoard tags: the store's names, unprintable characters replaced."""
    return {"".join(c if c.isprintable() else "_" for c in k): v for k, v in series.items()}


def _live(uri: str, run_id: str, run_dir: Path) -> None:
    """Rounds 1 and 2, with their evaluations, reach both trackers (while the agents are
    held before round 3)."""

    def live() -> bool:
        _, ml, _ = mlflow_series(uri, run_id)
        board = tensorboard_series(run_dir)
        return all(
            set(s.get("eval_loss", {})) == {1, 2} and set(s["num_updates"]) == {1, 2}
            for s in (ml, board)
        )

    _until(live)


def _args(tmp_path: Path, *track: str) -> list[str]:
    args = ["--port", "0", "--db", str(tmp_path / "f.db"), "--rounds", str(ROUNDS)]
    args += ["--min-agents", "2", "--auth", "off", "--finish-grace", "2"]
    for t in track:
        args += ["--track", t]
    return args


def test_each_round_reaches_mlflow_and_tensorboard_live_as_the_store_has_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    uri = (tmp_path / "mlruns").as_uri()
    tb = tmp_path / "tb"
    cfg = parse_aggregator_args(_args(tmp_path, f"mlflow:{uri}", f"tensorboard:{tb}"))
    assert cfg.track == (f"mlflow:{uri}", f"tensorboard:{tb}")
    hold = threading.Event()
    run_dir = Path()
    with aggregator_thread(cfg, evaluator=evaluate) as agg:
        threads = federation(f"ws://127.0.0.1:{agg.port}", hold=hold, hold_before=2)
        try:
            run_id = agg.run_id
            run_dir = tb / f"default-{run_id[:8]}"
            _live(uri, run_id, run_dir)
            assert agg.state.version == 2
        finally:
            hold.set()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads)
        _until(lambda: set(tensorboard_series(run_dir).get("eval_loss", {})) == {1, 2, 3})
    run, agents = store_series(tmp_path / "f.db", run_id)
    assert set(run["num_updates"]) == {1, 2, 3} and set(run["eval_loss"]) == {1, 2, 3}
    assert "eval_note" not in run and "mean_train_loss" in run
    assert set(agents) == {"agent-0", "agent-1"}

    parent, ml_run, ml_agents = mlflow_series(uri, run_id)
    assert parent.info.status == "FINISHED" and parent.info.run_name == "default"
    assert parent.data.tags["fedstack.last_round"] == "3"
    params = parent.data.params
    assert params["strategy"] == "fedavg" and params["strategy_params"] == "{}"
    assert params["rounds"] == "3" and "track" not in params and "db" not in params
    assert ml_run == {safe_key(k): v for k, v in run.items()}
    assert "mean_" + safe_key(ODD_KEY) in ml_run  # an agent's key, made safe
    assert ml_agents == {
        name: {safe_key(k): v for k, v in series.items()} for name, series in agents.items()
    }
    assert safe_key(ODD_KEY) in ml_agents["agent-1"]
    # exporting the run followed live finds it complete in the same MLflow run
    db = str(tmp_path / "f.db")
    assert cli_main(["db", "export", "--db", db, "--to", "mlflow", "--uri", uri]) == 0
    assert "mlflow already holds run default up to round 3" in capsys.readouterr().out
    assert mlflow_series(uri, run_id)[1] == ml_run

    assert tensorboard_series(run_dir) == as_float32(_tags(run))
    for name, series in agents.items():
        assert tensorboard_series(run_dir / "agents" / name) == as_float32(_tags(series))


def test_a_restarted_aggregator_carries_on_in_the_same_mlflow_run_and_event_files(
    tmp_path: Path,
) -> None:
    uri = (tmp_path / "mlruns").as_uri()
    tb = tmp_path / "tb"
    args = _args(tmp_path, f"mlflow:{uri}", f"tensorboard:{tb}")
    cfg = parse_aggregator_args([*args, "--port", str(free_port())])  # agents reconnect there
    hold = threading.Event()
    try:
        with aggregator_thread(cfg, evaluator=evaluate) as agg:
            threads = federation(agg.url, hold=hold, hold_before=2)
            run_id = agg.run_id
            run_dir = tb / f"default-{run_id[:8]}"
            _live(uri, run_id, run_dir)
        # stopped after round 2: the run resumes, and so do its trackers
        with aggregator_thread(cfg, evaluator=evaluate) as agg:
            assert agg.run_id == run_id and agg.state.version == 2
            hold.set()
            for t in threads:
                t.join(60)
            assert not any(t.is_alive() for t in threads)
            _until(lambda: set(tensorboard_series(run_dir)["eval_loss"]) == {1, 2, 3})
    finally:
        hold.set()
    run, agents = store_series(tmp_path / "f.db", run_id)
    assert set(run["num_updates"]) == {1, 2, 3}
    parent, ml_run, ml_agents = mlflow_series(uri, run_id)  # one MLflow run, no step twice
    assert parent.info.status == "FINISHED"
    assert ml_run == {safe_key(k): v for k, v in run.items()}
    assert set(ml_agents) == set(agents)  # one nested run per agent, as before the restart
    assert ml_agents["agent-0"]["num_samples"] == agents["agent-0"]["num_samples"]
    assert tensorboard_series(run_dir) == as_float32(_tags(run))
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 2  # one file per aggregator


def test_a_round_is_logged_when_committed_without_an_evaluator(tmp_path: Path) -> None:
    tb = tmp_path / "tb"
    hold = threading.Event()
    cfg = parse_aggregator_args(_args(tmp_path, f"tensorboard:{tb}"))
    with aggregator_thread(cfg) as agg:
        threads = federation(f"ws://127.0.0.1:{agg.port}", hold=hold, hold_before=1)
        try:
            run_dir = tb / f"default-{agg.run_id[:8]}"
            _until(lambda: set(tensorboard_series(run_dir)["num_updates"]) == {1})
            assert agg.state.version == 1  # the agents wait: round 2 is not there yet
        finally:
            hold.set()
        for t in threads:
            t.join(60)
    assert set(tensorboard_series(run_dir)["mean_train_loss"]) == {1, 2, 3}


def test_a_failing_tracker_is_logged_once_and_disabled_and_the_rounds_go_on(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("x")  # TensorBoard cannot make its run directory under a file
    tb = tmp_path / "tb"
    real_write = TensorBoardTracker.write

    def write_failing_at_round_2(
        self: TensorBoardTracker, round: int, *a: object, **kw: object
    ) -> None:
        if round == 2:
            raise OSError(28, "No space left on device")
        real_write(self, round, *a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(TensorBoardTracker, "write", write_failing_at_round_2)
    cfg = parse_aggregator_args(
        _args(tmp_path, f"tensorboard:{blocker / 'tb'}", f"tensorboard:{tb}")
    )
    caplog.set_level(logging.INFO, logger="fedstack")
    with aggregator_thread(cfg, evaluator=evaluate) as agg:
        threads = federation(f"ws://127.0.0.1:{agg.port}")
        for t in threads:
            t.join(60)
        run_id = agg.run_id
    assert not any(t.is_alive() for t in threads)
    run, agents = store_series(tmp_path / "f.db", run_id)
    assert set(run["num_updates"]) == {1, 2, 3}  # every round committed
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 2, [r.getMessage() for r in errors]  # once per tracker
    assert f"tensorboard:{blocker / 'tb'}" in errors[0].getMessage()
    assert "No space left on device" in errors[1].getMessage()
    # the second tracker wrote round 1 and nothing after its failure
    run_dir = tb / f"default-{run_id[:8]}"
    assert set(tensorboard_series(run_dir)["num_updates"]) == {1}
    # as the log says, `fedstack db export` fills in what it lacks
    monkeypatch.setattr(TensorBoardTracker, "write", real_write)
    db = str(tmp_path / "f.db")
    assert cli_main(["db", "export", "--db", db, "--to", "tensorboard", "--uri", str(tb)]) == 0
    assert "exported 2 round(s) of run default" in capsys.readouterr().out
    assert tensorboard_series(run_dir) == as_float32(_tags(run))
    for name, series in agents.items():
        assert tensorboard_series(run_dir / "agents" / name) == as_float32(_tags(series))


def test_a_stuck_tracker_does_not_hold_the_rounds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = threading.Event()
    real_write = TensorBoardTracker.write

    def stuck(self: TensorBoardTracker, *a: object, **kw: object) -> None:
        release.wait(30)  # a tracker server that does not answer
        real_write(self, *a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(TensorBoardTracker, "write", stuck)
    tb = tmp_path / "tb"
    cfg = parse_aggregator_args(_args(tmp_path, f"tensorboard:{tb}"))
    with aggregator_thread(cfg, evaluator=evaluate) as agg:
        threads = federation(f"ws://127.0.0.1:{agg.port}")
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads)
        assert agg.state.version == ROUNDS  # all rounds done while the tracker is stuck
        run_id = agg.run_id
        _until(lambda: set(store_series(tmp_path / "f.db", run_id)[0]["eval_loss"]) == {1, 2, 3})
        release.set()
    # released before the aggregator stopped: it wrote what was pending
    board = tensorboard_series(tb / f"default-{run_id[:8]}")
    assert set(board["num_updates"]) == {1, 2, 3}
    assert set(board["eval_loss"]) == {1, 2, 3}
