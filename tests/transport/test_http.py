"""The plain-HTTP request parser and response writer (sans-I/O, bytes only)."""

from __future__ import annotations

import json

import pytest

from fedstack.transport.http import (
    HttpError,
    HttpResponse,
    body_refusal,
    error_response,
    json_response,
    parse_request,
)


def test_parse_a_request_head() -> None:
    req = parse_request(b"POST /api/v1/agents/site%201%2Fx/revoke?limit=5&a=&a=2 HTTP/1.1\r\n"
                        b"Host: h\r\nAuthorization:  Bearer abc \r\nX-A: 1\r\nx-a: 2\r\n\r\n",
                        "1.2.3.4:5", tls=True)
    assert (req.method, req.version, req.remote_address, req.tls) == ("POST", "1.1",
                                                                        "1.2.3.4:5", True)
    assert req.path == "/api/v1/agents/site%201%2Fx/revoke"
    assert req.segments() == ["api", "v1", "agents", "site 1/x", "revoke"]
    assert req.query == {"limit": ["5"], "a": ["", "2"]}
    assert req.header("authorization") == "Bearer abc"
    assert req.header_values("X-A") == ["1", "2"] and req.header("missing") is None
    assert not req.is_websocket_upgrade and body_refusal(req) is None
    up = parse_request(b"GET / HTTP/1.1\r\nUpgrade: WebSocket\r\nConnection: Upgrade\r\n\r\n")
    assert up.is_websocket_upgrade
    absolute = parse_request(b"GET http://h:1/healthz?x=1 HTTP/1.0\r\n\r\n")
    assert (absolute.path, absolute.version) == ("/healthz", "1.0")


@pytest.mark.parametrize("head, status", [
    (b"GET / HTTP/1.1\r\n", 400),  # no end of head
    (b"\r\n\r\n", 400),
    (b"GET / HTTP/1.1 extra\r\n\r\n", 400),
    (b"GET  / HTTP/1.1\r\n\r\n", 400),
    (b"GET / HTTP/3\r\n\r\n", 400),
    (b"GET * HTTP/1.1\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\n: empty name\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nA\x7fB: 1\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nA: 1\x01\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nA: 1\nB: 2\r\n\r\n", 400),  # bare LF inside a field
    (b"GET / HTTP/1.1\r\n" + b"A: 1\r\n" * 101 + b"\r\n", 431),
])
def test_malformed_heads_raise_with_their_answer(head: bytes, status: int) -> None:
    with pytest.raises(HttpError) as err:
        parse_request(head)
    resp = err.value.response
    assert err.value.status == resp.status == status
    assert set(json.loads(resp.body)) == {"error", "hint"}


@pytest.mark.parametrize("headers, status", [
    (b"Content-Length: 0\r\n", None),
    (b"Content-Length: 1\r\n", 413),
    (b"Content-Length: 1000000000000000000000\r\n", 400),
    (b"Content-Length: +1\r\n", 400),
    (b"Content-Length: 0\r\nContent-Length: 0\r\n", 400),
    (b"Transfer-Encoding: chunked\r\n", 411),
    (b"Transfer-Encoding: chunked\r\nContent-Length: 0\r\n", 411),
])
def test_bodies_are_refused(headers: bytes, status: int | None) -> None:
    refusal = body_refusal(parse_request(b"POST /x HTTP/1.1\r\n" + headers + b"\r\n"))
    assert (None if refusal is None else refusal.status) == status


def test_responses_serialize_with_length_and_close() -> None:
    wire = json_response(200, {"a": float("nan"), "b": [float("inf"), 1.5], 3: (1, 2)}
                         ).serialize()
    head, _, body = wire.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 200 OK"
    assert b"Content-Type: application/json" in lines and b"Connection: close" in lines
    assert f"Content-Length: {len(body)}".encode() in lines
    assert json.loads(body) == {"a": None, "b": [None, 1.5], "3": [1, 2]}
    err = error_response(405, "nope", "use GET", (("Allow", "GET"),)).serialize()
    assert err.startswith(b"HTTP/1.1 405 Method Not Allowed\r\n") and b"\r\nAllow: GET\r\n" in err
    assert HttpResponse(799).serialize().startswith(b"HTTP/1.1 799 Unknown\r\n")
