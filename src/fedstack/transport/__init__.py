"""Transports: move encoded messages between agents and aggregators (no protocol logic).

``ws://``/``wss://`` URLs use the WebSocket transport (:mod:`fedstack.transport.ws`),
``inproc://NAME`` the in-process one of the simulator (:mod:`fedstack.transport.inproc`).
"""

from __future__ import annotations

import ssl as ssl_mod

from fedstack.transport.inproc import InProcConnection
from fedstack.transport.ws import WSConnection, serve

Connection = WSConnection | InProcConnection
"""Either end of a connection: both have ``recv``, ``write``, ``send``, ``drain``,
``close``, ``abort``, ``admit``, ``penalize``, ``cooling``, ``is_open`` and
``remote_address``."""

__all__ = ["Connection", "InProcConnection", "WSConnection", "connect", "serve"]


async def connect(
    url: str,
    *,
    max_message_bytes: int,
    open_timeout: float = 10.0,
    ssl: ssl_mod.SSLContext | None = None,
) -> Connection:
    """Open a connection to ``url``: ``ws://HOST:PORT``, ``wss://HOST:PORT`` or
    ``inproc://NAME`` (an aggregator in this process, see :mod:`fedstack.sim`)."""
    if url.startswith("inproc://"):
        from fedstack.transport import inproc

        return await inproc.connect(
            url, max_message_bytes=max_message_bytes, open_timeout=open_timeout
        )
    from fedstack.transport import ws

    return await ws.connect(
        url, max_message_bytes=max_message_bytes, open_timeout=open_timeout, ssl=ssl
    )
