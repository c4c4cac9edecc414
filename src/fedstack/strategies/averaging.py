"""Server-optimizer strategies: FedSGD, FedAvgM and the FedOpt family.

All of them treat the round's averaged model change as a *pseudo-gradient* and take one
server optimizer step with it (Reddi et al., "Adaptive Federated Optimization", ICLR 2021,
Algorithm 2). With ``x`` the global model of the round and ``w_k`` agent ``k``'s model,

    Delta = sum_k p_k (w_k - x),        p_k = n_k / sum_j n_j   (``weighted=True``)
                                        p_k = 1 / |S|           (``weighted=False``)

is accumulated as a streaming weighted mean of the ``w_k`` (:class:`WeightedMean`, float64;
memory independent of the number of updates) and then, tensor by tensor and element-wise:

==============  ================================================================
``sgd``         ``v <- beta v + Delta`` (heavy-ball momentum; no buffer if
                ``beta = 0``), ``x <- x + eta v``
``adagrad``     ``m <- beta1 m + (1 - beta1) Delta``, ``v <- v + Delta^2``
``adam``        ``m`` as above, ``v <- beta2 v + (1 - beta2) Delta^2``
``yogi``        ``m`` as above, ``v <- v - (1 - beta2) Delta^2 sign(v - Delta^2)``
adaptive step   ``x <- x + eta m / (sqrt(v) + tau)``
==============  ================================================================

as in the paper: no bias correction, ``m_{-1} = 0`` and ``v_{-1} = tau^2`` (the paper asks
for ``v_{-1} >= tau^2``). Defaults: ``beta1 = 0.9``, ``beta2 = 0.99``, ``tau = 1e-3``
from the paper; the paper tunes the server rate ``eta`` on a log grid and gives no
default, so the adaptive strategies take Flower's ``eta = 0.1``. The
client rate ``eta_l`` is the agents' business and has no server-side parameter.

Special cases:

- server SGD with ``eta = 1`` and no momentum is FedAvg: ``x + (mean - x) = mean``. That
  step is taken as ``mean`` itself, so ``FedOpt()`` is bit-identical to :class:`FedAvg`;
- :class:`FedAvgM` (Hsu, Qi, Brown, "Measuring the Effects of Non-Identical Data
  Distribution for Federated Visual Classification", 2019) is server SGD with momentum;
- :class:`FedSGD` (McMahan et al., 2017) is server SGD over models trained by *one* local
  gradient step (or over uploaded gradients).

Only floating-point tensors are optimised. Integer and boolean tensors (batch-norm
counters, masks) take the plain (weighted) mean, like FedAvg, and have no moments.

State (checkpointed by the aggregator every round, all of it JSON scalars and numpy arrays):
``"step"`` (int, server steps taken), and per floating-point tensor ``"v/<tensor>"`` (SGD
momentum buffer, only when momentum > 0) or ``"m/<tensor>"`` and ``"v/<tensor>"`` (first
and second moments of the adaptive optimizers), float64 arrays shaped like the tensor.
Missing entries start from their initial values (0, or ``tau^2`` for ``v``), so a state of
``{}`` is a fresh optimizer.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

import numpy as np

from fedstack.errors import InvalidUpdate
from fedstack.strategies.base import Result, Strategy, StrategyState, Update, cast_like, register
from fedstack.strategies.fedavg import WeightedMean
from fedstack.types import Weights

__all__ = [
    "OPTIMIZERS",
    "FedAdagrad",
    "FedAdam",
    "FedAvgM",
    "FedOpt",
    "FedSGD",
    "FedYogi",
    "ServerOptAccumulator",
]

F64 = np.ndarray[Any, np.dtype[np.float64]]

OPTIMIZERS = ("sgd", "adagrad", "adam", "yogi")
"""Server optimizers of :class:`FedOpt`."""

M_PREFIX = "m/"
V_PREFIX = "v/"


def _number(
    name: str,
    value: object,
    low: float,
    high: float,
    *,
    low_open: bool = False,
    high_open: bool = True,
) -> float:
    """``value`` as a float in the interval, or ValueError (-> ConfigError in ``create``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    v = float(value)
    ok = (
        math.isfinite(v)
        and (v > low if low_open else v >= low)
        and (v < high if high_open else v <= high)
    )
    if not ok:
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        raise ValueError(f"{name} must be in {lo}{low:g}, {high:g}{hi}, got {value!r}")
    return v


def _is_float(arr: np.ndarray[Any, Any]) -> bool:
    return bool(arr.dtype.kind == "f")


def _moment(state: Mapping[str, Any], key: str, like: np.ndarray[Any, Any], initial: float) -> F64:
    """The state array ``key`` as float64 (not copied), or a fresh one filled with ``initial``."""
    arr = state.get(key)
    if arr is None:
        return np.full(like.shape, initial, dtype=np.float64)
    a = np.asarray(arr, dtype=np.float64)
    if a.shape != like.shape:
        raise ValueError(
            f"strategy state {key!r} has shape {a.shape}, the model tensor {like.shape} "
            "(the state belongs to another model or strategy)"
        )
    return a


@register
class FedOpt(Strategy):
    """Average the agents' changes and take one server-optimizer step (Reddi et al., 2021).

    ``x <- x + eta * step(Delta)`` with ``Delta`` the (sample-weighted) mean of
    ``w_k - x`` and ``step`` plain SGD with heavy-ball momentum (``v <- beta v + Delta``,
    step ``v``) or the adaptive rules of Adagrad, Adam and Yogi (step
    ``m / (sqrt(v) + tau)``, see the module docstring). ``FedOpt()`` (SGD, ``eta = 1``,
    no momentum) is exactly FedAvg.

    Args:
        optimizer: ``"sgd"``, ``"adagrad"``, ``"adam"`` or ``"yogi"``.
        server_lr: The server learning rate ``eta`` (default 1.0 for SGD, 0.1 for the
            adaptive optimizers: Flower's default, the paper tunes it).
        momentum: For SGD the heavy-ball coefficient ``beta`` (default 0); for the adaptive
            optimizers the first-moment coefficient ``beta1`` (default 0.9, the paper's).
        beta2: Second-moment coefficient of Adam and Yogi (0.99, the paper's).
        tau: Adaptivity ``tau`` of the adaptive optimizers (1e-3, the paper's).
        weighted: Weight the agents by their sample counts (as FedAvg); False gives the
            paper's plain mean over the round's agents.

    In a horizontal federation the server optimizer runs per cluster: each member keeps
    its own momentum / moment estimates (committed with its cluster rounds) and steps on
    its cluster's mean change from the shared global model; the global model is the
    sample-weighted synthesis of those steps. With SGD without momentum this is exactly
    the one-aggregator result; with momentum or adaptive moments it is the per-cluster
    variant (each cluster's state sees only its own agents).
    """

    name = "fedopt"
    secure_aggregation = True

    def __init__(
        self,
        optimizer: str = "sgd",
        server_lr: float | None = None,
        momentum: float | None = None,
        beta2: float = 0.99,
        tau: float = 1e-3,
        weighted: bool = True,
    ) -> None:
        opt = str(optimizer).lower()
        if opt not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}; got {optimizer!r}")
        adaptive = opt != "sgd"
        self.optimizer = opt
        self.server_lr = _number(
            "server_lr",
            (0.1 if adaptive else 1.0) if server_lr is None else server_lr,
            0.0,
            math.inf,
            low_open=True,
        )
        self.momentum = _number(
            "momentum", (0.9 if adaptive else 0.0) if momentum is None else momentum, 0.0, 1.0
        )
        self.beta2 = _number("beta2", beta2, 0.0, 1.0)
        self.tau = _number("tau", tau, 0.0, math.inf, low_open=True)
        self.weighted = bool(weighted)

    @property
    def adaptive(self) -> bool:
        """True for Adagrad, Adam and Yogi."""
        return self.optimizer != "sgd"

    def state_keys(self, name: str) -> list[str]:
        """The state arrays kept for the floating-point tensor ``name``."""
        if self.adaptive:
            return [M_PREFIX + name, V_PREFIX + name]
        return [V_PREFIX + name] if self.momentum > 0 else []

    def init_state(self, weights: Weights) -> StrategyState:
        """``{"step": 0}`` and the initial moments (``m = 0``, ``v = tau^2``; SGD: ``v = 0``)."""
        state: StrategyState = {"step": 0}
        v0 = self.tau**2 if self.adaptive else 0.0
        for name, ref in weights.items():
            arr = np.asarray(ref)
            if not _is_float(arr):
                continue
            for key in self.state_keys(name):
                state[key] = np.full(
                    arr.shape, v0 if key.startswith(V_PREFIX) else 0.0, dtype=np.float64
                )
        return state

    def begin(
        self,
        global_weights: Weights,
        state: Mapping[str, Any],
        *,
        round: int = 1,
        rng: np.random.Generator | None = None,
    ) -> ServerOptAccumulator:
        return ServerOptAccumulator(self, global_weights, state)

    # ------------------------------------------------------------------ the step
    def apply(
        self,
        name: str,
        x: np.ndarray[Any, Any],
        mean: F64,
        state: Mapping[str, Any],
        new_state: StrategyState,
    ) -> F64:
        """One optimizer step for the floating-point tensor ``name``.

        Args:
            name: The tensor's name (state keys are ``"m/<name>"``, ``"v/<name>"``).
            x: The global tensor of the round.
            mean: The float64 (weighted) mean of the agents' tensors; may be overwritten.
            state: The state of the previous round (read only).
            new_state: Receives this tensor's new moments.

        Returns:
            The new tensor in float64.
        """
        eta = self.server_lr
        if not self.adaptive and self.momentum == 0.0:
            if eta == 1.0:  # FedAvg: x + (mean - x) is mean (taken as is: bit-identical)
                return mean
            np.subtract(mean, x, out=mean, dtype=np.float64)
            mean *= eta
            np.add(mean, x, out=mean, dtype=np.float64)
            return mean
        d = mean
        np.subtract(mean, x, out=d, dtype=np.float64)  # Delta
        if not self.adaptive:
            # np.asarray throughout: numpy returns scalars for 0-d tensors' results
            v = np.asarray(_moment(state, V_PREFIX + name, x, 0.0) * self.momentum)
            v += d
            new_state[V_PREFIX + name] = v
            new = np.asarray(eta * v)
            np.add(new, x, out=new, dtype=np.float64)
            return new
        b1 = self.momentum
        m = np.asarray(_moment(state, M_PREFIX + name, x, 0.0) * b1)
        m += (1.0 - b1) * d
        v_prev = _moment(state, V_PREFIX + name, x, self.tau**2)
        d2 = d
        np.square(d, out=d2)  # Delta^2 (Delta itself is no longer needed)
        if self.optimizer == "adagrad":
            v = np.asarray(v_prev + d2)
        elif self.optimizer == "adam":
            v = np.asarray(self.beta2 * v_prev + (1.0 - self.beta2) * d2)
        else:  # yogi
            v = np.asarray(v_prev - (1.0 - self.beta2) * d2 * np.sign(v_prev - d2))
        new_state[M_PREFIX + name] = m
        new_state[V_PREFIX + name] = v
        denom = np.asarray(np.sqrt(v))
        denom += self.tau
        step = denom
        np.divide(m, denom, out=step)
        step *= eta
        np.add(step, x, out=step, dtype=np.float64)
        return step

    def combine_mean(
        self, mean: Mapping[str, F64], global_weights: Weights, state: Mapping[str, Any]
    ) -> tuple[Weights, StrategyState, float]:
        """New weights, new state and ``||Delta||`` from the round's mean model."""
        new_state: StrategyState = {"step": int(state.get("step", 0)) + 1}
        out: Weights = {}
        sq = 0.0
        for name, ref in global_weights.items():
            m = mean[name]
            if not _is_float(ref):
                out[name] = cast_like(m, ref)
                continue
            sq += float(np.sum(np.square(np.subtract(m, ref, dtype=np.float64))))
            out[name] = cast_like(self.apply(name, ref, m, state, new_state), ref)
        return out, new_state, math.sqrt(sq)


