"""The strategy interface.

A strategy turns a round's updates into the next global model. It is pure: no I/O, no
clock, no global randomness (a seeded ``numpy.random.Generator`` is passed in); its state
is a dict of JSON scalars and numpy arrays, passed in and returned, which the aggregator
commits with each round's global model so that a restart resumes exactly.

Every strategy returns an :class:`Accumulator` from :meth:`Strategy.begin`:

- mean-type strategies (``streaming = True``) fold each update in as it arrives, so memory
  does not grow with the number of updates;
- order-statistic strategies (``streaming = False``) keep the round's updates, at most
  ``max_updates`` of them, and compute in :meth:`Accumulator.result`
  (:class:`BufferedAccumulator` does the bookkeeping).

Besides the weights, agents and aggregator exchange *extra* named arrays (``Update.extra``
up, ``Result.extra`` down): FedCurv's Fisher statistics, SCAFFOLD's control variates, or
anything a custom strategy needs. ``agent_config()`` is sent to every agent when it joins
(e.g. FedProx's ``mu``).
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import numpy as np

from fedstack.errors import ConfigError, InvalidUpdate
from fedstack.types import Array, Metrics, Weights

StrategyState = dict[str, Any]
"""JSON scalars (int, float, str, bool, None, lists of them) and numpy arrays."""


@dataclass(frozen=True, slots=True)
class Update:
    """One agent's contribution to a round."""

    agent_id: str
    weights: Weights
    num_samples: int
    staleness: int = 0
    metrics: Metrics = field(default_factory=dict)
    model_id: str = ""
    extra: Weights = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Result:
    """What a round's aggregation produced."""

    weights: Weights
    state: StrategyState = field(default_factory=dict)
    metrics: Metrics = field(default_factory=dict)
    extra: Weights = field(default_factory=dict)


class Accumulator(Protocol):
    """Folds updates into a round's aggregate."""

    @property
    def count(self) -> int:
        """Number of updates added so far."""
        ...

    def add(self, update: Update) -> None:
        """Fold ``update`` in. Streaming accumulators do not keep its arrays."""
        ...

    def result(self) -> Result:
        """The new global model, state, diagnostics and extra arrays (call once)."""
        ...


class Strategy(ABC):
    """An aggregation rule. Subclasses set ``name`` and implement :meth:`begin`."""

    name: ClassVar[str] = ""
    streaming: ClassVar[bool] = True
    """True when memory does not grow with the number of updates in a round."""
    reads_extra: ClassVar[tuple[str, ...] | None] = ()
    """Name prefixes of the extra arrays (``Update.extra``) this rule reads. The
    aggregator keeps only those: any other extra array an agent sends is dropped after
    :meth:`check`, never stored nor passed on. ``None``: every extra array (a rule that
    cannot say which it reads)."""
    trigger: int | None = None
    """Aggregate after this many accepted updates, instead of the aggregator's threshold
    rule (FedAsync: 1, FedBuff: K). None: the threshold rule decides."""
    federation: ClassVar[str] = "per-cluster"
    """How the rule runs in a horizontal federation (several aggregators, one store):
    ``"per-cluster"``: every member applies it to its own cluster's updates, with its own
    server state (committed with the member's cluster rounds) and its own extra arrays,
    and the global model is the sample-weighted synthesis of the members' results."""
    secure_aggregation: ClassVar[bool] = False
    """Whether the rule can run under secure aggregation (``--secagg``): True only for
    rules that need nothing but the round's (sample-weighted) mean of the updates, which
    is all the aggregator learns there (FedAvg, FedProx, the server optimisers). Rules
    that look at individual updates (median, trimmed mean, Krum, Bulyan, FedNova's
    per-agent step counts, SCAFFOLD's control variates, asynchronous rules) keep False."""
    federation_refusal: ClassVar[str | None] = None
    """Why this rule cannot run that way (then an aggregator with ``name`` or
    ``upstream`` refuses to start with it), and what to use instead; None: it can."""

    @property
    def min_updates(self) -> int:
        """The fewest updates this rule can aggregate (e.g. Krum: 2f + 3)."""
        return 1

    def agent_config(self) -> Metrics:
        """Settings sent to every agent when it joins (e.g. ``{"fedprox_mu": 0.01}``)."""
        return {}

    def init_state(self, weights: Weights) -> StrategyState:
        """State for a federation whose first global model is ``weights``."""
        return {}

    def initial_extra(self, weights: Weights) -> Weights:
        """Extra arrays sent to agents with the first global model."""
        return {}

    def check(self, update: Update, global_weights: Weights) -> None:
        """Refuse an update this strategy cannot use (raise :class:`InvalidUpdate`)."""
        return None

    def check_initial(self, weights: Weights, agent_id: str) -> None:
        """Refuse a first model this strategy cannot start from (raise
        :class:`InvalidUpdate`; e.g. a plain model where ciphertexts are expected)."""
        return None

    @abstractmethod
    def begin(
        self,
        global_weights: Weights,
        state: Mapping[str, Any],
        *,
        round: int = 1,
        rng: np.random.Generator | None = None,
    ) -> Accumulator:
        """Start aggregating round ``round`` on top of ``global_weights``."""


