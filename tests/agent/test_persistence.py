"""The agent's state directory: identity and pending upload survive SIGKILL; SIGTERM is a
clean leave (bye) with exit code 0."""

from __future__ import annotations

import json
import logging
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedstack import Agent, AggregatorConfig, Store
from fedstack.agent.state import AgentStateDir
from fedstack.errors import ConfigError
from fedstack.testing import aggregator_thread
from fedstack.wire import ModelUpload

HERE = Path(__file__).parent
SCRIPT = HERE / "persist_agent_proc.py"
ENV = dict(
    os.environ,
    PYTHONUNBUFFERED="1",
    PYTHONPATH=os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")])),
)


def wait_until(cond: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def config(tmp_path: Path, **kw: Any) -> AggregatorConfig:
    cfg = AggregatorConfig(port=0, db=str(tmp_path / "f.db"), finish_grace=2, **kw)
    if hasattr(cfg, "auth"):  # credentials are not what these tests are about
        cfg = cfg.replace(auth="off")
    return cfg


def upload(uid: str = "u1", base: int = 0, extra: bool = True) -> ModelUpload:
    return ModelUpload(
        upload_id=uid,
        base_version=base,
        num_samples=7,
        metrics={"acc": 0.5, "tag": "x"},
        model={
            "w": np.arange(12, dtype=np.float32).reshape(4, 3),
            "layer.0/b[1]": np.array(3.0, np.float64),
        },
        extra={"c": np.ones(5, np.int64)} if extra else None,
    )


def files(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


class HoldingStore(Store):
    """Holds the first upload (the aggregator's ack waits) until ``release`` is set."""

    def __init__(self, db: str) -> None:
        super().__init__(db)
        self.entered = threading.Event()
        self.release = threading.Event()

    def _hold(self) -> None:
        if not self.entered.is_set():
            self.entered.set()
            self.release.wait(30)

    def add_upload(self, *args: Any, **kwargs: Any) -> Any:
        self._hold()
        return super().add_upload(*args, **kwargs)

    def add_uploads(self, *args: Any, **kwargs: Any) -> Any:  # the aggregator's group commit
        self._hold()
        return super().add_uploads(*args, **kwargs)


# ---------------------------------------------------------------------- files
def test_pending_round_trip_atomic_files_and_modes(tmp_path: Path) -> None:
    d = tmp_path / "state"
    disk = AgentStateDir(d, "a1", token="secret-token")
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    assert files(d) == ["identity.json"]
    disk.save_pending(upload(), "run-1")
    disk.save_identity(agent_id="id-1", version=3)
    assert files(d) == ["identity.json", "pending.json", "pending.safetensors"]  # no temp files
    for f in d.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o600
    ident = json.loads((d / "identity.json").read_text())
    assert ident["name"] == "a1" and ident["agent_id"] == "id-1" and ident["version"] == 3
    assert ident["token"] == "secret-token"
    (d / ".pending.safetensors.x1.tmp").write_bytes(b"half")  # a crash mid-write
    again = AgentStateDir(d, "a1")
    assert again.identity.token == "secret-token" and again.identity.agent_id == "id-1"
    assert files(d) == ["identity.json", "pending.json", "pending.safetensors"]  # leftover removed
    saved = again.load_pending()
    assert saved is not None and saved.run_id == "run-1"
    up = saved.upload
    assert (up.upload_id, up.base_version, up.num_samples) == ("u1", 0, 7)
    assert up.metrics == {"acc": 0.5, "tag": "x"}
    np.testing.assert_array_equal(up.model["w"], upload().model["w"])
    assert up.model["w"].dtype == np.float32 and up.model["layer.0/b[1]"].shape == ()
    assert up.extra is not None and up.extra["c"].dtype == np.int64
    again.clear_pending("other")  # not the one on disk: kept
    assert (d / "pending.json").exists()
    again.clear_pending("u1")
    assert files(d) == ["identity.json"]


@pytest.mark.parametrize("damage", ["truncate", "mismatch", "no-data", "bad-json"])
def test_torn_pending_upload_is_discarded_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    d = tmp_path / "state"
    AgentStateDir(d, "a1").save_pending(upload(), "run-1")
    data, meta = d / "pending.safetensors", d / "pending.json"
    if damage == "truncate":
        os.truncate(data, data.stat().st_size // 2)
    elif damage == "mismatch":  # crash after the new tensors, before the new metadata
        old = meta.read_bytes()
        AgentStateDir(d, "a1").save_pending(upload("u2", extra=False), "run-1")
        meta.write_bytes(old)
    elif damage == "no-data":
        data.unlink()
    else:
        meta.write_text('{"format": 1, "upload_id"')
    with caplog.at_level(logging.WARNING, logger="fedstack.agent"):
        agent = Agent("ws://127.0.0.1:9", name="a1", state_dir=d)
    assert agent._pending is None and agent.state.name == "waiting_gm"
    assert "torn or damaged" in caplog.text
    assert files(d) == ["identity.json"]


def test_orphan_tensors_without_metadata_are_removed(tmp_path: Path) -> None:
    d = tmp_path / "state"
    AgentStateDir(d, "a1").save_pending(upload(), None)
    (d / "pending.json").unlink()  # crash between the two writes of a first upload
    assert AgentStateDir(d, "a1").load_pending() is None
    assert files(d) == ["identity.json"]


def test_a_state_dir_of_another_agent_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "state"
    Agent("ws://127.0.0.1:9", name="alice", state_dir=d)
    with pytest.raises(ConfigError, match="belongs to agent 'alice', not 'bob'"):
        Agent("ws://127.0.0.1:9", name="bob", state_dir=d)
    (d / "identity.json").write_text("not json")
    with pytest.raises(ConfigError, match="unreadable"):
        Agent("ws://127.0.0.1:9", name="alice", state_dir=d)


# ---------------------------------------------------------------------- with an aggregator
def test_identity_and_acknowledged_uploads_in_process(tmp_path: Path) -> None:
    d = tmp_path / "state"
    with aggregator_thread(config(tmp_path, rounds=2)) as agg:
        a = Agent(f"ws://127.0.0.1:{agg.port}", name="a1", state_dir=d)
        a.send_initial_model({"w": np.zeros(3, np.float32)})
        a.start()
        gm = a.wait_for_global_model(10)
        a.send_trained_model({"w": gm["w"] + 1}, 5)
        gm = a.wait_for_global_model(10)  # v1: the upload was acknowledged
        # the connection thread records v1 right after handing it over
        wait_until(lambda: json.loads((d / "identity.json").read_text())["version"] == 1)
        assert files(d) == ["global.safetensors", "identity.json"]  # no pending upload
        ident = json.loads((d / "identity.json").read_text())
        assert ident["agent_id"] == a.agent_id and ident["run_id"] == agg.run_id
        assert ident["version"] == 1
        a.close()
        # a stale restored upload (trained on v0, the model is at v1) is discarded (push)
        AgentStateDir(d, "a1").save_pending(upload("stale-1", extra=False), agg.run_id)
        b = Agent(f"ws://127.0.0.1:{agg.port}", name="a1", state_dir=d)
        assert b.agent_id == a.agent_id  # known before the welcome
        b.start()
        np.testing.assert_array_equal(b.wait_for_global_model(10)["w"], 1)
        assert files(d) == ["global.safetensors", "identity.json"]
        assert agg.store is not None and agg.store.find_upload("stale-1") is None
        b.close()


def test_pending_upload_survives_sigkill_and_is_stored_once(tmp_path: Path) -> None:
    d = tmp_path / "state"
    store = HoldingStore(str(tmp_path / "f.db"))
    cfg = config(tmp_path, rounds=2, min_agents=2, threshold=1.0)
    with aggregator_thread(cfg, store=store) as agg:
        url = f"ws://127.0.0.1:{agg.port}"
        b = Agent(url, name="b")  # in-process, decides when round 1 may complete
        b.send_initial_model({"w": np.zeros((4, 3), np.float32)})
        b.start()
        gm_b = b.wait_for_global_model(10)
        cmd = [
            sys.executable,
            str(SCRIPT),
            "--url",
            url,
            "--name",
            "a",
            "--state-dir",
            str(d),
            "--report",
            str(tmp_path / "a.json"),
        ]
        first = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=ENV)
        try:
            assert store.entered.wait(20), "the agent's upload never reached the store"
            meta = json.loads((d / "pending.json").read_text())  # on disk before sending
            ident = json.loads((d / "identity.json").read_text())
            first.kill()  # SIGKILL while the aggregator holds the ack
            first.wait(10)
        finally:
            store.release.set()
        uid = meta["upload_id"]
        assert meta["base_version"] == 0 and ident["agent_id"]
        wait_until(lambda: store.find_upload(uid) is not None)
        second = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=ENV)
        try:
            assert second.stdout is not None
            assert second.stdout.readline().split() == [b"started", ident["agent_id"].encode()]
            wait_until(lambda: not (d / "pending.json").exists())  # re-sent and acknowledged
            b.send_trained_model({"w": gm_b["w"] + 1}, 10)  # now round 1 can complete
            np.testing.assert_array_equal(b.wait_for_global_model(10)["w"], 1)
            b.send_trained_model({"w": np.full((4, 3), 2, np.float32)}, 10)
            np.testing.assert_array_equal(b.wait_for_global_model(10)["w"], 2)  # final
            assert second.wait(20) == 0
        finally:
            b.close()
            if second.poll() is None:
                second.kill()
        run_id = agg.run_id
        assert agg.state.finished  # the federation finished its 2 rounds
    report = json.loads((tmp_path / "a.json").read_text())
    assert report["agent_id"] == ident["agent_id"]
    assert [uid, "accepted", "already received"] in report["acked"]
    assert report["versions"] == [1, 2]  # v0 was already trained on before the kill
    np.testing.assert_array_equal(report["final"]["w"], np.full((4, 3), 2))
    assert [m["upload_id"] for m in store.models(run_id, "local")].count(uid) == 1
    assert [r["round"] for r in store.rounds(run_id)] == [1, 2]
    assert files(d) == ["global.safetensors", "identity.json"]
    assert json.loads((d / "identity.json").read_text())["version"] == 2
    store.close()


def test_sigterm_on_fedstack_agent_says_bye_and_exits_0(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    d = tmp_path / "state"
    caplog.set_level(logging.INFO, logger="fedstack.aggregator")
    with aggregator_thread(config(tmp_path, min_agents=2)) as agg:
        assert agg.store is not None
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fedstack",
                "agent",
                "--url",
                f"ws://127.0.0.1:{agg.port}",
                "--name",
                "t1",
                "--trainer",
                "persist_agent_proc:AddOne",
                "--state-dir",
                str(d),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=ENV,
        )
        try:
            # joined, trained on v0, uploaded and acknowledged; now waiting for round 2
            wait_until(lambda: any(m["upload_id"] for m in agg.store.models(agg.run_id, "local")))  # type: ignore
            wait_until(lambda: not (d / "pending.json").exists())
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=15)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 0, err.decode()[-2000:]
        assert b"SIGTERM: agent t1 left the federation" in err
        wait_until(lambda: "agent t1 left" in caplog.text, 5)
        assert json.loads((d / "identity.json").read_text())["agent_id"]
