"""Tests for the digits trainers: numpy softmax regression and the PyTorch MLP/CNN."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import Any, cast

import numpy as np
import pytest

from fedstack.agent.trainer import Trainer
from fedstack.data.digits import partition_digits
from fedstack.errors import ConfigError, InvalidUpdate
from fedstack.trainers.digits import DigitsLinearTrainer, evaluate_global
from fedstack.trainers.torch_digits import (
    DigitsCNNTrainer,
    DigitsMLPTrainer,
    evaluate_global_cnn,
    evaluate_global_mlp,
)
from fedstack.types import Metrics, Weights

METRIC_KEYS = {"train_loss", "local_accuracy", "global_accuracy", "train_seconds"}


def fedavg(
    trainers: Sequence[Trainer], rounds: int, evaluate: Callable[[Weights], Metrics]
) -> list[float]:
    """In-process FedAvg: sample-weighted mean of every agent's update, per round."""
    model = trainers[0].initial_weights()
    accuracies = []
    for _ in range(rounds):
        results = [t.fit(model, {}) for t in trainers]
        total = sum(n for _, n, _ in results)
        model = {
            name: np.asarray(sum(w[name] * (n / total) for w, n, _ in results)).astype(
                model[name].dtype
            )
            for name in model
        }
        accuracies.append(float(evaluate(model)["accuracy"]))
    return accuracies


def assert_same_weights(a: Weights, b: Weights) -> None:
    assert list(a) == list(b)
    for name in a:
        assert a[name].dtype == b[name].dtype
        assert np.array_equal(a[name], b[name]), name


# --- DigitsLinearTrainer ------------------------------------------------------------------


def test_linear_fedavg_dirichlet_reaches_90_percent() -> None:
    trainers = [DigitsLinearTrainer(i, 3, "dirichlet:0.5", seed=0) for i in range(3)]
    accuracies = fedavg(trainers, 10, evaluate_global)
    assert accuracies[-1] >= 0.90
    assert accuracies[-1] > accuracies[0]


def test_linear_trainer_satisfies_the_protocol() -> None:
    assert isinstance(DigitsLinearTrainer(), Trainer)


def test_linear_fit_returns_samples_metrics_and_weights() -> None:
    trainer = DigitsLinearTrainer(index=1, num_agents=3, partition="dirichlet:0.5", seed=0)
    x_local, y_local = partition_digits(1, 3, "dirichlet:0.5", seed=0)
    received = trainer.initial_weights()
    received_copy = {k: v.copy() for k, v in received.items()}

    weights, num_samples, fit_metrics = trainer.fit(received, {})

    assert num_samples == len(y_local) == trainer.num_samples
    assert set(fit_metrics) == METRIC_KEYS
    assert all(isinstance(v, float) for v in fit_metrics.values())
    metrics = cast(dict[str, float], fit_metrics)  # all floats: asserted just above
    shapes: dict[str, tuple[tuple[int, ...], object]] = {
        k: (v.shape, v.dtype) for k, v in weights.items()
    }
    assert shapes == {
        "coef": ((10, 64), np.float32),
        "intercept": ((10,), np.float32),
    }
    assert_same_weights(received, received_copy)  # the input is not modified
    assert metrics["global_accuracy"] == evaluate_global(received)["accuracy"]
    predictions = (x_local @ weights["coef"].T + weights["intercept"]).argmax(axis=1)
    assert metrics["local_accuracy"] == pytest.approx(np.mean(predictions == y_local))
    assert metrics["local_accuracy"] > 0.8
    assert 0.0 < metrics["train_seconds"] < 0.2
    assert 0.0 < metrics["train_loss"] < np.log(10)


def test_linear_evaluate_is_central_test_accuracy() -> None:
    trainer = DigitsLinearTrainer()
    initial = trainer.initial_weights()
    trained, _, _ = trainer.fit(initial, {})
    before, after = trainer.evaluate(initial, {}), trainer.evaluate(trained, {})
    assert set(after) == {"accuracy", "loss"}
    assert after == evaluate_global(trained)
    acc_after, acc_before = float(after["accuracy"]), float(before["accuracy"])
    assert acc_after > 0.9 > acc_before
    assert float(after["loss"]) < float(before["loss"])


def test_linear_trainer_is_deterministic_per_seed() -> None:
    a, b, c = (DigitsLinearTrainer(0, 2, seed=s) for s in (7, 7, 8))
    assert_same_weights(a.initial_weights(), b.initial_weights())
    assert not np.array_equal(a.initial_weights()["coef"], c.initial_weights()["coef"])
    start = a.initial_weights()
    assert_same_weights(a.fit(start, {})[0], b.fit(start, {})[0])
    assert not np.array_equal(a.fit(start, {})[0]["coef"], c.fit(start, {})[0]["coef"])


