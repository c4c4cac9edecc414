"""FedProx's Synthetic(alpha, beta) federated dataset (Li et al., MLSys 2020), seeded.

A re-implementation of ``litian96/FedProx:data/synthetic_*/generate_synthetic.py`` and
``data/synthetic_iid/generate_iid.py``, with numpy's
``default_rng(seed)`` instead of the unseeded global RNG, so a seed always gives the same
data (but never the paper's own draw).

Non-IID variant, for each of the ``num_devices`` devices ``k``:

- ``n_k = floor(LogNormal(4, 2)) + 50`` samples (heavy tailed: median ~105, mean ~450);
- ``u_k ~ N(0, alpha^2)`` and ``B_k ~ N(0, beta^2)`` (alpha and beta are *standard
  deviations*); the feature mean ``v_k`` has coordinates ``~ N(B_k, 1)``;
- ``W_k`` (60 x 10) and ``b_k`` (10) have entries ``~ N(u_k, 1)``;
- ``x ~ N(v_k, diag(j^-1.2))``, ``j = 1..60``, and ``y = argmax(x W_k + b_k)`` (noise free).

``alpha`` controls how much the local models differ, ``beta`` how much the local data
differ. Synthetic(0, 0) is still non-IID (every device has its own ``W_k``, ``b_k`` and
``v_k``). The IID variant shares one ``W, b ~ N(0, 1)`` and the feature mean 0 across
devices. Each device's data is then shuffled and split 90/10 into train and test
(:func:`split_devices`), as in the reference.

The draws are made in the reference's order: sample counts, ``u``, ``B``, every ``v_k``,
then per device ``W_k``, ``b_k`` and its samples.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from fedstack.errors import ConfigError

Features = npt.NDArray[np.float64]
Labels = npt.NDArray[np.int64]
Device = tuple[Features, Labels]
"""One device's ``(x, y)``: float64 features ``(n, dimension)``, int64 labels ``(n,)``."""

NUM_DEVICES = 30
DIMENSION = 60
NUM_CLASSES = 10
TRAIN_FRACTION = 0.9


@dataclass(frozen=True, slots=True)
class SyntheticDevice:
    """One device's samples and the parameters that generated them.

    Attributes:
        x: Features, float64 ``(n_k, dimension)``.
        y: Labels, int64 ``(n_k,)`` in ``0..num_classes-1``.
        weight: The labelling matrix ``W_k``, ``(dimension, num_classes)``.
        bias: The labelling bias ``b_k``, ``(num_classes,)``.
        feature_mean: The mean ``v_k`` of the device's features, ``(dimension,)``.
    """

    x: Features
    y: Labels
    weight: npt.NDArray[np.float64]
    bias: npt.NDArray[np.float64]
    feature_mean: npt.NDArray[np.float64]


def _check(num_devices: int, dimension: int, num_classes: int) -> None:
    for name, value, minimum in (
        ("num_devices", num_devices, 1),
        ("dimension", dimension, 1),
        ("num_classes", num_classes, 2),
    ):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
            raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")


def sample_counts(num_devices: int, rng: np.random.Generator) -> npt.NDArray[np.int64]:
    """Samples per device: ``floor(LogNormal(mean=4, sigma=2)) + 50`` (the reference's rule).

    Args:
        num_devices: Number of devices.
        rng: The generator to draw from.

    Returns:
        int64 counts, each >= 50.
    """
    counts: npt.NDArray[np.int64] = rng.lognormal(4.0, 2.0, num_devices).astype(np.int64) + 50
    return counts


def feature_variances(dimension: int = DIMENSION) -> npt.NDArray[np.float64]:
    """The diagonal of the shared feature covariance: ``j^-1.2`` for ``j = 1..dimension``."""
    variances: npt.NDArray[np.float64] = np.power(
        np.arange(1, dimension + 1, dtype=np.float64), -1.2
    )
    return variances


def _device(
    rng: np.random.Generator,
    n: int,
    mean: npt.NDArray[np.float64],
    weight: npt.NDArray[np.float64],
    bias: npt.NDArray[np.float64],
    std: npt.NDArray[np.float64],
) -> SyntheticDevice:
    x = mean + rng.standard_normal((n, mean.size)) * std  # x ~ N(mean, diag(std^2))
    y = np.argmax(x @ weight + bias, axis=1).astype(np.int64)
    return SyntheticDevice(x, y, weight, bias, mean)


