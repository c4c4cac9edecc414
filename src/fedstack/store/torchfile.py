"""Read a PyTorch ``torch.save`` file *without unpickling it*.

``torch.save`` (PyTorch >= 1.6) writes a zip archive: ``<archive>/data.pkl`` is a pickle
of the saved object in which every tensor is a call of ``torch._utils._rebuild_tensor_v2``
on a *persistent id* naming a storage, and each storage's raw bytes are the record
``<archive>/data/<key>``; ``<archive>/byteorder`` says how they are ordered. Unpickling
``data.pkl`` -- even with ``torch.load(weights_only=True)``, whose restricted unpickler is
still pickle -- is not what fedstack does with a file an operator hands it. This module
instead walks ``data.pkl`` with the opcode interpreter of :mod:`fedstack.data.inert_pickle`
(:func:`pickletools.genops` decodes; nothing is imported, looked up or called) and accepts
these global names as inert markers, by *name only*:

* ``collections.OrderedDict``: ``REDUCE`` with no arguments makes a plain dict (filled by
  ``SETITEMS``); ``BUILD`` on it is accepted only with the ``{'_metadata': ...}`` state
  ``Module.state_dict()`` attaches (module versions; dropped);
* ``torch._utils._rebuild_tensor_v2``: ``REDUCE`` with ``(storage, storage_offset, size,
  stride, requires_grad, backward_hooks)`` and an optional empty ``metadata``, where
  ``backward_hooks`` is an empty dict and ``storage`` is the value of ``BINPERSID`` on
  ``('storage', torch.<X>Storage, key, location, numel)``;
* ``torch._utils._rebuild_parameter`` on such a tensor, ``requires_grad`` and an empty
  dict: an ``nn.Parameter`` (``state_dict(keep_vars=True)``) is read as its tensor;
* ``torch._utils._rebuild_tensor_v3``, as current torch writes it for the storage form
  without a legacy class: the same arguments followed by a ``torch.<dtype>`` name, on a
  ``torch.storage.UntypedStorage`` (raw bytes);
* the legacy storage classes and dtype names of the allow-list: float64, float32,
  float16, bfloat16 (read as float32, as the torch adapter does: numpy has no bfloat16),
  int64, int32, int16, int8, uint8, bool. ``location`` (``cpu``, ``cuda:0``...) is not
  used: every tensor is read into host memory.

Each tensor is built here with numpy: the storage record is read (it must hold exactly
``numel`` elements), viewed with the archive's byte order, and the tensor's elements are
gathered with :func:`numpy.lib.stride_tricks.as_strided` after checking that the offset,
sizes and strides (non-negative) stay inside the storage; the result is a C-contiguous
copy, so transposed or sliced tensors come out as torch shows them. Tensors sharing a
storage share its bytes, not their arrays.

Everything else is refused with a :class:`~fedstack.errors.ConfigError` naming what and
where (the pickle opcode, its byte offset and the file; or the zip record): any other
global (``os.system``, ``torch.nn.Module``...), ``REDUCE``/``BUILD`` of any other shape,
another persistent id, tensor metadata, other dtypes (complex, quantized, uint16...),
compressed or missing records, storages shorter or longer than declared, a damaged or
truncated zip, the legacy (pre-1.6) format and TorchScript archives. Limits
(:class:`TorchLimits`) bound the file, the pickle, the number of zip records and the bytes
of all tensors built (a stride-0 view cannot expand a byte into terabytes).
"""

from __future__ import annotations

import io
import re
import zipfile
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from fedstack.data.inert_pickle import Limits, _Machine, _Marker, _Refused, _run, _text
from fedstack.errors import ConfigError

__all__ = ["TorchLimits", "load", "read_state_dict"]

CHECKPOINT_KEYS = ("state_dict", "model_state_dict", "model")


@dataclass(frozen=True)
class TorchLimits:
    """Resource limits for one ``torch.save`` file."""

    max_file_bytes: int = 8 * 2**30
    max_records: int = 1_000_000  # zip entries (one per storage, plus five)
    max_total_bytes: int = 8 * 2**30  # all tensors built, after strided views
    pickle: Limits = field(default_factory=lambda: Limits(max_bytes=64 * 2**20))


