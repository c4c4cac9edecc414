"""Agent-side pieces of FedProx and FedCurv for PyTorch training loops.

torch is imported inside the functions, so importing this module does not need torch.
The aggregator's strategy tells the agents what to apply through
``Agent.federation_config`` (``fedprox_mu``, ``fedprox_gamma``, ``fedcurv_lambda``,
``fedcurv_eps``) and ships FedCurv's summed statistics as ``Agent.global_extra``.

**FedProx** (Li et al., MLSys 2020; see :mod:`fedstack.strategies.regularized`)::

    prox = ProximalTerm(model, agent.global_weights, mu)   # once per round
    stop = GammaInexact(gamma)                             # optional
    for epoch in range(max_epochs):
        for x, y in loader:
            opt.zero_grad()
            loss = loss_fn(model(x), y) + prox()           # h_k = F_k + mu/2 ||w - w_t||^2
            loss.backward()
            stop.accumulate(model)
            opt.step()
        if stop.end_epoch():
            break

The proximal term is ``(mu / 2) ||w - w_t||^2`` with gradient ``mu (w - w_t)`` (the paper's
form; the book's code omits the 1/2, so its checklist writes the gradient
``2 mu (w - w_t)``). It covers the trainable parameters (not buffers) and is built from the
*live* parameters, so it does shape the gradients (the book's code builds it from the
detached ``param.data``, a no-op).

**FedCurv** (Shoham et al. 2019)::

    penalty = FedCurvPenalty(model, agent.global_extra, own_extra, lam, eps)  # per round
    ... loss = loss_fn(model(x), y) + penalty() ...
    fisher = fisher_diagonal(model, loader, loss_fn, max_batches=50)
    own_extra = fedcurv_extras(model, fisher)      # "u/<name>", "v/<name>"
    agent.send_trained_model(module_to_weights(model), n, metrics, extra=own_extra)

The penalty is ``lam * sum (w^2 U - 2 w V + V^2 / (U + eps))`` with the *other* agents'
sums ``U = sum u - u_own``, ``V = sum v - v_own``; its gradient is ``2 lam (w U - V)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from fedstack.types import Weights

if TYPE_CHECKING:
    import torch

__all__ = [
    "FedCurvPenalty",
    "GammaInexact",
    "ProximalTerm",
    "fedcurv_extras",
    "fedcurv_penalty",
    "fisher_diagonal",
    "grad_norm",
    "proximal_term",
]

U_PREFIX = "u/"
V_PREFIX = "v/"


def _trainable(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _as_float64(value: Any) -> np.ndarray[Any, np.dtype[np.float64]]:
    """A numpy array or torch tensor as a float64 numpy copy."""
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().to("cpu").double().numpy()
    return np.array(value, dtype=np.float64)


def _to_param(value: np.ndarray[Any, Any], param: torch.Tensor) -> torch.Tensor:
    import torch

    return torch.from_numpy(np.ascontiguousarray(value, dtype=np.float64)).to(
        device=param.device, dtype=param.dtype
    )


def _check_shape(name: str, value: np.ndarray[Any, Any], param: torch.Tensor) -> None:
    if tuple(value.shape) != tuple(param.shape):
        raise ValueError(
            f"{name!r} has shape {tuple(value.shape)}, the parameter has {tuple(param.shape)}"
        )


def _number(name: str, value: float, high: float | None = None) -> float:
    v = float(value)
    if not math.isfinite(v) or v < 0 or (high is not None and v > high):
        rng = f"[0, {high:g}]" if high is not None else ">= 0"
        raise ValueError(f"{name} must be {'in ' if high is not None else ''}{rng}, got {value!r}")
    return v


# ---------------------------------------------------------------------------- FedProx
class ProximalTerm:
    """FedProx's ``(mu / 2) ||w - w_t||^2`` over the model's trainable parameters.

    The global weights are converted to tensors once (at construction); call the object
    for each batch and add the result to the loss.

    Args:
        model: The local model being trained (its live parameters are used).
        global_weights: The global model ``w_t`` the round started from, by parameter name
            (numpy arrays or tensors; e.g. ``Agent.global_weights``). Names of buffers or
            other tensors are ignored; every trainable parameter must be present.
        mu: The proximal coefficient (>= 0; e.g. ``federation_config["fedprox_mu"]``).
            ``mu = 0`` gives a zero term (plain FedAvg training).

    Raises:
        KeyError: If a trainable parameter has no global value.
        ValueError: If ``mu`` is negative or not finite, or a shape differs.
    """

    def __init__(
        self, model: torch.nn.Module, global_weights: Mapping[str, Any], mu: float
    ) -> None:
        self.mu = _number("mu", mu)
        self._params = _trainable(model)
        missing = [n for n, _ in self._params if n not in global_weights]
        if missing:
            raise KeyError(f"global weights lack the parameters {missing[:5]}")
        self._anchors: list[torch.Tensor] = []
        for name, p in self._params:
            g = _as_float64(global_weights[name])
            _check_shape(name, g, p)
            self._anchors.append(_to_param(g, p))

    def __call__(self) -> torch.Tensor:
        import torch

        if not self._params:
            return torch.zeros(())
        first = self._params[0][1]
        if self.mu == 0.0:
            return torch.zeros((), dtype=first.dtype, device=first.device)
        total = torch.zeros((), dtype=first.dtype, device=first.device)
        for (_, p), g in zip(self._params, self._anchors, strict=True):
            total = total + torch.sum((p - g) ** 2)
        return 0.5 * self.mu * total


def proximal_term(
    model: torch.nn.Module, global_weights: Mapping[str, Any], mu: float
) -> torch.Tensor:
    """``(mu / 2) sum_params ||w - w_t||^2``: FedProx's proximal term, to add to the loss.

    Its gradient with respect to each parameter is ``mu (w - w_t)``. Converts
    ``global_weights`` on every call: in a training loop build a :class:`ProximalTerm`
    once per round instead.
    """
    return ProximalTerm(model, global_weights, mu)()


def grad_norm(model: torch.nn.Module) -> float:
    """The Euclidean norm of the trainable parameters' current ``.grad`` (missing: 0)."""
    total = 0.0
    for _, p in _trainable(model):
        if p.grad is not None:
            total += float(p.grad.detach().double().pow(2).sum())
    return math.sqrt(total)


