"""Byzantine-robust aggregation: median, trimmed mean, Krum, Multi-Krum, geometric median,
Bulyan, and norm clipping.

With ``n`` updates of which up to ``f`` may be arbitrary (faulty or malicious), the plain
mean can be moved anywhere by a single agent. These rules bound that influence (the book's
chapter 7 "robust mean estimators", checklist G7-05..G7-08 and G7-13):

=====================  ==============================================================
``median``             coordinate-wise median (Yin et al., ICML 2018; book G7-05)
``trimmed_mean``       coordinate-wise mean after dropping the ``floor(beta n)`` largest
                       and smallest values (Yin et al., ICML 2018)
``krum``               the update with the smallest sum of squared distances to its
                       ``n - f - 2`` nearest others (Blanchard et al., NeurIPS 2017)
``multikrum``          the mean of the ``m`` best-scoring updates (same paper; the book's
                       "Krum with averaging", G7-08)
``geometric_median``   ``argmin_z sum_k a_k ||z - w_k||`` by smoothed Weiszfeld iterations
                       (Pillutla, Kakade, Harchaoui, RFA, 2022; book G7-06)
``bulyan``             Krum selection of ``n - 2f`` updates, then per coordinate the mean of
                       the ``n - 4f`` values closest to the median (El Mhamdi, Guerraoui,
                       Rouault, ICML 2018)
``normclip``           every update's change ``w_k - w`` clipped to an L2 norm bound, then
                       the (weighted) mean (streaming; the norm-bounding defence of Sun et
                       al., "Can you really backdoor federated learning?", 2019)
=====================  ==============================================================

All rules work on the agents' *models*. They are translation-equivariant (a coordinate's
median of models is the global model plus the median of the deltas; distances between
models are distances between deltas), so the result is the same as working on deltas
against the global model, which only :class:`NormClip` needs explicitly.

Numerics: results are computed in float64 and cast back to each tensor's dtype (integers
rounded, booleans by majority, :func:`fedstack.strategies.base.cast_like`); the order
statistics of floating-point tensors are taken in their own dtype, which is exact. Krum,
Multi-Krum, Bulyan and the geometric median need only the pairwise squared distances, which
come from one pass over the updates: the Gram matrix of the deltas ``w_k - w`` against the
round's global model ``w`` (distances are translation-invariant; taking deltas keeps the
``|a|^2 + |b|^2 - 2 a.b`` cancellation at the scale of the honest agents' changes rather than
of the weights, and a wild update only inflates its own row).
The geometric median's Weiszfeld iterations then run on the ``n`` mixing coefficients of
``z = sum_k c_k w_k`` (every iterate is such a convex combination), so an iteration costs
``O(n^2)`` instead of a pass over the models; one final pass forms ``z``.

Memory: the buffered rules (everything but ``normclip``) keep the round's updates by
reference, at most ``max_updates`` of them (default 1,000), i.e. ``n x model bytes``; on top
of that they need working blocks of ~4 MiB each (two or three at a time), ``n x n``
matrices, and the result (plus a float64 accumulator the size of the model for the
averaging ones: Multi-Krum, the geometric median, ``beta = 0``). ``bench/aggregation.py``
measures 40-120 MB of peak working memory for a 1e7-parameter float32 model, independent of
``n``. ``normclip`` streams (a float64 accumulator the size of the model).

Refusals: Krum and Multi-Krum need ``n > 2f + 2`` updates, Bulyan ``n >= 4f + 3``. With fewer,
``result()`` raises :class:`ValueError` saying how many are needed, and the round stays open
(:class:`RobustAccumulator`): more updates can be added and ``result()`` called again. A
``max_updates`` below that minimum is refused when the strategy is built.

Determinism: no randomness; ties (equal Krum scores) go to the update that arrived first,
and of two values equally far from Bulyan's median the smaller is kept.

BLAS: only the Gram matrix (one ``n x block`` by ``block x n`` product per block) goes to
BLAS; the small products (norms, ``n x n`` times ``n``) use ``np.einsum``'s own loops,
because OpenBLAS threads small calls too and, on an oversubscribed host (more busy threads
than cores), a threaded call can stall for milliseconds. For the same reason an aggregator
on a shared host is best run with ``OPENBLAS_NUM_THREADS=1`` (single-threaded, the Gram
products are as fast here: ``bench/aggregation.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from fedstack.errors import InvalidUpdate
from fedstack.strategies.base import (
    BufferedAccumulator,
    Result,
    Strategy,
    Update,
    cast_like,
    register,
)
from fedstack.strategies.fedavg import WeightedMean
from fedstack.types import Array, Metrics, Weights

__all__ = [
    "DEFAULT_MAX_UPDATES",
    "Bulyan",
    "GeometricMedian",
    "Krum",
    "Median",
    "MultiKrum",
    "NormClip",
    "RobustAccumulator",
    "TrimmedMean",
    "pairwise_sq_distances",
]

F64 = np.ndarray[Any, np.dtype[np.float64]]
Combine = Callable[[Weights, list[Update], Mapping[str, Any]], Result]

DEFAULT_MAX_UPDATES = 1000
"""Default bound on the updates a buffered rule keeps per round."""

_BLOCK_BYTES = 4 << 20
"""Working block size: n updates x (this / (n x 8)) coordinates of float64."""


# ------------------------------------------------------------------------ plumbing
class RobustAccumulator(BufferedAccumulator):
    """A :class:`BufferedAccumulator` that refuses to aggregate fewer than ``min_updates``.

    The refusal (a :class:`ValueError` saying how many updates are needed) does not use up
    the round: once more updates have been added, :meth:`result` can be called again.
    """

    def __init__(
        self,
        global_weights: Weights,
        state: Mapping[str, Any],
        combine: Combine,
        max_updates: int,
        min_updates: int = 1,
        requirement: str = "",
    ) -> None:
        super().__init__(global_weights, state, combine, max_updates)
        self.min_updates = min_updates
        self.requirement = requirement

    def result(self) -> Result:
        n = len(self.updates)
        if 0 < n < self.min_updates and not self._done:
            raise ValueError(
                f"{self.requirement}: needs at least {self.min_updates} updates, got {n}"
            )
        return super().result()


def _check_max_updates(max_updates: int, needed: int = 1) -> int:
    if isinstance(max_updates, bool) or not isinstance(max_updates, int) or max_updates < 1:
        raise ValueError(f"max_updates must be a positive integer, got {max_updates!r}")
    if max_updates < needed:
        raise ValueError(
            f"max_updates={max_updates} is below the {needed} updates this rule needs per round"
        )
    return max_updates


def _check_f(f: int) -> int:
    if isinstance(f, bool) or not isinstance(f, int) or f < 0:
        raise ValueError(f"f (the number of Byzantine agents) must be an integer >= 0, got {f!r}")
    return f


def _flat(arr: Array) -> Array:
    """A 1-d view of ``arr`` (a copy only if it is not contiguous)."""
    return np.asarray(arr).reshape(-1)


def _tensors(
    template: Weights, updates: Sequence[Update]
) -> Iterator[tuple[str, Array, list[Array]]]:
    """For every template tensor: its name, the template array and the updates' flat views."""
    for name, ref in template.items():
        ref = np.asarray(ref)
        flats = [_flat(u.weights[name]) for u in updates]
        for u, f in zip(updates, flats, strict=True):
            if f.size != ref.size:
                raise InvalidUpdate(
                    f"tensor {name!r} has {f.size} values, expected {ref.size}", agent_id=u.agent_id
                )
        yield name, ref, flats


