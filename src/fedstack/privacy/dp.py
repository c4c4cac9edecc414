"""Differential privacy: central DP-FedAvg with fixed or adaptive clipping, its accountant,
and the agent-side clip-and-noise step for distributed noise under secure aggregation.

Central DP-FedAvg (McMahan, Ramage, Talwar, Zhang, "Learning Differentially Private
Recurrent Language Models", ICLR 2018; adaptive clipping: Andrew, Thakkar, McMahan,
Ramaswamy, "Differentially Private Learning with Adaptive Clipping", NeurIPS 2021) is
:class:`CentralDP`, a wrapper around the configured strategy. For each round with ``m``
updates on the global model ``x``:

1. every update's change ``d_k = w_k - x`` over all floating-point tensors, flattened into
   one vector, is clipped to L2 norm ``C``: ``d_k * min(1, C / ||d_k||)``;
2. the clipped changes are averaged with EQUAL weights (not by sample counts: a sample
   count is the agent's own claim and would let one agent scale its influence; with equal
   weights replacing one agent's update moves the mean by at most ``C / m`` in L2, the
   sensitivity the noise is calibrated to);
3. Gaussian noise of standard deviation ``z * C / m`` is added to every coordinate of the
   mean, drawn from a generator seeded from the operating system's entropy (never the
   run's seeded ``seed``: a reproducible noise stream could be subtracted again);
4. the wrapped strategy (FedAvg, FedProx's server or a server optimiser) takes the noised
   mean change as the round's only update, so server momentum and adaptive moments see
   nothing but the released, noised value.

Integer and boolean tensors (e.g. batch-norm counters) keep the global model's value: they
are not part of the privatised release.

Adaptive clipping (Andrew et al., Algorithm 1): each agent's bit ``b_k = [||d_k|| <= C]``
is summed, the sum noised with standard deviation ``sigma_b`` and divided by ``m``
(``b̄``), and the norm moves geometrically towards the target quantile ``gamma`` of the
update norms: ``C <- C * exp(-eta * (b̄ - gamma))``. The count release costs privacy too:
the noise multiplier ``z`` given is the one of the whole round (what the accountant uses),
and the updates are noised with the larger ``z_delta = (z^-2 - (2 sigma_b)^-2)^(-1/2)``
(undefined, and refused, unless ``2 sigma_b > z``). The current ``C`` and the number of
released rounds are strategy state (``dp/clip``, ``dp/rounds``), committed with every round,
so a restarted aggregator continues with them; ``dp/history`` keeps the ``(z, q, rounds)``
of every release, so epsilon stays exact across a restart with other settings.

Accounting: Google's ``dp-accounting`` RDP accountant, ``PoissonSampledDpEvent(q,
GaussianDpEvent(z))`` self-composed once per released round, epsilon at ``delta``
(:func:`epsilon`). ``q`` (``dp_sampling_rate``, default 1) is the probability with which each
agent takes part in a round, assumed independent (Poisson) across agents and rounds; the
aggregator does not sample agents itself, so ``q < 1`` is only sound when the deployment
samples them that way.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from fedstack.errors import ConfigError, InvalidUpdate
from fedstack.strategies.base import Result, Strategy, StrategyState, Update, cast_like
from fedstack.types import Metrics, Weights

if TYPE_CHECKING:
    from fedstack.aggregator.config import AggregatorConfig

__all__ = [
    "CentralDP",
    "DPSettings",
    "clip_and_noise",
    "distributed_noise_std",
    "epsilon",
    "epsilon_of",
    "max_rounds",
    "value_noise_multiplier",
    "wrap",
]

log = logging.getLogger("fedstack.privacy")

CLIP_KEY = "dp/clip"
ROUNDS_KEY = "dp/rounds"
HISTORY_KEY = "dp/history"
History = list[tuple[float, float, int]]
"""Released rounds by mechanism: ``(noise multiplier, sampling rate, rounds)`` entries."""
MAX_ROUND_SEARCH = 10_000_000
"""The largest round count :func:`max_rounds` reports (a budget that allows more is, for
any practical purpose, unlimited)."""

_REFUSED_WHY = {
    "median": "it takes a coordinate-wise order statistic of the individual updates",
    "trimmed_mean": "it takes coordinate-wise order statistics of the individual updates",
    "krum": "it selects one individual update by its distances to the others",
    "multikrum": "it selects individual updates by their distances to the others",
    "bulyan": "it selects and trims individual updates",
    "geometric_median": "it iterates over the individual updates",
    "normclip": "it clips by its own norm rule (central DP already clips every update)",
    "fedasync": "it releases a model after every single update",
    "fedbuff": "it releases a model after every K updates, not once per round",
    "fednova": "it weighs each update by the agent's own step count",
    "scaffold": "it aggregates control variates that would leave un-noised",
    "fedcurv": "it sums Fisher statistics that would leave un-noised",
}


def _dp_accounting() -> Any:
    try:
        import dp_accounting
    except ImportError as exc:
        raise ConfigError(
            "differential privacy needs Google's dp-accounting: pip install 'fedstack[privacy]'"
        ) from exc
    return dp_accounting


@contextlib.contextmanager
def _quiet_absl() -> Iterator[None]:
    """dp-accounting logs a warning for every fractional RDP order it skips: keep them out
    of the aggregator's log (the skipped orders are the library's own decision)."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def epsilon(noise_multiplier: float, sampling_rate: float, rounds: int, delta: float) -> float:
    """Epsilon at ``delta`` after ``rounds`` releases (dp-accounting's RDP accountant).

    ``PoissonSampledDpEvent(sampling_rate, GaussianDpEvent(noise_multiplier))`` composed
    ``rounds`` times. 0 rounds: 0; a noise multiplier of 0: ``inf``.
    """
    return epsilon_of([(noise_multiplier, sampling_rate, rounds)], delta)


