"""Book row 2 (traffic capture): a demo run's traffic holds no training sample.

The demo's federation (three agents on Dirichlet-skewed digits, three rounds; see
``conftest.captured_demo``) runs through a capturing relay. Every byte that crossed it,
raw and as unmasked WebSocket messages, is searched for every training row of every
agent (and every row of the test split), in every encoding an agent could produce from
its data (float32 as the agents hold it, float64, float16, big-endian float32, and the
original 0..16 pixel values as uint8, int32 and int64), at every byte offset; and every
message is decoded with the wire codec and audited: only the pinned types, and tensors
only as the model's two arrays. A control plants one training row in a captured upload,
as a leaking trainer would send it, and the same search finds it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import pytest

from fedstack.data.digits import load_digits_split, partition_digits
from fedstack.testing.capture import CapturedRun, parse_ws
from fedstack.wire import GlobalModel, Message, ModelUpload, Participate, decode, encode_to_bytes
from fedstack.wire.messages import MESSAGE_TYPES


@dataclass(frozen=True)
class Needle:
    agent: int
    row: int
    encoding: str
    data: bytes = field(repr=False)


def encodings(x: np.ndarray) -> dict[str, bytes]:
    """One row of features (float32, pixel / 16) as an agent could put it on the wire."""
    pixels = np.rint(x.astype(np.float64) * 16)
    return {
        "float32": x.astype("<f4").tobytes(),
        "float32-be": x.astype(">f4").tobytes(),
        "float64": x.astype("<f8").tobytes(),
        "float16": x.astype("<f2").tobytes(),
        "uint8-pixels": pixels.astype(np.uint8).tobytes(),
        "int32-pixels": pixels.astype("<i4").tobytes(),
        "int64-pixels": pixels.astype("<i8").tobytes(),
    }


def training_needles(run: CapturedRun) -> list[Needle]:
    out = []
    for agent in range(run.agents):
        x, _ = partition_digits(agent, run.agents, run.partition, run.seed)
        for i, row in enumerate(x):
            out += [Needle(agent, i, k, v) for k, v in encodings(row).items()]
    # the test split too: every agent loads it (its metrics), the aggregator evaluates on it
    _, _, x_test, _ = load_digits_split()
    for i, row in enumerate(x_test):
        out += [Needle(-1, i, k, v) for k, v in encodings(row).items()]
    return out


class Finder:
    """Finds any of many byte strings at any offset of a haystack.

    Each needle is indexed by its most distinctive 8 bytes (an anchor); the haystack's
    8-byte windows at all 8 phases are matched against the anchors at once (numpy), and
    each hit is checked against the whole needle.
    """

    def __init__(self, needles: Iterable[Needle]) -> None:
        self.anchors: dict[int, list[tuple[Needle, int]]] = {}
        for n in needles:
            words = [n.data[i : i + 8] for i in range(0, len(n.data) - 7)]
            off = max(range(len(words)), key=lambda i: len(set(words[i])))
            key = int.from_bytes(n.data[off : off + 8], "little")
            self.anchors.setdefault(key, []).append((n, off))
        self.keys = np.fromiter(self.anchors, dtype=np.uint64)

    def find(self, hay: bytes) -> list[Needle]:
        found = []
        arr = np.frombuffer(hay, np.uint8)
        for phase in range(8):
            words = (len(arr) - phase) // 8
            if words <= 0:
                continue
            view = arr[phase : phase + 8 * words].view("<u8")
            for idx in np.flatnonzero(np.isin(view, self.keys)):
                pos = phase + 8 * int(idx)
                for needle, off in self.anchors[int(view[idx])]:
                    start = pos - off
                    if start >= 0 and hay[start : start + len(needle.data)] == needle.data:
                        found.append(needle)
        return found


@pytest.fixture(scope="module")
def finder(captured_demo: CapturedRun) -> Finder:
    return Finder(training_needles(captured_demo))


def haystacks(run: CapturedRun) -> list[bytes]:
    out = [bytes(link.up) for link in run.links] + [bytes(link.down) for link in run.links]
    for stream in run.up + run.down:
        out += stream.messages
    return out


def test_capture_holds_no_training_row(captured_demo: CapturedRun, finder: Finder) -> None:
    run = captured_demo
    assert len(run.links) >= run.agents
    for stream in run.up:
        assert stream.masked, "agent frames are masked (RFC 6455), so they were unmasked"
    for stream in run.up + run.down:
        # no permessage-deflate: the payloads searched are the payloads sent
        assert b"sec-websocket-extensions" not in stream.handshake.lower()
        assert stream.rsv_bits == {0}
    leaks = [n for hay in haystacks(run) for n in finder.find(hay)]
    assert not leaks, f"training rows on the wire: {leaks[:5]}"


def decoded(run: CapturedRun) -> tuple[list[Message], list[Message]]:
    up = [decode(m) for s in run.up for m in s.messages]
    down = [decode(m) for s in run.down for m in s.messages]
    return up, down


def test_every_captured_message_is_an_audited_type(captured_demo: CapturedRun) -> None:
    run = captured_demo
    up, down = decoded(run)
    assert {m.TYPE for m in up + down} <= set(MESSAGE_TYPES)
    uploads = [m for m in up if isinstance(m, ModelUpload)]
    assert len(uploads) == run.agents * run.rounds, "the capture saw every upload of the run"
    assert sum(isinstance(m, GlobalModel) for m in down) >= run.agents * (run.rounds - 1)
    structure = {"coef": ((10, 64), "float32"), "intercept": ((10,), "float32")}
    for m in up:
        if isinstance(m, Participate | ModelUpload) and m.model is not None:
            assert {k: (v.shape, v.dtype.name) for k, v in m.model.items()} == structure
        if isinstance(m, ModelUpload):
            assert m.extra is None
            assert all(isinstance(v, int | float | bool) for v in m.metrics.values()), m.metrics
            assert len(m.metrics) <= 16


def test_the_search_finds_a_planted_row(captured_demo: CapturedRun, finder: Finder) -> None:
    """Control: an upload whose weights carry one training row (as a trainer leaking its
    data would send it), framed and masked like an agent's frame, is caught."""
    run = captured_demo
    x, _ = partition_digits(1, run.agents, run.partition, run.seed)
    up, _ = decoded(captured_demo)
    upload = next(m for m in up if isinstance(m, ModelUpload))
    coef = np.array(upload.model["coef"], copy=True)
    coef[3] = x[17]
    leaky = encode_to_bytes(
        ModelUpload(
            upload_id=upload.upload_id,
            base_version=upload.base_version,
            num_samples=upload.num_samples,
            metrics=upload.metrics,
            model={**upload.model, "coef": coef},
        )
    )
    key = bytes([0x5A, 0xC3, 0x11, 0x7E])
    masked = (
        np.frombuffer(leaky, np.uint8) ^ np.resize(np.frombuffer(key, np.uint8), len(leaky))
    ).tobytes()
    frame = bytes([0x82, 0x80 | 127]) + len(leaky).to_bytes(8, "big") + key + masked
    stream = bytes(captured_demo.links[0].up) + frame
    assert not finder.find(frame), "masked, the row is not visible in the raw bytes"
    found = {
        (n.agent, n.row, n.encoding) for m in parse_ws(stream).messages for n in finder.find(m)
    }
    assert (1, 17, "float32") in found
