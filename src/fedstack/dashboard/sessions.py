"""The dashboard's sessions: a signed cookie naming a session held in the server's memory.

The cookie ``fedstack_session`` carries only a random session id and its HMAC (a key drawn
when the dashboard starts): a forged or altered id is ignored, and nothing about the
operator is in the cookie. The session itself (its CSRF token, the operator once logged
in, its expiry) stays in the server's memory: it ends on logout, after
:data:`IDLE_SECONDS` without a request, after :data:`MAX_SECONDS` in any case, and with
the process. Every form of the dashboard carries the session's CSRF token in a hidden
``csrf`` field; a POST without the right one is refused.

A browser gets a session (not logged in) on its first page, so that the login form has a
CSRF token too; logging in replaces the session id (a session id known before the login
is worth nothing after it).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from fedstack.security.credentials import Operator

__all__ = ["COOKIE", "IDLE_SECONDS", "MAX_SECONDS", "MAX_SESSIONS", "Session", "Sessions"]

COOKIE = "fedstack_session"
IDLE_SECONDS = 3600.0
"""A session unused this long ends."""
MAX_SECONDS = 12 * 3600.0
"""A session ends this long after it began, used or not."""
MAX_SESSIONS = 10_000
"""Sessions held at most (the least recently used one goes first)."""


@dataclass
class Session:
    """One browser's session."""

    sid: str
    csrf: str
    created: float
    used: float
    operator: Operator | None = None
    address: str = ""

    @property
    def logged_in(self) -> bool:
        return self.operator is not None


class Sessions:
    """The sessions of one dashboard (see the module docstring)."""

    def __init__(
        self,
        *,
        idle_seconds: float = IDLE_SECONDS,
        max_seconds: float = MAX_SECONDS,
        max_sessions: int = MAX_SESSIONS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._key = secrets.token_bytes(32)
        self._by_sid: OrderedDict[str, Session] = OrderedDict()
        self.idle_seconds = idle_seconds
        self.max_seconds = max_seconds
        self.max_sessions = max_sessions
        self._clock = clock

    def __len__(self) -> int:
        return len(self._by_sid)

    def _sign(self, sid: str) -> str:
        mac = hmac.new(self._key, sid.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()

    def cookie_value(self, session: Session) -> str:
        """The cookie's value for ``session``: its id and the id's signature."""
        return f"{session.sid}.{self._sign(session.sid)}"

    def get(self, cookie: str | None) -> Session | None:
        """The live session the cookie value names (None: none, forged, expired)."""
        if not cookie or len(cookie) > 200 or cookie.count(".") != 1:
            return None
        sid, sig = cookie.split(".")
        if not hmac.compare_digest(sig, self._sign(sid)):
            return None
        session = self._by_sid.get(sid)
        if session is None:
            return None
        now = self._clock()
        if now - session.used > self.idle_seconds or now - session.created > self.max_seconds:
            self.end(session)
            return None
        session.used = now
        self._by_sid.move_to_end(sid)
        return session

    def new(self, address: str = "") -> Session:
        """A new session, not logged in."""
        now = self._clock()
        self._expire(now)
        while len(self._by_sid) >= self.max_sessions:
            # the least recently used session that is not logged in: a flood of anonymous
            # sessions (every GET /login makes one) never logs an operator out
            victim = next((s for s in self._by_sid.values() if not s.logged_in), None)
            if victim is None:
                victim = next(iter(self._by_sid.values()))
            del self._by_sid[victim.sid]
        session = Session(
            sid=secrets.token_urlsafe(24),
            csrf=secrets.token_urlsafe(24),
            created=now,
            used=now,
            address=address,
        )
        self._by_sid[session.sid] = session
        return session

    def login(self, old: Session | None, operator: Operator, address: str) -> Session:
        """A new logged-in session for ``operator`` (``old`` ends: its id is dropped)."""
        if old is not None:
            self.end(old)
        session = self.new(address)
        session.operator = operator
        return session

    def end(self, session: Session) -> None:
        self._by_sid.pop(session.sid, None)

    def end_operator(self, operator_id: str) -> int:
        """End every session of the operator ``operator_id`` (its credential was revoked or
        replaced); how many ended."""
        gone = [
            sid
            for sid, s in self._by_sid.items()
            if s.operator is not None and s.operator.operator_id == operator_id
        ]
        for sid in gone:
            del self._by_sid[sid]
        return len(gone)

    def check_csrf(self, session: Session | None, token: str | None) -> bool:
        """Whether ``token`` is ``session``'s CSRF token."""
        return (
            session is not None
            and token is not None
            and hmac.compare_digest(token.encode(), session.csrf.encode())
        )

    def _expire(self, now: float) -> None:
        while self._by_sid:
            sid, oldest = next(iter(self._by_sid.items()))
            if now - oldest.used <= self.idle_seconds:
                break
            del self._by_sid[sid]
