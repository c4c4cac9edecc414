"""CIFAR-10/100's pickled "python version", read without unpickling, on small generated files.

The files are written here in the real structure two ways: with the standard ``pickle``
module (the *writer* only, protocol 2 like the originals) and byte by byte in the style of
Python 2's cPickle (``BINSTRING`` keys, ``numpy.core.multiarray._reconstruct``), which is
what the published archives contain. Hostile files must be refused without running
anything.
"""

from __future__ import annotations

import os
import pickle
import pickletools
import struct
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedstack.data.cifar import (
    CLASSES,
    PY_TEST_FILE,
    PY_TRAIN_FILES,
    cifar10_class_names,
    cifar100_class_names,
    detect_cifar10,
    load_cifar10,
    load_cifar100,
    read_python_batch,
)
from fedstack.data.inert_pickle import Limits, parse_bytes, parse_file
from fedstack.errors import ConfigError

N = 6  # images per generated batch


# -- writers -----------------------------------------------------------------------------


def write_batch(path: Path, labels: np.ndarray, images: np.ndarray) -> None:
    """The binary version of the same batch (as in test_cifar.py)."""
    chw = images.transpose(0, 3, 1, 2).reshape(len(labels), -1)
    path.write_bytes(np.concatenate([labels[:, None].astype(np.uint8), chw], axis=1).tobytes())


class Py2:
    """Protocol-2 opcodes as Python 2's cPickle wrote CIFAR's files (str -> BINSTRING)."""

    def __init__(self) -> None:
        self.out = bytearray(b"\x80\x02")
        self.memo = 0

    def put(self) -> int:
        self.memo += 1
        self.out += (
            b"q" + bytes([self.memo]) if self.memo < 256 else b"r" + struct.pack("<I", self.memo)
        )
        return self.memo

    def get(self, idx: int) -> None:
        self.out += b"h" + bytes([idx])

    def s(self, b: bytes) -> None:
        self.out += (
            b"U" + bytes([len(b)]) if len(b) < 256 else b"T" + struct.pack("<i", len(b))
        ) + b
        self.put()

    def i(self, v: int) -> None:
        if 0 <= v < 256:
            self.out += b"K" + bytes([v])
        elif 0 <= v < 65536:
            self.out += b"M" + struct.pack("<H", v)
        else:
            self.out += b"J" + struct.pack("<i", v)

    def glob(self, module: bytes, name: bytes) -> int:
        self.out += b"c" + module + b"\n" + name + b"\n"
        return self.put()

    def array(self, a: np.ndarray, dtype_memo: int | None = None) -> int:
        """A C-contiguous numeric array; ``dtype_memo`` re-uses an earlier dtype (BINGET)."""
        self.glob(b"numpy.core.multiarray", b"_reconstruct")
        self.glob(b"numpy", b"ndarray")
        self.i(0)
        self.out += b"\x85"  # TUPLE1
        self.put()
        self.s(b"b")
        self.out += b"\x87R"  # TUPLE3 REDUCE
        self.put()
        self.out += b"("  # MARK
        self.i(1)
        for n in a.shape:
            self.i(n)
        self.out += {1: b"\x85", 2: b"\x86", 3: b"\x87"}[a.ndim]
        self.put()
        if dtype_memo is None:
            self.glob(b"numpy", b"dtype")
            self.s(a.dtype.str[1:].encode())
            self.i(0)
            self.i(1)
            self.out += b"\x87R"
            dtype_memo = self.put()
            self.out += b"("
            self.i(3)
            self.s(a.dtype.str[:1].encode())
            self.out += b"NNN" + b"J\xff\xff\xff\xff" * 2
            self.i(0)
            self.out += b"t"
            self.put()
            self.out += b"b"  # BUILD
        else:
            self.get(dtype_memo)
        self.out += b"\x89"  # NEWFALSE: not Fortran order
        self.s(a.tobytes())
        self.out += b"t"
        self.put()
        self.out += b"b"
        return dtype_memo

    def value(self, v: Any) -> None:
        if isinstance(v, bytes):
            self.s(v)
        elif isinstance(v, int):
            self.i(v)
        elif isinstance(v, np.ndarray):
            self.array(v)
        elif isinstance(v, list):
            self.out += b"]"
            self.put()
            self.out += b"("
            for x in v:
                self.value(x)
            self.out += b"e"  # APPENDS
        else:
            raise TypeError(type(v))

    def dict(self, d: dict[bytes, Any]) -> bytes:
        self.out += b"}"
        self.put()
        self.out += b"("
        for k, v in d.items():
            self.s(k)
            self.value(v)
        self.out += b"u."  # SETITEMS STOP
        return bytes(self.out)


