"""Multinomial logistic regression on FedProx's Synthetic(alpha, beta) data, one device per
agent, generated where the agent trains (:func:`fedstack.data.synthetic.synthetic_device`):
the trainer for simulations with thousands of agents::

    fedstack sim --agents 10000 --per-round 100 --rounds 10 \\
        --trainer fedstack.trainers.synthetic:SyntheticTrainer --trainer-arg max_samples=200

The model is ``softmax(x @ coef.T + intercept)``, float32 ``coef (10, 60)`` and
``intercept (10,)``, trained by minibatch SGD (the paper: lr 0.01, batch 10, E = 20).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from fedstack.data.synthetic import DIMENSION, NUM_CLASSES, parse_synthetic, synthetic_device
from fedstack.errors import InvalidUpdate
from fedstack.trainers.digits import _loss_and_accuracy, coerce_float, coerce_int, softmax_sgd
from fedstack.types import Metrics, Weights

__all__ = ["SyntheticTrainer"]


class SyntheticTrainer:
    """One Synthetic(alpha, beta) device: 90 % of its samples train, 10 % test.

    Args:
        index: the device (agent) index.
        num_agents: number of agents (devices are independent of it).
        data: ``"ALPHA,BETA"`` (e.g. ``"1,1"``) or ``"iid"``.
        seed: seed of the data, the initial model and the minibatch order.
        epochs, lr, batch_size: local SGD.
        max_samples: cap of the device's sample count (None: uncapped LogNormal draw).

    ``--trainer-arg`` values arrive typed (JSON); numbers given as strings are still
    converted.
    """

    def __init__(
        self,
        index: int = 0,
        num_agents: int = 1,
        data: str = "1,1",
        seed: int = 0,
        epochs: int = 1,
        lr: float = 0.01,
        batch_size: int = 10,
        max_samples: int | None = None,
    ) -> None:
        self.index = coerce_int("index", index, minimum=0)
        self.num_agents = coerce_int("num_agents", num_agents, minimum=1)
        self.seed = coerce_int("seed", seed)
        self.epochs = coerce_int("epochs", epochs, minimum=1)
        self.lr = coerce_float("lr", lr)
        self.batch_size = coerce_int("batch_size", batch_size, minimum=1)
        cap = (
            None
            if str(max_samples).strip().lower() in ("none", "")
            else coerce_int("max_samples", max_samples, minimum=2)
        )
        alpha, beta, iid = parse_synthetic(str(data))
        dev = synthetic_device(alpha, beta, self.index, seed=self.seed, iid=iid, max_samples=cap)
        order = np.random.default_rng([self.seed, self.index, 1]).permutation(len(dev.y))
        cut = max(1, int(0.9 * len(dev.y)))
        x = dev.x.astype(np.float32)
        self.x_train, self.y_train = x[order[:cut]], dev.y[order[:cut]]
        self.x_test, self.y_test = x[order[cut:]], dev.y[order[cut:]]
        self._rng = np.random.default_rng([self.seed, self.index, 2])

    def initial_weights(self) -> Weights:
        """Zeros (the FedProx reference's initial model)."""
        return {
            "coef": np.zeros((NUM_CLASSES, DIMENSION), np.float32),
            "intercept": np.zeros(NUM_CLASSES, np.float32),
        }

    def _check(self, weights: Weights) -> tuple[Any, Any]:
        if set(weights) != {"coef", "intercept"}:
            raise InvalidUpdate(f"expected coef and intercept, got {sorted(weights)}")
        coef = np.asarray(weights["coef"], dtype=np.float32)
        intercept = np.asarray(weights["intercept"], dtype=np.float32)
        if coef.shape != (NUM_CLASSES, DIMENSION) or intercept.shape != (NUM_CLASSES,):
            raise InvalidUpdate(
                f"coef {coef.shape} / intercept {intercept.shape} do not fit "
                f"({NUM_CLASSES}, {DIMENSION}) / ({NUM_CLASSES},)"
            )
        return coef, intercept

    def fit(self, weights: Weights, config: Mapping[str, Any]) -> tuple[Weights, int, Metrics]:
        coef, intercept = self._check(weights)
        epochs = coerce_int("epochs", config.get("epochs", self.epochs), minimum=1)
        start = time.perf_counter()
        coef, intercept, losses = softmax_sgd(
            self.x_train,
            self.y_train,
            coef,
            intercept,
            epochs=epochs,
            lr=self.lr,
            batch_size=self.batch_size,
            rng=self._rng,
        )
        seconds = time.perf_counter() - start
        _, accuracy = _loss_and_accuracy(self.x_train, self.y_train, coef, intercept)
        return (
            {"coef": coef, "intercept": intercept},
            len(self.y_train),
            {
                "train_loss": float(np.mean(losses)),
                "local_accuracy": accuracy,
                "train_seconds": seconds,
            },
        )

    def evaluate(self, weights: Weights, config: Mapping[str, Any]) -> Metrics:
        coef, intercept = self._check(weights)
        if len(self.y_test) == 0:
            return {"accuracy": float("nan"), "loss": float("nan")}
        loss, accuracy = _loss_and_accuracy(self.x_test, self.y_test, coef, intercept)
        return {"accuracy": accuracy, "loss": loss}

    def get_state(self) -> dict[str, Any]:
        return {"rng": self._rng.bit_generator.state}

    def set_state(self, state: Mapping[str, Any]) -> None:
        self._rng.bit_generator.state = dict(state["rng"])
