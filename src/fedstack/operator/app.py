"""The operator web application: one Starlette app, built from routes.

:func:`create_app` is the factory every operator surface goes through: it takes the
routes (and ASGI middleware) of its parts and adds what all of them share:

- ``GET /healthz`` (liveness, no authentication, no details);
- JSON errors (``{"error": ..., "hint": ...}``) for unknown paths, wrong methods and
  failures (details go to the log, never to the client);
- security headers on every answer (``X-Content-Type-Options: nosniff``,
  ``X-Frame-Options: DENY``, ``Referrer-Policy: no-referrer``, and a
  ``Content-Security-Policy`` that forbids everything by default: a page that needs
  scripts or styles from the package sets its own, narrower, policy on its response).

:func:`aggregator_app` is the aggregator's: Prometheus metrics at ``/metrics``
(:mod:`fedstack.operator.metrics`) and the operator API at ``/api/v1/...``
(:mod:`fedstack.operator.api`). A dashboard adds its routes (pages, static assets, its
login with a session cookie, server-sent events) and its middleware through the
``routes``/``middleware`` arguments; :class:`~fedstack.operator.api.OperatorAPI` gives it
the token check and the audit trail every operator action goes through, and
``await aggregator.wait_for_version(v + 1)`` wakes a live view when round ``v + 1`` is
committed (the store has it by then).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fedstack.operator.api import OperatorAPI, api_error, api_json
from fedstack.operator.metrics import CONTENT_TYPE, AggregatorMetrics

if TYPE_CHECKING:
    from fedstack.aggregator.service import Aggregator

__all__ = ["SECURITY_HEADERS", "aggregator_app", "create_app", "metrics_route"]

log = logging.getLogger("fedstack.operator")

SECURITY_HEADERS: dict[str, str] = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'",
}
"""Set on every answer that does not set the header itself."""


class SecurityHeaders:
    """ASGI middleware: :data:`SECURITY_HEADERS` on every HTTP answer (a response that
    sets one of them keeps its own value)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._defaults = [(k.lower().encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {k.lower() for k, _ in headers}
                headers += [(k, v) for k, v in self._defaults if k not in present]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, with_headers)


async def _healthz(request: Request) -> Response:
    return api_json(200, {"status": "ok"})


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        return api_error(404, "no such page", "the operator API is under /api/v1/")
    if exc.status_code == 405:
        allow = (exc.headers or {}).get("Allow", "")
        return api_error(
            405, f"{request.method} is not allowed here", f"use {allow}", {"Allow": allow}
        )
    return api_error(exc.status_code, exc.detail or "refused")


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.error(
        "operator surface: %s %s failed",
        request.method,
        request.url.path[:200],
        exc_info=exc,
    )
    return api_error(500, "internal error", "see the aggregator's log")


def create_app(
    routes: Sequence[BaseRoute] = (), *, middleware: Sequence[Middleware] = ()
) -> Starlette:
    """The operator web application: ``routes`` (and ``middleware``, outermost first,
    inside the security headers) plus ``/healthz`` and JSON errors."""
    return Starlette(
        routes=[Route("/healthz", _healthz, methods=["GET"]), *routes],
        middleware=[Middleware(SecurityHeaders), *middleware],
        exception_handlers={HTTPException: _http_error, Exception: _internal_error},
    )


def metrics_route(metrics: AggregatorMetrics, path: str = "/metrics") -> Route:
    """``GET path``: the Prometheus text exposition of ``metrics`` (no authentication:
    counts and sizes only, never an agent's name; bind the port accordingly)."""

    async def scrape(request: Request) -> Response:
        return Response(
            metrics.render(), 200, {"Cache-Control": "no-store"}, media_type=CONTENT_TYPE
        )

    return Route(path, scrape, methods=["GET"])


def aggregator_app(
    aggregator: Aggregator,
    routes: Sequence[BaseRoute] = (),
    *,
    middleware: Sequence[Middleware] = (),
) -> Starlette:
    """The operator surface of ``aggregator``: ``/metrics``, the operator API (unless its
    ``operator_api`` setting is off), and ``routes`` (e.g. a dashboard's)."""
    parts: list[BaseRoute] = [metrics_route(aggregator.metrics)]
    if aggregator.config.operator_api:
        parts += OperatorAPI(aggregator).routes()
    return create_app([*parts, *routes], middleware=middleware)
