"""Read plain data and numpy arrays out of a pickle file *without unpickling it*.

Some datasets (CIFAR-10/100's "python version") are only published as pickle files.
Unpickling such a file runs whatever the file names (``os.system``, any builtin...), so
fedstack never does. Instead this module walks the opcode stream with the standard
library's :func:`pickletools.genops` -- a pure parser that decodes each opcode's argument
and never imports, looks up or calls anything -- and interprets a small, explicit subset of
opcodes on a stack machine whose values are plain data only:

* scalars: ``None``, ``bool``, ``int``, ``float``, ``str``, ``bytes``. Python 2 strings
  (``BINSTRING``/``SHORT_BINSTRING``) become ``bytes``, like ``encoding='bytes'``, so the
  keys of a file written by Python 2 are ``b'data'``, ``b'labels'``...;
* containers: ``dict`` (keys must be scalars), ``list``, ``tuple``; ``MARK``; the memo
  (``PUT``/``GET``/``MEMOIZE``); ``PROTO`` 2-4 and ``FRAME``;
* numpy arrays, recognised by *name only*: a ``GLOBAL``/``STACK_GLOBAL`` is accepted only
  for ``numpy.core.multiarray._reconstruct``, ``numpy._core.multiarray._reconstruct``,
  ``numpy.ndarray`` and ``numpy.dtype`` (plus ``_codecs.encode`` and ``builtins.bytes``,
  which Python 3 uses to spell ``bytes`` at protocol 2). These names become inert markers;
  nothing is imported. ``REDUCE``/``BUILD`` on them must have exactly the argument shapes
  numpy writes, and the array is built here with ``np.frombuffer(raw, dtype).reshape(shape)``
  after checking the dtype is in an allow-list (``u1 i1 i2 i4 i8 f4 f8``, little-endian),
  the shape is non-negative and ``prod(shape) * itemsize == len(raw)``.

Everything else -- any other global, ``REDUCE`` on anything but those markers, ``INST``,
``OBJ``, ``NEWOBJ``, ``EXT*``, ``PERSID``, sets, out-of-band buffers, unknown opcodes --
raises :class:`~fedstack.errors.ConfigError` naming the opcode (and the global), the byte
offset and the file. So do truncated files, files over the size limit and containers over
the limits (file size, values, stack, container sizes, memo, nesting depth). The
interpreter is a flat loop (no recursion); containers nest at most ``max_depth`` deep, a
list or dict cannot change once it is inside another (so there are no cycles) and dict keys
are scalars, so the result is safe to hash, compare and print.
"""

from __future__ import annotations

import io
import pickletools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedstack.errors import ConfigError

__all__ = ["Limits", "parse_bytes", "parse_file"]


@dataclass(frozen=True)
class Limits:
    """Resource limits for one file."""

    max_bytes: int = 256 * 2**20  # CIFAR-100's ``train`` is ~155 MiB
    max_stack: int = 1_000_000  # values on the stack, all MARK levels together
    max_marks: int = 64  # MARK nesting depth
    max_container: int = 1_000_000  # items in one list / dict / tuple
    max_values: int = 4_000_000  # values pushed in all (bounds memory: ~100 B each)
    max_depth: int = 100  # containers inside containers
    max_memo: int = 1_000_000  # memo entries
    max_ndim: int = 32


_RECONSTRUCT = frozenset(
    {"numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct"}
)
_NDARRAY = "numpy.ndarray"
_DTYPE = "numpy.dtype"
_ENCODE = "_codecs.encode"
_BYTES = frozenset({"__builtin__.bytes", "builtins.bytes"})
_ALLOWED_GLOBALS = _RECONSTRUCT | _BYTES | {_NDARRAY, _DTYPE, _ENCODE}

