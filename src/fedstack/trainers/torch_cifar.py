"""The book's chapter-5/6 image-classification engine: a small CNN on CIFAR-10.

The model is the book's (and PyTorch's tutorial) CNN for 32x32 colour images::

    Conv2d(3, 6, 5) -> ReLU -> MaxPool 2 -> Conv2d(6, 16, 5) -> ReLU -> MaxPool 2
    -> Linear(400, 120) -> ReLU -> Linear(120, 84) -> ReLU -> Linear(84, 10)

Its weights are the module's ``state_dict`` (``conv1.weight``, ``conv1.bias``, ...,
``fc3.bias``: the book's ``conv1_0``, ``conv1_1``, ..., ``fc3_1``), see
:mod:`fedstack.agent.adapters.torch`.

Local training follows the book: every :meth:`~BookImageTrainer.fit` trains one pass
over ``samples_per_round`` training images drawn at random from the agent's data (8,000
of CIFAR-10's 50,000 by default, in 2,000 minibatches of 4, SGD with lr 0.001 and
momentum 0.9) and reports that count as its FedAvg weight. It measures the accuracy of
the **global** model it received and of its trained **local** model on the whole test
set (CIFAR-10: the 10,000 test images) and returns both as metrics (``global_accuracy``,
``local_accuracy``).

Data is read from a folder the user points to (:func:`fedstack.data.cifar.load_cifar10`:
the binary or python version, nothing downloaded, nothing unpickled). In the book every
agent holds the whole training set (``partition="full"``); any partition spec of
:func:`fedstack.data.partition.parse_partition` gives each agent a share instead.

The same engine runs offline on scikit-learn's bundled 8x8 digits (``dataset="digits"``,
the CNN of :func:`fedstack.trainers.torch_digits.build_cnn`), which is what the
chapter-6 example's quick version uses.

This module imports torch.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from fedstack.agent.adapters.torch import module_to_weights, weights_to_module
from fedstack.data.cifar import load_cifar10
from fedstack.data.digits import load_digits_split
from fedstack.data.partition import parse_partition
from fedstack.errors import ConfigError
from fedstack.trainers.digits import coerce_float, coerce_int
from fedstack.types import Metrics, Weights

if TYPE_CHECKING:
    from fedstack.privacy.dpsgd import DPSGD

log = logging.getLogger("fedstack.trainers")

__all__ = [
    "CIFAR_DIR_ENV",
    "BookImageTrainer",
    "CifarCNN",
    "CifarCNNTrainer",
    "build_cifar_cnn",
    "evaluate_global_cifar_cnn",
]

Dataset = Literal["cifar10", "digits"]

CIFAR_DIR_ENV = "CIFAR10_DIR"
"""Environment variable naming the CIFAR-10 folder for :func:`evaluate_global_cifar_cnn`."""

EVAL_CHUNK = 1000
"""Test images converted and evaluated at a time (bounds the float copy's memory)."""

# The book's hyperparameters for CIFAR-10; the digits values are those of
# fedstack.trainers.torch_digits.DigitsCNNTrainer (batch 4 at lr 0.001 needs far more
# rounds on 1,437 tiny images).
DEFAULTS: dict[str, dict[str, Any]] = {
    "cifar10": {"samples_per_round": 8000, "batch_size": 4, "lr": 0.001},
    "digits": {"samples_per_round": 512, "batch_size": 32, "lr": 0.05},
}


class CifarCNN(nn.Module):
    """The book's CNN for 3x32x32 images (input normalised to [-1, 1]), 10 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        return self.fc3(x)  # type: ignore[no-any-return]


def build_cifar_cnn() -> nn.Module:
    """A freshly initialised :class:`CifarCNN` (initialisation uses torch's global RNG)."""
    return CifarCNN()


def _cifar_input(images: npt.NDArray[Any]) -> torch.Tensor:
    """uint8 (N, 32, 32, 3) HWC -> float32 (N, 3, 32, 32) in [-1, 1], as in the book."""
    x = torch.from_numpy(np.array(images, dtype=np.uint8, order="C")).permute(0, 3, 1, 2).float()
    return x.div_(127.5).sub_(1.0).contiguous()


def _digits_input(features: npt.NDArray[Any]) -> torch.Tensor:
    return torch.from_numpy(np.array(features, dtype=np.float32, order="C"))


@torch.no_grad()
def _accuracy(
    model: nn.Module,
    x: npt.NDArray[Any],
    y: npt.NDArray[np.int64],
    to_input: Callable[[npt.NDArray[Any]], torch.Tensor],
) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``model`` on ``x``, ``y`` in chunks."""
    if len(y) == 0:
        raise ConfigError("cannot evaluate on an empty test set")
    model.train(False)  # inference mode
    loss_sum, correct = 0.0, 0
    for begin in range(0, len(y), EVAL_CHUNK):
        logits = model(to_input(x[begin : begin + EVAL_CHUNK]))
        target = torch.from_numpy(np.array(y[begin : begin + EVAL_CHUNK], dtype=np.int64))
        loss_sum += float(nn.functional.cross_entropy(logits, target, reduction="sum"))
        correct += int((logits.argmax(dim=1) == target).sum())
    return loss_sum / len(y), correct / len(y)


@torch.no_grad()
def _sgd_step(
    params: list[nn.Parameter], buffers: list[torch.Tensor | None], lr: float, momentum: float
) -> None:
    """One step of SGD with momentum, the update of ``torch.optim.SGD`` (no dampening,
    no weight decay): ``b = g`` on the first step, then ``b = momentum * b + g``;
    ``p -= lr * b``. Written out because importing ``torch.optim`` and its first step
    cost an agent process seconds (``torch._dynamo``) and its exit seconds more."""
    for i, p in enumerate(params):
        if p.grad is None:
            continue
        grad = p.grad
        if momentum:
            buf = buffers[i]
            if buf is None:
                buf = buffers[i] = grad.detach().clone()
            else:
                buf.mul_(momentum).add_(grad)
            grad = buf
        p.add_(grad, alpha=-lr)


@functools.lru_cache(maxsize=2)
def _cifar10(root: str, with_train: bool = True) -> tuple[npt.NDArray[Any], ...]:
    """CIFAR-10 from ``root`` (read-only arrays, cached per process); without the
    training batches when only the test set is needed."""
    arrays = load_cifar10(root) if with_train else load_cifar10(root, train_files=[])
    for a in arrays:
        a.setflags(write=False)
    return arrays


def _load(
    dataset: str, data_dir: str | os.PathLike[str] | None
) -> tuple[npt.NDArray[Any], npt.NDArray[np.int64], npt.NDArray[Any], npt.NDArray[np.int64]]:
    if dataset == "cifar10":
        if data_dir is None or str(data_dir).strip() == "":
            raise ConfigError(
                "CIFAR-10 needs data_dir: the folder holding cifar-10-batches-bin/ or "
                "cifar-10-batches-py/ (nothing is downloaded)"
            )
        path = Path(data_dir).expanduser().resolve()
        x_train, y_train, x_test, y_test = _cifar10(str(path))
        return x_train, y_train, x_test, y_test
    if dataset == "digits":
        if data_dir is not None:
            raise ConfigError("data_dir is for dataset 'cifar10': digits come with scikit-learn")
        return load_digits_split()
    raise ConfigError(f"dataset must be 'cifar10' or 'digits', got {dataset!r}")


class BookImageTrainer:
    """The book's image-classification engine as a fedstack Trainer.

    Args:
        index: This agent's position among ``num_agents`` (selects its share when
            ``partition`` is not ``"full"``, and its random stream).
        num_agents: Number of agents in the federation.
        dataset: ``"cifar10"`` (needs ``data_dir``) or ``"digits"`` (bundled, offline).
        data_dir: The CIFAR-10 folder (``cifar-10-batches-bin``/``-py`` or its parent).
        partition: ``"full"`` (every agent holds the whole training set, as in the
            book) or a spec of :func:`~fedstack.data.partition.parse_partition`
            (``"iid"``, ``"dirichlet:0.5"``, ...) for a share per agent.
        samples_per_round: Training images drawn at random (without replacement) from
            the agent's data for each fit; ``0`` means all of them. Default: 8,000 for
            CIFAR-10 (the book), 512 for digits. Capped at the agent's data size.
        epochs: Passes over the round's sample.
        lr: SGD learning rate (default 0.001 for CIFAR-10, 0.05 for digits).
        momentum: SGD momentum (the optimizer is fresh in every fit).
        batch_size: Minibatch size (default 4 for CIFAR-10, 32 for digits).
        seed: Seed of the partition, the initial model (identical for every agent) and
            each agent's sampling (different per ``index``).
        threads: torch intra-op threads for this process (``0``: leave torch's default).
        dp_noise_multiplier: Set: train with DP-SGD (Opacus, :mod:`fedstack.privacy.dpsgd`;
            Poisson batches of expected size ``batch_size`` from the round's sample) and
            report ``dp_epsilon``, this agent's local epsilon so far. None: plain SGD.
        dp_max_grad_norm: DP-SGD's per-sample gradient clipping norm.
        dp_delta: The delta of the reported ``dp_epsilon``.
        dp_accountant: Opacus' accountant, ``rdp`` or ``prv``.

    ``fit``'s ``config`` may override ``epochs``, ``lr``, ``batch_size`` and
    ``samples_per_round`` for one call.

    Raises:
        ConfigError: If an argument is invalid or the data cannot be read.
    """

    def __init__(
        self,
        index: int = 0,
        num_agents: int = 1,
        dataset: str = "cifar10",
        data_dir: str | os.PathLike[str] | None = None,
        partition: str = "full",
        samples_per_round: int | None = None,
        epochs: int = 1,
        lr: float | None = None,
        momentum: float = 0.9,
        batch_size: int | None = None,
        seed: int = 0,
        threads: int = 1,
        dp_noise_multiplier: float | None = None,
        dp_max_grad_norm: float | None = None,
        dp_delta: float | None = None,
        dp_accountant: str | None = None,
    ) -> None:
        self.dp: DPSGD | None = None
        """Local DP-SGD (Opacus) when ``dp_noise_multiplier`` is set, else None."""
        if any(v is not None for v in (dp_noise_multiplier, dp_max_grad_norm, dp_delta)) or (
            dp_accountant is not None
        ):
            from fedstack.privacy.dpsgd import from_trainer_args

            self.dp = from_trainer_args(
                dp_noise_multiplier, dp_max_grad_norm, dp_delta, dp_accountant
            )
        if not isinstance(dataset, str) or dataset not in DEFAULTS:
            raise ConfigError(f"dataset must be 'cifar10' or 'digits', got {dataset!r}")
        defaults = DEFAULTS[dataset]
        self.dataset = dataset
        self.index = coerce_int("index", index, minimum=0)
        self.num_agents = coerce_int("num_agents", num_agents, minimum=1)
        if self.index >= self.num_agents:
            raise ConfigError(f"index must be < num_agents ({self.num_agents}), got {self.index}")
        self.seed = coerce_int("seed", seed, minimum=0)
        self.samples_per_round = coerce_int(
            "samples_per_round",
            defaults["samples_per_round"] if samples_per_round is None else samples_per_round,
            minimum=0,
        )
        self.epochs = coerce_int("epochs", epochs, minimum=1)
        self.lr = coerce_float("lr", defaults["lr"] if lr is None else lr)
        self.momentum = coerce_float("momentum", momentum, positive=False)
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"momentum must be in [0, 1), got {momentum!r}")
        self.batch_size = coerce_int(
            "batch_size", defaults["batch_size"] if batch_size is None else batch_size, 1
        )
        threads = coerce_int("threads", threads, minimum=0)
        if threads:
            torch.set_num_threads(threads)

        x_train, y_train, self.x_test, self.y_test = _load(dataset, data_dir)
        self.partition = str(partition).strip().lower()
        if self.partition == "full":  # no copy: CIFAR-10's images are 150 MB
            self.x_train, self.y_train = x_train, y_train
        else:
            rows = parse_partition(self.partition)(y_train, self.num_agents, self.seed)[self.index]
            self.x_train, self.y_train = x_train[rows], y_train[rows]
        if len(self.y_train) == 0:
            raise ConfigError(
                f"agent {self.index} of {self.num_agents} has no training data with "
                f"partition {partition!r} ({len(y_train)} training images)"
            )
        self._to_input = _cifar_input if dataset == "cifar10" else _digits_input
        self._build = build_cifar_cnn if dataset == "cifar10" else _digits_cnn
        self._rng = np.random.default_rng([self.seed, self.index])
        self._capped = False  # the samples_per_round-above-the-data warning was given
        self.model = self._build()

    @property
    def num_samples(self) -> int:
        """Number of local training images (the pool each round's sample is drawn from)."""
        return len(self.y_train)

    def get_state(self) -> dict[str, Any]:
        """The sampling generator's state and, with DP-SGD, the privacy accountant's
        history (the simulator keeps it per agent)."""
        state: dict[str, Any] = {"rng": self._rng.bit_generator.state}
        if self.dp is not None:
            state.update(self.dp.get_state())
        return state

    def set_state(self, state: Mapping[str, Any]) -> None:
        self._rng.bit_generator.state = dict(state["rng"])
        if self.dp is not None:
            self.dp.set_state(dict(state))

    def initial_weights(self) -> Weights:
        """The model initialised from ``seed``: identical for every agent with that seed."""
        rng_state = torch.random.get_rng_state()
        try:
            torch.manual_seed(self.seed)
            return module_to_weights(self._build())
        finally:
            torch.random.set_rng_state(rng_state)

    def _hyper(self, config: Mapping[str, Any]) -> tuple[int, float, int, int]:
        epochs = coerce_int("epochs", config.get("epochs", self.epochs), minimum=1)
        lr = coerce_float("lr", config.get("lr", self.lr))
        batch = coerce_int("batch_size", config.get("batch_size", self.batch_size), 1)
        samples = coerce_int(
            "samples_per_round", config.get("samples_per_round", self.samples_per_round), 0
        )
        return epochs, lr, batch, samples

    def fit(self, weights: Weights, config: Mapping[str, Any]) -> tuple[Weights, int, Metrics]:
        """Train from the global ``weights`` on a random sample of the local data.

        Returns:
            ``(trained weights, images trained on, metrics)``; metrics are
            ``global_accuracy`` (received model on the test set), ``local_accuracy``
            (trained model on the test set), ``train_loss`` and ``train_seconds``.

        Raises:
            InvalidUpdate: If ``weights`` do not fit the model.
            ConfigError: If a config override is invalid.
        """
        epochs, lr, batch_size, samples = self._hyper(config)
        weights_to_module(self.model, weights)
        _, global_accuracy = _accuracy(self.model, self.x_test, self.y_test, self._to_input)

        start = time.perf_counter()
        n = len(self.y_train)
        count = n if samples == 0 else min(samples, n)
        if count < samples and not self._capped:
            self._capped = True  # said once
            log.warning(
                "samples_per_round %d is more than this agent's %d training images: "
                "training on all of them each round",
                samples,
                n,
            )
        chosen = np.sort(self._rng.choice(n, size=count, replace=False))
        x = self._to_input(self.x_train[chosen])
        y = torch.from_numpy(np.array(self.y_train[chosen], dtype=np.int64))
        if self.dp is not None:  # DP-SGD (Opacus) on the round's sample
            losses = self.dp.train(
                self.model, x, y, epochs=epochs, lr=lr, batch_size=batch_size,
                momentum=self.momentum,
            )  # fmt: skip
            return self._finish(losses, count, global_accuracy, start, self.dp)
        self.model.train()
        params = list(self.model.parameters())
        buffers: list[torch.Tensor | None] = [None] * len(params)  # fresh every fit
        losses = []
        for _ in range(epochs):
            losses = []
            order = torch.from_numpy(self._rng.permutation(count))
            for begin in range(0, count, batch_size):
                rows = order[begin : begin + batch_size]
                for p in params:
                    p.grad = None
                loss = nn.functional.cross_entropy(self.model(x[rows]), y[rows])
                torch.autograd.backward(loss)
                _sgd_step(params, buffers, lr, self.momentum)
                losses.append(loss.item())
        return self._finish(losses, count, global_accuracy, start, None)

    def _finish(
        self,
        losses: list[float],
        count: int,
        global_accuracy: float,
        start: float,
        dp: DPSGD | None,
    ) -> tuple[Weights, int, Metrics]:
        train_seconds = time.perf_counter() - start
        _, local_accuracy = _accuracy(self.model, self.x_test, self.y_test, self._to_input)
        metrics: Metrics = {
            "global_accuracy": global_accuracy,
            "local_accuracy": local_accuracy,
            "train_seconds": train_seconds,
        }
        if losses:  # (DP-SGD: every Poisson batch of the last pass may have been empty)
            metrics["train_loss"] = float(np.mean(losses))
        if dp is not None:  # this agent's local epsilon over all its fits so far
            metrics.update(dp_epsilon=dp.epsilon(), dp_delta=dp.delta, dp_steps=dp.steps)
        return module_to_weights(self.model), count, metrics

    def evaluate(self, weights: Weights, config: Mapping[str, Any]) -> Metrics:
        """``{"accuracy", "loss"}`` of a global model on the test set."""
        weights_to_module(self.model, weights)
        loss, accuracy = _accuracy(self.model, self.x_test, self.y_test, self._to_input)
        return {"accuracy": accuracy, "loss": loss}


def _digits_cnn() -> nn.Module:
    from fedstack.trainers.torch_digits import build_cnn

    return build_cnn()


class CifarCNNTrainer(BookImageTrainer):
    """:class:`BookImageTrainer` on CIFAR-10 with the book's settings::

        fedstack agent --trainer fedstack.trainers.torch_cifar:CifarCNNTrainer \\
            --trainer-arg data_dir=/data/cifar10 --trainer-arg index=0 --trainer-arg num_agents=2
    """

    def __init__(
        self,
        index: int = 0,
        num_agents: int = 1,
        data_dir: str | os.PathLike[str] | None = None,
        partition: str = "full",
        samples_per_round: int = 8000,
        epochs: int = 1,
        lr: float = 0.001,
        momentum: float = 0.9,
        batch_size: int = 4,
        seed: int = 0,
        threads: int = 1,
        dp_noise_multiplier: float | None = None,
        dp_max_grad_norm: float | None = None,
        dp_delta: float | None = None,
        dp_accountant: str | None = None,
    ) -> None:
        super().__init__(
            index, num_agents, "cifar10", data_dir, partition, samples_per_round, epochs, lr,
            momentum, batch_size, seed, threads, dp_noise_multiplier, dp_max_grad_norm,
            dp_delta, dp_accountant,
        )  # fmt: skip


def evaluate_global_cifar_cnn(weights: Weights) -> Metrics:
    """Central evaluation of a global :class:`CifarCNN` on CIFAR-10's test set.

    The folder is read from the environment variable ``CIFAR10_DIR`` (not
    ``FEDSTACK_...``: the CLI refuses variables of its own prefix it does not know; the
    aggregator's ``--evaluator`` takes a bare ``module:function``)::

        CIFAR10_DIR=/data/cifar10 fedstack aggregator \\
            --evaluator fedstack.trainers.torch_cifar:evaluate_global_cifar_cnn

    Returns:
        ``{"accuracy": ..., "loss": ...}`` on the test images.

    Raises:
        ConfigError: If the variable is unset or the folder holds no CIFAR-10.
        InvalidUpdate: If the weights do not fit the CNN.
    """
    root = os.environ.get(CIFAR_DIR_ENV, "")
    if not root.strip():
        raise ConfigError(f"set {CIFAR_DIR_ENV} to the CIFAR-10 folder for this evaluator")
    _, _, x_test, y_test = _cifar10(str(Path(root).expanduser().resolve()), with_train=False)
    model = build_cifar_cnn()
    weights_to_module(model, weights)
    loss, accuracy = _accuracy(model, x_test, y_test, _cifar_input)
    return {"accuracy": accuracy, "loss": loss}
