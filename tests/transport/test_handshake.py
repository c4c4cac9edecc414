"""The opening handshake without sockets: our client's request to our server and back."""

from __future__ import annotations

import pytest

from fedstack.errors import ConnectionClosed
from fedstack.transport.handshake import (
    ClientHandshake,
    Refused,
    Routed,
    ServerHandshake,
    Upgraded,
)


def test_client_and_server_open_a_websocket_in_memory() -> None:
    client = ClientHandshake("ws://127.0.0.1:9/path?x=1")
    server = ServerHandshake("1.2.3.4:5", http=True)
    request = client.request()
    assert server.feed(request[:10]) is None
    outcome = server.feed(request[10:] + b"\x82\x80first")
    assert isinstance(outcome, Upgraded)
    assert outcome.rest == b"\x82\x80first" and outcome.request.path == "/path?x=1"
    assert outcome.response.startswith(b"HTTP/1.1 101 ")
    assert client.feed(outcome.response[:-1]) is None
    assert client.feed(outcome.response[-1:] + b"\x82\x00") == b"\x82\x00"


def test_plain_requests_are_routed_or_refused() -> None:
    get = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    routed = ServerHandshake(http=True).feed(get)
    assert isinstance(routed, Routed) and routed.request.path == "/healthz"
    refused = ServerHandshake(http=False).feed(get)  # no HTTP handler: the upgrade error
    assert isinstance(refused, Refused) and refused.error is None
    assert refused.response.startswith(b"HTTP/1.1 426 ")
    for http in (True, False):
        bad = ServerHandshake(http=http).feed(b"GET //[ HTTP/1.1\r\n\r\n")  # no Host
        assert isinstance(bad, Refused) and bad.error is not None
        assert bad.response.startswith(b"HTTP/1.1 400 ")
        assert (b"application/json" in bad.response) == http


def test_the_client_refuses_a_bad_answer() -> None:
    client = ClientHandshake("ws://127.0.0.1:9/")
    client.request()
    with pytest.raises(ConnectionClosed, match="handshake failed"):
        client.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    client = ClientHandshake("ws://127.0.0.1:9/")
    client.request()
    with pytest.raises(ConnectionClosed, match="too large"):
        client.feed(b"HTTP/1.1 101 Switching\r\n" + b"X: y\r\n" * 4000)
