"""The operator REST API, ``/api/v1/...`` on the operator port (HTTPS when the aggregator
speaks TLS).

Endpoints (JSON in and out; errors are ``{"error": ..., "hint": ...}``)::

    GET  /api/v1/status                run, round, version, agents, contributors, needed
    GET  /api/v1/agents                connected agents
    GET  /api/v1/rounds?limit=N        the last N rounds with their metrics (default 20)
    GET  /api/v1/model                 the run's model structure and what fixed it (the
                                       operator's registered model or the first agent's)
    POST /api/v1/agents/{name}/revoke  revoke an agent's credential and disconnect it
    POST /api/v1/shutdown              stop the aggregator (as SIGTERM does)

Every call needs ``Authorization: Bearer TOKEN`` with an operator credential (``fedstack
credentials add NAME --operator``), whatever the aggregator's ``auth`` setting for agents:
401 without a valid token, 403 with an agent's or a revoked one. Requests carry no body
(411/413, checked before the token). Every call -- accepted or refused -- is written to the
store's audit trail as an ``operator_api`` event (operator, credential fingerprint,
address, method, path, status, outcome) BEFORE it is answered. Refused calls are
rate-limited per source host: beyond a burst per interval they are counted and written as
one event with a ``count`` (see
:meth:`~fedstack.aggregator.service.Aggregator.audit_refusal`). Answers close the
connection (``Connection: close``) and are never cached.

:meth:`OperatorAPI.authenticate` and :meth:`OperatorAPI.audit` are the two checks every
operator action goes through; other operator surfaces (a dashboard's login and actions)
use them too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import Receive, Scope, Send

from fedstack.errors import StoreError
from fedstack.store import CredentialRefused
from fedstack.store.repository import Operator
from fedstack.transport.http import HttpError, json_bytes

if TYPE_CHECKING:
    from fedstack.aggregator.service import Aggregator

log = logging.getLogger("fedstack.operator")

__all__ = ["AUDIT_KIND", "OperatorAPI", "api_error", "api_json", "disconnect_revoked"]

AUDIT_KIND = "operator_api"
DEFAULT_ROUNDS = 20
MAX_ROUNDS = 1000
MAX_QUERY_FIELDS = 20
_MAX_TOKEN_CHARS = 512
_ISSUE_HINT = (
    "send 'Authorization: Bearer TOKEN' with an operator token; issue one with "
    "`fedstack credentials add NAME --operator --db DATABASE`"
)
_AUTH_HEADERS = {"WWW-Authenticate": 'Bearer realm="fedstack"'}
_HEADERS = {"Connection": "close", "Cache-Control": "no-store"}
_ENDPOINTS_HINT = (
    "endpoints: GET /api/v1/status, GET /api/v1/agents, GET /api/v1/rounds?limit=N, "
    "GET /api/v1/model, POST /api/v1/agents/NAME/revoke, POST /api/v1/shutdown"
)

Handler = Callable[[Request, Operator, list[str]], Awaitable["_Outcome"]]


def api_json(status: int, payload: Any, headers: dict[str, str] | None = None) -> Response:
    """``payload`` as a JSON answer of the API (non-finite floats become null)."""
    return Response(
        json_bytes(payload), status, {**_HEADERS, **(headers or {})}, "application/json"
    )


def api_error(
    status: int, error: str, hint: str = "", headers: dict[str, str] | None = None
) -> Response:
    """The JSON error shape of every refusal: ``{"error": ..., "hint": ...}``."""
    return api_json(status, {"error": error, "hint": hint}, headers)


@dataclass
class _Outcome:
    """What a route produced: the response, audit details, and work to do after the audit."""

    response: Response
    detail: dict[str, Any] = field(default_factory=dict)
    after: Callable[[], None] | None = None


def _address(request: Request) -> str:
    client = request.client
    return "" if client is None else f"{client.host}:{client.port}"


def _raw_path(request: Request) -> str:
    """The request's path as sent (still percent-encoded)."""
    raw = request.scope.get("raw_path")
    if isinstance(raw, bytes):
        return raw.decode("latin-1")
    return request.url.path