# torch dtype name -> (numpy type code of the stored elements, itemsize)
_DTYPES: dict[str, str] = {
    "float64": "f8",
    "float32": "f4",
    "float16": "f2",
    "bfloat16": "u2",  # the upper half of a float32; widened after gathering
    "int64": "i8",
    "int32": "i4",
    "int16": "i2",
    "int8": "i1",
    "uint8": "u1",
    "bool": "u1",  # any non-zero byte is True, as torch reads it
}
# legacy typed-storage class (torch.<X>Storage) -> torch dtype name
_STORAGE_CLASSES: dict[str, str] = {
    "DoubleStorage": "float64",
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
}
_UNTYPED = frozenset({"torch.storage.UntypedStorage", "torch.UntypedStorage"})
_ORDERED_DICT = "collections.OrderedDict"
_REBUILD_V2 = "torch._utils._rebuild_tensor_v2"
_REBUILD_V3 = "torch._utils._rebuild_tensor_v3"
_REBUILD_PARAMETER = "torch._utils._rebuild_parameter"
_STORAGE_NAMES = {f"torch.{c}": d for c, d in _STORAGE_CLASSES.items()} | dict.fromkeys(
    _UNTYPED, "uint8"
)
_DTYPE_NAMES = {f"torch.{d}": d for d in _DTYPES}
_TORCH_GLOBALS = frozenset(
    {_ORDERED_DICT, _REBUILD_V2, _REBUILD_V3, _REBUILD_PARAMETER}
    | set(_STORAGE_NAMES)
    | set(_DTYPE_NAMES)
)
_KEY = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_MAX_DIM = 2**62  # sizes and strides beyond this are not a tensor anyone saved


class _Storage:
    """A storage named by a persistent id; its bytes are read when a tensor needs them."""

    __slots__ = ("key", "dtype", "numel", "untyped")

    def __init__(self, key: str, dtype: str, numel: int, untyped: bool) -> None:
        self.key = key
        self.dtype = dtype  # torch dtype name; "uint8" for an untyped storage
        self.numel = numel  # elements of ``dtype`` (bytes when untyped)
        self.untyped = untyped