def test_linear_trainer_accepts_string_arguments() -> None:
    typed = DigitsLinearTrainer(
        index=1, num_agents=3, partition="dirichlet:0.5", seed=2, epochs=2, lr=0.1, batch_size=16
    )
    as_text: dict[str, Any] = {
        "index": "1",
        "num_agents": "3",
        "partition": "dirichlet:0.5",
        "seed": "2",
        "epochs": "2",
        "lr": "0.1",
        "batch_size": "16",
    }
    text = DigitsLinearTrainer(**as_text)
    assert (text.index, text.num_agents, text.seed, text.epochs, text.batch_size) == (
        1,
        3,
        2,
        2,
        16,
    )
    assert isinstance(text.lr, float) and text.lr == 0.1
    start = typed.initial_weights()
    typed_out, typed_n, _ = typed.fit(start, {})
    text_out, text_n, _ = text.fit(start, {})
    assert typed_n == text_n
    assert_same_weights(typed_out, text_out)


def test_fit_config_overrides_hyperparameters() -> None:
    a, b = DigitsLinearTrainer(epochs=1), DigitsLinearTrainer(epochs=3)
    start = a.initial_weights()
    assert_same_weights(a.fit(start, {"epochs": "3"})[0], b.fit(start, {})[0])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"index": "one"}, "index must be an integer"),
        ({"index": 3, "num_agents": 3}, "index must be < num_agents"),
        ({"num_agents": "0"}, "num_agents must be >= 1"),
        ({"lr": "-0.1"}, "lr must be a finite number > 0"),
        ({"epochs": "1.5"}, "epochs must be an integer"),
        ({"partition": "dirichlet:abc"}, "not a number"),
    ],
)
def test_linear_trainer_rejects_bad_arguments(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        DigitsLinearTrainer(**kwargs)


def test_linear_fit_rejects_a_foreign_model() -> None:
    trainer = DigitsLinearTrainer()
    with pytest.raises(InvalidUpdate, match="coef"):
        trainer.fit(
            {
                "coef": np.zeros((10, 63), dtype=np.float32),
                "intercept": np.zeros(10, dtype=np.float32),
            },
            {},
        )
    with pytest.raises(InvalidUpdate, match="needs exactly"):
        evaluate_global({"w": np.zeros(3)})


def test_importing_the_numpy_parts_does_not_import_torch() -> None:
    code = (
        "import sys\n"
        "import fedstack.data, fedstack.trainers, fedstack.trainers.digits\n"
        "import fedstack.agent.adapters, fedstack.agent.adapters.sklearn\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "from fedstack.trainers import DigitsCNNTrainer\n"
        "assert 'torch' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# --- PyTorch trainers ---------------------------------------------------------------------


def test_mlp_fedavg_learns() -> None:
    trainers = [DigitsMLPTrainer(i, 2, "iid", seed=0) for i in range(2)]
    accuracies = fedavg(trainers, 8, evaluate_global_mlp)
    assert accuracies[-1] > 0.8
    assert accuracies[-1] > accuracies[0]


def test_cnn_learns() -> None:
    accuracies = fedavg([DigitsCNNTrainer(seed=0)], 3, evaluate_global_cnn)
    assert accuracies[-1] > 0.8


@pytest.mark.parametrize(
    ("cls", "evaluate"),
    [(DigitsMLPTrainer, evaluate_global_mlp), (DigitsCNNTrainer, evaluate_global_cnn)],
)
def test_torch_fit_returns_samples_metrics_and_state_dict(
    cls: type[DigitsMLPTrainer], evaluate: Callable[[Weights], Metrics]
) -> None:
    as_text: dict[str, Any] = {"index": "0", "num_agents": "2", "seed": "1"}
    trainer = cls(partition="dirichlet:0.5", **as_text)
    assert isinstance(trainer, Trainer)
    received = trainer.initial_weights()
    weights, num_samples, metrics = trainer.fit(received, {})
    assert num_samples == len(partition_digits(0, 2, "dirichlet:0.5", seed=1)[1])
    assert set(metrics) == METRIC_KEYS
    assert list(weights) == list(trainer.model.state_dict())
    assert {k: v.shape for k, v in weights.items()} == {k: v.shape for k, v in received.items()}
    assert metrics["global_accuracy"] == pytest.approx(evaluate(received)["accuracy"])
    assert trainer.evaluate(weights, {}) == pytest.approx(evaluate(weights))
    assert set(trainer.evaluate(weights, {})) == {"accuracy", "loss"}


def test_torch_trainers_are_deterministic_per_seed() -> None:
    a, b = DigitsMLPTrainer(seed=3), DigitsMLPTrainer(seed=3)
    other = DigitsMLPTrainer(seed=4)
    assert_same_weights(a.initial_weights(), b.initial_weights())
    assert not np.array_equal(a.initial_weights()["0.weight"], other.initial_weights()["0.weight"])
    start = a.initial_weights()
    assert_same_weights(a.fit(start, {})[0], b.fit(start, {})[0])


def test_torch_evaluate_rejects_a_foreign_model() -> None:
    linear = DigitsLinearTrainer().initial_weights()
    with pytest.raises(InvalidUpdate, match="missing"):
        evaluate_global_cnn(linear)