class GammaInexact:
    """FedProx's gamma-inexact stopping rule for the local solver.

    Local training of ``h_k(w) = F_k(w) + (mu/2)||w - w_t||^2`` may stop once

        ||grad h_k(w)|| <= gamma ||grad h_k(w_t)||        (Li et al. 2020, Definition 2)

    (at ``w = w_t`` the proximal gradient vanishes, so the reference is ``||grad F_k(w_t)||``).
    The first norm observed is the reference; each later one is compared with
    ``gamma`` times it. Two ways to feed norms:

    - :meth:`observe` with any norm you compute (e.g. the full local gradient);
    - :meth:`accumulate` after each ``backward()`` and :meth:`end_epoch` after each epoch:
      the norm of the epoch's mean gradient (the book's variant: stop when the
      epoch-accumulated gradient falls below gamma times the first epoch's).

    ``gamma = 0`` asks for an exact solve: the rule never stops training (use the epoch
    budget). ``gamma = 1`` stops as soon as the gradient is no larger than at the start.

    Args:
        gamma: In [0, 1] (e.g. ``federation_config["fedprox_gamma"]``; the book uses 0.9).
    """

    def __init__(self, gamma: float) -> None:
        self.gamma = _number("gamma", gamma, high=1.0)
        self.reference: float | None = None
        self.last: float | None = None
        self.observed = 0
        self._sum: list[torch.Tensor] = []
        self._batches = 0

    def observe(self, norm: float) -> bool:
        """Record a gradient norm; True when local training may stop."""
        norm = float(norm)
        self.observed += 1
        self.last = norm
        if self.reference is None:
            self.reference = norm
            return False
        return self.gamma > 0 and norm <= self.gamma * self.reference

    def accumulate(self, model: torch.nn.Module) -> None:
        """Add the trainable parameters' current gradients to this epoch's sum."""
        import torch

        grads = [
            torch.zeros_like(p, dtype=torch.float64) if p.grad is None else p.grad.detach().double()
            for _, p in _trainable(model)
        ]
        if not self._sum:
            self._sum = [g.clone() for g in grads]
        else:
            for acc, g in zip(self._sum, grads, strict=True):
                acc.add_(g)
        self._batches += 1

    def end_epoch(self) -> bool:
        """Close the epoch: observe the norm of its mean gradient; True to stop.

        An epoch without :meth:`accumulate` calls observes nothing and returns False.
        """
        if not self._batches:
            return False
        sq = sum(float(acc.pow(2).sum()) for acc in self._sum)
        norm = math.sqrt(sq) / self._batches
        self._sum, self._batches = [], 0
        return self.observe(norm)

    def reset(self) -> None:
        """Forget the reference (call when a new round starts)."""
        self.reference = self.last = None
        self.observed = 0
        self._sum, self._batches = [], 0


