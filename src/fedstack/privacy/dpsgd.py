"""Local differential privacy on agents: DP-SGD for PyTorch trainers through Opacus.

:class:`DPSGD` trains a ``torch.nn.Module`` on an agent's tensors with Opacus'
``PrivacyEngine.make_private``: Poisson-sampled minibatches (expected size ``batch_size``,
sampling rate ``batch_size / n``), every per-sample gradient clipped to L2 norm
``max_grad_norm`` and Gaussian noise of standard deviation ``noise_multiplier *
max_grad_norm`` added to their sum (Abadi et al., CCS 2016). Opacus' sampling rate is
``q = 1 / ceil(n / batch_size)`` and a pass over the data is ``ceil(n / batch_size)``
steps. One engine, and so one Opacus
accountant, lives as long as the trainer: the epsilon it reports (at ``delta``) is the
agent's local privacy spent over ALL its fits so far, which the trainers upload as the
metric ``dp_epsilon``. The accountant's history is part of the trainer's state
(:meth:`DPSGD.get_state`), so the simulator, which keeps trainer state per agent, keeps
counting.

The model is hooked, not wrapped (``wrap_model=False``), for the length of one fit: its
``state_dict`` names, and so the federation's tensor names, stay those of the plain model.
This module imports torch and opacus (extra ``opacus``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from fedstack.errors import ConfigError

__all__ = ["ACCOUNTANTS", "DPSGD"]

# Opacus' backward hooks on a first layer whose input needs no gradient (the data) make
# torch warn on every step; expected, and harmless (catch_warnings is not thread-safe, and
# the simulator trains agents in threads: a filter for this one message instead)
warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)

ACCOUNTANTS = ("rdp", "prv")
"""Opacus accountants a trainer may use: Renyi DP (``rdp``, the default, as the central
accountant) or privacy random variables (``prv``, tighter)."""


def _opacus() -> Any:
    try:
        import opacus
    except ImportError as exc:  # pragma: no cover - the extra is installed in CI
        raise ConfigError("DP-SGD needs Opacus: pip install 'fedstack[opacus]'") from exc
    return opacus


class DPSGD:
    """DP-SGD training of one agent's model with Opacus, and its local accountant.

    Args:
        noise_multiplier: Opacus' ``noise_multiplier`` (> 0).
        max_grad_norm: Per-sample gradient clipping norm (> 0).
        delta: The delta the epsilon is reported at (in (0, 1)).
        accountant: ``"rdp"`` or ``"prv"`` (:data:`ACCOUNTANTS`).

    Raises:
        ConfigError: A parameter is out of range, or Opacus is not installed.
    """

    def __init__(
        self,
        noise_multiplier: float,
        max_grad_norm: float = 1.0,
        delta: float = 1e-5,
        accountant: str = "rdp",
    ) -> None:
        z, c, d = float(noise_multiplier), float(max_grad_norm), float(delta)
        if not (math.isfinite(z) and z > 0):
            raise ConfigError(f"dp_noise_multiplier must be a number > 0, got {noise_multiplier!r}")
        if not (math.isfinite(c) and c > 0):
            raise ConfigError(f"dp_max_grad_norm must be a number > 0, got {max_grad_norm!r}")
        if not 0 < d < 1:
            raise ConfigError(f"dp_delta must be in (0, 1), e.g. 1e-5, got {delta!r}")
        if accountant not in ACCOUNTANTS:
            raise ConfigError(f"dp_accountant must be one of {', '.join(ACCOUNTANTS)}")
        opacus = _opacus()
        self.noise_multiplier = z
        self.max_grad_norm = c
        self.delta = d
        self.accountant_name = accountant
        with warnings.catch_warnings():  # "secure RNG turned off": see docs/privacy.md
            warnings.simplefilter("ignore")
            self.engine = opacus.PrivacyEngine(accountant=accountant)

    @property
    def history(self) -> list[tuple[float, float, int]]:
        """The accountant's ``(noise_multiplier, sample_rate, steps)`` entries."""
        return [(float(z), float(q), int(n)) for z, q, n in self.engine.accountant.history]

    @property
    def steps(self) -> int:
        """Noised optimizer steps taken so far, over all fits."""
        return sum(n for _, _, n in self.history)

    def epsilon(self) -> float:
        """Epsilon at :attr:`delta` so far (Opacus' accountant); 0 before any step."""
        if not self.engine.accountant.history:
            return 0.0
        with warnings.catch_warnings():  # opacus warns about optimal orders at the edges
            warnings.simplefilter("ignore")
            return float(self.engine.get_epsilon(self.delta))

    def get_state(self) -> dict[str, Any]:
        """The accountant's history as a float64 array of rows (z, q, steps)."""
        return {"dp_history": np.asarray(self.history, dtype=np.float64).reshape(-1, 3)}

    def set_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`get_state`'s history (refusing anything that is not one)."""
        rows = np.asarray(state.get("dp_history", np.zeros((0, 3))), dtype=np.float64)
        if rows.ndim != 2 or rows.shape[1] != 3 or not np.all(np.isfinite(rows)):
            raise ConfigError("trainer state dp_history must be rows of (z, q, steps)")
        self.engine.accountant.history = [(float(z), float(q), int(n)) for z, q, n in rows]

    def train(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        epochs: int,
        lr: float,
        batch_size: int,
        momentum: float = 0.0,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ) -> list[float]:
        """``epochs`` passes of DP-SGD over ``(x, y)`` (a pass: ``n / batch_size``
        Poisson-sampled steps); ``model`` is trained in place. Returns the losses of the
        last pass's non-empty batches."""
        n = int(len(y))
        if n == 0:
            raise ConfigError("DP-SGD needs at least one training sample")
        loss_fn = loss_fn or nn.functional.cross_entropy
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum)
        loader = torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(x, y), batch_size=min(batch_size, n)
        )
        model.train()  # Opacus validates the module in training mode
        with warnings.catch_warnings():  # secure_mode advice and the like: documented
            warnings.simplefilter("ignore")
            hooks, dp_optimizer, dp_loader = self.engine.make_private(
                module=model,
                optimizer=optimizer,
                data_loader=loader,
                noise_multiplier=self.noise_multiplier,
                max_grad_norm=self.max_grad_norm,
                poisson_sampling=True,
                wrap_model=False,
            )
        losses: list[float] = []
        try:
            for _ in range(epochs):
                losses = []
                for xb, yb in dp_loader:
                    dp_optimizer.zero_grad(set_to_none=True)
                    if len(yb) == 0:  # Poisson sampling drew nobody: still a noised step
                        loss = model(x[:1]).sum() * 0.0
                    else:
                        loss = loss_fn(model(xb), yb)
                        losses.append(float(loss.item()))
                    loss.backward()
                    dp_optimizer.step()
        finally:
            hooks.cleanup()
            for p in params:
                p.grad = None
        return losses


def from_trainer_args(
    noise_multiplier: float | None,
    max_grad_norm: float | None,
    delta: float | None,
    accountant: str | None,
) -> DPSGD | None:
    """A trainer's DP-SGD from its ``dp_*`` arguments (None: no DP-SGD).

    Raises:
        ConfigError: a DP-SGD argument without ``dp_noise_multiplier`` (it would train
            without DP, silently), or a value out of range.
    """
    if noise_multiplier is None:
        given = [
            name
            for name, value in (
                ("dp_max_grad_norm", max_grad_norm),
                ("dp_delta", delta),
                ("dp_accountant", accountant),
            )
            if value is not None
        ]
        if given:
            raise ConfigError(
                f"{', '.join(given)} given without dp_noise_multiplier: DP-SGD needs "
                "--trainer-arg dp_noise_multiplier=Z (else the agent trains without DP)"
            )
        return None
    return DPSGD(
        noise_multiplier,
        1.0 if max_grad_norm is None else max_grad_norm,
        1e-5 if delta is None else delta,
        "rdp" if accountant is None else accountant,
    )
