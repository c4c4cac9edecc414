"""The wire codec: exact round trips, zero-copy decoding, and rejection of bad input."""

from __future__ import annotations

import dataclasses
import math
import os
import pickle
import struct
from typing import Any, cast

import msgpack
import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedstack.errors import MessageTooLarge, RemoteProtocolError
from fedstack.names import NAME_PATTERN
from fedstack.types import Weights
from fedstack.wire import (
    SecAggAbort,
    SecAggForward,
    SecAggKeys,
    SecAggRoster,
    SecAggShares,
    SecAggStart,
    SecAggUnmask,
    SecAggUnmaskShares,
    codec,
    tensors,
)
from fedstack.wire.codec import Limits, decode, encode, encode_to_bytes, encoded_size
from fedstack.wire.messages import (
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
    UploadAck,
    Welcome,
)

FUZZ = settings(
    max_examples=400,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
PROPERTY = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

WEIGHT_TYPES = [
    cls for cls in MESSAGE_TYPES.values() if any(f.name == "model" for f in dataclasses.fields(cls))
]


# ---------------------------------------------------------------------------- helpers
def assert_weights_equal(got: Any, want: Any) -> None:
    if want is None:
        assert got is None
        return
    assert isinstance(got, dict)
    assert list(got) == list(want)
    for name, w in want.items():
        w = np.asarray(w)
        g = got[name]
        assert isinstance(g, np.ndarray)
        assert g.shape == w.shape, name
        assert g.dtype == w.dtype.newbyteorder("<"), name
        assert g.dtype.str[0] in "<|", name  # always little-endian (or byte-sized)
        assert np.array_equal(g, w, equal_nan=g.dtype.kind == "f"), name
        # bit-exact (covers -0.0 and NaN payloads too)
        assert g.tobytes() == np.ascontiguousarray(w, dtype=g.dtype).tobytes(), name


def assert_msg_equal(got: Message, want: Message) -> None:
    assert type(got) is type(want)
    for f in dataclasses.fields(want):
        g, w = getattr(got, f.name), getattr(want, f.name)
        if f.name in ("model", "extra"):
            assert_weights_equal(g, w)
        else:
            assert g == w, f.name
            assert type(g) is type(w), f.name
            if isinstance(w, dict):
                for k in w:
                    assert type(g[k]) is type(w[k]), (f.name, k)


def roundtrip(msg: Message, limits: Limits = codec.DEFAULT_LIMITS) -> Message:
    data = encode_to_bytes(msg)
    assert encoded_size(encode(msg)) == len(data)
    out = decode(data, limits)
    assert_msg_equal(out, msg)
    return out


def model() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "dense/kernel": rng.standard_normal((3, 4)).astype(np.float32),
        "dense/bias": np.arange(4, dtype=np.float32),
        "bn.num_batches": np.array([7], dtype=np.int64),
        "mask[0]": np.array([True, False, True]),
        "emb:weight-1": rng.integers(0, 255, size=(2, 2, 2), dtype=np.uint8),
    }


def samples() -> list[Message]:
    return [
        Participate(
            agent_name="agent-1",
            token="s3cret",
            model=model(),
            init_weights=True,
            num_samples=120,
            metrics={"acc": 0.5, "n": 3, "tag": "x", "ok": True},
            known_version=4,
            client="fedstack/0.1",
        ),
        Welcome(
            agent_id="a" * 32,
            aggregator_id="g" * 32,
            run_id="r" * 32,
            version=3,
            round=4,
            model_id="m" * 32,
            model=model(),
            delivery="poll",
            finished=True,
            heartbeat_interval=2.5,
        ),
        ModelUpload(
            upload_id="u-1",
            base_version=3,
            num_samples=10,
            metrics={"loss": 0.25, "neg": -1},
            model=model(),
        ),
        UploadAck(upload_id="u-1", status="accepted", round=4, message="ok"),
        GlobalModel(version=4, model_id="m1", model=model(), final=True),
        Poll(known_version=3, wait=1.5),
        NotReady(version=3, round=4),
        Error(code="bad-field", message="no", fatal=True),
        Heartbeat(seq=2**40),
        Bye(reason="done"),
        SecAggStart(session="run:1:1:ab", round=1),
        SecAggKeys(session="run:1:1:ab", c_pk=b"c" * 32, s_pk=b"s" * 32, b_commit=b"b" * 32),
        SecAggRoster(
            session="run:1:1:ab", threshold=2, keys={"a2": b"k" * 96}, index={"a1": 1, "a2": 2}
        ),
        SecAggShares(session="run:1:1:ab", shares={"a2": b"\x00\xff" * 46}),
        SecAggForward(session="run:1:1:ab", shares={"a1": b"\x01" * 92}),
        SecAggUnmask(session="run:1:1:ab", survivors=["a1", "a2"], dropped=[]),
        SecAggUnmaskShares(session="run:1:1:ab", b_shares={"a1": b"x" * 16}, sk_shares={}),
        SecAggAbort(session="run:1:1:ab", code="secagg-too-few", reason="2 < 3"),
    ]


def raw(
    header: object,
    data: bytes = b"",
    *,
    version: int = PROTOCOL_VERSION,
    magic: bytes = b"FS",
    header_len: int | None = None,
    pad: bool = True,
) -> bytes:
    """A hand-made message: prefix, msgpack ``header``, padding to 64, ``data``."""
    hb: bytes = msgpack.packb(header, use_bin_type=True)
    n = len(hb) if header_len is None else header_len
    out = struct.pack("<2sBBI", magic, version, 0, n) + hb
    if pad:
        out += bytes(tensors.padding(len(out)))
    return out + data


