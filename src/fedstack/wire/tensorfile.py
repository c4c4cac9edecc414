"""Tensor files in the safetensors layout, encoded and decoded without I/O.

The layout (the one ``safetensors.numpy.load_file`` and ``safetensors.torch.load_file``
read)::

    u64 little-endian N | N bytes of JSON header | tensor data, back to back

The header maps each tensor name to ``{"dtype": "F32", "shape": [...], "data_offsets":
[begin, end]}`` (offsets relative to the start of the data) and may carry
``"__metadata__"``, a mapping of strings to strings. Tensors appear in the header in the
order of the mapping they came from, which :func:`decode` restores. In the data they are
laid out by decreasing item size, so each one starts aligned to its dtype; the header is
padded with spaces so the data starts on a 64-byte boundary of the file.

:func:`encode` returns the header and views of the arrays (no copy of tensor data);
:func:`decode` returns ``np.frombuffer`` views of the buffer it is given, after checking
everything: the header's size and JSON, names, the dtype allow-list (the wire's), shapes
against byte counts, and offsets contiguous and covering exactly the data. A file that
fails any check raises :class:`~fedstack.errors.TensorFileError`. No pickle.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np

from fedstack.errors import LocalProtocolError, RemoteProtocolError, TensorFileError
from fedstack.types import Array, Weights
from fedstack.wire import tensors

METADATA_KEY = "__metadata__"
ALIGN = 64
"""The data section starts at a multiple of this offset in the file."""
MAX_HEADER_BYTES = 100 * 1024 * 1024
"""The largest header :func:`decode` accepts by default (the safetensors library's limit)."""

_LEN = struct.Struct("<Q")
_CODES: dict[str, str] = {
    "float16": "F16",
    "float32": "F32",
    "float64": "F64",
    "int8": "I8",
    "int16": "I16",
    "int32": "I32",
    "int64": "I64",
    "uint8": "U8",
    "uint16": "U16",
    "uint32": "U32",
    "uint64": "U64",
    "bool": "BOOL",
}
_DTYPES: dict[str, np.dtype[Any]] = {code: tensors.DTYPES[n] for n, code in _CODES.items()}
_ENTRY_KEYS = frozenset(("dtype", "shape", "data_offsets"))


def encode(
    weights: Mapping[str, Array], metadata: Mapping[str, str] | None = None
) -> list[bytes | memoryview]:
    """The file's bytes as parts to write back to back: the header, then a view of each
    array's data (the arrays are not copied unless they are not C-contiguous little-endian).

    Raises:
        LocalProtocolError: a tensor name, dtype or metadata entry is not allowed (names
            and dtypes as on the wire; ``__metadata__`` is reserved; metadata strings only).
    """
    entries, arrays = tensors.prepare(weights, 0)
    order = sorted(range(len(arrays)), key=lambda i: -arrays[i].itemsize)
    offsets: dict[int, list[int]] = {}
    offset = 0
    for i in order:
        offsets[i] = [offset, offset + arrays[i].nbytes]
        offset += arrays[i].nbytes
    header: dict[str, Any] = {}
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise LocalProtocolError("tensor file metadata must map strings to strings")
        header[METADATA_KEY] = dict(metadata)
    for i, e in enumerate(entries):
        if e.name == METADATA_KEY:
            raise LocalProtocolError(f"{METADATA_KEY!r} is reserved, not a tensor name")
        header[e.name] = {
            "dtype": _CODES[e.dtype],
            "shape": list(e.shape),
            "data_offsets": offsets[i],
        }
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * ((-(_LEN.size + len(text))) % ALIGN)
    parts: list[bytes | memoryview] = [_LEN.pack(len(text)) + text]
    views = tensors.views(arrays)
    parts.extend(views[i] for i in order if arrays[i].nbytes)
    return parts


def decode(
    data: memoryview,
    *,
    max_tensors: int = 1 << 20,
    max_name_len: int = 1024,
    max_ndim: int = 8,
    max_header_bytes: int = MAX_HEADER_BYTES,
) -> tuple[Weights, dict[str, str]]:
    """The tensors (views of ``data``, in header order) and the metadata of a tensor file.

    Raises:
        TensorFileError: ``data`` is not a valid tensor file within the limits.
    """
    size = data.nbytes
    if size < _LEN.size:
        raise TensorFileError("tensor file too short for its header length")
    (n,) = _LEN.unpack_from(data, 0)
    if n > max_header_bytes or _LEN.size + n > size:
        raise TensorFileError(f"tensor file header length {n} exceeds the file or the limit")
    try:
        header = json.loads(
            bytes(data[_LEN.size : _LEN.size + n]), object_pairs_hook=_no_duplicates
        )
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError
        raise TensorFileError(f"tensor file header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise TensorFileError("tensor file header must be a JSON object")
    metadata = header.pop(METADATA_KEY, None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise TensorFileError(f"{METADATA_KEY} must map strings to strings")
    if len(header) > max_tensors:
        raise TensorFileError(f"{len(header)} tensors exceed the limit of {max_tensors}")
    start = _LEN.size + n
    spans = []
    for name, entry in header.items():
        spans.append((*_check_entry(name, entry, max_name_len, max_ndim), name))
    spans.sort(key=lambda s: (s[0], s[1]))
    expected = 0
    for begin, end, *_ in spans:
        if begin != expected:
            raise TensorFileError(
                f"tensor data at offset {begin} is not contiguous (expected {expected})"
            )
        expected = end
    if expected != size - start:
        raise TensorFileError(f"tensor data covers {expected} bytes, the file holds {size - start}")
    views: dict[str, Array] = {}
    for begin, _end, dtype, shape, name in spans:
        count = math.prod(shape)
        if count == 0:
            views[name] = np.empty(shape, dtype=dtype)
        else:
            views[name] = np.frombuffer(
                data, dtype=dtype, count=count, offset=start + begin
            ).reshape(shape)
    return {name: views[name] for name in header}, metadata


def _check_entry(
    name: str, entry: object, max_name_len: int, max_ndim: int
) -> tuple[int, int, np.dtype[Any], tuple[int, ...]]:
    try:
        tensors.check_name(name, max_name_len)
    except RemoteProtocolError as exc:
        raise TensorFileError(str(exc)) from None
    if not isinstance(entry, dict) or entry.keys() != _ENTRY_KEYS:
        raise TensorFileError(
            f"tensor {name!r}: entry must have exactly dtype, shape and data_offsets"
        )
    code, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    dtype = _DTYPES.get(code) if isinstance(code, str) else None
    if dtype is None:
        raise TensorFileError(
            f"tensor {name!r}: dtype {str(code)[:20]!r} is not allowed "
            f"(allowed: {', '.join(_DTYPES)})"
        )
    if (
        not isinstance(shape, list)
        or len(shape) > max_ndim
        or not all(type(d) is int and 0 <= d < 2**40 for d in shape)
    ):
        raise TensorFileError(f"tensor {name!r}: invalid shape")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise TensorFileError(f"tensor {name!r}: invalid data_offsets")
    begin, end = offsets
    if end - begin != math.prod(shape) * dtype.itemsize:
        raise TensorFileError(
            f"tensor {name!r}: {end - begin} bytes do not match shape {shape} of {code}"
        )
    return begin, end, dtype, tuple(shape)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("a key appears twice")
    return out
