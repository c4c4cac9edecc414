"""Hostile input thrown at a running aggregator (subprocess) while real agents train.

Thrown concurrently, over raw TCP: random bytes without a handshake, random bytes after a
valid WebSocket handshake, truncated frames, pickle payloads, frame headers claiming 2**62
(and 2**63 - 1, and max_message_bytes - 1) bytes, slow-loris handshakes (the HTTP upgrade
sent one byte per 0.2 s) and WebSocket frames that never finish (one byte per 0.2 s).
The agents' run must complete bit-identical to the fault-free reference, every input must
leave the aggregator alive, and its RSS (psutil, sampled every 50 ms) must stay bounded.
"""

from __future__ import annotations

import asyncio
import base64
import os
import pickle
import random
import struct
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import psutil
from faultlib import N_AGENTS, aggregator_args, check_run, join_all, start_thread_agent

from fedstack.testing import AggregatorProcess

ROUNDS = 8
LIMIT = 1 << 20
ATTACK_SECONDS = 3.0
RSS_BOUND = 96 << 20  # growth allowed above the pre-attack RSS


class Boom:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, ("touch /tmp/fedstack-pwned-live",))


def frame(
    payload: bytes, *, opcode: int = 2, fin: bool = True, length: int | None = None, rsv: int = 0
) -> bytes:
    n = len(payload) if length is None else length
    b0 = (0x80 if fin else 0) | rsv | opcode
    if n < 126:
        head = struct.pack("!BB", b0, 0x80 | n)
    elif n < 1 << 16:
        head = struct.pack("!BBH", b0, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", b0, 0x80 | 127, n)
    key = os.urandom(4)
    masked = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return head + key + masked


def upgrade(port: int) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


class Attacker:
    def __init__(self, port: int, seed: int) -> None:
        self.port = port
        self.rng = random.Random(seed)
        self.thrown: Counter[str] = Counter()
        self.outcome: Counter[str] = Counter()

    async def _open(self, handshake: bool) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        r, w = await asyncio.open_connection("127.0.0.1", self.port)
        if handshake:
            w.write(upgrade(self.port))
            head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 101"), head[:80]
        return r, w

    async def _throw(
        self, kind: str, data: bytes, handshake: bool = True, linger: float = 0.5
    ) -> None:
        self.thrown[kind] += 1
        try:
            r, w = await self._open(handshake)
        except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
            self.outcome[f"{kind}: open failed {type(exc).__name__}"] += 1
            return
        try:
            w.write(data)
            await w.drain()
            got = await asyncio.wait_for(r.read(65536), linger)
            self.outcome[f"{kind}: {'closed' if not got else 'replied'}"] += 1
        except TimeoutError:
            self.outcome[f"{kind}: open"] += 1
        except OSError:
            self.outcome[f"{kind}: reset"] += 1
        finally:
            w.transport.abort()

    async def _slow(self, kind: str, prefix: bytes, drip: bytes, handshake: bool) -> None:
        """Send ``prefix``, then ``drip`` one byte per 0.2 s until ATTACK_SECONDS."""
        self.thrown[kind] += 1
        try:
            r, w = await self._open(handshake)
        except (OSError, asyncio.IncompleteReadError, TimeoutError):
            self.outcome[f"{kind}: open failed"] += 1
            return
        deadline = time.monotonic() + ATTACK_SECONDS
        try:
            w.write(prefix)
            for b in drip:
                if time.monotonic() > deadline:
                    break
                w.write(bytes([b]))
                await w.drain()
                await asyncio.sleep(0.2)
            self.outcome[f"{kind}: still open after {ATTACK_SECONDS:.0f} s"] += 1
        except OSError:
            self.outcome[f"{kind}: closed by the aggregator"] += 1
        finally:
            w.transport.abort()

    async def run(self) -> None:
        rng = self.rng
        jobs = []
        for _ in range(40):
            jobs.append(
                self._throw(
                    "random bytes, no handshake",
                    rng.randbytes(rng.randint(1, 8192)),
                    handshake=False,
                )
            )
        for _ in range(30):
            jobs.append(
                self._throw("random bytes after handshake", rng.randbytes(rng.randint(1, 8192)))
            )
        for _ in range(20):
            jobs.append(
                self._throw(
                    "random frame header bits",
                    frame(
                        rng.randbytes(64),
                        opcode=rng.randrange(16),
                        rsv=rng.choice([0, 0x40, 0x20, 0x10]),
                        fin=rng.random() < 0.5,
                    ),
                )
            )
        for _ in range(20):
            n = rng.randint(200, 60000)
            jobs.append(self._throw("truncated frame", frame(b"\x00" * n)[: rng.randint(2, n)]))
        for obj in (Boom(), {"w": [1, 2]}, [Boom()], "participate"):
            for _ in range(4):
                jobs.append(self._throw("pickle payload", frame(pickle.dumps(obj))))
        for n in (1 << 62, (1 << 63) - 1, 1 << 40, LIMIT + 1):
            for _ in range(5):
                jobs.append(
                    self._throw("huge length prefix", frame(b"", length=n)[:10] + os.urandom(4))
                )
        for _ in range(10):  # claims just under the limit and sends nothing more
            jobs.append(
                self._throw(
                    "near-limit frame, no payload",
                    frame(b"", length=LIMIT - 1),
                    linger=ATTACK_SECONDS,
                )
            )
        for _ in range(15):
            jobs.append(
                self._slow("slow-loris handshake", b"", upgrade(self.port), handshake=False)
            )
        for _ in range(15):
            jobs.append(
                self._slow(
                    "slow-loris frame",
                    frame(b"", length=500_000)[:14],
                    os.urandom(1000),
                    handshake=True,
                )
            )
        rng.shuffle(jobs)
        await asyncio.wait_for(asyncio.gather(*jobs), ATTACK_SECONDS + 20)


def test_hostile_inputs_while_agents_train(
    tmp_path: Path, reference: dict[int, dict[str, np.ndarray]]
) -> None:
    marker = Path("/tmp/fedstack-pwned-live")
    marker.unlink(missing_ok=True)
    db = tmp_path / "fed.db"
    agg = AggregatorProcess(
        tmp_path, *aggregator_args(db, ROUNDS, "--max-message-bytes", str(LIMIT))
    )
    agg.start()
    assert agg.proc is not None
    proc = psutil.Process(agg.proc.pid)
    rss: list[tuple[float, int]] = []
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.is_set():
            try:
                rss.append((time.monotonic(), proc.memory_info().rss))
            except psutil.Error:
                return
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        agents = [start_thread_agent(agg.url, f"agent-{i}", i, delay=0.4) for i in range(N_AGENTS)]
        time.sleep(0.5)  # the federation is running
        baseline = max(v for _, v in rss)
        attacker = Attacker(agg.port, seed=5)
        t0 = time.monotonic()
        asyncio.run(attacker.run())
        attack_seconds = time.monotonic() - t0
        join_all(agents, 60)
        assert agg.wait(30) == 0
    finally:
        sampling.set()
        sampler.join(5)
        agg.close()
    summary = check_run(db, ROUNDS, [a.report for a in agents], reference[ROUNDS])
    peak = max(v for _, v in rss)
    print(
        f"\nhostile inputs thrown: {sum(attacker.thrown.values())} "
        f"{dict(attacker.thrown)} in {attack_seconds:.1f} s"
    )
    for k, v in sorted(attacker.outcome.items()):
        print(f"   {v:3d}  {k}")
    print(
        f"aggregator RSS: baseline {baseline / 2**20:.1f} MiB, peak {peak / 2**20:.1f} MiB; "
        f"uploads {summary['statuses']}"
    )
    assert not marker.exists(), "a pickle payload was executed"
    assert sum(attacker.thrown.values()) >= 180
    assert peak - baseline < RSS_BOUND, (baseline, peak)
    assert all(a.report["versions"][-1] == ROUNDS for a in agents)


def _closed_within(port: int, data: bytes, seconds: float) -> bool:
    async def probe() -> bool:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        try:
            w.write(data)
            await w.drain()
            return await asyncio.wait_for(r.read(65536), seconds) == b""
        except TimeoutError:
            return False
        except OSError:
            return True
        finally:
            w.transport.abort()

    return asyncio.run(probe())


def test_stalled_handshake_is_closed(tmp_path: Path) -> None:
    """Slow-loris: a peer that never finishes the upgrade request must not hold a socket
    (and its buffers) forever; register_timeout (1 s here) is the natural bound."""
    from faultlib import aggregator_config

    from fedstack.testing import aggregator_thread

    cfg = aggregator_config(tmp_path / "f.db", 1, register_timeout=1.0)
    with aggregator_thread(cfg) as agg:
        partial = upgrade(agg.port)[:30]
        assert _closed_within(agg.port, partial, 4.0), "stalled handshake still open after 4 s"
