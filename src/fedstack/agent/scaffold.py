"""SCAFFOLD, the agent side: control-variate bookkeeping for a PyTorch training loop.

Karimireddy et al., "SCAFFOLD: Stochastic Controlled Averaging for Federated Learning",
ICML 2020, Algorithm 1. The server part is :class:`fedstack.strategies.scaffold.Scaffold`.
Per round, with the global model ``x`` and the server control ``c`` (the global model's
extra arrays ``"c/<tensor>"``)::

    client = ScaffoldClient()                    # once; it keeps c_i between rounds
    ...
    c = agent.global_extra                       # {"c/<tensor>": ...}
    x = module_to_weights(model)                 # after loading the global model
    for step in range(K):
        loss = ...; optimizer.zero_grad(); loss.backward()
        client.correct_gradients(model, c)       # g <- g - c_i + c
        optimizer.step()                         # plain SGD with rate lr
    y = module_to_weights(model)
    dc = client.update_control(x, y, steps=K, lr=lr)   # {"dc/<tensor>": c_i+ - c_i}
    agent.send_trained_model(y, num_samples, metrics, extra=dc)

The control update is the paper's option II, ``c_i+ = c_i - c + (x - y_i) / (K eta_l)``,
exact for plain SGD with a constant rate (with momentum, weight decay or a schedule it is
the usual approximation). Controls exist for every floating-point tensor of the weights
(the server's convention); those of buffers (e.g. batch-norm running statistics) are carried
but never used, since only parameters with a gradient are corrected.

torch is imported inside the functions that need it: importing this module does not.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from fedstack.types import Array, Weights

__all__ = ["C_PREFIX", "DC_PREFIX", "ScaffoldClient"]

C_PREFIX = "c/"
DC_PREFIX = "dc/"

F64 = np.ndarray[Any, np.dtype[np.float64]]


def _control_of(c_global: Mapping[str, Array], name: str) -> Array | None:
    return c_global.get(C_PREFIX + name)


class ScaffoldClient:
    """An agent's SCAFFOLD state: its control variate ``c_i``, kept across rounds.

    Args:
        control: A previous ``c_i`` (``{tensor name: array}``, e.g. :attr:`control` saved
            from an earlier run); default: zeros (the paper's initialisation).
    """

    def __init__(self, control: Mapping[str, Array] | None = None) -> None:
        self.control: dict[str, F64] = {
            k: np.array(v, dtype=np.float64) for k, v in (control or {}).items()
        }
        """``c_i`` per tensor name, float64 (missing names are zero)."""
        self._source: Mapping[str, Array] | None = None
        self._corrections: dict[str, Any] = {}

    @property
    def last_global_control(self) -> Mapping[str, Array] | None:
        """The ``c`` last passed to :meth:`correct_gradients` (or None)."""
        return self._source

    def correct_gradients(self, model: Any, c_global: Mapping[str, Array]) -> None:
        """Add ``c - c_i`` to the gradient of every parameter of ``model`` that has one.

        Call after ``loss.backward()`` and before ``optimizer.step()``: the step then uses
        SCAFFOLD's corrected gradient ``g - c_i + c``. The corrections are converted to
        tensors once per ``c_global`` object and reused (pass the dict received with the
        round's global model; do not modify it in place during the round).

        Args:
            model: A ``torch.nn.Module``.
            c_global: The server control, ``{"c/<tensor>": array}`` as received (missing
                names count as zero).

        Raises:
            ValueError: If a control's shape differs from its parameter's.
        """
        import torch

        if c_global is not self._source:
            self._source = c_global
            self._corrections = {}
        with torch.no_grad():
            for name, param in model.named_parameters():
                grad = param.grad
                if grad is None:
                    continue
                corr = self._corrections.get(name)
                if corr is False:  # no control on either side: nothing to add
                    continue
                if corr is None or corr.device != grad.device or corr.dtype != grad.dtype:
                    arr = self._correction(name, tuple(param.shape), c_global)
                    if arr is None:
                        self._corrections[name] = False
                        continue
                    corr = torch.from_numpy(arr).to(device=grad.device, dtype=grad.dtype)
                    self._corrections[name] = corr
                grad.add_(corr)

    def _correction(
        self, name: str, shape: tuple[int, ...], c_global: Mapping[str, Array]
    ) -> F64 | None:
        c = _control_of(c_global, name)
        ci = self.control.get(name)
        if c is None and ci is None:
            return None
        out = np.zeros(shape, dtype=np.float64)
        for arr, sign in ((c, 1.0), (ci, -1.0)):
            if arr is None:
                continue
            a = np.asarray(arr, dtype=np.float64)
            if a.shape != shape:
                raise ValueError(
                    f"scaffold control for {name!r} has shape {a.shape}, the parameter {shape}"
                )
            out += sign * a
        return out

    def update_control(
        self,
        global_weights: Mapping[str, Array],
        local_weights: Mapping[str, Array],
        steps: int,
        lr: float,
        c_global: Mapping[str, Array] | None = None,
    ) -> Weights:
        """Update ``c_i`` by option II and return ``Delta c_i`` to upload as extra arrays.

        ``c_i+ = c_i - c + (x - y_i) / (K eta_l)``, ``Delta c_i = c_i+ - c_i``.

        Args:
            global_weights: ``x``, the global model the round started from.
            local_weights: ``y_i``, the model after the local steps.
            steps: ``K``, the number of local steps taken (positive).
            lr: ``eta_l``, the local learning rate (positive).
            c_global: ``c`` as received (``{"c/<tensor>": array}``); default: the one last
                passed to :meth:`correct_gradients`.

        Returns:
            ``{"dc/<tensor>": Delta c_i}`` for every floating-point tensor of
            ``global_weights``, in the tensor's dtype (at least float32).

        Raises:
            ValueError: If ``steps`` or ``lr`` is not positive, no ``c`` is known, or shapes
                differ.
        """
        if steps <= 0 or not lr > 0:
            raise ValueError(f"steps and lr must be positive, got {steps!r} and {lr!r}")
        c_all = c_global if c_global is not None else self._source
        if c_all is None:
            raise ValueError(
                "no server control known: pass c_global (the round's extra "
                "arrays) or call correct_gradients first"
            )
        scale = 1.0 / (float(steps) * float(lr))
        out: Weights = {}
        new_control: dict[str, F64] = {}
        for name, x in global_weights.items():
            xa = np.asarray(x)
            if xa.dtype.kind != "f":
                continue
            y = np.asarray(local_weights[name])
            if y.shape != xa.shape:
                raise ValueError(f"{name!r}: local shape {y.shape}, global {xa.shape}")
            dc = np.subtract(xa, y, dtype=np.float64)
            dc *= scale  # (x - y_i) / (K eta_l)
            c = _control_of(c_all, name)
            if c is not None:
                ca = np.asarray(c, dtype=np.float64)
                if ca.shape != xa.shape:
                    raise ValueError(
                        f"scaffold control for {name!r} has shape {ca.shape}, the tensor {xa.shape}"
                    )
                dc -= ca
            ci = self.control.get(name)
            if ci is not None and ci.shape != xa.shape:
                raise ValueError(
                    f"the agent's control for {name!r} has shape {ci.shape}, the tensor {xa.shape}"
                )
            new_control[name] = dc.copy() if ci is None else ci + dc
            out[DC_PREFIX + name] = dc.astype(np.result_type(xa.dtype, np.float32))
        self.control.update(new_control)
        self._corrections = {}
        return out
