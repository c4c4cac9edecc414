"""Minimum transfer rates: a slow agent does not hold the shared budgets (issue 16 finding 7).

A big upload holds bytes of the shared receive budget while it arrives, a global model
bytes of the fan-out budget until it is flushed. An agent that sends or reads at a trickle
(or not at all) would hold them for the whole timeout and keep honest agents waiting. The
helpers here watch the progress of a transfer in windows of :data:`RATE_WINDOW` seconds
and give up on it when less than ``min_rate`` bytes a second moved in a window; a
transfer that keeps the rate still ends by its deadline, ``max(send_timeout, size /
min_rate)``.

Where rounds have a deadline, an upload that holds budget bytes while others wait for them
must also end in time for the round (:meth:`ReceiveWatch.check_deadline`, :class:`Overdue`):
a slow agent never holds the others back past the round deadline, even above the minimum
rate.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

RATE_WINDOW = 2.0
"""Seconds over which a transfer's progress is measured against the minimum rate."""


MIN_CHECK = 0.25
"""The shortest period between checks of an arriving message (see :func:`check_period`)."""
OVERDUE = "overdue"
"""The error code and close reason of an upload cut by :class:`Overdue`."""


class TooSlow(TimeoutError):
    """A transfer moved fewer than the minimum rate's bytes in a window."""


class Overdue(TooSlow):
    """An upload holding receive-budget bytes other uploads wait for would end after the
    round deadline (or is still arriving past it): the aggregator drops it, its budget
    bytes go back at once, its identity takes a strike, and the agent is told
    :data:`OVERDUE` (error code and close reason)."""


def check_period(round_timeout: float | None) -> float:
    """Seconds between checks of an arriving message: :data:`RATE_WINDOW`, or with a round
    deadline a quarter of the round timeout if shorter (at least :data:`MIN_CHECK`), so that
    an upload holding others back past the deadline is found in time."""
    if round_timeout is None:
        return RATE_WINDOW
    return min(RATE_WINDOW, max(MIN_CHECK, round_timeout / 4))


def deadline_for(nbytes: int, send_timeout: float, min_rate: int) -> float:
    """Seconds one message of ``nbytes`` may take: ``max(send_timeout, nbytes /
    min_rate)`` (``send_timeout`` when there is no minimum rate)."""
    if min_rate <= 0:
        return send_timeout
    return max(send_timeout, nbytes / min_rate)


def _buffered(conn: Any) -> Any:
    transport = getattr(conn, "transport", None)
    return getattr(transport, "get_write_buffer_size", None)


async def drain_paced(conn: Any, nbytes: int, send_timeout: float, min_rate: int) -> None:
    """``await conn.drain()`` for a message of ``nbytes`` just written.

    Raises:
        TooSlow: less than ``min_rate * RATE_WINDOW`` bytes left the write buffer in one
            window while it was not empty.
        TimeoutError: the message's deadline (:func:`deadline_for`) passed.
    """
    limit = deadline_for(nbytes, send_timeout, min_rate)
    buffered = _buffered(conn)
    if min_rate <= 0 or buffered is None:  # nothing to measure: the plain deadline
        async with asyncio.timeout(limit):
            await conn.drain()
        return
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    last = buffered()
    while True:
        left = deadline - loop.time()
        if left <= 0:
            raise TimeoutError(f"sending {nbytes} bytes took more than {limit:.0f} s")
        try:
            async with asyncio.timeout(min(RATE_WINDOW, left)):
                await conn.drain()
            return
        except TimeoutError:
            now = buffered()
            if loop.time() < deadline and last - now < min_rate * RATE_WINDOW:
                raise TooSlow(
                    f"the peer read {max(0, last - now)} bytes in {RATE_WINDOW:.0f} s "
                    f"(minimum rate {min_rate} bytes/s)"
                ) from None
            last = now


class ReceiveWatch:
    """Watches one connection's incoming big messages (call :meth:`check` every period
    it did not deliver a message, and :meth:`check_deadline` with it where rounds have a
    deadline).

    Args:
        conn: the connection (its ``bytes_received``, ``in_message``,
            ``waiting_for_budget``, ``message_progress`` and ``holds_contended`` are read;
            a connection without them is never judged).
        min_rate: bytes a second a message being received must keep up (0: no minimum).
    """

    def __init__(self, conn: Any, min_rate: int) -> None:
        self.conn = conn
        self.min_rate = min_rate
        self._last = getattr(conn, "bytes_received", None)
        self._held_back = False  # held back by the budget in the window so far
        self._span = 0.0  # seconds of the window so far
        self._first: tuple[float, int] | None = None  # (clock, bytes) of the message seen

    def check(self, seconds: float) -> None:
        """``seconds`` passed since the last check (or the start) without a message. The
        minimum rate is judged over windows of at least :data:`RATE_WINDOW` s (shorter
        periods add up).

        Raises:
            TooSlow: a message was arriving and fewer than ``min_rate`` bytes a second of
                it came in the window, while the connection was not held back by the
                receive budget.
        """
        waiting = bool(getattr(self.conn, "waiting_for_budget", False))
        self._held_back = self._held_back or waiting
        self._span += seconds
        if self._span < RATE_WINDOW * 0.99:
            return
        got = getattr(self.conn, "bytes_received", None)
        last, self._last = self._last, got
        held_back, self._held_back = self._held_back, waiting
        span, self._span = self._span, 0.0
        if self.min_rate <= 0 or got is None or last is None:
            return
        if held_back:
            return  # held back by us (in part of the window): not its fault
        if not getattr(self.conn, "in_message", False):
            return
        if got - last < math.floor(self.min_rate * span):
            raise TooSlow(
                f"the agent sent {got - last} bytes of its message in {span:.1f} s "
                f"(minimum rate {self.min_rate} bytes/s)"
            )

    def check_deadline(self, now: float, deadline: float | None, grace: float) -> None:
        """Judge the message arriving against the round's deadline (call it periodically,
        ``now`` on the clock of ``deadline``).

        While the message holds receive-budget bytes that other messages wait for, it must
        end by ``max(deadline, first seen + grace)`` (``grace``: the round timeout, so an
        upload that began as a round was ending gets a round's time): it is cut once that
        passed, or as soon as its size and its rate since it was first seen project its
        end beyond. ``deadline`` None (no round deadline): nothing is judged.

        Raises:
            Overdue: it is cut.
        """
        progress = getattr(self.conn, "message_progress", None)
        if progress is None:
            return
        got, total = progress
        first = self._first
        if got == 0 and total is None:
            self._first = None  # no message is arriving
            return
        if first is None or got < first[1]:
            self._first = (now, got)  # a message first seen: its rate is measured from here
            return
        if deadline is None or not getattr(self.conn, "holds_contended", False):
            return
        if getattr(self.conn, "waiting_for_budget", False):
            return  # held back by us
        until = max(deadline, first[0] + grace)
        if now >= until:
            raise Overdue(
                f"its upload ({got} bytes so far) held upload-budget bytes other agents "
                f"wait for past the round deadline"
            )
        if total is None:
            return
        elapsed = now - first[0]
        rate = (got - first[1]) / elapsed if elapsed > 0 else 0.0
        finish = now + (total - got) / rate if rate > 0 else math.inf
        if finish > until:
            late = "never" if math.isinf(finish) else f"{finish - until:.0f} s after it"
            raise Overdue(
                f"at {rate:.0f} bytes/s its upload of {total} bytes would end {late} "
                f"(round deadline), while other agents wait for the upload budget it holds"
            )
