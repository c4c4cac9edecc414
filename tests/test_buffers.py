"""take_arrays and BufferPool: no copy where nothing else refers to a buffer, a copy (or a
fresh buffer) wherever something does."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import numpy as np

from fedstack.buffers import BufferPool, take_arrays


def test_take_arrays_takes_what_nobody_else_holds() -> None:
    d: dict[str, Any] = {"w": np.arange(5.0)}
    ident = id(d["w"])
    out = take_arrays(d)
    assert id(out["w"]) == ident  # taken as it is
    assert d == {}  # the caller gave the dict up


def test_take_arrays_copies_what_is_still_held_elsewhere() -> None:
    kept = np.arange(5.0)
    base = np.arange(10.0)
    ro = np.arange(3.0)
    ro.flags.writeable = False
    d: dict[str, Any] = {"kept": kept, "view": base[2:7], "list": [1.0, 2.0], "ro": ro}
    out = take_arrays(d)
    kept += 100  # the caller keeps training on its array...
    base += 100
    np.testing.assert_array_equal(out["kept"], np.arange(5.0))  # ...the upload is unchanged
    np.testing.assert_array_equal(out["view"], np.arange(2.0, 7.0))
    np.testing.assert_array_equal(out["list"], [1.0, 2.0])
    assert out["ro"] is not ro and not np.shares_memory(out["ro"], ro)
    assert isinstance(out["list"], np.ndarray)


def test_pool_reuses_a_buffer_only_once_nothing_views_it() -> None:
    pool = BufferPool(max_bytes=10 << 20, min_nbytes=1024)
    a = pool.take(4096)
    a[:] = 7
    view = np.frombuffer(a.data, np.float32)  # a decoded message's array
    del a
    b = pool.take(4096)
    assert not np.shares_memory(b, view)  # still viewed: not handed out again
    assert pool.reused == 0
    assert (view.view(np.uint8) == 7).all()
    del view
    c = pool.take(4096)
    assert pool.reused == 1 and c.nbytes == 4096  # free again: reused
    assert pool.take(100).nbytes == 100  # small: never pooled
    assert pool.reused == 1


def test_pool_holds_at_most_max_bytes() -> None:
    mib = 1 << 20
    pool = BufferPool(max_bytes=2 * mib, min_nbytes=1024)
    held = [pool.take(mib - 100) for _ in range(4)]
    assert len(pool._bufs) == 2  # the others are plain buffers, freed when dropped
    del held
    pool.take(mib)
    assert pool.reused == 1
    pool.clear()
    assert pool._bufs == []


def test_pool_serves_sizes_within_the_same_mib() -> None:
    """Messages of one model differ by a few header bytes from round to round."""
    mib = 1 << 20
    pool = BufferPool(max_bytes=8 * mib, min_nbytes=1024)
    a = pool.take(3 * mib + 17)
    assert a.nbytes == 3 * mib + 17
    a[:] = 1
    del a
    b = pool.take(3 * mib + 90)  # the same 4 MiB buffer, now free
    assert pool.reused == 1 and b.nbytes == 3 * mib + 90
    c = pool.take(5 * mib)  # another size class: a new buffer
    assert pool.reused == 1 and not np.shares_memory(b, c)


_RSS_AFTER_FREE = """
import sys
import numpy as np
import psutil
from fedstack.buffers import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else False
proc = psutil.Process()
base = proc.memory_info().rss
a = np.ones(50_000_000, np.float32)  # 200 MB
del a
print(int(kept), (proc.memory_info().rss - base) >> 20)
"""


def test_keep_freed_memory_keeps_a_freed_buffer_for_reuse() -> None:
    def run(mode: str) -> tuple[int, int]:
        out = subprocess.run(
            [sys.executable, "-c", _RSS_AFTER_FREE, mode],
            check=True,
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout.split()
        return int(out[0]), int(out[1])

    kept, held_mb = run("keep")
    assert kept == 1 and held_mb >= 150  # freed, but kept in the process for the next one
    kept, held_mb = run("default")
    assert kept == 0 and held_mb < 50  # glibc's default: unmapped at once
