"""CIFAR-10 and CIFAR-100 from a local folder (no download), in either distribution format.

* The **binary version** (``cifar-10-batches-bin``, ``cifar-100-binary``) stores each image
  as its label byte(s) followed by 3072 bytes (1024 red, 1024 green, 1024 blue, row-major
  32x32); it is read with ``numpy`` only.
* The **python version** (``cifar-10-batches-py``, ``cifar-100-python``) is a set of pickle
  files, each a dict with ``data`` (a uint8 numpy array of N rows of those same 3072 CHW
  bytes), ``labels`` (CIFAR-100: ``fine_labels`` and ``coarse_labels``), ``filenames`` and
  ``batch_label``; ``batches.meta`` / ``meta`` hold the class names.

The python version is read **without unpickling**. Unpickling runs whatever a file
names, so fedstack never does it (see the project's security rules). The files are read
by :mod:`fedstack.data.inert_pickle`, which walks the opcode stream with the standard
library's ``pickletools.genops`` (a parser that never imports or calls anything) and
interprets only plain data -- dicts, lists, tuples, strings, bytes, numbers -- plus numpy
arrays recognised by an allow-list of exact global *names* (``numpy.core.multiarray.
_reconstruct``, ``numpy.ndarray``, ``numpy.dtype``...). Those names are inert markers: the
array is rebuilt here with ``np.frombuffer`` after its dtype (allow-listed numeric types),
shape and byte count are checked. Any other global (``os.system``, ``builtins.eval``...),
object-building opcode, malformed or truncated file, or oversized file is a
:class:`~fedstack.errors.ConfigError` naming the opcode and the file; nothing in the file
is ever executed.

Both formats give the same arrays: images uint8 (N, 32, 32, 3) HWC, labels int64. The
format is detected from the files present (``*.bin`` -> binary, ``data_batch_*`` /
``test_batch`` / ``train`` / ``test`` -> python), in ``root`` itself or in the archive's
folder below it; when both are present the binary version is used.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from fedstack.data.inert_pickle import parse_file
from fedstack.errors import ConfigError

PIXELS = 32 * 32 * 3
RECORD = 1 + PIXELS
RECORD100 = 2 + PIXELS
TRAIN_FILES = [f"data_batch_{i}.bin" for i in range(1, 6)]
TEST_FILE = "test_batch.bin"
PY_TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
PY_TEST_FILE = "test_batch"
PY_META_FILE = "batches.meta"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

Images = npt.NDArray[np.uint8]
Labels = npt.NDArray[np.int64]
Format = Literal["binary", "python"]
LabelMode = Literal["fine", "coarse"]


def _find(
    root: str | Path, name: str, bin_dir: str, py_dir: str, bin_test: str, py_test: str
) -> tuple[Path, Format]:
    root = Path(root).expanduser()
    cands: list[tuple[Path, Format, str]] = [
        (root, "binary", bin_test),
        (root, "python", py_test),
        (root / bin_dir, "binary", bin_test),
        (root / py_dir, "python", py_test),
    ]
    for cand, fmt, test in cands:
        if (cand / test).is_file():
            return cand, fmt
    raise ConfigError(
        f"no {name} batches in {root}: expected the binary version ({bin_test}, in "
        f"{bin_dir}/) or the python version ({py_test}, in {py_dir}/), in {root} itself or "
        "in that folder below it"
    )


def detect_cifar10(root: str | Path) -> tuple[Path, Format]:
    """The folder holding CIFAR-10's batches under ``root`` and its format."""
    return _find(
        root, "CIFAR-10", "cifar-10-batches-bin", "cifar-10-batches-py", TEST_FILE, PY_TEST_FILE
    )


def detect_cifar100(root: str | Path) -> tuple[Path, Format]:
    """The folder holding CIFAR-100's files under ``root`` and its format."""
    return _find(root, "CIFAR-100", "cifar-100-binary", "cifar-100-python", "test.bin", "test")


# -- binary version ----------------------------------------------------------------------


