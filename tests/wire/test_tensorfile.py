"""Tensor files in the safetensors layout: round trips, interop with the safetensors
library, and refusal of every malformed header."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedstack.errors import LocalProtocolError, StoreError, TensorFileError
from fedstack.wire import tensorfile


def sample() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {
        "flags": np.array([True, False, True]),  # 3 bytes first: the layout re-aligns
        "w": rng.standard_normal((3, 5)).astype(np.float32),
        "b": rng.standard_normal(5),
        "h": rng.standard_normal(7).astype(np.float16),
        "i8": rng.integers(-5, 5, size=(2, 2), dtype=np.int8),
        "u64": rng.integers(0, 2**63, size=3, dtype=np.uint64),
        "scalar": np.array(2.5, np.float32),
        "empty": np.zeros((0, 4), np.float32),
    }


def joined(parts: list[bytes | memoryview]) -> bytes:
    return b"".join(bytes(p) for p in parts)


def file_of(header: object, data: bytes = b"") -> memoryview:
    text = json.dumps(header).encode()
    return memoryview(struct.pack("<Q", len(text)) + text + data)


def test_roundtrip_keeps_order_dtypes_and_metadata_and_returns_aligned_views() -> None:
    w = sample()
    data = joined(tensorfile.encode(w, {"upload_id": "u1"}))
    got, meta = tensorfile.decode(memoryview(data))
    assert list(got) == list(w) and meta == {"upload_id": "u1"}
    for k, v in w.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape
        np.testing.assert_array_equal(got[k], v)
    backing = np.frombuffer(data, np.uint8)
    for a in got.values():
        if a.size:
            assert np.shares_memory(a, backing) and a.flags.aligned


def test_encode_does_not_copy_contiguous_arrays() -> None:
    big = np.arange(1000, dtype=np.float32)
    parts = tensorfile.encode({"big": big})
    assert np.shares_memory(np.frombuffer(parts[1], np.uint8), big)


def test_safetensors_library_reads_what_we_write_and_we_read_what_it_writes(
    tmp_path: Path,
) -> None:
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    w = sample()
    path = tmp_path / "m.safetensors"
    path.write_bytes(joined(tensorfile.encode(w, {"k": "v"})))
    loaded = safetensors_numpy.load_file(str(path))
    assert set(loaded) == set(w)
    for k, v in w.items():
        np.testing.assert_array_equal(loaded[k], v)
    theirs = safetensors_numpy.save(
        {k: np.ascontiguousarray(v) for k, v in w.items()}, metadata={"a": "b"}
    )
    got, meta = tensorfile.decode(memoryview(theirs))
    assert meta == {"a": "b"} and set(got) == set(w)
    for k, v in w.items():
        np.testing.assert_array_equal(got[k], v)


def test_encode_refuses_what_the_format_cannot_hold() -> None:
    with pytest.raises(LocalProtocolError):
        tensorfile.encode({"c": np.zeros(2, np.complex64)})
    with pytest.raises(LocalProtocolError, match="reserved"):
        tensorfile.encode({"__metadata__": np.zeros(2)})
    with pytest.raises(LocalProtocolError, match="strings"):
        tensorfile.encode({"a": np.zeros(2)}, {"n": 1})  # type: ignore[dict-item]


def entry(
    dtype: str = "F32", shape: list[int] | None = None, offsets: list[int] | None = None
) -> dict[str, object]:
    return {
        "dtype": dtype,
        "shape": [2] if shape is None else shape,
        "data_offsets": [0, 8] if offsets is None else offsets,
    }


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (memoryview(b"\x01\x00"), "too short"),
        (memoryview(struct.pack("<Q", 1 << 40) + b"{}"), "header length"),
        (memoryview(struct.pack("<Q", 10) + b"{}"), "header length"),
        (memoryview(struct.pack("<Q", 3) + b"{x}"), "JSON"),
        (memoryview(struct.pack("<Q", 2) + b"\xff\xfe"), "JSON"),
        (file_of([1, 2]), "object"),
        (memoryview(struct.pack("<Q", 20000) + b"[" * 10000 + b"]" * 10000), "JSON"),
        (memoryview(struct.pack("<Q", 14) + b'{"a":1, "a":2}'), "twice"),
        (file_of({"__metadata__": {"k": 1}}), "strings"),
        (file_of({"a": entry(dtype="BF16")}, b"\0" * 4), "not allowed"),
        (file_of({"a": entry(dtype="O")}, b"\0" * 8), "not allowed"),
        (file_of({"a b": entry()}, b"\0" * 8), "characters"),
        (file_of({"a": {**entry(), "extra": 1}}, b"\0" * 8), "exactly"),
        (file_of({"a": entry(shape=[-1])}, b"\0" * 8), "shape"),
        (file_of({"a": entry(shape=[2] * 9)}, b"\0" * 8), "shape"),
        (file_of({"a": entry(offsets=[8, 0])}, b"\0" * 8), "data_offsets"),
        (file_of({"a": entry(offsets=[0, 12])}, b"\0" * 12), "do not match"),
        (file_of({"a": entry(offsets=[4, 12])}, b"\0" * 12), "contiguous"),
        (file_of({"a": entry(), "b": entry()}, b"\0" * 16), "contiguous"),
        (file_of({"a": entry()}, b"\0" * 4), "covers"),
        (file_of({"a": entry()}, b"\0" * 9), "covers"),
    ],
)
def test_decode_refuses_malformed_files(data: memoryview, match: str) -> None:
    with pytest.raises(TensorFileError, match=match) as info:
        tensorfile.decode(data)
    assert isinstance(info.value, StoreError)


def test_decode_limits() -> None:
    data = memoryview(joined(tensorfile.encode({"a": np.zeros(1), "b": np.zeros(1)})))
    with pytest.raises(TensorFileError, match="limit"):
        tensorfile.decode(data, max_tensors=1)
    with pytest.raises(TensorFileError, match="header length"):
        tensorfile.decode(data, max_header_bytes=16)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.integers(0, 199), st.integers(0, 255))
def test_damaged_files_raise_only_the_documented_error(junk: bytes, pos: int, byte: int) -> None:
    good = bytearray(joined(tensorfile.encode(sample(), {"m": "x"})))
    good[pos % len(good)] = byte
    for data in (bytes(good), junk, bytes(good[: pos % len(good)])):
        try:
            tensorfile.decode(memoryview(data))
        except TensorFileError:
            pass
