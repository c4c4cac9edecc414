"""Book row 6: the operator registers the base model (`fedstack model register FILE`); it
fixes the federation's names, shapes and dtypes and global model 0 instead of the first
agent, and an agent whose model differs is refused with what differs."""

from __future__ import annotations

import http.client
import json
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedstack import AggregatorConfig, Store
from fedstack.agent.client import Agent
from fedstack.agent.runner import run_trainer
from fedstack.cli.main import main as cli_main
from fedstack.errors import RegistrationRefused
from fedstack.testing import aggregator_thread
from fedstack.types import Metrics, Weights

torch = pytest.importorskip("torch")
torch_digits = pytest.importorskip("fedstack.trainers.torch_digits")


class _Recording(torch_digits.DigitsCNNTrainer):  # type: ignore[misc, name-defined]
    """The CNN trainer, remembering the global models it was given."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.received: list[Weights] = []

    def fit(self, weights: Weights, config: Mapping[str, Any]) -> tuple[Weights, int, Metrics]:
        self.received.append({k: np.array(v) for k, v in weights.items()})
        result: tuple[Weights, int, Metrics] = super().fit(weights, config)
        return result


def _refusal(url: str, name: str, model: Weights) -> RegistrationRefused:
    agent = Agent(url, name=name)
    agent.send_initial_model(model)
    try:
        with pytest.raises(RegistrationRefused) as info:
            agent.start(timeout=20)
    finally:
        agent.close()
    return info.value


def test_registered_model_fixes_the_federation_and_mismatched_agents_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = str(tmp_path / "f.db")
    torch.manual_seed(1234)
    base = {k: v.clone() for k, v in torch_digits.build_cnn().state_dict().items()}
    pt = tmp_path / "base.pt"
    torch.save(base, pt)
    capsys.readouterr()
    assert cli_main(["model", "register", str(pt), "--db", db, "--run-name", "book", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["format"] == "pt" and out["tensors"] == len(base)
    assert [s["name"] for s in out["structure"]] == list(base)
    # the run's structure is fixed now: a second registration is refused (exit 2)
    npz = tmp_path / "other.npz"
    np.savez(npz, w=np.ones(3, np.float32))
    assert cli_main(["model", "register", str(npz), "--db", db, "--run-name", "book"]) == 2
    assert "has a model already" in capsys.readouterr().err

    cfg = AggregatorConfig(
        auth="off",
        port=0,
        db=db,
        run_name="book",
        rounds=1,
        min_agents=1,
        finish_grace=5,
        operator_port=0,
    )
    good = _Recording(index=0, num_agents=2, seed=7, epochs=1)
    own = good.initial_weights()
    store = Store(db)
    try:
        ops = store.issue_credential("ops", role="operator")
    finally:
        store.close()
    with aggregator_thread(cfg) as agg:
        url = f"ws://127.0.0.1:{agg.port}"
        assert agg.run_id == out["run"]  # the aggregator resumed the registered run
        # the operator API shows the run's model and where it came from
        assert agg.operator is not None
        api = http.client.HTTPConnection("127.0.0.1", agg.operator.port, timeout=10)
        try:
            api.request("GET", "/api/v1/model", headers={"Authorization": f"Bearer {ops}"})
            resp = api.getresponse()
            spec = json.loads(resp.read())
        finally:
            api.close()
        assert resp.status == 200
        assert spec["source"] == "registered" and spec["file"] == "base.pt"
        assert spec["model_id"] == out["model_id"] and spec["run"] == out["run"]
        assert [(s["name"], s["shape"]) for s in spec["structure"]] == [
            (k, list(v.shape)) for k, v in base.items()
        ]
        # another architecture (the MLP): names missing and unexpected
        mlp = torch_digits.DigitsMLPTrainer(index=1, num_agents=2).initial_weights()
        err = _refusal(url, "mlp", mlp)
        assert err.code == "model-mismatch"
        assert "missing tensors: '1.weight'" in str(err)
        assert "unexpected tensors: '0.weight', '0.bias', '2.weight', '2.bias'" in str(err)
        # the same names, one shape and one dtype differ
        bent = {k: np.array(v) for k, v in own.items()}
        bent["8.weight"] = np.zeros((64, 100), np.float32)
        bent["10.bias"] = bent["10.bias"].astype(np.float64)
        err = _refusal(url, "bent", bent)
        assert err.code == "model-mismatch"
        assert "other shapes: '8.weight' [64, 100] (the model's: [64, 128])" in str(err)
        assert "other dtypes: '10.bias' float64 (the model's: float32)" in str(err)
        assert "missing" not in str(err) and "unexpected" not in str(err)
        # a matching agent joins and trains from the registered weights, not its own
        done = threading.Thread(target=lambda: run_trainer(good, url, "good"), daemon=True)
        done.start()
        done.join(60)
        assert not done.is_alive()
    first = good.received[0]
    assert list(first) == list(base)
    for k, v in base.items():
        np.testing.assert_array_equal(first[k], v.numpy())
    assert any(not np.array_equal(own[k], base[k].numpy()) for k in base)

    store = Store(db)
    try:
        run = store.get_run(out["run"])
        assert run.config["run_name"] == "book"  # the aggregator's settings, recorded
        assert run.structure == [(k, "float32", tuple(v.shape)) for k, v in base.items()]
        events = store.events(out["run"])
        refused = [e["detail"] for e in events if e["kind"] == "refused"]
        assert [d["code"] for d in refused] == ["model-mismatch", "model-mismatch"]
        assert [e["detail"]["file"] for e in events if e["kind"] == "model_registered"] == [
            "base.pt"
        ]
        assert len(store.rounds(out["run"])) == 1
    finally:
        store.close()
    capsys.readouterr()
    assert cli_main(["model", "show", "--db", db, "--run", "book", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["source"] == "registered" and shown["file"] == "base.pt"
    assert [s["name"] for s in shown["structure"]] == list(base)


def test_a_model_registered_while_the_aggregator_waits_starts_the_run(tmp_path: Path) -> None:
    """Registered after the aggregator opened the run but before any agent came: the
    first agent's model does not replace it; a matching agent gets the registered one."""
    db = str(tmp_path / "f.db")
    structure = {"w": np.zeros((3, 2), np.float32), "b": np.zeros(2, np.float32)}
    registered = {"w": np.full((3, 2), 0.5, np.float32), "b": np.array([1, 2], np.float32)}
    cfg = AggregatorConfig(auth="off", port=0, db=db, run_name="late", rounds=1, min_agents=1)
    with aggregator_thread(cfg) as agg:
        url = f"ws://127.0.0.1:{agg.port}"
        st = tmp_path / "late.npz"
        np.savez(st, w=registered["w"], b=registered["b"])
        assert cli_main(["model", "register", str(st), "--db", db, "--run-name", "late"]) == 0
        err = _refusal(url, "other", {"w": np.zeros((3, 3), np.float32)})
        assert err.code == "model-mismatch" and "missing tensors: 'b'" in str(err)
        agent = Agent(url, name="fits")
        agent.send_initial_model(structure)
        try:
            agent.start(timeout=20)
            gm = agent.wait_for_global_model(timeout=20)
        finally:
            agent.close()
        assert agent.version == 0
        for k, v in registered.items():
            np.testing.assert_array_equal(gm[k], v)


