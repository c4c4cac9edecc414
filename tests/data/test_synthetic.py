"""Tests for fedstack.data.synthetic: FedProx's Synthetic(alpha, beta) generator."""

from __future__ import annotations

import numpy as np
import pytest

from fedstack.data.synthetic import (
    feature_variances,
    generate_synthetic,
    load_synthetic,
    parse_synthetic,
    split_devices,
    synthetic_devices,
    synthetic_iid_devices,
)
from fedstack.errors import ConfigError

CONFIGS = {
    "iid": (0.0, 0.0, True),
    "0,0": (0.0, 0.0, False),
    "0.5,0.5": (0.5, 0.5, False),
    "1,1": (1.0, 1.0, False),
}


def gradient_dissimilarity(devices: list[tuple[np.ndarray, np.ndarray]]) -> float:
    """FedProx's "gradient difference" at w = 0: mean_k ||grad F_k - grad f||^2."""
    grads, counts = [], []
    for x, y in devices:
        residual = np.full((len(y), 10), 0.1)  # softmax(0) - onehot(y)
        residual[np.arange(len(y)), y] -= 1.0
        grads.append(np.concatenate([(x.T @ residual).ravel(), residual.sum(0)]) / len(y))
        counts.append(len(y))
    g = np.array(grads)
    n = np.array(counts, dtype=float)
    mean = (n[:, None] * g).sum(0) / n.sum()
    return float(np.mean(((g - mean) ** 2).sum(1)))


def label_distance(devices: list[tuple[np.ndarray, np.ndarray]]) -> float:
    """Mean total-variation distance between each device's label histogram and the pooled one."""
    pooled = np.bincount(np.concatenate([y for _, y in devices]), minlength=10).astype(float)
    pooled /= pooled.sum()
    return float(
        np.mean(
            [0.5 * np.abs(np.bincount(y, minlength=10) / len(y) - pooled).sum() for _, y in devices]
        )
    )


@pytest.mark.parametrize("name", list(CONFIGS))
def test_shapes_dtypes_and_sample_counts(name: str) -> None:
    alpha, beta, iid = CONFIGS[name]
    devices = generate_synthetic(alpha, beta, iid=iid, seed=0)
    assert len(devices) == 30
    expected = np.random.default_rng(0).lognormal(4, 2, 30).astype(np.int64) + 50
    assert [len(y) for _, y in devices] == expected.tolist()
    for x, y in devices:
        assert x.dtype == np.float64 and x.shape == (len(y), 60)
        assert y.dtype == np.int64 and y.ndim == 1 and len(y) >= 50
        assert y.min() >= 0 and y.max() <= 9


def test_labels_are_the_argmax_of_the_device_model() -> None:
    for device in synthetic_devices(1.0, 1.0, seed=3):
        assert device.weight.shape == (60, 10) and device.bias.shape == (10,)
        assert np.array_equal(device.y, np.argmax(device.x @ device.weight + device.bias, 1))


def test_iid_devices_share_one_model_and_zero_feature_mean() -> None:
    devices = synthetic_iid_devices(seed=1)
    for device in devices[1:]:
        assert np.array_equal(device.weight, devices[0].weight)
        assert np.array_equal(device.bias, devices[0].bias)
        assert not device.feature_mean.any()
    x = np.vstack([d.x for d in devices])
    assert np.allclose(x.mean(0), 0.0, atol=0.1)
    assert np.allclose(x.var(0), feature_variances(), rtol=0.15, atol=0.01)


def test_feature_covariance_is_the_shared_diagonal() -> None:
    device = max(synthetic_devices(0.0, 0.0, seed=2), key=lambda d: len(d.y))
    assert len(device.y) > 1000
    centred = device.x - device.feature_mean
    assert np.allclose(centred.var(0), feature_variances(), rtol=0.2)
    assert np.allclose(feature_variances()[:3], [1.0, 2**-1.2, 3**-1.2])


