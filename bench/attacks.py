"""Hostile clients against a live aggregator: what each attack of issue 16 (findings 1-4
and 7) costs the honest agents.

One ``fedstack aggregator`` subprocess on 127.0.0.1 (``--auth off``, a round is two uploads
whatever the number of attackers registered, small upload budget); two honest agents in
this process train in a loop on a 1.2 MB model (its uploads count against the upload
budget). For a baseline window and then for each attack (run by this script in a separate
process, so it does not share our interpreter), the table shows the honest round rate, the
aggregator's resident-memory growth and the longest ``/healthz`` answer time. Everything is
bounded in time.

    python bench/attacks.py [--seconds 8] [--only fragments,slow]

It uses only the command line, the wire protocol and the agent API, so it also measures
an older fedstack (``PYTHONPATH=<old tree>/src``) for before/after figures.

Attacks:
    fragments  4 unregistered connections: a 4 MiB first fragment, then tiny continuation
               frames (finding 1)
    aborted    registered connections announcing 8 MiB uploads, sending half, aborting
               (finding 2)
    refusals   32 concurrent registrations with a wrong token (finding 3)
    idle       800 idle TCP connections that never finish the handshake (finding 4)
    slow       2 registered agents announcing 3 MiB uploads and sending 8 KB/s (finding 7)
    joined     (not run by default; ``--only joined``) the slow attack's churn of
               registrations without any upload: what registering alone costs
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from fedstack import Agent, FederationFinished
from fedstack.transport import connect
from fedstack.wire import Participate, encode

PARAMS = 300_000
ATTACKS = ("fragments", "aborted", "refusals", "idle", "slow")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------------------- attacks
def _frame_header(n: int, *, fin: bool, opcode: int) -> bytes:
    """A masked client frame header announcing ``n`` payload bytes."""
    return bytes([(0x80 if fin else 0) | opcode, 0x80 | 127]) + n.to_bytes(8, "big") + os.urandom(4)


async def _register(url: str, name: str) -> Any:
    conn = await connect(url, max_message_bytes=1 << 26)
    conn.write(encode(Participate(agent_name=name)))
    await asyncio.wait_for(conn.recv(), 10)  # the welcome (or a refusal)
    return conn


async def attack_fragments(url: str, end: float) -> None:
    async def one() -> None:
        while time.monotonic() < end:
            try:
                conn = await connect(url, max_message_bytes=1 << 26)
            except Exception:
                await asyncio.sleep(0.2)
                continue
            try:
                t = conn.transport
                t.write(_frame_header(4 << 20, fin=False, opcode=2) + bytes(4 << 20))
                while time.monotonic() < end and not t.is_closing():
                    t.write(_frame_header(7, fin=False, opcode=0) + b"x" * 7)
                    await asyncio.sleep(0.001)
            finally:
                conn.abort()

    await asyncio.gather(*(one() for _ in range(4)))


async def attack_aborted(url: str, end: float) -> None:
    async def one(i: int) -> None:
        n = 0
        while time.monotonic() < end:
            n += 1
            try:
                conn = await _register(url, f"aborter{i}-{n}")
            except Exception:
                await asyncio.sleep(0.2)
                continue
            t = conn.transport
            t.write(_frame_header(8 << 20, fin=True, opcode=2) + bytes(4 << 20))
            await asyncio.sleep(0.05)
            conn.abort()

    await asyncio.gather(*(one(i) for i in range(4)))


async def attack_refusals(url: str, end: float) -> None:
    async def one() -> None:
        while time.monotonic() < end:
            try:
                conn = await connect(url, max_message_bytes=1 << 20)
                # "victim" is bound to the first token it showed: every later one is wrong
                token = os.urandom(16).hex()
                conn.write(encode(Participate(agent_name="victim", token=token)))
                await asyncio.wait_for(conn.recv(), 10)
            except Exception:
                pass
            else:
                conn.abort()

    await asyncio.gather(*(one() for _ in range(32)))


async def attack_idle(url: str, end: float) -> None:
    port = int(url.rsplit(":", 1)[1])
    socks: list[socket.socket] = []
    try:
        while len(socks) < 800 and time.monotonic() < end:
            try:
                socks.append(socket.create_connection(("127.0.0.1", port), timeout=2))
            except OSError:
                await asyncio.sleep(0.05)
        while time.monotonic() < end:
            await asyncio.sleep(0.1)
    finally:
        for s in socks:
            s.close()


async def attack_slow(url: str, end: float) -> None:
    async def one(i: int) -> None:
        n = 0
        while time.monotonic() < end:
            n += 1
            try:
                conn = await _register(url, f"slowpoke{i}-{n}")
            except Exception:
                await asyncio.sleep(0.2)
                continue
            t = conn.transport
            t.write(_frame_header(3 << 20, fin=True, opcode=2))
            while time.monotonic() < end and not t.is_closing():
                t.write(os.urandom(4096))
                await asyncio.sleep(0.5)
            conn.abort()

    await asyncio.gather(*(one(i) for i in range(2)))


async def attack_joined(url: str, end: float) -> None:
    """(Reference for ``slow``: the same registrations, without any upload.)"""

    async def one(i: int) -> None:
        n = 0
        while time.monotonic() < end:
            n += 1
            try:
                conn = await _register(url, f"joiner{i}-{n}")
            except Exception:
                await asyncio.sleep(0.2)
                continue
            t0 = time.monotonic()
            while time.monotonic() < min(end, t0 + 3) and not conn.transport.is_closing():
                await asyncio.sleep(0.5)
            conn.abort()

    await asyncio.gather(*(one(i) for i in range(2)))


def run_attack(name: str, url: str, seconds: float) -> None:
    fn = globals()[f"attack_{name}"]
    end = time.monotonic() + seconds
    asyncio.run(asyncio.wait_for(fn(url, end), seconds + 15))


# ---------------------------------------------------------------------------- measuring
def rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


class Probe:
    """Samples the aggregator's RSS and ``/healthz`` answer time every 50 ms."""

    def __init__(self, pid: int, port: int) -> None:
        self.pid, self.port = pid, port
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.rss: list[float] = []
        self.stall = 0.0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def reset(self) -> None:
        with self.lock:
            self.rss, self.stall = [], 0.0

    def _run(self) -> None:
        while not self.stop.is_set():
            t0 = time.monotonic()
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                c.request("GET", "/healthz")
                c.getresponse().read()
                c.close()
                took = time.monotonic() - t0
            except OSError:
                took = time.monotonic() - t0
            with self.lock:
                self.stall = max(self.stall, took)
                self.rss.append(rss_mib(self.pid))
            self.stop.wait(0.05)


