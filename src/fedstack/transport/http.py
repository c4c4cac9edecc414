"""Plain HTTP/1.1 on the agents' port: request heads parsed by h11, ``/healthz``, refusals.

The agents' port answers WebSocket upgrades (agents) and one plain request: ``GET
/healthz`` (:func:`health_handler`); the operator surface (API, metrics) has its own port
(:mod:`fedstack.operator`). One :class:`RequestReader` per connection feeds the received
bytes to an ``h11`` server connection until the request head is complete;
:mod:`fedstack.transport.ws` then either hands it to the WebSocket handshake or to the
HTTP handler. On top of h11's RFC 9112 parsing, this module enforces fedstack's narrower
rules:

- one request per connection, answered with ``Connection: close``;
- methods are upper-case tokens; only HTTP/1.0 and 1.1; targets in origin form
  (``/path?query``) or absolute form; at most :data:`MAX_HEADERS` fields, 16 KiB of head
  and :data:`MAX_QUERY_FIELDS` query fields; no control characters in field values; at
  most one ``Content-Length`` field (h11 would merge equal ones);
- no request bodies: :func:`body_refusal` gives the 411 (chunked) or 413 (any
  ``Content-Length`` above 0) answer, and the transport never reads a body;
- everything malformed raises :class:`HttpError`, which carries its own 4xx answer.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import h11

MAX_HEADERS = 100
MAX_HEAD_BYTES = 16 * 1024
MAX_QUERY_FIELDS = 20
MAX_BODY_BYTES = 0
"""Request bodies accepted (none)."""

_METHOD = re.compile(r"[A-Z]{1,16}")
_HEAD_END = re.compile(rb"\n\r?\n")
_BAD_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_CONTENT_LENGTH_LINE = re.compile(rb"^content-length[ \t]*:", re.IGNORECASE | re.MULTILINE)


@dataclass(frozen=True, slots=True)
class HttpResponse:
    """A complete response (the connection closes after it)."""

    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()

    def serialize(self) -> bytes:
        try:
            reason = HTTPStatus(self.status).phrase
        except ValueError:
            reason = "Unknown"
        lines = [f"HTTP/1.1 {self.status} {reason}"]
        if self.body or self.status not in (204, 304):
            lines.append(f"Content-Type: {self.content_type}")
        lines += [
            f"Content-Length: {len(self.body)}",
            "Connection: close",
            "Cache-Control: no-store",
            "X-Content-Type-Options: nosniff",
        ]
        lines += [f"{k}: {v}" for k, v in self.headers]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + self.body


def json_bytes(payload: Any) -> bytes:
    """``payload`` as compact JSON (non-finite floats become null, unknown types text)."""
    return json.dumps(
        _finite(payload), separators=(",", ":"), allow_nan=False, default=str
    ).encode()


def json_response(
    status: int, payload: Any, headers: tuple[tuple[str, str], ...] = ()
) -> HttpResponse:
    """``payload`` as a JSON response (see :func:`json_bytes`)."""
    return HttpResponse(status, json_bytes(payload), "application/json", headers)


def error_response(
    status: int, error: str, hint: str = "", headers: tuple[tuple[str, str], ...] = ()
) -> HttpResponse:
    """The JSON error shape of every refusal: ``{"error": ..., "hint": ...}``."""
    return json_response(status, {"error": error, "hint": hint}, headers)


class HttpError(Exception):
    """A request that cannot be served; :attr:`response` is the answer to send."""

    def __init__(self, status: int, error: str, hint: str = "") -> None:
        super().__init__(f"{status} {error}")
        self.status = status
        self.error = error
        self.hint = hint

    @property
    def response(self) -> HttpResponse:
        return error_response(self.status, self.error, self.hint)


@dataclass(frozen=True, slots=True)
class HttpRequest:
    """A parsed request head. ``path`` is still percent-encoded."""

    method: str
    target: str
    path: str
    query: Mapping[str, list[str]]
    version: str
    headers: tuple[tuple[str, str], ...]
    remote_address: str = ""
    tls: bool = False
    _index: dict[str, list[str]] = field(default_factory=dict, repr=False, compare=False)

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (case-insensitive), or None."""
        values = self.header_values(name)
        return values[0] if values else None

    def header_values(self, name: str) -> list[str]:
        return self._index.get(name.lower(), [])

    def segments(self) -> list[str]:
        """The path's segments, each percent-decoded (``/a/b%2Fc`` -> ``["a", "b/c"]``)."""
        return [unquote(p) for p in self.path.split("/") if p]

    @property
    def is_websocket_upgrade(self) -> bool:
        return any(
            "websocket" in [t.strip().lower() for t in v.split(",")]
            for v in self.header_values("upgrade")
        )


HttpHandler = Callable[[HttpRequest], Awaitable[HttpResponse]]
"""What :func:`fedstack.transport.ws.serve` calls for a request that is not an upgrade."""


