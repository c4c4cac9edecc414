"""scikit-learn's bundled handwritten digits (8x8 images, 10 classes): no download needed."""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import os
import threading
from pathlib import Path

import numpy as np
import numpy.typing as npt

from fedstack.data.partition import parse_partition
from fedstack.errors import ConfigError

Features = npt.NDArray[np.float32]
Labels = npt.NDArray[np.int64]


_LOAD_LOCK = threading.Lock()


def cache_dir() -> Path:
    """Where derived data is cached: ``FEDSTACK_CACHE_DIR``, else ``~/.cache/fedstack``."""
    env = os.environ.get("FEDSTACK_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "fedstack"


def _cache_file(test_size: float, seed: int) -> Path | None:
    try:
        version = importlib.metadata.version("scikit-learn")
    except importlib.metadata.PackageNotFoundError:
        return None
    return cache_dir() / f"digits-split-sklearn{version}-{test_size!r}-{seed}.npz"


@functools.lru_cache(maxsize=8)
def _split(test_size: float, seed: int) -> tuple[Features, Labels, Features, Labels]:
    """The stratified split, from the cache if this scikit-learn made it before.

    Importing scikit-learn costs about half a second per process; every agent process
    and worker needs the same split, so the first one stores it (``.npz``, read with
    ``allow_pickle=False``: plain arrays only, nothing executed) and the others load it.
    """
    path = _cache_file(test_size, seed)
    if path is not None and path.exists():
        try:
            with np.load(path, allow_pickle=False) as z:
                parts = (z["x_train"], z["y_train"], z["x_test"], z["y_test"])
            if (
                all(p.ndim == n for p, n in zip(parts, (2, 1, 2, 1), strict=True))
                and parts[0].dtype == np.float32
                and parts[1].dtype == np.int64
            ):
                for part in parts:
                    part.setflags(write=False)
                return parts
        except (OSError, ValueError, KeyError):
            pass  # unreadable or from elsewhere: make it again
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise ConfigError(
            "the digits demo data needs scikit-learn: pip install 'fedstack[demo]'"
        ) from None

    digits = load_digits()
    x = (np.asarray(digits.data, dtype=np.float32) / np.float32(16.0)).astype(np.float32)
    y = np.asarray(digits.target, dtype=np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_size, random_state=seed, stratify=y
    )
    parts = (x_train, y_train, x_test, y_test)
    if path is not None:
        with contextlib.suppress(OSError):  # a read-only home only costs the speed-up
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
            with open(tmp, "wb") as f:
                np.savez(f, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
            os.replace(tmp, path)
    for part in parts:
        part.setflags(write=False)
    return parts


def load_digits_split(
    test_size: float = 0.2, seed: int = 0
) -> tuple[Features, Labels, Features, Labels]:
    """Load the digits dataset and split it into train and test sets.

    Args:
        test_size: Fraction of the 1797 samples held out for testing, in (0, 1).
        seed: ``random_state`` of the stratified split.

    Returns:
        ``(x_train, y_train, x_test, y_test)``: features are float32 of shape ``(n, 64)``
        scaled to [0, 1] (pixel value / 16), labels are int64 in 0..9. The arrays are
        fresh copies the caller may modify.

    Raises:
        ConfigError: If ``test_size`` is not in (0, 1), or scikit-learn (the ``demo``
            extra) is not installed.
    """
    test_size = float(test_size)
    if not 0.0 < test_size < 1.0:
        raise ConfigError(f"test_size must be in (0, 1), got {test_size}")
    with _LOAD_LOCK:  # threads (e.g. concurrent evaluations) load the data once
        x_train, y_train, x_test, y_test = _split(test_size, int(seed))
    return x_train.copy(), y_train.copy(), x_test.copy(), y_test.copy()


def partition_digits(
    index: int,
    num_agents: int,
    partition: str = "iid",
    seed: int = 0,
    split_seed: int = 0,
) -> tuple[Features, Labels]:
    """The local training data of agent ``index`` out of ``num_agents``.

    The training split of :func:`load_digits_split` (``split_seed``, 20 % test) is
    partitioned with ``partition``; every agent computes the same partition for the same
    arguments, so the shares are disjoint without coordination. The held-out test split
    is never part of any agent's data.

    Args:
        index: This agent's position, ``0 <= index < num_agents``.
        num_agents: Number of agents sharing the data.
        partition: a spec of :func:`fedstack.data.partition.parse_partition` (``"iid"``,
            ``"dirichlet:ALPHA"``, ``"shards:K"``, ``"quantity:ALPHA"``,
            ``"keep:sel=S,def=D"``).
        seed: Seed of the partition.
        split_seed: Seed of the train/test split (keep it equal everywhere, including
            in central evaluation).

    Returns:
        ``(x_local_train, y_local_train)`` for this agent.

    Raises:
        ConfigError: If ``index`` is out of range or the partition is invalid.
    """
    partitioner = parse_partition(partition)
    if not 0 <= index < num_agents:
        raise ConfigError(f"agent index must be in [0, {num_agents}), got {index}")
    x_train, y_train, _, _ = load_digits_split(seed=split_seed)
    rows = partitioner(y_train, num_agents, seed)[index]
    return x_train[rows], y_train[rows]
