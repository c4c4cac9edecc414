"""Coverage-guided fuzzing of the protocol session and the wire codec (atheris/libFuzzer).

Each input is fed to both session roles (:mod:`fedstack.wire.session`) in every state:

* mode 0: raw bytes, decoded by ``receive_bytes`` (a decoder's view of garbage);
* mode 1: a structurally valid but hostile message (absurd versions and intervals, NaN
  and infinite tensors, foreign structures, long strings), encoded by the codec;
* mode 2: a valid encoding with fuzzed bytes overwritten;
* mode 3: a hand-made header (any msgpack value under ``t``/``f``/``x``) and data;
* mode 4: a fuzzed conversation between a linked agent and aggregator session.

Sessions run with and without secure aggregation (its messages legal only with it: the
selector's bits 5 and 6 turn it on for the aggregator's and the agent's session).

Only the documented errors may come out: :class:`~fedstack.errors.RemoteProtocolError`
(with a known ``code``) on receive and :class:`~fedstack.errors.LocalProtocolError` on
send. Anything else is a crash: libFuzzer stops, and this script prints the input
(hex) with the traceback. Invariants are asserted too (a refused message leaves the
session FAILED; an accepted global model is finite, of the federation's structure, never
older than one before).

Usage::

    nice python bench/fuzz_session.py                  # 1,000,000 inputs
    python bench/fuzz_session.py --runs 20000 --seconds 60 --seed 7

The run is seeded (``--seed``), bounded in inputs (``--runs``) and time (``--seconds``),
and in memory (``--rss-mb``, libFuzzer's limit; decoder limits of 1 MiB per message).
Exit status: 0 when every input ended in a documented outcome.
"""

from __future__ import annotations

import sys

if __name__ == "__main__" and "--child" in sys.argv:  # instrument fedstack for coverage
    import atheris

    _instrumented = atheris.instrument_imports(include=["fedstack"])
    _instrumented.__enter__()

import argparse  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import fields  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import msgpack  # noqa: E402
import numpy as np  # noqa: E402

from fedstack.errors import LocalProtocolError, RemoteProtocolError  # noqa: E402
from fedstack.wire import tensors  # noqa: E402
from fedstack.wire.codec import MAGIC, Limits, encode, encode_to_bytes  # noqa: E402
from fedstack.wire.messages import (  # noqa: E402
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    Bye,
    Error,
    GlobalModel,
    Heartbeat,
    Message,
    ModelUpload,
    NotReady,
    Participate,
    Poll,
    SecAggAbort,
    SecAggForward,
    SecAggKeys,
    SecAggRoster,
    SecAggShares,
    SecAggStart,
    SecAggUnmask,
    SecAggUnmaskShares,
    UploadAck,
    Welcome,
)
from fedstack.wire.session import (  # noqa: E402
    MAX_VERSION,
    AgentSession,
    AggregatorSession,
    GlobalModelReceived,
    State,
    Welcomed,
)

if "_instrumented" in globals():
    _instrumented.__exit__(None, None, None)

LIMITS = Limits(
    max_message_bytes=1 << 20,
    max_header_bytes=1 << 16,
    max_tensors=64,
    max_name_len=64,
    max_str_len=512,
    max_metrics=32,
)
"""Small decoder limits: every input's memory is bounded by them."""

CODES = frozenset(
    {
        "malformed",
        "unsupported-version",
        "unknown-type",
        "bad-field",
        "bad-tensor",
        "bad-dtype",
        "too-large",
        "expected-participate",
        "unexpected-message",
        "bad-message",
        "invalid-model",
        "bad-name",
    }
)
"""Every ``code`` a RemoteProtocolError from decoding or a session may carry."""

MODEL = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.zeros(3, np.float32)}

Session = AgentSession | AggregatorSession


