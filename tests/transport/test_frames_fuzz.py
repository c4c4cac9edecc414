"""10,000+ fuzzed inputs through the frame parser, in a few seconds.

The invariants are those of ``bench/fuzz_frames.py`` (its ``check``): only documented
events and errors, limits kept, nothing after the end of the stream, every budget byte
charged and given back, unmutated streams parsed back to what was serialized. Inputs come
from a seeded generator: half raw bytes, half structured streams of frames (fragments,
interleaved control frames, big frames), a third of those with one byte flipped.
"""

from __future__ import annotations

import importlib.util
import random
import time
from pathlib import Path
from types import ModuleType

import pytest

from fedstack.transport import frames

BENCH = Path(__file__).resolve().parents[2] / "bench" / "fuzz_frames.py"


def _fuzz_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fuzz_frames", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _inputs(seed: int, count: int) -> list[bytes]:
    rng = random.Random(seed)
    out = []
    for i in range(count):
        head = bytes(
            [
                i & 1 | rng.randrange(256) & 0xFE,
                rng.randrange(256),
                rng.randrange(256),
                rng.randrange(256),
            ]
        )
        body = rng.randbytes(rng.choice((0, 1, 3, 8, 40, 300, 2000)))
        if rng.random() < 0.3:  # a valid frame prefix, so the rejection is deeper
            body = (
                frames.frame_header(
                    rng.choice((0, 1, 2, 8, 9, 10)),
                    len(body),
                    b"\x01\x02\x03\x04" if rng.random() < 0.8 else None,
                    fin=rng.random() < 0.7,
                )
                + body
            )
        out.append(head + body)
    return out


@pytest.mark.timeout(120)
def test_ten_thousand_fuzzed_inputs_break_no_invariant() -> None:
    check = _fuzz_module().check
    n = 0
    t0 = time.perf_counter()
    for data in _inputs(seed=20261202, count=10_000):
        try:
            check(data)
        except Exception as exc:  # noqa: BLE001 - reported with the reproducer
            pytest.fail(f"input {n} ({data.hex()}): {exc!r}")
        n += 1
    assert n == 10_000
    assert time.perf_counter() - t0 < 60