def _read_records(path: Path, label_bytes: int) -> tuple[Images, npt.NDArray[np.uint8]]:
    record = label_bytes + PIXELS
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % record:
        raise ConfigError(
            f"{path}: {raw.size} bytes is not a whole number of {record}-byte CIFAR records"
        )
    rec = raw.reshape(-1, record)
    images = rec[:, label_bytes:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), rec[:, :label_bytes]


def _check_labels(path: Path, labels: Labels, n_classes: int) -> Labels:
    if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
        bad = int(labels.max() if labels.max() >= n_classes else labels.min())
        raise ConfigError(f"{path}: label {bad} is outside 0..{n_classes - 1}")
    return labels


def read_batch(path: str | Path) -> tuple[Images, Labels]:
    """One CIFAR-10 binary batch file -> images (N, 32, 32, 3) uint8 HWC and labels (N,)
    int64.

    Raises:
        ConfigError: If the file size is not a whole number of records or a label is
            outside 0..9.
    """
    path = Path(path)
    images, labels = _read_records(path, 1)
    return images, _check_labels(path, labels[:, 0].astype(np.int64), 10)


def read_batch100(path: str | Path, label_mode: LabelMode = "fine") -> tuple[Images, Labels]:
    """One CIFAR-100 binary file (``train.bin`` / ``test.bin``: coarse label byte, fine label
    byte, 3072 pixel bytes per record) -> images and the ``label_mode`` labels."""
    path = Path(path)
    images, labels = _read_records(path, 2)
    col, n = (1, 100) if _mode(label_mode) == "fine" else (0, 20)
    return images, _check_labels(path, labels[:, col].astype(np.int64), n)


# -- python version ----------------------------------------------------------------------


def _field(path: Path, d: Any, key: str) -> Any:
    """``d[key]`` for a dict written by Python 2 (bytes keys) or Python 3 (str keys)."""
    if type(d) is not dict:
        raise ConfigError(f"{path}: expected a pickled dict, found {type(d).__name__}")
    for k in (key.encode(), key):
        if k in d:
            return d[k]
    keys = [k.decode("latin-1") if isinstance(k, bytes) else str(k) for k in list(d)[:12]]
    raise ConfigError(f"{path}: no {key!r} entry (entries: {keys})")


def _py_labels(path: Path, value: Any, key: str, n: int, n_classes: int) -> Labels:
    if isinstance(value, np.ndarray) and value.ndim == 1 and value.dtype.kind in "iu":
        labels = value.astype(np.int64)
    elif type(value) is list and all(type(v) is int for v in value):
        if value and (min(value) < 0 or max(value) >= n_classes):
            raise ConfigError(f"{path}: a {key} value is outside 0..{n_classes - 1}")
        labels = np.array(value, dtype=np.int64)
    else:
        raise ConfigError(f"{path}: {key!r} is not a list of ints")
    if labels.shape != (n,):
        raise ConfigError(f"{path}: {labels.size} {key} for {n} images")
    return _check_labels(path, labels, n_classes)


def _py_batch(path: str | Path, label_keys: list[tuple[str, int]]) -> tuple[Images, list[Labels]]:
    path = Path(path)
    d = parse_file(path)
    data = _field(path, d, "data")
    if not (
        isinstance(data, np.ndarray)
        and data.dtype == np.uint8
        and data.ndim == 2
        and data.shape[1] == PIXELS
    ):
        shape = data.shape if isinstance(data, np.ndarray) else type(data).__name__
        raise ConfigError(
            f"{path}: 'data' must be a uint8 array of shape (N, {PIXELS}), found {shape}"
        )
    n = data.shape[0]
    images = np.ascontiguousarray(data.reshape(n, 3, 32, 32).transpose(0, 2, 3, 1))
    labels = [_py_labels(path, _field(path, d, key), key, n, k) for key, k in label_keys]
    return images, labels


def read_python_batch(path: str | Path) -> tuple[Images, Labels]:
    """One CIFAR-10 python-version batch (``data_batch_1``, ``test_batch``...) -> images
    (N, 32, 32, 3) uint8 HWC and labels (N,) int64, read without unpickling.

    Raises:
        ConfigError: If the file is not a plain-data pickle of the expected structure
            (including any attempt to name code), or a label is outside 0..9.
    """
    images, (labels,) = _py_batch(path, [("labels", 10)])
    return images, labels


