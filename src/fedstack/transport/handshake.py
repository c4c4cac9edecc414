"""The opening of a connection, sans-I/O: HTTP request or WebSocket upgrade.

A server connection first receives an HTTP/1.1 request head (parsed by h11, see
:class:`~fedstack.transport.http.RequestReader`); :class:`ServerHandshake` turns it into one
outcome: the upgrade is accepted (:class:`Upgraded`, with the ``101`` answer built by the
``websockets`` library's sans-I/O ``ServerProtocol``), refused (:class:`Refused`: a
complete answer to send before closing), or it is a plain request for the HTTP handler
(:class:`Routed`). :class:`ClientHandshake` does the client's half.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from websockets.client import ClientProtocol
from websockets.datastructures import Headers
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.uri import parse_uri

from fedstack.errors import ConnectionClosed
from fedstack.transport.http import MAX_HEAD_BYTES, HttpError, HttpRequest, RequestReader

_LOG = logging.getLogger("fedstack.transport.handshake")
_LOG.setLevel(logging.WARNING)
_BAD_BODY = b"Failed to open a WebSocket connection: invalid HTTP request.\n"
_BAD_REQUEST = (
    b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(_BAD_BODY)
) + _BAD_BODY


@dataclass(frozen=True, slots=True)
class Upgraded:
    """The WebSocket is open: send ``response``; ``rest`` are its first frame bytes."""

    response: bytes
    request: Request
    rest: bytes


@dataclass(frozen=True, slots=True)
class Refused:
    """Send ``response`` and close: ``error`` is the malformed request's, None when the
    WebSocket upgrade was refused."""

    response: bytes
    error: HttpError | None = None


@dataclass(frozen=True, slots=True)
class Routed:
    """A plain HTTP request for the port's HTTP handler."""

    request: HttpRequest


Outcome = Upgraded | Refused | Routed


class ServerHandshake:
    """Reads one request head; ``http`` says whether plain requests have a handler."""

    def __init__(self, remote_address: str = "", tls: bool = False, *, http: bool) -> None:
        self._reader = RequestReader(remote_address, tls)
        self._http = http

    def feed(self, data: bytes | bytearray | memoryview) -> Outcome | None:
        """Take received bytes; the outcome once the request head is complete."""
        try:
            req = self._reader.feed(data)
        except HttpError as exc:
            return Refused(exc.response.serialize() if self._http else _BAD_REQUEST, exc)
        if req is None:
            return None
        if self._http and not req.is_websocket_upgrade:
            return Routed(req)
        proto = ServerProtocol(max_size=None, logger=_LOG)
        request = Request(req.target, Headers(req.headers))
        response: Response = proto.accept(request)
        if response.status_code != 101:
            response = Response(
                response.status_code,
                response.reason_phrase,
                Headers([("Content-Length", str(len(response.body)))]),
                response.body,
            )
        proto.send_response(response)
        wire = b"".join(proto.data_to_send())
        if response.status_code != 101:
            return Refused(wire)
        return Upgraded(wire, request, self._reader.trailing)


class ClientHandshake:
    """The client's upgrade request, then the server's answer."""

    def __init__(self, uri: str) -> None:
        self._proto = ClientProtocol(parse_uri(uri), max_size=None, logger=_LOG)
        self._head = bytearray()

    def request(self) -> bytes:
        """The bytes of the upgrade request."""
        self._proto.send_request(self._proto.connect())
        return b"".join(self._proto.data_to_send())

    def feed(self, data: bytes | bytearray | memoryview) -> bytes | None:
        """Take received bytes; once the answer is complete, the bytes after it.

        Raises:
            ConnectionClosed: the server refused the upgrade or answered nonsense.
        """
        before = len(self._head)
        self._head += data
        end = self._head.find(b"\r\n\r\n", max(0, before - 3))
        if end < 0:
            if len(self._head) > MAX_HEAD_BYTES:
                raise ConnectionClosed(1006, "handshake too large")
            return None
        rest = bytes(self._head[end + 4 :])
        self._proto.receive_data(bytes(self._head[: end + 4]))
        self._head.clear()
        if self._proto.state is not State.OPEN or not self._proto.events_received():
            why = self._proto.handshake_exc or "no response"
            raise ConnectionClosed(1006, f"WebSocket handshake failed: {why}")
        return rest
