"""Encode and decode messages: a msgpack envelope plus raw tensor buffers. No I/O.

Layout of one encoded message::

    b"FS" | u8 protocol version | u8 0 | u32 header length (LE) | msgpack header
    | zero padding to 64 | tensor data, each tensor 64-byte aligned

The header is ``{"t": type, "f": {field: value}, "x": {field: tensor table}}``. Decoding
checks the prefix, the header's size, every field's type and range, and every tensor entry
before it builds arrays as views of the input buffer (no copy).
"""

from __future__ import annotations

import dataclasses
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

from fedstack.errors import LocalProtocolError, MessageTooLarge, ProtocolError, RemoteProtocolError
from fedstack.names import BadName, check_agent_name
from fedstack.types import Metrics, Weights
from fedstack.wire import tensors
from fedstack.wire.messages import MESSAGE_TYPES, PROTOCOL_VERSION, Message
from fedstack.wire.segments import Segments

MAGIC = b"FS"
_PREFIX = struct.Struct("<2sBBI")
_PAD = bytes(tensors.ALIGN)


@dataclass(frozen=True, slots=True)
class Limits:
    """What a decoder accepts. The aggregator's config sets these."""

    max_message_bytes: int = 1 << 30
    max_header_bytes: int = 1 << 20
    max_tensors: int = 4096
    max_name_len: int = 256
    max_str_len: int = 4096
    max_metrics: int = 256


DEFAULT_LIMITS = Limits()

# Field kinds, from the annotations in messages.py.
_KINDS = {
    "str": ("str", False),
    "str | None": ("str", True),
    "int": ("int", False),
    "int | None": ("int", True),
    "float": ("float", False),
    "bool": ("bool", False),
    "bool | None": ("bool", True),
    "Metrics": ("metrics", False),
    "Weights": ("weights", False),
    "Weights | None": ("weights", True),
    "list[str]": ("strs", False),
    "bytes": ("bytes", False),
    "AgentIds": ("ids", False),
    "ByteMap": ("bytemap", False),
    "IntMap": ("intmap", False),
}

MAX_LIST_ITEMS = 64
"""Most items in a list-of-strings field (e.g. the federation's aggregators in a welcome)."""
MAX_IDS = 4096
"""Most agent ids in an id-list field (a secure-aggregation session's survivors)."""
MAX_MAP_ITEMS = 256
"""Most entries in a map field (a share map: one entry per neighbour; the header's map
limit)."""
MAX_BYTES = 256
"""Longest ``bytes`` field or map value (keys are 32 bytes, a roster entry 96, a share
ciphertext 92): msgpack binary values longer than this are refused while decoding the
header, shorter ones only where a field's kind is ``bytes`` or a byte map."""


@dataclass(frozen=True, slots=True)
class _Field:
    name: str
    kind: str
    optional: bool
    required: bool


def _spec(cls: type[Message]) -> tuple[_Field, ...]:
    out = []
    for f in dataclasses.fields(cls):
        kind, optional = _KINDS[str(f.type)]
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        out.append(_Field(f.name, kind, optional, required))
    return tuple(out)


_SPECS = {tag: _spec(cls) for tag, cls in MESSAGE_TYPES.items()}