def gm_header(table: list[list[object]], **fields: object) -> dict[str, object]:
    f: dict[str, object] = {"version": 1, "model_id": "m"}
    f.update(fields)
    return {"t": "global_model", "f": f, "x": {"model": table}}


def rejects(
    data: bytes | bytearray | memoryview,
    code: str | None = None,
    limits: Limits = codec.DEFAULT_LIMITS,
) -> RemoteProtocolError:
    with pytest.raises(RemoteProtocolError) as info:
        decode(data, limits)
    if code is not None:
        assert info.value.code == code, str(info.value)
    return info.value


# ---------------------------------------------------------------------------- round trips
@pytest.mark.parametrize(
    ("field", "value", "why"),
    [
        # the header's decoder stops these before the fields are read
        ("c_pk", b"x" * (codec.MAX_BYTES + 1), "max_bin_len"),
        ("shares", {f"a{i}": b"x" for i in range(codec.MAX_MAP_ITEMS + 1)}, "max_map_len"),
        ("survivors", ["a"] * (codec.MAX_IDS + 1), "max_array_len"),
        # the field checks
        ("c_pk", "not bytes", "at most"),
        ("shares", {"a": "text"}, "bytes"),
        ("shares", {"": b"x"}, "agent ids"),
        ("index", {"a": "1"}, "integers"),
        ("survivors", [""], "agent ids"),
        ("survivors", "a", "at most"),
    ],
)
def test_secagg_fields_are_bounded(field: str, value: object, why: str) -> None:
    tag = {
        "c_pk": "secagg_keys",
        "shares": "secagg_shares",
        "index": "secagg_roster",
        "survivors": "secagg_unmask",
    }[field]
    base: dict[str, dict[str, object]] = {
        "secagg_keys": {"session": "s", "c_pk": b"c", "s_pk": b"s", "b_commit": b"b"},
        "secagg_shares": {"session": "s", "shares": {}},
        "secagg_roster": {"session": "s", "threshold": 1, "keys": {}, "index": {}},
        "secagg_unmask": {"session": "s", "survivors": [], "dropped": []},
    }
    fields = {**base[tag], field: value}
    limits = Limits(max_header_bytes=1 << 22)
    err = rejects(raw({"t": tag, "f": fields, "x": {}}), None, limits)
    assert err.code == ("malformed" if why.startswith("max_") else "bad-field"), str(err)
    assert why in str(err)


def test_samples_cover_every_message_type() -> None:
    assert {m.TYPE for m in samples()} == set(MESSAGE_TYPES)
    assert {type(m) for m in samples()} == set(MESSAGE_TYPES.values())


@pytest.mark.parametrize("msg", samples(), ids=lambda m: m.TYPE)
def test_roundtrip_every_message_type(msg: Message) -> None:
    roundtrip(msg)


@pytest.mark.parametrize("cls", MESSAGE_TYPES.values(), ids=lambda c: c.TYPE)
def test_roundtrip_with_defaults_only(cls: type[Message]) -> None:
    kwargs: dict[str, object] = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING:
            continue
        kwargs[f.name] = {
            "str": "s",
            "int": 0,
            "Weights": {},
            "Weights | None": None,
            "float": 0.0,
            "bytes": b"",
            "AgentIds": [],
            "ByteMap": {},
            "IntMap": {},
        }[str(f.type)]
    roundtrip(cls(**kwargs))


@pytest.mark.parametrize("cls", WEIGHT_TYPES, ids=lambda c: c.TYPE)
def test_roundtrip_empty_weights(cls: type[Message]) -> None:
    msg = next(m for m in samples() if type(m) is cls)
    out = roundtrip(dataclasses.replace(cast(Any, msg), model={}))
    assert out.model == {}  # type: ignore[attr-defined]


def test_roundtrip_optional_model_none() -> None:
    for msg in samples():
        if type(msg) in (Participate, Welcome):
            out = roundtrip(dataclasses.replace(cast(Any, msg), model=None))
            assert out.model is None  # type: ignore[attr-defined]


def test_none_for_required_model_is_rejected() -> None:
    rejects(
        raw({"t": "global_model", "f": {"version": 1, "model_id": "m", "model": None}, "x": {}}),
        "bad-field",
    )


@pytest.mark.parametrize("dtype", list(tensors.DTYPES))
def test_roundtrip_every_allowed_dtype(dtype: str) -> None:
    rng = np.random.default_rng(1)
    dt = np.dtype(dtype)
    if dt.kind == "b":
        arr = rng.integers(0, 2, size=(5, 3)).astype(bool)
    elif dt.kind == "f":
        arr = (rng.standard_normal((5, 3)) * 100).astype(dt)
        arr[0, 0] = -0.0
        arr[0, 1] = np.finfo(dt).max
        arr[0, 2] = np.finfo(dt).tiny
    else:
        info = np.iinfo(dt)
        arr = rng.integers(info.min, info.max, size=(5, 3), dtype=dt, endpoint=True)
        arr[0, 0], arr[0, 1] = info.min, info.max
    out = roundtrip(GlobalModel(version=0, model_id="m", model={"t": arr}))
    assert out.model["t"].dtype.name == dtype  # type: ignore[attr-defined]


