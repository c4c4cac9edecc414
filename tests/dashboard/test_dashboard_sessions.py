"""The dashboard's sessions (signed cookie, server-side expiry, bounded count) and its
event stream's end when the client goes away."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, MutableMapping
from typing import Any

from fedstack.dashboard.app import EventStream
from fedstack.dashboard.sessions import Sessions
from fedstack.security.credentials import Operator


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_session_cookies_are_signed_expire_and_are_bounded() -> None:
    clock = Clock()
    sessions = Sessions(idle_seconds=60, max_seconds=300, max_sessions=3, clock=clock)
    s = sessions.new("127.0.0.1:1")
    cookie = sessions.cookie_value(s)
    assert sessions.get(cookie) is s
    sid, sig = cookie.split(".")
    # a forged id, a forged signature, another dashboard's key: nothing
    assert sessions.get(f"{sid}x.{sig}") is None
    assert sessions.get(f"{sid}.{sig[:-2]}AA") is None
    assert sessions.get(sid) is None and sessions.get("") is None
    assert Sessions(clock=clock).get(cookie) is None
    # CSRF token: the session's only
    assert sessions.check_csrf(s, s.csrf) and not sessions.check_csrf(s, s.csrf + "x")
    assert not sessions.check_csrf(None, s.csrf) and not sessions.check_csrf(s, None)
    # logging in replaces the session (the old id is worth nothing)
    op = Operator(operator_id="o1", name="ops", credential="h")
    logged = sessions.login(s, op, "127.0.0.1:1")
    assert sessions.get(cookie) is None and logged.operator is op
    cookie = sessions.cookie_value(logged)
    # idle expiry, refreshed by use; absolute expiry whatever the use
    clock.now += 59
    assert sessions.get(cookie) is logged
    clock.now += 59
    assert sessions.get(cookie) is logged
    clock.now += 61
    assert sessions.get(cookie) is None
    again = sessions.login(None, op, "")
    cookie = sessions.cookie_value(again)
    for _ in range(6):
        clock.now += 50
        assert sessions.get(cookie) is again
    clock.now += 50
    assert sessions.get(cookie) is None  # 350 s > max_seconds
    # a revoked operator's sessions end
    a, b = sessions.login(None, op, ""), sessions.new()
    assert sessions.end_operator("o1") == 1
    assert sessions.get(sessions.cookie_value(a)) is None
    assert sessions.get(sessions.cookie_value(b)) is b
    # at most max_sessions: the least recently used goes
    made = [sessions.new() for _ in range(5)]
    assert len(sessions) == 3
    assert sessions.get(sessions.cookie_value(made[0])) is None
    assert sessions.get(sessions.cookie_value(made[-1])) is made[-1]


def test_event_stream_ends_when_the_client_disconnects() -> None:
    ended = asyncio.Event()

    async def forever() -> AsyncIterator[bytes]:
        try:
            yield b"retry: 2000\n\n"
            await asyncio.sleep(3600)  # a live view with nothing new to say
            yield b""
        finally:
            ended.set()

    sent: list[dict[str, Any]] = []

    async def main() -> float:
        gone = asyncio.Event()

        async def receive() -> dict[str, Any]:
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: MutableMapping[str, Any]) -> None:
            sent.append(dict(message))

        loop = asyncio.get_running_loop()
        call = asyncio.ensure_future(
            EventStream(forever(), media_type="text/event-stream")(
                {"type": "http", "asgi": {"spec_version": "2.4"}}, receive, send
            )
        )
        await asyncio.sleep(0.1)
        assert not call.done()
        t0 = loop.time()
        gone.set()
        await asyncio.wait_for(call, 2)
        return loop.time() - t0

    took = asyncio.run(main())
    assert took < 0.5 and ended.is_set()
    assert sent[0]["type"] == "http.response.start" and sent[1]["body"] == b"retry: 2000\n\n"


def test_a_flood_of_anonymous_sessions_never_logs_an_operator_out() -> None:
    """Every GET /login makes an anonymous session; at the cap those are dropped first."""
    sessions = Sessions(max_sessions=3)
    op = Operator(operator_id="o1", name="ops", credential="h")
    logged = sessions.login(sessions.new(), op, "127.0.0.1:1")
    cookie = sessions.cookie_value(logged)
    for _ in range(50):
        sessions.new()
    assert len(sessions) == 3
    kept = sessions.get(cookie)
    assert kept is not None and kept.operator == op
