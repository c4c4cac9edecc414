"""Large-buffer hygiene: take arrays nobody else holds, and recycle message buffers.

A fresh 100 MB array costs more than its copy: the kernel faults in and zeroes every page
(on virtual machines, ``clear_page`` can take a large share of a simulation's CPU).
Two helpers avoid fresh buffers where it is provably safe:

* :func:`take_arrays` hands over arrays that no one else refers to (a trainer's fresh
  output) instead of copying them, and copies the rest;
* :class:`BufferPool` recycles message buffers once every view of them is gone.

Both decide "no one else refers to it" by reference count, calibrated at import against
an array held by exactly one name, so the rule follows the interpreter's own counting.
"""

from __future__ import annotations

import ctypes
import sys
import threading
from typing import Any

import numpy as np

__all__ = ["BufferPool", "keep_freed_memory", "take_arrays"]

_GRAIN = 1 << 20
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_KEEP_BYTES = 2**31 - 1


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory (up to 2 GiB beyond what is in use) for
    reuse instead of handing every large buffer back to the kernel on ``free``.

    By default each array over 32 MB is its own mapping: freeing unmaps it and the next one
    is faulted in and zeroed page by page. A process that frees and allocates 100 MB
    buffers every round (the simulator: global models in, trained models out) then spends
    more time in the kernel than on the data (on virtual machines, several times its user
    time on a probe simulation). Returns
    False (and changes nothing) where there is no glibc ``mallopt``. Process-wide, so the
    ``fedstack sim`` command calls it, not the library.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to tune
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _KEEP_BYTES))


def _refs(obj: object) -> int:
    return sys.getrefcount(obj)


def _one_holder() -> int:
    arr = np.empty(1)
    return _refs(arr)  # ``arr`` is this frame's only reference


_ONE_HOLDER = _one_holder()


def _take(value: Any) -> np.ndarray[Any, Any]:
    # ``value`` is this frame's: exactly one holder means the caller gave up the last other
    if (
        type(value) is np.ndarray
        and value.flags.owndata
        and value.flags.writeable
        and value.flags.c_contiguous
        and _refs(value) <= _ONE_HOLDER
    ):
        return value
    return np.array(value, copy=True)


def take_arrays(mapping: dict[str, Any]) -> dict[str, np.ndarray[Any, Any]]:
    """Empty ``mapping`` (the caller gives it up) into a dict of private arrays: each
    array that nothing else refers to is taken as it is, any other value is copied.

    An array the trainer still holds (an attribute, a view, a torch tensor sharing its
    memory) is referred to from elsewhere, so it is copied: later changes to it cannot
    reach the taken result.
    """
    out: dict[str, np.ndarray[Any, Any]] = {}
    for key in list(mapping):
        out[key] = _take(mapping.pop(key))
    return out


class BufferPool:
    """Writable byte buffers recycled once nothing refers to them any more.

    :meth:`take` returns a buffer of exactly ``nbytes`` bytes: one from the pool that no
    decoded array (or anything else) still views, else a new one, kept for later reuse
    while the pool holds less than ``max_bytes``.
    """

    def __init__(self, max_bytes: int, min_nbytes: int = 1 << 20) -> None:
        self.max_bytes = max_bytes
        self.min_nbytes = min_nbytes
        self._bufs: list[np.ndarray[Any, Any]] = []
        self._held = 0
        self._lock = threading.Lock()
        self.reused = 0

    def take(self, nbytes: int) -> np.ndarray[Any, Any]:
        """A writable buffer of exactly ``nbytes`` bytes (a view of a pooled one, whose
        size is ``nbytes`` rounded up to a whole MiB: messages of one model differ by a
        few header bytes from round to round)."""
        if nbytes < self.min_nbytes:
            return np.empty(nbytes, dtype=np.uint8)
        cap = -(-nbytes // _GRAIN) * _GRAIN
        with self._lock:
            for buf in self._bufs:
                # held by the pool's list and by ``buf``: nothing outside refers to it
                if buf.nbytes == cap and _refs(buf) <= _ONE_HOLDER + 1:
                    self.reused += 1
                    return buf[:nbytes]
            buf = np.empty(cap, dtype=np.uint8)
            if self._held + cap <= self.max_bytes:
                self._bufs.append(buf)
                self._held += cap
            return buf[:nbytes]

    def clear(self) -> None:
        with self._lock:
            self._bufs.clear()
            self._held = 0