def synthetic_devices(
    alpha: float,
    beta: float,
    *,
    num_devices: int = NUM_DEVICES,
    seed: int = 0,
    dimension: int = DIMENSION,
    num_classes: int = NUM_CLASSES,
) -> list[SyntheticDevice]:
    """Draw the non-IID Synthetic(alpha, beta) devices, with their generating parameters.

    Args:
        alpha: Standard deviation of the per-device model prior mean ``u_k`` (>= 0).
        beta: Standard deviation of the per-device feature prior mean ``B_k`` (>= 0).
        num_devices: Number of devices (the paper: 30).
        seed: Seed of ``numpy.random.default_rng``; the same seed gives the same data.
        dimension: Feature dimension (the paper: 60).
        num_classes: Number of classes (the paper: 10).

    Returns:
        One :class:`SyntheticDevice` per device (all samples, not yet split).

    Raises:
        ConfigError: If an argument is out of range.
    """
    _check(num_devices, dimension, num_classes)
    alpha, beta = float(alpha), float(beta)
    for name, value in (("alpha", alpha), ("beta", beta)):
        if not math.isfinite(value) or value < 0:
            raise ConfigError(f"{name} must be a finite number >= 0, got {value}")
    rng = np.random.default_rng(seed)
    counts = sample_counts(num_devices, rng)
    model_means = rng.normal(0.0, alpha, num_devices)  # u_k, also the bias prior mean
    feature_offsets = rng.normal(0.0, beta, num_devices)  # B_k
    feature_means = [rng.normal(feature_offsets[k], 1.0, dimension) for k in range(num_devices)]
    std = np.sqrt(feature_variances(dimension))
    devices = []
    for k in range(num_devices):
        weight = rng.normal(model_means[k], 1.0, (dimension, num_classes))
        bias = rng.normal(model_means[k], 1.0, num_classes)
        devices.append(_device(rng, int(counts[k]), feature_means[k], weight, bias, std))
    return devices


def synthetic_iid_devices(
    *,
    num_devices: int = NUM_DEVICES,
    seed: int = 0,
    dimension: int = DIMENSION,
    num_classes: int = NUM_CLASSES,
) -> list[SyntheticDevice]:
    """Draw the Synthetic-IID devices: one shared ``W, b ~ N(0, 1)``, features ``~ N(0, Sigma)``.

    Args:
        num_devices: Number of devices (the paper: 30).
        seed: Seed of ``numpy.random.default_rng``.
        dimension: Feature dimension (the paper: 60).
        num_classes: Number of classes (the paper: 10).

    Returns:
        One :class:`SyntheticDevice` per device (all share ``weight`` and ``bias``).

    Raises:
        ConfigError: If an argument is out of range.
    """
    _check(num_devices, dimension, num_classes)
    rng = np.random.default_rng(seed)
    counts = sample_counts(num_devices, rng)
    weight = rng.normal(0.0, 1.0, (dimension, num_classes))
    bias = rng.normal(0.0, 1.0, num_classes)
    std = np.sqrt(feature_variances(dimension))
    mean = np.zeros(dimension)
    return [_device(rng, int(counts[k]), mean, weight, bias, std) for k in range(num_devices)]


def synthetic_device(
    alpha: float,
    beta: float,
    index: int,
    *,
    seed: int = 0,
    iid: bool = False,
    dimension: int = DIMENSION,
    num_classes: int = NUM_CLASSES,
    max_samples: int | None = None,
) -> SyntheticDevice:
    """Draw device ``index`` of Synthetic(alpha, beta) on its own, in O(its samples).

    The same generative model as :func:`synthetic_devices` (``u_k ~ N(0, alpha)``,
    ``B_k ~ N(0, beta)``, ``v_k ~ N(B_k, 1)``, ``W_k, b_k ~ N(u_k, 1)``, ``x ~ N(v_k, Sigma)``,
    LogNormal(4, 2) + 50 samples), but every device has its own generator
    ``default_rng([seed, index])``: a simulator with thousands of agents makes each one's
    data where that agent trains, without drawing everyone else's. (So device ``k`` here
    differs from device ``k`` of :func:`synthetic_devices` with the same seed; the
    distribution is the same.) With ``iid``: one shared ``W, b`` (drawn from ``seed``),
    features ``N(0, Sigma)``.

    Args:
        max_samples: cap of the device's sample count (None: the LogNormal draw; it has a
            heavy tail, some devices get tens of thousands of samples).

    Raises:
        ConfigError: If an argument is out of range.
    """
    _check(index + 1, dimension, num_classes)
    alpha, beta = float(alpha), float(beta)
    rng = np.random.default_rng([seed, index])
    n = int(sample_counts(1, rng)[0])
    if max_samples is not None:
        n = max(1, min(n, int(max_samples)))
    std = np.sqrt(feature_variances(dimension))
    if iid:
        shared = np.random.default_rng([seed, 1 << 31])
        weight = shared.normal(0.0, 1.0, (dimension, num_classes))
        bias = shared.normal(0.0, 1.0, num_classes)
        return _device(rng, n, np.zeros(dimension), weight, bias, std)
    model_mean = rng.normal(0.0, alpha)
    feature_mean = rng.normal(rng.normal(0.0, beta), 1.0, dimension)
    weight = rng.normal(model_mean, 1.0, (dimension, num_classes))
    bias = rng.normal(model_mean, 1.0, num_classes)
    return _device(rng, n, feature_mean, weight, bias, std)