def epsilon_of(history: History, delta: float) -> float:
    """Epsilon at ``delta`` after the releases of ``history`` (each entry's
    ``PoissonSampledDpEvent(q, GaussianDpEvent(z))`` self-composed ``rounds`` times, all
    composed in one RDP accountant): the run's privacy spent even if a restart changed the
    noise multiplier or the sampling rate."""
    entries = [(z, q, n) for z, q, n in history if n > 0]
    if not entries:
        return 0.0
    if any(z <= 0 for z, _, _ in entries):
        return math.inf
    dpa = _dp_accounting()
    from dp_accounting.rdp import RdpAccountant

    accountant = RdpAccountant()
    with _quiet_absl():
        for z, q, n in entries:
            accountant.compose(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(z)), int(n))
        return float(accountant.get_epsilon(delta))


def _history(state: Mapping[str, Any]) -> History:
    """The ``dp/history`` of a committed strategy state (refusing a malformed one)."""
    raw = state.get(HISTORY_KEY, [])
    out: History = []
    if not isinstance(raw, list | tuple):
        raise ValueError(f"strategy state {HISTORY_KEY!r} is not a list")
    for entry in raw:
        ok = isinstance(entry, list | tuple) and len(entry) == 3
        if ok:
            z, q, n = entry
            ok = (
                all(isinstance(v, int | float) and not isinstance(v, bool) for v in (z, q, n))
                and math.isfinite(z)
                and z >= 0
                and 0 < q <= 1
                and n == int(n)
                and n >= 0
            )
        if not ok:
            raise ValueError(f"strategy state {HISTORY_KEY!r} has a bad entry {entry!r}")
        out.append((float(z), float(q), int(n)))
    return out


def _released(history: History, z: float, q: float) -> History:
    """``history`` with one more round of ``(z, q)``."""
    out = list(history)
    if out and out[-1][:2] == (z, q):
        out[-1] = (z, q, out[-1][2] + 1)
    else:
        out.append((z, q, 1))
    return out