def _check_value(f: _Field, value: object, limits: Limits, err: type[ProtocolError]) -> object:
    def fail(why: str) -> ProtocolError:
        if err is RemoteProtocolError:
            return RemoteProtocolError(f"field {f.name!r}: {why}", code="bad-field")
        return err(f"field {f.name!r}: {why}")

    if value is None:
        if f.optional:
            return None
        raise fail("must not be null")
    if f.kind == "str":
        if not isinstance(value, str):
            raise fail("must be a string")
        if len(value) > limits.max_str_len:
            raise fail(f"longer than {limits.max_str_len} characters")
        return value
    if f.kind == "int":
        if type(value) is not int or not -(2**62) <= value <= 2**62:
            raise fail("must be an integer")
        return value
    if f.kind == "float":
        if type(value) not in (int, float) or not math.isfinite(value):  # type: ignore[arg-type]
            raise fail("must be a finite number")
        return float(value)  # type: ignore[arg-type]
    if f.kind == "bool":
        if type(value) is not bool:
            raise fail("must be true or false")
        return value
    if f.kind == "metrics":
        return check_metrics(value, limits, fail)
    if f.kind == "strs":
        if not isinstance(value, list) or len(value) > MAX_LIST_ITEMS:
            raise fail(f"must be a list of at most {MAX_LIST_ITEMS} strings")
        for item in value:
            if not isinstance(item, str) or len(item) > limits.max_name_len * 2:
                raise fail(f"items must be strings of at most {limits.max_name_len * 2} characters")
        return list(value)
    if f.kind == "bytes":
        if not isinstance(value, bytes) or len(value) > MAX_BYTES:
            raise fail(f"must be at most {MAX_BYTES} bytes")
        return value
    if f.kind == "ids":
        if not isinstance(value, list) or len(value) > MAX_IDS:
            raise fail(f"must be a list of at most {MAX_IDS} agent ids")
        for item in value:
            if not isinstance(item, str) or not 0 < len(item) <= limits.max_name_len:
                raise fail(f"items must be agent ids of 1-{limits.max_name_len} characters")
        return list(value)
    if f.kind in ("bytemap", "intmap"):
        if not isinstance(value, Mapping) or len(value) > MAX_MAP_ITEMS:
            raise fail(f"must be a map of at most {MAX_MAP_ITEMS} entries")
        out: dict[str, object] = {}
        for k, v in value.items():
            if not isinstance(k, str) or not 0 < len(k) <= limits.max_name_len:
                raise fail(f"keys must be agent ids of 1-{limits.max_name_len} characters")
            if f.kind == "bytemap":
                if not isinstance(v, bytes) or len(v) > MAX_BYTES:
                    raise fail(f"values must be at most {MAX_BYTES} bytes")
            elif type(v) is not int or not -(2**62) <= v <= 2**62:
                raise fail("values must be integers")
            out[k] = v
        return out
    # weights travel in the tensor table; in the field map only null is allowed
    raise fail("tensors must be sent in the tensor table")


def check_metrics(value: object, limits: Limits, fail: Any) -> Metrics:
    if not isinstance(value, Mapping):
        raise fail("metrics must be a map")
    if len(value) > limits.max_metrics:
        raise fail(f"more than {limits.max_metrics} metrics")
    out: Metrics = {}
    for k, v in value.items():
        if not isinstance(k, str) or not 0 < len(k) <= 128:
            raise fail("metric names must be strings of 1-128 characters")
        if type(v) is bool:
            out[k] = v
        elif type(v) is int:
            if not -(2**63) <= v < 2**63:
                raise fail(f"metric {k!r} is out of the 64-bit integer range")
            out[k] = v
        elif type(v) is float:
            if not math.isfinite(v):
                raise fail(f"metric {k!r} is not finite")
            out[k] = v
        elif isinstance(v, str):
            if len(v) > 1024:
                raise fail(f"metric {k!r} is longer than 1024 characters")
            out[k] = v
        else:
            raise fail(f"metric {k!r} must be a number, string or boolean")
    return out


def encode(msg: Message, limits: Limits = DEFAULT_LIMITS) -> list[bytes | memoryview]:
    """Encode ``msg`` into buffers to be sent back to back (tensors are not copied)."""
    tag = msg.TYPE
    if tag not in _SPECS:
        raise LocalProtocolError(f"unknown message type {type(msg).__name__}")
    fields: dict[str, object] = {}
    tables: dict[str, list[tensors.TensorEntry]] = {}
    arrays: list[np.ndarray[Any, Any]] = []
    data_len = 0
    for f in _SPECS[tag]:
        value = getattr(msg, f.name)
        if f.kind == "weights":
            if value is None:
                if not f.optional:
                    raise LocalProtocolError(f"field {f.name!r} must not be None")
                fields[f.name] = None
                continue
            entries, arrs = tensors.prepare(value, data_len)
            tables[f.name] = entries
            arrays.extend(arrs)
            if entries:
                last = entries[-1]
                data_len = last.offset + last.nbytes + tensors.padding(last.nbytes)
        else:
            fields[f.name] = _check_value(f, value, limits, LocalProtocolError)
    header = msgpack.packb(
        {"t": tag, "f": fields, "x": {k: [e.to_wire() for e in v] for k, v in tables.items()}},
        use_bin_type=True,
    )
    prefix = _PREFIX.pack(MAGIC, PROTOCOL_VERSION, 0, len(header))
    head_len = len(prefix) + len(header)
    parts: list[bytes | memoryview] = [prefix + header + _PAD[: tensors.padding(head_len)]]
    for arr, view in zip(arrays, tensors.views(arrays), strict=True):
        parts.append(view)
        pad = tensors.padding(arr.nbytes)
        if pad:
            parts.append(_PAD[:pad])
    return parts


def _bytes(view: memoryview | Segments) -> memoryview:
    return view.contiguous() if isinstance(view, Segments) else view


def encoded_size(parts: list[bytes | memoryview]) -> int:
    return sum(len(p) if isinstance(p, bytes) else p.nbytes for p in parts)