# ---------------------------------------------------------------------- sessions in each state
def _welcome(version: int = 0, secagg: bool = False) -> Welcome:
    return Welcome(
        config={"secagg": True} if secagg else {},
        agent_id="a",
        aggregator_id="g",
        run_id="r",
        version=version,
        round=version + 1,
        model_id="m",
        model=MODEL,
        delivery="push",
    )


def _agg(state: int, secagg: bool = False) -> AggregatorSession:
    s = AggregatorSession(LIMITS, secagg=secagg)
    if state >= 1:
        s.receive(Participate(agent_name="a1"))
    if state >= 2:
        s.send(_welcome())
    return s


def _agent(state: int, poll: bool = False, secagg: bool = False) -> AgentSession:
    s = AgentSession(LIMITS)
    if state >= 1:
        s.send(Participate(agent_name="a1"))
    if state >= 2:
        w = _welcome(3, secagg)
        if poll:
            w = Welcome(**{**w.__dict__, "delivery": "poll"})
        s.receive(w)
        s.queue_upload(ModelUpload(upload_id="u1", base_version=3, num_samples=1, model=MODEL))
    return s


def sessions(selector: int) -> list[Session]:
    """Sessions of both roles in the states picked by ``selector`` (always both roles)."""
    return [
        _agg(selector % 3, secagg=bool(selector & 32)),
        _agent((selector // 3) % 3, poll=bool(selector & 16), secagg=bool(selector & 64)),
    ]


# ---------------------------------------------------------------------- receiving
def feed(s: Session, data: bytes | Message) -> None:
    """Give ``data`` to ``s``; only documented errors may come out."""
    before = s.state
    known = s.known_version if isinstance(s, AgentSession) else -1
    structure = s.structure if isinstance(s, AgentSession) else None
    run = s.run_id if isinstance(s, AgentSession) else None
    try:
        ev = s.receive_bytes(data) if isinstance(data, bytes) else s.receive(data)
    except RemoteProtocolError as exc:
        assert exc.code in CODES, f"undocumented code {exc.code!r}"
        expected = State.CLOSED if before is State.CLOSED else State.FAILED
        assert s.state is expected, f"refused in {before}, now {s.state}"
        return
    if isinstance(s, AgentSession):
        assert s.known_version >= known, "the known version went backwards"
        if isinstance(ev, GlobalModelReceived):
            _check_model(ev.message.model, ev.message.version, s, structure, run)
        elif isinstance(ev, Welcomed) and ev.message.model is not None:
            _check_model(ev.message.model, ev.message.version, s, structure, run)
            assert s.heartbeat_interval > 0


def _check_model(
    model: dict[str, Any],
    version: int,
    s: AgentSession,
    structure: list[Any] | None,
    run: str | None,
) -> None:
    assert 0 <= version <= MAX_VERSION or version == -1
    assert s.structure == tensors.structure(model), "the structure is not the model's"
    if structure is not None and s.run_id == run:
        assert tensors.structure(model) == structure, "a foreign structure was accepted"
    for arr in model.values():
        assert bool(np.isfinite(arr).all()) or not s.check_values, "NaN accepted"


# ---------------------------------------------------------------------- hostile values
class Source:
    """Values drawn from the fuzzer's bytes (zeros when they run out)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def byte(self) -> int:
        if self.pos >= len(self.data):
            return 0
        self.pos += 1
        return self.data[self.pos - 1]

    def take(self, n: int) -> bytes:
        out = self.data[self.pos : self.pos + n]
        self.pos += len(out)
        return out

    def pick(self, options: list[Any]) -> Any:
        return options[self.byte() % len(options)]

    def int(self) -> int:
        return int(
            self.pick(
                [
                    0,
                    1,
                    -1,
                    3,
                    2**31,
                    2**53,
                    2**53 + 1,
                    2**62,
                    -(2**62),
                    int.from_bytes(self.take(8) or b"\0", "little", signed=True)
                    >> (self.byte() % 64),
                ]
            )
        )

    def float(self) -> float:
        return float(
            self.pick(
                [
                    0.0,
                    -0.0,
                    1e-9,
                    0.5,
                    5.0,
                    1e300,
                    math.nan,
                    math.inf,
                    -math.inf,
                    -1.0,
                    float(np.frombuffer((self.take(8) + bytes(8))[:8], dtype="<f8")[0]),
                ]
            )
        )

    def str(self) -> str:
        n = self.pick([0, 1, 4, 16, 600, 5000])
        raw = self.take(min(n, 64)).decode("utf-8", "replace")
        return self.pick(["a1", "", raw, "x" * n, "poll", "push", raw * (n // 64 + 1)])

    def metrics(self) -> dict[str, Any]:
        return {
            self.str()[:200] or "k": self.pick([self.int(), self.float(), self.str(), True])
            for _ in range(self.byte() % 4)
        }

    def weights(self) -> dict[str, Any] | None:
        if self.byte() % 5 == 0:
            return None
        if self.byte() % 3 == 0:  # the federation's model, possibly poisoned
            out = {k: v.copy() for k, v in MODEL.items()}
            if self.byte() % 2:
                with np.errstate(over="ignore", invalid="ignore"):
                    out["b"][self.byte() % 3] = self.float()
            return out
        out: dict[str, Any] = {}
        for _ in range(self.byte() % 4):
            dtype = self.pick(list(tensors.DTYPES))
            shape = tuple(self.byte() % 5 for _ in range(self.byte() % 3))
            count = math.prod(shape)
            itemsize = tensors.DTYPES[dtype].itemsize
            raw = (self.take(count * itemsize) + bytes(count * itemsize))[: count * itemsize]
            name = self.pick(["w", "b", "x", self.str()[:80] or "t"])
            out[name] = np.frombuffer(raw, dtype=tensors.DTYPES[dtype]).reshape(shape)
        return out


_KIND_VALUES: dict[str, Callable[[Source], Any]] = {
    "str": Source.str,
    "str | None": lambda s: s.pick([None, s.str()]),
    "int": Source.int,
    "int | None": lambda s: s.pick([None, s.int()]),
    "float": Source.float,
    "bool": lambda s: bool(s.byte() & 1),
    "bool | None": lambda s: s.pick([None, True, False]),
    "Metrics": Source.metrics,
    "Weights": lambda s: s.weights() or MODEL,
    "Weights | None": Source.weights,
    "list[str]": lambda s: s.pick([[], [s.str()], ["ws://127.0.0.1:1", s.str()]]),
    "bytes": lambda s: s.pick([b"", s.take(32), bytes(32), s.take(s.byte())]),
    "AgentIds": lambda s: s.pick([[], ["a1", "a2"], [s.str()[:60] or "a"] * (s.byte() % 8)]),
    "ByteMap": lambda s: {
        (s.str()[:60] or "a"): s.pick([s.take(92), bytes(92), s.take(s.byte())])
        for _ in range(s.byte() % 4)
    },
    "IntMap": lambda s: {(s.str()[:60] or "a"): s.int() for _ in range(s.byte() % 4)},
}


def hostile_message(src: Source) -> Message:
    """A message of a fuzzed type with fuzzed (type-correct) field values."""
    cls = src.pick(list(MESSAGE_TYPES.values()))
    kwargs = {f.name: _KIND_VALUES[str(f.type)](src) for f in fields(cls)}
    return cls(**kwargs)  # type: ignore[no-any-return]


def hand_made(src: Source) -> bytes:
    """A message with a fuzzed msgpack header (any shape) and fuzzed data."""

    def value(depth: int) -> Any:
        k = src.byte() % 9
        if depth > 2 or k == 0:
            return src.int()
        if k == 1:
            return src.float()
        if k == 2:
            return src.str()
        if k == 3:
            return [value(depth + 1) for _ in range(src.byte() % 6)]
        if k == 4:
            return {src.str()[:20]: value(depth + 1) for _ in range(src.byte() % 4)}
        if k == 5:  # a tensor entry
            return [
                src.pick(["w", "b", src.str()[:10]]),
                src.pick(list(tensors.DTYPES) + ["object", "<f4"]),
                [src.byte() % 4 for _ in range(src.byte() % 3)],
                src.int(),
                src.int(),
            ]
        return src.pick([None, True, b"\x00", src.byte()])

    tag = src.pick([*MESSAGE_TYPES, src.str()[:20], 7])
    cls = MESSAGE_TYPES.get(tag) if isinstance(tag, str) else None
    names = [f.name for f in fields(cls)] if cls else ["x"]
    header: Any = {
        "t": tag,
        "f": {src.pick(names): value(0) for _ in range(src.byte() % 8)},
        "x": {
            src.pick(names): [value(1) for _ in range(src.byte() % 3)]
            for _ in range(src.byte() % 2)
        },
    }
    if src.byte() % 8 == 0:
        header = value(0)
    try:
        packed = msgpack.packb(header, use_bin_type=True)
    except (ValueError, TypeError, OverflowError):
        packed = b"\xc1"
    prefix = MAGIC + bytes([src.pick([PROTOCOL_VERSION, PROTOCOL_VERSION, 0, 255]), 0])
    prefix += len(packed).to_bytes(4, "little")
    head = prefix + packed
    return head + bytes(tensors.padding(len(head))) + src.take(src.byte() * 4)


SAMPLES: list[Message] = [
    Participate(agent_name="a1", model=MODEL),
    _welcome(3),
    ModelUpload(upload_id="u1", base_version=0, num_samples=3, model=MODEL),
    UploadAck(upload_id="u1", status="accepted", round=1),
    GlobalModel(version=4, model_id="m", model=MODEL),
    Poll(known_version=0, wait=1.0),
    NotReady(version=0, round=1),
    Error(code="revoked", message="x", fatal=True),
    Error(code="invalid-model", message="x"),
    Heartbeat(seq=1),
    Bye(reason="x"),
    SecAggStart(session="r:1:1:b", round=1),
    SecAggKeys(session="r:1:1:b", c_pk=b"c" * 32, s_pk=b"s" * 32, b_commit=b"b" * 32),
    SecAggRoster(session="r:1:1:b", threshold=2, keys={"a2": b"k" * 96}, index={"a1": 1}),
    SecAggShares(session="r:1:1:b", shares={"a2": b"x" * 92}),
    SecAggForward(session="r:1:1:b", shares={"a2": b"x" * 92}),
    SecAggUnmask(session="r:1:1:b", survivors=["a1", "a2"], dropped=["a3"]),
    SecAggUnmaskShares(session="r:1:1:b", b_shares={"a2": b"x" * 40}, sk_shares={}),
    SecAggAbort(session="r:1:1:b", code="secagg-too-few", reason="x"),
]
ENCODED = [encode_to_bytes(m) for m in SAMPLES]


# ---------------------------------------------------------------------- the target
def one_input(data: bytes) -> None:
    """Run one fuzz input (the libFuzzer target; also called by the test suite)."""
    if len(data) < 2:
        return
    mode, selector, payload = data[0] % 5, data[1], data[2:]
    src = Source(payload)
    if mode == 0:
        for s in sessions(selector):
            feed(s, payload)
    elif mode == 1:
        msg = hostile_message(src)
        try:
            raw = b"".join(bytes(p) for p in encode(msg, LIMITS))
        except LocalProtocolError:
            raw = None
        for s in sessions(selector):
            feed(s, raw if raw is not None else msg)
    elif mode == 2:
        raw = bytearray(ENCODED[selector % len(ENCODED)])
        for _ in range(1 + src.byte() % 4):
            pos = int.from_bytes(src.take(2) or b"\0", "little") % len(raw)
            chunk = src.take(1 + src.byte() % 8)
            raw[pos : pos + len(chunk)] = chunk
        if src.byte() % 4 == 0:
            raw = raw[: int.from_bytes(src.take(2) or b"\0", "little") % (len(raw) + 1)]
        for s in sessions(selector):
            feed(s, bytes(raw))
    elif mode == 3:
        raw = hand_made(src)
        for s in sessions(selector):
            feed(s, raw)
    else:
        conversation(src)


def conversation(src: Source) -> None:
    """A linked pair exchanging fuzzed messages in a fuzzed order."""
    agent, agg = AgentSession(LIMITS), AggregatorSession(LIMITS, secagg=bool(src.byte() & 1))
    for _ in range(1 + src.byte() % 8):
        msg = src.pick(SAMPLES) if src.byte() % 2 else hostile_message(src)
        sender, receiver = (agent, agg) if src.byte() % 2 else (agg, agent)
        before = sender.state
        try:
            parts = sender.send(msg)
        except LocalProtocolError:
            assert sender.state is before, "a refused send changed the state"
            continue
        feed(receiver, b"".join(bytes(p) for p in parts))


# ---------------------------------------------------------------------- driver
def _seed_corpus(directory: Path) -> None:
    for i, raw in enumerate(ENCODED):
        for mode in range(5):
            (directory / f"seed-{i}-{mode}").write_bytes(bytes([mode, i]) + raw[:2048])


def _child(libfuzzer_args: list[str]) -> None:
    atheris.Setup([sys.argv[0], *libfuzzer_args], one_input)
    atheris.Fuzz()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--runs", type=int, default=1_000_000, help="inputs to run")
    p.add_argument("--seconds", type=int, default=3600, help="stop after this long")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--max-len", type=int, default=4096, help="longest input, bytes")
    p.add_argument("--rss-mb", type=int, default=1024, help="memory limit of the fuzzer")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fuzz-session-") as tmp:
        corpus, artifacts = Path(tmp, "corpus"), Path(tmp, "artifacts")
        corpus.mkdir()
        artifacts.mkdir()
        _seed_corpus(corpus)
        cmd = [
            sys.executable,
            __file__,
            "--child",
            f"-runs={args.runs}",
            f"-seed={args.seed}",
            f"-max_total_time={args.seconds}",
            f"-rss_limit_mb={args.rss_mb}",
            f"-malloc_limit_mb={args.rss_mb}",
            f"-max_len={args.max_len}",
            "-print_final_stats=1",
            f"-artifact_prefix={artifacts}/",
            str(corpus),
        ]
        t0 = time.monotonic()
        proc = subprocess.run(
            cmd,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            check=False,
        )
        wall = time.monotonic() - t0
        stats = dict(re.findall(r"stat::(\w+):\s*(\d+)", proc.stderr))
        runs = int(stats.get("number_of_executed_units", 0))
        print(
            f"inputs: {runs:,} in {wall:.1f} s ({runs / max(wall, 1e-9):,.0f} inputs/s; "
            f"libFuzzer {int(stats.get('average_exec_per_sec', 0)):,}/s), "
            f"peak RSS {stats.get('peak_rss_mb', '?')} MiB, seed {args.seed}"
        )
        crashes = sorted(artifacts.iterdir())
        if proc.returncode != 0 or crashes:
            print(f"FAILED (exit status {proc.returncode})", file=sys.stderr)
            print("\n".join(proc.stderr.splitlines()[-40:]), file=sys.stderr)
            for path in crashes:
                print(f"reproducer {path.name}: {path.read_bytes().hex()}", file=sys.stderr)
            return 1
        print("no unexpected exception")
        return 0


if __name__ == "__main__":
    if "--child" in sys.argv:
        _child([a for a in sys.argv[1:] if a != "--child"])
    else:
        sys.exit(main())
    os._exit(0)  # pragma: no cover - libFuzzer exits on its own