def read_python_batch100(
    path: str | Path,
    label_mode: LabelMode = "fine",
) -> tuple[Images, Labels]:
    """One CIFAR-100 python-version file (``train`` / ``test``), read without unpickling."""
    key, n = ("fine_labels", 100) if _mode(label_mode) == "fine" else ("coarse_labels", 20)
    images, (labels,) = _py_batch(path, [(key, n)])
    return images, labels


def _names(path: Path, key: str, n: int) -> list[str]:
    value = _field(path, parse_file(path), key)
    if not (type(value) is list and all(isinstance(v, bytes | str) for v in value)):
        raise ConfigError(f"{path}: {key!r} is not a list of strings")
    names = [v.decode("utf-8", "replace") if isinstance(v, bytes) else v for v in value]
    if len(names) != n:
        raise ConfigError(f"{path}: {len(names)} {key}, expected {n}")
    return names


def _txt_names(path: Path, n: int) -> list[str]:
    names = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    if len(names) != n:
        raise ConfigError(f"{path}: {len(names)} class names, expected {n}")
    return names


def _mode(label_mode: str) -> LabelMode:
    if label_mode not in ("fine", "coarse"):
        raise ConfigError(f"label_mode must be 'fine' or 'coarse', not {label_mode!r}")
    return label_mode  # type: ignore[return-value]


# -- loaders -----------------------------------------------------------------------------


def load_cifar10(
    root: str | Path,
    *,
    train_files: list[str] | None = None,
) -> tuple[Images, Labels, Images, Labels]:
    """Load CIFAR-10 from ``root``: an extracted archive (binary or python version) or its
    parent folder; the format is detected. ``train_files`` picks training batches by name
    (with or without ``.bin``).

    Returns:
        ``(x_train, y_train, x_test, y_test)``; images are uint8 (N, 32, 32, 3), labels int64.
    """
    folder, fmt = detect_cifar10(root)
    chosen = TRAIN_FILES if train_files is None else train_files
    if fmt == "binary":
        names = [n if n.endswith(".bin") else n + ".bin" for n in chosen]
        test, read = TEST_FILE, read_batch
    else:
        names = [n.removesuffix(".bin") for n in chosen]
        test, read = PY_TEST_FILE, read_python_batch
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise ConfigError(f"{folder}: missing CIFAR-10 batch file(s) {missing}")
    parts = [read(folder / n) for n in names]
    x_train = np.concatenate([p[0] for p in parts]) if parts else np.empty((0, 32, 32, 3), np.uint8)
    y_train = np.concatenate([p[1] for p in parts]) if parts else np.empty(0, np.int64)
    x_test, y_test = read(folder / test)
    return x_train, y_train, x_test, y_test


def cifar10_class_names(root: str | Path) -> list[str]:
    """CIFAR-10's class names from the archive's ``batches.meta`` (python version,
    ``label_names``) or ``batches.meta.txt`` (binary version); :data:`CLASSES` if absent."""
    folder, fmt = detect_cifar10(root)
    if fmt == "python" and (folder / PY_META_FILE).is_file():
        return _names(folder / PY_META_FILE, "label_names", 10)
    if fmt == "binary" and (folder / "batches.meta.txt").is_file():
        return _txt_names(folder / "batches.meta.txt", 10)
    return list(CLASSES)


def load_cifar100(
    root: str | Path,
    *,
    label_mode: LabelMode = "fine",
) -> tuple[Images, Labels, Images, Labels]:
    """Load CIFAR-100 from ``root`` (``cifar-100-binary`` or ``cifar-100-python``, or its
    parent folder); ``label_mode`` picks the 100 fine or the 20 coarse labels.

    Returns:
        ``(x_train, y_train, x_test, y_test)`` as for :func:`load_cifar10`.
    """
    folder, fmt = detect_cifar100(root)
    mode = _mode(label_mode)
    train, test = ("train.bin", "test.bin") if fmt == "binary" else ("train", "test")
    if not (folder / train).is_file():
        raise ConfigError(f"{folder}: missing CIFAR-100 file {train}")
    if fmt == "binary":
        return (*read_batch100(folder / train, mode), *read_batch100(folder / test, mode))
    return (*read_python_batch100(folder / train, mode), *read_python_batch100(folder / test, mode))