def disconnect_revoked(agg: Aggregator, name: str, operator: Operator, via: str = "") -> bool:
    """Disconnect agent ``name`` whose credential ``operator`` just revoked (told why,
    audited as a refusal) and log it; ``via`` names where ("from the dashboard").
    Returns whether the agent was connected."""
    disconnected = agg.disconnect_agent(
        name,
        "revoked",
        f"the credential of agent {name!r} was revoked by an operator",
        {"name": name, "stage": "operator-revoke", "reason": "revoked", "operator": operator.name},
    )
    log.warning(
        "operator %s revoked the credential of agent %s%s%s",
        operator.name,
        name,
        f" {via}" if via else "",
        " and disconnected it" if disconnected else "",
    )
    return disconnected


class OperatorAPI:
    """The operator API of one :class:`~fedstack.aggregator.service.Aggregator`:
    :meth:`routes` gives the Starlette routes to mount (``/api`` and below)."""

    def __init__(self, aggregator: Aggregator) -> None:
        self.agg = aggregator
        self._stop_task: asyncio.Task[None] | None = None
        self._table: dict[tuple[str, ...], tuple[str, Handler]] = {
            # path pattern ("*" = one segment) -> (method, handler)
            ("api", "v1", "status"): ("GET", self._status),
            ("api", "v1", "agents"): ("GET", self._agents),
            ("api", "v1", "rounds"): ("GET", self._rounds),
            ("api", "v1", "model"): ("GET", self._model),
            ("api", "v1", "agents", "*", "revoke"): ("POST", self._revoke),
            ("api", "v1", "shutdown"): ("POST", self._shutdown),
        }

    def routes(self) -> list[BaseRoute]:
        """``/api`` and everything below it, any method (refusals are audited too)."""
        endpoint = _Endpoint(self.handle)  # an ASGI app: Starlette passes every method
        return [Route("/api", endpoint), Route("/api/{rest:path}", endpoint)]

    async def handle(self, request: Request) -> Response:
        """Answer one request (never raises for a bad request: it becomes a 4xx)."""
        path = _raw_path(request)
        operator: Operator | None = None
        detail: dict[str, Any] = {}
        after: Callable[[], None] | None = None
        try:
            _refuse_body(request)  # before authentication: a body is never read
            operator = await self.authenticate(
                request.headers.getlist("authorization"), _address(request), detail
            )
            outcome = await self._route(request, path, operator)
            response, after = outcome.response, outcome.after
            detail.update(outcome.detail)
        except HttpError as exc:
            response = api_error(
                exc.status, exc.error, exc.hint, _AUTH_HEADERS if exc.status == 401 else None
            )
            detail.setdefault("reason", exc.error)
        await self.audit(request.method, path, _address(request), operator, response, detail)
        if after is not None:
            after()
        return response

    # ------------------------------------------------------------------ authentication
    async def authenticate(
        self, authorization: list[str], address: str, detail: dict[str, Any]
    ) -> Operator:
        """The operator whose token the ``Authorization`` header values carry.

        Raises:
            HttpError: 401 (no, malformed or unknown token), 403 (an agent's or a revoked
                credential), 503 (no store); ``detail`` then holds the audit's reason.
        """
        store = self.agg.store
        if store is None:
            raise HttpError(503, "the aggregator is starting", "retry in a moment")
        token: str | None = None
        if len(authorization) == 1:
            scheme, _, rest = authorization[0].partition(" ")
            rest = rest.strip()
            if (
                scheme.lower() == "bearer"
                and 0 < len(rest) <= _MAX_TOKEN_CHARS
                and len(rest.split()) == 1
            ):
                token = rest
        if token is None:
            detail["reason"] = "no-token" if not authorization else "malformed-authorization"
            raise HttpError(401, "operator token required", _ISSUE_HINT)
        try:
            return await asyncio.to_thread(store.authenticate_operator, token, address)
        except CredentialRefused as exc:
            detail.update(reason=exc.reason, credential=exc.credential)
            if exc.source is not None:  # who holds the refused credential
                detail["agent" if exc.reason == "agent-credential" else "name"] = exc.source
            if exc.reason == "agent-credential":
                raise HttpError(
                    403, "an agent credential cannot use the operator API", _ISSUE_HINT
                ) from None
            if exc.reason == "revoked":
                raise HttpError(403, "this operator credential was revoked", _ISSUE_HINT) from None
            raise HttpError(401, "unknown operator token", _ISSUE_HINT) from None
        except StoreError as exc:
            log.error("cannot check an operator token, the store is unavailable: %s", exc)
            detail["reason"] = "store-unavailable"
            raise HttpError(503, "the aggregator's store is unavailable", "retry later") from None

    # ------------------------------------------------------------------ routing
    async def _route(self, request: Request, path: str, operator: Operator) -> _Outcome:
        segments = [unquote(p) for p in path.partition("?")[0].split("/") if p]
        for pattern, (method, handler) in self._table.items():
            if len(pattern) != len(segments) or not all(
                p in ("*", s) for p, s in zip(pattern, segments, strict=True)
            ):
                continue
            if request.method != method:
                return _Outcome(
                    api_error(
                        405,
                        f"{request.method} is not allowed here",
                        f"use {method}",
                        {"Allow": method},
                    ),
                    {"reason": "method not allowed"},
                )
            return await handler(request, operator, segments)
        raise HttpError(404, "no such endpoint", _ENDPOINTS_HINT)

    async def _status(self, request: Request, operator: Operator, segments: list[str]) -> _Outcome:
        from fedstack import __version__

        stats = self.agg.statistics()
        federation = (
            {}
            if stats.name is None
            else {"federation": {"name": stats.name, "peers": list(stats.peers)}}
        )
        return _Outcome(
            api_json(
                200,
                {
                    **federation,
                    "run_id": stats.run_id,
                    "aggregator_id": stats.aggregator_id,
                    "round": stats.round,
                    "version": stats.version,
                    "finished": stats.finished,
                    "strategy": stats.strategy,
                    "active_agents": stats.active_agents,
                    "contributors": stats.contributors,
                    "needed": stats.needed,
                    "rounds_completed": stats.rounds_completed,
                    "delivery": stats.delivery,
                    "tls": stats.tls,
                    "fedstack_version": __version__,
                },
            )
        )

    async def _agents(self, request: Request, operator: Operator, segments: list[str]) -> _Outcome:
        agents = [
            {
                "name": a.name,
                "agent_id": a.agent_id,
                "address": a.address,
                "last_seen": a.last_seen,
                "idle_seconds": a.idle_seconds,
                "known_version": a.known_version,
                "welcomed": a.welcomed,
                "credential_source": a.credential_source,
                "credential": a.credential,
            }
            for a in self.agg.statistics(agents=True).agents
        ]
        return _Outcome(api_json(200, {"count": len(agents), "agents": agents}))

    async def _rounds(self, request: Request, operator: Operator, segments: list[str]) -> _Outcome:
        try:
            query = parse_qs(
                request.url.query, keep_blank_values=True, max_num_fields=MAX_QUERY_FIELDS
            )
        except ValueError:
            raise HttpError(400, "too many query fields", f"at most {MAX_QUERY_FIELDS}") from None
        raw = query.get("limit", [str(DEFAULT_ROUNDS)])
        if len(raw) != 1 or not raw[0].isdigit() or not 1 <= int(raw[0]) <= MAX_ROUNDS:
            raise HttpError(400, "bad limit", f"limit must be an integer in 1..{MAX_ROUNDS}")
        store = self.agg.store
        assert store is not None
        try:
            rows = await asyncio.to_thread(store.rounds, self.agg.run_id, int(raw[0]))
        except StoreError as exc:
            raise HttpError(503, "the aggregator's store is unavailable", "retry later") from exc
        keys = (
            "round",
            "started",
            "finished",
            "seconds",
            "model_id",
            "num_updates",
            "num_samples",
            "metrics",
        )
        rounds = [{k: r.get(k) for k in keys} for r in rows]
        return _Outcome(
            api_json(200, {"run_id": self.agg.run_id, "count": len(rounds), "rounds": rounds})
        )

    async def _model(self, request: Request, operator: Operator, segments: list[str]) -> _Outcome:
        store = self.agg.store
        assert store is not None
        try:
            spec = await asyncio.to_thread(store.model_spec, self.agg.run_id)
        except StoreError as exc:
            raise HttpError(503, "the aggregator's store is unavailable", "retry later") from exc
        return _Outcome(api_json(200, spec))

    async def _revoke(self, request: Request, operator: Operator, segments: list[str]) -> _Outcome:
        name = segments[3]
        store = self.agg.store
        assert store is not None
        detail: dict[str, Any] = {"target": name[:128]}
        try:
            known = len(name) <= 128 and any(
                c["name"] == name and c["role"] == "agent"
                for c in await asyncio.to_thread(store.list_credentials)
            )
            if not known:
                raise HttpError(
                    404, f"no agent {name[:128]!r}", "GET /api/v1/agents lists the connected agents"
                )
            changed = await asyncio.to_thread(store.revoke_credential, name, role="agent")
        except StoreError as exc:
            raise HttpError(503, "the aggregator's store is unavailable", "retry later") from exc
        disconnected = disconnect_revoked(self.agg, name, operator)
        detail.update(changed=changed, disconnected=disconnected)
        return _Outcome(
            api_json(
                200,
                {"name": name, "revoked": True, "changed": changed, "disconnected": disconnected},
            ),
            detail,
        )

    async def _shutdown(
        self, request: Request, operator: Operator, segments: list[str]
    ) -> _Outcome:
        log.warning(
            "operator %s requested shutdown (the run resumes from the store on restart)",
            operator.name,
        )

        def stop() -> None:  # after the audit event is written, before the answer is sent
            if self._stop_task is None:
                self._stop_task = asyncio.get_running_loop().create_task(self.agg.stop())

        return _Outcome(
            api_json(202, {"status": "stopping", "run_id": self.agg.run_id}), after=stop
        )

    # ------------------------------------------------------------------ audit
    async def audit(
        self,
        method: str,
        path: str,
        address: str,
        operator: Operator | None,
        response: Response,
        detail: dict[str, Any],
    ) -> None:
        """Log and write the ``operator_api`` audit event of one call (refusals at a
        bounded rate per source); a store failure is logged, never raised."""
        status = response.status_code
        self.agg.metrics.count_operator_request(status)
        event = {
            "operator": operator.name if operator else detail.pop("name", None),
            "credential": operator.fingerprint if operator else detail.pop("credential", None),
            "address": address,
            "method": method,
            "path": path[:256],
            "status": status,
            "outcome": "accepted" if status < 400 else "refused",
            **detail,
        }
        (log.info if status < 400 else log.warning)(
            "operator API: %s %s from %s (%s) -> %d",
            method,
            path[:200],
            address,
            event["operator"] or "unauthenticated",
            status,
        )
        store = self.agg.store
        if store is None:
            return
        with contextlib.suppress(StoreError):
            if status >= 400:  # refusals: rate-limited per source, a flood is counted
                await self.agg.audit_refusal(AUDIT_KIND, event, address=address)
            else:
                await asyncio.to_thread(store.log_event, AUDIT_KIND, event, run_id=self.agg.run_id)


class _Endpoint:
    """``handle`` as an ASGI app."""

    def __init__(self, handle: Callable[[Request], Awaitable[Response]]) -> None:
        self.handle = handle

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = await self.handle(Request(scope, receive))
        await response(scope, receive, send)


def _refuse_body(request: Request) -> None:
    """Raise the refusal of a request that carries a body (none are accepted).

    411 for ``Transfer-Encoding`` (a length is required), 413 for a ``Content-Length``
    above 0, 400 for a malformed or repeated ``Content-Length``.
    """
    headers = request.headers
    if headers.getlist("transfer-encoding"):
        raise HttpError(411, "length required", "send no request body (parameters go in the path)")
    lengths = headers.getlist("content-length")
    if not lengths:
        return
    if len(lengths) > 1 or not lengths[0].isdigit() or len(lengths[0]) > 18:
        raise HttpError(400, "malformed Content-Length")
    if int(lengths[0]) > 0:
        raise HttpError(
            413,
            "request body too large",
            "operator requests take no body: parameters go in the path",
        )