def test_roundtrip_float16_values() -> None:
    arr = np.array([0.0, -0.0, 1.0, 65504.0, 6.1e-5, 5.96e-8, -2.5], dtype=np.float16)
    out = roundtrip(ModelUpload(upload_id="u", base_version=0, num_samples=1, model={"h": arr}))
    got = out.model["h"]  # type: ignore[attr-defined]
    assert got.dtype == np.float16
    assert got.view(np.uint16).tolist() == arr.view(np.uint16).tolist()


def test_roundtrip_zero_size_tensors() -> None:
    weights: Weights = {
        "a": np.zeros((0,), np.float32),
        "b": np.zeros((3, 0, 2), np.int64),
        "c": np.ones(3, np.int8),
    }
    roundtrip(GlobalModel(version=0, model_id="m", model=weights))
    roundtrip(GlobalModel(version=0, model_id="m", model={"only": np.zeros((0, 4))}))


def test_roundtrip_zero_dim_arrays() -> None:
    weights: Weights = {
        "scalar_f": np.array(3.5, dtype=np.float32),
        "scalar_i": np.array(7, np.int64),
        "vec": np.arange(3.0),
    }
    out = decode(encode_to_bytes(GlobalModel(version=0, model_id="m", model=weights)))
    assert out.model["scalar_f"].shape == ()  # type: ignore[attr-defined]
    assert out.model["scalar_i"].shape == ()  # type: ignore[attr-defined]
    assert_weights_equal(out.model, weights)  # type: ignore[attr-defined]


def test_zero_dim_array_values_survive() -> None:
    # Whatever the shape bug, the value itself must come back.
    out = decode(
        encode_to_bytes(
            GlobalModel(version=0, model_id="m", model={"s": np.array(-2.25, np.float64)})
        )
    )
    got = out.model["s"]  # type: ignore[attr-defined]
    assert got.size == 1 and got.dtype == np.float64 and float(got.reshape(-1)[0]) == -2.25


def test_non_contiguous_inputs_roundtrip() -> None:
    base = np.arange(60, dtype=np.float64).reshape(6, 10)
    weights: Weights = {
        "strided": base[::2, ::3],
        "transposed": base.T,
        "fortran": np.asfortranarray(base.astype(np.int32)),
        "reversed": base[0, ::-1],
    }
    assert not any(w.flags.c_contiguous for w in weights.values())
    out = roundtrip(GlobalModel(version=0, model_id="m", model=weights))
    for name, arr in weights.items():
        assert out.model[name].flags.c_contiguous  # type: ignore[attr-defined]
        assert np.array_equal(out.model[name], arr)  # type: ignore[attr-defined]


@pytest.mark.parametrize("dtype", [">f4", ">f8", ">i2", ">i4", ">i8", ">u2", ">u4", ">u8", ">f2"])
def test_big_endian_input_is_sent_little_endian(dtype: str) -> None:
    big = np.array([1, 2, 300, 1000, 7], dtype=dtype)
    data = encode_to_bytes(GlobalModel(version=0, model_id="m", model={"be": big}))
    little = big.astype(big.dtype.newbyteorder("<"))
    assert little.tobytes() in data
    out = decode(data)
    got = out.model["be"]  # type: ignore[attr-defined]
    assert got.dtype.str == "<" + dtype[1:]
    assert got.dtype.name == big.dtype.name
    assert got.tolist() == big.tolist()


def test_encode_does_not_copy_contiguous_tensors() -> None:
    arr = np.arange(100, dtype=np.float32)
    parts = encode(GlobalModel(version=0, model_id="m", model={"a": arr}))
    assert any(isinstance(p, memoryview) and np.shares_memory(np.asarray(p), arr) for p in parts)


def test_encoded_layout_prefix_and_alignment() -> None:
    msg = GlobalModel(
        version=0,
        model_id="m",
        model={"a": np.arange(5, dtype=np.float32), "b": np.arange(3, dtype=np.int16)},
    )
    data = encode_to_bytes(msg)
    magic, version, flags, hlen = struct.unpack_from("<2sBBI", data)
    assert (magic, version, flags) == (b"FS", PROTOCOL_VERSION, 0)
    header = msgpack.unpackb(data[8 : 8 + hlen])
    assert header["t"] == "global_model"
    start = 8 + hlen + tensors.padding(8 + hlen)
    assert start % 64 == 0
    for name, _dt, _shape, offset, nbytes in header["x"]["model"]:
        assert offset % 64 == 0
        assert data[start + offset : start + offset + nbytes] == msg.model[name].tobytes()
    assert len(data) % 64 == 0


# ---------------------------------------------------------------------------- zero copy
def aligned_copy(data: bytes) -> npt.NDArray[np.uint8]:
    buf = np.empty(len(data) + 128, dtype=np.uint8)
    off = (-buf.ctypes.data) % 64
    out = buf[off : off + len(data)]
    out[:] = np.frombuffer(data, dtype=np.uint8)
    assert out.ctypes.data % 64 == 0
    return out


def test_decoded_arrays_are_views_of_input_bytes() -> None:
    data = encode_to_bytes(samples()[4])
    out = decode(data)
    whole = np.frombuffer(data, dtype=np.uint8)
    for arr in out.model.values():  # type: ignore[attr-defined]
        assert np.shares_memory(arr, whole)
        assert not arr.flags.owndata
        assert not arr.flags.writeable  # bytes are immutable


