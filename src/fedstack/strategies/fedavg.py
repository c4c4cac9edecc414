"""FedAvg: the sample-weighted mean of the agents' models (McMahan et al., 2017).

``w = sum_k n_k w_k / sum_k n_k`` tensor by tensor (the book's ``_average_aggregate``),
accumulated as updates arrive and cast back to each tensor's dtype.

Precision (``FedAvg(precision=...)``):

* ``"auto"`` (the default): a float32 tensor is accumulated in float32, as numpy-based
  frameworks do; every other dtype in float64. Each product and addition rounds to 2**-24,
  so the relative error grows like ``N * 2**-24`` over ``N`` updates and, beyond two
  updates, the result depends on the order in which they arrive.
* ``"float64"``: every tensor is accumulated in float64. A float32 value times an integer
  sample count below 2**29 is exact in float64 and the float64 sum of ``N`` such terms has a
  relative error of at most ~``N * 2**-53``, so a float32 result is the correctly rounded
  mean (except within a hair of a rounding tie) whatever the arrival order
  (``test_float32_accumulates_in_float64``). It moves 20 instead of 12 bytes of memory per
  float32 element and update, so it is slower once the model outgrows the caches
  (``bench/aggregation.py`` measures both).

Streaming and memory: one accumulator per tensor plus one block of work buffers
(:class:`Scratch`) per round, whatever the number of updates; nothing of an update is kept
after :meth:`WeightedMean.add` returns.

Speed: ``acc += n_k * w_k`` is done block by block (:func:`accumulate`): in float64, blocks
of :data:`BLOCK` elements, so the float64 copy of a float32 input lives only in the L2 cache
and each update costs one read of the input plus one read and one write of the
accumulator; in float32, blocks of :data:`BLOCK32` elements. Weight 1 (unweighted, or
``weight=1.0``) skips the multiply. The result is divided and cast to the tensor's dtype in
one pass.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from fedstack.errors import InvalidUpdate
from fedstack.strategies.base import Result, Strategy, Update, cast_like, register
from fedstack.types import Array, Weights

F64 = np.ndarray[Any, np.dtype[np.float64]]

BLOCK = 1 << 16
"""Elements per block of the streaming update (512 KiB of float64 accumulator per block,
with its float64 temporary and float32 staging copy: ~1.3 MiB, about the L2 cache)."""


BLOCK32 = 1 << 20
"""Elements per block of the float32 path (4 MiB temporary): fewer, larger numpy calls than
cache-sized blocks (``bench/aggregation.py`` compares block sizes)."""


class Scratch:
    """Per-accumulator work buffers for :func:`accumulate` (one block each, ~768 KiB)."""

    __slots__ = ("f32", "f64")

    def __init__(self) -> None:
        self.f64: F64 = np.empty(BLOCK, dtype=np.float64)
        self.f32: np.ndarray[Any, np.dtype[np.float32]] = np.empty(BLOCK32, dtype=np.float32)


def accumulate(
    acc: np.ndarray[Any, Any], arr: Array, weight: float, scratch: Scratch, assign: bool = False
) -> None:
    """``acc += weight * arr`` (``assign``: ``acc[...] = weight * arr``) in float64, block by
    block (``acc`` is C-contiguous).

    Each element gets exactly ``acc + float64(arr) * weight`` (``acc + float64(arr)`` for
    weight 1): the same numbers as the whole-array expression, without a full-size
    temporary. A float32 block is first copied into a cache-resident float32 buffer and
    converted there, which is faster than numpy's float32 -> float64 conversion straight from
    main memory (``bench/aggregation.py`` compares the two).
    """
    flat = acc.reshape(-1)
    src = np.asarray(arr).reshape(-1)
    n = flat.size
    if src.size != n:
        raise ValueError(f"cannot accumulate {src.size} values into {n}")
    if acc.dtype == np.float32:  # precision "auto" on a float32 tensor: 12 bytes/element
        step = scratch.f32.size
        for a in range(0, n, step):
            b = min(a + step, n)
            blk = flat[a:b]
            if assign:
                np.multiply(src[a:b], np.float32(weight), out=blk)
            elif weight == 1.0:
                np.add(blk, src[a:b], out=blk)
            else:
                tmp32 = scratch.f32[: b - a]
                np.multiply(src[a:b], np.float32(weight), out=tmp32)
                np.add(blk, tmp32, out=blk)
        return
    staged = src.dtype == np.float32
    for a in range(0, n, BLOCK):
        b = min(a + BLOCK, n)
        blk = flat[a:b]
        tmp = blk if assign else scratch.f64[: b - a]
        if staged:
            stage = scratch.f32[: b - a]
            np.copyto(stage, src[a:b])
            np.copyto(tmp, stage)
            if weight != 1.0:
                np.multiply(tmp, weight, out=tmp)
        elif weight == 1.0:
            if assign:
                np.copyto(blk, src[a:b], casting="unsafe")
            else:
                np.add(blk, src[a:b], out=blk)
            continue
        else:
            np.multiply(src[a:b], weight, out=tmp, dtype=np.float64)
        if not assign:
            np.add(blk, tmp, out=blk)


def divide_into(acc: np.ndarray[Any, Any], total: float, out: Array, scratch: Scratch) -> None:
    """``out[...] = acc / total`` cast to ``out``'s floating dtype, block by block (the
    same numbers as ``(acc / total).astype(out.dtype)``)."""
    src = acc.reshape(-1)
    dst = out.reshape(-1)
    for a in range(0, src.size, BLOCK):
        b = min(a + BLOCK, src.size)
        tmp = scratch.f64[: b - a]
        np.divide(src[a:b], total, out=tmp, dtype=np.float64)
        np.copyto(dst[a:b], tmp, casting="same_kind")


class WeightedMean:
    """Streaming (weighted) mean of updates' weights: the core of the averaging family."""

    def __init__(
        self, template: Weights, weighted: bool = True, precision: str = "float64"
    ) -> None:
        if precision not in ("auto", "float64"):
            raise ValueError(f"precision {precision!r} must be 'auto' or 'float64'")
        self._template = template
        self._weighted = weighted
        self._precision = precision
        self._acc: dict[str, np.ndarray[Any, Any]] = {}
        self._scratch: Scratch | None = None
        self.total = 0.0
        self.count = 0
        self.samples = 0
        self._done = False

    def weight_of(self, update: Update) -> float:
        if not self._weighted:
            return 1.0
        # an agent that reports no samples still counts once (the book's default of 1)
        return float(update.num_samples) if update.num_samples > 0 else 1.0

    def add(self, update: Update, weight: float | None = None) -> None:
        """Fold ``update`` in with ``weight`` (default: :meth:`weight_of`)."""
        w = self.weight_of(update) if weight is None else float(weight)
        if self._done:
            raise ValueError("result() was already taken for this round")
        first = not self._acc
        for name in self._template:
            arr = np.asarray(update.weights[name])
            if self._scratch is None:
                self._scratch = Scratch()
            if first:
                fast = self._precision == "auto" and arr.dtype == np.float32
                self._acc[name] = np.empty(arr.shape, np.float32 if fast else np.float64)
            acc = self._acc[name]
            if arr.shape != acc.shape:
                raise InvalidUpdate(
                    f"tensor {name!r} has shape {arr.shape}, expected {acc.shape}",
                    agent_id=update.agent_id,
                )
            accumulate(acc, arr, w, self._scratch, assign=first)
        self.total += w
        self.count += 1
        self.samples += max(update.num_samples, 0)

    def _finish(self) -> None:
        if not self.count:
            raise ValueError("no updates to aggregate")
        if self._done:
            raise ValueError("result() was already taken for this round")
        self._done = True

    def mean64(self) -> dict[str, F64]:
        """The float64 means (computed in place; call once)."""
        self._finish()
        self._scratch = None
        out: dict[str, F64] = {}
        for name, acc in self._acc.items():
            if acc.dtype == np.float64:
                np.divide(acc, self.total, out=acc)
                out[name] = acc
            else:
                out[name] = np.divide(acc, self.total, dtype=np.float64)
        self._acc = {}
        return out

    def mean_like(self, template: Weights) -> Weights:
        """The means cast to each ``template`` tensor's dtype (call once instead of
        :meth:`mean64`): ``cast_like(mean64()[k], template[k])``, with the division and the
        cast of a floating-point tensor done in one pass."""
        self._finish()
        scratch = self._scratch if self._scratch is not None else Scratch()
        out: Weights = {}
        for name, ref in template.items():
            acc = self._acc[name]
            if acc.dtype == ref.dtype == np.float32:
                # float32 accumulator: divide in place and hand it out (no new array)
                np.divide(
                    acc, np.float64(self.total), out=acc, dtype=np.float64, casting="same_kind"
                )
                out[name] = acc
            elif ref.dtype.kind == "f" and ref.dtype != np.float64:
                res = np.empty(acc.shape, dtype=ref.dtype)
                divide_into(acc, self.total, res, scratch)
                out[name] = res
            else:
                mean = np.divide(acc, self.total, dtype=np.float64)
                out[name] = cast_like(mean, ref)
        self._acc = {}
        self._scratch = None
        return out


