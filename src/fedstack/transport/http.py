"""Plain HTTP/1.1 requests on the WebSocket port (sans-I/O: bytes in, values out).

The aggregator's port answers two kinds of requests: WebSocket upgrades (agents) and short
HTTP requests (operators; see :mod:`fedstack.aggregator.operator_api`). This module parses
the request head that :mod:`fedstack.transport.ws` collected (at most 16 KiB, ending with an
empty line) and serialises responses. It is deliberately small:

- one request per connection, answered with ``Connection: close``;
- no request bodies: :func:`body_refusal` gives the 411 (chunked) or 413 (any
  ``Content-Length`` above 0) answer, and the transport never reads a body;
- everything malformed raises :class:`HttpError`, which carries its own 400-class answer.
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

MAX_HEADERS = 100
MAX_BODY_BYTES = 0
"""Request bodies accepted (none: operator actions take their parameters in the path)."""

_REQUEST_LINE = re.compile(r"([A-Z]{1,16}) (\S{1,8000}) HTTP/(1\.[01])")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_BAD_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


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
        lines += [f"Content-Length: {len(self.body)}", "Connection: close",
                  "Cache-Control: no-store", "X-Content-Type-Options: nosniff"]
        lines += [f"{k}: {v}" for k, v in self.headers]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + self.body


def json_response(status: int, payload: Any,
                  headers: tuple[tuple[str, str], ...] = ()) -> HttpResponse:
    """``payload`` as a JSON response (non-finite floats become null)."""
    body = json.dumps(_finite(payload), separators=(",", ":"), allow_nan=False,
                      default=str).encode()
    return HttpResponse(status, body, "application/json", headers)


def error_response(status: int, error: str, hint: str = "",
                   headers: tuple[tuple[str, str], ...] = ()) -> HttpResponse:
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
    """A parsed request head. ``path`` is still percent-encoded (see :meth:`segments`)."""

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
        return any("websocket" in [t.strip().lower() for t in v.split(",")]
                   for v in self.header_values("upgrade"))


HttpHandler = Callable[[HttpRequest], Awaitable[HttpResponse]]
"""What :func:`fedstack.transport.ws.serve` calls for a request that is not an upgrade."""


def parse_request(raw: bytes, remote_address: str = "", tls: bool = False) -> HttpRequest:
    """Parse a request head (request line, headers, empty line).

    Raises:
        HttpError: 400 for anything that is not a well-formed HTTP/1.x request head.
    """
    try:
        text = raw.decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes every byte
        raise HttpError(400, "malformed request") from None
    head, sep, _ = text.partition("\r\n\r\n")
    if not sep:
        raise HttpError(400, "malformed request", "the request head must end with CRLF CRLF")
    lines = head.split("\r\n")
    m = _REQUEST_LINE.fullmatch(lines[0])
    if m is None:
        raise HttpError(400, "malformed request line",
                        "expected METHOD /path HTTP/1.1")
    method, target, version = m.group(1), m.group(2), m.group(3)
    if len(lines) - 1 > MAX_HEADERS:
        raise HttpError(431, "too many header fields")
    headers: list[tuple[str, str]] = []
    index: dict[str, list[str]] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or _TOKEN.fullmatch(name) is None:
            raise HttpError(400, "malformed header field")
        value = value.strip(" \t")
        if _BAD_VALUE.search(value):
            raise HttpError(400, "malformed header field")
        headers.append((name, value))
        index.setdefault(name.lower(), []).append(value)
    if target.startswith("/"):
        parts = urlsplit(target)
    elif target.startswith(("http://", "https://")):
        parts = urlsplit(target)  # absolute form
    else:
        raise HttpError(400, "unsupported request target", "use an absolute path like /healthz")
    if version == "1.1" and len(index.get("host", [])) > 1:
        raise HttpError(400, "more than one Host header")
    return HttpRequest(
        method=method, target=target, path=parts.path or "/",
        query=parse_qs(parts.query, keep_blank_values=True, max_num_fields=20),
        version=version, headers=tuple(headers), remote_address=remote_address, tls=tls,
        _index=index,
    )


def body_refusal(req: HttpRequest) -> HttpError | None:
    """The refusal for a request that carries a body (none are accepted), or None.

    411 for ``Transfer-Encoding`` (a length is required), 413 for a ``Content-Length``
    above :data:`MAX_BODY_BYTES`, 400 for a malformed or repeated ``Content-Length``.
    """
    if req.header_values("transfer-encoding"):
        return HttpError(411, "length required",
                         "send no request body (parameters go in the path)")
    lengths = req.header_values("content-length")
    if not lengths:
        return None
    if len(lengths) > 1 or not lengths[0].isdigit() or len(lengths[0]) > 18:
        return HttpError(400, "malformed Content-Length")
    if int(lengths[0]) > MAX_BODY_BYTES:
        return HttpError(413, "request body too large",
                         "operator requests take no body: parameters go in the path")
    return None


def _finite(v: Any) -> Any:
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {str(k): _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    return v
