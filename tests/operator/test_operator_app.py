"""The operator app factory and server, on their own: what a dashboard mounting its routes
gets (security headers, JSON errors, /healthz), the server's start and stop in the caller's
loop, and a busy operator port refused with a clear error before anything runs."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path

import pytest
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from fedstack import AggregatorConfig
from fedstack.aggregator import Aggregator
from fedstack.errors import ConfigError
from fedstack.operator import OperatorServer, create_app


async def fetch(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 10)  # the server closes (Connection: close)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return int(lines[0].split()[1]), headers, body


def get(path: str, method: str = "GET") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()


async def page(request: Request) -> Response:
    name = request.query_params.get("name", "")
    return HTMLResponse(
        f"<p>{name}</p>",  # (a real page escapes: here only the headers matter)
        headers={"Content-Security-Policy": "default-src 'self'"},
    )


async def broken(request: Request) -> Response:
    raise RuntimeError("secret detail /etc/fedstack.db")


def test_app_factory_and_server_serve_extra_routes_with_shared_guards() -> None:
    async def main() -> None:
        app = create_app([Route("/", page), Route("/broken", broken)])
        server = OperatorServer(app, "127.0.0.1", 0)
        await server.start()
        port = server.port
        assert port != 0 and server.url == f"http://127.0.0.1:{port}"
        try:
            status, headers, body = await fetch(port, get("/?name=x"))
            assert (status, body) == (200, b"<p>x</p>")
            assert headers["content-security-policy"] == "default-src 'self'"  # its own
            assert headers["x-content-type-options"] == "nosniff"
            assert headers["x-frame-options"] == "DENY"
            assert headers["referrer-policy"] == "no-referrer"
            status, headers, body = await fetch(port, get("/healthz"))
            assert (status, json.loads(body)) == (200, {"status": "ok"})
            assert headers["content-security-policy"].startswith("default-src 'none'")
            status, headers, body = await fetch(port, get("/nowhere"))
            assert status == 404 and set(json.loads(body)) == {"error", "hint"}
            status, headers, body = await fetch(port, get("/healthz", "DELETE"))
            assert status == 405 and "GET" in headers["allow"]
            status, headers, body = await fetch(port, get("/broken"))
            assert status == 500 and b"secret" not in body and b"/etc" not in body
        finally:
            await server.stop()
            await server.stop()  # idempotent
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)

    asyncio.run(main())


def test_a_busy_operator_port_stops_the_start_with_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        cfg = AggregatorConfig(port=0, db=str(tmp_path / "b.db"), auth="off", operator_port=taken)

        async def main() -> int:
            agg = Aggregator(cfg)
            with pytest.raises(ConfigError, match=f"operator surface on 127.0.0.1:{taken}"):
                await agg.start()
            return agg.port

        agents_port = asyncio.run(main())
    # the agents' port it had opened is closed again
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", agents_port)) != 0