def test_decoded_arrays_are_aligned_views_of_aligned_buffer() -> None:
    data = encode_to_bytes(samples()[4])
    buf = aligned_copy(data)
    out = decode(buf.data)
    for name, arr in out.model.items():  # type: ignore[attr-defined]
        assert np.shares_memory(arr, buf), name
        assert arr.ctypes.data % 64 == 0, name
        assert arr.flags.aligned
    # a view really: writing the buffer changes the decoded array
    first = next(iter(out.model))  # type: ignore[attr-defined]
    arr = out.model[first]  # type: ignore[attr-defined]
    before = arr.copy()
    offset = arr.ctypes.data - buf.ctypes.data
    buf[offset : offset + arr.nbytes] ^= 0xFF
    assert not np.array_equal(arr, before)


def test_decode_accepts_bytearray_and_memoryview() -> None:
    msg = samples()[2]
    data = encode_to_bytes(msg)
    assert_msg_equal(decode(bytearray(data)), msg)
    assert_msg_equal(decode(memoryview(data)), msg)
    assert_msg_equal(decode(np.frombuffer(data, np.uint8).data), msg)


# ---------------------------------------------------------------------------- property
NAME_CHARS = "ABCXYZabcxyz0189_.:/-[]"
names = st.text(alphabet=NAME_CHARS, min_size=1, max_size=40)


@st.composite
def arrays(draw: st.DrawFn) -> np.ndarray:
    dtype = np.dtype(draw(st.sampled_from(list(tensors.DTYPES))))
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=5))
    arr = draw(hnp.arrays(dtype, shape))
    if draw(st.booleans()) and arr.dtype.itemsize > 1:
        arr = arr.astype(arr.dtype.newbyteorder(">"))
    if draw(st.booleans()) and arr.ndim >= 1 and arr.shape[0] > 1:
        arr = arr[::2]
    return arr


weights_st = st.dictionaries(names, arrays(), max_size=6)
metric_values = st.one_of(
    st.integers(-(2**63), 2**63 - 1),  # the 64-bit signed range the codec accepts
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=30),
    st.booleans(),
)
metrics_st = st.dictionaries(st.text(min_size=1, max_size=20), metric_values, max_size=6)
FIELD_STRATEGIES: dict[str, st.SearchStrategy[Any]] = {
    "str": st.text(max_size=60),
    "str | None": st.none() | st.text(max_size=20),
    "int": st.integers(-(2**62), 2**62),
    "int | None": st.none() | st.integers(-(2**62), 2**62),
    "float": st.floats(allow_nan=False, allow_infinity=False),
    "bool": st.booleans(),
    "bool | None": st.none() | st.booleans(),
    "Metrics": metrics_st,
    "Weights": weights_st,
    "Weights | None": st.none() | weights_st,
    "list[str]": st.lists(st.text(max_size=40), max_size=5),
    "bytes": st.binary(max_size=codec.MAX_BYTES),
    "AgentIds": st.lists(st.text(min_size=1, max_size=40), max_size=5),
    "ByteMap": st.dictionaries(
        st.text(min_size=1, max_size=40), st.binary(max_size=codec.MAX_BYTES), max_size=5
    ),
    "IntMap": st.dictionaries(
        st.text(min_size=1, max_size=40), st.integers(-(2**62), 2**62), max_size=5
    ),
}


@st.composite
def messages(draw: st.DrawFn) -> Message:
    cls = draw(st.sampled_from(list(MESSAGE_TYPES.values())))
    kwargs = {f.name: draw(FIELD_STRATEGIES[str(f.type)]) for f in dataclasses.fields(cls)}
    if cls is Participate:  # a name of the grammar (others are refused: tests/test_names.py)
        kwargs["agent_name"] = draw(st.from_regex(NAME_PATTERN, fullmatch=True))
    return cls(**kwargs)


@PROPERTY
@given(messages())
def test_property_random_messages_roundtrip(msg: Message) -> None:
    data = encode_to_bytes(msg)
    assert_msg_equal(decode(data), msg)
    assert_msg_equal(decode(aligned_copy(data).data), msg)


# ---------------------------------------------------------------------------- rejection
def test_bad_magic() -> None:
    data = bytearray(encode_to_bytes(Bye(reason="x")))
    data[0:2] = b"XY"
    rejects(data, "malformed")
    rejects(b"GET / HTTP/1.1\r\n\r\n", "malformed")


@pytest.mark.parametrize("version", [0, PROTOCOL_VERSION + 1, 255])
def test_unsupported_protocol_version(version: int) -> None:
    data = bytearray(encode_to_bytes(Bye(reason="x")))
    data[2] = version
    rejects(data, "unsupported-version")


def test_truncated_everywhere_before_the_data_end() -> None:
    msg = GlobalModel(
        version=1,
        model_id="m",
        model={"a": np.arange(5, dtype=np.float32), "b": np.ones((3, 3), np.int16)},
    )
    data = encode_to_bytes(msg)
    data_end = len(data) - tensors.padding(18)
    assert data[data_end - 18 : data_end] == msg.model["b"].tobytes()
    for cut in range(data_end):
        err = rejects(data[:cut])
        assert err.code in {"malformed", "bad-tensor"}, (cut, err.code)