def max_rounds(noise_multiplier: float, sampling_rate: float, delta: float, budget: float) -> int:
    """The largest round count whose epsilon (:func:`epsilon`) is at most ``budget``
    (0: not even one round fits; at most :data:`MAX_ROUND_SEARCH`)."""
    if epsilon(noise_multiplier, sampling_rate, 1, delta) > budget:
        return 0
    if epsilon(noise_multiplier, sampling_rate, MAX_ROUND_SEARCH, delta) <= budget:
        return MAX_ROUND_SEARCH
    lo, hi = 1, MAX_ROUND_SEARCH  # epsilon(lo) <= budget < epsilon(hi): 24 steps
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if epsilon(noise_multiplier, sampling_rate, mid, delta) <= budget:
            lo = mid
        else:
            hi = mid
    return lo


def value_noise_multiplier(noise_multiplier: float, count_stddev: float) -> float:
    """Andrew et al.'s noise multiplier of the clipped updates when the clipped count is
    also released with standard deviation ``count_stddev``:
    ``(z^-2 - (2 sigma_b)^-2)^(-1/2)``, so that both releases together cost what one
    Gaussian mechanism of multiplier ``z`` does.

    Raises:
        ConfigError: ``2 * count_stddev <= z`` (the formula is undefined there).
    """
    z, s = float(noise_multiplier), float(count_stddev)
    if z == 0.0:
        return 0.0
    if not 2.0 * s > z:
        raise ConfigError(
            f"adaptive clipping with noise multiplier {z:g} needs dp_clip_count_stddev > "
            f"{z / 2:g} (it is {s:g}): the noise multiplier of the updates, "
            "(z^-2 - (2 sigma_b)^-2)^-1/2, is undefined otherwise. Raise "
            "--dp-clip-count-stddev (Andrew et al. use the expected number of updates per "
            "round / 20) or lower --dp-noise-multiplier"
        )
    return float((z**-2 - (2.0 * s) ** -2) ** -0.5)


def distributed_noise_std(noise_multiplier: float, clip: float, min_survivors: int) -> float:
    """The noise standard deviation each agent adds in :func:`clip_and_noise` under secure
    aggregation: ``z * C / sqrt(m_min)``, so that the sum of at least ``m_min`` surviving
    agents' noise has standard deviation at least ``z * C`` (central DP's noise on the
    sum; ``z * C / m`` on the mean).

    Raises:
        ValueError: ``min_survivors`` < 1, or a negative or non-finite ``z`` or ``C``.
    """
    if min_survivors < 1:
        raise ValueError(f"min_survivors must be at least 1, got {min_survivors!r}")
    z, c = float(noise_multiplier), float(clip)
    if not (math.isfinite(z) and z >= 0 and math.isfinite(c) and c > 0):
        raise ValueError(f"need a noise multiplier >= 0 and a clip > 0, got {z!r}, {c!r}")
    return z * c / math.sqrt(min_survivors)


def clip_and_noise(
    delta: np.ndarray[Any, Any], clip: float, noise_std: float, rng: np.random.Generator
) -> np.ndarray[Any, Any]:
    """An agent's share of distributed DP noise (central DP under secure aggregation).

    ``delta`` (the agent's model change, any shape) is clipped to L2 norm ``clip`` and
    Gaussian noise of standard deviation ``noise_std`` is added to every coordinate; the
    result is float64 with ``delta``'s shape. With ``m_min`` surviving agents each adding
    ``N(0, (z C)^2 / m_min)`` to its clipped change, the SUM carries at least the noise
    ``N(0, (z C)^2)`` of central DP, so the aggregator never sees an un-noised sum.

    Raises:
        ValueError: ``clip`` is not a finite positive number, ``noise_std`` not a finite
            number >= 0, or ``delta`` has a non-finite value.
    """
    if not (math.isfinite(clip) and clip > 0):
        raise ValueError(f"clip must be a finite number > 0, got {clip!r}")
    if not (math.isfinite(noise_std) and noise_std >= 0):
        raise ValueError(f"noise_std must be a finite number >= 0, got {noise_std!r}")
    out = np.array(delta, dtype=np.float64)  # a copy: the caller's array is left alone
    if not np.all(np.isfinite(out)):
        raise ValueError("delta has a non-finite value (NaN or infinity)")
    norm = float(np.linalg.norm(out.ravel()))
    if norm > clip:
        out *= clip / norm
    if noise_std > 0:
        out += rng.normal(0.0, noise_std, size=out.shape)
    return out