class _Archive:
    """The zip records of one ``torch.save`` file."""

    def __init__(self, data: bytes, source: str, limits: TorchLimits) -> None:
        self.source = source
        if len(data) > limits.max_file_bytes:
            raise ConfigError(
                f"{source}: {len(data)} bytes is over the {limits.max_file_bytes}-byte "
                "limit for a PyTorch file"
            )
        if data[:4] != b"PK\x03\x04":
            legacy = data[:2] in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")
            raise ConfigError(
                f"{source} is not a torch.save zip archive"
                + (
                    " (a raw pickle: the legacy format of PyTorch < 1.6 or "
                    "_use_new_zipfile_serialization=False, which is not read; save it "
                    "again with a current torch.save)"
                    if legacy
                    else ""
                )
            )
        try:
            self.zip = zipfile.ZipFile(io.BytesIO(data))
            infos = self.zip.infolist()
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError) as e:
            raise ConfigError(
                f"{source} is not a readable torch.save zip archive (truncated or "
                f"damaged?): {str(e)[:200]}"
            ) from None
        if len(infos) > limits.max_records:
            raise ConfigError(
                f"{source}: {len(infos)} zip records is over the limit of {limits.max_records}"
            )
        self.infos = {i.filename: i for i in infos}
        if len(self.infos) != len(infos):
            raise ConfigError(f"{source}: the zip archive names a record twice")
        pickles = [n for n in self.infos if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            script = any(n.endswith("/constants.pkl") for n in self.infos)
            raise ConfigError(
                f"{source}: "
                + (
                    "a TorchScript archive (torch.jit.save), not a state dict; save "
                    "model.state_dict() with torch.save"
                    if script
                    else "not a torch.save archive (no single <archive>/data.pkl record)"
                )
            )
        self.prefix = pickles[0][: -len("/data.pkl")]
        order = self.optional("byteorder", 16)
        if order is not None and order not in (b"little", b"big"):
            raise ConfigError(f"{source}: byteorder record {order[:16]!r} is not little or big")
        # absent: little, as torch reads it
        self.order: Literal["<", ">"] = ">" if order == b"big" else "<"
        version = self.optional("version", 16)
        if version is not None:
            text = version.strip()
            if not (text.isdigit() and 1 <= int(text) <= 99):
                raise ConfigError(f"{source}: version record {version[:16]!r} is not a version")
        self.cache: dict[str, bytes] = {}

    def optional(self, name: str, limit: int) -> bytes | None:
        full = f"{self.prefix}/{name}"
        if full not in self.infos:
            return None
        try:
            return self.read(full, limit)
        except _Refused as e:
            raise ConfigError(f"{self.source}: {e}") from None

    def read(self, name: str, limit: int, exact: int | None = None) -> bytes:
        """Record ``name``: at most ``limit`` bytes, or exactly ``exact``."""
        info = self.infos.get(name)
        if info is None:
            raise _Refused(f"the zip archive has no record {name[:200]!r}")
        if info.compress_type != zipfile.ZIP_STORED:
            raise _Refused(
                f"record {name!r} is compressed (torch.save stores records uncompressed; "
                "was the file re-zipped?)"
            )
        if exact is not None and info.file_size != exact:
            raise _Refused(
                f"record {name!r} holds {info.file_size} bytes, not the {exact} its "
                "storage declares"
            )
        if info.file_size > limit:
            raise _Refused(f"record {name!r} of {info.file_size} bytes is over {limit} bytes")
        try:
            with self.zip.open(info) as f:
                raw = f.read(limit + 1)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError) as e:
            raise _Refused(f"record {name!r} is unreadable: {str(e)[:200]}") from None
        if len(raw) != info.file_size:
            raise _Refused(f"record {name!r} is truncated")
        return raw

    def storage(self, key: str, nbytes: int) -> bytes:
        raw = self.cache.get(key)
        if raw is None:
            raw = self.read(f"{self.prefix}/data/{key}", nbytes, exact=nbytes)
            self.cache[key] = raw
        return raw


def _int(x: object) -> bool:
    return type(x) is int and 0 <= x < _MAX_DIM


def _dims(x: object, ndim: int) -> bool:
    return type(x) is tuple and len(x) <= ndim and all(_int(n) for n in x)