# ---------------------------------------------------------------------------- FedCurv
def fisher_diagonal(
    model: torch.nn.Module,
    batches: Iterable[Any],
    loss_fn: Callable[[Any, Any], torch.Tensor],
    max_batches: int | None = None,
    *,
    per_sample: bool = False,
) -> Weights:
    """The empirical Fisher diagonal: the mean of squared loss gradients.

    ``F = (1/B) sum_b (grad_w L_b(w))^2`` over the first ``max_batches`` batches
    ``b = (inputs, targets)`` of ``batches`` (e.g. a ``DataLoader``), with
    ``L_b = loss_fn(model(inputs), targets)``. With ``per_sample=True`` each batch is split
    into single examples and the mean runs over examples (the textbook empirical Fisher);
    otherwise a batch's mean-loss gradient stands for one sample, as in the book's FedCurv
    code (cheaper, and smaller by about the batch size for the noise part).

    The model is put in inference mode (``train(False)``) while computing (no dropout, no
    batch-norm statistics updates) and restored afterwards; parameters' ``.grad`` are not touched.

    Returns:
        ``{parameter name: numpy array}`` for every trainable parameter, in its dtype
        (bfloat16 as float32). Parameters the loss does not reach get zeros.

    Raises:
        ValueError: If there is no batch to compute from.
    """
    import torch

    params = _trainable(model)
    tensors = [p for _, p in params]
    sums = [torch.zeros_like(p, dtype=torch.float64) for p in tensors]
    count = 0
    was_training = model.training
    model.train(False)

    def one(inputs: Any, targets: Any) -> None:
        loss = loss_fn(model(inputs), targets)
        grads = torch.autograd.grad(loss, tensors, allow_unused=True)
        for acc, g in zip(sums, grads, strict=True):
            if g is not None:
                acc.add_(g.detach().double() ** 2)

    try:
        for i, batch in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            inputs, targets = batch[0], batch[1]
            if per_sample:
                for j in range(len(inputs)):
                    one(inputs[j : j + 1], targets[j : j + 1])
                    count += 1
            else:
                one(inputs, targets)
                count += 1
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("fisher_diagonal needs at least one batch")
    out: Weights = {}
    for (name, p), acc in zip(params, sums, strict=True):
        dtype = torch.float32 if p.dtype == torch.bfloat16 else p.dtype
        out[name] = (acc / count).to(dtype=dtype, device="cpu").numpy()
    return out


def fedcurv_extras(model: torch.nn.Module, fisher: Mapping[str, Any]) -> Weights:
    """The arrays an agent uploads for FedCurv: ``u/<name> = F``, ``v/<name> = F * w``.

    One pair for every floating-point entry of the model's ``state_dict`` (the tensors the
    FedCurv strategy expects, see :func:`fedstack.strategies.regularized.fisher_tensor_names`);
    entries without a Fisher value (buffers, frozen parameters) get zeros. ``w`` is the
    model's current (locally trained) value. Arrays have the tensor's dtype (bfloat16 as
    float32), like :func:`fedstack.agent.adapters.torch.module_to_weights`.

    Raises:
        KeyError: If ``fisher`` names a tensor the model does not have.
        ValueError: If a Fisher array's shape differs from its tensor's.
    """
    import torch

    state = model.state_dict()
    unknown = sorted(set(fisher) - set(state))
    if unknown:
        raise KeyError(f"fisher names tensors the model lacks: {unknown[:5]}")
    extra: Weights = {}
    for name, tensor in state.items():
        if not tensor.is_floating_point():
            continue
        w = tensor.detach().to("cpu").double().numpy()
        u = _as_float64(fisher[name]) if name in fisher else np.zeros_like(w)
        _check_shape(name, u, tensor)
        dtype = (
            np.float32
            if tensor.dtype == torch.bfloat16
            else torch.empty((), dtype=tensor.dtype).numpy().dtype
        )
        extra[U_PREFIX + name] = u.astype(dtype)
        extra[V_PREFIX + name] = (u * w).astype(dtype)
    return extra