def cifar100_class_names(root: str | Path, label_mode: LabelMode = "fine") -> list[str]:
    """CIFAR-100's fine (100) or coarse (20) class names from ``meta`` (python version) or
    ``fine_label_names.txt`` / ``coarse_label_names.txt`` (binary version)."""
    folder, fmt = detect_cifar100(root)
    mode = _mode(label_mode)
    n = 100 if mode == "fine" else 20
    if fmt == "python":
        return _names(folder / "meta", f"{mode}_label_names", n)
    return _txt_names(folder / f"{mode}_label_names.txt", n)


def to_float(images: Images, mean: float = 0.5, std: float = 0.5) -> npt.NDArray[np.float32]:
    """uint8 HWC images -> float32 NCHW normalised like the book's example
    (``(x / 255 - mean) / std``)."""
    x = images.astype(np.float32) / 255.0
    return np.ascontiguousarray(((x - mean) / std).transpose(0, 3, 1, 2))


# -- writers -----------------------------------------------------------------------------


def write_batch(path: str | Path, images: Images, labels: Labels) -> None:
    """Write one CIFAR-10 binary batch (the format :func:`read_batch` reads): per image
    its label byte, then 3072 bytes (red, green, blue planes, row-major 32x32).

    Args:
        path: The file to write (replaced if present).
        images: uint8 (N, 32, 32, 3) HWC, as the loaders return them.
        labels: N labels in 0..9.

    Raises:
        ConfigError: If the shapes, dtype or labels do not fit the format.
    """
    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (32, 32, 3):
        raise ConfigError(
            f"images must be uint8 of shape (N, 32, 32, 3), got {images.dtype} {images.shape}"
        )
    if labels.shape != (len(images),) or labels.dtype.kind not in "iu":
        raise ConfigError(
            f"labels must be {len(images)} integers, got {labels.dtype} {labels.shape}"
        )
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise ConfigError("labels must be in 0..9")
    chw = images.transpose(0, 3, 1, 2).reshape(len(images), PIXELS)
    records = np.concatenate([labels.astype(np.uint8)[:, None], chw], axis=1)
    Path(path).write_bytes(records.tobytes())


def write_cifar10(
    root: str | Path,
    x_train: Images,
    y_train: Labels,
    x_test: Images,
    y_test: Labels,
    *,
    class_names: list[str] | None = None,
) -> Path:
    """Write a dataset in CIFAR-10's binary layout: ``root/cifar-10-batches-bin/`` with
    ``data_batch_1.bin`` .. ``data_batch_5.bin`` (the training images split in five, in
    order), ``test_batch.bin`` and ``batches.meta.txt``. :func:`load_cifar10` reads it
    back unchanged; small generated folders in this layout stand in for CIFAR-10 in tests.

    Returns:
        The ``cifar-10-batches-bin`` folder.

    Raises:
        ConfigError: If the arrays do not fit the format (see :func:`write_batch`) or
            ``class_names`` is not 10 names.
    """
    names = list(CLASSES if class_names is None else class_names)
    if len(names) != 10 or not all(isinstance(n, str) and n and "\n" not in n for n in names):
        raise ConfigError("class_names must be 10 non-empty single-line names")
    folder = Path(root) / "cifar-10-batches-bin"
    folder.mkdir(parents=True, exist_ok=True)
    parts = np.array_split(np.arange(len(y_train)), len(TRAIN_FILES))
    for name, rows in zip(TRAIN_FILES, parts, strict=True):
        write_batch(folder / name, np.asarray(x_train)[rows], np.asarray(y_train)[rows])
    write_batch(folder / TEST_FILE, x_test, y_test)
    (folder / "batches.meta.txt").write_text("\n".join(names) + "\n")
    return folder