class ServerOptAccumulator:
    """Streams the round's weighted mean; the optimizer step happens in :meth:`result`."""

    def __init__(self, strategy: FedOpt, global_weights: Weights, state: Mapping[str, Any]) -> None:
        self._strategy = strategy
        self._global = global_weights
        self._state = state
        for name, ref in global_weights.items():  # fail early on a foreign state
            if _is_float(ref):
                for key in strategy.state_keys(name):
                    _moment(state, key, ref, 0.0)
        self._mean = WeightedMean(global_weights, strategy.weighted)

    @property
    def count(self) -> int:
        return self._mean.count

    def add(self, update: Update) -> None:
        self._strategy.check(update, self._global)
        self._mean.add(update)

    def result(self) -> Result:
        mean = self._mean.mean64()
        weights, state, norm = self._strategy.combine_mean(mean, self._global, self._state)
        return Result(
            weights,
            state,
            {
                "num_updates": self._mean.count,
                "num_samples": self._mean.samples,
                "server_step": int(state["step"]),
                "delta_norm": norm,
            },
        )


@register
class FedAvgM(FedOpt):
    """FedAvg with server momentum (Hsu, Qi, Brown, 2019, arXiv:1909.06335).

    ``Delta = sum_k p_k (w_k - x)``, ``v <- beta v + Delta``, ``x <- x + eta v``; the
    momentum buffer ``v`` is kept per floating-point tensor as ``"v/<tensor>"`` in the
    state. ``momentum = 0`` and ``server_lr = 1`` give FedAvg exactly.

    Args:
        server_lr: The server learning rate ``eta`` (1.0).
        momentum: The momentum ``beta`` (0.9), in [0, 1).
        weighted: Weight the agents by their sample counts (as FedAvg).
    """

    name = "fedavgm"

    def __init__(
        self, server_lr: float = 1.0, momentum: float = 0.9, weighted: bool = True
    ) -> None:
        super().__init__("sgd", server_lr=server_lr, momentum=momentum, weighted=weighted)