def _block_len(n: int, itemsize: int = 8) -> int:
    return max(1024, min(1 << 17, _BLOCK_BYTES // max(1, n * itemsize)))


def _metrics(updates: Sequence[Update], **extra: float | int | str | bool) -> Metrics:
    out: Metrics = {
        "num_updates": len(updates),
        "num_samples": sum(max(u.num_samples, 0) for u in updates),
    }
    out.update(extra)
    return out


def _ids(updates: Sequence[Update], idx: Sequence[int]) -> str:
    return ",".join(updates[i].agent_id for i in idx)


def _mean_of(
    template: Weights, updates: Sequence[Update], weights: Sequence[float] | None = None
) -> Weights:
    """The (weighted) mean of ``updates`` cast like ``template`` (float64 accumulation)."""
    acc = WeightedMean(template, weighted=False)
    for i, u in enumerate(updates):
        acc.add(u, 1.0 if weights is None else float(weights[i]))
    return acc.mean_like(template)


# ---------------------------------------------------------------- coordinate-wise
SortedRule = Callable[[np.ndarray[Any, Any]], F64]
"""Maps a block of sorted values, shape (coordinates, n), to one float64 value per row."""


def _coordinatewise(template: Weights, updates: Sequence[Update], rule: SortedRule) -> Weights:
    """Apply ``rule`` to every coordinate's sorted values, block by block.

    Floating-point tensors are sorted in their own dtype (exact; numpy's SIMD sort is far
    faster than ``np.partition`` here), other dtypes as float64. Working memory: two blocks
    of ``n x`` :func:`_block_len` values.
    """
    n = len(updates)
    out: Weights = {}
    for name, ref, flats in _tensors(template, updates):
        wdt = ref.dtype if ref.dtype.kind == "f" else np.dtype(np.float64)
        size = ref.size
        res: Array = np.empty(size, dtype=ref.dtype)
        step = _block_len(n, wdt.itemsize)
        rows = np.empty((n, min(step, size)), dtype=wdt)
        for a in range(0, size, step):
            b = min(a + step, size)
            blk = rows[:, : b - a]
            for i, f in enumerate(flats):
                blk[i] = f[a:b]
            cols = np.ascontiguousarray(blk.T)  # (coordinates, n): sort along contiguous rows
            cols.sort(axis=1)
            res[a:b] = cast_like(rule(cols), ref)
        out[name] = res.reshape(ref.shape)
    return out


def _median_rule(s: np.ndarray[Any, Any]) -> F64:
    n = s.shape[1]
    if n % 2:
        return np.asarray(s[:, n // 2], dtype=np.float64)
    lo = np.asarray(s[:, n // 2 - 1], dtype=np.float64)
    return np.asarray((lo + s[:, n // 2]) * 0.5, dtype=np.float64)


def _trimmed_rule(k: int) -> SortedRule:
    def rule(s: np.ndarray[Any, Any]) -> F64:
        n = s.shape[1]
        kept = n - 2 * k
        total = np.add.reduce(s[:, k : n - k], axis=1, dtype=np.float64)
        return np.asarray(total / kept, dtype=np.float64)

    return rule


def _closest_to_median_rule(beta: int) -> SortedRule:
    """Bulyan's aggregation: per coordinate, the mean of the ``beta`` values closest to the
    median. In sorted order they form the window ``s[j : j + beta]`` whose start ``j`` is the
    number of windows that lose to the next one (``med - s[j] > s[j + beta] - med``, a
    monotone test); of two values equally far from the median the smaller is kept."""

    def rule(s: np.ndarray[Any, Any]) -> F64:
        n = s.shape[1]
        med = _median_rule(s)
        start = np.zeros(s.shape[0], dtype=np.intp)
        for j in range(n - beta):
            start += (med - s[:, j]) > (s[:, j + beta] - med)
        out = np.empty(s.shape[0], dtype=np.float64)
        for j in range(n - beta + 1):
            rows = np.flatnonzero(start == j)
            if rows.size:
                out[rows] = np.add.reduce(s[rows, j : j + beta], axis=1, dtype=np.float64)
        out /= beta
        return out

    return rule


# ---------------------------------------------------------------------- distances
def gram_of_deltas(template: Weights, updates: Sequence[Update]) -> F64:
    """The ``n x n`` Gram matrix of the updates' deltas ``w_k - w`` (``w``: ``template``, the
    round's global model; all tensors flattened, float64). One pass over the updates.

    Distances are translation-invariant, so any centre gives the same distances in exact
    arithmetic; the global model is the one that keeps the ``|a|^2 + |b|^2 - 2 a.b``
    cancellation at the scale of the *honest* deltas. (Centring on the updates' mean would
    let one wild update inflate every row and wipe out the distances between the others.)
    """
    n = len(updates)
    gram = np.zeros((n, n), dtype=np.float64)
    step = _block_len(n)
    buf: F64 | None = None
    for _, ref, flats in _tensors(template, updates):
        size = ref.size
        if size == 0:
            continue
        g = _flat(ref)
        width = min(step, size)
        if buf is None or buf.shape[1] < width:
            buf = np.empty((n, width))
        for a in range(0, size, step):
            b = min(a + step, size)
            blk = buf[:, : b - a]
            for i, f in enumerate(flats):
                np.subtract(f[a:b], g[a:b], out=blk[i], dtype=np.float64)
            gram += blk @ blk.T
    return gram


def pairwise_sq_distances(template: Weights, updates: Sequence[Update]) -> F64:
    """``D[i, j] = ||w_i - w_j||^2`` over all tensors (float64, zero diagonal, symmetric)."""
    return _sq_distances(gram_of_deltas(template, updates))


def _sq_distances(gram: F64) -> F64:
    diag = np.diag(gram)
    d = diag[:, None] + diag[None, :] - 2.0 * gram
    d = np.maximum((d + d.T) * 0.5, 0.0)
    np.fill_diagonal(d, 0.0)
    return d


def _krum_scores(dist: F64, idx: Sequence[int], f: int) -> F64:
    """Krum scores of the updates ``idx`` among themselves: the sum of the squared distances
    to the ``max(1, r - f - 2)`` nearest others (``r = len(idx)``; 0 when alone)."""
    r = len(idx)
    k = min(max(r - f - 2, 1), r - 1)
    if k <= 0:
        return np.zeros(r)
    sub = dist[np.ix_(idx, idx)].copy()
    np.fill_diagonal(sub, np.inf)
    nearest = np.sort(sub, axis=1)[:, :k]
    return np.asarray(nearest.sum(axis=1), dtype=np.float64)


# ---------------------------------------------------------------------- strategies
class _Buffered(Strategy):
    """Shared plumbing of the buffered (order-statistic) rules.

    In a horizontal federation these rules run PER CLUSTER: each member applies the rule
    to its own agents' updates (so ``f`` and ``min_updates`` are per cluster), and the
    global model is the sample-weighted synthesis of the members' results. The members
    themselves are trusted: a Byzantine aggregator is not defended against.
    """

    streaming = False

    def __init__(self, max_updates: int) -> None:
        self.max_updates = _check_max_updates(max_updates, self.min_updates)

    @property
    def min_updates(self) -> int:
        """The fewest updates :meth:`combine` accepts."""
        return 1

    def requirement(self) -> str:
        return self.name

    def combine(
        self, global_weights: Weights, updates: list[Update], state: Mapping[str, Any]
    ) -> Result:
        raise NotImplementedError

    def begin(
        self,
        global_weights: Weights,
        state: Mapping[str, Any],
        *,
        round: int = 1,
        rng: np.random.Generator | None = None,
    ) -> RobustAccumulator:
        return RobustAccumulator(
            global_weights,
            state,
            self.combine,
            self.max_updates,
            self.min_updates,
            self.requirement(),
        )


@register
class Median(_Buffered):
    """Coordinate-wise median of the agents' models (Yin et al., ICML 2018; book G7-05).

    ``w[i] = median_k w_k[i]`` (the mean of the two middle values for an even ``n``).
    Unweighted: an attacker's claimed sample count buys nothing. Tolerates ``f < n / 2``.
    Memory: the round's updates (at most ``max_updates``) plus a ~4 MiB working block.
    """

    name = "median"

    def __init__(self, max_updates: int = DEFAULT_MAX_UPDATES) -> None:
        super().__init__(max_updates)

    def combine(
        self, global_weights: Weights, updates: list[Update], state: Mapping[str, Any]
    ) -> Result:
        weights = _coordinatewise(global_weights, updates, _median_rule)
        return Result(weights, {}, _metrics(updates))


@register
class TrimmedMean(_Buffered):
    """Coordinate-wise beta-trimmed mean (Yin et al., ICML 2018).

    Per coordinate, drop the ``k = floor(beta n)`` largest and the ``k`` smallest values and
    average the remaining ``n - 2k``; ``beta`` is the fraction trimmed at *each* end,
    ``0 <= beta < 0.5`` (choose ``beta >=`` the fraction of Byzantine agents).
    ``beta = 0`` is the plain (unweighted) mean. Metrics: ``num_trimmed`` (per end and
    coordinate), ``num_averaged``. Memory: the round's updates (at most ``max_updates``) plus
    a ~4 MiB working block.
    """

    name = "trimmed_mean"

    def __init__(self, beta: float = 0.1, max_updates: int = DEFAULT_MAX_UPDATES) -> None:
        beta = float(beta)
        if not 0.0 <= beta < 0.5:
            raise ValueError(
                f"beta (the fraction trimmed at each end) must be in [0, 0.5), got {beta}"
            )
        self.beta = beta
        super().__init__(max_updates)

    def trimmed(self, n: int) -> int:
        """Values dropped at each end of a coordinate with ``n`` updates."""
        return int(math.floor(self.beta * n + 1e-9))

    def combine(
        self, global_weights: Weights, updates: list[Update], state: Mapping[str, Any]
    ) -> Result:
        n = len(updates)
        k = self.trimmed(n)
        if k == 0:
            weights = _mean_of(global_weights, updates)
        else:
            weights = _coordinatewise(global_weights, updates, _trimmed_rule(k))
        return Result(weights, {}, _metrics(updates, num_trimmed=k, num_averaged=n - 2 * k))


@register
class Krum(_Buffered):
    """Krum (Blanchard, El Mhamdi, Guerraoui, Stainer, NeurIPS 2017; book G7-07).

    With ``f`` assumed Byzantine agents among ``n > 2f + 2``: the score of update ``i`` is
    the sum of the squared L2 distances (over all tensors) to its ``n - f - 2`` nearest
    *other* updates, and the update with the smallest score is the new model (as in the
    paper; the book's code sums plain distances and counts the zero self-distance).
    Unweighted. Fewer than ``2f + 3`` updates: :meth:`RobustAccumulator.result` raises
    :class:`ValueError` saying how many are needed. Metrics: ``selected`` (agent id),
    ``score``. Memory: the round's updates (at most ``max_updates``), ``n x n`` distances
    and a ~4 MiB working block.
    """

    name = "krum"

    def __init__(self, f: int = 1, max_updates: int = DEFAULT_MAX_UPDATES) -> None:
        self.f = _check_f(f)
        super().__init__(max_updates)

    @property
    def min_updates(self) -> int:
        return 2 * self.f + 3

    def requirement(self) -> str:
        return f"{self.name} with f={self.f} (n > 2f + 2)"

    def scores(self, global_weights: Weights, updates: list[Update]) -> F64:
        dist = pairwise_sq_distances(global_weights, updates)
        return _krum_scores(dist, list(range(len(updates))), self.f)

    def combine(
        self, global_weights: Weights, updates: list[Update], state: Mapping[str, Any]
    ) -> Result:
        scores = self.scores(global_weights, updates)
        best = int(np.argmin(scores))
        chosen = updates[best]
        weights: Weights = {}
        for name, ref in global_weights.items():
            arr = np.asarray(chosen.weights[name])
            if arr.dtype == ref.dtype:
                weights[name] = arr.copy().reshape(np.shape(ref))
            else:
                weights[name] = cast_like(np.asarray(arr, dtype=np.float64), ref).reshape(
                    np.shape(ref)
                )
        return Result(
            weights, {}, _metrics(updates, selected=chosen.agent_id, score=float(scores[best]))
        )


@register
class MultiKrum(Krum):
    """Multi-Krum (Blanchard et al., NeurIPS 2017; the book's "Krum with averaging", G7-08).

    The unweighted mean of the ``m`` updates with the lowest Krum scores (see :class:`Krum`;
    ``f`` assumed Byzantine agents, ``n > 2f + 2``). ``m`` defaults to ``n - f``; a larger
    ``m`` than there are updates means all of them, and ``m = n`` is the plain mean.
    Metrics: ``selected`` (comma-separated agent ids, best score first), ``num_selected``.
    Memory: as :class:`Krum`, plus the float64 mean.
    """

    name = "multikrum"

    def __init__(
        self, f: int = 1, m: int | None = None, max_updates: int = DEFAULT_MAX_UPDATES
    ) -> None:
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
            raise ValueError(
                f"m (the number of updates averaged) must be a positive integer or None, got {m!r}"
            )
        self.m = m
        super().__init__(f, max_updates)

    def selected_count(self, n: int) -> int:
        return min(n, self.m if self.m is not None else n - self.f)

    def combine(
        self, global_weights: Weights, updates: list[Update], state: Mapping[str, Any]
    ) -> Result:
        scores = self.scores(global_weights, updates)
        m = self.selected_count(len(updates))
        order = [int(i) for i in np.argsort(scores, kind="stable")[:m]]
        weights = _mean_of(global_weights, [updates[i] for i in order])
        return Result(weights, {}, _metrics(updates, selected=_ids(updates, order), num_selected=m))


@register
class GeometricMedian(_Buffered):
    """Geometric median by smoothed Weiszfeld iterations (RFA: Pillutla, Kakade, Harchaoui,
    "Robust Aggregation for Federated Learning", IEEE TSP 2022; book G7-06).

    ``z = argmin_z sum_k a_k ||z - w_k||_2`` over all tensors flattened, with ``a_k = 1``
    (or the sample counts, ``weighted=True``, as RFA does). Starting at the (weighted) mean,
    each iteration sets ``z <- sum_k b_k w_k / sum_k b_k`` with
    ``b_k = a_k / max(nu, ||z - w_k||)``: ``nu`` is RFA's smoothing, which guards against a
    zero distance (``z`` on an update, identical updates). It stops when a step moves ``z``
    by at most ``eps`` times the median distance of the updates to ``z`` (a scale-free form
    of the book's ``||z_new - z_old|| <= eps``; the median, so that a far outlier does not
    loosen it), or after ``max_iter`` iterations. Distances
    come from the Gram matrix of the deltas (see the module notes), exact to about
    ``1e-8 x`` the deltas' norms; below that they act like extra smoothing.

    Metrics: ``iterations`` (Weiszfeld steps taken), ``converged``, ``objective``
    (``sum_k a_k ||z - w_k||``). Memory: the round's updates (at most ``max_updates``),
    ``n x n`` matrices, a ~4 MiB working block and the float64 result.
    """

    name = "geometric_median"

    def __init__(
        self,
        max_iter: int = 100,
        eps: float = 1e-6,
        nu: float = 1e-6,
        weighted: bool = False,
        max_updates: int = DEFAULT_MAX_UPDATES,
    ) -> None:
        if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
            raise ValueError(f"max_iter must be a positive integer, got {max_iter!r}")
        if not (float(eps) > 0 and math.isfinite(eps)):
            raise ValueError(f"eps must be a positive number, got {eps!r}")
        if not (float(nu) > 0 and math.isfinite(nu)):
            raise ValueError(f"nu must be a positive number, got {nu!r}")
        self.max_iter = max_iter
        self.eps = float(eps)
        self.nu = float(nu)
        self.weighted = bool(weighted)
        super().__init__(max_updates)

    def coefficients(self, gram: F64, alpha: F64) -> tuple[F64, int, bool, float]:
        """Weiszfeld on the mixing coefficients ``c`` of ``z = sum_k c_k w_k``: returns
        ``c``, the iterations taken, whether it converged, and the objective."""
        diag = np.diag(gram)
        total = float(alpha.sum())

        def distances(c: F64) -> F64:
            gc = np.einsum("ij,j->i", gram, c)
            sq = float(np.einsum("i,i->", c, gc)) - 2.0 * gc + diag
            return np.asarray(np.sqrt(np.maximum(sq, 0.0)), dtype=np.float64)

        c = alpha / total
        d = distances(c)
        converged = False
        iterations = 0
        while iterations < self.max_iter and not converged:
            beta = alpha / np.maximum(d, self.nu)
            new = beta / beta.sum()
            dc = new - c
            step = math.sqrt(max(float(np.einsum("i,ij,j->", dc, gram, dc)), 0.0))
            c = new
            d = distances(c)
            iterations += 1
            converged = step <= self.eps * max(float(np.median(d)), self.nu)
        return c, iterations, converged, float(np.einsum("i,i->", alpha, d))

    def combine(
        self, global_weights: Weights, updates: list[Update], state: Mapping[str, Any]
    ) -> Result:
        if self.weighted:
            alpha = np.array([float(u.num_samples) if u.num_samples > 0 else 1.0 for u in updates])
        else:
            alpha = np.ones(len(updates))
        gram = gram_of_deltas(global_weights, updates)
        c, it, converged, objective = self.coefficients(gram, alpha)
        weights = _mean_of(global_weights, updates, [float(x) for x in c])
        return Result(
            weights, {}, _metrics(updates, iterations=it, converged=converged, objective=objective)
        )


@register
class Bulyan(_Buffered):
    """Bulyan (El Mhamdi, Guerraoui, Rouault, "The Hidden Vulnerability of Distributed
    Learning in Byzantium", ICML 2018), over Krum.

    With ``f`` assumed Byzantine agents among ``n >= 4f + 3``:

    1. selection: ``theta = n - 2f`` times, run Krum on the updates not yet selected
       (scores over the ``max(1, r - f - 2)`` nearest of the ``r`` remaining) and move the
       best one to the selection;
    2. aggregation: per coordinate, the mean of the ``beta = theta - 2f`` selected values
       closest to the selection's median (a window of ``beta`` consecutive sorted values).

    Unweighted. Fewer than ``4f + 3`` updates: :meth:`RobustAccumulator.result` raises
    :class:`ValueError` saying how many are needed. Metrics: ``selected`` (comma-separated
    agent ids in selection order), ``num_selected`` (theta), ``num_averaged`` (beta).
    Memory: the round's updates (at most ``max_updates``), ``n x n`` distances and a
    ~4 MiB working block.
    """

    name = "bulyan"

    def __init__(self, f: int = 1, max_updates: int = DEFAULT_MAX_UPDATES) -> None:
        self.f = _check_f(f)
        super().__init__(max_updates)

    @property
    def min_updates(self) -> int:
        return 4 * self.f + 3

    def requirement(self) -> str:
        return f"{self.name} with f={self.f} (n >= 4f + 3)"

    def select(self, global_weights: Weights, updates: list[Update]) -> list[int]:
        """Indices of the ``n - 2f`` updates chosen by repeated Krum, in selection order."""
        n = len(updates)
        theta = n - 2 * self.f
        dist = pairwise_sq_distances(global_weights, updates)
        remaining = list(range(n))
        chosen: list[int] = []
        while len(chosen) < theta:
            scores = _krum_scores(dist, remaining, self.f)
            pick = remaining.pop(int(np.argmin(scores)))
            chosen.append(pick)
        return chosen

    def combine(
        self, global_weights: Weights, updates: list[Update], state: Mapping[str, Any]
    ) -> Result:
        chosen = self.select(global_weights, updates)
        beta = len(chosen) - 2 * self.f
        weights = _coordinatewise(
            global_weights, [updates[i] for i in sorted(chosen)], _closest_to_median_rule(beta)
        )
        return Result(
            weights,
            {},
            _metrics(
                updates, selected=_ids(updates, chosen), num_selected=len(chosen), num_averaged=beta
            ),
        )


# ------------------------------------------------------------------- norm clipping
def delta_norm(weights: Weights, base: Weights, scratch: F64 | None = None) -> float:
    """``||weights - base||_2`` over all of ``base``'s tensors, in float64, block by block."""
    total = 0.0
    step = 1 << 15
    buf = scratch if scratch is not None and scratch.size >= step else np.empty(step)
    for name, ref in base.items():
        x = _flat(weights[name])
        g = _flat(ref)
        if x.size != g.size:
            raise InvalidUpdate(f"tensor {name!r} has {x.size} values, expected {g.size}")
        for a in range(0, x.size, step):
            b = min(a + step, x.size)
            d = buf[: b - a]
            np.subtract(x[a:b], g[a:b], out=d, dtype=np.float64)
            total += float(np.einsum("i,i->", d, d))  # not BLAS (see the module notes)
    return math.sqrt(total)


class NormClipAccumulator:
    """Streams ``sum_k a_k s_k w_k`` (:class:`WeightedMean`) with ``s_k`` the clip factor.

    The clipped model is ``w + s_k (w_k - w)``, so the weighted mean of the clipped models
    is ``(S m + (A - S) w) / A`` with ``m`` the streamed mean, ``S = sum a_k s_k`` and
    ``A = sum a_k``.
    """

    def __init__(self, global_weights: Weights, bound: float, weighted: bool) -> None:
        self._global = global_weights
        self._bound = bound
        self._mean = WeightedMean(global_weights, weighted)
        self._scratch = np.empty(1 << 15)
        self._weight_total = 0.0
        self._clipped = 0
        self._max_norm = 0.0

    @property
    def count(self) -> int:
        return self._mean.count

    def add(self, update: Update) -> None:
        norm = delta_norm(update.weights, self._global, self._scratch)
        if not math.isfinite(norm):
            raise InvalidUpdate("update is not finite", agent_id=update.agent_id)
        a = self._mean.weight_of(update)
        scale = 1.0
        if norm > self._bound:
            scale = self._bound / norm
            self._clipped += 1
        self._mean.add(update, a * scale)
        self._weight_total += a
        self._max_norm = max(self._max_norm, norm)

    def result(self) -> Result:
        means = self._mean.mean64()
        s = self._mean.total
        big_a = self._weight_total
        weights: Weights = {}
        for name, ref in self._global.items():
            m = means[name]
            if s != big_a:
                m *= s / big_a
                m += np.asarray(ref, dtype=np.float64) * ((big_a - s) / big_a)
            weights[name] = cast_like(m, ref)
        return Result(
            weights,
            {},
            {
                "num_updates": self._mean.count,
                "num_samples": self._mean.samples,
                "num_clipped": self._clipped,
                "max_update_norm": self._max_norm,
            },
        )


@register
class NormClip(Strategy):
    """Norm clipping then averaging (Sun, Kairouz, Suresh, McMahan, "Can You Really Backdoor
    Federated Learning?", 2019; the clipping step of DP-FedAvg, McMahan et al., ICLR 2018).

    Each update's change ``w_k - w`` (``w``: the round's global model) is scaled to L2 norm
    at most ``bound`` (over all tensors), and the clipped models
    ``w + min(1, bound / ||w_k - w||) (w_k - w)`` are averaged, sample-weighted
    (``weighted=True``) or not. Updates within the bound pass unchanged. Streaming: one float64
    accumulator the size of the model, whatever the number of updates. Metrics:
    ``num_clipped``, ``max_update_norm``.

    In a horizontal federation it runs per cluster (each member clips its own agents'
    updates against the global model); the synthesis of clipped means stays within the
    bound of the global model.
    """

    name = "normclip"

    def __init__(self, bound: float, weighted: bool = True) -> None:
        bound = float(bound)
        if not (bound > 0 and math.isfinite(bound)):
            raise ValueError(f"bound must be a positive number, got {bound!r}")
        self.bound = bound
        self.weighted = bool(weighted)

    def begin(
        self,
        global_weights: Weights,
        state: Mapping[str, Any],
        *,
        round: int = 1,
        rng: np.random.Generator | None = None,
    ) -> NormClipAccumulator:
        return NormClipAccumulator(global_weights, self.bound, self.weighted)