class FedCurvPenalty:
    """FedCurv's penalty from the other agents' Fisher statistics.

    ``lam * sum_i (w_i^2 U_i - 2 w_i V_i + V_i^2 / (U_i + eps))`` over the trainable
    parameters, with ``U = sum u - u_own`` and ``V = sum v - v_own``; the gradient is
    ``2 lam (w U - V)``. The statistics are converted once (at construction); call the
    object for each batch and add the result to the loss.

    Entries where ``U <= 0`` (no other agent has information there, e.g. the first round,
    or a rounding residue after the subtraction) contribute nothing: ``U`` and ``V`` are
    set to 0 there, so there is no division by zero and no NaN, even with ``eps = 0``.

    Args:
        model: The local model being trained.
        global_extra: The summed statistics ``u/<name>``, ``v/<name>`` from the aggregator
            (``Agent.global_extra``). Empty: no statistics yet, the penalty is 0.
        own_extra: This agent's own last upload (from :func:`fedcurv_extras`), to subtract,
            or ``None`` when the global sums do not contain it (first round, or the upload
            was not aggregated into the global model received).
        lam: lambda (>= 0; ``federation_config["fedcurv_lambda"]``).
        eps: Added to ``U`` in the constant term (>= 0; ``fedcurv_eps``).

    Raises:
        KeyError: If ``global_extra`` (or a non-empty ``own_extra``) lacks a trainable
            parameter's ``u/`` or ``v/`` array.
        ValueError: On a shape mismatch or a negative/non-finite ``lam`` or ``eps``.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        global_extra: Mapping[str, Any],
        own_extra: Mapping[str, Any] | None = None,
        lam: float = 1.0,
        eps: float = 1e-8,
    ) -> None:
        self.lam = _number("lam", lam)
        self.eps = _number("eps", eps)
        self._params: list[torch.nn.Parameter] = []
        self._u: list[torch.Tensor] = []
        self._v: list[torch.Tensor] = []
        self.constant = 0.0
        if not global_extra:
            return
        params = _trainable(model)
        need = [pre + n for n, _ in params for pre in (U_PREFIX, V_PREFIX)]
        missing = [k for k in need if k not in global_extra]
        if own_extra:
            missing += [f"own {k}" for k in need if k not in own_extra]
        if missing:
            raise KeyError(f"FedCurv statistics lack {missing[:5]}")
        for name, p in params:
            u = _as_float64(global_extra[U_PREFIX + name])
            v = _as_float64(global_extra[V_PREFIX + name])
            if own_extra:
                u -= _as_float64(own_extra[U_PREFIX + name])
                v -= _as_float64(own_extra[V_PREFIX + name])
            _check_shape(U_PREFIX + name, u, p)
            _check_shape(V_PREFIX + name, v, p)
            known = u > 0
            u = np.where(known, u, 0.0)
            v = np.where(known, v, 0.0)
            denom = np.where(known, u + self.eps, 1.0)
            self.constant += float(np.sum(np.where(known, v * v / denom, 0.0)))
            self._params.append(p)
            self._u.append(_to_param(u, p))
            self._v.append(_to_param(v, p))

    def __call__(self) -> torch.Tensor:
        import torch

        if not self._params:
            return torch.zeros(())
        first = self._params[0]
        total = torch.zeros((), dtype=first.dtype, device=first.device)
        for w, u, v in zip(self._params, self._u, self._v, strict=True):
            total = total + torch.sum(w * w * u - 2.0 * w * v)
        return self.lam * (total + self.constant)


def fedcurv_penalty(
    model: torch.nn.Module,
    global_extra: Mapping[str, Any],
    own_extra: Mapping[str, Any] | None,
    lam: float,
    eps: float = 1e-8,
) -> torch.Tensor:
    """FedCurv's penalty (see :class:`FedCurvPenalty`, which converts the statistics once
    and is the one to use inside a training loop)."""
    return FedCurvPenalty(model, global_extra, own_extra, lam, eps)()
