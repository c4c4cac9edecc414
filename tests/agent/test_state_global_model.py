"""Book row 25: with a ``state_dir`` the agent keeps the last global model it received on
disk, atomically; restarted with no aggregator reachable it reports it (``Agent.saved_global``,
``fedstack agent-state``); a SIGKILL in the middle of writing leaves every file readable."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fedstack import Agent, AggregatorConfig, FederationFinished, Store
from fedstack.agent.state import GLOBAL, AgentStateDir, SavedGlobal, report_state
from fedstack.cli.main import main as fedstack_main
from fedstack.errors import StoreError
from fedstack.testing import aggregator_thread, free_port
from fedstack.wire import tensorfile

MODEL = {
    "layer.w": np.arange(12, dtype=np.float32).reshape(3, 4),
    "layer.b": np.zeros(3, np.float64),
    "steps": np.array(0, np.int64),
}


def test_the_last_global_model_is_kept_and_reported_without_an_aggregator(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "state"
    cfg = AggregatorConfig(
        host="127.0.0.1", port=0, db=str(tmp_path / "agg.db"), rounds=2, auth="off"
    )
    with aggregator_thread(cfg) as agg:
        agent = Agent(agg.url, name="keeper", token="keeper-token-0123456789", state_dir=state)
        agent.send_initial_model(MODEL)
        agent.start(timeout=20)
        try:
            while True:
                try:
                    gm = agent.wait_for_global_model(timeout=20)
                except FederationFinished:
                    break
                kept = agent.saved_global  # on disk before the trainer got it
                assert kept is not None and kept.version == agent.version
                for k in gm:
                    np.testing.assert_array_equal(kept.model[k], gm[k])
                trained = {k: v + 0.5 for k, v in gm.items()}
                trained["steps"] = gm["steps"] + 1
                agent.send_trained_model(trained, 10, {"loss": 1.0})
        finally:
            agent.close()
        run_id = agg.run_id
    store = Store(cfg.db)
    try:
        final_id = store.rounds(run_id)[-1]["model_id"]
        expected = store.load_weights(final_id)
    finally:
        store.close()

    # restarted with nothing listening: the agent still knows its last global model
    offline = Agent(f"ws://127.0.0.1:{free_port()}", name="keeper", state_dir=state)
    saved = offline.saved_global
    assert saved is not None
    assert (saved.version, saved.final, saved.run_id) == (2, True, run_id)
    assert list(saved.model) == list(MODEL)
    for k, v in expected.items():
        assert saved.model[k].dtype == v.dtype
        np.testing.assert_array_equal(saved.model[k], v)  # bit for bit the stored model

    out = tmp_path / "last.npz"
    assert fedstack_main(["agent-state", str(state), "--json", "--out", str(out)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["identity"]["name"] == "keeper" and report["identity"]["has_token"]
    assert "keeper-token" not in json.dumps(report)
    assert report["pending_upload"] is None  # the run is over: nothing pending, no error
    gm_report = report["global_model"]
    assert (gm_report["version"], gm_report["final"], gm_report["run_id"]) == (2, True, run_id)
    assert gm_report["tensors"]["layer.w"] == {"shape": [3, 4], "dtype": "float32"}
    with np.load(out, allow_pickle=False) as npz:
        for k, v in expected.items():
            np.testing.assert_array_equal(npz[k], v)
    assert fedstack_main(["agent-state", str(state)]) == 0
    text = capsys.readouterr().out
    assert "global model: version 2 (final)" in text and "layer.w: float32 (3, 4)" in text


WRITER = """
import sys, numpy as np
from fedstack.agent.state import AgentStateDir, SavedGlobal
disk = AgentStateDir(sys.argv[1], "writer")
v = int(sys.argv[2])
while True:
    v += 1
    model = {"w": np.full(1 << 23, v, np.float32), "b": np.full(7, -v, np.int64)}
    disk.save_global(SavedGlobal(
        version=v, run_id="r", aggregator_id="a", final=False, received=float(v), model=model
    ))
    disk.save_identity(version=v)
    print(v, flush=True)
"""
FULL = 4 << 23  # bytes of "w" alone: a complete file is larger


def _kill_while_writing(proc: subprocess.Popen[str], state: Path) -> None:
    """SIGKILL ``proc`` as soon as a write of the global model is seen in progress (a
    temporary file, or the file shorter than a whole model), after a first whole one."""
    final, whole = state / GLOBAL, False
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the writer died"
        names = os.listdir(state) if state.exists() else []
        writing = any(n.endswith(".tmp") and GLOBAL in n for n in names)
        try:
            size = final.stat().st_size
        except FileNotFoundError:
            size = -1
        if whole and (writing or 0 <= size < FULL):
            break
        whole = whole or size > FULL
    os.kill(proc.pid, signal.SIGKILL)


def test_sigkill_while_writing_leaves_the_files_readable(tmp_path: Path) -> None:
    """A process writing 32 MB global models (and its identity) is SIGKILLed in the middle
    of writing one: after every kill the directory reads back without the agent
    (``fedstack agent-state``'s reader), the global model whole (every array of one single
    version, its digest checked) and not older than the last one reported done; opening
    the directory removes what the interrupted write left."""
    state = tmp_path / "state"
    version, mid_write = 0, 0
    for _ in range(3):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(state), str(version)],
            stdout=subprocess.PIPE,
            text=True,
        )
        _kill_while_writing(proc, state)
        out, _ = proc.communicate()
        done = max([version, *(int(x) for x in out.split())])
        mid_write += any(p.name.endswith(".tmp") for p in state.iterdir())
        report, saved = report_state(state)
        assert saved is not None and report["global_model"]["version"] == saved.version
        assert saved.version >= done
        np.testing.assert_array_equal(saved.model["w"], np.full(1 << 23, saved.version, np.float32))
        np.testing.assert_array_equal(saved.model["b"], np.full(7, -saved.version, np.int64))
        assert report["identity"]["version"] >= done
        disk = AgentStateDir(state, "writer")  # opening it removes the leftovers
        assert not any(p.name.endswith(".tmp") for p in state.iterdir())
        assert disk.load_global() is not None
        version = saved.version
    assert mid_write >= 2, "the kills did not land in the middle of writes"


def test_a_damaged_global_model_file_is_reported_not_used(tmp_path: Path) -> None:
    disk = AgentStateDir(tmp_path, "a1")
    assert disk.load_global() is None
    disk.save_global(
        SavedGlobal(3, "r", "g", True, 1.0, {"w": np.ones(8, np.float32)}, {"c": np.zeros(2)})
    )
    saved = disk.load_global()
    assert saved is not None and saved.extra["c"].shape == (2,)
    data = bytearray((tmp_path / GLOBAL).read_bytes())
    data[-5] ^= 0xFF  # a flipped bit in the arrays
    (tmp_path / GLOBAL).write_bytes(bytes(data))
    with pytest.raises(StoreError, match="do not match their digest"):
        disk.load_global()
    plain = tensorfile.encode({"w": np.ones(8, np.float32)})
    (tmp_path / GLOBAL).write_bytes(b"".join(bytes(p) for p in plain))
    with pytest.raises(StoreError, match="not a global model file"):
        disk.load_global()