def test_truncated_header_of_tensorless_messages() -> None:
    for msg in (
        Bye(reason="bye" * 10),
        UploadAck(upload_id="u", status="s", round=1),
        Participate(agent_name="a", metrics={"k": 1.5}),
    ):
        data = encode_to_bytes(msg)
        header_end = 8 + struct.unpack_from("<I", data, 4)[0]
        for cut in range(header_end):
            rejects(data[:cut], "malformed")


def test_header_length_beyond_buffer() -> None:
    rejects(raw({"t": "bye", "f": {}, "x": {}}, header_len=10_000, pad=False), "malformed")
    rejects(raw({"t": "bye", "f": {}, "x": {}}, header_len=2**32 - 1, pad=False), "malformed")
    limits = Limits(max_header_bytes=16)
    rejects(raw({"t": "bye", "f": {"reason": "x" * 40}, "x": {}}), "malformed", limits)


@pytest.mark.parametrize(
    "header",
    [
        [1, 2, 3],
        "bye",
        7,
        None,
        {"t": "bye", "f": {}},
        {"t": "bye", "f": {}, "x": {}, "y": 1},
        {"t": "bye", "f": [], "x": {}},
        {"t": "bye", "f": {}, "x": []},
    ],
)
def test_non_map_or_misshapen_header(header: object) -> None:
    rejects(raw(header), "malformed")


def test_undecodable_header_bytes() -> None:
    data = struct.pack("<2sBBI", b"FS", PROTOCOL_VERSION, 0, 3) + b"\xc1\xc1\xc1"
    rejects(data, "malformed")
    # two msgpack objects where one is expected
    two = msgpack.packb({"t": "bye", "f": {}, "x": {}}) + msgpack.packb(1)
    rejects(struct.pack("<2sBBI", b"FS", PROTOCOL_VERSION, 0, len(two)) + two, "malformed")


@pytest.mark.parametrize("tag", ["nope", "", "Bye", 1, None, ["bye"]])
def test_unknown_type(tag: object) -> None:
    rejects(raw({"t": tag, "f": {}, "x": {}}), "unknown-type")


def test_unknown_field() -> None:
    rejects(raw({"t": "bye", "f": {"reason": "x", "extra": 1}, "x": {}}), "bad-field")
    rejects(raw({"t": "bye", "f": {}, "x": {"model": []}}), "bad-field")


def header_of(msg: Message) -> dict[str, Any]:
    data = encode_to_bytes(msg)
    header: dict[str, Any] = msgpack.unpackb(data[8 : 8 + struct.unpack_from("<I", data, 4)[0]])
    return header