def encode_to_bytes(msg: Message, limits: Limits = DEFAULT_LIMITS) -> bytes:
    """Encode into one contiguous ``bytes`` (small messages, tests, storage)."""
    return b"".join(encode(msg, limits))


def decode(
    data: bytes | bytearray | memoryview | Segments, limits: Limits = DEFAULT_LIMITS
) -> Message:
    """Decode one message, validating every field; arrays are views of ``data``.

    ``data`` may be :class:`~fedstack.wire.segments.Segments` (a message handed over as
    its encoded parts); its arrays are then read-only views of those parts.

    Raises:
        RemoteProtocolError: the bytes are not a valid message (``code`` says why).
    """
    view: memoryview | Segments
    if isinstance(data, Segments):
        view = data
    else:
        view = memoryview(data).cast("B") if not isinstance(data, bytes) else memoryview(data)
    size = view.nbytes
    if size > limits.max_message_bytes:
        raise MessageTooLarge(size, limits.max_message_bytes)
    if size < _PREFIX.size:
        raise RemoteProtocolError("message shorter than its prefix", code="malformed")
    magic, version, _flags, header_len = _PREFIX.unpack_from(_bytes(view[: _PREFIX.size]))
    if magic != MAGIC:
        raise RemoteProtocolError(
            "not a fedstack message (bad magic); is the peer a fedstack agent?", code="malformed"
        )
    if version != PROTOCOL_VERSION:
        raise RemoteProtocolError(
            f"protocol version {version} is not supported (this side speaks {PROTOCOL_VERSION})",
            code="unsupported-version",
        )
    if header_len > limits.max_header_bytes or _PREFIX.size + header_len > size:
        raise RemoteProtocolError("header length out of range", code="malformed")
    try:
        header = msgpack.unpackb(
            _bytes(view[_PREFIX.size : _PREFIX.size + header_len]),
            raw=False,
            strict_map_key=True,
            max_str_len=limits.max_header_bytes,
            max_bin_len=MAX_BYTES,
            max_array_len=max(limits.max_tensors, 16),
            max_map_len=max(limits.max_metrics, 64),
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises several unrelated types on bad input
        raise RemoteProtocolError(f"undecodable header: {exc}", code="malformed") from None
    if not isinstance(header, dict) or set(header) != {"t", "f", "x"}:
        raise RemoteProtocolError("header must be a map with keys t, f, x", code="malformed")
    tag, raw_fields, raw_tables = header["t"], header["f"], header["x"]
    if not isinstance(tag, str) or tag not in _SPECS:
        raise RemoteProtocolError(f"unknown message type {str(tag)[:40]!r}", code="unknown-type")
    if not isinstance(raw_fields, dict) or not isinstance(raw_tables, dict):
        raise RemoteProtocolError("fields and tensors must be maps", code="malformed")
    spec = _SPECS[tag]
    names = {f.name for f in spec}
    unknown = (set(raw_fields) | set(raw_tables)) - names
    if unknown:
        raise RemoteProtocolError(
            f"{tag}: unknown field(s) {sorted(map(str, unknown))[:5]}", code="bad-field"
        )
    start = _PREFIX.size + header_len
    start += tensors.padding(start)
    data_view = view[start:] if start <= size else view[size:]
    pos = 0
    kwargs: dict[str, object] = {}
    for f in spec:
        if f.kind == "weights":
            if f.name in raw_tables:
                if f.name in raw_fields:
                    raise RemoteProtocolError(f"field {f.name!r} given twice", code="bad-field")
                weights: Weights
                weights, pos = tensors.read(
                    raw_tables[f.name],
                    data_view,
                    pos + tensors.padding(pos),
                    max_tensors=limits.max_tensors,
                    max_name_len=limits.max_name_len,
                )
                kwargs[f.name] = weights
            elif f.name in raw_fields:
                kwargs[f.name] = _check_value(f, raw_fields[f.name], limits, RemoteProtocolError)
            elif f.required:
                raise RemoteProtocolError(f"{tag}: missing field {f.name!r}", code="bad-field")
            continue
        if f.name in raw_fields:
            kwargs[f.name] = _check_value(f, raw_fields[f.name], limits, RemoteProtocolError)
        elif f.required:
            raise RemoteProtocolError(f"{tag}: missing field {f.name!r}", code="bad-field")
    if data_view.nbytes not in (pos, pos + tensors.padding(pos)):
        raise RemoteProtocolError("trailing bytes after the last tensor", code="malformed")
    if tag == "participate":  # a name follows the grammar of fedstack.names
        try:
            check_agent_name(kwargs["agent_name"])
        except BadName as exc:
            raise RemoteProtocolError(str(exc), code="bad-name") from None
    return MESSAGE_TYPES[tag](**kwargs)
