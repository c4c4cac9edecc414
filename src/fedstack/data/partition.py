"""Split a labelled dataset across agents: IID, Dirichlet label skew, pathological
k-classes-per-agent shards, quantity skew, or the book's per-class keep ratios.

Every partitioner takes ``(labels, num_agents, seed)`` and returns one array of row
indices per agent. The index arrays of ``iid``, ``dirichlet``, ``shards`` and
``quantity_skew`` are disjoint and together cover every row. :func:`class_keep` (the
book's ``sel_count``/``def_count`` scheme) keeps a *fraction* of each class per agent, so
rows may stay unused; its shares are disjoint unless ``overlap`` is asked for.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Collection, Hashable, Sequence
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


def default_class_map(classes: Sequence[Hashable], num_agents: int) -> list[list[Hashable]]:
    """The book's class-to-agent map: the sorted classes cut into ``num_agents`` contiguous
    groups, the larger groups last (10 classes, 3 agents: 0-2, 3-5, 6-9 as in chapter 8).

    Raises:
        ConfigError: If there are more agents than classes (an agent would select none).
    """
    k = len(classes)
    if num_agents > k:
        raise ConfigError(
            f"the default class map needs at most one agent per class ({k} classes, "
            f"{num_agents} agents); give an explicit map"
        )
    base, extra = divmod(k, num_agents)
    sizes = [base + (1 if i >= num_agents - extra else 0) for i in range(num_agents)]
    groups: list[list[Hashable]] = []
    start = 0
    for size in sizes:
        groups.append(list(classes[start : start + size]))
        start += size
    return groups


def _check_ratio(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise ConfigError(f"{name} must be a number in [0, 1], got {value!r}")
    ratio = float(value)
    if not (math.isfinite(ratio) and 0.0 <= ratio <= 1.0):
        raise ConfigError(f"{name} must be a number in [0, 1], got {value!r}")
    return ratio


def class_keep(
    labels: npt.ArrayLike,
    num_agents: int,
    *,
    sel_count: float,
    def_count: float,
    class_map: Sequence[Collection[Hashable]] | None = None,
    seed: int = 0,
    overlap: bool = False,
) -> list[IndexArray]:
    """The book's non-IID split (chapters 7 and 8): per-class keep ratios.

    Agent ``a`` keeps ``floor(sel_count * n_c)`` rows of every class ``c`` it *selects*
    (``c in class_map[a]``) and ``floor(def_count * n_c)`` rows of every other class,
    where ``n_c`` is the number of rows of class ``c`` (the book's ``int(count * 5000)``).
    The book's chapter-8 setting is ``sel_count=1.0, def_count=0.2`` with agent 1
    selecting classes 0-2, agent 2 classes 3-5 and agent 3 classes 6-9 (the default map);
    chapter 7's FedCurv agents use ``def_count=0.1``.

    The rows of each class are shuffled and laid out one agent after the other, so the
    shares are disjoint as long as the agents' counts of every class add up to at most
    ``n_c``. The book's own settings exceed that (1.0 + 0.2 + 0.2 of every class): each of
    its agents draws from the whole dataset. ``overlap=True`` allows this: the layout
    then wraps around the class's rows, so an agent never holds a row twice and rows are
    shared as little as the counts permit (every row of a class is held by
    ``floor(total / n_c)`` or one more agents). Without it such counts are refused.

    Args:
        labels: One (hashable, sortable) label per row.
        num_agents: Number of agents.
        sel_count: Fraction of a selected class an agent keeps, in [0, 1].
        def_count: Fraction of every other class an agent keeps, in [0, 1].
        class_map: One collection of selected classes per agent (``len == num_agents``;
            a class may be selected by several agents or none). ``None``: the sorted
            classes cut into contiguous groups (:func:`default_class_map`).
        seed: Seed of the shuffles; the same seed gives the same shares.
        overlap: Allow agents to share rows when a class's counts exceed its rows.

    Returns:
        ``num_agents`` shuffled index arrays without repeated rows.

    Raises:
        ConfigError: If an argument is out of range, the map names a class absent from
            ``labels`` or has the wrong length, a class's counts exceed its rows without
            ``overlap``, or an agent would get no rows.
    """
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ConfigError(f"labels must be one-dimensional, got shape {y.shape}")
    n = len(y)
    _check_num_agents(num_agents, n)
    sel = _check_ratio("sel_count", sel_count)
    dflt = _check_ratio("def_count", def_count)
    if not isinstance(overlap, bool):
        raise ConfigError(f"overlap must be true or false, got {overlap!r}")
    classes = np.unique(y)
    present = {c.item() if isinstance(c, np.generic) else c for c in classes}
    if class_map is None:
        groups = [set(g) for g in default_class_map(sorted(present), int(num_agents))]
    else:
        if isinstance(class_map, str | bytes) or not isinstance(class_map, Sequence):
            raise ConfigError("class_map must be a sequence of class collections, one per agent")
        if len(class_map) != num_agents:
            raise ConfigError(
                f"the class map has {len(class_map)} groups but there are {num_agents} "
                "agents; give one group of selected classes per agent"
            )
        groups = []
        for a, group in enumerate(class_map):
            if isinstance(group, str | bytes) or not isinstance(group, Collection):
                raise ConfigError(f"class map group {a} must be a collection of classes")
            chosen = set(group)
            missing = sorted(chosen - present, key=repr)
            if missing:
                raise ConfigError(
                    f"class map group {a} names class(es) {missing} that no label has "
                    f"(classes present: {sorted(present, key=repr)})"
                )
            groups.append(chosen)

    rng = np.random.default_rng(seed)
    shares: list[list[IndexArray]] = [[] for _ in range(num_agents)]
    for cls in classes:
        key = cls.item() if isinstance(cls, np.generic) else cls
        rows = np.flatnonzero(y == cls).astype(np.int64)
        rng.shuffle(rows)
        n_c = len(rows)
        keep = [sel if key in groups[a] else dflt for a in range(num_agents)]
        # int(ratio * n_c) as the book; 1e-9 keeps 0.29 * 100 at 29, not 28.999...
        counts = [math.floor(r * n_c + 1e-9) for r in keep]
        total = sum(counts)
        if total > n_c and not overlap:
            ratios = " + ".join(f"{r:g}" for r in keep)
            raise ConfigError(
                f"class {key!r}: the agents keep {ratios} of its {n_c} rows ({total} rows > "
                f"{n_c}), so their shares cannot be disjoint; lower sel_count/def_count or "
                "allow overlap (overlap=true in a keep: spec; the agents then share rows, as "
                "the book's code does)"
            )
        start = 0
        for a, k in enumerate(counts):
            shares[a].append(rows[(start + np.arange(k, dtype=np.int64)) % n_c])
            start += k
    parts = [np.concatenate(s) for s in shares]
    for a, part in enumerate(parts):
        if len(part) == 0:
            raise ConfigError(
                f"agent {a} gets no rows (sel_count={sel}, def_count={dflt}, selected "
                f"classes {sorted(groups[a], key=repr)}); raise the ratios or select classes"
            )
        rng.shuffle(part)
    return parts


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


_KEEP_EXAMPLE = "keep:sel=1.0,def=0.2,map=0-2/3-5/6-9"
_KEEP_FORM = "keep:sel=S,def=D[,map=G/G/...][,overlap=true]"


def _class_group(spec: str, text: str) -> list[int]:
    """``"0-2+7"`` -> ``[0, 1, 2, 7]``: non-negative integer classes and ranges joined by +."""
    out: list[int] = []
    for item in text.split("+"):
        item = item.strip()
        lo_text, dash, hi_text = item.partition("-")
        try:
            lo = int(lo_text)
            hi = int(hi_text) if dash else lo
        except ValueError:
            raise ConfigError(
                f"partition {spec!r}: class {item!r} in the map is not a non-negative "
                f"integer or range A-B (use e.g. {_KEEP_EXAMPLE!r})"
            ) from None
        if lo < 0 or hi < lo:
            raise ConfigError(f"partition {spec!r}: class range {item!r} is empty or negative")
        if hi - lo >= 1_000_000:
            raise ConfigError(f"partition {spec!r}: class range {item!r} is too large")
        out.extend(range(lo, hi + 1))
    return out


def _parse_keep(spec: str, arg: str) -> Partitioner:
    options: dict[str, str] = {}
    if not arg.strip():
        raise ConfigError(
            f"partition {spec!r} lacks its keep ratios: use {_KEEP_FORM}, e.g. {_KEEP_EXAMPLE!r}"
        )
    for item in arg.split(","):
        key, eq, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or not key or not value:
            raise ConfigError(
                f"partition {spec!r}: {item.strip()!r} must look like key=value "
                f"({_KEEP_FORM}, e.g. {_KEEP_EXAMPLE!r})"
            )
        if key not in ("sel", "def", "map", "overlap"):
            raise ConfigError(
                f"partition {spec!r}: unknown option {key!r}; expected sel, def, map, overlap"
            )
        if key in options:
            raise ConfigError(f"partition {spec!r}: option {key!r} is given twice")
        options[key] = value
    missing = [k for k in ("sel", "def") if k not in options]
    if missing:
        raise ConfigError(
            f"partition {spec!r} lacks {' and '.join(missing)}: use {_KEEP_FORM}, "
            f"e.g. {_KEEP_EXAMPLE!r}"
        )
    ratios: dict[str, float] = {}
    for key in ("sel", "def"):
        try:
            ratios[key] = _check_ratio(f"{key}_count", float(options[key]))
        except (ValueError, ConfigError):
            raise ConfigError(
                f"partition {spec!r}: {key} must be a number in [0, 1], got {options[key]!r}"
            ) from None
    class_map: list[list[int]] | None = None
    if "map" in options:
        class_map = [_class_group(spec, g) for g in options["map"].split("/")]
    overlap_text = options.get("overlap", "false")
    if overlap_text not in ("true", "false", "yes", "no", "1", "0"):
        raise ConfigError(f"partition {spec!r}: overlap must be true or false")
    return functools.partial(
        _keep_partitioner,
        sel_count=ratios["sel"],
        def_count=ratios["def"],
        class_map=class_map,
        overlap=overlap_text in ("true", "yes", "1"),
    )


def parse_partition(spec: str) -> Partitioner:
    """Turn a partition spec into a partitioner.

    Args:
        spec: ``"iid"``, ``"dirichlet:ALPHA"`` (label skew, e.g. ``"dirichlet:0.5"``),
            ``"shards:K"`` (K classes per agent), ``"quantity:ALPHA"`` (size skew) or
            ``"keep:sel=S,def=D[,map=G/G/...][,overlap=true]"`` (the book's per-class keep
            ratios, :func:`class_keep`: one group G of selected classes per agent,
            classes and ranges joined by ``+`` such as ``0-2+7``; without ``map`` the
            default map of :func:`default_class_map`). Chapter 8's setting is
            ``"keep:sel=1.0,def=0.2,map=0-2/3-5/6-9,overlap=true"``. Case and
            surrounding spaces are ignored.

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
    if kind == "keep":
        return _parse_keep(spec, arg)
    raise ConfigError(
        f"unknown partition {spec!r}: expected 'iid', 'dirichlet:ALPHA', 'shards:K' or "
        f"'quantity:ALPHA', or the book's keep ratios '{_KEEP_FORM}'"
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


def _keep_partitioner(
    labels: npt.ArrayLike,
    num_agents: int,
    seed: int = 0,
    *,
    sel_count: float,
    def_count: float,
    class_map: Sequence[Collection[Hashable]] | None,
    overlap: bool,
) -> list[IndexArray]:
    return class_keep(
        labels,
        num_agents,
        sel_count=sel_count,
        def_count=def_count,
        class_map=class_map,
        seed=seed,
        overlap=overlap,
    )