@dataclass(frozen=True)
class DPSettings:
    """Central DP's parameters (the aggregator's ``dp_*`` settings).

    Attributes:
        noise_multiplier: ``z``: the noise's standard deviation over the sensitivity.
        clip: The (initial, with ``adaptive``) L2 clipping norm ``C``.
        delta: The ``delta`` epsilon is reported at.
        sampling_rate: ``q``, each agent's probability of taking part in a round.
        epsilon_budget: Stop (or refuse to start) before epsilon would exceed it.
        adaptive: Adaptive clipping (Andrew et al.).
        target_quantile: ``gamma``, the fraction of updates left unclipped.
        clip_lr: ``eta``, the geometric step of the clipping norm.
        clip_count_stddev: ``sigma_b``, the noise on the count of unclipped updates.
    """

    noise_multiplier: float
    clip: float
    delta: float
    sampling_rate: float = 1.0
    epsilon_budget: float | None = None
    adaptive: bool = False
    target_quantile: float = 0.5
    clip_lr: float = 0.2
    clip_count_stddev: float = 0.0

    def __post_init__(self) -> None:
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise ConfigError(f"differential privacy: {what}")

        z, c, d, q = self.noise_multiplier, self.clip, self.delta, self.sampling_rate
        need(math.isfinite(z) and z >= 0, f"dp_noise_multiplier must be >= 0, got {z!r}")
        need(math.isfinite(c) and c > 0, f"dp_clip must be > 0, got {c!r}")
        need(0 < d < 1, f"dp_delta must be in (0, 1), e.g. 1e-5, got {d!r}")
        need(0 < q <= 1, f"dp_sampling_rate must be in (0, 1], got {q!r}")
        if self.epsilon_budget is not None:
            e = self.epsilon_budget
            need(math.isfinite(e) and e > 0, f"dp_epsilon_budget must be > 0, got {e!r}")
            need(z > 0, "dp_epsilon_budget needs dp_noise_multiplier > 0 (no noise: eps = inf)")
        if self.adaptive:
            g, lr = self.target_quantile, self.clip_lr
            need(0 < g < 1, f"dp_target_quantile must be in (0, 1), got {g!r}")
            need(math.isfinite(lr) and lr > 0, f"dp_clip_lr must be > 0, got {lr!r}")
            value_noise_multiplier(z, self.clip_count_stddev)  # refuses an undefined one

    @property
    def value_noise_multiplier(self) -> float:
        """The noise multiplier of the updates (``z``, or ``z_delta`` when adaptive)."""
        if not self.adaptive:
            return self.noise_multiplier
        return value_noise_multiplier(self.noise_multiplier, self.clip_count_stddev)

    def epsilon(self, rounds: int) -> float:
        """Epsilon at :attr:`delta` after ``rounds`` rounds released with these settings."""
        return epsilon(self.noise_multiplier, self.sampling_rate, rounds, self.delta)

    def released(self, history: History) -> History:
        """``history`` with one more round released with these settings."""
        return _released(history, self.noise_multiplier, self.sampling_rate)

    def exhausted(self, history: History) -> bool:
        """Whether one more round after ``history`` would take epsilon beyond the budget
        (False: no budget)."""
        if self.epsilon_budget is None:
            return False
        return epsilon_of(self.released(history), self.delta) > self.epsilon_budget