class _TorchMachine(_Machine):
    allowed_globals = _TORCH_GLOBALS
    accepts = (
        "only collections.OrderedDict, torch._utils._rebuild_tensor_v2/_v3 and the "
        "allow-listed torch storage and dtype names are accepted"
    )
    reads = "only plain data and tensors"
    max_protocol = 5
    inert_types = (_Marker, _Storage)

    def __init__(self, limits: TorchLimits, archive: _Archive) -> None:
        super().__init__(limits.pickle)
        self.torch_limits = limits
        self.archive = archive
        self.ordered: dict[int, dict[Any, Any]] = {}  # dicts made by OrderedDict()
        self.declared: dict[str, tuple[str, int]] = {}  # storage key -> (dtype, numel)
        self.built = 0  # bytes of all tensors built

    def describe(self, x: Any) -> str:
        if type(x) is _Storage:
            return f"storage {x.key!r}"
        return super().describe(x)

    def persistent_load(self, pid: Any) -> Any:
        if not (type(pid) is tuple and len(pid) == 5 and _text(pid[0]) == "storage"):
            raise _Refused(
                "BINPERSID with an id other than ('storage', type, key, location, numel)"
            )
        _, kind, key, location, numel = pid
        if type(kind) is not _Marker or kind.name not in _STORAGE_NAMES:
            what = kind.name if type(kind) is _Marker else type(kind).__name__
            raise _Refused(f"storage of type {what} (not an allow-listed storage class)")
        if type(key) is not str or not _KEY.fullmatch(key):
            raise _Refused(f"storage key {str(key)[:80]!r} is not a record name")
        if type(location) is not str or len(location) > 64:
            raise _Refused("storage location is not a short string")
        if not _int(numel):
            raise _Refused(f"storage {key!r} has a size {str(numel)[:40]} that is not a count")
        dtype = _STORAGE_NAMES[kind.name]
        if self.declared.setdefault(key, (dtype, numel)) != (dtype, numel):
            raise _Refused(f"storage {key!r} is declared twice with different types or sizes")
        return _Storage(key, dtype, numel, kind.name in _UNTYPED)

    def reduce(self, func: Any, args: Any) -> Any:
        if type(func) is not _Marker:
            raise _Refused(f"REDUCE on a {type(func).__name__} (only tensors are made)")
        if type(args) is not tuple:
            raise _Refused(f"REDUCE {func.name} with arguments of type {type(args).__name__}")
        if func.name == _ORDERED_DICT:
            if args:
                raise _Refused("REDUCE collections.OrderedDict with arguments (only () is read)")
            d: dict[Any, Any] = {}
            self.ordered[id(d)] = d
            return d
        if func.name == _REBUILD_V2 and len(args) in (6, 7):
            return self.tensor(args[:6], None, args[6] if len(args) == 7 else None)
        if func.name == _REBUILD_V3 and len(args) in (7, 8):
            return self.tensor(args[:6], args[6], args[7] if len(args) == 8 else None)
        if func.name == _REBUILD_PARAMETER:  # an nn.Parameter (state_dict(keep_vars=True))
            if (
                len(args) == 3
                and isinstance(args[0], np.ndarray)
                and type(args[1]) is bool
                and type(args[2]) is dict
                and not args[2]
            ):
                return args[0]
            raise _Refused(f"REDUCE {func.name} with arguments other than (tensor, bool, {{}})")
        if func.name in (_REBUILD_V2, _REBUILD_V3):
            raise _Refused(f"REDUCE {func.name} with {len(args)} arguments")
        raise _Refused(f"REDUCE {func.name} (only OrderedDict() and tensors are made)")

    def build(self, obj: Any, state: Any) -> Any:
        if (
            type(obj) is dict
            and id(obj) in self.ordered
            and type(state) is dict
            and set(state) <= {"_metadata"}
        ):
            return obj  # Module.state_dict()'s module versions: not part of the weights
        raise _Refused(
            f"BUILD on a {type(obj).__name__} (only a state dict's _metadata is accepted)"
        )

    def tensor(self, args: tuple[Any, ...], dtype_marker: Any, metadata: Any) -> Any:
        storage, offset, size, stride, requires_grad, hooks = args
        if type(storage) is not _Storage:
            raise _Refused(f"tensor storage is a {type(storage).__name__}, not a storage")
        ndim = self.limits.max_ndim
        if not (_int(offset) and _dims(size, ndim) and _dims(stride, ndim)):
            raise _Refused(
                f"tensor offset, size and stride are not non-negative integers "
                f"(at most {ndim} dimensions)"
            )
        if len(size) != len(stride):
            raise _Refused(f"tensor size {size} and stride {stride} differ in length")
        if type(requires_grad) is not bool or type(hooks) is not dict or hooks:
            raise _Refused("tensor requires_grad / backward_hooks are not (bool, empty dict)")
        if metadata is not None and not (type(metadata) is dict and not metadata):
            keys = list(metadata)[:4] if type(metadata) is dict else type(metadata).__name__
            raise _Refused(f"tensor metadata {keys} is not read")
        if dtype_marker is None:
            dtype = storage.dtype
        else:
            if type(dtype_marker) is not _Marker or dtype_marker.name not in _DTYPE_NAMES:
                raise _Refused("_rebuild_tensor_v3 without an allow-listed torch dtype")
            if not storage.untyped:
                raise _Refused("_rebuild_tensor_v3 on a typed storage")
            dtype = _DTYPE_NAMES[dtype_marker.name]
        code = _DTYPES[dtype]
        itemsize = int(code[1])
        nbytes = storage.numel * (1 if storage.untyped else itemsize)
        elements = nbytes // itemsize
        count = 1
        for n in size:
            count *= n
        out_itemsize = 4 if dtype == "bfloat16" else itemsize
        self.built += count * out_itemsize
        if self.built > self.torch_limits.max_total_bytes:
            raise _Refused(
                f"tensors of more than {self.torch_limits.max_total_bytes} bytes in all "
                f"(this one: size {size} of {dtype})"
            )
        raw = self.archive.storage(storage.key, nbytes)  # checks the record's length
        if count == 0:
            span = 1
            for n in size:
                span *= max(n, 1)
            if span * itemsize > self.torch_limits.max_total_bytes:  # numpy refuses it
                raise _Refused(f"an empty tensor of size {size}: its other sizes are too large")
            out = np.zeros(size, dtype=code)
        else:
            last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
            if last >= elements:
                raise _Refused(
                    f"tensor of size {size}, stride {stride} and offset {offset} reaches "
                    f"element {last} of storage {storage.key!r}, which holds {elements}"
                )
            base = np.frombuffer(raw, dtype=np.dtype(code).newbyteorder(self.archive.order))
            strides = tuple(s * itemsize if n > 1 else 0 for n, s in zip(size, stride, strict=True))
            view = np.lib.stride_tricks.as_strided(
                base[offset : last + 1], shape=size, strides=strides, writeable=False
            )
            out = np.array(view, dtype=np.dtype(code), order="C")  # native order, own memory
        if dtype == "bfloat16":
            return (out.astype(np.uint32) << 16).view(np.float32)
        if dtype == "bool":
            return out != 0
        return out