@register
class FedSGD(FedOpt):
    """Federated SGD (McMahan et al., 2017, arXiv:1602.05629; the book's G7-01).

    Every agent takes *one* gradient step from the global model ``x`` on its data,
    ``w_k = x - eta_l g_k``, and uploads ``w_k``; the server steps along the averaged change,

        x <- x + lr * sum_k p_k (w_k - x) = x - lr * eta_l * sum_k p_k g_k,

    which, with full-batch gradients, is one step of centralised gradient descent on the
    federation's data. ``upload="gradient"``: agents upload ``g_k`` itself and the server
    takes ``x <- x - lr * sum_k p_k g_k`` (``lr`` is then the learning rate; integer and
    boolean tensors keep their global value).

    Relation to FedAvg: the server rule is FedAvg's generalised by a server rate; with
    ``lr = 1`` the new model *is* the FedAvg mean of the one-step models. FedAvg lets the
    agents take many local steps (epochs) per round, trading communication for client drift;
    FedSGD is FedAvg with one local step of the full local batch (E = 1, B = infinity).
    An update whose metrics report ``local_steps`` other than 1 is refused.

    Args:
        lr: The server learning rate (1.0).
        upload: ``"model"`` (default) or ``"gradient"``.
        weighted: Weight the agents by their sample counts, ``p_k = n_k / n`` (the paper).
    """

    name = "fedsgd"

    def __init__(self, lr: float = 1.0, upload: str = "model", weighted: bool = True) -> None:
        super().__init__("sgd", server_lr=lr, momentum=0.0, weighted=weighted)
        if upload not in ("model", "gradient"):
            raise ValueError(f"upload must be 'model' or 'gradient', got {upload!r}")
        self.upload = upload

    @property
    def lr(self) -> float:
        """The server learning rate."""
        return self.server_lr

    def check(self, update: Update, global_weights: Weights) -> None:
        steps = update.metrics.get("local_steps")
        if steps is not None and (isinstance(steps, bool | str) or steps != 1):
            raise InvalidUpdate(
                f"fedsgd: the update reports local_steps={steps!r}; FedSGD agents take one "
                "gradient step per round (use fedavg for several)",
                agent_id=update.agent_id,
            )

    def combine_mean(
        self, mean: Mapping[str, F64], global_weights: Weights, state: Mapping[str, Any]
    ) -> tuple[Weights, StrategyState, float]:
        if self.upload == "model":
            return super().combine_mean(mean, global_weights, state)
        out: Weights = {}
        sq = 0.0
        for name, ref in global_weights.items():
            if not _is_float(ref):
                out[name] = ref.copy()
                continue
            g = mean[name]
            sq += float(np.sum(np.square(g)))
            g *= -self.server_lr
            out[name] = cast_like(np.add(g, ref, out=g, dtype=np.float64), ref)
        return out, {"step": int(state.get("step", 0)) + 1}, self.server_lr * math.sqrt(sq)


