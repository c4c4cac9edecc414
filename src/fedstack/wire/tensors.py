"""Named arrays <-> raw little-endian buffers, described by (name, dtype, shape).

No pickle: a tensor is its bytes plus a table entry; decoding is ``np.frombuffer`` on a
view of the received buffer (no copy). Every entry is checked against the limits and the
buffer before any byte is trusted.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedstack.errors import LocalProtocolError, RemoteProtocolError
from fedstack.types import Array, Weights
from fedstack.wire.segments import Segments

ALIGN = 64
"""Tensor data starts on 64-byte boundaries so decoded arrays are aligned."""

DTYPES: dict[str, np.dtype[np.generic]] = {
    name: np.dtype(name).newbyteorder("<")
    for name in (
        "float16",
        "float32",
        "float64",
        "int8",
        "int16",
        "int32",
        "int64",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "bool",
    )
}
"""The dtypes allowed on the wire, by name (always little-endian)."""

_DTYPE_NAMES: dict[np.dtype[Any], str] = {}


def dtype_name(dtype: np.dtype[Any]) -> str:
    """``dtype.name``, which numpy computes anew on every access (slow on hot paths),
    remembered for the dtypes allowed on the wire."""
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        name = dtype.name
        if name in DTYPES:
            _DTYPE_NAMES[dtype] = name
    return name


_NAME_RE = re.compile(r"[A-Za-z0-9_.:/\-\[\]]+")
MAX_NAME_LEN = 256
"""Longest tensor name an encoder produces (the decoders' default limit)."""


def padding(n: int) -> int:
    """Bytes needed after ``n`` bytes to reach the next ALIGN boundary."""
    return (-n) % ALIGN


@dataclass(frozen=True, slots=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    def to_wire(self) -> list[object]:
        return [self.name, self.dtype, list(self.shape), self.offset, self.nbytes]


def check_name(name: object, max_len: int) -> str:
    if not isinstance(name, str) or not name:
        raise RemoteProtocolError("tensor name must be a non-empty string", code="bad-tensor")
    if len(name) > max_len:
        raise RemoteProtocolError(
            f"tensor name of {len(name)} characters exceeds the limit of {max_len}",
            code="bad-tensor",
        )
    if not _NAME_RE.fullmatch(name):
        raise RemoteProtocolError(
            f"tensor name {name[:40]!r} has characters outside [A-Za-z0-9_.:/-[]]",
            code="bad-tensor",
        )
    return name


def prepare(weights: Mapping[str, object], start: int) -> tuple[list[TensorEntry], list[Array]]:
    """Lay out ``weights`` for sending, data starting at offset ``start`` (aligned).

    Returns the table entries and the little-endian C-contiguous arrays to send in order.
    """
    if not isinstance(weights, Mapping):
        raise LocalProtocolError(f"weights must be a dict of arrays, got {type(weights).__name__}")
    entries: list[TensorEntry] = []
    arrays: list[Array] = []
    offset = start
    for name, value in weights.items():
        if (
            not isinstance(name, str)
            or not name
            or len(name) > MAX_NAME_LEN
            or not _NAME_RE.fullmatch(name)
        ):
            raise LocalProtocolError(
                f"invalid tensor name {name!r}: 1-{MAX_NAME_LEN} characters of [A-Za-z0-9_.:/-[]]"
            )
        arr = np.asarray(value)
        dname = dtype_name(arr.dtype)
        if dname not in DTYPES:
            raise LocalProtocolError(
                f"tensor {name!r} has dtype {dname}; allowed: {', '.join(DTYPES)}"
            )
        arr = np.asarray(arr, dtype=DTYPES[dname], order="C")  # keeps 0-d arrays 0-d
        shape = tuple(int(d) for d in arr.shape)
        entries.append(TensorEntry(name, dname, shape, offset, arr.nbytes))
        arrays.append(arr)
        offset += arr.nbytes + padding(arr.nbytes)
    return entries, arrays


def read(
    table: object,
    data: memoryview | Segments,
    start: int,
    *,
    max_tensors: int,
    max_name_len: int,
    max_ndim: int = 8,
) -> tuple[Weights, int]:
    """Decode the tensor ``table`` whose data lies in ``data`` from offset ``start``.

    Entries must be laid out back to back at aligned offsets (no overlap, no gaps beyond
    padding). Returns the arrays (views of ``data``) and the offset just after the last
    tensor's bytes (before its padding; ``start`` if there is none).
    """
    if not isinstance(table, list):
        raise RemoteProtocolError("tensor table must be a list", code="bad-tensor")
    if len(table) > max_tensors:
        raise RemoteProtocolError(
            f"{len(table)} tensors exceed the limit of {max_tensors}", code="bad-tensor"
        )
    out: Weights = {}
    expected = start
    end = start
    for raw in table:
        if not isinstance(raw, list) or len(raw) != 5:
            raise RemoteProtocolError(
                "tensor entry must be [name, dtype, shape, offset, nbytes]", code="bad-tensor"
            )
        name, dname, shape, offset, nbytes = raw
        name = check_name(name, max_name_len)
        if name in out:
            raise RemoteProtocolError(f"tensor {name!r} appears twice", code="bad-tensor")
        if not isinstance(dname, str) or dname not in DTYPES:
            raise RemoteProtocolError(
                f"tensor {name!r}: dtype {str(dname)[:20]!r} is not allowed", code="bad-dtype"
            )
        if (
            not isinstance(shape, list)
            or len(shape) > max_ndim
            or not all(type(d) is int and 0 <= d < 2**40 for d in shape)
        ):
            raise RemoteProtocolError(f"tensor {name!r}: invalid shape", code="bad-tensor")
        if type(offset) is not int or type(nbytes) is not int:
            raise RemoteProtocolError(f"tensor {name!r}: invalid offset", code="bad-tensor")
        dtype = DTYPES[dname]
        count = math.prod(shape)
        if count * dtype.itemsize != nbytes:
            raise RemoteProtocolError(
                f"tensor {name!r}: {nbytes} bytes do not match shape {shape} of {dname}",
                code="bad-tensor",
            )
        if offset != expected or offset + nbytes > len(data):
            raise RemoteProtocolError(
                f"tensor {name!r}: data at {offset}+{nbytes} lies outside the message",
                code="bad-tensor",
            )
        chunk = data[offset : offset + nbytes]
        if isinstance(chunk, Segments):
            chunk = chunk.contiguous()  # a view when the tensor lies in one part
        try:
            arr = np.frombuffer(chunk, dtype=dtype, count=count).reshape(shape)
        except ValueError as exc:
            raise RemoteProtocolError(f"tensor {name!r}: {exc}", code="bad-tensor") from None
        out[name] = arr
        end = offset + nbytes
        expected = end + padding(nbytes)
    return out, end


def all_finite(arr: Array) -> bool:
    """True when every element of a numeric array is finite (one pass, no big temporaries)."""
    if arr.dtype.kind != "f" or arr.size == 0:
        return True
    # Any NaN or infinity makes the sum NaN or infinite, so a finite sum proves every
    # element finite. Summed in the array's own precision (float16 in float32, where it
    # would overflow at once): a float64 sum of float32 data costs several times as much.
    acc = np.float32 if arr.dtype.itemsize < 4 else arr.dtype.type
    with np.errstate(over="ignore", invalid="ignore"):
        total = float(arr.sum(dtype=acc))
    if math.isfinite(total):
        return True
    # The sum of finite values can overflow; decide exactly.
    with np.errstate(over="ignore", invalid="ignore"):
        return bool(np.isfinite(arr).all())


def structure(weights: Mapping[str, Array]) -> list[tuple[str, str, tuple[int, ...]]]:
    """The (name, dtype, shape) signature of a model, in order."""
    return [
        (k, dtype_name(np.asarray(v).dtype), tuple(np.asarray(v).shape)) for k, v in weights.items()
    ]


def nbytes(weights: Mapping[str, Array]) -> int:
    return sum(int(np.asarray(v).nbytes) for v in weights.values())


def views(arrays: Sequence[Array]) -> list[memoryview]:
    return [np.ascontiguousarray(a).reshape(-1).view(np.uint8).data for a in arrays]
