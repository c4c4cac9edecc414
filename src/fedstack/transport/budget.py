"""Byte budgets: bound the bytes of big messages in flight across many connections.

The aggregator shares one :class:`ByteBudget` among all its connections for uploads being
received (a connection whose next message does not fit stops reading, so TCP
backpressure holds its sender; see :class:`fedstack.transport.ws.WSConnection`) and one
for global models being sent (a send waits for its bytes to fit, and holds them until the
transport flushed them). Whatever the budget, one request is always admitted when nothing
is held (a message larger than the budget still goes through, alone). Requests are served
first come, first served. Messages below ``min_bytes`` are not counted.

Releases may come from any thread (e.g. a buffer freed in a worker thread); grants are
delivered on the requester's event loop.
"""

from __future__ import annotations

import asyncio
import collections
import threading
from collections.abc import Callable
from typing import Protocol

Granted = Callable[[], None]


class ByteBudget:
    """At most ``limit`` bytes held at once (but always at least one request)."""

    def __init__(self, limit: int, *, min_bytes: int = 1 << 20) -> None:
        if limit < 1:
            raise ValueError("a byte budget must be positive")
        self.limit = limit
        self.min_bytes = min_bytes
        self.used = 0
        self.peak = 0
        self.granted = 0
        self.waited = 0
        self._lock = threading.Lock()
        self._waiters: collections.deque[tuple[int, Granted, asyncio.AbstractEventLoop, int]] = (
            collections.deque()
        )

    def counts(self, nbytes: int) -> bool:
        """Whether a message of ``nbytes`` is subject to this budget."""
        return nbytes >= self.min_bytes

    def _fits(self, n: int, held: int = 0) -> bool:
        return self.used <= held or self.used + n <= self.limit

    def _take(self, n: int) -> None:
        self.used += n
        self.granted += 1
        self.peak = max(self.peak, self.used)

    def request(self, n: int, granted: Granted, *, held: int = 0) -> bool:
        """Take ``n`` bytes now (True) or queue the request (False): ``granted()`` is then
        called on the running event loop once the bytes are taken for it.

        ``held`` is what the requester already holds (a message whose buffer grows): when
        nobody else holds anything, its request is admitted whatever its size, as a first
        request is.
        """
        loop = asyncio.get_running_loop()
        with self._lock:
            if not self._waiters and self._fits(n, held):
                self._take(n)
                return True
            self.waited += 1
            self._waiters.append((n, granted, loop, held))
            return False

    def cancel(self, granted: Granted) -> bool:
        """Withdraw a queued request; False if it was already granted (release it then)."""
        with self._lock:
            for item in self._waiters:
                if item[1] is granted:
                    self._waiters.remove(item)
                    return True
        return False

    def release(self, n: int) -> None:
        """Give back ``n`` bytes (from any thread) and grant queued requests that fit."""
        ready: list[tuple[Granted, asyncio.AbstractEventLoop]] = []
        with self._lock:
            self.used = max(0, self.used - n)
            while self._waiters and self._fits(self._waiters[0][0], self._waiters[0][3]):
                need, cb, loop, _ = self._waiters.popleft()
                self._take(need)
                ready.append((cb, loop))
        for cb, loop in ready:
            try:
                loop.call_soon_threadsafe(cb)
            except RuntimeError:  # pragma: no cover - that loop is closed: nobody waits
                pass

    async def acquire(self, n: int) -> None:
        """Wait until ``n`` bytes are taken for the caller (release them afterwards)."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def granted() -> None:
            if fut.done():  # the waiter was cancelled meanwhile
                self.release(n)
            else:
                fut.set_result(None)

        if self.request(n, granted):
            return
        try:
            await fut
        except BaseException:
            if not self.cancel(granted) and fut.done() and not fut.cancelled():
                self.release(n)
            raise


class Releasable(Protocol):
    """Anything bytes can be given back to (a :class:`ByteBudget`)."""

    def release(self, n: int) -> None: ...


class Hold:
    """Bytes of a budget held by one message; :meth:`release` is idempotent and
    thread-safe (called when the message is freed or its reader moves on)."""

    __slots__ = ("_budget", "_lock", "_n")

    def __init__(self, budget: Releasable, n: int) -> None:
        self._budget: Releasable | None = budget
        self._n = n
        self._lock = threading.Lock()

    def release(self) -> None:
        with self._lock:
            budget, self._budget = self._budget, None
        if budget is not None:
            budget.release(self._n)
