"""Small generated stand-ins for CIFAR-10 (tests and CI never download the real one).

:func:`make_cifar10_folder` writes a few hundred 32x32 colour images in CIFAR-10's binary
layout (:func:`fedstack.data.cifar.write_cifar10`). Each class has its own fixed coarse
colour pattern and every image is that pattern plus per-image noise and a random shift,
so a CNN can learn the classes within a few rounds while no two images are equal.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedstack.data.cifar import Images, Labels, write_cifar10
from fedstack.errors import ConfigError

__all__ = ["make_cifar10_folder", "synthetic_cifar10"]

CHUNK = 2000


def synthetic_cifar10(
    n_train: int = 500, n_test: int = 200, seed: int = 0, noise: float = 48.0
) -> tuple[Images, Labels, Images, Labels]:
    """Learnable CIFAR-shaped data: ``(x_train, y_train, x_test, y_test)``, images uint8
    (N, 32, 32, 3), labels int64 balanced over the 10 classes (shuffled).

    Args:
        n_train: Training images (at least 10).
        n_test: Test images (at least 10).
        seed: Seed of the class patterns, the noise and the order.
        noise: Standard deviation of the per-pixel Gaussian noise (0..255 scale).

    Raises:
        ConfigError: If a count is below 10 or ``noise`` is negative.
    """
    if n_train < 10 or n_test < 10:
        raise ConfigError(f"need at least 10 training and 10 test images, got {n_train}, {n_test}")
    if not noise >= 0:
        raise ConfigError(f"noise must be >= 0, got {noise}")
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(10, 4, 4, 3)).astype(np.float32)
    patterns = coarse.repeat(8, axis=1).repeat(8, axis=2)  # (10, 32, 32, 3)

    def draw(n: int) -> tuple[Images, Labels]:
        labels = rng.permutation(np.arange(n) % 10).astype(np.int64)
        shifts = rng.integers(-2, 3, size=(n, 2))
        images = np.empty((n, 32, 32, 3), np.uint8)
        for begin in range(0, n, CHUNK):  # bounded float memory for CIFAR-10-sized sets
            rows = slice(begin, begin + CHUNK)
            chunk = patterns[labels[rows]] + rng.normal(
                0.0, noise, size=(len(labels[rows]), 32, 32, 3)
            ).astype(np.float32)
            for i, (dy, dx) in enumerate(shifts[rows]):
                chunk[i] = np.roll(chunk[i], (int(dy), int(dx)), axis=(0, 1))
            images[rows] = np.clip(np.rint(chunk), 0, 255).astype(np.uint8)
        return images, labels

    x_train, y_train = draw(n_train)
    x_test, y_test = draw(n_test)
    return x_train, y_train, x_test, y_test


def make_cifar10_folder(
    root: str | Path, n_train: int = 500, n_test: int = 200, seed: int = 0
) -> Path:
    """Write :func:`synthetic_cifar10` data under ``root`` in CIFAR-10's binary layout.

    Returns:
        ``root`` (what :func:`fedstack.data.cifar.load_cifar10` and ``--data-dir`` take).
    """
    write_cifar10(root, *synthetic_cifar10(n_train, n_test, seed))
    return Path(root)
