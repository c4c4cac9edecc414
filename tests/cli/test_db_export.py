"""Book row 52: `fedstack db export MODEL_ID --format safetensors|npz|pt --out FILE` writes
any stored model in a native format; the final global model, loaded into the PyTorch
module from the .pt file, reproduces the evaluation metric the aggregator stored."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from fedstack import AggregatorConfig, Store
from fedstack.agent.runner import run_trainer
from fedstack.cli.main import main as cli_main
from fedstack.data.digits import load_digits_split
from fedstack.testing import aggregator_thread

torch = pytest.importorskip("torch")
torch_digits = pytest.importorskip("fedstack.trainers.torch_digits")
safetensors_numpy = pytest.importorskip("safetensors.numpy")


def _json(capsys: pytest.CaptureFixture[str]) -> object:
    return json.loads(capsys.readouterr().out)


def _wait_for_evaluation(db: str, run_id: str, rnd: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        store = Store.open_readonly(db)
        try:
            rows = {r["round"]: r for r in store.rounds(run_id)}
        finally:
            store.close()
        if "eval_accuracy" in (rows.get(rnd) or {}).get("metrics", {}):
            return
        assert time.monotonic() < deadline, f"round {rnd} was not evaluated in time"
        time.sleep(0.05)


def test_exported_final_model_reproduces_the_stored_evaluation(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = str(tmp_path / "f.db")
    cfg = AggregatorConfig(
        auth="off",
        port=0,
        db=db,
        rounds=2,
        min_agents=2,
        finish_grace=5,
        evaluator="fedstack.trainers.torch_digits:evaluate_global_cnn",
    )
    with aggregator_thread(cfg) as agg:
        url = f"ws://127.0.0.1:{agg.port}"
        threads = [
            threading.Thread(
                target=run_trainer,
                args=(torch_digits.DigitsCNNTrainer(index=i, num_agents=2, seed=3), url, f"a{i}"),
                daemon=True,
            )
            for i in range(2)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(90)
        assert not any(t.is_alive() for t in threads)
        _wait_for_evaluation(db, agg.run_id, 2)  # evaluated after the round, off its path
    capsys.readouterr()
    assert cli_main(["db", "rounds", "--db", db, "--json"]) == 0
    rounds = _json(capsys)
    assert isinstance(rounds, list) and [r["round"] for r in rounds] == [1, 2]
    final = rounds[-1]
    stored_accuracy = final["metrics"]["eval_accuracy"]
    stored_loss = final["metrics"]["eval_loss"]

    # the final global model by an id prefix, as a PyTorch state dict
    pt = tmp_path / "out" / "final.pt"
    args = ["db", "export", final["model_id"][:10], "--db", db, "--out", str(pt), "--json"]
    assert cli_main([*args, "--format", "pt"]) == 0
    info = _json(capsys)
    assert isinstance(info, dict)
    assert info["model_id"] == final["model_id"] and info["kind"] == "cluster"
    assert info["round"] == 2 and info["format"] == "pt"
    state = torch.load(pt, map_location="cpu", weights_only=True)
    model = torch_digits.build_cnn()
    model.load_state_dict(state, strict=True)
    model.train(False)
    _, _, x_test, y_test = load_digits_split()
    torch.set_num_threads(1)
    with torch.no_grad():
        logits = model(torch.from_numpy(x_test))
        y = torch.from_numpy(y_test)
        accuracy = (logits.argmax(dim=1) == y).float().mean().item()
        loss = torch.nn.functional.cross_entropy(logits, y).item()
    assert accuracy == pytest.approx(stored_accuracy, abs=1e-9)
    assert loss == pytest.approx(stored_loss, rel=1e-5)
    assert accuracy > 0.3  # a trained model, not the initial one by chance

    # npz and safetensors hold the same tensors, names, dtypes and shapes
    store = Store(db)
    try:
        stored = store.load_weights(final["model_id"])
        local = store.models(None, "local")[-1]
    finally:
        store.close()
    npz, st = tmp_path / "final.npz", tmp_path / "final.safetensors"
    assert cli_main(["db", "export", final["model_id"], "--db", db, "--out", str(npz)]) == 0
    assert cli_main(["db", "export", final["model_id"], "--db", db, "--out", str(st)]) == 0
    with np.load(npz, allow_pickle=False) as z:
        from_npz = {k: z[k] for k in z.files}
    from_st = safetensors_numpy.load_file(str(st))
    for got in (from_npz, from_st, {k: v.numpy() for k, v in state.items()}):
        assert list(got) == list(stored) or set(got) == set(stored)
        for k, v in stored.items():
            assert got[k].dtype == v.dtype and got[k].shape == v.shape
            np.testing.assert_array_equal(got[k], v)
    # any stored model: an agent's local model too
    out = tmp_path / "local.pt"
    assert cli_main(["db", "export", local["id"], "--db", db, "--out", str(out)]) == 0
    capsys.readouterr()
    local_state = torch.load(out, map_location="cpu", weights_only=True)
    assert set(local_state) == set(stored)


def test_export_refuses_what_it_cannot_do(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = str(tmp_path / "f.db")
    npz = tmp_path / "m.npz"
    np.savez(npz, w=np.arange(6, dtype=np.float32).reshape(2, 3))
    assert cli_main(["model", "register", str(npz), "--db", db, "--json"]) == 0
    model_id = _json(capsys)["model_id"]  # type: ignore[index]
    out = tmp_path / "m.bin"
    assert cli_main(["db", "export", model_id, "--db", db, "--out", str(out)]) == 2
    assert "cannot tell the format" in capsys.readouterr().err
    assert cli_main(["db", "export", "f" * 32, "--db", db, "--out", str(tmp_path / "x.pt")]) == 2
    assert "matches 0 models" in capsys.readouterr().err
    assert cli_main(["db", "export", "x'; --", "--db", db, "--out", str(tmp_path / "x.pt")]) == 2
    assert "not a hex id" in capsys.readouterr().err
    # a read-only view: a missing store is refused, not created
    missing = tmp_path / "none.db"
    assert cli_main(["db", "export", model_id, "--db", str(missing), "--out", str(out)]) == 2
    assert not missing.exists()
    # the format named explicitly wins over the suffix
    explicit = ["db", "export", model_id, "--db", db, "--out", str(out), "--format", "npz"]
    assert cli_main(explicit) == 0
    with np.load(out, allow_pickle=False) as z:
        np.testing.assert_array_equal(z["w"], np.arange(6, dtype=np.float32).reshape(2, 3))


def test_register_and_export_on_postgresql(
    pg_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The same commands on PostgreSQL with a blob directory (the blob is a file there)."""
    blobs = str(tmp_path / "blobs")
    weights: dict[str, np.ndarray] = {
        "conv.weight": np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2),
        "steps": np.array(7, dtype=np.int64),
    }
    st = tmp_path / "base.safetensors"
    from fedstack.store.modelfiles import write_model_file

    write_model_file(weights, st, "safetensors")
    reg = ["model", "register", str(st), "--db", pg_url, "--blob-dir", blobs, "--run-name", "pg"]
    assert cli_main([*reg, "--json"]) == 0
    model_id = _json(capsys)["model_id"]  # type: ignore[index]
    assert cli_main(reg) == 2
    assert "has a model already" in capsys.readouterr().err
    for fmt in ("pt", "npz", "safetensors"):
        out = tmp_path / f"m.{fmt}"
        argv = ["db", "export", model_id[:8], "--db", pg_url, "--blob-dir", blobs]
        assert cli_main([*argv, "--out", str(out), "--run", "pg"]) == 0
        if fmt == "pt":
            got = {k: v.numpy() for k, v in torch.load(out, weights_only=True).items()}
        elif fmt == "npz":
            with np.load(out, allow_pickle=False) as z:
                got = {k: z[k] for k in z.files}
        else:
            got = safetensors_numpy.load_file(str(out))
        assert set(got) == set(weights)
        for k, v in weights.items():
            assert got[k].dtype == v.dtype and got[k].shape == v.shape
            np.testing.assert_array_equal(got[k], v)
    assert out.read_bytes() == st.read_bytes()  # the stored tensor file, byte for byte