def batch_dict(
    rng: np.random.Generator,
    name: str,
    label_keys: dict[str, int],
) -> tuple[dict[bytes, Any], np.ndarray, dict[str, list[int]]]:
    """The real structure: CHW rows of 3072 bytes, labels as Python int lists."""
    images = rng.integers(0, 256, size=(N, 32, 32, 3), dtype=np.uint8)
    labels = {k: [int(x) for x in rng.integers(0, n, size=N)] for k, n in label_keys.items()}
    d: dict[bytes, Any] = {b"data": images.transpose(0, 3, 1, 2).reshape(N, 3072).copy()}
    d.update({k.encode(): v for k, v in labels.items()})
    d[b"batch_label"] = f"{name} batch".encode()
    d[b"filenames"] = [f"img_{name}_{i}.png".encode() for i in range(N)]
    return d, images, labels


def write(path: Path, d: dict[bytes, Any], style: str) -> None:
    path.write_bytes(Py2().dict(d) if style == "py2" else pickle.dumps(d, protocol=2))


def make_cifar10(
    root: Path,
    style: str,
    seed: int = 0,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    data = {}
    for name in [*PY_TRAIN_FILES, PY_TEST_FILE]:
        d, images, labels = batch_dict(rng, name, {"labels": 10})
        write(folder / name, d, style)
        data[name] = (images, np.array(labels["labels"]))
    meta = {
        b"num_cases_per_batch": N,
        b"label_names": [c.encode() for c in CLASSES],
        b"num_vis": 3072,
    }
    write(folder / "batches.meta", meta, style)
    return data


# -- round trips -------------------------------------------------------------------------


def test_numpy_pickles_with_an_allow_listed_name() -> None:
    blob = pickle.dumps(np.zeros(2, np.uint8), protocol=2)
    assert b"multiarray\n_reconstruct" in blob and (b"numpy._core" in blob or b"numpy.core" in blob)


def test_py2_style_bytes_are_what_pickle_itself_reads() -> None:
    # Our own in-memory bytes (nothing from disk): proves the hand-made stream is faithful.
    d, _, _ = batch_dict(np.random.default_rng(1), "x", {"labels": 10})
    blob = Py2().dict(d)
    ref = pickle.loads(blob, encoding="bytes")  # noqa: S301 - trusted, test-made bytes
    ours = parse_bytes(blob)
    assert ours.keys() == ref.keys() == {b"data", b"labels", b"batch_label", b"filenames"}
    np.testing.assert_array_equal(ours[b"data"], ref[b"data"])
    assert ours[b"data"].dtype == np.uint8 and ours[b"data"].shape == (N, 3072)
    assert ours[b"labels"] == ref[b"labels"] and ours[b"filenames"] == ref[b"filenames"]
    assert ours[b"batch_label"] == b"x batch"


@pytest.mark.parametrize("style", ["py2", "pickle"])
def test_round_trip_matches_what_was_written_and_the_binary_reader(
    tmp_path: Path, style: str
) -> None:
    data = make_cifar10(tmp_path / "py", style)
    x_train, y_train, x_test, y_test = load_cifar10(tmp_path / "py")
    assert x_train.shape == (5 * N, 32, 32, 3) and x_train.dtype == np.uint8
    assert y_train.dtype == np.int64 and x_train.flags.c_contiguous
    np.testing.assert_array_equal(x_train[:N], data["data_batch_1"][0])
    np.testing.assert_array_equal(y_train[N : 2 * N], data["data_batch_2"][1])
    np.testing.assert_array_equal(x_test, data["test_batch"][0])
    np.testing.assert_array_equal(y_test, data["test_batch"][1])
    # The same images and labels in the binary format read back identically.
    binary = tmp_path / "bin" / "cifar-10-batches-bin"
    binary.mkdir(parents=True)
    for name, (images, labels) in data.items():
        write_batch(binary / f"{name}.bin", labels, images)
    arrays: tuple[npt.NDArray[Any], ...] = (x_train, y_train, x_test, y_test)
    loaded: tuple[npt.NDArray[Any], ...] = load_cifar10(tmp_path / "bin")
    for a, b in zip(loaded, arrays, strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    assert cifar10_class_names(tmp_path / "py") == CLASSES
    assert cifar10_class_names(tmp_path / "bin") == CLASSES  # no batches.meta.txt: default
    x1, y1 = read_python_batch(tmp_path / "py" / "cifar-10-batches-py" / "data_batch_3")
    np.testing.assert_array_equal(x1, data["data_batch_3"][0])


def test_format_is_auto_detected(tmp_path: Path) -> None:
    make_cifar10(tmp_path, "py2")
    folder = tmp_path / "cifar-10-batches-py"
    assert detect_cifar10(tmp_path) == (folder, "python")
    assert detect_cifar10(folder) == (folder, "python")  # the folder itself works too
    x, y, _, _ = load_cifar10(folder, train_files=["data_batch_2.bin"])  # suffix dropped
    assert x.shape == (N, 32, 32, 3) and y.shape == (N,)
    binary = tmp_path / "cifar-10-batches-bin"
    binary.mkdir()
    (binary / "test_batch.bin").write_bytes(b"")
    assert detect_cifar10(tmp_path) == (binary, "binary")  # both present: binary first
    names = [f"c{i}" for i in range(10)]
    (folder / "batches.meta").write_bytes(Py2().dict({b"label_names": [n.encode() for n in names]}))
    (folder / "test_batch.bin").unlink(missing_ok=True)
    assert cifar10_class_names(folder) == names


def test_cifar100_python_and_binary(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    py = tmp_path / "cifar-100-python"
    py.mkdir()
    written = {}
    for name in ("train", "test"):
        d, images, labels = batch_dict(rng, name, {"fine_labels": 100, "coarse_labels": 20})
        write(py / name, d, "py2" if name == "train" else "pickle")
        written[name] = (images, labels)
    fine = [f"fine{i}".encode() for i in range(100)]
    coarse = [f"coarse{i}".encode() for i in range(20)]
    write(py / "meta", {b"fine_label_names": fine, b"coarse_label_names": coarse}, "py2")
    x_train, y_train, x_test, y_test = load_cifar100(tmp_path)
    np.testing.assert_array_equal(x_train, written["train"][0])
    np.testing.assert_array_equal(y_train, written["train"][1]["fine_labels"])
    np.testing.assert_array_equal(x_test, written["test"][0])
    _, yc, _, _ = load_cifar100(py, label_mode="coarse")
    np.testing.assert_array_equal(yc, written["train"][1]["coarse_labels"])
    assert cifar100_class_names(tmp_path, "coarse") == [c.decode() for c in coarse]
    assert cifar100_class_names(tmp_path)[99] == "fine99"
    # The binary version: coarse byte, fine byte, then the CHW pixels.
    binary = tmp_path / "b" / "cifar-100-binary"
    binary.mkdir(parents=True)
    for name, (images, labels) in written.items():
        chw = images.transpose(0, 3, 1, 2).reshape(N, -1)
        lab = np.stack([labels["coarse_labels"], labels["fine_labels"]], axis=1)
        (binary / f"{name}.bin").write_bytes(
            np.concatenate([lab.astype(np.uint8), chw], axis=1).tobytes()
        )
    for a, b in zip(load_cifar100(tmp_path / "b"), (x_train, y_train, x_test, y_test), strict=True):
        np.testing.assert_array_equal(a, b)


def test_memo_get_of_a_built_dtype_and_other_protocols() -> None:
    w = Py2()
    a, b = np.arange(6, dtype=np.uint8).reshape(2, 3), np.arange(4, dtype=np.uint8)
    w.out += b"]"
    w.put()
    w.out += b"("
    memo = w.array(a)
    w.array(b, dtype_memo=memo)  # the second array re-uses the built dtype via BINGET
    w.out += b"e."
    got = parse_bytes(bytes(w.out))
    np.testing.assert_array_equal(got[0], a)
    np.testing.assert_array_equal(got[1], b)
    value: dict[str, Any] = {
        "f8": np.linspace(0, 1, 5),
        "i8": np.arange(-3, 3, dtype=np.int64),
        "i2": np.zeros((0, 4), np.int16),
        "f4F": np.asfortranarray(np.ones((2, 3), "f4")),
        "plain": [1, -2, 2**70, 1.5, None, True, "é", b"\x00\xff", (1, (2,)), {}],
    }
    for protocol in (2, 3, 4):
        got = parse_bytes(pickle.dumps(value, protocol=protocol))
        assert got["plain"] == value["plain"]
        for k in ("f8", "i8", "i2", "f4F"):
            assert got[k].dtype == value[k].dtype and got[k].shape == value[k].shape
            np.testing.assert_array_equal(got[k], value[k])
        assert got["f4F"].flags.f_contiguous and got["f8"].flags.writeable


# -- hostile files -----------------------------------------------------------------------


class Reduce:
    def __init__(self, func: Any, args: tuple[Any, ...]) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return self.func, self.args


@pytest.mark.parametrize("protocol", [2, 4])
def test_os_system_is_refused_without_running(tmp_path: Path, protocol: int) -> None:
    marker = tmp_path / "pwned"
    blob = pickle.dumps({b"data": Reduce(os.system, (f"touch {marker}",))}, protocol=protocol)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "test_batch").write_bytes(blob)
    op = "GLOBAL" if protocol == 2 else "STACK_GLOBAL"
    with pytest.raises(ConfigError, match=rf"test_batch.*{op} '(posix|nt)\.system'"):
        load_cifar10(tmp_path, train_files=[])
    with pytest.raises(ConfigError, match="system"):
        parse_file(folder / "test_batch")
    assert not marker.exists()


def test_eval_and_other_code_paths_are_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    code = f"__import__('os').system('touch {marker}')"
    with pytest.raises(ConfigError, match=r"GLOBAL '__builtin__\.eval'"):
        parse_bytes(pickle.dumps(Reduce(eval, (code,)), protocol=2))
    with pytest.raises(ConfigError, match=r"STACK_GLOBAL 'builtins\.eval'"):
        parse_bytes(pickle.dumps(Reduce(eval, (code,)), protocol=4))
    assert not marker.exists()
    refused = {
        # allow-listed name, wrong use: REDUCE numpy.ndarray itself
        b"\x80\x02cnumpy\nndarray\nK\x01\x85R.": "REDUCE numpy.ndarray",
        # a numpy name that is not on the list
        b"\x80\x02cnumpy.core.multiarray\nscalar\n.": "numpy.core.multiarray.scalar",
        # INST / OBJ / NEWOBJ / EXT1 / PERSID / BINPERSID
        b"(ios\nsystem\nS'id'\n.": "INST",
        b"\x80\x02(K\x01o.": "OBJ",
        b"\x80\x02N)\x81.": "NEWOBJ",
        b"\x80\x02\x82\x01.": "EXT1",
        b"Pid\n.": "PERSID",
        b"\x80\x02NQ.": "BINPERSID",
        b"\x80\x05\x8f.": "protocol 5",
        b"\x80\x02}q\x00]q\x01K\x01s.": "dict key of type list",
        b"\x80\x02K\x01K\x02.": "unbalanced",
        b"\x80\x02N.garbage": "trailing bytes",
        b"\x80\x02" + b"(" * 100 + b".": "MARK nested deeper",
        b"\x80\x02N" + b"\x85" * 200 + b".": "nested deeper than 100",
        b"\x80\x02" + b"]" * 200 + b"a" * 199 + b".": "nested deeper than 100",
        b"\x80\x02]q\x00h\x00a.": "inside itself",
        b"\x80\x02]q\x00]h\x00ah\x00K\x01a.": "changed after it was put in",
    }
    for blob, message in refused.items():
        with pytest.raises(ConfigError, match=message):
            parse_bytes(blob)


def _array(shape: tuple[int, ...], dtype: str, raw: bytes, order: bytes = b"|") -> bytes:
    w = Py2()
    w.glob(b"numpy.core.multiarray", b"_reconstruct")
    w.glob(b"numpy", b"ndarray")
    w.out += b"K\x00\x85U\x01b\x87R(K\x01"
    w.out += (
        b"("
        + b"".join(
            b"J" + struct.pack("<i", n) if n < 2**31 else b"\x8a\x08" + struct.pack("<q", n)
            for n in shape
        )
        + b"t"
    )
    w.glob(b"numpy", b"dtype")
    w.out += b"U" + bytes([len(dtype)]) + dtype.encode() + b"K\x00K\x01\x87R"
    w.out += b"(K\x03U\x01" + order + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
    w.out += b"\x89T" + struct.pack("<i", len(raw)) + raw + b"tb."
    return bytes(w.out)


def test_array_checks() -> None:
    ok = parse_bytes(_array((2, 3), "u1", bytes(range(6))))
    np.testing.assert_array_equal(ok, np.arange(6, dtype=np.uint8).reshape(2, 3))
    with pytest.raises(ConfigError, match="different byte count"):
        parse_bytes(_array((2, 3), "u1", bytes(range(5))))
    with pytest.raises(ConfigError, match="different byte count"):
        parse_bytes(_array((2**40, 2**40, 3072), "u1", bytes(range(6))))  # huge claimed shape
    with pytest.raises(ConfigError, match="non-negative"):
        parse_bytes(_array((-1, 6), "u1", bytes(6)))
    with pytest.raises(ConfigError, match="'O8' is not in the allow-list"):
        parse_bytes(_array((1,), "O8", bytes(8)))
    with pytest.raises(ConfigError, match="byte order '>'"):
        parse_bytes(_array((1,), "i4", bytes(4), order=b">"))


def test_truncated_oversized_and_random_files(tmp_path: Path) -> None:
    d, _, _ = batch_dict(np.random.default_rng(3), "t", {"labels": 10})
    blob = Py2().dict(d)
    for cut in (0, 1, 2, 50, len(blob) // 2, len(blob) - 1):
        with pytest.raises(ConfigError):
            parse_bytes(blob[:cut])
    path = tmp_path / "data_batch_1"
    path.write_bytes(blob)
    with pytest.raises(ConfigError, match="over the 1000-byte limit"):
        parse_file(path, Limits(max_bytes=1000))
    with pytest.raises(ConfigError, match="more than 3 items"):
        parse_file(path, Limits(max_container=3))
    path.write_bytes(np.random.default_rng(4).bytes(20000))
    with pytest.raises(ConfigError, match="data_batch_1"):
        read_python_batch(path)
    # A well-formed pickle with the wrong content is a clear error too.
    path.write_bytes(Py2().dict({b"data": [1, 2], b"labels": [1, 2]}))
    with pytest.raises(ConfigError, match=r"'data' must be a uint8 array"):
        read_python_batch(path)
    d[b"labels"][0] = 12
    path.write_bytes(Py2().dict(d))
    with pytest.raises(ConfigError, match=r"outside 0\.\.9"):
        read_python_batch(path)


# -- fuzzing -----------------------------------------------------------------------------

# genops decodes some text opcodes with fixed stdlib codecs, imported on first use: load
# them now so that the check "nothing was imported" below is exact.
for _warm in (b"Vx\n.", b"S'x'\n.", b"X\x01\x00\x00\x00x."):
    list(pickletools.genops(_warm))
FUZZ_MARKER = Path(tempfile.gettempdir()) / f"fedstack-fuzz-pwned-{os.getpid()}"  # dir exists
_small = batch_dict(np.random.default_rng(5), "f", {"labels": 10})[0]
_small[b"data"] = _small[b"data"][:2, :16]
SEEDS = [
    Py2().dict(_small),
    pickle.dumps(_small, protocol=2),
    pickle.dumps(_small, protocol=4),
    pickle.dumps(Reduce(os.system, (f"touch {FUZZ_MARKER}",)), protocol=2),
    pickle.dumps([Reduce(eval, (f"open('{FUZZ_MARKER}', 'w')",))], protocol=4),
]
PLAIN = (dict, list, tuple, str, bytes, int, float, bool, type(None), np.ndarray, np.dtype)


def _check_plain(value: Any) -> None:
    todo, seen = [value], set()
    while todo:
        v = todo.pop()
        assert isinstance(v, PLAIN), type(v)
        if id(v) in seen or not isinstance(v, dict | list | tuple):
            continue
        seen.add(id(v))
        todo.extend([*v.keys(), *v.values()] if isinstance(v, dict) else v)


def _parse_untrusted(blob: bytes) -> None:
    modules = set(sys.modules)
    try:
        _check_plain(parse_bytes(blob, "fuzz", Limits(max_bytes=1 << 16)))
    except ConfigError:
        pass
    assert set(sys.modules) == modules  # nothing was imported
    assert not FUZZ_MARKER.exists()  # nothing was run


FUZZ = settings(
    max_examples=100, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)


@FUZZ
@given(st.binary(max_size=400) | st.binary(max_size=60).map(lambda b: b"\x80\x02" + b))
def test_random_bytes_only_raise_config_error(blob: bytes) -> None:
    _parse_untrusted(blob)


@FUZZ
@given(
    st.sampled_from(SEEDS),
    st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), max_size=6),
    st.integers(0, 1 << 20),
    st.booleans(),
)
def test_mutated_pickles_only_raise_config_error(
    seed: bytes, edits: list[tuple[int, int]], cut: int, truncate: bool
) -> None:
    blob = bytearray(seed)
    for pos, byte in edits:
        blob[pos % len(blob)] = byte
    _parse_untrusted(bytes(blob[: cut % (len(blob) + 1)] if truncate else blob))
