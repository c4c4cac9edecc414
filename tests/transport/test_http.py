"""Plain-HTTP request heads (parsed by h11 through :class:`RequestReader`) and responses."""

from __future__ import annotations

import json

import pytest

from fedstack.transport.http import (
    MAX_HEAD_BYTES,
    HttpError,
    HttpRequest,
    HttpResponse,
    RequestReader,
    body_refusal,
    error_response,
    json_response,
)


def parse_request(raw: bytes, remote_address: str = "", tls: bool = False) -> HttpRequest:
    req = RequestReader(remote_address, tls).feed(raw)
    assert req is not None, "incomplete head"
    return req


def test_parse_a_request_head() -> None:
    req = parse_request(
        b"POST /api/v1/agents/site%201%2Fx/revoke?limit=5&a=&a=2 HTTP/1.1\r\n"
        b"Host: h\r\nAuthorization:  Bearer abc \r\nX-A: 1\r\nx-a: 2\r\n\r\n",
        "1.2.3.4:5",
        tls=True,
    )
    assert (req.method, req.version, req.remote_address, req.tls) == (
        "POST",
        "1.1",
        "1.2.3.4:5",
        True,
    )
    assert req.path == "/api/v1/agents/site%201%2Fx/revoke"
    assert req.segments() == ["api", "v1", "agents", "site 1/x", "revoke"]
    assert req.query == {"limit": ["5"], "a": ["", "2"]}
    assert req.header("authorization") == "Bearer abc"
    assert req.header_values("X-A") == ["1", "2"] and req.header("missing") is None
    assert not req.is_websocket_upgrade and body_refusal(req) is None
    up = parse_request(
        b"GET / HTTP/1.1\r\nHost: h\r\nUpgrade: WebSocket\r\nConnection: Upgrade\r\n\r\n"
    )
    assert up.is_websocket_upgrade
    absolute = parse_request(b"GET http://h:1/healthz?x=1 HTTP/1.0\r\n\r\n")
    assert (absolute.path, absolute.version) == ("/healthz", "1.0")


def test_a_head_arrives_in_pieces_and_keeps_what_follows() -> None:
    reader = RequestReader()
    raw = b"GET /x HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\n\r\n\x82\x80frame"
    for i in range(len(raw) - 10):
        assert reader.feed(raw[i : i + 1]) is None
    req = reader.feed(raw[len(raw) - 10 :])
    assert req is not None and req.path == "/x" and reader.trailing == b"\x82\x80frame"


H = b"Host: x\r\n"


@pytest.mark.parametrize(
    "head, status",
    [
        (b"\r\n\r\n", 400),
        (b"GET / HTTP/1.1 extra\r\n" + H + b"\r\n", 400),
        (b"GET  / HTTP/1.1\r\n" + H + b"\r\n", 400),
        (b"GET / HTTP/3\r\n" + H + b"\r\n", 400),
        (b"GET / HTTP/2.0\r\n" + H + b"\r\n", 400),
        (b"get / HTTP/1.1\r\n" + H + b"\r\n", 400),
        (b"GET * HTTP/1.1\r\n" + H + b"\r\n", 400),
        (b"GET / HTTP/1.1\r\n\r\n", 400),  # no Host (RFC 9112 3.2)
        (b"GET / HTTP/1.1\r\n" + H + H + b"\r\n", 400),
        (b"GET / HTTP/1.1\r\n" + H + b": empty name\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\n" + H + b"A\x7fB: 1\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\n" + H + b"A: 1\x01\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\n" + H + b"A: 1\r\n" * 101 + b"\r\n", 431),
        (b"GET / HTTP/1.1\r\n" + H + b"A: " + b"a" * MAX_HEAD_BYTES + b"\r\n\r\n", 431),
        (b"GET / HTTP/1.1\r\n" + H + b"A: " + b"a" * MAX_HEAD_BYTES, 431),
        (
            b"GET /?" + b"&".join(b"k%d=v" % i for i in range(21)) + b" HTTP/1.1\r\n" + H + b"\r\n",
            400,
        ),
        (b"GET http://[ HTTP/1.1\r\n" + H + b"\r\n", 400),
    ],
)
def test_malformed_heads_raise_with_their_answer(head: bytes, status: int) -> None:
    with pytest.raises(HttpError) as err:
        parse_request(head)
    resp = err.value.response
    assert err.value.status == resp.status == status
    assert set(json.loads(resp.body)) == {"error", "hint"}


def test_odd_but_valid_targets_parse() -> None:
    assert parse_request(b"GET //[ HTTP/1.1\r\n" + H + b"\r\n").segments() == ["["]
    # obs-fold is replaced by a space (RFC 9112 5.2)
    folded = parse_request(b"GET / HTTP/1.1\r\n" + H + b"X: 1\r\n continued\r\n\r\n")
    assert folded.header("x") == "1 continued"
    assert parse_request(b"GET /a#frag HTTP/1.1\r\n" + H + b"\r\n").path == "/a"
    assert (
        len(
            parse_request(
                b"GET /?"
                + b"&".join(b"k%d=v" % i for i in range(20))
                + b" HTTP/1.1\r\n"
                + H
                + b"\r\n"
            ).query
        )
        == 20
    )


@pytest.mark.parametrize(
    "headers, status",
    [
        (b"Content-Length: 0\r\n", None),
        (b"Content-Length: 1\r\n", 413),
        (b"Transfer-Encoding: chunked\r\n", 411),
        (b"Transfer-Encoding: chunked\r\nContent-Length: 0\r\n", 411),
    ],
)
def test_bodies_are_refused(headers: bytes, status: int | None) -> None:
    refusal = body_refusal(parse_request(b"POST /x HTTP/1.1\r\n" + H + headers + b"\r\n"))
    assert (None if refusal is None else refusal.status) == status


@pytest.mark.parametrize(
    "headers",
    [
        b"Content-Length: 1000000000000000000000\r\n",
        b"Content-Length: +1\r\n",
        b"Content-Length: 0\r\nContent-Length: 0\r\n",
    ],
)
def test_malformed_lengths_are_400(headers: bytes) -> None:
    with pytest.raises(HttpError) as err:
        parse_request(b"POST /x HTTP/1.1\r\n" + H + headers + b"\r\n")
    assert err.value.status == 400


def test_responses_serialize_with_length_and_close() -> None:
    wire = json_response(200, {"a": float("nan"), "b": [float("inf"), 1.5], 3: (1, 2)}).serialize()
    head, _, body = wire.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 200 OK"
    assert b"Content-Type: application/json" in lines and b"Connection: close" in lines
    assert f"Content-Length: {len(body)}".encode() in lines
    assert json.loads(body) == {"a": None, "b": [None, 1.5], "3": [1, 2]}
    err = error_response(405, "nope", "use GET", (("Allow", "GET"),)).serialize()
    assert err.startswith(b"HTTP/1.1 405 Method Not Allowed\r\n") and b"\r\nAllow: GET\r\n" in err
    assert HttpResponse(799).serialize().startswith(b"HTTP/1.1 799 Unknown\r\n")
