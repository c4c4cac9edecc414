"""The event loop fedstack runs on: uvloop where it is installed (Linux, macOS), else asyncio's."""

from __future__ import annotations

import asyncio


def new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop

        loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    except ImportError:  # pragma: no cover - uvloop is a Linux/macOS dependency
        loop = asyncio.new_event_loop()
    return loop


def runner() -> asyncio.Runner:
    """An :class:`asyncio.Runner` on :func:`new_event_loop`."""
    return asyncio.Runner(loop_factory=new_event_loop)
