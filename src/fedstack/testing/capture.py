"""A capturing TCP relay and an independent WebSocket reader, for traffic audits.

:class:`CaptureRelay` forwards every connection made to it (on 127.0.0.1) to an upstream
port and records the bytes of each direction; :func:`parse_ws` reads one recorded
direction back as its HTTP handshake and complete data messages (RFC 6455, client
frames unmasked). The reader is written independently of fedstack's own frame parser
(:mod:`fedstack.transport.frames`), so an audit does not trust the code it audits. Used by
the claim tests of the book's row 2 (no raw data on the wire).
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["CaptureRelay", "CapturedRun", "Link", "WsStream", "parse_ws"]


@dataclass
class Link:
    """One relayed TCP connection: the bytes each way, in order."""

    up: bytearray = field(default_factory=bytearray)  # agent -> aggregator
    down: bytearray = field(default_factory=bytearray)  # aggregator -> agent


class CaptureRelay:
    """Forward every connection to ``upstream_port`` and record both directions."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.links: list[Link] = []
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port = int(self._listener.getsockname()[1])
        self._closing = threading.Event()
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []
        accept = threading.Thread(target=self._accept, name="capture-relay", daemon=True)
        accept.start()
        self._threads.append(accept)

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            except OSError:  # the upstream is gone: refuse this client as it would
                client.close()
                continue
            link = Link()
            with self._lock:
                self.links.append(link)
                self._sockets += [client, upstream]
            for src, dst, buf in ((client, upstream, link.up), (upstream, client, link.down)):
                t = threading.Thread(target=self._pump, args=(src, dst, buf), daemon=True)
                t.start()
                self._threads.append(t)

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, record: bytearray) -> None:
        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    break
                record += data
                dst.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._closing.set()
        self._listener.close()
        with self._lock:
            for s in self._sockets:
                with contextlib.suppress(OSError):
                    s.close()
        for t in self._threads:
            t.join(5)


@dataclass
class WsStream:
    """One direction of a WebSocket connection, parsed."""

    handshake: bytes
    messages: list[bytes]
    rsv_bits: set[int]
    masked: bool


def parse_ws(stream: bytes | bytearray) -> WsStream:
    """The HTTP handshake and the complete data messages of one direction (RFC 6455;
    written independently of fedstack's own frame parser; control frames skipped)."""
    data = bytes(stream)
    end = data.find(b"\r\n\r\n") + 4
    if end < 4:  # cut off before the handshake ended
        return WsStream(data, [], set(), False)
    pos, messages, current, rsv, masked = end, [], bytearray(), set(), False
    while pos + 2 <= len(data):
        b0, b1 = data[pos], data[pos + 1]
        pos += 2
        n = b1 & 0x7F
        if n == 126:
            (n,) = struct.unpack_from(">H", data, pos)
            pos += 2
        elif n == 127:
            (n,) = struct.unpack_from(">Q", data, pos)
            pos += 8
        key = b""
        if b1 & 0x80:
            key, pos, masked = data[pos : pos + 4], pos + 4, True
        payload = data[pos : pos + n]
        pos += n
        if len(payload) < n:
            break  # cut off when the connection closed
        if key:
            raw = np.frombuffer(payload, np.uint8)
            payload = (raw ^ np.resize(np.frombuffer(key, np.uint8), n)).tobytes()
        rsv.add(b0 & 0x70)
        if b0 & 0x0F >= 0x8:
            continue
        current += payload
        if b0 & 0x80:
            messages.append(bytes(current))
            current = bytearray()
    return WsStream(data[:end], messages, rsv, masked)


@dataclass
class CapturedRun:
    """A whole run captured through a :class:`CaptureRelay`: the run's parameters, the
    relayed connections, both directions parsed, each process's log, and what was scraped
    from the aggregator's operator API during the run."""

    agents: int
    rounds: int
    partition: str
    seed: int
    links: list[Link]
    up: list[WsStream]
    down: list[WsStream]
    logs: dict[str, str]
    workdir: Path
    scrapes: list[tuple[str, int, str]] = field(default_factory=list)
    """(path, HTTP status, body) of each request to the aggregator's operator API."""
