"""Process limits that matter for many connections: descriptors, and who may hold them."""

from __future__ import annotations

import contextlib
import logging
from typing import Protocol

log = logging.getLogger("fedstack.transport")


def raise_nofile_limit(want: int | None = None) -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE (one descriptor per connection) to the hard limit, or
    to ``want`` if smaller. Returns the (soft, hard) limits in force afterwards; (-1, -1)
    where the platform has no such limit."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not POSIX
        return -1, -1
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if want is not None:
        target = min(target, max(soft, want))
    if target > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4096:
        log.info("open-file limit is %d: at most about %d agents can connect", soft, soft - 64)
    return soft, hard


class Droppable(Protocol):
    def abort(self) -> None: ...


class ConnectionGate:
    """Bounds a server's connections so that strangers cannot take every descriptor.

    A connection is *unadmitted* until its owner vouches for it (:meth:`admitted`: the
    peer registered, or the server answered it). At most ``max_unadmitted`` connections
    are unadmitted at once, and at most ``max_connections`` are open in all: past either
    bound, the oldest unadmitted connection is dropped to make room (or, if every
    connection is admitted, the newcomer). Admitted connections are never dropped here,
    so the descriptors between the two bounds stay for registered agents, and those
    above ``max_connections`` for the store and the log.
    """

    def __init__(self, max_connections: int, max_unadmitted: int) -> None:
        if max_connections < 1 or max_unadmitted < 1:
            raise ValueError("connection limits must be positive")
        self.max_connections = max_connections
        self.max_unadmitted = max_unadmitted
        self._open: set[Droppable] = set()
        self._unadmitted: dict[Droppable, None] = {}  # oldest first
        self.dropped = 0

    @classmethod
    def for_process(cls, reserve: int = 128) -> ConnectionGate:
        """Limits from the open-file limit: ``reserve`` descriptors kept for the store,
        blobs and logs; at most half of the rest for unadmitted connections."""
        soft, _ = raise_nofile_limit()
        usable = max(64, (soft if soft > 0 else 1 << 16) - reserve)
        return cls(usable, max(16, usable // 2))

    @property
    def open(self) -> int:
        return len(self._open)

    @property
    def unadmitted(self) -> int:
        return len(self._unadmitted)

    def opened(self, conn: Droppable) -> None:
        """A new connection (unadmitted); drops the oldest strangers if over a bound."""
        self._open.add(conn)
        self._unadmitted[conn] = None
        while self._unadmitted and (
            len(self._unadmitted) > self.max_unadmitted or len(self._open) > self.max_connections
        ):
            oldest = next(iter(self._unadmitted))
            self._drop(oldest)
        if len(self._open) > self.max_connections:  # only admitted ones left: refuse
            self._drop(conn)

    def admitted(self, conn: Droppable) -> None:
        self._unadmitted.pop(conn, None)

    def closed(self, conn: Droppable) -> None:
        self._open.discard(conn)
        self._unadmitted.pop(conn, None)

    def _drop(self, conn: Droppable) -> None:
        self.dropped += 1
        self.closed(conn)
        conn.abort()
