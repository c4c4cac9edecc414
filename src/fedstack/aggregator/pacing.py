"""Minimum transfer rates: a slow agent does not hold the shared budgets (issue 16 finding 7).

A big upload holds bytes of the shared receive budget while it arrives, a global model
bytes of the fan-out budget until it is flushed. An agent that sends or reads at a trickle
(or not at all) would hold them for the whole timeout and keep honest agents waiting. The
helpers here watch the progress of a transfer in windows of :data:`RATE_WINDOW` seconds
and give up on it when less than ``min_rate`` bytes a second moved in a window; a
transfer that keeps the rate still ends by its deadline, ``max(send_timeout, size /
min_rate)``.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

RATE_WINDOW = 2.0
"""Seconds over which a transfer's progress is measured against the minimum rate."""


class TooSlow(TimeoutError):
    """A transfer moved fewer than the minimum rate's bytes in a window."""


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
    """Watches one connection's incoming big messages (call :meth:`check` every window
    it did not deliver a message).

    Args:
        conn: the connection (its ``bytes_received`` and ``in_message`` are read; a
            connection without them is never judged slow).
        min_rate: bytes a second a message being received must keep up (0: no minimum).
    """

    def __init__(self, conn: Any, min_rate: int) -> None:
        self.conn = conn
        self.min_rate = min_rate
        self._last = getattr(conn, "bytes_received", None)
        self._waiting = False

    def check(self, seconds: float) -> None:
        """``seconds`` passed since the last check (or the start) without a message.

        Raises:
            TooSlow: a message was arriving and fewer than ``min_rate * seconds`` bytes of
                it came, while the connection was not held back by the receive budget.
        """
        got = getattr(self.conn, "bytes_received", None)
        last, self._last = self._last, got
        was_waiting = self._waiting
        self._waiting = bool(getattr(self.conn, "waiting_for_budget", False))
        if self.min_rate <= 0 or got is None or last is None:
            return
        if self._waiting or was_waiting:
            return  # held back by us (in part of the window): not its fault
        if not getattr(self.conn, "in_message", False):
            return
        if got - last < math.floor(self.min_rate * seconds):
            raise TooSlow(
                f"the agent sent {got - last} bytes of its message in {seconds:.1f} s "
                f"(minimum rate {self.min_rate} bytes/s)"
            )
