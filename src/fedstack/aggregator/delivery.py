"""Delivery of the global model: welcomes, the fan-out after a round, long polls.

The round owner publishes each new global model as an immutable :class:`Published`; the
functions here only send what they are given (or the latest published model once their
turn in the fan-out budget came), each bounded by its own timeout. :class:`PollWaiters`
holds the long polls the owner answers when a new version is published or a poll's wait
runs out.
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fedstack.aggregator.fanout import Fanout, Parts
from fedstack.aggregator.pacing import drain_paced
from fedstack.aggregator.registry import Session
from fedstack.errors import ConnectionClosed, LocalProtocolError
from fedstack.types import Weights
from fedstack.wire import NotReady, Welcome

log = logging.getLogger("fedstack.aggregator")


@dataclass(frozen=True, slots=True)
class Published:
    """The global model agents are given: version ``version``; ``round`` is in progress."""

    version: int
    round: int
    model_id: str
    weights: Weights
    extra: Weights
    finished: bool

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in self.weights.values())


class Delivery:
    """Sends welcomes and global models within the fan-out budget.

    Args:
        fanout: the shared encoding and the byte budget of big sends.
        latest: returns the latest published model (None before the federation starts).
        send_timeout: seconds one agent's send may take (the wait for the budget: 10x).
        welcome_fields: the welcome's fixed fields (aggregator and run id, delivery,
            heartbeat interval, federation config), read when a welcome is sent.
        min_rate: bytes/s an agent must read a big send at (0: no minimum; see
            :mod:`fedstack.aggregator.pacing`); the send's deadline is then
            ``max(send_timeout, size / min_rate)``.
    """

    def __init__(
        self,
        fanout: Fanout,
        latest: Callable[[], Published | None],
        send_timeout: float,
        welcome_fields: Callable[[], dict[str, Any]],
        min_rate: int = 0,
    ) -> None:
        self.fanout = fanout
        self._latest = latest
        self.send_timeout = send_timeout
        self._welcome_fields = welcome_fields
        self.min_rate = min_rate
        self._pushing: dict[Session, int] = {}  # -> the newest version asked for it

    async def welcome(self, session: Session) -> None:
        """Send ``session`` its welcome (with the model unless it already has this version)."""
        pub = self._latest()
        assert pub is not None
        held = 0
        if session.known_version != pub.version:  # as big as a global model: budget it
            held = await self.fanout.acquire(pub.nbytes, 10 * self.send_timeout)
        try:
            pub = self._latest()  # the latest, once our turn came
            assert pub is not None
            send_model = session.known_version != pub.version
            session.write(
                Welcome(
                    agent_id=session.agent_id,
                    round=pub.round,
                    version=pub.version,
                    model_id=pub.model_id,
                    model=pub.weights if send_model else None,
                    finished=pub.finished,
                    extra=pub.extra if send_model and pub.extra else None,
                    **self._welcome_fields(),
                )
            )
            session.known_version = pub.version
            session.welcomed = True
            await drain_paced(
                session.conn, pub.nbytes if send_model else 0, self.send_timeout, self.min_rate
            )
        finally:
            self.fanout.release(held)

    def encoded(self, pub: Published) -> tuple[Parts, int]:
        return self.fanout.encoded(pub.version, pub.model_id, pub.weights, pub.finished, pub.extra)

    async def send_global(self, session: Session) -> None:
        """Send the latest global model: encoded once per version and shared by every
        agent; big sends take bytes of the fan-out budget until flushed."""
        pub = self._latest()
        assert pub is not None
        _, nbytes = self.encoded(pub)
        held = await self.fanout.acquire(nbytes, 10 * self.send_timeout)
        try:
            pub = self._latest()  # the latest, once our turn came
            assert pub is not None
            parts, _ = self.encoded(pub)
            session.write_parts(parts)
            session.known_version = max(session.known_version, pub.version)
            await drain_paced(session.conn, nbytes, self.send_timeout, self.min_rate)
        finally:
            self.fanout.release(held)

    async def push(self, session: Session, version: int) -> None:
        """:meth:`send_global` after a round, dropping an agent that cannot take it.

        At most one push is in flight per agent: a push asked for while one is in flight
        is folded into it (the latest model follows once the agent took the previous
        one), so an agent that reads slowly or not at all holds one model's bytes of the
        fan-out budget and of its write buffer, not one per version published meanwhile
        (issue 16 finding 7)."""
        if session in self._pushing:
            self._pushing[session] = max(self._pushing[session], version)
            return
        self._pushing[session] = version
        try:
            while True:
                try:
                    await self.send_global(session)
                except ConnectionClosed:  # it is leaving (e.g. a sampled agent that uploaded)
                    log.debug(
                        "%s closed its connection before version %d reached it",
                        session.name,
                        version,
                    )
                    session.conn.abort()
                    return
                except LocalProtocolError:  # its session already failed (a protocol breach)
                    log.debug(
                        "%s's session has failed; version %d is not pushed to it",
                        session.name,
                        version,
                    )
                    session.conn.abort()
                    return
                except (TimeoutError, OSError):
                    log.warning(
                        "could not push version %d to %s; dropping it", version, session.name
                    )
                    session.conn.abort()
                    return
                version = self._pushing[session]
                if session.known_version >= version:
                    return
        finally:
            self._pushing.pop(session, None)

    async def answer_poll(self, session: Session, known_version: int) -> None:
        """The global model if newer than ``known_version``, else ``not_ready``."""
        try:
            pub = self._latest()
            if pub is not None and pub.version > known_version:
                await self.send_global(session)
            else:
                version = pub.version if pub is not None else -1
                await session.send(NotReady(version=version, round=version + 1), self.send_timeout)
        except (ConnectionClosed, TimeoutError, LocalProtocolError):
            session.conn.abort()


class PollWaiters:
    """Long polls waiting for a newer version; at most one per session (a new poll
    replaces the old, which is never answered)."""

    def __init__(self) -> None:
        self._waiting: dict[Session, tuple[int, float]] = {}  # -> (known version, expiry)
        self._expiries: list[tuple[float, int, Session]] = []
        self._seq = 0

    def __len__(self) -> int:
        return len(self._waiting)

    def add(self, session: Session, known_version: int, expiry: float) -> None:
        self._waiting[session] = (known_version, expiry)
        self._seq += 1
        heapq.heappush(self._expiries, (expiry, self._seq, session))

    def remove(self, session: Session) -> None:
        self._waiting.pop(session, None)

    def take_all(self) -> list[tuple[Session, int]]:
        """Every waiting poll (a new version was published)."""
        out = [(s, v) for s, (v, _) in self._waiting.items()]
        self._waiting.clear()
        self._expiries.clear()
        return out

    def take_due(self, now: float) -> list[tuple[Session, int]]:
        """The polls whose wait ran out at ``now``."""
        out: list[tuple[Session, int]] = []
        while self._expiries and self._expiries[0][0] <= now:
            expiry, _, s = heapq.heappop(self._expiries)
            entry = self._waiting.get(s)
            if entry is not None and entry[1] == expiry:
                del self._waiting[s]
                out.append((s, entry[0]))
        return out

    def next_expiry(self) -> float | None:
        while self._expiries:
            expiry, _, s = self._expiries[0]
            entry = self._waiting.get(s)
            if entry is not None and entry[1] == expiry:
                return expiry
            heapq.heappop(self._expiries)
        return None
