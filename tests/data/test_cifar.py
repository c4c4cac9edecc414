"""The CIFAR-10 binary loader, on small generated batch files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedstack.data.cifar import RECORD, TEST_FILE, TRAIN_FILES, load_cifar10, read_batch, to_float
from fedstack.errors import ConfigError


def write_batch(path: Path, labels: np.ndarray, images: np.ndarray) -> None:
    chw = images.transpose(0, 3, 1, 2).reshape(len(labels), -1)
    path.write_bytes(np.concatenate([labels[:, None].astype(np.uint8), chw], axis=1).tobytes())


@pytest.fixture()
def folder(tmp_path: Path) -> tuple[Path, dict[str, tuple[np.ndarray, np.ndarray]]]:
    rng = np.random.default_rng(0)
    root = tmp_path / "cifar-10-batches-bin"
    root.mkdir()
    data = {}
    for name in [*TRAIN_FILES, TEST_FILE]:
        labels = rng.integers(0, 10, size=7)
        images = rng.integers(0, 256, size=(7, 32, 32, 3), dtype=np.uint8)
        write_batch(root / name, labels, images)
        data[name] = (images, labels)
    return tmp_path, data


def test_load_round_trip(folder: tuple[Path, dict[str, Any]]) -> None:
    parent, data = folder
    x_train, y_train, x_test, y_test = load_cifar10(parent)  # the parent folder works too
    assert x_train.shape == (35, 32, 32, 3) and x_train.dtype == np.uint8
    np.testing.assert_array_equal(x_train[:7], data[TRAIN_FILES[0]][0])
    np.testing.assert_array_equal(y_train[7:14], data[TRAIN_FILES[1]][1])
    np.testing.assert_array_equal(x_test, data[TEST_FILE][0])
    np.testing.assert_array_equal(y_test, data[TEST_FILE][1])
    f = to_float(x_test)
    assert f.shape == (7, 3, 32, 32) and f.dtype == np.float32
    assert -1.0 <= f.min() and f.max() <= 1.0
    np.testing.assert_allclose(f[0, 1, 2, 3], (x_test[0, 2, 3, 1] / 255 - 0.5) / 0.5, rtol=1e-6)


def test_bad_files_are_clear_errors(tmp_path: Path, folder: tuple[Path, dict[str, Any]]) -> None:
    parent, _ = folder
    bad = parent / "cifar-10-batches-bin" / TRAIN_FILES[0]
    bad.write_bytes(b"\x00" * (RECORD + 5))
    with pytest.raises(ConfigError, match="whole number"):
        read_batch(bad)
    bad.write_bytes(bytes([12]) + b"\x00" * (RECORD - 1))
    with pytest.raises(ConfigError, match="outside 0..9"):
        read_batch(bad)
    with pytest.raises(ConfigError, match="no CIFAR-10 batches"):
        load_cifar10(tmp_path / "nowhere")
    py = tmp_path / "py"
    (py / "cifar-10-batches-py").mkdir(parents=True)
    with pytest.raises(ConfigError, match="no CIFAR-10 batches"):  # an empty python folder
        load_cifar10(py)
