"""Segments: a message decoded from its encoded parts, without joining them."""

from __future__ import annotations

import numpy as np
import pytest

from fedstack.errors import RemoteProtocolError
from fedstack.wire import ModelUpload, Segments, decode, encode, encode_to_bytes


def _upload() -> ModelUpload:
    rng = np.random.default_rng(0)
    return ModelUpload(
        upload_id="u1",
        base_version=3,
        num_samples=7,
        metrics={"acc": 0.5},
        model={
            "a": rng.standard_normal((4, 5)).astype(np.float32),
            "b": np.arange(3, dtype=np.int64),
            "c": np.zeros(0, np.float32),
        },
        extra={"e": np.ones(2, np.float64)},
    )


def _same(x: ModelUpload, y: ModelUpload) -> None:
    assert (x.upload_id, x.base_version, x.num_samples, x.metrics) == (
        y.upload_id,
        y.base_version,
        y.num_samples,
        y.metrics,
    )
    for a, b in ((x.model, y.model), (x.extra or {}, y.extra or {})):
        assert list(a) == list(b)
        for k in a:
            assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
            np.testing.assert_array_equal(a[k], b[k])


def test_the_encoded_parts_decode_as_views_of_the_senders_arrays() -> None:
    msg = _upload()
    got = decode(Segments(encode(msg)))
    assert isinstance(got, ModelUpload)
    _same(got, msg)
    assert np.shares_memory(got.model["a"], msg.model["a"])  # no copy
    assert not got.model["a"].flags.writeable  # and the receiver cannot change them
    with pytest.raises(ValueError):
        got.model["a"][0, 0] = 1.0


@pytest.mark.parametrize("cuts", [[1], [5, 9, 100], list(range(1, 400, 7))])
def test_parts_cut_anywhere_decode_like_the_joined_bytes(cuts: list[int]) -> None:
    data = encode_to_bytes(_upload())
    bounds = [0, *[c for c in cuts if c < len(data)], len(data)]
    pieces = [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    got = decode(Segments(pieces))
    assert isinstance(got, ModelUpload)
    _same(got, decode(data))  # type: ignore[arg-type]


def test_broken_messages_are_refused_as_with_bytes() -> None:
    data = encode_to_bytes(_upload())
    for bad in (data[:-8], data[:6], b"XX" + data[2:], data + bytes(64)):
        with pytest.raises(RemoteProtocolError) as direct:
            decode(bad)
        with pytest.raises(RemoteProtocolError) as parts:
            decode(Segments([bad[:3], bad[3:50], bad[50:]]))
        assert parts.value.code == direct.value.code


def test_slices() -> None:
    seg = Segments([b"abc", memoryview(b"defg"), bytearray(b"hi")])
    assert len(seg) == seg.nbytes == 9
    assert bytes(seg[2:6].contiguous()) == b"cdef"
    assert bytes(seg[3:7].contiguous()) == b"defg"
    part = np.arange(10, dtype=np.uint8)
    inner = Segments([b"ab", part.data])[3:6].contiguous()
    assert np.shares_memory(np.frombuffer(inner, np.uint8), part)  # inside a part: a view
    assert bytes(inner) == bytes([1, 2, 3])
    assert bytes(seg[8:].contiguous()) == b"i"
    assert seg[5:5].nbytes == 0 and bytes(seg[7:3].contiguous()) == b""
    assert seg[:].contiguous().readonly
    with pytest.raises(TypeError):
        seg[::2]