class BufferedAccumulator:
    """Keeps a round's updates (at most ``max_updates``) and calls ``combine`` at the end.

    For order-statistic rules (median, Krum, ...), which need all updates at once.
    """

    def __init__(
        self,
        global_weights: Weights,
        state: Mapping[str, Any],
        combine: Callable[[Weights, list[Update], Mapping[str, Any]], Result],
        max_updates: int,
    ) -> None:
        self.global_weights = global_weights
        self.state = state
        self._combine = combine
        self.max_updates = max_updates
        self.updates: list[Update] = []
        self._done = False

    @property
    def count(self) -> int:
        return len(self.updates)

    def add(self, update: Update) -> None:
        if len(self.updates) >= self.max_updates:
            raise InvalidUpdate(
                f"this strategy keeps at most {self.max_updates} updates per round "
                "(raise its max_updates parameter)",
                agent_id=update.agent_id,
            )
        self.updates.append(update)

    def result(self) -> Result:
        if not self.updates:
            raise ValueError("no updates to aggregate")
        if self._done:
            raise ValueError("result() was already taken for this round")
        self._done = True
        return self._combine(self.global_weights, self.updates, self.state)


# ---------------------------------------------------------------------------- helpers
def cast_like(value: np.ndarray[Any, Any], ref: Array) -> Array:
    """``value`` (float64) cast back to ``ref``'s dtype (ints rounded, bools by majority)."""
    dt = ref.dtype
    if dt.kind in "iu":
        out: Array = np.rint(value).astype(dt)
        return out
    if dt.kind == "b":
        return np.asarray(value >= 0.5)
    return np.asarray(value, dtype=dt)


def delta(update: Weights, base: Weights) -> Weights:
    """``update - base`` tensor by tensor, in float64."""
    return {k: np.subtract(update[k], base[k], dtype=np.float64) for k in base}


def flatten(weights: Weights, names: list[str] | None = None) -> np.ndarray[Any, Any]:
    """All tensors as one float64 vector, in ``names`` order (default: dict order)."""
    keys = names if names is not None else list(weights)
    if not keys:
        return np.zeros(0)
    return np.concatenate([np.asarray(weights[k], dtype=np.float64).ravel() for k in keys])


def unflatten(vector: np.ndarray[Any, Any], like: Weights) -> Weights:
    """The inverse of :func:`flatten`: float64 arrays shaped like ``like``."""
    out: Weights = {}
    pos = 0
    for k, ref in like.items():
        n = int(np.asarray(ref).size)
        out[k] = vector[pos : pos + n].reshape(np.asarray(ref).shape)
        pos += n
    return out


# ---------------------------------------------------------------------------- registry
_REGISTRY: dict[str, type[Strategy]] = {}


def register(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator: make ``cls`` selectable by ``cls.name`` in the config."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    _REGISTRY[cls.name] = cls
    return cls


def _discover() -> None:
    """Import every module of this package once, so that its strategies register."""
    global _DISCOVERED
    if _DISCOVERED:
        return
    import importlib
    import pkgutil

    import fedstack.strategies as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        if not mod.name.startswith("_"):
            importlib.import_module(f"fedstack.strategies.{mod.name}")
    _DISCOVERED = True


_DISCOVERED = False


def _parameters(cls: type[Strategy]) -> tuple[list[inspect.Parameter], bool]:
    """A strategy's named constructor parameters, and whether it also takes ``**kwargs``."""
    given = inspect.signature(cls.__init__).parameters.values()
    named = [
        p for p in given if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]
    return named, any(p.kind is p.VAR_KEYWORD for p in given)


def create(name: str, **params: Any) -> Strategy:
    """Build the strategy called ``name`` with ``params`` from the aggregator's config."""
    _discover()
    key = name.lower()
    if key not in _REGISTRY:
        raise ConfigError(f"unknown strategy {name!r}; available: {', '.join(names())}")
    cls = _REGISTRY[key]
    accepted, open_ended = _parameters(cls)
    if not open_ended:
        unknown = sorted(set(params) - {p.name for p in accepted})
        if unknown:
            raise ConfigError(
                f"strategy {name!r} has no parameter(s) {', '.join(unknown)}; it takes: "
                + (", ".join(p.name for p in accepted) or "none")
            )
    missing = [p.name for p in accepted if p.default is p.empty and p.name not in params]
    if missing:
        raise ConfigError(
            f"strategy {name!r} needs the parameter(s) {', '.join(missing)} (e.g. "
            f"--strategy-param {missing[0]}=..., or strategy_params in the config)"
        )
    try:
        return cls(**params)
    except TypeError as exc:
        raise ConfigError(f"strategy {name!r}: {exc}") from exc
    except ValueError as exc:
        raise ConfigError(f"strategy {name!r}: {exc}") from exc


def names() -> list[str]:
    """Every registered strategy name (all modules of fedstack.strategies are loaded)."""
    _discover()
    return sorted(_REGISTRY)


def mean_only() -> list[str]:
    """The strategies that need nothing but the round's (weighted) mean of the updates
    (:attr:`Strategy.secure_aggregation`): what secure aggregation and central
    differential privacy can run."""
    return [n for n in names() if _REGISTRY[n].secure_aggregation]


def describe() -> list[dict[str, Any]]:
    """Every registered strategy with its parameters and defaults (for ``fedstack strategies``)."""
    out = []
    for key in names():
        cls = _REGISTRY[key]
        params = {
            p.name: (None if p.default is p.empty else p.default) for p in _parameters(cls)[0]
        }
        doc = (inspect.getdoc(cls) or "").splitlines()
        out.append(
            {
                "name": key,
                "summary": doc[0] if doc else "",
                "params": params,
                "streaming": cls.streaming,
                "federation": "refused" if cls.federation_refusal else cls.federation,
                "federation_refusal": cls.federation_refusal,
            }
        )
    return out