# (type code, byte-order char in the dtype's pickled state) -> dtype. Only these are built.
_DTYPES: dict[tuple[str, str], np.dtype[Any]] = {
    ("u1", "|"): np.dtype("u1"),
    ("i1", "|"): np.dtype("i1"),
    ("i2", "<"): np.dtype("<i2"),
    ("i4", "<"): np.dtype("<i4"),
    ("i8", "<"): np.dtype("<i8"),
    ("f4", "<"): np.dtype("<f4"),
    ("f8", "<"): np.dtype("<f8"),
}

_SCALAR_KEYS = (str, bytes, int, float, bool, type(None))

# Opcodes that only push a decoded argument (ints, floats, strings, bytes).
_PUSH_ARG = frozenset(
    {
        "BININT",
        "BININT1",
        "BININT2",
        "LONG1",
        "LONG4",
        "BINFLOAT",
        "BINUNICODE",
        "SHORT_BINUNICODE",
        "BINUNICODE8",
        "BINBYTES",
        "SHORT_BINBYTES",
        "BINBYTES8",
    }
)
_PUSH_CONST: dict[str, Any] = {"NONE": None, "NEWTRUE": True, "NEWFALSE": False}


class _Refused(Exception):
    """Internal: the stream asks for something this reader does not do."""