@pytest.mark.parametrize("cls", MESSAGE_TYPES.values(), ids=lambda c: c.TYPE)
def test_missing_required_field(cls: type[Message]) -> None:
    msg = next(m for m in samples() if type(m) is cls)
    if cls in WEIGHT_TYPES:
        msg = dataclasses.replace(msg, model={})  # type: ignore[call-arg]
    header = header_of(msg)
    assert isinstance(decode(raw(header)), cls)  # complete: decodes
    required = [
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    for name in required:
        h = {"t": header["t"], "f": dict(header["f"]), "x": dict(header["x"])}
        h["f"].pop(name, None)
        h["x"].pop(name, None)
        rejects(raw(h), "bad-field")
    if not required:  # nothing is required: the empty message decodes to the defaults
        assert decode(raw({"t": cls.TYPE, "f": {}, "x": {}})) == cls()


@pytest.mark.parametrize(
    ("tag", "fields"),
    [
        ("poll", {"known_version": "1"}),  # str for int
        ("poll", {"known_version": True}),  # bool for int
        ("poll", {"known_version": 1.0}),  # float for int
        ("poll", {"known_version": 2**63}),  # out of range
        ("poll", {"known_version": 1, "wait": float("nan")}),
        ("poll", {"known_version": 1, "wait": float("inf")}),
        ("poll", {"known_version": 1, "wait": "1"}),
        ("poll", {"known_version": 1, "wait": True}),
        ("bye", {"reason": 5}),
        ("bye", {"reason": None}),
        ("error", {"code": "c", "message": "m", "fatal": 1}),
        ("participate", {"agent_name": "a", "token": 5}),
        ("participate", {"agent_name": "a", "init_weights": 0}),
        ("participate", {"agent_name": "a", "metrics": {"acc": float("nan")}}),
        ("participate", {"agent_name": "a", "metrics": {"acc": float("inf")}}),
        ("participate", {"agent_name": "a", "metrics": {"acc": float("-inf")}}),
        ("participate", {"agent_name": "a", "metrics": {"nested": {"a": 1}}}),
        ("participate", {"agent_name": "a", "metrics": {"list": [1, 2]}}),
        ("participate", {"agent_name": "a", "metrics": {"": 1}}),
        ("participate", {"agent_name": "a", "metrics": {"k" * 129: 1}}),
        ("participate", {"agent_name": "a", "metrics": {"s": "x" * 1025}}),
        ("participate", {"agent_name": "a", "metrics": [1]}),
        ("participate", {"agent_name": "a", "metrics": None}),
        (
            "welcome",
            {
                "agent_id": "a",
                "aggregator_id": "g",
                "run_id": "r",
                "version": 0,
                "round": 1,
                "model_id": "m",
                "model": None,
                "delivery": "push",
                "heartbeat_interval": float("nan"),
            },
        ),
    ],
)
def test_wrong_field_types(tag: str, fields: dict[str, object]) -> None:
    rejects(raw({"t": tag, "f": fields, "x": {}}), "bad-field")


def test_string_longer_than_limit() -> None:
    rejects(
        raw({"t": "bye", "f": {"reason": "x" * 11}, "x": {}}), "bad-field", Limits(max_str_len=10)
    )
    assert decode(
        raw({"t": "bye", "f": {"reason": "x" * 10}, "x": {}}), Limits(max_str_len=10)
    ) == Bye(reason="x" * 10)


def test_too_many_metrics() -> None:
    fields = {"agent_name": "a", "metrics": {f"m{i}": i for i in range(5)}}
    rejects(raw({"t": "participate", "f": fields, "x": {}}), "bad-field", Limits(max_metrics=4))


def test_weights_field_with_non_table_value_is_rejected() -> None:
    rejects(
        raw({"t": "global_model", "f": {"version": 1, "model_id": "m", "model": 5}, "x": {}}),
        "bad-field",
    )


def test_weights_field_given_twice() -> None:
    rejects(
        raw({"t": "participate", "f": {"agent_name": "a", "model": None}, "x": {"model": []}}),
        "bad-field",
    )


@pytest.mark.parametrize(
    "dtype",
    [
        "object",
        "complex64",
        "complex128",
        "O",
        ">f4",
        "<f4",
        "float128",
        "datetime64",
        "U8",
        "V8",
        "",
        3,
        None,
    ],
)
def test_disallowed_dtype(dtype: object) -> None:
    rejects(raw(gm_header([["a", dtype, [2], 0, 8]]), bytes(64)), "bad-dtype")


def test_object_array_cannot_be_encoded() -> None:
    from fedstack.errors import LocalProtocolError

    with pytest.raises(LocalProtocolError):
        encode_to_bytes(
            GlobalModel(version=0, model_id="m", model={"o": np.array([object()], dtype=object)})
        )
    with pytest.raises(LocalProtocolError):
        encode_to_bytes(
            GlobalModel(version=0, model_id="m", model={"c": np.zeros(2, np.complex64)})
        )


@pytest.mark.parametrize(
    ("shape", "nbytes"), [([2], 9), ([2], 7), ([2, 2], 8), ([], 0), ([0], 8), ([2], -8)]
)
def test_nbytes_not_matching_shape(shape: list[int], nbytes: int) -> None:
    rejects(raw(gm_header([["a", "float32", shape, 0, nbytes]]), bytes(64)), "bad-tensor")


@pytest.mark.parametrize("shape", [[-1], [1.0], ["2"], [True], "2", 2, None, [2**40], [1] * 9])
def test_invalid_shape(shape: object) -> None:
    rejects(raw(gm_header([["a", "uint8", shape, 0, 2]]), bytes(64)), "bad-tensor")


@pytest.mark.parametrize(
    "table",
    [
        [["a", "float32", [4], 0, 16], ["b", "float32", [4], 0, 16]],  # overlap
        [["a", "float32", [4], 0, 16], ["b", "float32", [4], 32, 16]],  # overlap (unaligned)
        [["a", "float32", [4], 0, 16], ["b", "float32", [4], 128, 16]],  # gap
        [["a", "float32", [4], 64, 16]],  # does not start at 0
        [["a", "float32", [4], -64, 16]],  # negative
        [["a", "float32", [4], 1 << 40, 16]],  # far out of range
        [["a", "float32", [40], 0, 160]],  # longer than the data
        [["a", "float32", [4], 0, 16], ["b", "float32", [30], 64, 120]],  # second too long
        [["a", "float32", [4], 1.0, 16]],  # float offset
        [["a", "float32", [4], 0, True]],  # bool nbytes... != 16 anyway
    ],
)
def test_overlapping_or_out_of_range_offsets(table: list[list[object]]) -> None:
    rejects(raw(gm_header(table), bytes(128)), "bad-tensor")


def test_valid_hand_made_table_is_accepted() -> None:
    # the same construction as the rejection tests, but valid: proves they test one thing
    data = (
        np.arange(4, dtype=np.float32).tobytes() + bytes(48) + np.arange(4, dtype="<f4").tobytes()
    )
    msg = decode(
        raw(gm_header([["a", "float32", [4], 0, 16], ["b", "float32", [2, 2], 64, 16]]), data)
    )
    assert isinstance(msg, GlobalModel)
    assert msg.model["b"].shape == (2, 2)
    assert msg.model["b"].tolist() == [[0, 1], [2, 3]]


@pytest.mark.parametrize("table", ["x", [["a", "float32", [1]]], [("a",)], [None], {"a": 1}])
def test_malformed_tensor_table(table: object) -> None:
    rejects(
        raw(
            {"t": "global_model", "f": {"version": 1, "model_id": "m"}, "x": {"model": table}},
            bytes(64),
        ),
        "bad-tensor",
    )


def test_duplicate_tensor_names() -> None:
    table = [["a", "uint8", [4], 0, 4], ["a", "uint8", [4], 64, 4]]
    rejects(raw(gm_header(table), bytes(128)), "bad-tensor")


@pytest.mark.parametrize(
    "name",
    [
        "a b",
        "a\x00",
        "caf\u00e9",
        "",
        "a;rm",
        "../x\\y",
        "\na",
        "a\nb",
        "tab\t",
        "x" * 257,
        5,
        None,
        ["a"],
    ],
)
def test_bad_tensor_names(name: object) -> None:
    rejects(raw(gm_header([[name, "uint8", [4], 0, 4]]), bytes(64)), "bad-tensor")


def test_tensor_name_with_trailing_newline_is_rejected() -> None:
    rejects(raw(gm_header([["a\n", "uint8", [4], 0, 4]]), bytes(64)), "bad-tensor")


def test_name_length_limit() -> None:
    ok = raw(gm_header([["x" * 256, "uint8", [4], 0, 4]]), bytes(64))
    assert isinstance(decode(ok), GlobalModel)
    rejects(
        raw(gm_header([["abcdefghi", "uint8", [4], 0, 4]]), bytes(64)),
        "bad-tensor",
        Limits(max_name_len=8),
    )


def test_too_many_tensors() -> None:
    weights = {f"t{i}": np.full(2, i, np.int8) for i in range(5)}
    data = encode_to_bytes(GlobalModel(version=0, model_id="m", model=weights))
    assert len(decode(data, Limits(max_tensors=5)).model) == 5  # type: ignore[attr-defined]
    rejects(data, "bad-tensor", Limits(max_tensors=4))


def test_message_too_large() -> None:
    msg = GlobalModel(version=0, model_id="m", model={"a": np.zeros(1000, np.float32)})
    data = encode_to_bytes(msg)
    assert isinstance(decode(data, Limits(max_message_bytes=len(data))), GlobalModel)
    with pytest.raises(MessageTooLarge) as info:
        decode(data, Limits(max_message_bytes=len(data) - 1))
    assert info.value.code == "too-large"
    assert isinstance(info.value, RemoteProtocolError)
    assert (info.value.size, info.value.limit) == (len(data), len(data) - 1)


@pytest.mark.parametrize("extra", [1, 8, 64, 65, 1000])
def test_trailing_garbage_after_tensorless_message(extra: int) -> None:
    data = encode_to_bytes(UploadAck(upload_id="u", status="s", round=1))
    rejects(data + b"\xab" * extra, "malformed")


@pytest.mark.parametrize("extra", [64, 100, 4096])
def test_trailing_garbage_after_tensor_data(extra: int) -> None:
    data = encode_to_bytes(GlobalModel(version=0, model_id="m", model={"a": np.ones(3, np.int8)}))
    rejects(data + b"\xab" * extra, "malformed")


@pytest.mark.parametrize("extra", [1, 10, 63])
def test_short_trailing_garbage_after_tensor_data(extra: int) -> None:
    data = encode_to_bytes(GlobalModel(version=0, model_id="m", model={"a": np.ones(3, np.int8)}))
    rejects(data + b"\xab" * extra, "malformed")


@pytest.mark.parametrize("shape", [[2**39, 2**39, 0], [0, 2**39 - 1, 2**39 - 1, 2**39 - 1]])
def test_zero_size_tensor_with_huge_dims_is_rejected(shape: list[int]) -> None:
    rejects(raw(gm_header([["a", "float64", shape, 0, 0]])), "bad-tensor")


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def test_pickle_payloads_are_rejected_and_never_executed(tmp_path: Any) -> None:
    marker = tmp_path / "pwned"
    payloads = [
        pickle.dumps({"t": "bye", "f": {}, "x": {}}),
        pickle.dumps({"weights": np.arange(3)}),
        pickle.dumps(_Evil(str(marker))),
        pickle.dumps(_Evil(str(marker)), protocol=0),
    ]
    for p in payloads:
        rejects(p, "malformed")
        # the same bytes as a header after a valid prefix
        rejects(struct.pack("<2sBBI", b"FS", PROTOCOL_VERSION, 0, len(p)) + p)
        # and after a valid header, where tensor data would be
        rejects(encode_to_bytes(Bye(reason="x")) + p)
    assert not marker.exists()


def test_pickle_as_tensor_bytes_is_only_data(tmp_path: Any) -> None:
    marker = tmp_path / "pwned"
    p = pickle.dumps(_Evil(str(marker)))
    out = decode(
        encode_to_bytes(
            GlobalModel(version=0, model_id="m", model={"p": np.frombuffer(p, np.uint8)})
        )
    )
    assert out.model["p"].tobytes() == p  # type: ignore[attr-defined]
    assert not marker.exists()


# ---------------------------------------------------------------------------- fuzz
def decode_or_protocol_error(data: bytes) -> None:
    try:
        out = decode(data)
    except RemoteProtocolError as exc:
        assert isinstance(exc.code, str) and exc.code
    else:
        assert isinstance(out, Message)
        assert type(out) in MESSAGE_TYPES.values()


@FUZZ
@given(st.binary(max_size=600))
def test_fuzz_random_bytes(data: bytes) -> None:
    decode_or_protocol_error(data)


@FUZZ
@given(st.binary(max_size=400))
def test_fuzz_random_bytes_after_valid_prefix(body: bytes) -> None:
    decode_or_protocol_error(struct.pack("<2sBBI", b"FS", PROTOCOL_VERSION, 0, len(body)) + body)


VALID = [encode_to_bytes(m) for m in samples()] + [
    encode_to_bytes(GlobalModel(version=0, model_id="m", model={})),
    encode_to_bytes(GlobalModel(version=0, model_id="m", model={"z": np.zeros((0, 3))})),
]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    original = draw(st.sampled_from(VALID))
    header_end = 8 + struct.unpack_from("<I", original, 4)[0]
    data = bytearray(original)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "byte", "truncate", "insert", "delete"]))
        # half of the mutations hit the prefix and header, where the structure is
        end = header_end if draw(st.booleans()) else len(original)
        pos = draw(st.integers(0, max(min(end, len(data)) - 1, 0)))
        if op == "flip" and pos < len(data):
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "byte" and pos < len(data):
            data[pos] = draw(st.integers(0, 255))
        elif op == "truncate":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 8))]
    return bytes(data)


