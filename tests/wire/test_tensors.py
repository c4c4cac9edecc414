"""Tensor layout helpers: finiteness checks and send-side preparation."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from fedstack.errors import LocalProtocolError, RemoteProtocolError
from fedstack.types import Weights
from fedstack.wire import tensors
from fedstack.wire.codec import DEFAULT_LIMITS, encode_to_bytes
from fedstack.wire.messages import GlobalModel


# ---------------------------------------------------------------------------- all_finite
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_all_finite_true_for_finite_floats(dtype: type) -> None:
    assert tensors.all_finite(np.linspace(-5, 5, 101).astype(dtype))
    assert tensors.all_finite(np.array(0.0, dtype=dtype))  # 0-d
    assert tensors.all_finite(np.zeros((0, 3), dtype=dtype))  # empty


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_all_finite_false_for_nan_and_inf(dtype: type, bad: float) -> None:
    arr: npt.NDArray[Any] = np.ones((4, 5), dtype=dtype)
    arr[2, 3] = bad
    assert not tensors.all_finite(arr)
    assert not tensors.all_finite(np.array(bad, dtype=dtype))
    assert not tensors.all_finite(arr.T)  # non-contiguous


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_all_finite_inf_minus_inf() -> None:
    assert not tensors.all_finite(np.array([np.inf, -np.inf]))
    assert not tensors.all_finite(np.array([1e308, 1e308, np.nan]))
    assert not tensors.all_finite(np.array([1e308, 1e308, -np.inf]))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_all_finite_large_values_whose_sum_overflows() -> None:
    big = np.full(1000, np.finfo(np.float64).max)
    with np.errstate(over="ignore"):
        assert not np.isfinite(big.sum())  # the naive sum overflows...
    assert tensors.all_finite(big)  # ...but every value is finite
    mixed = np.array([1e308, 1e308, -1e308, 1e308])
    assert tensors.all_finite(mixed)
    assert tensors.all_finite(-big)


def test_all_finite_does_not_warn() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert tensors.all_finite(np.full(4, 1e308))
        assert not tensors.all_finite(np.array([np.inf, -np.inf]))


def test_all_finite_ignores_non_float_dtypes() -> None:
    assert tensors.all_finite(np.array([np.iinfo(np.int64).max] * 10, dtype=np.int64))
    assert tensors.all_finite(np.array([True, False]))
    assert tensors.all_finite(np.arange(10, dtype=np.uint8))


def test_all_finite_big_endian() -> None:
    arr = np.array([1.0, np.nan], dtype=">f8")
    assert not tensors.all_finite(arr)
    assert tensors.all_finite(np.array([1.0, 2.0], dtype=">f4"))


# ---------------------------------------------------------------------------- prepare
@pytest.mark.parametrize(
    "name", ["", "a b", "caf\u00e9", "x;y", "a\x00", "\na", "a\\b", "tab\t", 1, None, ("a",)]
)
def test_prepare_refuses_bad_names(name: object) -> None:
    with pytest.raises(LocalProtocolError):
        tensors.prepare({name: np.zeros(2)}, 0)  # type: ignore[dict-item]


def test_prepare_refuses_name_with_trailing_newline() -> None:
    with pytest.raises(LocalProtocolError):
        tensors.prepare({"a\n": np.zeros(2)}, 0)


def test_prepare_refuses_names_the_default_decoder_refuses() -> None:
    name = "x" * (DEFAULT_LIMITS.max_name_len + 1)
    with pytest.raises(LocalProtocolError):
        tensors.prepare({name: np.zeros(2)}, 0)


def test_overlong_name_is_refused_by_the_sender() -> None:
    # the receiver's refusal of such names is covered in test_codec.test_bad_tensor_names
    with pytest.raises(LocalProtocolError):
        encode_to_bytes(GlobalModel(version=0, model_id="m", model={"x" * 257: np.zeros(2)}))


def test_prepare_accepts_the_whole_name_alphabet() -> None:
    name = "AZaz09_.:/-[]"
    entries, _ = tensors.prepare({name: np.zeros(1)}, 0)
    assert entries[0].name == name


@pytest.mark.parametrize(
    "value",
    [
        np.array([object(), 1], dtype=object),
        np.zeros(3, dtype=np.complex64),
        np.zeros(3, dtype=np.complex128),
        np.array(["ab", "c"]),
        np.array([b"ab"]),
        np.zeros(2, dtype="datetime64[s]"),
        np.zeros(2, dtype="timedelta64[s]"),
        np.zeros(2, dtype=np.longdouble)
        if np.dtype(np.longdouble).itemsize > 8
        else np.zeros(2, dtype="V8"),
        np.zeros(2, dtype=[("a", "<i4")]),
    ],
    ids=lambda v: str(v.dtype),
)
def test_prepare_refuses_bad_dtypes(value: np.ndarray) -> None:
    with pytest.raises(LocalProtocolError, match="dtype"):
        tensors.prepare({"w": value}, 0)


def test_prepare_refuses_non_mapping() -> None:
    with pytest.raises(LocalProtocolError):
        tensors.prepare([np.zeros(2)], 0)  # type: ignore[arg-type]


def test_prepare_layout_is_aligned_back_to_back_little_endian() -> None:
    weights: dict[str, Any] = {
        "a": np.arange(5, dtype=">f4"),  # 20 bytes
        "b": np.zeros((0, 3), dtype=np.int64),  # 0 bytes
        "c": np.arange(16, dtype=np.float32),  # 64 bytes: no padding
        "d": [[1, 2], [3, 4]],  # a list becomes an array
        "e": np.arange(12, dtype=np.int16).reshape(3, 4).T,  # non-contiguous
    }
    entries, arrays = tensors.prepare(weights, 128)
    assert [e.name for e in entries] == list(weights)
    assert [e.offset for e in entries] == [128, 192, 192, 256, 320]
    assert [e.nbytes for e in entries] == [20, 0, 64, 32, 24]
    assert [e.dtype for e in entries] == ["float32", "int64", "float32", "int64", "int16"]
    assert entries[4].shape == (4, 3)
    for arr, e in zip(arrays, entries, strict=True):
        assert arr.flags.c_contiguous
        assert arr.dtype.str[0] in "<|"
        assert arr.nbytes == e.nbytes
    assert arrays[0].tolist() == [0, 1, 2, 3, 4]
    assert np.array_equal(arrays[4], weights["e"])
    assert entries[0].to_wire() == ["a", "float32", [5], 128, 20]


def test_padding() -> None:
    assert [tensors.padding(n) for n in (0, 1, 63, 64, 65, 128)] == [0, 63, 1, 0, 63, 0]


def test_check_name_limits() -> None:
    assert tensors.check_name("ok", 2) == "ok"
    with pytest.raises(RemoteProtocolError) as info:
        tensors.check_name("abc", 2)
    assert info.value.code == "bad-tensor"
    with pytest.raises(RemoteProtocolError):
        tensors.check_name("", 10)


def test_structure_and_nbytes() -> None:
    w: Weights = {"a": np.zeros((2, 3), np.float32), "b": np.ones(4, np.int8)}
    assert tensors.structure(w) == [("a", "float32", (2, 3)), ("b", "int8", (4,))]
    assert tensors.nbytes(w) == 28


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_all_finite_narrow_floats_whose_own_precision_sum_overflows(dtype: type) -> None:
    big: npt.NDArray[Any] = np.full(1000, np.finfo(dtype).max, dtype=dtype)
    assert tensors.all_finite(big)  # summed in float32, the total overflows: decided exactly
    big[500] = np.nan
    assert not tensors.all_finite(big)
