"""Issue 16 finding 7: fairness in the shared upload budget, against a live aggregator.

Agents that trickle or abort their uploads and rejoin under the same name, and strangers
that announce a big first message, must not hold the bytes an honest agent in good
standing uploads with: its rounds go on at their pace, and the attackers' identity (and
host) carries their penalty across reconnections.
"""

from __future__ import annotations

import asyncio
import os
import struct
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from fedstack import Agent, AggregatorConfig, FederationFinished
from fedstack.testing import aggregator_thread
from fedstack.transport import connect
from fedstack.transport.ws import WSConnection
from fedstack.wire import Participate, Welcome, decode, encode

pytestmark = [pytest.mark.timeout(90), pytest.mark.serial]  # rates and stalls: run alone

MODEL = 300_000  # float32: 1.2 MB, a budgeted upload
ANNOUNCED = 1_500_000  # an attacker's upload: with an honest one, over the 2 MiB budget
ATTACK_SECONDS = 6.0


def _config(tmp_path: Path) -> AggregatorConfig:
    return AggregatorConfig(
        auth="off",
        port=0,
        db=str(tmp_path / "f.db"),
        rounds=100_000,
        min_agents=1,
        threshold=0.1,  # a round is the honest upload, whatever the attackers registered
        heartbeat_interval=1.0,
        send_timeout=5.0,
        upload_budget_bytes=2 << 20,
        max_message_bytes=16 << 20,
        min_transfer_rate=256 * 1024,
        finish_grace=1,
    )


def _honest(url: str, versions: list[tuple[float, int]], stop: threading.Event) -> None:
    a = Agent(url, name="honest")
    a.send_initial_model({"w": np.zeros(MODEL, np.float32)})
    a.start()
    try:
        while not stop.is_set():
            try:
                gm = a.wait_for_global_model(30)
            except (FederationFinished, TimeoutError):
                break
            versions.append((time.monotonic(), a.version))
            a.send_trained_model({"w": gm["w"] + 1}, 5)
    finally:
        a.close()


def _header(n: int) -> bytes:
    """A masked binary frame header (all-zero key) announcing ``n`` bytes."""
    return bytes([0x82, 0x80 | 127]) + n.to_bytes(8, "big") + b"\0" * 4


async def _register(url: str, name: str) -> WSConnection:
    conn = await connect(url, max_message_bytes=1 << 24)
    assert isinstance(conn, WSConnection)
    conn.write(encode(Participate(agent_name=name)))
    while not isinstance(decode(await asyncio.wait_for(conn.recv(), 10)), Welcome):
        pass
    return conn


