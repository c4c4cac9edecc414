"""PyTorch trainers on scikit-learn's digits: an MLP and a small CNN.

Both share the constructor and metrics of
:class:`~fedstack.trainers.digits.DigitsLinearTrainer`; their weights are the model's
``state_dict`` (see :mod:`fedstack.agent.adapters.torch`). This module imports torch.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from fedstack.agent.adapters.torch import module_to_weights, weights_to_module
from fedstack.data.digits import load_digits_split
from fedstack.trainers.digits import DigitsTrainerBase
from fedstack.types import Metrics, Weights

if TYPE_CHECKING:
    from fedstack.privacy.dpsgd import DPSGD

__all__ = [
    "DigitsCNNTrainer",
    "DigitsMLPTrainer",
    "build_cnn",
    "build_mlp",
    "evaluate_global_cnn",
    "evaluate_global_mlp",
]


def build_mlp() -> nn.Module:
    """The 64-128-10 multilayer perceptron (input: 64 pixel features in [0, 1])."""
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


class _ToImage(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, 1, 8, 8)


def build_cnn() -> nn.Module:
    """A small CNN for the 8x8 digit images (input: 64 pixel features in [0, 1]).

    Conv(1→16, 3x3) → ReLU → MaxPool 2 → Conv(16→32, 3x3) → ReLU → MaxPool 2
    → Linear(128→64) → ReLU → Linear(64→10).
    """
    return nn.Sequential(
        _ToImage(),
        nn.Conv2d(1, 16, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(128, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


@torch.no_grad()
def _loss_and_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    model.train(False)  # inference mode
    logits = model(x)
    loss = nn.functional.cross_entropy(logits, y).item()
    accuracy = (logits.argmax(dim=1) == y).float().mean().item()
    return float(loss), float(accuracy)


def _evaluate_global(model: nn.Module, weights: Weights) -> Metrics:
    weights_to_module(model, weights)
    _, _, x_test, y_test = load_digits_split()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 360 small samples: threads only add wake-ups and spinning
    try:
        loss, accuracy = _loss_and_accuracy(
            model, torch.from_numpy(x_test), torch.from_numpy(y_test)
        )
    finally:
        torch.set_num_threads(threads)
    return {"accuracy": accuracy, "loss": loss}


def evaluate_global_mlp(weights: Weights) -> Metrics:
    """Central evaluation of a global MLP on the digits test split.

    Args:
        weights: The MLP's ``state_dict`` as arrays.

    Returns:
        ``{"accuracy": ..., "loss": ...}`` on the held-out test split.

    Raises:
        InvalidUpdate: If the weights do not fit the MLP.
    """
    return _evaluate_global(build_mlp(), weights)


def evaluate_global_cnn(weights: Weights) -> Metrics:
    """Central evaluation of a global CNN on the digits test split.

    Used by ``--evaluator fedstack.trainers.torch_digits:evaluate_global_cnn``.

    Args:
        weights: The CNN's ``state_dict`` as arrays.

    Returns:
        ``{"accuracy": ..., "loss": ...}`` on the held-out test split.

    Raises:
        InvalidUpdate: If the weights do not fit the CNN.
    """
    return _evaluate_global(build_cnn(), weights)


class _TorchDigitsTrainer(DigitsTrainerBase):
    """Minibatch SGD on a torch model; subclasses define :meth:`build`."""

    momentum: float = 0.0
    """SGD momentum (the optimizer, and so its momentum buffer, is fresh in every fit)."""

    def __init__(
        self,
        index: int = 0,
        num_agents: int = 1,
        partition: str = "iid",
        seed: int = 0,
        epochs: int = 1,
        lr: float = 0.05,
        batch_size: int = 32,
        dp_noise_multiplier: float | None = None,
        dp_max_grad_norm: float | None = None,
        dp_delta: float | None = None,
        dp_accountant: str | None = None,
    ) -> None:
        super().__init__(index, num_agents, partition, seed, epochs, lr, batch_size)
        torch.set_num_threads(1)
        self.dp: DPSGD | None = None
        """Local DP-SGD (Opacus) when ``dp_noise_multiplier`` is set, else None."""
        if any(v is not None for v in (dp_noise_multiplier, dp_max_grad_norm, dp_delta)) or (
            dp_accountant is not None
        ):
            from fedstack.privacy.dpsgd import from_trainer_args

            self.dp = from_trainer_args(
                dp_noise_multiplier, dp_max_grad_norm, dp_delta, dp_accountant
            )
        self.model = self.build()
        self._generator = torch.Generator().manual_seed(self.seed * 1000 + self.index)
        self._x = torch.from_numpy(self.x_train.copy())
        self._y = torch.from_numpy(self.y_train.copy())
        self._x_test = torch.from_numpy(self.x_test.copy())
        self._y_test = torch.from_numpy(self.y_test.copy())

    def build(self) -> nn.Module:
        """A freshly initialised model (initialisation depends on the global RNG)."""
        raise NotImplementedError

    @classmethod
    def warm_up(cls) -> None:
        """Pay the one-time costs in this process (PyTorch's lazy imports on the first
        optimizer step, the digits split): ``fedstack agents`` calls it once in the parent
        before forking the agents, so no agent pays them again."""
        load_digits_split()
        model = cls.build(cls.__new__(cls))
        loss = nn.functional.cross_entropy(model(torch.zeros(2, 64)), torch.zeros(2).long())
        torch.autograd.backward(loss)
        if cls.momentum:  # only then does fit use torch.optim (and its lazy imports)
            torch.optim.SGD(model.parameters(), lr=0.0, momentum=cls.momentum).step()

    def get_state(self) -> dict[str, Any]:
        """What changes between fits (the minibatch order's generator; with DP-SGD, the
        privacy accountant's history): the simulator keeps it per agent, so an agent
        trains the same, and keeps counting its epsilon, in whichever worker it runs."""
        state: dict[str, Any] = {"generator": self._generator.get_state().numpy().copy()}
        if self.dp is not None:
            state.update(self.dp.get_state())
        return state

    def set_state(self, state: Mapping[str, Any]) -> None:
        self._generator.set_state(
            torch.from_numpy(np.asarray(state["generator"], dtype=np.uint8).copy())
        )
        if self.dp is not None:
            self.dp.set_state(dict(state))

    def initial_weights(self) -> Weights:
        """The model initialised from ``seed``: identical for every agent with that seed.

        Returns:
            The ``state_dict`` as numpy arrays.
        """
        state = torch.random.get_rng_state()
        try:
            torch.manual_seed(self.seed)
            return module_to_weights(self.build())
        finally:
            torch.random.set_rng_state(state)

    def fit(self, weights: Weights, config: Mapping[str, Any]) -> tuple[Weights, int, Metrics]:
        """Train from the global ``weights`` on this agent's share.

        Args:
            weights: The received global model (``state_dict`` arrays).
            config: Optional per-call overrides ``epochs``, ``lr``, ``batch_size``.

        Returns:
            ``(trained weights, number of local samples, metrics)`` with metrics
            ``train_loss``, ``local_accuracy``, ``global_accuracy`` (of the received
            model on the test split) and ``train_seconds``.

        Raises:
            InvalidUpdate: If ``weights`` do not fit the model.
            ConfigError: If a config override is invalid.
        """
        epochs, lr, batch_size = self._hyper(config)
        weights_to_module(self.model, weights)
        _, global_accuracy = _loss_and_accuracy(self.model, self._x_test, self._y_test)

        start = time.perf_counter()
        if self.dp is not None:
            return self._fit_private(self.dp, epochs, lr, batch_size, global_accuracy, start)
        self.model.train()
        params = list(self.model.parameters())
        # plain SGD needs no optimizer object: the same update as torch.optim.SGD
        # (param.add_(grad, alpha=-lr)) without importing torch._dynamo on the first fit
        optimizer = (
            torch.optim.SGD(params, lr=lr, momentum=self.momentum) if self.momentum else None
        )
        n = len(self._y)
        batch_losses: list[float] = []
        for _ in range(epochs):
            batch_losses = []
            order = torch.randperm(n, generator=self._generator)
            for begin in range(0, n, batch_size):
                rows = order[begin : begin + batch_size]
                for p in params:
                    p.grad = None
                loss = nn.functional.cross_entropy(self.model(self._x[rows]), self._y[rows])
                torch.autograd.backward(loss)
                if optimizer is not None:
                    optimizer.step()
                else:
                    with torch.no_grad():
                        for p in params:
                            if p.grad is not None:
                                p.add_(p.grad, alpha=-lr)
                batch_losses.append(loss.item())
        train_seconds = time.perf_counter() - start

        _, local_accuracy = _loss_and_accuracy(self.model, self._x, self._y)
        metrics: Metrics = {
            "train_loss": float(np.mean(batch_losses)),
            "local_accuracy": local_accuracy,
            "global_accuracy": global_accuracy,
            "train_seconds": train_seconds,
        }
        return module_to_weights(self.model), n, metrics

    def _fit_private(
        self, dp: DPSGD, epochs: int, lr: float, batch_size: int, global_acc: float, start: float
    ) -> tuple[Weights, int, Metrics]:
        """:meth:`fit` with DP-SGD (Opacus): metrics also ``dp_epsilon`` (this agent's
        local epsilon at ``dp_delta`` over all its fits so far) and ``dp_steps``."""
        losses = dp.train(
            self.model,
            self._x,
            self._y,
            epochs=epochs,
            lr=lr,
            batch_size=batch_size,
            momentum=self.momentum,
        )
        train_seconds = time.perf_counter() - start
        _, local_accuracy = _loss_and_accuracy(self.model, self._x, self._y)
        metrics: Metrics = {
            "local_accuracy": local_accuracy,
            "global_accuracy": global_acc,
            "train_seconds": train_seconds,
            "dp_epsilon": dp.epsilon(),
            "dp_delta": dp.delta,
            "dp_steps": dp.steps,
        }
        if losses:  # (every batch of the last pass empty: no loss to report)
            metrics["train_loss"] = float(np.mean(losses))
        return module_to_weights(self.model), len(self._y), metrics

    def evaluate(self, weights: Weights, config: Mapping[str, Any]) -> Metrics:
        """Evaluate a global model on the held-out digits test split.

        Args:
            weights: The model's ``state_dict`` arrays.
            config: Unused.

        Returns:
            ``{"accuracy": ..., "loss": ...}``.

        Raises:
            InvalidUpdate: If ``weights`` do not fit the model.
        """
        weights_to_module(self.model, weights)
        loss, accuracy = _loss_and_accuracy(self.model, self._x_test, self._y_test)
        return {"accuracy": accuracy, "loss": loss}


class DigitsMLPTrainer(_TorchDigitsTrainer):
    """A 64-128-10 MLP on digits: 1 local epoch of plain SGD (lr 0.05, batch 32) by default.

    Args:
        index: This agent's position among ``num_agents`` (selects its data share).
        num_agents: Number of agents sharing the training split.
        partition: a spec of :func:`fedstack.data.partition.parse_partition` (``"iid"``,
            ``"dirichlet:ALPHA"``, ``"shards:K"``, ``"quantity:ALPHA"``, ``"keep:sel=S,def=D"``).
        seed: Seed of the partition, the initial model and the minibatch order.
        epochs: Local epochs per ``fit``.
        lr: SGD learning rate.
        batch_size: Minibatch size (with DP-SGD: the expected size of Poisson batches).
        dp_noise_multiplier: Set: train with DP-SGD (Opacus; :mod:`fedstack.privacy.dpsgd`)
            with this noise multiplier, and report ``dp_epsilon``. None: plain SGD.
        dp_max_grad_norm: DP-SGD's per-sample gradient clipping norm.
        dp_delta: The delta of the reported ``dp_epsilon``.
        dp_accountant: Opacus' accountant, ``rdp`` or ``prv``.
    """

    def build(self) -> nn.Module:
        """A freshly initialised MLP."""
        return build_mlp()


class DigitsCNNTrainer(_TorchDigitsTrainer):
    """A small CNN on the 8x8 digit images.

    Defaults: 2 local epochs of SGD with momentum 0.9, lr 0.05, batch 32 (plain SGD at
    that rate needs many more rounds to get the CNN off the ground).

    Args:
        index: This agent's position among ``num_agents`` (selects its data share).
        num_agents: Number of agents sharing the training split.
        partition: a spec of :func:`fedstack.data.partition.parse_partition` (``"iid"``,
            ``"dirichlet:ALPHA"``, ``"shards:K"``, ``"quantity:ALPHA"``, ``"keep:sel=S,def=D"``).
        seed: Seed of the partition, the initial model and the minibatch order.
        epochs: Local epochs per ``fit``.
        lr: SGD learning rate.
        batch_size: Minibatch size.
        dp_noise_multiplier: Set: DP-SGD (Opacus), as for :class:`DigitsMLPTrainer`.
        dp_max_grad_norm: DP-SGD's per-sample gradient clipping norm.
        dp_delta: The delta of the reported ``dp_epsilon``.
        dp_accountant: Opacus' accountant, ``rdp`` or ``prv``.
    """

    momentum = 0.9

    def __init__(
        self,
        index: int = 0,
        num_agents: int = 1,
        partition: str = "iid",
        seed: int = 0,
        epochs: int = 2,
        lr: float = 0.05,
        batch_size: int = 32,
        dp_noise_multiplier: float | None = None,
        dp_max_grad_norm: float | None = None,
        dp_delta: float | None = None,
        dp_accountant: str | None = None,
    ) -> None:
        super().__init__(
            index,
            num_agents,
            partition,
            seed,
            epochs,
            lr,
            batch_size,
            dp_noise_multiplier,
            dp_max_grad_norm,
            dp_delta,
            dp_accountant,
        )

    def build(self) -> nn.Module:
        """A freshly initialised CNN."""
        return build_cnn()
