"""``--track mlflow:http://...``: a real MLflow tracking server (``mlflow server`` on
127.0.0.1, started and stopped here) receives each round live, over MLflow's REST client,
with the store's values; ``fedstack db export`` to it then finds the run complete."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("mlflow")
pytest.importorskip("flask")  # the server's own dependencies: the full `mlflow` package

from tracker_readback import federation, mlflow_series, store_series

from fedstack.cli.aggregator import parse_aggregator_args
from fedstack.cli.main import main as cli_main
from fedstack.testing import aggregator_thread, free_port
from fedstack.trackers.base import safe_key


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[str]:
    """``mlflow server`` on 127.0.0.1 with a file store under ``tmp_path``; its URL."""
    port = free_port()
    log = (tmp_path / "mlflow-server.log").open("wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            (tmp_path / "server-store").as_uri(),
            "--default-artifact-root",
            str(tmp_path / "server-artifacts"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "MLFLOW_ALLOW_FILE_STORE": "true"},
        start_new_session=True,  # its workers too are stopped below, by group
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None, (tmp_path / "mlflow-server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "mlflow server did not start"
            time.sleep(0.2)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        log.close()


def test_rounds_reach_an_mlflow_server_live_as_the_store_has_them(
    mlflow_server: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "f.db"
    cfg = parse_aggregator_args(
        ["--port", "0", "--db", str(db), "--rounds", "2", "--min-agents", "2"]
        + ["--auth", "off", "--finish-grace", "2", "--track", f"mlflow:{mlflow_server}"]
    )
    with aggregator_thread(cfg) as agg:
        threads = federation(f"ws://127.0.0.1:{agg.port}")
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads)
        run_id = agg.run_id
    run, agents = store_series(db, run_id)
    assert set(run["num_updates"]) == {1, 2}
    parent, ml_run, ml_agents = mlflow_series(mlflow_server, run_id)
    assert parent.info.status == "FINISHED"
    assert ml_run == {safe_key(k): v for k, v in run.items()}
    assert ml_agents == {
        name: {safe_key(k): v for k, v in series.items()} for name, series in agents.items()
    }
    capsys.readouterr()
    argv = ["db", "export", "--db", str(db), "--to", "mlflow", "--uri", mlflow_server, "--json"]
    assert cli_main(argv) == 0
    out = capsys.readouterr().out
    assert '"rounds":0' in out.replace(" ", "") and "View run" not in out  # JSON only
