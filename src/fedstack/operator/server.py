"""The operator port: an ASGI app served by uvicorn in the caller's event loop.

:class:`OperatorServer` binds the socket itself (a busy port is an ``OSError`` for the
caller, not uvicorn's ``sys.exit``), starts uvicorn's server on it in the running loop
(no thread, no process, no signal handlers: the aggregator's loop and the CLI's signal
handling stay in charge) and stops it on :meth:`~OperatorServer.stop`. TLS uses the
caller's ``ssl.SSLContext`` (the aggregator's: same certificate, same client-certificate
requirement as the agents' port).

HTTP/1.1 by h11 with bounds: request heads up to :data:`MAX_HEAD_BYTES`; a connection
must complete its TLS handshake and each request head within ``head_timeout`` seconds (a
slow-loris client is dropped, unanswered); a client that half-closes after its request
still gets the answer; idle keep-alive connections close after 5 s; beyond
``max_connections`` open connections new requests get 503. Client addresses are the
socket's peers (forwarded headers are not trusted).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl as ssl_mod
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.utils import get_remote_addr

from fedstack.transport.http import MAX_HEAD_BYTES

__all__ = ["HEAD_TIMEOUT", "MAX_CONNECTIONS", "OperatorServer"]

log = logging.getLogger("fedstack.operator")

HEAD_TIMEOUT = 10.0
"""Seconds a connection has to send each request head (slow-loris guard)."""
MAX_CONNECTIONS = 256
"""Open connections beyond which requests are answered 503."""


class _GuardedH11(H11Protocol):
    """uvicorn's h11 protocol with a deadline for every request head (uvicorn bounds
    the idle time between requests, not the time a head may take to trickle in)."""

    head_timeout = HEAD_TIMEOUT
    _head_timer: asyncio.TimerHandle | None = None
    _eof = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def _arm(self) -> None:
        self._disarm()
        self._head_timer = self.loop.call_later(self.head_timeout, self._head_expired)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_expired(self) -> None:
        self._head_timer = None
        if self.cycle is None or self.cycle.response_complete:  # no request under way
            if not self.transport.is_closing():
                addr = get_remote_addr(self.transport)
                log.info("operator port: dropped %s (no request head in time)", addr)
                self.transport.abort()

    def eof_received(self) -> bool | None:  # type: ignore[override]
        """The client half-closed: an answer under way still goes out (then the
        connection closes); otherwise close now."""
        self._eof = True
        if self.cycle is not None and not self.cycle.response_complete:
            return True
        return None

    def handle_events(self) -> None:
        before = self.cycle
        super().handle_events()
        if self.cycle is not before:  # a request head is complete: its handler runs
            self._disarm()

    def on_response_complete(self) -> None:
        if self._eof:  # the client sends nothing more
            self.transport.close()
            return
        self._arm()  # the next request's head (the keep-alive timer closes idle ones)
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


class OperatorServer:
    """Serves ``app`` on ``host:port`` (0: a free port) in the running event loop.

    Args:
        app: the ASGI application (see :func:`fedstack.operator.app.create_app`).
        host, port: where to listen.
        ssl: serve HTTPS with this context (None: plain HTTP).
        head_timeout: seconds a connection has to send a request head.
        max_connections: open connections beyond which requests get 503.
        label: what the server is, for its log line.
    """

    def __init__(
        self,
        app: Any,
        host: str,
        port: int,
        *,
        ssl: ssl_mod.SSLContext | None = None,
        head_timeout: float = HEAD_TIMEOUT,
        max_connections: int = MAX_CONNECTIONS,
        label: str = "operator surface (dashboard /, /metrics, /api/v1)",
    ) -> None:
        self.app = app
        self.host = host
        self.port = port
        self.ssl = ssl
        self.head_timeout = head_timeout
        self.max_connections = max_connections
        self.label = label
        self._server: uvicorn.Server | None = None
        self._sock: socket.socket | None = None
        self._ticker: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        """``http(s)://HOST:PORT`` (the bound port once started)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.ssl else 'http'}://{host}:{self.port}"

    async def start(self) -> None:
        """Bind and start serving.

        Raises:
            OSError: the address cannot be bound (in use, not local, no permission).
        """
        sock = _bind(self.host, self.port)
        guarded: type[_GuardedH11] = type(
            "GuardedH11", (_GuardedH11,), {"head_timeout": self.head_timeout}
        )
        config = uvicorn.Config(
            self.app,
            log_config=None,
            access_log=False,
            server_header=False,
            proxy_headers=False,
            lifespan="off",
            http=guarded,
            ws="none",
            timeout_keep_alive=5,
            timeout_graceful_shutdown=3,
            limit_concurrency=self.max_connections,
            h11_max_incomplete_event_size=MAX_HEAD_BYTES,
        )
        config.load()
        config.ssl = self.ssl  # the caller's context as it is (not rebuilt from files)
        server = uvicorn.Server(config)
        server.lifespan = config.lifespan_class(config)
        _quiet_uvicorn()

        def protocol(_loop: asyncio.AbstractEventLoop | None = None) -> H11Protocol:
            return guarded(  # as uvicorn's Server.startup makes them
                config=config,
                server_state=server.server_state,
                app_state=server.lifespan.state,
                _loop=_loop,
            )

        try:
            await server.lifespan.startup()
            # uvicorn's startup, but with a TLS handshake deadline (a client that never
            # completes its handshake does not hold a connection for asyncio's 60 s)
            listener = await asyncio.get_running_loop().create_server(
                protocol,
                sock=sock,
                ssl=self.ssl,
                ssl_handshake_timeout=self.head_timeout if self.ssl is not None else None,
                backlog=config.backlog,
            )
        except BaseException:
            sock.close()
            raise
        server.servers = [listener]
        server.started = True
        self._server, self._sock = server, sock
        self.port = sock.getsockname()[1]
        # uvicorn's ticker: the Date header once a second, and the exit flag
        self._ticker = asyncio.get_running_loop().create_task(
            server.main_loop(), name="operator-server"
        )
        log.info("%s on %s", self.label, self.url)

    async def stop(self) -> None:
        """Stop accepting, let answers under way finish (at most 3 s), close. Idempotent."""
        server, self._server = self._server, None
        if server is None:
            return
        server.should_exit = True
        if self._ticker is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._ticker
        await server.shutdown(sockets=[self._sock] if self._sock is not None else None)


def _bind(host: str, port: int) -> socket.socket:
    """A bound (not yet listening) non-blocking TCP socket on ``host:port``."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    if not infos:  # pragma: no cover - getaddrinfo raises instead
        raise OSError(f"cannot resolve {host!r}")
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _quiet_uvicorn() -> None:
    """uvicorn's start and stop messages and its warning per malformed request (which
    any client can send, any number of times) are not logged; its errors are. fedstack
    logs the surface's address itself."""
    err = logging.getLogger("uvicorn.error")
    if err.level == logging.NOTSET:
        err.setLevel(logging.ERROR)