class _Adaptive(FedOpt):
    """Shared constructor of the three adaptive FedOpt strategies."""

    def _setup(
        self,
        optimizer: str,
        server_lr: float,
        beta1: float,
        beta2: float,
        tau: float,
        weighted: bool,
    ) -> None:
        FedOpt.__init__(
            self,
            optimizer,
            server_lr=server_lr,
            momentum=beta1,
            beta2=beta2,
            tau=tau,
            weighted=weighted,
        )

    @property
    def beta1(self) -> float:
        """The first-moment coefficient."""
        return self.momentum


@register
class FedAdagrad(_Adaptive):
    """FedAdagrad (Reddi et al., "Adaptive Federated Optimization", ICLR 2021, Algorithm 2).

    ``m <- beta1 m + (1 - beta1) Delta``, ``v <- v + Delta^2``,
    ``x <- x + eta m / (sqrt(v) + tau)``, element-wise, with ``m_{-1} = 0``,
    ``v_{-1} = tau^2`` and no bias correction. Defaults from the paper: ``beta1 = 0.9``,
    ``tau = 1e-3``; ``eta`` is tuned in
    the paper, 0.1 is Flower's default (Flower's FedAdagrad also has no momentum: pass
    ``beta1=0`` to get it).

    Args:
        server_lr: ``eta`` (0.1).
        beta1: First-moment coefficient (0.9).
        tau: Adaptivity (1e-3).
        weighted: Weight the agents by their sample counts (False: the paper's plain mean).
    """

    name = "fedadagrad"

    def __init__(
        self, server_lr: float = 0.1, beta1: float = 0.9, tau: float = 1e-3, weighted: bool = True
    ) -> None:
        self._setup("adagrad", server_lr, beta1, 0.99, tau, weighted)