@pytest.mark.parametrize("name", list(CONFIGS))
def test_deterministic_per_seed(name: str) -> None:
    alpha, beta, iid = CONFIGS[name]
    first = generate_synthetic(alpha, beta, iid=iid, seed=7)
    again = generate_synthetic(alpha, beta, iid=iid, seed=7)
    other = generate_synthetic(alpha, beta, iid=iid, seed=8)
    for (x1, y1), (x2, y2) in zip(first, again, strict=True):
        assert np.array_equal(x1, x2) and np.array_equal(y1, y2)
    assert [len(y) for _, y in first] != [len(y) for _, y in other]


def test_heterogeneity_grows_with_alpha_and_beta() -> None:
    for seed in range(5):
        dis = {
            name: gradient_dissimilarity(generate_synthetic(a, b, iid=iid, seed=seed))
            for name, (a, b, iid) in CONFIGS.items()
        }
        assert dis["iid"] < 0.2 < 20 < dis["0,0"] < dis["0.5,0.5"] < dis["1,1"], (seed, dis)
        labels = {
            name: label_distance(generate_synthetic(a, b, iid=iid, seed=seed))
            for name, (a, b, iid) in CONFIGS.items()
        }
        assert labels["iid"] < 0.2 and min(labels["0,0"], labels["1,1"]) > 0.6, (seed, labels)


def test_feature_means_spread_with_beta() -> None:
    def spread(beta: float) -> float:
        means = np.array([d.feature_mean for d in synthetic_devices(0.0, beta, seed=4)])
        return float(np.var(means.mean(1)))  # variance of the per-device offset B_k (+ noise)

    assert spread(0.0) < 0.1 < 0.5 < spread(1.0)


def test_split_is_ninety_ten_disjoint_and_seeded() -> None:
    devices = generate_synthetic(0.5, 0.5, seed=0)
    train, test = split_devices(devices, seed=0)
    again, _ = split_devices(devices, seed=0)
    for (x, y), (xtr, ytr), (xte, yte), (xa, _) in zip(devices, train, test, again, strict=True):
        assert len(ytr) == int(0.9 * len(y)) and len(ytr) + len(yte) == len(y)
        both = np.vstack([xtr, xte])
        assert np.array_equal(both[np.lexsort(both.T)], x[np.lexsort(x.T)])
        assert np.array_equal(xtr, xa)
    assert not np.array_equal(train[0][0], devices[0][0][: len(train[0][1])])


def test_load_synthetic_matches_generate_and_split() -> None:
    train, test = load_synthetic("synthetic(1,1)", seed=2)
    ref_train, ref_test = split_devices(generate_synthetic(1.0, 1.0, seed=2), seed=2)
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(train, ref_train, strict=True))
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(test, ref_test, strict=True))


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("iid", (0.0, 0.0, True)),
        ("Synthetic_IID", (0.0, 0.0, True)),
        ("1,1", (1.0, 1.0, False)),
        ("(0.5, 0.5)", (0.5, 0.5, False)),
        ("synthetic_0_0", (0.0, 0.0, False)),
        ("synthetic(1,0.5)", (1.0, 0.5, False)),
    ],
)
def test_parse_synthetic(spec: str, expected: tuple[float, float, bool]) -> None:
    assert parse_synthetic(spec) == expected


@pytest.mark.parametrize("spec", ["", "1", "1,2,3", "a,b", "-1,1", "nan,1"])
def test_parse_synthetic_rejects(spec: str) -> None:
    with pytest.raises(ConfigError):
        parse_synthetic(spec)


def test_bad_arguments_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="alpha"):
        generate_synthetic(-1.0, 0.0)
    with pytest.raises(ConfigError, match="num_devices"):
        generate_synthetic(0.0, 0.0, num_devices=0)
    with pytest.raises(ConfigError, match="IID"):
        generate_synthetic(1.0, 1.0, iid=True)
    with pytest.raises(ConfigError, match="train_fraction"):
        split_devices(generate_synthetic(0.0, 0.0, num_devices=2), train_fraction=1.0)
