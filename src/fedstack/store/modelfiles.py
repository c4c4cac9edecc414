"""Model files in native formats: read an operator's base model, write a stored model.

Formats (``FORMATS``):

``safetensors``
    The safetensors layout (:mod:`fedstack.wire.tensorfile`): opens with
    ``safetensors.numpy.load_file`` or ``safetensors.torch.load_file``.
``npz``
    numpy's ``.npz`` archive of named arrays, read with ``allow_pickle=False``.
``pt``
    A PyTorch state dict (``{name: tensor}``) as written by ``torch.save`` (PyTorch >= 1.6
    zip format), read by :mod:`fedstack.store.torchfile`, which interprets ``data.pkl``'s
    opcodes without unpickling (tensors by name only, built with numpy from the storage
    records; any other global refused) and does not need torch; a checkpoint holding the
    state dict under ``state_dict``, ``model_state_dict`` or ``model`` is accepted too.
    Writing ``pt`` needs torch (``pip install 'fedstack[torch]'``).

Every model read is checked as an agent's would be: at least one tensor, names and
dtypes the wire allows, finite values. Writes are atomic (a reader never sees half a
file). No pickle is ever loaded: no reader calls ``pickle``, ``torch.load`` or lets
``np.load`` unpickle.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np

from fedstack.errors import ConfigError, LocalProtocolError, TensorFileError
from fedstack.files import atomic_write
from fedstack.store import torchfile
from fedstack.types import Weights
from fedstack.wire import tensorfile, tensors

__all__ = ["FORMATS", "Format", "detect_format", "read_model_file", "write_model_file"]

Format = Literal["safetensors", "npz", "pt"]
FORMATS: tuple[str, ...] = get_args(Format)

_SUFFIXES: dict[str, Format] = {
    ".safetensors": "safetensors",
    ".st": "safetensors",
    ".npz": "npz",
    ".pt": "pt",
    ".pth": "pt",
}
_CHECKPOINT_KEYS = ("state_dict", "model_state_dict", "model")


def detect_format(path: str | Path, data: bytes | None = None) -> Format:
    """The format of model file ``path``: from its suffix, else from its first bytes
    (``data``: the file's bytes, read if not given).

    Raises:
        ConfigError: neither tells (name the format explicitly).
    """
    p = Path(path)
    by_suffix = _SUFFIXES.get(p.suffix.lower())
    if by_suffix is not None:
        return by_suffix
    if data is None:
        data = _read(p)
    if data[:4] == b"PK\x03\x04":  # a zip archive: an .npz or torch.save's format
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as z:
                names = z.namelist()
        except zipfile.BadZipFile:
            names = []
        if names and all(n.endswith(".npy") for n in names):
            return "npz"
        if any(n.endswith("data.pkl") for n in names):
            return "pt"
    elif len(data) > 8 and data[8:9] == b"{":
        return "safetensors"
    raise ConfigError(
        f"{p}: cannot tell the model file's format; name it .safetensors, .npz or .pt "
        "(or pass --format)"
    )


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the model file {path}: {exc.strerror}") from None


def read_model_file(path: str | Path, fmt: Format | None = None) -> tuple[Weights, Format]:
    """The named arrays of model file ``path`` and its format (``fmt``: None detects it).

    Raises:
        ConfigError: the file cannot be read, is not a model of that format, or holds no
            tensor, a name or dtype the wire does not allow, or NaN/infinity.
    """
    p = Path(path)
    data = _read(p)
    fmt = fmt or detect_format(p, data)
    if fmt == "safetensors":
        try:
            loaded, _ = tensorfile.decode(memoryview(data))
        except TensorFileError as exc:
            raise ConfigError(f"{p} is not a safetensors file: {exc}") from None
        weights = {k: np.array(v) for k, v in loaded.items()}  # own memory, writable
    elif fmt == "npz":
        weights = _read_npz(p, data)
    elif fmt == "pt":
        weights = _read_pt(p, data)
    else:  # pragma: no cover - Format is closed
        raise ConfigError(f"unknown model format {fmt!r}; one of {', '.join(FORMATS)}")
    _check(p, weights)
    return weights, fmt


def _read_npz(path: Path, data: bytes) -> Weights:
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            if not isinstance(z, np.lib.npyio.NpzFile):
                raise ConfigError(f"{path} is a single .npy array, not an .npz of named arrays")
            return {name: np.array(z[name]) for name in z.files}
    except ConfigError:
        raise
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        # ValueError also when an array would need pickle (object dtype): refused
        raise ConfigError(f"{path} is not a readable .npz of numeric arrays: {exc}") from None


def _read_pt(path: Path, data: bytes) -> Weights:
    # torchfile's arrays are its own copies (C-contiguous, writable); bfloat16 is float32
    return dict(torchfile.read_state_dict(data, str(path)))


def _check(path: Path, weights: Mapping[str, Any]) -> None:
    if not weights:
        raise ConfigError(f"{path} holds no tensor")
    try:
        tensors.prepare(weights, 0)  # names and dtypes as on the wire
    except LocalProtocolError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    for name, arr in weights.items():
        if not tensors.all_finite(np.asarray(arr)):
            raise ConfigError(f"{path}: tensor {name!r} holds NaN or infinite values")


def write_model_file(
    weights: Mapping[str, Any],
    path: str | Path,
    fmt: Format,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write ``weights`` to ``path`` in format ``fmt``, atomically (mode 0644); returns
    the path. ``metadata`` (strings) goes into a safetensors file's ``__metadata__``.

    Raises:
        ConfigError: torch is missing for ``pt``, or ``path`` cannot be written.
    """
    out = Path(path)
    parts: list[bytes | memoryview]
    if fmt == "safetensors":
        parts = tensorfile.encode(weights, metadata)
    elif fmt == "npz":
        # as np.savez writes it, without its keyword arguments (a tensor named
        # "allow_pickle" would be taken for the option)
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
            for name, value in weights.items():
                with z.open(f"{name}.npy", "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, np.asarray(value), allow_pickle=False)
        parts = [buf.getbuffer()]
    elif fmt == "pt":
        try:
            import torch
        except ImportError:
            raise ConfigError(
                "writing a PyTorch state dict needs torch: pip install 'fedstack[torch]'"
            ) from None
        buf = io.BytesIO()
        state = {k: torch.from_numpy(np.array(v, copy=True)) for k, v in weights.items()}
        torch.save(state, buf)
        parts = [buf.getbuffer()]
    else:
        raise ConfigError(f"unknown model format {fmt!r}; one of {', '.join(FORMATS)}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(out, parts, mode=0o644)
    except OSError as exc:
        raise ConfigError(f"cannot write {out}: {exc.strerror}") from None
    return out
