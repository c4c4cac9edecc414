"""The chapter-6 example on CIFAR-10 (book checklist row 26), on generated CIFAR-format
files: the book's CNN, the per-round sample, local and global accuracy on the whole test
set each round, recorded per round by the agents and the aggregator."""

from __future__ import annotations

import csv
import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from fedstack.agent.adapters.torch import module_to_weights
from fedstack.data.cifar import load_cifar10, write_cifar10
from fedstack.errors import ConfigError
from fedstack.store import Store
from fedstack.testing.cifar import make_cifar10_folder, synthetic_cifar10

torch = pytest.importorskip("torch")

from fedstack.trainers.torch_cifar import (  # noqa: E402
    CIFAR_DIR_ENV,
    BookImageTrainer,
    CifarCNNTrainer,
    _sgd_step,
    build_cifar_cnn,
    evaluate_global_cifar_cnn,
)

ROOT = Path(__file__).resolve().parents[2]
RUN = ROOT / "examples/image_classification/run.py"
N_TRAIN, N_TEST = 400, 200


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_cifar10_folder(tmp_path_factory.mktemp("cifar"), N_TRAIN, N_TEST, seed=0)


def test_cifar10_example_end_to_end(cifar_dir: Path, tmp_path: Path) -> None:
    rounds = 4
    proc = subprocess.run(
        [
            sys.executable,
            str(RUN),
            "--dataset",
            "cifar10",
            "--data-dir",
            str(cifar_dir),
            "--agents",
            "2",
            "--rounds",
            str(rounds),
            "--samples-per-round",
            "300",
            "--work-dir",
            str(tmp_path),
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = tmp_path / "2-agents"
    log = (out / "aggregator.log").read_text() if (out / "aggregator.log").exists() else ""
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:] + log[-2000:]
    assert "[a2] round 1: global accuracy" in proc.stdout

    rows = list(csv.DictReader((out / "metrics.csv").open()))
    for agent in ("a1", "a2"):
        mine = [r for r in rows if r["agent"] == agent]
        assert [int(r["round"]) for r in mine] == list(range(1, rounds + 2))
        for r in mine:
            assert int(r["num_samples"]) == 300  # the round's sample, not the whole set
            for key in ("global_accuracy", "local_accuracy"):
                # measured on the whole test set: a whole number of its 200 images
                hits = float(r[key]) * N_TEST
                assert abs(hits - round(hits)) < 1e-6 and 0 <= hits <= N_TEST
    first = [float(r["global_accuracy"]) for r in rows if r["round"] == "1"]
    final = [float(r["global_accuracy"]) for r in rows if r["round"] == str(rounds + 1)]
    assert first[0] == first[1]  # both start from the same initial model
    assert final[0] == final[1] and final[0] >= 0.5 > first[0]  # learnt (chance: 0.1)

    # the aggregator's store holds the agents' local accuracy and sample count per round
    # and its central evaluation of every global model on the CIFAR-10 test set
    store = Store.open_readonly(str(out / "fedstack.db"))
    try:
        run_id = store.latest_run_id()
        assert run_id is not None
        history = store.rounds(run_id)
        local = [m for m in store.models(run_id, kind="local") if m["round"] >= 1]
    finally:
        store.close()
    assert [h["round"] for h in history] == list(range(1, rounds + 1))
    assert all(h["num_samples"] == 600 for h in history)
    assert abs(history[-1]["metrics"]["eval_accuracy"] - final[0]) < 1e-9
    stored = sorted((m["round"], m["agent"], m["metrics"]["local_accuracy"]) for m in local)
    recorded = sorted(
        (int(r["round"]), r["agent"], float(r["local_accuracy"]))
        for r in rows
        if int(r["round"]) <= rounds
    )
    assert len(stored) == 2 * rounds
    for (r1, a1, acc1), (r2, a2, acc2) in zip(stored, recorded, strict=True):
        assert (r1, a1) == (r2, a2) and abs(acc1 - acc2) < 1e-9


def test_the_books_cnn() -> None:
    shapes = {k: v.shape for k, v in module_to_weights(build_cifar_cnn()).items()}
    assert shapes == {
        "conv1.weight": (6, 3, 5, 5), "conv1.bias": (6,),
        "conv2.weight": (16, 6, 5, 5), "conv2.bias": (16,),
        "fc1.weight": (120, 400), "fc1.bias": (120,),
        "fc2.weight": (84, 120), "fc2.bias": (84,),
        "fc3.weight": (10, 84), "fc3.bias": (10,),
    }  # fmt: skip


def test_trainer_samples_and_partitions(cifar_dir: Path) -> None:
    full = CifarCNNTrainer(0, 2, data_dir=cifar_dir)
    assert full.num_samples == N_TRAIN  # the book: every agent holds the whole set
    assert (full.samples_per_round, full.batch_size, full.lr) == (8000, 4, 0.001)
    shares = [CifarCNNTrainer(i, 2, data_dir=cifar_dir, partition="iid") for i in (0, 1)]
    assert sum(t.num_samples for t in shares) == N_TRAIN
    a, b = (set(map(bytes, t.x_train.reshape(len(t.x_train), -1))) for t in shares)
    assert not a & b  # disjoint shares
    weights = full.initial_weights()
    _, n, metrics = full.fit(weights, {"samples_per_round": 48, "batch_size": 16})
    assert n == 48
    _, n, _ = full.fit(weights, {})
    assert n == N_TRAIN  # 8000 requested, capped at the data
    evaluation = full.evaluate(weights, {})
    assert evaluation["accuracy"] == metrics["global_accuracy"]
    with pytest.raises(ConfigError, match="data_dir"):
        CifarCNNTrainer(0, 1)
    with pytest.raises(ConfigError, match="no CIFAR-10 batches"):
        CifarCNNTrainer(0, 1, data_dir=cifar_dir / "nowhere")
    with pytest.raises(ConfigError, match="unknown partition"):
        CifarCNNTrainer(0, 1, data_dir=cifar_dir, partition="halves")
    with pytest.raises(ConfigError, match="samples_per_round"):
        CifarCNNTrainer(0, 1, data_dir=cifar_dir, samples_per_round=-1)
    with pytest.raises(ConfigError, match="dataset"):
        BookImageTrainer(dataset="mnist")
    with pytest.raises(ConfigError, match="seed must be >= 0"):
        BookImageTrainer(dataset="digits", seed=-1)
    with pytest.raises(ConfigError, match="data_dir is for"):
        BookImageTrainer(dataset="digits", data_dir=cifar_dir)


def test_central_evaluator_reads_the_folder_from_the_environment(
    cifar_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trainer = CifarCNNTrainer(0, 1, data_dir=cifar_dir)
    weights = trainer.initial_weights()
    monkeypatch.delenv(CIFAR_DIR_ENV, raising=False)
    with pytest.raises(ConfigError, match=CIFAR_DIR_ENV):
        evaluate_global_cifar_cnn(weights)
    monkeypatch.setenv(CIFAR_DIR_ENV, str(cifar_dir))
    assert evaluate_global_cifar_cnn(weights) == trainer.evaluate(weights, {})


def test_sgd_step_is_torch_sgd_with_momentum() -> None:
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    buffers: list[Any] = [None]
    p.grad = torch.tensor([0.5, 1.0])
    _sgd_step([p], buffers, lr=0.1, momentum=0.9)  # b = g
    assert torch.allclose(p.detach(), torch.tensor([0.95, -2.1]))
    p.grad = torch.tensor([1.0, 0.0])
    _sgd_step([p], buffers, lr=0.1, momentum=0.9)  # b = 0.9 b + g = [1.45, 0.9]
    assert torch.allclose(p.detach(), torch.tensor([0.805, -2.19]))
    q = torch.nn.Parameter(torch.tensor([1.0]))
    q.grad = torch.tensor([2.0])
    _sgd_step([q], [None], lr=0.5, momentum=0.0)
    assert torch.allclose(q.detach(), torch.tensor([0.0]))


def test_writer_round_trips_through_the_loader(tmp_path: Path) -> None:
    x_train, y_train, x_test, y_test = synthetic_cifar10(23, 11, seed=3)
    folder = write_cifar10(tmp_path, x_train, y_train, x_test, y_test)
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [*(f"data_batch_{i}.bin" for i in range(1, 6)), "test_batch.bin", "batches.meta.txt"]
    )
    for got, want in zip(load_cifar10(tmp_path), (x_train, y_train, x_test, y_test), strict=True):
        np.testing.assert_array_equal(got, want)
    assert np.bincount(y_train, minlength=10).min() >= 2  # every class present
    with pytest.raises(ConfigError, match="uint8"):
        write_cifar10(tmp_path, x_train.astype(np.float32), y_train, x_test, y_test)
    with pytest.raises(ConfigError, match="0..9"):
        write_cifar10(tmp_path, x_train, y_train + 10, x_test, y_test)


def load_run_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("ch6_run", RUN)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bad_options_are_refused_before_anything_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    run = load_run_module()
    for args, message in [
        (["--dataset", "cifar10"], "needs --data-dir"),
        (["--dataset", "cifar10", "--data-dir", str(tmp_path)], "no CIFAR-10 batches"),
        (["--partition", "halves"], "unknown partition"),
        (["--samples-per-round", "-3"], "samples-per-round"),
        (["--agents", "0"], "must be >= 1"),
        (["--data-dir", str(tmp_path)], "--data-dir is for --dataset cifar10"),
    ]:
        monkeypatch.setattr(sys, "argv", [str(RUN), *args, "--work-dir", str(tmp_path / "w")])
        with pytest.raises(SystemExit) as exc:
            run.main()
        assert exc.value.code == 2 and message in capsys.readouterr().err, args
    assert not (tmp_path / "w").exists()


def test_report_rebuilds_the_table_and_plot_from_the_csv_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fields = "round,agent,global_accuracy,local_accuracy,num_samples\n"
    (tmp_path / "1-agents").mkdir()
    (tmp_path / "1-agents" / "metrics.csv").write_text(fields + "1,a1,0.1,0.5,8\n2,a1,0.5,0.6,8\n")
    (tmp_path / "2-agents").mkdir()
    (tmp_path / "2-agents" / "metrics.csv").write_text(
        fields + "1,a2,0.1,0.4,8\n1,a1,0.1,0.3,8\n2,a1,0.6,0.7,8\n2,a2,0.6,0.9,8\n"
    )
    run = load_run_module()
    monkeypatch.setattr(sys, "argv", [str(RUN), "--report", str(tmp_path)])
    run.main()
    table = list(csv.DictReader((tmp_path / "accuracy.csv").open()))
    assert table == [
        {"round": "1", "1_agents": "0.1", "2_agents": "0.1"},
        {"round": "2", "1_agents": "0.5", "2_agents": "0.6"},
    ]
    out = capsys.readouterr().out
    assert "One Agent: mean global accuracy over the last 2 rounds 0.3000" in out
    assert "Two Agents: mean global accuracy over the last 2 rounds 0.3500" in out
    assert (tmp_path / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