@register
class FedAdam(_Adaptive):
    """FedAdam (Reddi et al., "Adaptive Federated Optimization", ICLR 2021, Algorithm 2).

    ``m <- beta1 m + (1 - beta1) Delta``, ``v <- beta2 v + (1 - beta2) Delta^2``,
    ``x <- x + eta m / (sqrt(v) + tau)``, element-wise, with ``m_{-1} = 0``,
    ``v_{-1} = tau^2`` and no bias correction. Defaults from the paper: ``beta1 = 0.9``,
    ``beta2 = 0.99``, ``tau = 1e-3``;
    ``eta`` is tuned in the paper, 0.1 is Flower's default.

    Args:
        server_lr: ``eta`` (0.1).
        beta1: First-moment coefficient (0.9).
        beta2: Second-moment coefficient (0.99).
        tau: Adaptivity (1e-3).
        weighted: Weight the agents by their sample counts (False: the paper's plain mean).
    """

    name = "fedadam"

    def __init__(
        self,
        server_lr: float = 0.1,
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
        weighted: bool = True,
    ) -> None:
        self._setup("adam", server_lr, beta1, beta2, tau, weighted)


@register
class FedYogi(_Adaptive):
    """FedYogi (Reddi et al., "Adaptive Federated Optimization", ICLR 2021, Algorithm 2).

    ``m <- beta1 m + (1 - beta1) Delta``,
    ``v <- v - (1 - beta2) Delta^2 sign(v - Delta^2)``,
    ``x <- x + eta m / (sqrt(v) + tau)``, element-wise, with ``m_{-1} = 0``,
    ``v_{-1} = tau^2`` and no bias correction. Unlike Adam, ``v`` changes by at most
    ``(1 - beta2) Delta^2`` per round in either direction. Defaults from the paper:
    ``beta1 = 0.9``, ``beta2 = 0.99``,
    ``tau = 1e-3``; ``eta`` is tuned in the paper, 0.1 is Flower's FedAdam default.

    Args:
        server_lr: ``eta`` (0.1).
        beta1: First-moment coefficient (0.9).
        beta2: Second-moment coefficient (0.99).
        tau: Adaptivity (1e-3).
        weighted: Weight the agents by their sample counts (False: the paper's plain mean).
    """

    name = "fedyogi"

    def __init__(
        self,
        server_lr: float = 0.1,
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
        weighted: bool = True,
    ) -> None:
        self._setup("yogi", server_lr, beta1, beta2, tau, weighted)