@FUZZ
@given(mutated())
def test_fuzz_mutated_valid_messages(data: bytes) -> None:
    decode_or_protocol_error(data)


@FUZZ
@given(st.sampled_from(VALID), st.data())
def test_fuzz_single_bit_flips_in_header(data: bytes, draw: st.DataObject) -> None:
    hlen = struct.unpack_from("<I", data, 4)[0]
    pos = draw.draw(st.integers(0, 8 + hlen - 1))
    bit = draw.draw(st.integers(0, 7))
    buf = bytearray(data)
    buf[pos] ^= 1 << bit
    decode_or_protocol_error(bytes(buf))


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),  # the 64-bit signed range the codec accepts
    st.floats(),
    st.text(max_size=8),
)
json_like = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=8,
)
field_names = st.sampled_from(
    sorted({f.name for c in MESSAGE_TYPES.values() for f in dataclasses.fields(c)} - {"model"})
    + ["zz"]
)
entries = st.lists(
    st.one_of(
        st.tuples(
            st.one_of(names, st.text(max_size=4)),
            st.sampled_from([*tensors.DTYPES, "object", "c8"]),
            st.lists(st.integers(-1, 6), max_size=3),
            st.integers(-64, 256),
            st.integers(-8, 256),
        ).map(list),
        json_like,
    ),
    max_size=4,
)