class _DPAccumulator:
    """Clips each update's change as it arrives and sums it; noises the mean at the end."""

    def __init__(
        self,
        owner: CentralDP,
        global_weights: Weights,
        state: Mapping[str, Any],
        round: int,
        rng: np.random.Generator | None,
    ) -> None:
        self._owner = owner
        self._global = global_weights
        self._inner_state = {k: v for k, v in state.items() if not k.startswith("dp/")}
        self._round = round
        self._rng = rng
        self._clip = _positive_state(state, CLIP_KEY, owner.settings.clip)
        self._rounds = int(state.get(ROUNDS_KEY, 0))
        self._history = _history(state)
        self._names = [k for k, v in global_weights.items() if np.asarray(v).dtype.kind == "f"]
        self._sizes = [int(np.asarray(global_weights[k]).size) for k in self._names]
        self._sum = np.zeros(sum(self._sizes), dtype=np.float64)
        self._count = 0
        self._unclipped = 0
        self._samples = 0
        self._done = False

    @property
    def count(self) -> int:
        return self._count

    def add(self, update: Update) -> None:
        if self._done:
            raise ValueError("result() was already taken for this round")
        self._owner.inner.check(update, self._global)
        d = np.empty_like(self._sum)
        pos = 0
        for name, n in zip(self._names, self._sizes, strict=True):
            arr = np.asarray(update.weights[name])
            ref = np.asarray(self._global[name])
            if arr.shape != ref.shape:
                raise InvalidUpdate(
                    f"tensor {name!r} has shape {arr.shape}, expected {ref.shape}",
                    agent_id=update.agent_id,
                )
            np.subtract(arr.reshape(-1), ref.reshape(-1), out=d[pos : pos + n], dtype=np.float64)
            pos += n
        norm = float(np.linalg.norm(d))
        if not math.isfinite(norm):
            raise InvalidUpdate("the update is not finite", agent_id=update.agent_id)
        if self._owner.distributed:
            pass  # the unmasked mean of clipped, noised changes (secure aggregation)
        elif norm <= self._clip:
            self._unclipped += 1
        else:
            d *= self._clip / norm
        self._sum += d
        self._count += 1
        self._samples += max(update.num_samples, 0)

    def result(self) -> Result:
        if not self._count:
            raise ValueError("no updates to aggregate")
        if self._done:
            raise ValueError("result() was already taken for this round")
        self._done = True
        s = self._owner.settings
        m = self._count
        noise_rng = self._owner.noise_rng
        mean = self._sum
        mean /= m
        noise_std = s.value_noise_multiplier * self._clip / m
        if self._owner.distributed:
            # the agents added the noise before masking: dp_noise_std is each agent's share
            # (z*C/sqrt(m_min)); the sum of at least m_min of them holds central DP's z*C
            noise_std = self._owner.agent_noise_std or 0.0
        elif noise_std > 0:
            mean += noise_rng.normal(0.0, noise_std, size=mean.size)
        released: Weights = {}
        pos = 0
        for name, n in zip(self._names, self._sizes, strict=True):
            ref = np.asarray(self._global[name])
            value = np.add(mean[pos : pos + n].reshape(ref.shape), ref, dtype=np.float64)
            released[name] = cast_like(value, ref)
            pos += n
        for name, ref in self._global.items():
            released.setdefault(name, np.asarray(ref).copy())  # non-float: not released
        weights = {name: released[name] for name in self._global}
        inner = self._owner.inner.begin(
            self._global, self._inner_state, round=self._round, rng=self._rng
        )
        inner.add(Update(agent_id="central-dp", weights=weights, num_samples=1))
        res = inner.result()
        rounds = self._rounds + 1
        history = s.released(self._history)
        metrics: Metrics = {
            **res.metrics,
            "num_updates": m,
            "num_samples": self._samples,
            "dp_clip": self._clip,
            "dp_noise_std": noise_std,
            "dp_noise_multiplier": s.noise_multiplier,
            "dp_delta": s.delta,
            "dp_rounds": rounds,
        }
        eps = epsilon_of(history, s.delta)
        if math.isfinite(eps):  # no noise: no epsilon to store (JSON has no infinity)
            metrics["dp_epsilon"] = eps
        new_clip = self._clip
        if s.adaptive:
            noisy = self._unclipped + (
                float(noise_rng.normal(0.0, s.clip_count_stddev)) if s.clip_count_stddev else 0.0
            )
            unclipped = noisy / m
            new_clip = self._clip * math.exp(-s.clip_lr * (unclipped - s.target_quantile))
            metrics["dp_unclipped_fraction"] = unclipped
        if s.epsilon_budget is not None:
            metrics["dp_epsilon_budget"] = s.epsilon_budget
            metrics["dp_budget_exhausted"] = int(s.exhausted(history))
        state: StrategyState = {
            **res.state,
            CLIP_KEY: new_clip,
            ROUNDS_KEY: rounds,
            HISTORY_KEY: [list(entry) for entry in history],
        }
        return Result(res.weights, state, metrics, res.extra)