class RequestReader:
    """Collects one request head from the bytes a connection receives (sans-I/O).

    :meth:`feed` returns None until the head is complete, then the request;
    :attr:`trailing` holds the bytes received after a bodiless head (the first WebSocket
    frames, for an upgrade).
    """

    def __init__(self, remote_address: str = "", tls: bool = False) -> None:
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
        self._raw = bytearray()  # the bytes fed until the head is complete (bounded)
        self._remote = remote_address
        self._tls = tls
        self.trailing = b""

    def feed(self, data: bytes | bytearray | memoryview) -> HttpRequest | None:
        """Take received bytes; the request once its head is complete.

        Raises:
            HttpError: a 400-class answer for a malformed or oversized head.
        """
        chunk = bytes(data)
        if len(self._raw) <= MAX_HEAD_BYTES:
            self._raw += chunk[: MAX_HEAD_BYTES + 1]
        try:
            self._h11.receive_data(chunk)
            event = self._h11.next_event()
        except h11.RemoteProtocolError as exc:
            status = exc.error_status_hint if 400 <= exc.error_status_hint < 500 else 400
            if status == 431:
                raise HttpError(
                    431, "request head too large", f"at most {MAX_HEAD_BYTES} bytes"
                ) from None
            raise HttpError(status, "malformed request", str(exc)[:200]) from None
        if event is h11.NEED_DATA:
            return None
        if not isinstance(event, h11.Request):  # pragma: no cover - h11's first event
            raise HttpError(400, "malformed request")
        request = self._build(event)
        if not (
            request.header_values("content-length") or request.header_values("transfer-encoding")
        ):
            try:  # a bodiless request: what follows its head belongs to the next protocol
                if isinstance(self._h11.next_event(), h11.EndOfMessage):
                    self._h11.next_event()
                    self.trailing = bytes(self._h11.trailing_data[0])
            except h11.RemoteProtocolError:  # pragma: no cover - the head was complete
                pass
        return request

    def _build(self, ev: h11.Request) -> HttpRequest:
        method = ev.method.decode("latin-1")
        target = ev.target.decode("latin-1")
        version = ev.http_version.decode("latin-1")
        if _METHOD.fullmatch(method) is None:
            raise HttpError(400, "malformed request line", "expected METHOD /path HTTP/1.1")
        if version not in ("1.0", "1.1"):
            raise HttpError(400, "unsupported HTTP version", "use HTTP/1.1")
        raw_items = list(ev.headers.raw_items())
        if len(raw_items) > MAX_HEADERS:
            raise HttpError(431, "too many header fields", f"at most {MAX_HEADERS}")
        head = bytes(self._raw)
        end = _HEAD_END.search(head)
        if end is None or end.end() > MAX_HEAD_BYTES:
            raise HttpError(431, "request head too large", f"at most {MAX_HEAD_BYTES} bytes")
        if len(_CONTENT_LENGTH_LINE.findall(head[: end.start()])) > 1:
            raise HttpError(400, "malformed Content-Length", "send at most one")
        headers: list[tuple[str, str]] = []
        index: dict[str, list[str]] = {}
        for raw_name, value in raw_items:
            name, text = raw_name.decode("latin-1"), value.decode("latin-1")
            if _BAD_VALUE.search(text):
                raise HttpError(400, "malformed header field", "control character in a value")
            headers.append((name, text))
            index.setdefault(name.lower(), []).append(text)
        path, query = _split_target(target)
        return HttpRequest(
            method=method,
            target=target,
            path=path,
            query=query,
            version=version,
            headers=tuple(headers),
            remote_address=self._remote,
            tls=self._tls,
            _index=index,
        )


def _split_target(target: str) -> tuple[str, dict[str, list[str]]]:
    """(percent-encoded path, query fields) of an origin- or absolute-form target."""
    if target.startswith("/"):
        path, _, query = target.partition("?")
    elif target.startswith(("http://", "https://")):
        try:
            parts = urlsplit(target)
        except ValueError:
            raise HttpError(400, "malformed request target") from None
        path, query = parts.path or "/", parts.query
    else:
        raise HttpError(400, "unsupported request target", "use an absolute path like /healthz")
    try:
        fields = parse_qs(query, keep_blank_values=True, max_num_fields=MAX_QUERY_FIELDS)
    except ValueError:
        raise HttpError(400, "too many query fields", f"at most {MAX_QUERY_FIELDS}") from None
    return path.partition("#")[0] or "/", fields


def body_refusal(req: HttpRequest) -> HttpError | None:
    """The refusal for a request that carries a body (none are accepted), or None.

    411 for ``Transfer-Encoding`` (a length is required), 413 for a ``Content-Length``
    above :data:`MAX_BODY_BYTES`, 400 for a malformed or repeated ``Content-Length``.
    """
    if req.header_values("transfer-encoding"):
        return HttpError(411, "length required", "send no request body (parameters go in the path)")
    lengths = req.header_values("content-length")
    if not lengths:
        return None
    if len(lengths) > 1 or not lengths[0].isdigit() or len(lengths[0]) > 18:
        return HttpError(400, "malformed Content-Length")
    if int(lengths[0]) > MAX_BODY_BYTES:
        return HttpError(
            413,
            "request body too large",
            "requests on this port take no body",
        )
    return None


def health_handler(hint: str = "") -> HttpHandler:
    """The agents' port's answer to a plain (not upgrade) request: ``GET /healthz`` is
    ``200 {"status": "ok"}`` (liveness, no authentication, no details); any other path
    is a 404 whose hint says what the port serves, plus ``hint`` (where the operator
    surface is)."""

    async def handle(req: HttpRequest) -> HttpResponse:
        refusal = body_refusal(req)  # first: a body is never read, whatever the path
        if refusal is not None:
            return refusal.response
        if req.path != "/healthz":
            return error_response(
                404,
                "no such endpoint",
                "this port serves agents (WebSocket) and GET /healthz" + hint,
            )
        if req.method != "GET":
            return error_response(
                405, f"{req.method} is not allowed here", "use GET", (("Allow", "GET"),)
            )
        return json_response(200, {"status": "ok"})

    return handle


def _finite(v: Any) -> Any:
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {str(k): _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    return v
