"""Tests for fedstack.data.digits: the bundled digits split and per-agent shares."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from sklearn.datasets import load_digits

from fedstack.data.digits import load_digits_split, partition_digits
from fedstack.errors import ConfigError


def test_split_shapes_dtypes_and_scaling() -> None:
    x_train, y_train, x_test, y_test = load_digits_split()
    assert x_train.shape == (1437, 64) and x_test.shape == (360, 64)
    assert y_train.shape == (1437,) and y_test.shape == (360,)
    assert x_train.dtype == np.float32 and x_test.dtype == np.float32
    assert y_train.dtype == np.int64 and y_test.dtype == np.int64
    assert x_train.min() == 0.0 and x_train.max() == 1.0
    assert set(np.unique(y_train)) == set(range(10)) == set(np.unique(y_test))


def sort_rows(a: np.ndarray) -> np.ndarray:
    return a[np.lexsort(a.T[::-1])]


def test_split_is_the_whole_dataset_scaled_by_16() -> None:
    x_train, y_train, x_test, y_test = load_digits_split()
    digits = load_digits()
    ours = np.column_stack([np.vstack([x_train, x_test]) * 16, np.concatenate([y_train, y_test])])
    theirs = np.column_stack([digits.data, digits.target])
    assert np.array_equal(sort_rows(ours), sort_rows(theirs))


def test_split_is_stratified() -> None:
    _, y_train, _, y_test = load_digits_split()
    total = np.bincount(np.concatenate([y_train, y_test]))
    assert np.all(np.abs(np.bincount(y_test) - total * 0.2) <= 1)


def arrays(split: tuple[npt.NDArray[Any], ...]) -> tuple[npt.NDArray[Any], ...]:
    """A split as a tuple of plain arrays (its features and labels differ in dtype)."""
    return split


def test_split_is_deterministic_and_depends_on_seed() -> None:
    a = load_digits_split(seed=0)
    b = load_digits_split(seed=0)
    c = load_digits_split(seed=1)
    assert all(np.array_equal(u, v) for u, v in zip(arrays(a), arrays(b), strict=True))
    assert not np.array_equal(a[0], c[0])


def test_split_returns_fresh_copies() -> None:
    x_train, _, _, _ = load_digits_split()
    x_train[:] = -1.0
    assert load_digits_split()[0].min() == 0.0


@pytest.mark.parametrize("test_size", [0.0, 1.0, -0.1])
def test_split_rejects_bad_test_size(test_size: float) -> None:
    with pytest.raises(ConfigError, match="test_size"):
        load_digits_split(test_size=test_size)


@pytest.mark.parametrize("partition", ["iid", "dirichlet:0.5"])
def test_partition_digits_shares_cover_the_training_split(partition: str) -> None:
    x_train, y_train, _, _ = load_digits_split()
    shares = [partition_digits(i, 3, partition, seed=0) for i in range(3)]
    assert sum(len(y) for _, y in shares) == len(y_train)
    counts = sum(np.bincount(y, minlength=10) for _, y in shares)
    assert np.array_equal(counts, np.bincount(y_train))
    rows = np.vstack([x for x, _ in shares])
    assert rows.dtype == np.float32
    assert np.isclose(rows.sum(), x_train.sum())
    assert min(len(y) for _, y in shares) >= 10


def test_partition_digits_rejects_bad_index_and_spec() -> None:
    with pytest.raises(ConfigError, match="index"):
        partition_digits(3, 3)
    with pytest.raises(ConfigError, match="unknown partition"):
        partition_digits(0, 3, "zipf")


def test_split_cache_round_trips_and_recovers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first process stores the split; later ones load the same arrays without
    importing scikit-learn; a damaged cache file is rebuilt, never trusted."""
    from fedstack.data import digits as d

    monkeypatch.setenv("FEDSTACK_CACHE_DIR", str(tmp_path))
    d._split.cache_clear()
    first = d._split(0.25, 7)
    files = list(tmp_path.glob("digits-split-*-0.25-7.npz"))
    assert len(files) == 1
    d._split.cache_clear()
    again = d._split(0.25, 7)
    for a, b in zip(arrays(first), arrays(again), strict=True):
        np.testing.assert_array_equal(a, b)
        assert a.dtype == b.dtype and not b.flags.writeable
    files[0].write_bytes(b"not an npz file")
    d._split.cache_clear()
    rebuilt = d._split(0.25, 7)
    for a, b in zip(arrays(first), arrays(rebuilt), strict=True):
        np.testing.assert_array_equal(a, b)
    with np.load(files[0], allow_pickle=False) as z:  # rewritten
        np.testing.assert_array_equal(z["y_test"], first[3])
    d._split.cache_clear()