def _positive_state(state: Mapping[str, Any], key: str, default: float) -> float:
    value = state.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"strategy state {key!r} = {value!r} is not a number")
    v = float(value)
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"strategy state {key!r} = {v!r} must be a finite number > 0")
    return v


class CentralDP(Strategy):
    """Central DP-FedAvg around a mean-consuming strategy (see the module docstring).

    Args:
        inner: The configured strategy (one that needs only the mean update:
            :func:`fedstack.strategies.base.mean_only`).
        settings: The DP parameters.

    Raises:
        ConfigError: ``inner`` needs individual updates or extra arrays.
    """

    name = "central-dp"
    streaming = True
    secure_aggregation = True  # only mean-consuming strategies are wrapped (_check_inner)
    reads_extra = ()  # nothing an agent sends besides its weights
    federation_refusal = (
        "central DP accounts one noised release per round by one aggregator; run it on a "
        "standalone aggregator"
    )

    def __init__(self, inner: Strategy, settings: DPSettings) -> None:
        _check_inner(inner)
        self.inner = inner
        self.settings = settings
        self.noise_rng = np.random.default_rng()
        """The noise's generator, seeded from the OS's entropy (not the run's seed)."""
        self.agent_noise_std: float | None = None
        """Under secure aggregation (:meth:`distribute`): the noise standard deviation each
        agent adds; None: the noise is added here."""

    def distribute(self, min_survivors: int) -> None:
        """Secure aggregation: the agents clip their changes and add their share of the
        noise before masking (:func:`clip_and_noise`, told by :meth:`agent_config`), so the
        unmasked sum of at least ``min_survivors`` of them carries central DP's noise; the
        one update this strategy then gets per round is the unmasked mean, neither clipped
        nor noised again here (the accounting is)."""
        s = self.settings
        self.agent_noise_std = distributed_noise_std(
            s.value_noise_multiplier, s.clip, min_survivors
        )

    @property
    def distributed(self) -> bool:
        """Whether the agents add the noise (secure aggregation)."""
        return self.agent_noise_std is not None

    @property
    def min_updates(self) -> int:
        return self.inner.min_updates

    def agent_config(self) -> Metrics:
        if self.agent_noise_std is None:
            return self.inner.agent_config()
        return {
            **self.inner.agent_config(),
            "dp_secagg_clip": float(self.settings.clip),
            "dp_secagg_noise_std": self.agent_noise_std,
        }

    def init_state(self, weights: Weights) -> StrategyState:
        return {
            **self.inner.init_state(weights),
            CLIP_KEY: self.settings.clip,
            ROUNDS_KEY: 0,
            HISTORY_KEY: [],
        }

    def check(self, update: Update, global_weights: Weights) -> None:
        self.inner.check(update, global_weights)

    def rounds_released(self, state: Mapping[str, Any]) -> int:
        """Rounds released so far according to a committed strategy state."""
        value = state.get(ROUNDS_KEY, 0)
        return int(value) if isinstance(value, int) and not isinstance(value, bool) else 0

    def budget_exhausted(self, state: Mapping[str, Any]) -> bool:
        """Whether one more round after ``state`` would exceed the epsilon budget."""
        return self.settings.exhausted(_history(state))

    def begin(
        self,
        global_weights: Weights,
        state: Mapping[str, Any],
        *,
        round: int = 1,
        rng: np.random.Generator | None = None,
    ) -> _DPAccumulator:
        return _DPAccumulator(self, global_weights, state, round, rng)