def generate_synthetic(
    alpha: float = 0.0,
    beta: float = 0.0,
    *,
    iid: bool = False,
    num_devices: int = NUM_DEVICES,
    seed: int = 0,
    dimension: int = DIMENSION,
    num_classes: int = NUM_CLASSES,
) -> list[Device]:
    """Per-device ``(x, y)`` of Synthetic(alpha, beta), or of Synthetic-IID with ``iid=True``.

    Args:
        alpha: Model heterogeneity (standard deviation, >= 0); must be 0 when ``iid``.
        beta: Data heterogeneity (standard deviation, >= 0); must be 0 when ``iid``.
        iid: Draw the IID variant instead.
        num_devices: Number of devices (the paper: 30).
        seed: Seed; the same arguments give the same arrays.
        dimension: Feature dimension (the paper: 60).
        num_classes: Number of classes (the paper: 10).

    Returns:
        ``num_devices`` pairs ``(x float64 (n_k, dimension), y int64 (n_k,))``.

    Raises:
        ConfigError: If an argument is out of range, or ``iid`` with a nonzero alpha/beta.
    """
    if iid:
        if alpha or beta:
            raise ConfigError(f"the IID variant takes no alpha/beta (got {alpha}, {beta})")
        devices = synthetic_iid_devices(
            num_devices=num_devices, seed=seed, dimension=dimension, num_classes=num_classes
        )
    else:
        devices = synthetic_devices(
            alpha,
            beta,
            num_devices=num_devices,
            seed=seed,
            dimension=dimension,
            num_classes=num_classes,
        )
    return [(d.x, d.y) for d in devices]


def split_devices(
    devices: list[Device], train_fraction: float = TRAIN_FRACTION, seed: int = 0
) -> tuple[list[Device], list[Device]]:
    """Shuffle each device's samples and cut them into train and test (the reference's 90/10).

    Args:
        devices: Per-device ``(x, y)``.
        train_fraction: The first ``int(train_fraction * n_k)`` shuffled samples train.
        seed: Seed of the shuffles (a stream independent of the data draw's with the
            same seed).

    Returns:
        ``(train, test)``: per-device ``(x, y)`` lists in the order of ``devices``.

    Raises:
        ConfigError: If ``train_fraction`` is not in (0, 1).
    """
    train_fraction = float(train_fraction)
    if not 0.0 < train_fraction < 1.0:
        raise ConfigError(f"train_fraction must be in (0, 1), got {train_fraction}")
    rng = np.random.default_rng([seed, 1])
    train: list[Device] = []
    test: list[Device] = []
    for x, y in devices:
        order = rng.permutation(len(y))
        cut = int(train_fraction * len(y))
        train.append((x[order[:cut]], y[order[:cut]]))
        test.append((x[order[cut:]], y[order[cut:]]))
    return train, test


def parse_synthetic(spec: str) -> tuple[float, float, bool]:
    """Read a dataset name: ``"iid"``, ``"1,1"``, ``"(0.5, 0.5)"``, ``"synthetic_1_1"``, ...

    Args:
        spec: The name (case and spaces ignored; a ``synthetic`` prefix is optional).

    Returns:
        ``(alpha, beta, iid)``.

    Raises:
        ConfigError: If ``spec`` is not of those forms or alpha/beta are negative.
    """
    text = str(spec).strip().lower()
    if text.startswith("synthetic"):
        text = text.removeprefix("synthetic").lstrip(" _:-")
    text = text.strip(" ()")
    if text == "iid":
        return 0.0, 0.0, True
    parts = [p for p in re.split(r"[\s,_]+", text) if p]
    try:
        if len(parts) != 2:
            raise ValueError
        alpha, beta = float(parts[0]), float(parts[1])
    except ValueError:
        raise ConfigError(
            f"unknown synthetic dataset {spec!r}: use 'iid' or 'ALPHA,BETA' (e.g. '1,1')"
        ) from None
    if not (math.isfinite(alpha) and math.isfinite(beta)) or alpha < 0 or beta < 0:
        raise ConfigError(f"synthetic dataset {spec!r}: alpha and beta must be finite and >= 0")
    return alpha, beta, False


def load_synthetic(
    spec: str,
    *,
    num_devices: int = NUM_DEVICES,
    seed: int = 0,
    train_fraction: float = TRAIN_FRACTION,
) -> tuple[list[Device], list[Device]]:
    """Generate and split a named Synthetic dataset (see :func:`parse_synthetic`).

    Args:
        spec: ``"iid"`` or ``"ALPHA,BETA"``.
        num_devices: Number of devices.
        seed: Seed of the data draw and of the train/test shuffles.
        train_fraction: Fraction of each device's samples used for training.

    Returns:
        ``(train, test)`` per-device ``(x, y)`` lists.

    Raises:
        ConfigError: If an argument is invalid.
    """
    alpha, beta, iid = parse_synthetic(spec)
    devices = generate_synthetic(alpha, beta, iid=iid, num_devices=num_devices, seed=seed)
    return split_devices(devices, train_fraction, seed=seed)