class FedAvgAccumulator:
    def __init__(self, global_weights: Weights, weighted: bool, precision: str) -> None:
        self._mean = WeightedMean(global_weights, weighted, precision)
        self._template = global_weights

    @property
    def count(self) -> int:
        return self._mean.count

    def add(self, update: Update) -> None:
        self._mean.add(update)

    def result(self) -> Result:
        weights = self._mean.mean_like(self._template)
        return Result(
            weights, {}, {"num_updates": self._mean.count, "num_samples": self._mean.samples}
        )


@register
class FedAvg(Strategy):
    """Sample-weighted averaging of the agents' models (``weighted=False``: plain mean).

    ``precision="auto"`` accumulates float32 tensors in float32 (as numpy-based frameworks
    do; faster, relative error ~N x 2**-24 and dependent on arrival order beyond two
    updates); ``"float64"`` accumulates everything in float64 (correctly rounded,
    order-independent results).
    """

    name = "fedavg"
    secure_aggregation = True

    def __init__(self, weighted: bool = True, precision: str = "auto") -> None:
        if precision not in ("auto", "float64"):
            raise ValueError(f"precision {precision!r} must be 'auto' or 'float64'")
        self.weighted = bool(weighted)
        self.precision = precision

    def begin(
        self,
        global_weights: Weights,
        state: Mapping[str, Any],
        *,
        round: int = 1,
        rng: np.random.Generator | None = None,
    ) -> FedAvgAccumulator:
        return FedAvgAccumulator(global_weights, self.weighted, self.precision)