def _check_inner(inner: Strategy) -> None:
    from fedstack.strategies.base import mean_only

    name = inner.name
    if not inner.secure_aggregation:  # the flag of the rules that need only the mean
        why = _REFUSED_WHY.get(name, "it is not known to consume only the mean update")
        raise ConfigError(
            f"central differential privacy cannot wrap strategy {name!r}: {why}, and DP "
            "releases only the noised mean of clipped updates. Use one of " + ", ".join(mean_only())
        )
    if name == "fedsgd" and getattr(inner, "upload", "model") != "model":
        raise ConfigError(
            "central differential privacy needs fedsgd with upload='model' (it clips the "
            "change of each agent's model)"
        )


def settings_from(config: AggregatorConfig) -> DPSettings | None:
    """The DP settings of an aggregator configuration (None: ``dp`` is off).

    Raises:
        ConfigError: A missing or refused DP setting.
    """
    if config.dp == "off":
        return None
    missing = [
        flag
        for flag, value in (
            ("--dp-noise-multiplier", config.dp_noise_multiplier),
            ("--dp-clip", config.dp_clip),
            ("--dp-delta", config.dp_delta),
        )
        if value is None
    ]
    if missing:
        raise ConfigError(
            "differential privacy: --dp central needs " + ", ".join(missing) + " (or the "
            "keys dp_noise_multiplier, dp_clip, dp_delta in the config file)"
        )
    assert config.dp_noise_multiplier is not None and config.dp_clip is not None
    assert config.dp_delta is not None
    stddev = config.dp_clip_count_stddev
    if stddev is None:  # Andrew et al.: the expected number of updates per round / 20
        stddev = 0.05 * config.min_agents
    return DPSettings(
        noise_multiplier=config.dp_noise_multiplier,
        clip=config.dp_clip,
        delta=config.dp_delta,
        sampling_rate=config.dp_sampling_rate,
        epsilon_budget=config.dp_epsilon_budget,
        adaptive=config.dp_adaptive_clip,
        target_quantile=config.dp_target_quantile,
        clip_lr=config.dp_clip_lr,
        clip_count_stddev=stddev,
    )


def wrap(config: AggregatorConfig, strategy: Strategy) -> Strategy:
    """``strategy`` wrapped in :class:`CentralDP` when ``config.dp`` is ``central``.

    Refuses (ConfigError, exit 2 on the command line) a strategy that needs individual
    updates, a configuration without the DP parameters, and a budget the configured
    ``rounds`` would exceed (naming the largest round count that fits).
    """
    settings = settings_from(config)
    if settings is None:
        return strategy
    _dp_accounting()  # refused at start without the extra, not at the first round
    dp = CentralDP(strategy, settings)
    if config.secagg:  # distributed noise (docs/privacy.md)
        dp.distribute(config.secagg_min_survivors)
    if settings.noise_multiplier == 0:
        log.warning("differential privacy with noise multiplier 0: clipping only, epsilon = inf")
    if config.keep_local_models != "metadata" and not config.secagg:
        log.warning(
            "central differential privacy protects the released global models; the store "
            "still keeps the agents' un-noised uploads (keep_local_models = %s): use "
            "--keep-local-models metadata to keep none",
            config.keep_local_models,
        )
    budget = settings.epsilon_budget
    if budget is not None:
        fits = max_rounds(settings.noise_multiplier, settings.sampling_rate, settings.delta, budget)
        if fits == 0:
            raise ConfigError(
                f"differential privacy: not even one round fits the epsilon budget {budget:g} "
                f"(one round costs epsilon = {settings.epsilon(1):.4g} at delta = "
                f"{settings.delta:g}); raise --dp-epsilon-budget or --dp-noise-multiplier"
            )
        if config.rounds is not None and config.rounds > fits:
            raise ConfigError(
                f"differential privacy: {config.rounds} rounds would spend epsilon = "
                f"{settings.epsilon(config.rounds):.4g} at delta = {settings.delta:g}, over "
                f"the budget {budget:g}; at most {fits} rounds fit: use --rounds {fits} (or "
                "raise --dp-epsilon-budget or --dp-noise-multiplier)"
            )
    return dp
