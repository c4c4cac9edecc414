"""Split a labelled dataset across agents: IID, Dirichlet label skew, pathological
k-classes-per-agent shards, or quantity skew.

Every partitioner takes ``(labels, num_agents, seed)`` and returns one array of row
indices per agent. The index arrays are disjoint and together cover every row.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import TypeAlias

import numpy as np
import numpy.typing as npt

from fedstack.errors import ConfigError

IndexArray: TypeAlias = npt.NDArray[np.int64]
Partitioner: TypeAlias = Callable[[npt.ArrayLike, int, int], list[IndexArray]]
"""``partitioner(labels, num_agents, seed) -> one index array per agent``."""

_MAX_DIRICHLET_ATTEMPTS = 1000


def _check_num_agents(num_agents: int, num_samples: int) -> None:
    if isinstance(num_agents, bool) or not isinstance(num_agents, int | np.integer):
        raise ConfigError(f"num_agents must be an integer, got {num_agents!r}")
    if num_agents < 1:
        raise ConfigError(f"num_agents must be at least 1, got {num_agents}")
    if num_agents > num_samples:
        raise ConfigError(
            f"cannot split {num_samples} samples across {num_agents} agents "
            "(every agent needs at least one sample)"
        )


def iid(labels: npt.ArrayLike, num_agents: int, seed: int = 0) -> list[IndexArray]:
    """Shuffle the rows and deal them out in near-equal shares.

    Args:
        labels: One label per row (only its length is used).
        num_agents: Number of shares.
        seed: Seed of the shuffle; the same seed gives the same shares.

    Returns:
        ``num_agents`` disjoint, shuffled index arrays covering every row; their sizes
        differ by at most one.

    Raises:
        ConfigError: If ``num_agents`` is not a positive integer no larger than the
            number of rows.
    """
    n = len(np.asarray(labels))
    _check_num_agents(num_agents, n)
    order = np.random.default_rng(seed).permutation(n).astype(np.int64)
    return [np.asarray(part, dtype=np.int64) for part in np.array_split(order, num_agents)]


def dirichlet(
    labels: npt.ArrayLike,
    num_agents: int,
    alpha: float,
    seed: int = 0,
    min_samples: int = 10,
) -> list[IndexArray]:
    """Label-skewed split: each class is divided across agents by Dir(alpha) proportions.

    For every class, proportions ``p ~ Dir(alpha, ..., alpha)`` over the agents are drawn
    and the (shuffled) rows of that class are cut accordingly. Small ``alpha`` (e.g. 0.1)
    gives each agent few dominant classes; large ``alpha`` approaches an IID split. The
    whole draw is repeated until every agent has at least ``min_samples`` rows.

    Args:
        labels: One (hashable, sortable) label per row.
        num_agents: Number of shares.
        alpha: Concentration of the Dirichlet distribution, > 0.
        seed: Seed of the draw; the same seed gives the same shares.
        min_samples: Minimum number of rows per agent.

    Returns:
        ``num_agents`` disjoint, shuffled index arrays covering every row.

    Raises:
        ConfigError: If an argument is out of range or no draw satisfying
            ``min_samples`` was found after many attempts.
    """
    y = np.asarray(labels)
    n = len(y)
    _check_num_agents(num_agents, n)
    alpha = float(alpha)
    if not math.isfinite(alpha) or alpha <= 0:
        raise ConfigError(f"Dirichlet alpha must be a finite number > 0, got {alpha}")
    if min_samples < 0:
        raise ConfigError(f"min_samples must be >= 0, got {min_samples}")
    if num_agents * min_samples > n:
        raise ConfigError(
            f"cannot give each of {num_agents} agents {min_samples} samples "
            f"out of {n}; lower min_samples or num_agents"
        )

    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    for _ in range(_MAX_DIRICHLET_ATTEMPTS):
        shares: list[list[IndexArray]] = [[] for _ in range(num_agents)]
        for cls in classes:
            rows = np.flatnonzero(y == cls).astype(np.int64)
            rng.shuffle(rows)
            proportions = rng.dirichlet(np.full(num_agents, alpha))
            cuts = (np.cumsum(proportions)[:-1] * len(rows)).astype(np.int64)
            for agent, part in enumerate(np.split(rows, cuts)):
                shares[agent].append(part)
        parts = [np.concatenate(s) for s in shares]
        if min(len(p) for p in parts) >= min_samples:
            for p in parts:
                rng.shuffle(p)
            return parts
    raise ConfigError(
        f"no Dirichlet(alpha={alpha}) split of {n} samples gave each of {num_agents} agents "
        f"at least {min_samples} samples in {_MAX_DIRICHLET_ATTEMPTS} attempts; "
        "raise alpha or lower min_samples"
    )


def shards(
    labels: npt.ArrayLike, num_agents: int, classes_per_agent: int, seed: int = 0
) -> list[IndexArray]:
    """Pathological non-IID split (McMahan et al. 2017): sort the rows by label, cut them
    into ``num_agents * classes_per_agent`` shards and deal each agent that many shards.

    Each agent then sees about ``classes_per_agent`` classes.

    Raises:
        ConfigError: If ``classes_per_agent`` < 1 or there are fewer rows than shards.
    """
    y = np.asarray(labels)
    n = len(y)
    _check_num_agents(num_agents, n)
    if classes_per_agent < 1:
        raise ConfigError(f"classes_per_agent must be at least 1, got {classes_per_agent}")
    num_shards = num_agents * classes_per_agent
    if num_shards > n:
        raise ConfigError(f"cannot cut {n} samples into {num_shards} shards")
    rng = np.random.default_rng(seed)
    # stable sort by label, ties broken randomly so shards differ between seeds
    order = np.lexsort((rng.permutation(n), y)).astype(np.int64)
    pieces = np.array_split(order, num_shards)
    deal = rng.permutation(num_shards)
    return [
        np.sort(np.concatenate([pieces[s] for s in deal[i::num_agents]])).astype(np.int64)
        for i in range(num_agents)
    ]


def quantity_skew(
    labels: npt.ArrayLike, num_agents: int, alpha: float, seed: int = 0, min_samples: int = 1
) -> list[IndexArray]:
    """IID labels, unequal sizes: agent shares drawn from Dirichlet(alpha) (small alpha =
    very unequal), every agent keeping at least ``min_samples`` rows.

    Raises:
        ConfigError: If alpha is not positive or the rows cannot give every agent
            ``min_samples``.
    """
    n = len(np.asarray(labels))
    _check_num_agents(num_agents, n)
    if not alpha > 0:
        raise ConfigError(f"quantity skew alpha must be > 0, got {alpha}")
    if num_agents * min_samples > n:
        raise ConfigError(f"{n} samples cannot give {num_agents} agents {min_samples} each")
    rng = np.random.default_rng(seed)
    props = rng.dirichlet(np.full(num_agents, alpha))
    extra = n - num_agents * min_samples
    sizes = np.floor(props * extra).astype(np.int64) + min_samples
    sizes[: n - int(sizes.sum())] += 1  # hand out the rounding remainder
    order = rng.permutation(n).astype(np.int64)
    cuts = np.cumsum(sizes)[:-1]
    return [np.asarray(p, dtype=np.int64) for p in np.split(order, cuts)]


def _number(spec: str, arg: str, what: str, example: str) -> float:
    if not arg.strip():
        raise ConfigError(f"partition {spec!r} lacks its {what}: use e.g. {example!r}")
    try:
        value = float(arg)
    except ValueError:
        raise ConfigError(
            f"partition {spec!r}: {what} {arg.strip()!r} is not a number (use e.g. {example!r})"
        ) from None
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(
            f"partition {spec!r}: {what} must be a finite number > 0 (e.g. {example!r})"
        )
    return value


def parse_partition(spec: str) -> Partitioner:
    """Turn a partition spec into a partitioner.

    Args:
        spec: ``"iid"``, ``"dirichlet:ALPHA"`` (label skew, e.g. ``"dirichlet:0.5"``),
            ``"shards:K"`` (K classes per agent) or ``"quantity:ALPHA"`` (size skew).
            Case and surrounding spaces are ignored.

    Returns:
        A callable ``partitioner(labels, num_agents, seed) -> list of index arrays``.

    Raises:
        ConfigError: If the spec is not one of the forms above.
    """
    if not isinstance(spec, str):
        raise ConfigError(f"partition spec must be a string, got {spec!r}")
    text = spec.strip().lower()
    if text == "iid":
        return iid
    kind, _, arg = text.partition(":")
    if kind == "dirichlet":
        alpha = _number(spec, arg, "concentration alpha", "dirichlet:0.5")
        return functools.partial(_dirichlet_partitioner, alpha=alpha)
    if kind == "shards":
        k = _number(spec, arg, "classes per agent", "shards:2")
        if k != int(k):
            raise ConfigError(f"partition {spec!r}: classes per agent must be an integer")
        return functools.partial(_shards_partitioner, classes_per_agent=int(k))
    if kind == "quantity":
        alpha = _number(spec, arg, "concentration alpha", "quantity:1.0")
        return functools.partial(_quantity_partitioner, alpha=alpha)
    raise ConfigError(
        f"unknown partition {spec!r}: expected 'iid', 'dirichlet:ALPHA', 'shards:K' or "
        "'quantity:ALPHA'"
    )


def _shards_partitioner(
    labels: npt.ArrayLike, num_agents: int, seed: int = 0, *, classes_per_agent: int
) -> list[IndexArray]:
    return shards(labels, num_agents, classes_per_agent, seed)


def _quantity_partitioner(
    labels: npt.ArrayLike, num_agents: int, seed: int = 0, *, alpha: float
) -> list[IndexArray]:
    return quantity_skew(labels, num_agents, alpha, seed)


def _dirichlet_partitioner(
    labels: npt.ArrayLike, num_agents: int, seed: int = 0, *, alpha: float
) -> list[IndexArray]:
    return dirichlet(labels, num_agents, alpha, seed)
