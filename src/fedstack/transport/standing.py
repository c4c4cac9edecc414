"""Standing: who has earned a share of the receive budget, who is cooling down.

The receive budget (:class:`~fedstack.transport.budget.ByteBudget`) serves requests by
*tier*. A party earns :data:`TRUSTED` by completing a budgeted message (an upload that
arrived in full, at a rate the aggregator accepted) as a registered agent; it falls to
:data:`SUSPECT` with a *strike*: an upload it aborted while holding budget bytes, or one
the aggregator cut because it trickled or broke the protocol. Everyone else is
:data:`NEW`. Each strike also starts a *cool-down*, doubling with the strikes
(:data:`COOL_DOWN_BASE` up to :data:`COOL_DOWN_MAX` seconds), during which the budget
grants the party nothing; strikes are forgiven one per completed message, and all of
them after :data:`FORGIVE_AFTER` quiet seconds.

Penalties follow identities, not connections: an :class:`Account` is kept per key (an
agent id, or a source host) in a bounded :class:`Standing` table, so an agent that
rejoins finds its strikes again. An agent's account has its host's account as parent:
while the agent has no good record of its own, its host's strikes and cool-down apply to
it too (an attacker minting new names from one host stays in the penalty box), but an
agent in good standing is judged by its own record only.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable

TRUSTED, NEW, SUSPECT = 0, 1, 2
"""Tiers, best first: what a budget request is served by (see the module docstring)."""
COOL_DOWN_BASE = 0.5
"""Seconds of cool-down after a first strike; each further strike doubles it."""
COOL_DOWN_MAX = 30.0
"""The longest cool-down, whatever the strikes."""
FORGIVE_AFTER = 60.0
"""Seconds without a strike after which an account's strikes are forgotten."""
MAX_ACCOUNTS = 65536
"""Accounts kept at most; the least recently used one is forgotten first."""

Clock = Callable[[], float]


class Account:
    """The standing of one identity (an agent, or a source host). Thread-safe through
    its table's lock; read :meth:`tier` and :meth:`not_before`, change it through
    :meth:`completed` and :meth:`strike`."""

    __slots__ = ("_table", "completions", "cool_until", "key", "last_strike", "parent", "strikes")

    def __init__(self, table: Standing, key: str, parent: Account | None) -> None:
        self._table = table
        self.key = key
        self.parent = parent
        self.completions = 0
        self.strikes = 0
        self.last_strike = float("-inf")
        self.cool_until = float("-inf")

    def _strikes(self, now: float) -> int:
        if self.strikes and now - self.last_strike > FORGIVE_AFTER:
            self.strikes = 0
        return self.strikes

    def tier(self, *, stranger: bool = False) -> int:
        """This account's tier now (``stranger``: not registered: never :data:`TRUSTED`)."""
        now = self._table.clock()
        with self._table.lock:
            own = self._strikes(now)
            if own:
                return SUSPECT
            if self.completions and not stranger:
                return TRUSTED
            if self.parent is not None and self.parent._strikes(now):
                return SUSPECT
            return NEW

    def not_before(self, *, stranger: bool = False) -> float:
        """The clock time before which the budget grants this account nothing."""
        with self._table.lock:
            until = self.cool_until
            trusted = self.completions and not stranger and not self.strikes
            if self.parent is not None and not trusted:
                until = max(until, self.parent.cool_until)
            return until

    def completed(self) -> None:
        """A budgeted message of this account arrived in full: one strike forgiven, and
        with none left the account is in good standing."""
        with self._table.lock:
            self.completions += 1
            self.strikes = max(0, self.strikes - 1)

    def strike(self) -> float:
        """Penalise this account (and its host's): it loses its good standing and cools
        down. Returns the cool-down's end (clock time)."""
        now = self._table.clock()
        with self._table.lock:
            for acc in (self, self.parent):
                if acc is None:
                    continue
                acc._strikes(now)
                acc.strikes += 1
                acc.completions = 0
                acc.last_strike = now
                pause = min(COOL_DOWN_MAX, COOL_DOWN_BASE * 2 ** (acc.strikes - 1))
                acc.cool_until = max(acc.cool_until, now + pause)
            self._table.struck += 1
            return self.cool_until


class Standing:
    """The accounts of one budget's parties, by key (bounded: least recently used first
    out).

    Args:
        clock: monotonic seconds (injectable for tests).
        max_accounts: accounts kept at most.
    """

    def __init__(self, clock: Clock = time.monotonic, max_accounts: int = MAX_ACCOUNTS) -> None:
        self.clock = clock
        self.max_accounts = max_accounts
        self.lock = threading.RLock()
        self.struck = 0
        self._accounts: collections.OrderedDict[str, Account] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._accounts)

    def account(self, key: str, parent: str | None = None) -> Account:
        """The account of ``key`` (created in good faith: :data:`NEW`), with the account
        of ``parent`` (e.g. the agent's host) as its parent."""
        with self.lock:
            up = self.account(parent) if parent is not None else None
            acc = self._accounts.get(key)
            if acc is None:
                acc = Account(self, key, up)
                self._accounts[key] = acc
                while len(self._accounts) > self.max_accounts:
                    self._accounts.popitem(last=False)
            else:
                self._accounts.move_to_end(key)
                if up is not None:
                    acc.parent = up
            return acc


def host_of(address: str) -> str:
    """The host part of ``"host:port"`` (``"[v6]:port"`` too); the whole string else."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        return address
    return host