def load(data: bytes, source: str = "<bytes>", limits: TorchLimits | None = None) -> Any:
    """The object a ``torch.save`` file holds, as plain data (dict, list, tuple, str,
    bytes, int, float, bool, None) with each tensor a numpy array. Nothing in ``data`` is
    imported or run, and torch is not needed.

    Raises:
        ConfigError: For anything outside the supported subset or over ``limits``, naming
            what and where.
    """
    limits = limits or TorchLimits()
    archive = _Archive(data, source, limits)
    where = f"{source} ({archive.prefix}/data.pkl)"
    try:
        pickled = archive.read(f"{archive.prefix}/data.pkl", limits.pickle.max_bytes)
    except _Refused as e:
        raise ConfigError(f"{source}: {e}") from None
    return _run(_TorchMachine(limits, archive), pickled, where)


def read_state_dict(
    data: bytes, source: str = "<bytes>", limits: TorchLimits | None = None
) -> dict[str, np.ndarray[Any, Any]]:
    """The named tensors of a saved ``state_dict()`` (see :func:`load`); a checkpoint
    holding it under ``state_dict``, ``model_state_dict`` or ``model`` is accepted too
    (its other entries -- epoch, optimizer state... -- are ignored). Tensors saved as one
    (tied weights) come back as separate arrays.

    Raises:
        ConfigError: The file is refused (see :func:`load`) or holds no state dict.
    """
    obj = load(data, source, limits)
    state = obj
    if type(obj) is dict and not all(isinstance(v, np.ndarray) for v in obj.values()):
        for key in CHECKPOINT_KEYS:
            if type(obj.get(key)) is dict:
                state = obj[key]
                break
    if type(state) is not dict:
        what = "a single tensor" if isinstance(state, np.ndarray) else f"a {type(state).__name__}"
        raise ConfigError(
            f"{source} holds {what}, not a state dict ({{name: tensor}}); save model.state_dict()"
        )
    out: dict[str, np.ndarray[Any, Any]] = {}
    seen: set[int] = set()
    for name, value in state.items():
        if type(name) is not str or not isinstance(value, np.ndarray):
            raise ConfigError(
                f"{source}: entry {str(name)[:64]!r} is a {type(value).__name__}, not a "
                "tensor (save model.state_dict())"
            )
        out[name] = value.copy() if id(value) in seen else value
        seen.add(id(value))
    return out
