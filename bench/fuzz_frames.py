"""Coverage-guided fuzzing of the WebSocket frame parser (``fedstack.transport.frames``).

Each input drives one :class:`~fedstack.transport.frames.FrameParser`: its first bytes pick
the side, the limits, a receive budget and how the stream is cut into reads; the rest is
either fed as raw bytes or, in the structured mode, decoded into a list of frames that the
serializer writes (and one byte may then be flipped), so that both the rejection paths and
the deep states (fragments, interleaved control frames, budget waits) are reached.

Invariants checked on every input: nothing but the parser's events comes out (a protocol
violation is a ``Violation`` event carrying a ``RemoteProtocolError``); no message exceeds
the limit; nothing follows a close or a violation; every counted buffer byte is charged to
the budget and all of it comes back; an unmutated structured stream parses back to exactly
the messages that were serialized. Resident memory must stay bounded.

    python bench/fuzz_frames.py                      # 1,000,000 inputs, seed 1
    python bench/fuzz_frames.py --runs 20000 --seconds 60 --seed 7
    python bench/fuzz_frames.py --engine random      # without atheris (seeded generator)

Prints inputs/s; on a failure prints the reproducer (hex) and exits non-zero.
"""

from __future__ import annotations

import argparse
import os
import random
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

RSS_GROWTH_LIMIT = 256 << 20  # bytes of resident memory the run may gain after warm-up


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Budget:
    """A synchronous receive budget that checks its own books."""

    def __init__(self, limit: int, min_bytes: int) -> None:
        self.limit, self.min_bytes, self.used = limit, min_bytes, 0
        self.waiting: list[tuple[int, Callable[[], None]]] = []

    def counts(self, nbytes: int) -> bool:
        return nbytes >= self.min_bytes

    def request(self, n: int, granted: Callable[[], None], *, held: int = 0) -> bool:
        if n <= 0:
            raise AssertionError(f"budget request of {n} bytes")
        if self.used <= held or self.used + n <= self.limit:
            self.used += n
            return True
        self.waiting.append((n, granted))
        return False

    def cancel(self, granted: Callable[[], None]) -> bool:
        before = len(self.waiting)
        self.waiting = [w for w in self.waiting if w[1] is not granted]
        return len(self.waiting) < before

    def release(self, n: int) -> None:
        self.used -= n
        if self.used < 0:
            raise AssertionError("budget released more than it granted")

    def grant(self) -> None:
        waiting, self.waiting = self.waiting, []
        for n, cb in waiting:
            self.used += n
            cb()


LIMITS = (0, 1, 125, 126, 4096, 65_536, 70_000, 300_000)


def frames_from(data: bytes, rng: random.Random) -> tuple[bytes, list[bytes], bool]:
    """(stream, messages it carries, client side) for the structured mode."""
    from fedstack.transport import frames as fr

    client = rng.random() < 0.3
    out: list[bytes] = []
    messages: list[bytes] = []
    pos = 0
    in_msg: list[bytes] | None = None
    bigs = 0  # big frames so far: at most 2 per input (bounded work per input)
    while pos < len(data):
        kind = data[pos] % 6
        if kind == 5 and bigs == 2:
            kind = 1
        bigs += kind == 5
        n = data[pos + 1] * (1 + data[pos + 2] % 4) if pos + 2 < len(data) else 0
        n = min(n, 300)
        pos += 3
        body = bytes(data[pos : pos + n]).ljust(n, b"\0")
        pos += n
        if kind <= 2:  # a data frame, finishing the message or not
            fin = kind != 0
            opcode = fr.OP_BINARY if in_msg is None else fr.OP_CONT
            in_msg = (in_msg or []) + [body]
            out += [bytes(p) for p in fr.serialize(opcode, [body], mask=not client, fin=fin)]
            if fin:
                messages.append(b"".join(in_msg))
                in_msg = None
        elif kind == 3:
            out += [bytes(p) for p in fr.serialize(fr.OP_PING, [body[:125]], mask=not client)]
        elif kind == 4:
            out += [bytes(p) for p in fr.serialize(fr.OP_PONG, [body[:125]], mask=not client)]
        else:  # a big frame header (length only): exercises the direct receive path
            big = 70_000 + n
            opcode = fr.OP_BINARY if in_msg is None else fr.OP_CONT
            in_msg = (in_msg or []) + [bytes(big)]
            out += [bytes(p) for p in fr.serialize(opcode, [bytes(big)], mask=not client)]
            messages.append(b"".join(in_msg))
            in_msg = None
    return b"".join(out), messages, client


