"""The operator REST API, served on the agents' port (HTTPS when the port speaks TLS).

Endpoints (JSON in and out; errors are ``{"error": ..., "hint": ...}``)::

    GET  /healthz                      liveness, no authentication, no details
    GET  /api/v1/status                run, round, version, agents, contributors, needed
    GET  /api/v1/agents                connected agents
    GET  /api/v1/rounds?limit=N        the last N rounds with their metrics (default 20)
    GET  /api/v1/model                 the run's model structure and what fixed it (the
                                       operator's registered model or the first agent's)
    POST /api/v1/agents/{name}/revoke  revoke an agent's credential and disconnect it
    POST /api/v1/shutdown              stop the aggregator (as SIGTERM does)

Every ``/api`` call needs ``Authorization: Bearer TOKEN`` with an operator credential
(``fedstack credentials add NAME --operator``), whatever the aggregator's ``auth`` setting
for agents: 401 without a valid token, 403 with an agent's or a revoked one. Requests carry
no body (411/413). Every call but ``/healthz`` -- accepted or refused -- is written to the
store's audit trail as an ``operator_api`` event (operator, credential fingerprint, address,
method, path, status, outcome); requests the transport cannot parse (400/431) are not.
Refused calls are rate-limited per source host: beyond a burst per interval they are
counted and written as one event with a ``count`` (see
:meth:`~fedstack.aggregator.service.Aggregator.audit_refusal`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fedstack.errors import StoreError
from fedstack.store import CredentialRefused
from fedstack.store.repository import Operator
from fedstack.transport.http import (
    HttpError,
    HttpRequest,
    HttpResponse,
    body_refusal,
    error_response,
    json_response,
)

if TYPE_CHECKING:
    from fedstack.aggregator.service import Aggregator

log = logging.getLogger("fedstack.operator")

AUDIT_KIND = "operator_api"
DEFAULT_ROUNDS = 20
MAX_ROUNDS = 1000
_MAX_TOKEN_CHARS = 512
_ISSUE_HINT = (
    "send 'Authorization: Bearer TOKEN' with an operator token; issue one with "
    "`fedstack credentials add NAME --operator --db DATABASE`"
)
_AUTH_HEADERS = (("WWW-Authenticate", 'Bearer realm="fedstack"'),)
_ROUTES: dict[tuple[str, ...], tuple[str, str]] = {
    # path pattern ("*" = one segment) -> (method, handler name)
    ("api", "v1", "status"): ("GET", "_status"),
    ("api", "v1", "agents"): ("GET", "_agents"),
    ("api", "v1", "rounds"): ("GET", "_rounds"),
    ("api", "v1", "model"): ("GET", "_model"),
    ("api", "v1", "agents", "*", "revoke"): ("POST", "_revoke"),
    ("api", "v1", "shutdown"): ("POST", "_shutdown"),
}


@dataclass
class _Outcome:
    """What a route produced: the response, audit details, and work to do after the audit."""

    response: HttpResponse
    detail: dict[str, Any] = field(default_factory=dict)
    after: Callable[[], None] | None = None


class OperatorAPI:
    """The HTTP handler of one :class:`~fedstack.aggregator.service.Aggregator`.

    Give :meth:`handle` to :func:`fedstack.transport.ws.serve` as ``http_handler``.
    """

    def __init__(self, aggregator: Aggregator) -> None:
        self.agg = aggregator
        self._stop_task: asyncio.Task[None] | None = None

    async def handle(self, req: HttpRequest) -> HttpResponse:
        """Answer one request (never raises for a bad request: it becomes a 4xx)."""
        if req.path == "/healthz":
            return _healthz(req)
        operator: Operator | None = None
        detail: dict[str, Any] = {}
        after: Callable[[], None] | None = None
        try:
            refusal = body_refusal(req)  # before authentication: a body is never read
            if refusal is not None:
                raise refusal
            operator = await self._authenticate(req, detail)
            outcome = await self._route(req, operator)
            response, after = outcome.response, outcome.after
            detail.update(outcome.detail)
        except HttpError as exc:
            response = error_response(
                exc.status, exc.error, exc.hint, _AUTH_HEADERS if exc.status == 401 else ()
            )
            detail.setdefault("reason", exc.error)
        await self._audit(req, operator, response.status, detail)
        if after is not None:
            after()
        return response

    # ------------------------------------------------------------------ authentication
    async def _authenticate(self, req: HttpRequest, detail: dict[str, Any]) -> Operator:
        store = self.agg.store
        if store is None:
            raise HttpError(503, "the aggregator is starting", "retry in a moment")
        values = req.header_values("authorization")
        token: str | None = None
        if len(values) == 1:
            scheme, _, rest = values[0].partition(" ")
            rest = rest.strip()
            if (
                scheme.lower() == "bearer"
                and 0 < len(rest) <= _MAX_TOKEN_CHARS
                and len(rest.split()) == 1
            ):
                token = rest
        if token is None:
            detail["reason"] = "no-token" if not values else "malformed-authorization"
            raise HttpError(401, "operator token required", _ISSUE_HINT)
        try:
            return await asyncio.to_thread(store.authenticate_operator, token, req.remote_address)
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
    async def _route(self, req: HttpRequest, operator: Operator) -> _Outcome:
        segments = req.segments()
        for pattern, (method, name) in _ROUTES.items():
            if len(pattern) != len(segments) or not all(
                p in ("*", s) for p, s in zip(pattern, segments, strict=True)
            ):
                continue
            if req.method != method:
                return _Outcome(
                    error_response(
                        405,
                        f"{req.method} is not allowed here",
                        f"use {method}",
                        (("Allow", method),),
                    ),
                    {"reason": "method not allowed"},
                )
            route: Callable[[HttpRequest, Operator, list[str]], Any] = getattr(self, name)
            result: _Outcome = await route(req, operator, segments)
            return result
        raise HttpError(
            404,
            "no such endpoint",
            "endpoints: GET /healthz, GET /api/v1/status, "
            "GET /api/v1/agents, GET /api/v1/rounds?limit=N, GET /api/v1/model, "
            "POST /api/v1/agents/NAME/revoke, POST /api/v1/shutdown",
        )

    async def _status(self, req: HttpRequest, operator: Operator, segments: list[str]) -> _Outcome:
        from fedstack import __version__

        stats = self.agg.statistics()
        federation = (
            {}
            if stats.name is None
            else {"federation": {"name": stats.name, "peers": list(stats.peers)}}
        )
        return _Outcome(
            json_response(
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

    async def _agents(self, req: HttpRequest, operator: Operator, segments: list[str]) -> _Outcome:
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
        return _Outcome(json_response(200, {"count": len(agents), "agents": agents}))

    async def _rounds(self, req: HttpRequest, operator: Operator, segments: list[str]) -> _Outcome:
        raw = req.query.get("limit", [str(DEFAULT_ROUNDS)])
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
            json_response(200, {"run_id": self.agg.run_id, "count": len(rounds), "rounds": rounds})
        )

    async def _model(self, req: HttpRequest, operator: Operator, segments: list[str]) -> _Outcome:
        store = self.agg.store
        assert store is not None
        try:
            spec = await asyncio.to_thread(store.model_spec, self.agg.run_id)
        except StoreError as exc:
            raise HttpError(503, "the aggregator's store is unavailable", "retry later") from exc
        return _Outcome(json_response(200, spec))

    async def _revoke(self, req: HttpRequest, operator: Operator, segments: list[str]) -> _Outcome:
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
        disconnected = self.agg.disconnect_agent(
            name,
            "revoked",
            f"the credential of agent {name!r} was revoked by an operator",
            {
                "name": name,
                "stage": "operator-revoke",
                "reason": "revoked",
                "operator": operator.name,
            },
        )
        log.warning(
            "operator %s revoked the credential of agent %s%s",
            operator.name,
            name,
            " and disconnected it" if disconnected else "",
        )
        detail.update(changed=changed, disconnected=disconnected)
        return _Outcome(
            json_response(
                200,
                {"name": name, "revoked": True, "changed": changed, "disconnected": disconnected},
            ),
            detail,
        )

    async def _shutdown(
        self, req: HttpRequest, operator: Operator, segments: list[str]
    ) -> _Outcome:
        log.warning(
            "operator %s requested shutdown (the run resumes from the store on restart)",
            operator.name,
        )

        def stop() -> None:  # after the audit event is written, before the answer is sent
            if self._stop_task is None:
                self._stop_task = asyncio.get_running_loop().create_task(self.agg.stop())

        return _Outcome(
            json_response(202, {"status": "stopping", "run_id": self.agg.run_id}), after=stop
        )

    # ------------------------------------------------------------------ audit
    async def _audit(
        self, req: HttpRequest, operator: Operator | None, status: int, detail: dict[str, Any]
    ) -> None:
        outcome = "accepted" if status < 400 else "refused"
        event = {
            "operator": operator.name if operator else detail.pop("name", None),
            "credential": operator.fingerprint if operator else detail.pop("credential", None),
            "address": req.remote_address,
            "method": req.method,
            "path": req.path[:256],
            "status": status,
            "outcome": outcome,
            **detail,
        }
        (log.info if status < 400 else log.warning)(
            "operator API: %s %s from %s (%s) -> %d",
            req.method,
            req.path[:200],
            req.remote_address,
            event["operator"] or "unauthenticated",
            status,
        )
        store = self.agg.store
        if store is None:
            return
        with contextlib.suppress(StoreError):
            if status >= 400:  # refusals: rate-limited per source, a flood is counted
                await self.agg.audit_refusal(AUDIT_KIND, event, address=req.remote_address)
            else:
                await asyncio.to_thread(store.log_event, AUDIT_KIND, event, run_id=self.agg.run_id)


def _healthz(req: HttpRequest) -> HttpResponse:
    if req.method != "GET":
        return error_response(
            405, f"{req.method} is not allowed here", "use GET", (("Allow", "GET"),)
        )
    refusal = body_refusal(req)
    if refusal is not None:
        return refusal.response
    return json_response(200, {"status": "ok"})