@pytest.mark.parametrize(
    ("name", "content", "why"),
    [
        ("bad.npz", b"PK\x03\x04 not a zip", "not a readable .npz"),
        ("bad.safetensors", b"\x02\x00\x00\x00\x00\x00\x00\x00{x", "not a safetensors file"),
        ("bad.pt", b"\x80\x02not a torch file", "not a torch.save zip archive"),
        ("model.bin", b"0123456789", "cannot tell the model file's format"),
    ],
)
def test_unreadable_model_files_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, content: bytes, why: str
) -> None:
    f = tmp_path / name
    f.write_bytes(content)
    assert cli_main(["model", "register", str(f), "--db", str(tmp_path / "f.db")]) == 2
    assert why in capsys.readouterr().err
    assert not (tmp_path / "f.db").exists()  # a refused file leaves no store behind


def test_nan_and_object_arrays_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    nan = tmp_path / "nan.npz"
    np.savez(nan, w=np.array([1.0, np.nan], np.float32))
    assert cli_main(["model", "register", str(nan), "--db", str(tmp_path / "f.db")]) == 2
    assert "'w' holds NaN" in capsys.readouterr().err
    obj = tmp_path / "obj.npz"
    np.savez(obj, w=np.array([{"a": 1}], dtype=object))  # would need pickle to load
    assert cli_main(["model", "register", str(obj), "--db", str(tmp_path / "f.db")]) == 2
    assert "not a readable .npz" in capsys.readouterr().err


def test_another_applications_sqlite_file_is_not_turned_into_a_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import sqlite3

    db = tmp_path / "notes.db"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)")
    con.commit()
    con.close()
    before = db.read_bytes()
    npz = tmp_path / "m.npz"
    np.savez(npz, w=np.ones(2, np.float32))
    assert cli_main(["model", "register", str(npz), "--db", str(db)]) == 2
    assert "not a fedstack store" in capsys.readouterr().err
    assert db.read_bytes() == before


def test_show_names_the_first_agent_when_no_model_was_registered(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = str(tmp_path / "f.db")
    cfg = AggregatorConfig(auth="off", port=0, db=db, rounds=1, min_agents=1)
    with aggregator_thread(cfg) as agg:
        agent = Agent(f"ws://127.0.0.1:{agg.port}", name="first")
        agent.send_initial_model({"w": np.ones((2, 2), np.float32)})
        try:
            agent.start(timeout=20)
            agent.wait_for_global_model(timeout=20)
        finally:
            agent.close()
    capsys.readouterr()
    assert cli_main(["model", "show", "--db", db, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["source"] == "agent" and shown["agent"] == "first"
    assert shown["structure"] == [{"name": "w", "dtype": "float32", "shape": [2, 2]}]