def check(data: bytes) -> None:
    """Run one input; raise AssertionError (or anything unexpected) on a broken invariant."""
    from fedstack.errors import RemoteProtocolError
    from fedstack.transport import frames as fr

    if len(data) < 4:
        return
    rng = random.Random(data[:4])
    structured = data[0] & 1
    expected: list[bytes] | None = None
    if structured:
        stream, expected, client = frames_from(data[4:], rng)
        if data[1] & 1 and stream:  # flip one byte: the parser must still behave
            i = struct.unpack("!H", data[2:4])[0] % len(stream)
            stream = stream[:i] + bytes([stream[i] ^ (1 + data[3] % 255)]) + stream[i + 1 :]
            expected = None
        limit = 1 << 20
    else:
        stream, client = data[4:], bool(data[1] & 1)
        limit = LIMITS[data[2] % len(LIMITS)]
    budget = (
        Budget(rng.choice((1, 1024, 100_000)), rng.choice((1, 64, 65_536))) if data[1] & 2 else None
    )
    cap = rng.choice((None, 0, 100, 65_536))
    p = fr.FrameParser(client=client, max_message_bytes=limit, fragment_cap=cap, budget=budget)
    # how the stream is cut into reads (long streams in bigger reads: bounded work per input)
    reads = (1, 2, 7, 64, 1000, 1 << 20) if len(stream) < 16384 else (4096, 65536, 1 << 20)
    events: list[Any] = []
    buf: memoryview | None = None
    pos = 0
    while pos < len(stream):
        if p.waiting:
            assert budget is not None
            budget.grant()
            events += p.resume()
            continue
        buf = p.get_buffer(-1)
        n = min(len(buf), len(stream) - pos, rng.choice(reads))
        buf[:n] = stream[pos : pos + n]
        pos += n
        events += p.buffer_updated(n)
        if budget is not None and p.capacity and budget.counts(p.capacity):
            assert budget.used >= p.capacity, (budget.used, p.capacity)
    while p.waiting and budget is not None:
        budget.grant()
        events += p.resume()
    got: list[bytes] = []
    ev: Any = None
    for i, ev in enumerate(events):
        if isinstance(ev, fr.Message):
            assert ev.data.nbytes <= limit
            got.append(bytes(ev.data))
        elif isinstance(ev, (fr.Close, fr.Violation)):
            assert i == len(events) - 1, "events after the end of the stream"
            if isinstance(ev, fr.Violation):
                assert isinstance(ev.error, RemoteProtocolError)
                assert ev.close_code in (1002, 1009)
        else:
            assert isinstance(ev, (fr.Ping, fr.Pong)) and len(ev.payload) <= 125
    if (
        expected is not None
        and cap is None
        and not any(isinstance(e, fr.Violation) for e in events)
    ):
        assert got == expected[: len(got)], "a serialized message parsed back differently"
    p.close()
    del events, got, ev, buf  # the messages' buffers go: their budget bytes come back
    if budget is not None:
        budget.grant()  # grants that raced the close give their bytes back
        assert budget.used == 0, f"{budget.used} budget bytes never came back"


class Runner:
    def __init__(self, runs: int, seconds: float) -> None:
        self.runs, self.seconds = runs, seconds
        self.count = 0
        self.t0 = time.perf_counter()
        self.rss0 = 0

    def one(self, data: bytes) -> None:
        try:
            check(data)
        except BaseException:
            print(f"\nFAILED on input {self.count}: reproducer (hex):\n{data.hex()}", flush=True)
            raise
        self.count += 1
        if self.count == 10_000:
            self.rss0 = _rss()
        if self.count % 100_000 == 0:
            self.report(final=False)
        if self.count >= self.runs or time.perf_counter() - self.t0 >= self.seconds:
            self.report(final=True)
            growth = _rss() - self.rss0 if self.rss0 else 0
            if growth > RSS_GROWTH_LIMIT:
                print(f"FAILED: resident memory grew by {growth >> 20} MiB", flush=True)
                os._exit(1)
            os._exit(0)

    def report(self, final: bool) -> None:
        dt = time.perf_counter() - self.t0
        growth = (_rss() - self.rss0) >> 20 if self.rss0 else 0
        print(
            f"{'done' if final else 'progress'}: {self.count:,} inputs in {dt:.1f} s, "
            f"{self.count / dt:,.0f} inputs/s, RSS {_rss() >> 20} MiB "
            f"(+{growth} MiB after warm-up), no failure",
            flush=True,
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=1_000_000)
    ap.add_argument("--seconds", type=float, default=3600.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--max-len", type=int, default=4096)
    ap.add_argument("--artifacts", default="/tmp", help="where libFuzzer writes crash files")
    ap.add_argument("--engine", choices=("atheris", "random"), default="atheris")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
    runner = Runner(args.runs, args.seconds)
    if args.engine == "atheris":
        import atheris

        with atheris.instrument_imports(include=["fedstack.transport.frames"]):
            import fedstack.transport.frames  # noqa: F401
        print(
            f"atheris: {args.runs:,} runs at most, {args.seconds:.0f} s at most, seed {args.seed}",
            flush=True,
        )
        atheris.Setup(
            [
                sys.argv[0],
                f"-seed={args.seed}",
                f"-max_len={args.max_len}",
                "-print_final_stats=0",
                "-rss_limit_mb=4096",
                f"-artifact_prefix={args.artifacts}/",
            ],
            runner.one,
        )
        runner.t0 = time.perf_counter()
        atheris.Fuzz()
    rng = random.Random(args.seed)
    print(f"random: {args.runs:,} runs at most, seed {args.seed}", flush=True)
    while True:
        runner.one(rng.randbytes(rng.randint(4, args.max_len)))


if __name__ == "__main__":
    main()
