"""Byte budgets: bound the bytes of big messages in flight across many connections.

The aggregator shares one :class:`ByteBudget` among all its connections for uploads being
received (a connection whose next message does not fit stops reading, so TCP
backpressure holds its sender; see :class:`fedstack.transport.ws.WSConnection`) and one
for global models being sent (a send waits for its bytes to fit, and holds them until the
transport flushed them). Messages below ``min_bytes`` are not counted.

Fairness (issue 16, findings 1 and 7). Requests come with a *tier* (see
:mod:`fedstack.transport.standing`): agents in good standing (:data:`TRUSTED`: they
completed an upload and did not misbehave since) share ``limit`` bytes, first come,
first served. Everyone else (new agents, unregistered connections, agents that aborted or
trickled) shares a separate *probation* pool of ``probation`` bytes (default a quarter of
the limit), new ones before suspect ones, and a party cooling down after a strike is
granted nothing until its cool-down ends. So an aborting, trickling or unauthenticated
sender never holds bytes an agent in good standing waits for, and memory stays within
``limit + probation``. In each pool one request is always admitted when nothing else is
held there (a message larger than the pool still goes through, alone; while such an
oversized message is held in one pool, the other pool admits none): then the bound is
that message plus the other pool's share. Callers that give no tier are trusted (one
FIFO budget of ``limit`` bytes, as the fan-out uses it).

Who waits is visible to the holders' overseers (:meth:`ByteBudget.contended`): the
aggregator cuts an upload that holds bytes others wait for past the round deadline (see
:mod:`fedstack.aggregator.pacing`).

Releases may come from any thread (e.g. a buffer freed in a worker thread); grants are
delivered on the requester's event loop.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import Callable
from typing import Protocol

from fedstack.transport.standing import NEW, SUSPECT, TRUSTED, Account, Clock, Standing

Granted = Callable[[], None]
_Waiter = tuple[int, Granted, asyncio.AbstractEventLoop, int, Account | None, bool]

TRUSTED_POOL, PROBATION_POOL = 0, 1
"""Pools of a :class:`ByteBudget`: agents in good standing, everyone else."""


def pool_of(tier: int) -> int:
    """The pool a request of ``tier`` is served from."""
    return TRUSTED_POOL if tier == TRUSTED else PROBATION_POOL


class ByteBudget:
    """At most ``limit`` bytes held at once by trusted requests and ``probation`` by the
    others (but always at least one request per pool).

    Args:
        limit: bytes of the trusted pool.
        min_bytes: smaller messages are not counted (see :meth:`counts`).
        probation: bytes of the probation pool (None: ``max(1, limit // 4)``).
        clock: monotonic seconds, for cool-downs (injectable for tests).
    """

    def __init__(
        self,
        limit: int,
        *,
        min_bytes: int = 1 << 20,
        probation: int | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        if limit < 1:
            raise ValueError("a byte budget must be positive")
        self.limit = limit
        self.probation = max(1, limit // 4) if probation is None else probation
        if self.probation < 1:
            raise ValueError("a probation share must be positive")
        self.min_bytes = min_bytes
        self.clock = clock
        self.standing = Standing(clock)
        """The accounts whose tiers and cool-downs requests are served by."""
        self.used = 0
        self.held = [0, 0]
        """Bytes held per pool (:data:`TRUSTED_POOL`, :data:`PROBATION_POOL`)."""
        self.peak = 0
        self.granted = 0
        self.waited = 0
        self._lock = threading.Lock()
        # one FIFO per tier: TRUSTED (pool 0), NEW then SUSPECT (pool 1)
        self._queues: tuple[collections.deque[_Waiter], ...] = (
            collections.deque(),
            collections.deque(),
            collections.deque(),
        )
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = float("inf")

    def counts(self, nbytes: int) -> bool:
        """Whether a message of ``nbytes`` is subject to this budget."""
        return nbytes >= self.min_bytes

    def _cap(self, pool: int) -> int:
        return self.limit if pool == TRUSTED_POOL else self.probation

    def _fits(self, pool: int, n: int, held: int) -> bool:
        h = self.held[pool]
        if h + n <= self._cap(pool):
            return True
        other = 1 - pool
        # alone in its pool: admitted whatever its size, unless the other pool holds an
        # oversized message already (two at once would break the memory bound)
        return h <= held and self.held[other] <= self._cap(other)

    def _take(self, pool: int, n: int) -> None:
        self.held[pool] += n
        self.used += n
        self.granted += 1
        self.peak = max(self.peak, self.used)

    @staticmethod
    def _cool_until(account: Account | None, stranger: bool) -> float:
        return float("-inf") if account is None else account.not_before(stranger=stranger)

    def request(
        self,
        n: int,
        granted: Granted,
        *,
        held: int = 0,
        tier: int = TRUSTED,
        account: Account | None = None,
        stranger: bool = False,
    ) -> bool:
        """Take ``n`` bytes now (True) or queue the request (False): ``granted()`` is then
        called on the running event loop once the bytes are taken for it.

        ``held`` is what the requester already holds in the same pool (a message whose
        buffer grows): when nobody else holds anything there, its request is admitted
        whatever its size, as a first request is. ``tier`` picks the pool and the
        priority; ``account`` (with ``stranger``) the cool-down that applies. Bytes
        granted are given back with :meth:`release` to the pool of ``tier``.
        """
        loop = asyncio.get_running_loop()
        pool = pool_of(tier)
        ahead = self._queues[: tier + 1] if pool == PROBATION_POOL else self._queues[:1]
        cool = self._cool_until(account, stranger)
        with self._lock:
            now = self.clock()
            if cool <= now and not any(ahead) and self._fits(pool, n, held):
                self._take(pool, n)
                return True
            self.waited += 1
            self._queues[tier].append((n, granted, loop, held, account, stranger))
        if cool > now:
            self._arm(loop, cool)
        return False

    def cancel(self, granted: Granted) -> bool:
        """Withdraw a queued request; False if it was already granted (release it then)."""
        with self._lock:
            for q in self._queues:
                for item in q:
                    if item[1] is granted:
                        q.remove(item)
                        return True
        return False

    def release(self, n: int, pool: int = TRUSTED_POOL) -> None:
        """Give back ``n`` bytes of ``pool`` (from any thread) and grant queued requests
        that fit."""
        ready: list[tuple[Granted, asyncio.AbstractEventLoop]] = []
        wake: tuple[asyncio.AbstractEventLoop, float] | None = None
        with self._lock:
            self.held[pool] = max(0, self.held[pool] - n)
            self.used = self.held[0] + self.held[1]
            q = self._queues[TRUSTED]
            while q and self._fits(TRUSTED_POOL, q[0][0], q[0][3]):
                need, cb, loop, *_ = q.popleft()
                self._take(TRUSTED_POOL, need)
                ready.append((cb, loop))
            now = self.clock()
            for tier in (NEW, SUSPECT):
                q = self._queues[tier]
                blocked = False
                for item in list(q):
                    need, cb, loop, held, account, stranger = item
                    cool = self._cool_until(account, stranger)
                    if cool > now:  # cooling down: does not hold up the others
                        if wake is None or cool < wake[1]:
                            wake = (loop, cool)
                        continue
                    if not self._fits(PROBATION_POOL, need, held):
                        blocked = True  # first come, first served: nobody overtakes it
                        break
                    q.remove(item)
                    self._take(PROBATION_POOL, need)
                    ready.append((cb, loop))
                if blocked:
                    break
        for cb, loop in ready:
            try:
                loop.call_soon_threadsafe(cb)
            except RuntimeError:  # pragma: no cover - that loop is closed: nobody waits
                pass
        if wake is not None:
            self._arm(*wake)

    def contended(self, pool: int) -> bool:
        """Whether requests wait that the bytes held in ``pool`` hold back: requests of
        that pool, or, while ``pool`` holds an oversized message, any request (the other
        pool then admits none). Lock-free (a racy snapshot): for periodic checks, e.g. the
        aggregator cutting an upload that would hold others past the round deadline."""
        if not self.held[pool]:
            return False
        if pool == TRUSTED_POOL:
            mine = bool(self._queues[TRUSTED])
        else:
            mine = bool(self._queues[NEW]) or bool(self._queues[SUSPECT])
        if mine:
            return True
        return self.held[pool] > self._cap(pool) and any(self._queues)

    def _arm(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        """Re-examine the queues at clock time ``when`` (a cool-down ends)."""

        def arm() -> None:
            if self._timer is not None and self._timer_at <= when:
                return
            if self._timer is not None:
                self._timer.cancel()
            self._timer_at = when
            self._timer = loop.call_later(max(0.0, when - self.clock()) + 0.001, self._kick)

        try:
            loop.call_soon_threadsafe(arm)
        except RuntimeError:  # pragma: no cover - that loop is closed: nobody waits
            pass

    def _kick(self) -> None:
        self._timer, self._timer_at = None, float("inf")
        self.release(0, PROBATION_POOL)

    def poke(self) -> None:
        """Grant what fits now (e.g. after a cool-down ended on an injected clock)."""
        self.release(0, PROBATION_POOL)

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

    def tab(self, account: Account, *, stranger: bool = True) -> Tab:
        """A per-connection view of this budget charged to ``account`` (see :class:`Tab`)."""
        return Tab(self, account, stranger=stranger)


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


class _PoolRelease:
    """Gives bytes back to one pool of a budget."""

    __slots__ = ("_budget", "_pool")

    def __init__(self, budget: ByteBudget, pool: int) -> None:
        self._budget, self._pool = budget, pool

    def release(self, n: int) -> None:
        self._budget.release(n, self._pool)


class Tab:
    """One connection's view of a :class:`ByteBudget`, what the frame parser is charged
    through: every message is served by its account's tier when the message begins, and
    gives its bytes back to that tier's pool.

    A *stranger* (not registered yet) is never trusted and earns nothing; once the peer
    registers, :meth:`admit` binds the tab to the agent's own account (or, without one,
    makes it trusted whatever its standing: a server that keeps no accounts). A message that
    arrives in full earns the account good standing (:meth:`hold`); :meth:`strike`
    penalises it.
    """

    __slots__ = ("_fixed", "_tier", "account", "budget", "stranger")

    def __init__(self, budget: ByteBudget, account: Account, *, stranger: bool = True) -> None:
        self.budget = budget
        self.account = account
        self.stranger = stranger
        self._tier = NEW
        self._fixed: int | None = None

    @property
    def min_bytes(self) -> int:
        return self.budget.min_bytes

    @property
    def tier(self) -> int:
        """The tier of the message in progress (or of the last one)."""
        return self._tier

    def admit(self, account: Account | None) -> None:
        """The peer registered as the owner of ``account`` (None: trusted, no account)."""
        self.stranger = False
        if account is None:
            self._fixed = TRUSTED
        else:
            self.account, self._fixed = account, None

    def counts(self, nbytes: int) -> bool:
        return self.budget.counts(nbytes)

    def contended(self) -> bool:
        """Whether other requests wait for the pool the message in progress holds bytes of
        (see :meth:`ByteBudget.contended`)."""
        return self.budget.contended(pool_of(self._tier))

    def request(self, n: int, granted: Granted, *, held: int = 0) -> bool:
        if held == 0:  # a new message: served by the account's tier now
            fixed = self._fixed
            self._tier = fixed if fixed is not None else self.account.tier(stranger=self.stranger)
        account = self.account if self._fixed is None else None
        return self.budget.request(
            n, granted, held=held, tier=self._tier, account=account, stranger=self.stranger
        )

    def cancel(self, granted: Granted) -> bool:
        return self.budget.cancel(granted)

    def release(self, n: int) -> None:
        """Give back bytes of the message in progress."""
        self.budget.release(n, pool_of(self._tier))

    def hold(self, n: int) -> Hold:
        """The message in progress arrived in full, holding ``n`` bytes: the account earns
        good standing (unless a stranger); the bytes go back when the hold is released."""
        if not self.stranger:
            self.account.completed()
        return Hold(_PoolRelease(self.budget, pool_of(self._tier)), n)

    def strike(self) -> None:
        """Penalise the account (see :meth:`Account.strike`)."""
        self.account.strike()