@st.composite
def structured(draw: st.DrawFn) -> bytes:
    """A valid message whose decoded header is changed at the msgpack level."""
    data = draw(st.sampled_from(VALID))
    hlen = struct.unpack_from("<I", data, 4)[0]
    header = msgpack.unpackb(data[8 : 8 + hlen])
    body = data[8 + hlen + tensors.padding(8 + hlen) :]
    tag, f = header["t"], dict(header["f"])
    x = {k: [list(e) for e in v] for k, v in header["x"].items()}
    for _ in range(draw(st.integers(1, 3))):
        what = draw(st.sampled_from(["field", "drop", "item", "item", "table", "tag", "body"]))
        if what == "field":
            f[draw(field_names)] = draw(json_like)
        elif what == "drop" and f:
            f.pop(draw(st.sampled_from(sorted(f))))
        elif what == "item" and x.get("model"):
            entry = draw(st.sampled_from(x["model"]))
            if not (isinstance(entry, list) and len(entry) == 5):
                continue
            entry[draw(st.integers(0, 4))] = draw(
                st.one_of(
                    json_like,
                    st.integers(-64, 1024),
                    st.lists(st.integers(-1, 6), max_size=3),
                    st.sampled_from([*tensors.DTYPES, "object", "c8"]),
                    names,
                )
            )
        elif what == "table":
            x["model"] = draw(entries)
        elif what == "tag":
            tag = draw(st.one_of(st.sampled_from(list(MESSAGE_TYPES)), json_like))
        elif what == "body":
            body = body[: draw(st.integers(0, len(body)))] + draw(st.binary(max_size=80))
    return raw({"t": tag, "f": f, "x": x}, body)


@FUZZ
@given(structured())
def test_fuzz_structured_headers(data: bytes) -> None:
    # Weights given in "f" are covered by test_weights_field_with_non_table_value_is_rejected,
    # huge zero-size shapes by test_zero_size_tensor_with_huge_dims_is_rejected.
    decode_or_protocol_error(data)


def test_all_finite_is_not_part_of_decoding() -> None:
    # NaN tensors are legal on the wire; validation is the aggregator's job.
    arr = np.array([math.nan, math.inf], dtype=np.float32)
    out = decode(encode_to_bytes(GlobalModel(version=0, model_id="m", model={"n": arr})))
    assert out.model["n"].tobytes() == arr.tobytes()  # type: ignore[attr-defined]


def test_list_of_strings_field_is_bounded() -> None:
    """A welcome's aggregator list: strings only, at most MAX_LIST_ITEMS of them."""
    from fedstack.wire.codec import MAX_LIST_ITEMS

    base = dict(
        agent_id="a",
        aggregator_id="b",
        run_id="r",
        version=0,
        round=1,
        model_id="m",
        model=None,
        delivery="push",
    )
    ok = Welcome(**base, aggregators=["ws://127.0.0.1:1", "wss://h:2"])  # type: ignore[arg-type]
    assert decode(encode_to_bytes(ok)) == ok
    for bad in (["x"] * (MAX_LIST_ITEMS + 1), [1, 2], "ws://a"):
        header = msgpack.packb(
            {"t": "welcome", "f": {**base, "aggregators": bad}, "x": {}}, use_bin_type=True
        )
        data = struct.pack("<2sBBI", b"FS", 1, 0, len(header)) + header
        with pytest.raises(RemoteProtocolError, match="aggregators"):
            decode(data)
