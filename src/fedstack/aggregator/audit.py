"""The refusal audit: refused registrations and operator calls in the audit trail, at a
bounded rate per source host, counted beyond it (issue 16 finding 3).

A flood of refusals must not become a flood of database writes, nor keep the aggregator
busy: :class:`RefusalAudit` writes the first ``burst`` refusals of a host per window one
event each, counts the rest and writes their count as one event when the window ends, and
tells the aggregator which hosts are over their burst (their next attempts are slowed
down by :data:`THROTTLE_DELAY`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from fedstack.errors import StoreError

AUDIT_INTERVAL = 10.0
"""Seconds of one refusal-audit window."""
AUDIT_BURST = 512
"""Refusals per source (host) and window written one event each; the rest are counted."""
AUDIT_GLOBAL_BURST = 2048
"""Refusals of all sources per window written one event each."""
THROTTLE_DELAY = 1.0
"""Seconds a registration from a host over its refusal burst waits before it is looked at:
a flood from one host is slowed to (its concurrent connections) attempts a second."""
_MAX_SOURCES = 4096


def source_host(address: str) -> str:
    """The host part of ``host:port`` (``[v6]:port`` too): refusals are limited per host."""
    if address.startswith("["):
        return address[1:].partition("]")[0]
    host, sep, port = address.rpartition(":")
    return host if sep and port.isdigit() and ":" not in host else address


@dataclass
class _Window:
    until: float
    written: int = 0
    suppressed: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    last: dict[str, Any] = field(default_factory=dict)
    run_id: str | None = None


class RefusalAudit:
    """Refusals in the audit trail, at a bounded rate per source.

    Within each ``interval``, the first ``burst`` refusals of a source host (and
    ``global_burst`` of all sources) are written as one event each, as before; the others
    are only counted, and :meth:`flush` writes them as ONE event per (kind, source) with
    ``count`` (how many refusals it stands for) and ``reasons`` (sources refused beyond
    the global budget share one such event, ``source_host`` ``"*"``). A flood of refusals
    therefore costs the store a bounded number of writes per interval, whatever its rate.

    Args:
        write: ``await write(kind, detail, run_id, agent_id)`` stores one event.
        clock: monotonic seconds (injectable for tests).
    """

    def __init__(
        self,
        write: Callable[[str, dict[str, Any], str | None, str | None], Awaitable[None]],
        *,
        interval: float = AUDIT_INTERVAL,
        burst: int = AUDIT_BURST,
        global_burst: int = AUDIT_GLOBAL_BURST,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._write = write
        self.interval = interval
        self.burst = burst
        self.global_burst = global_burst
        self._clock = clock
        self._windows: dict[tuple[str, str], _Window] = {}
        self._global = _Window(0.0)
        self.suppressed_total = 0
        """Refusals counted but not written one by one, since the start."""

    async def record(
        self,
        kind: str,
        detail: dict[str, Any],
        *,
        address: str,
        run_id: str | None,
        agent_id: str | None = None,
    ) -> bool:
        """Audit one refusal from ``address``. True if it was written as its own event."""
        now = self._clock()
        host = source_host(address)
        key = (kind, host)
        win = self._windows.get(key)
        if win is not None and now >= win.until:
            await self._flush_one(key, win)
            win = None
        if win is None:
            if len(self._windows) >= _MAX_SOURCES:
                await self.flush()
                if len(self._windows) >= _MAX_SOURCES:  # all current: pool the newcomers
                    key = (kind, "*")
                    win = self._windows.get(key)
            if win is None:
                win = self._windows[key] = _Window(now + self.interval)
        if now >= self._global.until:
            self._global = _Window(now + self.interval)
        if win.written < self.burst and self._global.written < self.global_burst:
            win.written += 1
            self._global.written += 1
            await self._write(kind, detail, run_id, agent_id)
            return True
        if win.written < self.burst:  # the global budget is out: pool the sources
            pooled = (kind, "*")
            win = self._windows.get(pooled) or self._windows.setdefault(
                pooled, _Window(now + self.interval)
            )
        win.suppressed += 1
        self.suppressed_total += 1
        reason = str(detail.get("reason") or detail.get("code") or "")
        win.reasons[reason] = win.reasons.get(reason, 0) + 1
        win.last = detail
        win.run_id = run_id
        return False

    def over_budget(self, kind: str, address: str) -> bool:
        """True if ``address``'s host used up its burst of ``kind`` refusals in the
        current window (its next attempts are slowed down, see :data:`THROTTLE_DELAY`)."""
        win = self._windows.get((kind, source_host(address)))
        return win is not None and self._clock() < win.until and win.written >= self.burst

    async def flush(self, *, force: bool = False) -> None:
        """Write the counts of the windows that are over (all of them if ``force``)."""
        now = self._clock()
        for key, win in list(self._windows.items()):
            if force or now >= win.until:
                await self._flush_one(key, win)

    async def _flush_one(self, key: tuple[str, str], win: _Window) -> None:
        if self._windows.get(key) is win:
            del self._windows[key]
        if not win.suppressed:
            return
        kind, host = key
        detail = {
            **win.last,
            "aggregated": True,
            "source_host": host,
            "count": win.suppressed,
            "reasons": dict(win.reasons),
            "window_seconds": self.interval,
        }
        with contextlib.suppress(StoreError):
            await self._write(kind, detail, win.run_id, None)

    async def run_flusher(self) -> None:
        """Flush finished windows every interval, forever (a supervised background task)."""
        while True:
            await asyncio.sleep(self.interval)
            await self.flush()