async def _attack(url: str, seconds: float) -> int:
    """A trickler and an aborter, each rejoining under its own name until ``seconds``
    passed; the number of connections they made."""
    end = time.monotonic() + seconds
    joins = [0]

    async def trickler() -> None:
        while time.monotonic() < end:
            try:
                conn = await _register(url, "slowpoke")
            except Exception:  # noqa: BLE001 - refused or cut: try again
                await asyncio.sleep(0.1)
                continue
            joins[0] += 1
            t = conn.transport
            assert t is not None
            t.write(_header(ANNOUNCED))
            while time.monotonic() < end and not t.is_closing():
                t.write(bytes(4096))  # 8 KB/s: far below the minimum rate
                await asyncio.sleep(0.5)
            conn.abort()

    async def aborter() -> None:
        while time.monotonic() < end:
            try:
                conn = await _register(url, "aborter")
            except Exception:  # noqa: BLE001
                await asyncio.sleep(0.1)
                continue
            joins[0] += 1
            t = conn.transport
            assert t is not None
            t.write(_header(ANNOUNCED) + bytes(ANNOUNCED // 2))
            await asyncio.sleep(0.05)
            conn.abort()

    await asyncio.gather(trickler(), aborter())
    return joins[0]


def test_agents_that_trickle_or_abort_and_rejoin_do_not_hold_back_honest_rounds(
    tmp_path: Path,
) -> None:
    versions: list[tuple[float, int]] = []
    stop = threading.Event()
    with aggregator_thread(_config(tmp_path)) as agg:
        url = f"ws://127.0.0.1:{agg.port}"
        honest = threading.Thread(target=_honest, args=(url, versions, stop))
        honest.start()
        try:
            deadline = time.monotonic() + 20
            while len(versions) < 3 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert len(versions) >= 3, "the honest agent never got going"
            start = time.monotonic()
            joins = asyncio.run(_attack(url, ATTACK_SECONDS))
            end = time.monotonic()
            by_name = {s.name: s.agent_id for s in agg.sessions.values()}
            standing = getattr(agg.upload_budget, "standing", None)  # (none before the fix)
        finally:
            stop.set()
            honest.join(40)
    during = [t for t, _ in versions if start <= t <= end]
    stamps = [start, *during, end]
    longest = max(b - a for a, b in zip(stamps, stamps[1:], strict=False))
    assert joins >= 3
    # before: every time an attacker held the budget (2-4 s for the trickler, until it
    # is cut), the honest upload waited for it
    assert longest < 1.5, f"honest rounds stalled {longest:.2f} s behind the attackers"
    assert len(during) >= 10, f"only {len(during)} honest rounds in {end - start:.1f} s"
    from fedstack.transport.standing import TRUSTED

    assert standing is not None
    assert standing.struck >= 2, "neither the trickler nor the aborter was penalised"
    assert standing.account(f"agent {by_name['honest']}").tier() == TRUSTED


def test_the_penalty_follows_a_rejoining_identity(tmp_path: Path) -> None:
    """An agent cut for trickling rejoins under its name: its account is still suspect
    and cooling down, so its next upload waits instead of taking the budget again."""
    cfg = _config(tmp_path)
    with aggregator_thread(cfg) as agg:
        url = f"ws://127.0.0.1:{agg.port}"

        async def main() -> str:
            init = await connect(url, max_message_bytes=1 << 24)  # fixes the model
            init.write(encode(Participate(agent_name="init", model={"w": np.zeros(4)})))
            await asyncio.wait_for(init.recv(), 10)
            conn = await _register(url, "slowpoke")
            t = conn.transport
            assert t is not None
            t.write(_header(ANNOUNCED))
            for _ in range(40):  # cut within a few rate windows
                if t.is_closing() or not conn.is_open:
                    break
                t.write(bytes(4096))
                await asyncio.sleep(0.25)
            conn.abort()
            # (its host cools down too: the registration itself waits for the end of it)
            again = await _register(url, "slowpoke")
            sid = next(s.agent_id for s in agg.sessions.values() if s.name == "slowpoke")
            again.abort()
            init.abort()
            return sid

        sid = asyncio.run(main())
        standing = agg.upload_budget.standing
    from fedstack.transport.standing import SUSPECT

    assert standing.struck >= 1
    # a new connection, the same identity: still under penalty
    assert standing.account(f"agent {sid}").tier() == SUSPECT


def test_a_strangers_big_first_message_is_refused_at_its_header(tmp_path: Path) -> None:
    """Once the federation has a model, an unregistered connection may not announce a
    first message larger than a participate can be (the header limit plus the model):
    it is closed at once with 1009, holding nothing, instead of holding the budget until
    the register timeout."""
    cfg = _config(tmp_path).replace(register_timeout=30.0)
    with aggregator_thread(cfg) as agg:
        port = agg.port

        async def main() -> tuple[int, float]:
            init = await connect(f"ws://127.0.0.1:{port}", max_message_bytes=1 << 24)
            init.write(encode(Participate(agent_name="init", model={"w": np.zeros(4)})))
            await asyncio.wait_for(init.recv(), 10)
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(
                (
                    f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                    "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                    "Sec-WebSocket-Version: 13\r\n\r\n"
                ).encode()
            )
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            start = time.monotonic()
            writer.write(_header(12 << 20) + os.urandom(64 * 1024))
            code = 0  # nothing came back
            try:
                for _ in range(4):  # an error message, then the close frame
                    head = await asyncio.wait_for(reader.readexactly(2), 10)
                    n = head[1] & 0x7F
                    if n >= 126:
                        ext = await reader.readexactly(2 if n == 126 else 8)
                        n = int.from_bytes(ext, "big")
                    body = await asyncio.wait_for(reader.readexactly(n), 10)
                    if head[0] & 0x0F == 0x8:
                        code = struct.unpack("!H", body[:2])[0] if n >= 2 else 1005
                        break
            except (ConnectionError, asyncio.IncompleteReadError):
                code = -1  # reset after the close (our unread bytes)
            except TimeoutError:
                pass
            took = time.monotonic() - start
            writer.transport.abort()
            init.abort()
            return code, took

        code, took = asyncio.run(main())
        used = agg.upload_budget.used
    assert code in (1009, -1), code
    assert took < 5.0, f"the stranger held its connection {took:.1f} s"
    assert used == 0