class _Marker:
    """An allow-listed global name. Inert: never resolved to a real object."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name


class _Pending:
    """The result of ``REDUCE`` on ``_reconstruct`` or ``numpy.dtype``, awaiting ``BUILD``."""

    __slots__ = ("kind", "code", "value")

    def __init__(self, kind: str, code: str = "") -> None:
        self.kind = kind  # "array" or "dtype"
        self.code = code  # dtype type code, e.g. "u1"
        self.value: Any = None  # the built ndarray / dtype once BUILD has run


def _text(x: object) -> str | None:
    """A short ASCII string given as str (Python 3) or bytes (Python 2 str)."""
    if isinstance(x, bytes) and len(x) <= 16:
        try:
            return x.decode("ascii")
        except UnicodeDecodeError:
            return None
    if isinstance(x, str) and len(x) <= 16:
        return x
    return None


def _is_int(x: object, *values: int) -> bool:
    return type(x) in (int, bool) and (not values or x in values)


class _Machine:
    """The stack machine. A sibling reader (:mod:`fedstack.store.torchfile`) subclasses it:
    the class attributes below name what it accepts, and :meth:`reduce`, :meth:`build` and
    :meth:`persistent_load` are the only places a marker turns into a value."""

    allowed_globals: frozenset[str] = _ALLOWED_GLOBALS
    accepts = "only numpy array markers are accepted"  # the refused-global message
    reads = "only plain data and numpy arrays"  # the refused-opcode message
    max_protocol = 4
    # Values that are never data: refused anywhere but inside a tuple (a REDUCE argument),
    # and a tuple holding one is refused as data in turn.
    inert_types: tuple[type, ...] = (_Marker,)

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.stack: list[Any] = []
        self.metastack: list[list[Any]] = []
        self.below = 0  # values held in metastack frames
        self.memo: dict[int, Any] = {}
        self.marked: dict[int, tuple[Any, ...]] = {}  # id -> tuple holding a marker
        self.depths: dict[int, tuple[int, Any]] = {}  # id -> (nesting depth >= 2, container)
        self.sealed: dict[int, Any] = {}  # lists / dicts already inside another container
        self.pushes = 0

    # -- values --------------------------------------------------------------------------
    def item(self, x: Any, *, in_tuple: bool = False) -> Any:
        """Check a value about to go into a container; resolve a built pending object."""
        t = type(x)
        if t is _Pending:
            if x.value is None:
                raise _Refused(f"a numpy {x.kind} is used before its BUILD")
            return x.value
        if t in self.inert_types and not in_tuple:
            raise _Refused(f"the {self.describe(x)} is used as data")
        if t is tuple and id(x) in self.marked:
            raise _Refused("a REDUCE argument tuple is used as data")
        return x

    def child(self, x: Any, parent: Any, *, in_tuple: bool = False) -> tuple[Any, int]:
        """:meth:`item` for a value going into ``parent``, and its nesting depth. A list or
        dict put inside another container is sealed: it may not change afterwards, so the
        depth recorded for every container is final and no container can hold itself."""
        x = self.item(x, in_tuple=in_tuple)
        t = type(x)
        if t is list or t is dict or t is tuple:
            if x is parent:
                raise _Refused("a container inside itself")
            if t is not tuple:
                self.sealed[id(x)] = x
            entry = self.depths.get(id(x))
            return x, entry[0] if entry else 1
        return x, 0

    def set_depth(self, container: Any, child_depth: int) -> None:
        entry = self.depths.get(id(container))
        depth = max(entry[0] if entry else 1, child_depth + 1)
        if depth > self.limits.max_depth:
            raise _Refused(f"containers nested deeper than {self.limits.max_depth}")
        if depth >= 2:
            self.depths[id(container)] = (depth, container)

    def open_container(self, c: Any, kind: type) -> None:
        if type(c) is not kind:
            raise _Refused(f"{'APPEND' if kind is list else 'SETITEM'}(S) on a {type(c).__name__}")
        if id(c) in self.sealed:
            raise _Refused(f"a {kind.__name__} changed after it was put in another container")

    def push(self, x: Any) -> None:
        self.stack.append(x)
        self.pushes += 1
        if self.pushes > self.limits.max_values:
            raise _Refused(f"more than {self.limits.max_values} values")
        if len(self.stack) + self.below > self.limits.max_stack:
            raise _Refused(f"more than {self.limits.max_stack} values on the stack")

    def pop(self) -> Any:
        if not self.stack:
            raise _Refused("stack underflow")
        return self.stack.pop()

    def top(self) -> Any:
        if not self.stack:
            raise _Refused("stack underflow")
        return self.stack[-1]

    def mark(self) -> None:
        if len(self.metastack) >= self.limits.max_marks:
            raise _Refused(f"MARK nested deeper than {self.limits.max_marks}")
        self.metastack.append(self.stack)
        self.below += len(self.stack)
        self.stack = []

    def pop_mark(self) -> list[Any]:
        if not self.metastack:
            raise _Refused("no MARK on the stack")
        items = self.stack
        self.stack = self.metastack.pop()
        self.below -= len(self.stack)
        return items

    def sized(self, n: int) -> None:
        if n > self.limits.max_container:
            raise _Refused(f"a container of more than {self.limits.max_container} items")

    def make_tuple(self, items: list[Any]) -> tuple[Any, ...]:
        self.sized(len(items))
        out: list[Any] = []
        deepest, marker = 0, False
        for x in items:
            value, depth = self.child(x, None, in_tuple=True)
            out.append(value)
            deepest = max(deepest, depth)
            marker = marker or type(value) in self.inert_types
        vals = tuple(out)
        self.set_depth(vals, deepest)
        if marker:
            self.marked[id(vals)] = vals
        return vals

    def setitems(self, d: Any, items: list[Any]) -> None:
        self.open_container(d, dict)
        if len(items) % 2:
            raise _Refused("SETITEMS with an odd number of values")
        deepest = 0
        for i in range(0, len(items), 2):
            key = self.item(items[i])
            if not isinstance(key, _SCALAR_KEYS):
                raise _Refused(f"a dict key of type {type(key).__name__}")
            d[key], depth = self.child(items[i + 1], d)
            deepest = max(deepest, depth)
        self.sized(len(d))
        self.set_depth(d, deepest)

    def appends(self, lst: Any, items: list[Any]) -> None:
        self.open_container(lst, list)
        deepest = 0
        for x in items:
            value, depth = self.child(x, lst)
            lst.append(value)
            deepest = max(deepest, depth)
        self.sized(len(lst))
        self.set_depth(lst, deepest)

    def memo_put(self, idx: int, value: Any) -> None:
        if idx not in self.memo and len(self.memo) >= self.limits.max_memo:
            raise _Refused(f"more than {self.limits.max_memo} memo entries")
        self.memo[idx] = value

    def memo_get(self, idx: int) -> Any:
        if idx not in self.memo:
            raise _Refused(f"memo key {idx} was never stored")
        v = self.memo[idx]
        if type(v) is _Pending and v.value is not None:
            return v.value
        return v

    def describe(self, x: Any) -> str:
        """How an inert value is named in an error message."""
        return f"global {x.name}" if type(x) is _Marker else type(x).__name__

    def persistent_load(self, pid: Any) -> Any:
        """``BINPERSID``: the value a persistent id stands for. Not read here."""
        raise _Refused(f"this opcode is not read ({self.reads})")

    # -- numpy ---------------------------------------------------------------------------
    def reduce(self, func: Any, args: Any) -> Any:
        if type(func) is not _Marker:
            raise _Refused(f"REDUCE on a {type(func).__name__} (only numpy arrays are read)")
        if type(args) is not tuple:
            raise _Refused(f"REDUCE {func.name} with arguments of type {type(args).__name__}")
        name = func.name
        if name in _RECONSTRUCT:
            if (
                len(args) == 3
                and type(args[0]) is _Marker
                and args[0].name == _NDARRAY
                and type(args[1]) is tuple
                and args[1] == (0,)
                and _text(args[2]) == "b"
            ):
                return _Pending("array")
            raise _Refused(f"REDUCE {name} with arguments other than numpy writes")
        if name == _DTYPE:
            code = _text(args[0]) if len(args) == 3 else None
            if code is None or not (_is_int(args[1], 0) and _is_int(args[2], 1)):
                raise _Refused("REDUCE numpy.dtype with arguments other than numpy writes")
            if code not in {c for c, _ in _DTYPES}:
                raise _Refused(
                    f"numpy dtype {code!r} is not in the allow-list "
                    f"{sorted({c for c, _ in _DTYPES})}"
                )
            return _Pending("dtype", code)
        if name == _ENCODE:  # Python 3, protocol < 3: bytes spelled _codecs.encode(s, latin1)
            if len(args) == 2 and type(args[0]) is str and _text(args[1]) in ("latin1", "latin-1"):
                try:
                    return args[0].encode("latin-1")
                except UnicodeEncodeError:
                    raise _Refused("_codecs.encode of a non-latin-1 string") from None
            raise _Refused("REDUCE _codecs.encode with arguments other than (str, 'latin1')")
        if name in _BYTES and args == ():  # Python 3, protocol < 3: b"" is bytes()
            return b""
        raise _Refused(f"REDUCE {name} (only numpy arrays are read)")

    def build(self, obj: Any, state: Any) -> Any:
        if type(obj) is not _Pending or obj.value is not None:
            raise _Refused(f"BUILD on a {type(obj).__name__} (only numpy arrays are read)")
        if type(state) is not tuple or id(state) in self.marked:
            raise _Refused(f"BUILD numpy {obj.kind} with a state other than numpy writes")
        if obj.kind == "dtype":
            obj.value = self.build_dtype(obj.code, state)
        else:
            obj.value = self.build_array(state)
        return obj.value

    @staticmethod
    def build_dtype(code: str, state: tuple[Any, ...]) -> np.dtype[Any]:
        # (version 3, byte order, subarray, names, fields, elsize, alignment, flags)
        if not (
            len(state) == 8
            and _is_int(state[0], 3)
            and state[2] is None
            and state[3] is None
            and state[4] is None
            and _is_int(state[5], -1)
            and _is_int(state[6], -1)
            and _is_int(state[7], 0)
        ):
            raise _Refused("BUILD numpy.dtype with a state other than a plain numeric dtype")
        order = _text(state[1])
        dtype = _DTYPES.get((code, order or ""))
        if dtype is None:
            raise _Refused(
                f"numpy dtype {code!r} with byte order {order!r} is not in the "
                "allow-list (little-endian or '|' only)"
            )
        return dtype

    def build_array(self, state: tuple[Any, ...]) -> np.ndarray[Any, Any]:
        # (version 1, shape, dtype, is_fortran, raw bytes)
        if not (len(state) == 5 and _is_int(state[0], 1)):
            raise _Refused("BUILD numpy.ndarray with a state other than numpy writes")
        _, shape, dtype, fortran, raw = state
        if not isinstance(dtype, np.dtype) or dtype not in _DTYPES.values():
            raise _Refused("BUILD numpy.ndarray without an allow-listed dtype")
        if not _is_int(fortran, 0, 1):
            raise _Refused("BUILD numpy.ndarray with a non-boolean is_fortran flag")
        if type(raw) is not bytes:
            raise _Refused(f"numpy array data given as {type(raw).__name__}, not raw bytes")
        if (
            type(shape) is not tuple
            or len(shape) > self.limits.max_ndim
            or not all(_is_int(n) and n >= 0 for n in shape)
        ):
            raise _Refused("numpy array shape is not a tuple of non-negative ints")
        count = 1
        for n in shape:
            count *= int(n)
            if count * dtype.itemsize > len(raw):
                break
        if count * dtype.itemsize != len(raw):
            raise _Refused(
                f"numpy array of shape {self.short(shape)} and dtype {dtype} "
                f"needs a different byte count than the {len(raw)} given"
            )
        flat = np.frombuffer(raw, dtype=dtype)
        return flat.reshape(tuple(int(n) for n in shape), order="F" if fortran else "C").copy(
            order="K"
        )

    @staticmethod
    def short(shape: tuple[Any, ...]) -> str:
        text = repr(tuple(n if n < 10**12 else "huge" for n in shape[:8]))
        return text if len(shape) <= 8 else text[:-1] + ", ...)"


def parse_bytes(data: bytes, source: str = "<bytes>", limits: Limits | None = None) -> Any:
    """Interpret one pickle held in ``data``; return plain data (dict, list, tuple, str,
    bytes, int, float, bool, None) and numpy arrays. Nothing in ``data`` is imported or run.

    Raises:
        ConfigError: For anything outside the supported subset, naming the opcode, its byte
            offset and ``source``; also for truncated or malformed data and exceeded limits.
    """
    limits = limits or Limits()
    if len(data) > limits.max_bytes:
        raise ConfigError(
            f"{source}: {len(data)} bytes is over the {limits.max_bytes}-byte "
            "limit for a pickled data file"
        )
    return _run(_Machine(limits), data, source)


def _run(m: _Machine, data: bytes, source: str) -> Any:
    """Interpret the pickle ``data`` on machine ``m`` (the size was checked by the caller)."""
    stream = io.BytesIO(data)
    op_name, pos = "(start)", 0
    result: Any = None
    try:
        for opcode, decoded, at in pickletools.genops(stream):
            op_name, pos = opcode.name, at or 0
            arg: Any = decoded
            if op_name in _PUSH_ARG:
                m.push(arg)
            elif op_name in _PUSH_CONST:
                m.push(_PUSH_CONST[op_name])
            elif op_name in ("BINSTRING", "SHORT_BINSTRING"):  # Python 2 str -> bytes
                m.push(arg.encode("latin-1"))
            elif op_name in ("BINPUT", "LONG_BINPUT"):
                m.memo_put(arg, m.top())
            elif op_name == "MEMOIZE":
                m.memo_put(len(m.memo), m.top())
            elif op_name in ("BINGET", "LONG_BINGET"):
                m.push(m.memo_get(arg))
            elif op_name == "MARK":
                m.mark()
            elif op_name == "EMPTY_DICT":
                m.push({})
            elif op_name == "EMPTY_LIST":
                m.push([])
            elif op_name == "EMPTY_TUPLE":
                m.push(())
            elif op_name in ("TUPLE1", "TUPLE2", "TUPLE3"):
                n = int(op_name[-1])
                if len(m.stack) < n:
                    raise _Refused("stack underflow")
                items = m.stack[-n:]
                del m.stack[-n:]
                m.push(m.make_tuple(items))
            elif op_name == "TUPLE":
                m.push(m.make_tuple(m.pop_mark()))
            elif op_name == "LIST":
                lst: list[Any] = []
                m.appends(lst, m.pop_mark())
                m.push(lst)
            elif op_name == "DICT":
                d: dict[Any, Any] = {}
                m.setitems(d, m.pop_mark())
                m.push(d)
            elif op_name == "APPEND":
                value = m.pop()
                m.appends(m.top(), [value])
            elif op_name == "APPENDS":
                items = m.pop_mark()
                m.appends(m.top(), items)
            elif op_name == "SETITEM":
                value = m.pop()
                key = m.pop()
                m.setitems(m.top(), [key, value])
            elif op_name == "SETITEMS":
                items = m.pop_mark()
                m.setitems(m.top(), items)
            elif op_name in ("GLOBAL", "STACK_GLOBAL"):
                if op_name == "GLOBAL":
                    module, _, name = str(arg).partition(" ")
                else:
                    name, module = m.pop(), m.pop()
                    if type(module) is not str or type(name) is not str:
                        raise _Refused("STACK_GLOBAL on values that are not strings")
                full = f"{module}.{name}"
                if full not in m.allowed_globals:
                    raise _Refused(
                        f"refused {op_name} {full[:200]!r}: {m.accepts} and nothing "
                        "named in the file is imported or called"
                    )
                m.push(_Marker(full))
            elif op_name == "REDUCE":
                args = m.pop()
                func = m.pop()
                m.push(m.reduce(func, args))
            elif op_name == "BUILD":
                state = m.pop()
                obj = m.pop()
                m.push(m.build(obj, state))
            elif op_name == "BINPERSID":
                m.push(m.persistent_load(m.pop()))
            elif op_name == "PROTO":
                if not 2 <= arg <= m.max_protocol:
                    raise _Refused(f"pickle protocol {arg} (2-{m.max_protocol} are read)")
            elif op_name == "FRAME":
                pass  # protocol 4 framing only groups opcodes; genops reads through it
            elif op_name == "STOP":
                if m.metastack or len(m.stack) != 1:
                    raise _Refused("STOP with an unbalanced stack")
                result = m.item(m.stack[0])
            else:
                raise _Refused(f"this opcode is not read ({m.reads})")
    except ConfigError:
        raise
    except _Refused as e:
        raise ConfigError(f"{source}: pickle opcode {op_name} at byte {pos}: {e}") from None
    except Exception as e:  # malformed input: genops' ValueError, bad unicode, bad types...
        raise ConfigError(
            f"{source}: not a readable pickle (after opcode {op_name} at byte "
            f"{pos}): {type(e).__name__}: {str(e)[:200]}"
        ) from None
    if stream.tell() != len(data):
        raise ConfigError(
            f"{source}: {len(data) - stream.tell()} trailing bytes after the pickle's STOP opcode"
        )
    return result


def parse_file(path: str | Path, limits: Limits | None = None) -> Any:
    """:func:`parse_bytes` on a file, refusing files over ``limits.max_bytes`` before
    reading them."""
    limits = limits or Limits()
    p = Path(path)
    try:
        size = p.stat().st_size
        if size > limits.max_bytes:
            raise ConfigError(
                f"{p}: {size} bytes is over the {limits.max_bytes}-byte limit "
                "for a pickled data file"
            )
        with p.open("rb") as f:
            data = f.read(limits.max_bytes + 1)
    except OSError as e:
        raise ConfigError(f"cannot read {p}: {e}") from e
    return parse_bytes(data, str(p), limits)
