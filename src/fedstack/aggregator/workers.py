"""Where an aggregator's blocking work runs: three single threads, each in call order.

* the **store** thread: every database call of the upload path and the round (batches of
  uploads, committed rounds, checkpoints' bookkeeping). It does database work only, and
  the aggregator's writes never wait on each other's SQLite locks;
* the **registry** thread: registrations, credential checks and refusal audits, so that a
  flood of them queues there, never in front of the uploads;
* the **compute** thread: arithmetic on big arrays (the update gate, feeding the
  accumulator), never on the store thread; small arrays are handled inline, where a
  thread hop would cost more than the work.

With the in-process transport (the simulator) every party shares one process and its
interpreter lock, so threads buy no parallelism, only hand-offs: every call runs inline.
After :meth:`Workers.close`, calls still work, each on a plain worker thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import functools
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

COMPUTE_INLINE_BYTES = 1 << 20
"""Arrays up to this size are computed on inline (a thread hop costs more)."""


class Workers:
    """The store, registry and compute threads of one aggregator.

    Args:
        inline: run every call inline (the in-process transport).
    """

    def __init__(self, *, inline: bool) -> None:
        self.inline = inline
        self._store = cf.ThreadPoolExecutor(1, thread_name_prefix="fedstack-store")
        self._registry = cf.ThreadPoolExecutor(1, thread_name_prefix="fedstack-registry")
        self._compute = cf.ThreadPoolExecutor(1, thread_name_prefix="fedstack-compute")
        self._closed = False

    async def _run(self, pool: cf.ThreadPoolExecutor, call: Callable[[], T]) -> T:
        if self.inline:
            return call()
        if self._closed:
            return await asyncio.to_thread(call)
        return await asyncio.get_running_loop().run_in_executor(pool, call)

    async def db(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` on the store thread."""
        return await self._run(self._store, functools.partial(fn, *args, **kwargs))

    async def registry(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` on the registry thread."""
        return await self._run(self._registry, functools.partial(fn, *args, **kwargs))

    async def compute(self, fn: Callable[..., T], *args: Any, nbytes: int = 0) -> T:
        """``fn(*args)``, work on ``nbytes`` of arrays: inline when small, else on the
        compute thread."""
        if nbytes <= COMPUTE_INLINE_BYTES or self._closed:
            return fn(*args)
        return await self._run(self._compute, functools.partial(fn, *args))

    def close(self) -> None:
        """Let the threads go (the calls they run finish; later calls get a fresh thread)."""
        self._closed = True
        for pool in (self._store, self._registry, self._compute):
            pool.shutdown(wait=False)