def honest(url: str, name: str, seed: int, versions: list[int], stop: threading.Event) -> None:
    a = Agent(url, name=name)
    rng = np.random.default_rng(seed)
    a.send_initial_model({"w": np.zeros(PARAMS, np.float32)})
    a.start()
    try:
        while not stop.is_set():
            try:
                gm = a.wait_for_global_model(30)
            except (FederationFinished, TimeoutError):
                break
            versions.append(a.version)
            a.send_trained_model({"w": gm["w"] + rng.standard_normal(1).astype(np.float32)}, 5)
    finally:
        a.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=8.0, help="window per attack")
    ap.add_argument("--only", default=",".join(ATTACKS))
    ap.add_argument("--attack", help=argparse.SUPPRESS)
    ap.add_argument("--url", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.attack:  # the attacker process
        run_attack(args.attack, args.url, args.seconds)
        return 0
    with tempfile.TemporaryDirectory(prefix="fedstack-attacks-") as tmp:
        d = Path(tmp)
        port = free_port()
        ready = d / "ready.json"
        log = open(d / "agg.log", "wb")  # noqa: SIM115
        agg = subprocess.Popen(
            [
                sys.executable, "-m", "fedstack", "-q", "aggregator",
                "--host", "127.0.0.1", "--port", str(port), "--db", str(d / "agg.db"),
                "--auth", "off", "--min-agents", "2", "--threshold", "0.1",
                "--round-timeout", "30", "--heartbeat-interval", "1",
                "--upload-budget-bytes", str(4 << 20), "--ready-file", str(ready),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        log.close()
        stop = threading.Event()
        url = f"ws://127.0.0.1:{port}"
        rows: list[tuple[str, float, float, float, int]] = []
        try:
            deadline = time.monotonic() + 30
            while not ready.exists():
                if agg.poll() is not None or time.monotonic() > deadline:
                    sys.stderr.write((d / "agg.log").read_text(errors="replace")[-2000:])
                    return 1
                time.sleep(0.05)
            versions: list[int] = []
            agents = [
                threading.Thread(target=honest, args=(url, f"h{i}", i, versions, stop), daemon=True)
                for i in range(2)
            ]
            for t in agents:
                t.start()
            while len(versions) < 4:  # warm up
                time.sleep(0.05)
            probe = Probe(agg.pid, port)
            for name in ("none", *args.only.split(",")):
                time.sleep(3.5)  # the previous attack's sessions expire (3 heartbeats)
                probe.reset()
                base_rss = rss_mib(agg.pid)
                n0, t0 = len(versions), time.monotonic()
                attacker = None
                if name != "none":
                    attacker = subprocess.Popen(
                        [sys.executable, __file__, "--attack", name, "--url", url,
                         "--seconds", str(args.seconds)],
                    )  # fmt: skip
                time.sleep(args.seconds)
                rate = (len(versions) - n0) / 2 / (time.monotonic() - t0)
                if attacker is not None:
                    try:
                        attacker.wait(30)
                    except subprocess.TimeoutExpired:
                        attacker.kill()
                with probe.lock:
                    growth = max(probe.rss, default=base_rss) - base_rss
                    stall = probe.stall
                alive = sum(t.is_alive() for t in agents)
                rows.append((name, rate, growth, stall, alive))
                print(
                    f"{name:10s} rounds/s {rate:7.2f}  RSS growth {growth:7.1f} MiB  "
                    f"longest /healthz {stall * 1000:8.1f} ms  honest agents alive {alive}",
                    flush=True,
                )
            probe.stop.set()
        finally:
            stop.set()
            agg.terminate()
            try:
                agg.wait(15)
            except subprocess.TimeoutExpired:
                agg.kill()
    base = rows[0][1] if rows else 0.0
    print(
        "\n| attack | honest rounds/s | vs. none | RSS growth MiB | longest /healthz ms "
        "| honest agents alive |"
    )
    print("|---|---|---|---|---|---|")
    for name, rate, growth, stall, alive in rows:
        ratio = rate / base if base else float("nan")
        print(
            f"| {name} | {rate:.2f} | {ratio:.2f}x | {growth:.1f} | {stall * 1000:.0f} "
            f"| {alive}/2 |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
