"""The dashboard's routes: server-rendered pages over the store, live updates, actions.

:func:`dashboard_routes` gives the Starlette routes of a dashboard over ``source`` (a
:class:`~fedstack.store.Store`); with ``agg`` (the aggregator serving the operator port)
the dashboard also logs operators in and offers their actions (revoke an agent, stop the
aggregator), and its live view wakes when a round commits instead of polling the store.
Without ``agg`` (``fedstack dashboard --db``) it is read-only and says so.

Pages (HTML, Jinja2 templates with autoescaping: every agent-supplied text -- names,
metric keys, refusal reasons, event details -- is escaped; no template marks any of it
safe)::

    GET  /                              runs, 50 a page (?page=N); compare form
    GET  /compare?run=ID&run=ID         accuracy of several runs on one chart
    GET  /runs/{run_id}                 a run: charts, rounds newest first (?page=N)
    GET  /runs/{run_id}/series          chart data (JSON): at most SERIES_POINTS rounds
    GET  /runs/{run_id}/events          server-sent events: ``round`` per committed round
    GET  /runs/{run_id}/agents          agents (?page=N)
    GET  /runs/{run_id}/aggregators     federation members and semi-global models
    GET  /models/{model_id}             a model's lineage (?page=N over its inputs)
    GET  /audit?kind=&agent=&run=&page= the audit trail, filtered
    GET  /login, POST /login, POST /logout
    POST /actions/agents/{name}/revoke  revoke an agent's credential, disconnect it
    POST /actions/stop                  stop the aggregator (the run resumes on restart)
    GET  /static/...                    the one script, the one style sheet, uPlot

Every list is read a page at a time from the store (LIMIT/OFFSET queries of
:mod:`fedstack.store.queries`); charts read at most :data:`SERIES_POINTS` rounds spread
over the run. Every answer carries :data:`CSP` (no inline script or style, no other
host). Every POST needs the session's CSRF token (403 otherwise); logins, failed logins
and actions are ``operator_api`` audit events written through
:meth:`~fedstack.operator.api.OperatorAPI.audit`, as the operator API's calls are.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import ipaddress
import logging
import math
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, quote, urlencode

import jinja2
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fedstack.errors import StoreError
from fedstack.transport.http import HttpError, json_bytes

from .sessions import COOKIE, Session, Sessions

if TYPE_CHECKING:
    from fedstack.aggregator.service import Aggregator
    from fedstack.operator.api import OperatorAPI
    from fedstack.security.credentials import Operator
    from fedstack.store import Store

__all__ = [
    "CSP",
    "PAGE_SIZE",
    "SERIES_POINTS",
    "Dashboard",
    "dashboard_middleware",
    "dashboard_routes",
]

log = logging.getLogger("fedstack.dashboard")

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
"""The content security policy of every dashboard answer."""
PAGE_SIZE = 50
"""Rows of a table page."""
LINEAGE_PAGE = 100
"""Inputs of a model shown a page at a time."""
LINEAGE_NESTED = 20
"""Inputs shown under each semi-global input of a model."""
SERIES_POINTS = 1000
"""Rounds a chart reads at most (every k-th round of a longer run, the latest always)."""
MAX_COMPARE = 8
"""Runs one comparison chart shows at most."""
MAX_PAGE = 10_000_000
MAX_FORM_BYTES = 4096
LIVE_POLL = 0.5
"""Seconds between store reads of a live view without an aggregator to wake it."""
KEEPALIVE = 15.0
"""Seconds between comments on an idle event stream (proxies close silent ones)."""
ACCURACY_KEYS = (
    "eval_accuracy",
    "accuracy",
    "global_accuracy",
    "mean_global_accuracy",
    "mean_local_accuracy",
)
"""The round metric charted as accuracy: the first of these a round has."""
LOSS_KEYS = ("eval_loss", "loss", "mean_train_loss")
"""The round metric charted as loss: the first of these a round has."""

_NOT_OURS = ("/api", "/healthz")  # the operator surface's own paths (with /api/, /metrics)
MAX_STREAMS = 64
"""Open live views (event streams) of one dashboard; more get 503 (a connection each: the
operator port's connection cap must keep room for /healthz, the API and pages)."""
MAX_STREAMS_PER_HOST = 8
"""Open live views from one client host."""

_PAGES = ("/", "/compare", "/audit", "/login", "/logout")
_PREFIXES = ("/runs/", "/models/", "/actions/", "/static/")
_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_STATIC = Path(__file__).parent / "static"
_HTML_HEADERS = {"Content-Security-Policy": CSP, "Cache-Control": "no-store"}


class Refusal(Exception):
    """A request the dashboard answers with an error page."""

    def __init__(
        self, status: int, message: str, hint: str = "", operator: Operator | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.hint = hint
        self.operator = operator  # who was refused, if known


# ---------------------------------------------------------------------- formatting
def when(ts: float | None) -> str:
    """A stored wall-clock time as ``YYYY-MM-DD HH:MM:SS`` UTC (``-``: none)."""
    if ts is None or not isinstance(ts, int | float) or not math.isfinite(ts):
        return "-"
    try:
        return dt.datetime.fromtimestamp(float(ts), dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
    except (OverflowError, OSError, ValueError):
        return "-"


def num(value: Any) -> str:
    """A metric value for a table cell."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)[:200]


def pick(metrics: Mapping[str, Any] | None, keys: tuple[str, ...]) -> float | None:
    """The first of ``keys`` in ``metrics`` holding a finite number."""
    if not isinstance(metrics, Mapping):
        return None
    for k in keys:
        v = metrics.get(k)
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
            return float(v)
    return None


def round_json(row: Mapping[str, Any]) -> dict[str, Any]:
    """A round row as the live view and the charts get it."""
    metrics = row.get("metrics") if isinstance(row.get("metrics"), Mapping) else {}
    return {
        "round": row["round"],
        "finished": row.get("finished"),
        "finished_text": when(row.get("finished")),
        "seconds": row.get("seconds"),
        "num_updates": row.get("num_updates"),
        "num_samples": row.get("num_samples"),
        "model_id": row.get("model_id"),
        "accuracy": pick(metrics, ACCURACY_KEYS),
        "loss": pick(metrics, LOSS_KEYS),
        "dp_epsilon": pick(metrics, ("dp_epsilon",)),
        "metrics": metrics,
    }


def privacy_spent(
    config: Mapping[str, Any], latest: Mapping[str, Any] | None
) -> dict[str, str] | None:
    """What a run with central differential privacy has spent (None: no DP): epsilon of
    its latest round at its delta, and its budget (plain text: the template escapes it)."""
    metrics = latest.get("metrics") if latest is not None else None
    metrics = metrics if isinstance(metrics, Mapping) else {}
    if config.get("dp") != "central" and pick(metrics, ("dp_epsilon",)) is None:
        return None
    eps = pick(metrics, ("dp_epsilon",))
    delta = pick(metrics, ("dp_delta",))
    if delta is None:
        delta = pick(config, ("dp_delta",))
    budget = pick(metrics, ("dp_epsilon_budget",))
    if budget is None:
        budget = pick(config, ("dp_epsilon_budget",))
    return {
        "epsilon": num(eps) if eps is not None else ("0" if latest is None else "inf"),
        "delta": num(delta),
        "budget": num(budget) if budget is not None else "",
    }


def metrics_text(metrics: Any, limit: int = 12) -> str:
    """``key=value`` pairs of a metrics mapping (plain text: the template escapes it)."""
    if not isinstance(metrics, Mapping):
        return ""
    items = list(metrics.items())
    shown = ", ".join(f"{str(k)[:64]}={num(v)}" for k, v in items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def detail_text(detail: Any, limit: int = 600) -> str:
    """An event's detail as compact JSON text, cut to ``limit`` characters."""
    text = json_bytes(detail).decode()
    return text if len(text) <= limit else text[:limit] + "..."


@dataclass(frozen=True)
class Pager:
    """One page of a list: ``page`` (1-based) of ``pages``, over ``total`` rows."""

    page: int
    total: int
    size: int
    param: str = "page"

    @property
    def pages(self) -> int:
        return max(1, -(-self.total // self.size))

    @property
    def offset(self) -> int:
        return (self.page - 1) * self.size

    @property
    def has_next(self) -> bool:
        return self.page < self.pages

    @property
    def has_prev(self) -> bool:
        return self.page > 1


def page_number(request: Request, param: str = "page") -> int:
    """The 1-based page number of query parameter ``param`` (1 if absent).

    Raises:
        Refusal: 400, not a number in 1..MAX_PAGE or repeated.
    """
    raw = request.query_params.getlist(param)
    if not raw:
        return 1
    if (
        len(raw) > 1
        or not (raw[0].isascii() and raw[0].isdigit())
        or len(raw[0]) > 8
        or not 1 <= int(raw[0]) <= MAX_PAGE
    ):
        raise Refusal(400, f"bad {param} number", f"{param} is a whole number from 1")
    return int(raw[0])


def pager(request: Request, total: int, size: int = PAGE_SIZE, param: str = "page") -> Pager:
    """The :class:`Pager` of a request over ``total`` rows.

    Raises:
        Refusal: 400 (bad number), 404 (past the last page).
    """
    p = Pager(page_number(request, param), total, size, param)
    if p.page > p.pages:
        raise Refusal(404, f"no page {p.page}", f"there are {p.pages} pages")
    return p


def page_url(request: Request, pg: Pager, page: int) -> str:
    """This request's URL with ``pg``'s parameter set to ``page``."""
    items = [(k, v) for k, v in request.query_params.multi_items() if k != pg.param]
    items.append((pg.param, str(page)))
    return f"{request.url.path}?{urlencode(items)}"


def check_id(value: str) -> str:
    """A run or model id from a path (404 unless it looks like one)."""
    if not _ID.fullmatch(value):
        raise Refusal(404, "no such run or model")
    return value


def _address(request: Request) -> str:
    client = request.client
    return "" if client is None else f"{client.host}:{client.port}"


def _safe_next(value: str | None, default: str) -> str:
    """A local path to go back to after a form (anything else: ``default``)."""
    if (
        value
        and value.startswith("/")
        and not value.startswith("//")
        and "\\" not in value
        and len(value) <= 512
        and value.isprintable()
    ):
        return value
    return default


def _asset_version() -> str:
    """A digest of the static files: their URLs change when they do (they are cached)."""
    h = hashlib.blake2b(digest_size=6)
    for path in sorted(_STATIC.rglob("*")):
        if path.is_file():
            h.update(path.name.encode())
            h.update(path.read_bytes())
    return h.hexdigest()


class Dashboard:
    """The dashboard over ``store`` (see the module docstring).

    Args:
        store: the store to read (the aggregator's, or one opened read-only).
        agg: the aggregator whose operator port serves the dashboard (None: read-only).
        live_poll: seconds between store reads of a live view not woken by ``agg``.
        views_need_login: every view, not only the actions, needs an operator's session
            (pages redirect to ``/login``, data and event streams answer 401): what an
            aggregator does when its operator port listens beyond loopback, where agent
            names and addresses must not be shown to whoever reaches the port.
    """

    def __init__(
        self,
        store: Store,
        *,
        agg: Aggregator | None = None,
        live_poll: float = LIVE_POLL,
        views_need_login: bool = False,
    ) -> None:
        self.store = store
        self.agg = agg
        self.views_need_login = views_need_login
        self._streams = 0  # open live views (server-sent event streams)
        self._streams_by_host: dict[str, int] = {}
        self.live_poll = live_poll
        self.sessions = Sessions()
        self.api: OperatorAPI | None = None
        self._stop_task: asyncio.Task[None] | None = None
        self._closed: asyncio.Event | None = None
        if agg is not None:
            from fedstack.operator.api import OperatorAPI

            self.api = OperatorAPI(agg)
        self.env = jinja2.Environment(
            loader=jinja2.PackageLoader("fedstack.dashboard", "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.env.filters.update(when=when, num=num, metrics_text=metrics_text)
        self.env.filters["detail_text"] = detail_text
        self.env.filters["pathquote"] = lambda v: quote(str(v), safe="")
        self.env.globals.update(asset_version=_asset_version())

    @property
    def read_only(self) -> bool:
        return self.agg is None

    @property
    def closed(self) -> bool:
        return self._closed is not None and self._closed.is_set()

    def close(self) -> None:
        """End the live views' event streams (before the server stops: a server waits
        for the answers under way, and a stream never ends by itself)."""
        if self._closed is None:
            self._closed = asyncio.Event()
        self._closed.set()

    async def _wait_closed(self, seconds: float) -> None:
        if self._closed is None:
            self._closed = asyncio.Event()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closed.wait(), seconds)

    # ------------------------------------------------------------------ plumbing
    def routes(self) -> list[BaseRoute]:
        v, o = self._view, self._open_view
        return [
            Route("/", v(self.runs), methods=["GET"]),
            Route("/compare", v(self.compare), methods=["GET"]),
            Route("/runs/{run_id}", v(self.run), methods=["GET"]),
            Route("/runs/{run_id}/series", v(self.series), methods=["GET"]),
            Route("/runs/{run_id}/events", v(self.events), methods=["GET"]),
            Route("/runs/{run_id}/agents", v(self.agents), methods=["GET"]),
            Route("/runs/{run_id}/aggregators", v(self.aggregators), methods=["GET"]),
            Route("/models/{model_id}", v(self.lineage), methods=["GET"]),
            Route("/audit", v(self.audit), methods=["GET"]),
            Route("/login", o(self.login_form), methods=["GET"]),
            Route("/login", o(self.login), methods=["POST"]),
            Route("/logout", o(self.logout), methods=["POST"]),
            Route("/actions/stop", v(self.stop), methods=["POST"]),
            Route("/actions/agents/{rest:path}", v(self.revoke), methods=["POST"]),
            Mount("/static", app=StaticFiles(directory=_STATIC), name="static"),
        ]

    def _view(
        self, handler: Callable[[Request], Awaitable[Response]]
    ) -> Callable[[Request], Awaitable[Response]]:
        """A view (with ``views_need_login``: only for a logged-in operator)."""
        inner = self._open_view(handler)

        async def view(request: Request) -> Response:
            if self.views_need_login and not await self._operator_session(request):
                if request.method == "GET" and not request.url.path.endswith(
                    ("/series", "/events")
                ):  # a page: to the login form
                    return RedirectResponse("/login", 303, headers={"Cache-Control": "no-store"})
                return self.error(request, 401, "log in first", "an operator token, at /login")
            return await inner(request)

        return view

    async def _operator_session(self, request: Request) -> bool:
        """Whether the request comes with the session of a logged-in operator whose
        credential is still valid (a revoked one's sessions end here too)."""
        session = self.session(request)
        operator = session.operator if session is not None else None
        return operator is not None and await self._still_valid(operator)

    async def _still_valid(self, operator: Operator) -> bool:
        """Whether ``operator``'s credential is still the stored, unrevoked one (if not,
        its sessions end)."""
        status = await self.db(self.store.credential_status, [operator.operator_id])
        stored, revoked = status.get(operator.operator_id, (None, True))
        if revoked or stored != operator.credential:
            self.sessions.end_operator(operator.operator_id)
            return False
        return True

    def _open_view(
        self, handler: Callable[[Request], Awaitable[Response]]
    ) -> Callable[[Request], Awaitable[Response]]:
        async def view(request: Request) -> Response:
            try:
                return await handler(request)
            except Refusal as exc:
                return self.error(request, exc.status, exc.message, exc.hint)
            except StoreError as exc:
                log.error("dashboard: %s %s: store: %s", request.method, request.url.path, exc)
                return self.error(request, 503, "the store is unavailable", "retry later")

        return view

    def session(self, request: Request) -> Session | None:
        return self.sessions.get(request.cookies.get(COOKIE))

    def render(
        self,
        request: Request,
        template: str,
        status: int = 200,
        *,
        session: Session | None = None,
        new_session: bool = False,
        **context: Any,
    ) -> Response:
        if session is None:
            session = self.session(request)
        pg = context.get("pager")
        if isinstance(pg, Pager) and "next_url" not in context:  # the table's page links
            context["next_url"] = page_url(request, pg, pg.page + 1)
            context["prev_url"] = page_url(request, pg, pg.page - 1)
        body = self.env.get_template(template).render(
            request_path=request.url.path,
            session=session,
            operator=session.operator if session is not None else None,
            csrf=session.csrf if session is not None else "",
            read_only=self.read_only,
            live_run_id=self.agg.run_id if self.agg is not None else None,
            **context,
        )
        response = HTMLResponse(body, status, headers=_HTML_HEADERS)
        if new_session and session is not None:
            self._set_cookie(request, response, session)
        return response

    def _set_cookie(self, request: Request, response: Response, session: Session) -> None:
        response.set_cookie(
            COOKIE,
            self.sessions.cookie_value(session),
            path="/",
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )

    def error(self, request: Request, status: int, message: str, hint: str = "") -> Response:
        return self.render(request, "error.html", status, message=message, hint=hint)

    async def db(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return await asyncio.to_thread(fn, *args, **kwargs)

    async def _run_row(self, run_id: str) -> dict[str, Any]:
        run = await self.db(self.store.run, check_id(run_id))
        if run is None:
            raise Refusal(404, "no such run", "the runs page lists them")
        return dict(run)

    def _is_live(self, run_id: str) -> bool:
        return self.agg is not None and self.agg.run_id == run_id

    # ------------------------------------------------------------------ pages
    async def runs(self, request: Request) -> Response:
        total = await self.db(self.store.count_runs)
        pg = pager(request, total)
        rows = await self.db(self.store.runs_page, pg.offset, pg.size)
        for r in rows:
            last = r["last_round"]
            r["accuracy"] = pick(last["metrics"], ACCURACY_KEYS) if last else None
            cfg = r["config"] if isinstance(r["config"], Mapping) else {}
            r["strategy"] = str(cfg.get("strategy", "-"))
            r["live"] = self._is_live(r["id"])
        return self.render(
            request,
            "runs.html",
            runs=rows,
            pager=pg,
        )

    async def compare(self, request: Request) -> Response:
        ids = request.query_params.getlist("run")
        if not ids:
            raise Refusal(400, "no run to compare", "tick runs on the runs page")
        if len(ids) > MAX_COMPARE:
            raise Refusal(400, "too many runs", f"compare at most {MAX_COMPARE} runs")
        runs = []
        for rid in dict.fromkeys(ids):
            runs.append(await self._run_row(rid))
        return self.render(request, "compare.html", runs=runs)

    async def run(self, request: Request) -> Response:
        run = await self._run_row(request.path_params["run_id"])
        rid = run["id"]
        total = await self.db(self.store.count_rounds, rid)
        pg = pager(request, total)
        rows = [
            round_json(r) for r in await self.db(self.store.rounds_page, rid, pg.offset, pg.size)
        ]
        latest = rows[0] if rows and pg.page == 1 else None
        if latest is None and total:
            top = await self.db(self.store.rounds_page, rid, 0, 1)
            latest = round_json(top[0]) if top else None
        version = run["version"]
        live = self._is_live(rid)
        if live and self.agg is not None:
            version = max(version, self.agg.state.version)
        cfg = run["config"] if isinstance(run["config"], Mapping) else {}
        privacy = privacy_spent(cfg, latest)
        return self.render(
            request,
            "run.html",
            run=run,
            strategy=str(cfg.get("strategy", "-")),
            dp=privacy is not None,
            privacy=privacy,
            rounds=rows,
            total=total,
            latest=latest,
            last_round=latest["round"] if latest else 0,
            version=version,
            live=live,
            pager=pg,
        )

    async def series(self, request: Request) -> Response:
        run = await self._run_row(request.path_params["run_id"])
        rows = await self.db(self.store.round_series, run["id"], SERIES_POINTS)
        payload = {
            "run": run["id"],
            "name": run["name"],
            "rounds": [round_json(r) for r in rows],
        }
        return Response(
            json_bytes(payload),
            200,
            {"Cache-Control": "no-store", "Content-Security-Policy": CSP},
            "application/json",
        )

    async def events(self, request: Request) -> Response:
        run = await self._run_row(request.path_params["run_id"])
        rid = run["id"]
        raw = request.query_params.get("after")
        if raw is None:
            top = await self.db(self.store.rounds_page, rid, 0, 1)
            after = int(top[0]["round"]) if top else 0
        elif raw.isascii() and raw.isdigit() and len(raw) <= 10:
            after = int(raw)
        else:
            raise Refusal(400, "bad after", "after is a round number")
        host = request.client.host if request.client is not None else ""
        if (
            self._streams >= MAX_STREAMS
            or self._streams_by_host.get(host, 0) >= MAX_STREAMS_PER_HOST
        ):
            raise Refusal(
                503,
                "too many live views open",
                f"at most {MAX_STREAMS_PER_HOST} per host and {MAX_STREAMS} in all: close some",
            )
        return EventStream(
            self._counted(host, self._stream(rid, after)),
            200,
            {
                "Cache-Control": "no-store",
                "X-Accel-Buffering": "no",
                "Content-Security-Policy": CSP,
            },
            media_type="text/event-stream",
        )

    async def _counted(self, host: str, stream: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        """``stream``, counted among the open live views (total and per host) while open."""
        self._streams += 1
        self._streams_by_host[host] = self._streams_by_host.get(host, 0) + 1
        try:
            async for chunk in stream:
                yield chunk
        finally:
            self._streams -= 1
            left = self._streams_by_host[host] - 1
            if left:
                self._streams_by_host[host] = left
            else:
                del self._streams_by_host[host]

    async def _stream(self, run_id: str, after: int) -> AsyncIterator[bytes]:
        """``round`` events for each round above ``after`` as they are committed."""
        from fedstack.errors import ConnectionClosed

        yield b"retry: 2000\n\n"
        last = after
        loop = asyncio.get_running_loop()
        quiet_since = loop.time()
        while True:
            try:
                rows = await self.db(self.store.rounds_page, run_id, 0, 100, after=last)
            except StoreError as exc:
                log.warning("dashboard: live view of run %s: store: %s", run_id, exc)
                rows = []
            for r in rows:
                last = int(r["round"])
                yield b"event: round\ndata: " + json_bytes(round_json(r)) + b"\n\n"
            if rows:
                quiet_since = loop.time()
                if len(rows) == 100:
                    continue
            elif loop.time() - quiet_since >= KEEPALIVE:
                quiet_since = loop.time()
                yield b": keep-alive\n\n"
            agg = self.agg
            if self.closed or (agg is not None and agg.stopped):
                return
            if agg is not None and agg.run_id == run_id:
                if agg.state.version > last:
                    # versions without a round row of their own (none in a standalone
                    # run; a federation member's view of the global version): poll
                    await self._wait_closed(self.live_poll)
                    continue
                try:
                    await asyncio.wait_for(agg.wait_for_version(last + 1), KEEPALIVE)
                except TimeoutError:
                    pass
                except ConnectionClosed:  # the aggregator stopped
                    return
            else:
                await self._wait_closed(self.live_poll)

    async def agents(self, request: Request) -> Response:
        run = await self._run_row(request.path_params["run_id"])
        rid = run["id"]
        total = await self.db(self.store.count_run_agents)
        pg = pager(request, total)
        rows = await self.db(self.store.agents_page, rid, pg.offset, pg.size)
        live = self._is_live(rid)
        connected: dict[str, Any] = {}
        if live and self.agg is not None:
            connected = {a.name: a for a in self.agg.statistics(agents=True).agents}
        for r in rows:
            a = connected.get(r["name"])
            if live:
                r["online"] = a is not None
            else:
                r["online"] = run["status"] == "running" and r["presence"] == "joined"
            r["seen"] = a.last_seen if a is not None else r["last_seen"]
            r["addr"] = a.address if a is not None else r["last_address"]
            up = r["uploads"]
            r["aggregated"] = len(r["rounds"])
            r["total_uploads"] = sum(v for k, v in up.items() if k != "initial")
            r["recent"] = r["rounds"][-8:]
        return self.render(
            request,
            "agents.html",
            run=run,
            agents=rows,
            live=live,
            pager=pg,
        )

    async def aggregators(self, request: Request) -> Response:
        run = await self._run_row(request.path_params["run_id"])
        rid = run["id"]
        members_total = await self.db(self.store.count_aggregators, rid)
        mpg = pager(request, members_total, param="page")
        members = await self.db(self.store.aggregators_page, rid, mpg.offset, mpg.size)
        semi_total = await self.db(self.store.count_cluster_rounds, rid)
        spg = pager(request, semi_total, param="rounds_page")
        semis = await self.db(self.store.cluster_rounds_page, rid, spg.offset, spg.size)
        live_stats = None
        if self._is_live(rid) and self.agg is not None:
            live_stats = self.agg.statistics()
        return self.render(
            request,
            "aggregators.html",
            run=run,
            members=members,
            semis=semis,
            live_stats=live_stats,
            pager=mpg,
            spager=spg,
            next_url=page_url(request, mpg, mpg.page + 1),
            prev_url=page_url(request, mpg, mpg.page - 1),
            snext_url=page_url(request, spg, spg.page + 1),
            sprev_url=page_url(request, spg, spg.page - 1),
        )

    async def lineage(self, request: Request) -> Response:
        model_id = check_id(request.path_params["model_id"])
        model = await self.db(self.store.model, model_id)
        if model is None:
            raise Refusal(404, "no such model", "the run page links its global models")
        total = await self.db(self.store.count_parents, model_id)
        pg = pager(request, total, size=LINEAGE_PAGE)
        parents = await self.db(self.store.parents_page, model_id, pg.offset, pg.size)
        base = [p for p in parents if p["relation"] == "base"]
        inputs = [p for p in parents if p["relation"] != "base"]
        for p in inputs:
            p["children"] = []
            p["more"] = 0
            if p["kind"] == "semi-global":
                n = await self.db(self.store.count_parents, p["id"])
                kids = await self.db(self.store.parents_page, p["id"], 0, LINEAGE_NESTED)
                p["children"] = [k for k in kids if k["relation"] != "base"]
                p["more"] = max(0, n - len(kids))
        evaluation = None  # a global model: its round's metrics (the evaluator's)
        if model["kind"] == "cluster":
            row = await self.db(self.store.round_row, model["run_id"], int(model["round"]))
            if row is not None and row["model_id"] == model_id:
                evaluation = row["metrics"]
        producer = model.get("agent")
        if producer is None:
            names = await self.db(self.store.aggregator_names)
            producer = names.get(model["producer"])
        return self.render(
            request,
            "lineage.html",
            model=model,
            evaluation=evaluation,
            producer=producer,
            base=base,
            inputs=inputs,
            pager=pg,
        )

    async def audit(self, request: Request) -> Response:
        q = request.query_params
        for key in ("kind", "agent", "run"):
            if len(q.getlist(key)) > 1:
                raise Refusal(400, f"{key} given twice")
        kind = q.get("kind", "").strip()
        agent = q.get("agent", "").strip()
        run_id = q.get("run", "").strip()
        if len(kind) > 32 or len(agent) > 128 or len(run_id) > 64:
            raise Refusal(400, "filter too long")
        kinds = await self.db(self.store.event_kinds)
        agent_id: str | None = None
        unknown_agent = False
        if agent:
            found = await self.db(self.store.agent_by_name, agent)
            if found is None:
                unknown_agent = True
            else:
                agent_id = found["id"]
        if unknown_agent:
            total, rows = 0, []
            pg = pager(request, 0)
        else:
            total = await self.db(
                self.store.count_events, kind=kind or None, agent_id=agent_id, run_id=run_id or None
            )
            pg = pager(request, total)
            rows = await self.db(
                self.store.events_page,
                pg.offset,
                pg.size,
                kind=kind or None,
                agent_id=agent_id,
                run_id=run_id or None,
            )
        return self.render(
            request,
            "audit.html",
            events=rows,
            kinds=kinds,
            kind=kind,
            agent=agent,
            run_filter=run_id,
            unknown_agent=unknown_agent,
            total=total,
            pager=pg,
        )

    # ------------------------------------------------------------------ login
    async def login_form(self, request: Request) -> Response:
        session = self.session(request)
        new = False
        if session is None and not self.read_only:
            session, new = self.sessions.new(_address(request)), True
        return self.render(request, "login.html", session=session, new_session=new, failed=False)

    async def _form(self, request: Request) -> dict[str, str]:
        """The url-encoded form of a POST (bounded; one value per field)."""
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/x-www-form-urlencoded":
            raise Refusal(415, "a form is expected", "post the page's form")
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_FORM_BYTES:
                raise Refusal(413, "form too large")
        try:
            parsed = parse_qs(
                body.decode("utf-8"),
                keep_blank_values=True,
                max_num_fields=10,
                strict_parsing=False,
            )
        except (UnicodeDecodeError, ValueError):
            raise Refusal(400, "malformed form") from None
        return {k: v[0] for k, v in parsed.items() if len(v) == 1}

    def _check_csrf(self, session: Session | None, form: Mapping[str, str]) -> None:
        if not self.sessions.check_csrf(session, form.get("csrf")):
            raise Refusal(
                403,
                "the form's security token is missing or stale",
                "reload the page and submit its form again",
            )

    async def _audit(
        self,
        request: Request,
        operator: Operator | None,
        response: Response,
        detail: dict[str, Any],
    ) -> None:
        if self.api is not None:
            path = request.url.path
            await self.api.audit(
                request.method,
                path,
                _address(request),
                operator,
                response,
                {**detail, "via": "dashboard"},
            )

    async def login(self, request: Request) -> Response:
        if self.read_only or self.api is None:
            raise Refusal(
                403,
                "this dashboard is read-only",
                "operators log in on the dashboard of the aggregator's operator port",
            )
        form = await self._form(request)
        session = self.session(request)
        self._check_csrf(session, form)
        assert session is not None
        token = form.get("token", "")
        detail: dict[str, Any] = {"action": "login"}
        address = _address(request)
        try:
            operator = await self.api.authenticate(
                [f"Bearer {token}"] if token else [], address, detail
            )
        except HttpError as exc:
            detail.setdefault("reason", exc.error)
            response = self.render(
                request,
                "login.html",
                401 if exc.status in (401, 403) else exc.status,
                session=session,
                failed=True,
                error=exc.error,
            )
            await self._audit(request, None, response, detail)
            return response
        fresh = self.sessions.login(session, operator, address)
        response = RedirectResponse("/", 303, headers={"Cache-Control": "no-store"})
        self._set_cookie(request, response, fresh)
        await self._audit(request, operator, response, detail)
        log.info("dashboard: operator %s logged in from %s", operator.name, address)
        return response

    async def logout(self, request: Request) -> Response:
        form = await self._form(request)
        session = self.session(request)
        self._check_csrf(session, form)
        assert session is not None
        self.sessions.end(session)
        response = RedirectResponse("/", 303, headers={"Cache-Control": "no-store"})
        response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")
        return response

    # ------------------------------------------------------------------ actions
    async def _operator(
        self, request: Request, detail: dict[str, Any]
    ) -> tuple[Operator, dict[str, str]]:
        """The logged-in operator of an action POST and its form; a refused action is an
        audit event (``detail`` and the reason).

        Raises:
            Refusal: 403 (read-only, no CSRF token, not logged in, credential revoked).
        """
        try:
            return await self._check_operator(request)
        except Refusal as exc:
            session = self.session(request)
            response = self.error(request, exc.status, exc.message, exc.hint)
            operator = exc.operator or (session.operator if session is not None else None)
            await self._audit(request, operator, response, {**detail, "reason": exc.message})
            raise

    async def _check_operator(self, request: Request) -> tuple[Operator, dict[str, str]]:
        if self.read_only:
            raise Refusal(403, "this dashboard is read-only", "actions need an aggregator")
        form = await self._form(request)
        session = self.session(request)
        self._check_csrf(session, form)
        assert session is not None
        operator = session.operator
        if operator is None:
            raise Refusal(403, "log in first", "operators log in with their token")
        if not await self._still_valid(operator):
            raise Refusal(403, "this operator credential was revoked", "log in again", operator)
        return operator, form

    async def revoke(self, request: Request) -> Response:
        rest = request.path_params["rest"]
        if not rest.endswith("/revoke"):
            raise Refusal(404, "no such action")
        name = rest[: -len("/revoke")]
        detail: dict[str, Any] = {"action": "revoke", "target": name[:128]}
        operator, form = await self._operator(request, detail)
        agg = self.agg
        assert agg is not None
        known = await self.db(self.store.agent_by_name, name) if len(name) <= 128 else None
        if known is None or known.get("role") != "agent":
            response = self.error(request, 404, "no such agent")
            detail["reason"] = "unknown agent"
            await self._audit(request, operator, response, detail)
            return response
        changed = await self.db(self.store.revoke_credential, name, role="agent")
        from fedstack.operator.api import disconnect_revoked

        disconnected = disconnect_revoked(agg, name, operator, "from the dashboard")
        detail.update(changed=changed, disconnected=disconnected)
        back = _safe_next(form.get("next"), f"/runs/{agg.run_id}/agents")
        response = RedirectResponse(back, 303, headers={"Cache-Control": "no-store"})
        await self._audit(request, operator, response, detail)
        return response

    async def stop(self, request: Request) -> Response:
        operator, _ = await self._operator(request, {"action": "stop"})
        agg = self.agg
        assert agg is not None
        log.warning(
            "operator %s stopped the aggregator from the dashboard (the run resumes from "
            "the store on restart)",
            operator.name,
        )
        response = self.render(request, "stopping.html", 202, run_id=agg.run_id)
        await self._audit(request, operator, response, {"action": "stop"})
        if self._stop_task is None:
            self._stop_task = asyncio.get_running_loop().create_task(agg.stop())
        return response


class EventStream(StreamingResponse):
    """A server-sent event stream that ends when the client goes away.

    (Starlette's :class:`StreamingResponse` stops listening for the client's disconnect
    under ASGI 2.4 servers such as uvicorn, and a live view that has nothing to send
    would then run until the server stops.)
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def listen() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        streaming = asyncio.ensure_future(self.stream_response(send))
        listening = asyncio.ensure_future(listen())
        try:
            done, _ = await asyncio.wait(
                {streaming, listening}, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for task in (streaming, listening):
                task.cancel()
            for task in (streaming, listening):
                with contextlib.suppress(asyncio.CancelledError, OSError):
                    await task
        if streaming in done and not streaming.cancelled():
            with contextlib.suppress(OSError):  # the client went away mid-write
                streaming.result()


class DashboardHeaders:
    """ASGI middleware: :data:`CSP` on every answer outside ``/api``, ``/metrics`` and
    ``/healthz`` that has no policy of its own (static files, the application's error pages).

    With ``loopback_only`` (the server listens on a loopback address), a request for the
    dashboard whose ``Host`` is not a loopback name (``localhost``, ``127.x.y.z``,
    ``[::1]``) is refused with 421: a web page elsewhere cannot point a name of its own
    at 127.0.0.1 (DNS rebinding) and read the pages through the visitor's browser.
    """

    def __init__(self, app: ASGIApp, loopback_only: bool = False) -> None:
        self.app = app
        self.loopback_only = loopback_only

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if scope["type"] != "http" or path.startswith(("/api/", "/metrics")) or path in _NOT_OURS:
            await self.app(scope, receive, send)
            return
        if self.loopback_only and _ours(path) and not _loopback_host(scope):
            refusal = Response(
                "this dashboard answers for localhost, 127.0.0.1 or [::1] only\n",
                421,
                {"Content-Security-Policy": CSP, "Cache-Control": "no-store"},
                "text/plain",
            )
            await refusal(scope, receive, send)
            return
        static = path.startswith("/static/")

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {k.lower() for k, _ in headers}
                if b"content-security-policy" not in present:
                    headers.append((b"content-security-policy", CSP.encode()))
                if static and b"cache-control" not in present:
                    headers.append((b"cache-control", b"public, max-age=3600"))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, with_headers)


def _ours(path: str) -> bool:
    """Whether ``path`` is one of the dashboard's (others: the application's 404)."""
    return path in _PAGES or path.startswith(_PREFIXES)


def _loopback_host(scope: Scope) -> bool:
    """Whether the request's ``Host`` header names this machine's loopback interface."""
    hosts = [v for k, v in scope.get("headers", []) if k.lower() == b"host"]
    if len(hosts) != 1:
        return False
    host = hosts[0].decode("latin-1").strip().lower()
    if host.startswith("["):  # [v6]:port
        name = host[1 : host.find("]")] if "]" in host else ""
    else:
        name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    if name in ("localhost", "localhost.") or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def is_loopback(host: str) -> bool:
    """Whether the listening address ``host`` is a loopback one."""
    if host in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def dashboard_routes(
    source: Store, *, agg: Aggregator | None = None, host: str | None = None
) -> list[BaseRoute]:
    """The dashboard's routes over the store ``source`` (with ``agg``: logins, actions,
    live views woken by its commits; without: read-only). With ``agg`` served on ``host``
    and that not a loopback address, every view needs an operator's login."""
    need = views_need_login(agg is not None, host)
    return Dashboard(source, agg=agg, views_need_login=need).routes()


def views_need_login(actions: bool, host: str | None) -> bool:
    """Whether every view needs an operator's login: on a dashboard with actions (an
    aggregator's) listening on ``host`` beyond loopback."""
    return actions and host is not None and not is_loopback(host)


def dashboard_middleware(host: str | None = None) -> list[Middleware]:
    """The dashboard's ASGI middleware: its content security policy on every answer
    outside the operator API and the metrics; when the server listens on ``host`` and
    that is a loopback address, only requests for a loopback ``Host`` (see
    :class:`DashboardHeaders`)."""
    return [Middleware(DashboardHeaders, loopback_only=host is not None and is_loopback(host))]
