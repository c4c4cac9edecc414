"""Tests for fedstack.data.partition: IID and Dirichlet splits and the spec parser."""

from __future__ import annotations

import numpy as np
import pytest

from fedstack.data.partition import dirichlet, iid, parse_partition
from fedstack.errors import ConfigError

LABELS = np.repeat(np.arange(10), 100)  # 1000 rows, 100 per class
np.random.default_rng(123).shuffle(LABELS)


def assert_disjoint_and_covering(parts: list[np.ndarray], n: int) -> None:
    joined = np.concatenate(parts)
    assert len(joined) == n
    assert np.array_equal(np.sort(joined), np.arange(n))
    for part in parts:
        assert part.dtype == np.int64


def mean_max_class_share(parts: list[np.ndarray], labels: np.ndarray) -> float:
    shares = [np.bincount(labels[p], minlength=10).max() / len(p) for p in parts]
    return float(np.mean(shares))


@pytest.mark.parametrize("num_agents", [1, 3, 7])
def test_iid_is_disjoint_covering_and_balanced(num_agents: int) -> None:
    parts = iid(LABELS, num_agents, seed=0)
    assert len(parts) == num_agents
    assert_disjoint_and_covering(parts, len(LABELS))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


def test_iid_is_shuffled_and_deterministic_per_seed() -> None:
    first = iid(LABELS, 3, seed=5)
    again = iid(LABELS, 3, seed=5)
    other = iid(LABELS, 3, seed=6)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))
    assert not np.array_equal(first[0], np.sort(first[0]))


@pytest.mark.parametrize(("num_agents", "alpha"), [(2, 0.1), (3, 0.5), (5, 1.0), (10, 100.0)])
def test_dirichlet_is_disjoint_and_covering(num_agents: int, alpha: float) -> None:
    parts = dirichlet(LABELS, num_agents, alpha, seed=0)
    assert len(parts) == num_agents
    assert_disjoint_and_covering(parts, len(LABELS))


def test_dirichlet_is_deterministic_per_seed() -> None:
    first = dirichlet(LABELS, 4, 0.5, seed=1)
    again = dirichlet(LABELS, 4, 0.5, seed=1)
    other = dirichlet(LABELS, 4, 0.5, seed=2)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert [len(p) for p in first] != [len(p) for p in other]


def test_dirichlet_honours_min_samples() -> None:
    # With alpha 0.05 and 10 agents, single draws routinely leave agents nearly empty.
    sizes_without = [
        min(len(p) for p in dirichlet(LABELS, 10, 0.05, seed=s, min_samples=0)) for s in range(5)
    ]
    assert min(sizes_without) < 40
    for seed in range(5):
        parts = dirichlet(LABELS, 10, 0.05, seed=seed, min_samples=40)
        assert min(len(p) for p in parts) >= 40
        assert_disjoint_and_covering(parts, len(LABELS))


def test_dirichlet_small_alpha_skews_labels() -> None:
    iid_share = np.mean([mean_max_class_share(iid(LABELS, 5, seed=s), LABELS) for s in range(3)])
    skewed = np.mean(
        [mean_max_class_share(dirichlet(LABELS, 5, 0.1, seed=s), LABELS) for s in range(3)]
    )
    flat = np.mean(
        [mean_max_class_share(dirichlet(LABELS, 5, 1000.0, seed=s), LABELS) for s in range(3)]
    )
    assert iid_share < 0.2  # ~0.1 plus noise for 10 balanced classes
    assert skewed > iid_share + 0.2
    assert flat < 0.2


def test_dirichlet_accepts_string_labels() -> None:
    labels = np.array(["cat", "dog", "emu"] * 40)
    parts = dirichlet(labels, 3, 0.5, seed=0)
    assert_disjoint_and_covering(parts, len(labels))


@pytest.mark.parametrize(
    ("num_agents", "alpha", "min_samples", "match"),
    [
        (0, 0.5, 10, "num_agents"),
        (3, 0.0, 10, "alpha"),
        (3, float("nan"), 10, "alpha"),
        (3, 0.5, 400, "min_samples"),
    ],
)
def test_dirichlet_rejects_bad_arguments(
    num_agents: int, alpha: float, min_samples: int, match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        dirichlet(LABELS, num_agents, alpha, seed=0, min_samples=min_samples)


def test_iid_rejects_more_agents_than_samples() -> None:
    with pytest.raises(ConfigError, match="agents"):
        iid(np.arange(3), 4, seed=0)


def test_parse_partition_iid_and_dirichlet() -> None:
    iid_parts = parse_partition("iid")(LABELS, 3, 4)
    assert all(np.array_equal(a, b) for a, b in zip(iid_parts, iid(LABELS, 3, 4), strict=True))
    for spec in ["dirichlet:0.5", " Dirichlet:0.5 ", "dirichlet:5e-1"]:
        parts = parse_partition(spec)(LABELS, 3, 4)
        expected = dirichlet(LABELS, 3, 0.5, 4)
        assert all(np.array_equal(a, b) for a, b in zip(parts, expected, strict=True))


@pytest.mark.parametrize(
    ("spec", "hint"),
    [
        ("dirichlet:abc", "not a number"),
        ("dirichlet:-1", "> 0"),
        ("dirichlet:0", "> 0"),
        ("dirichlet:inf", "> 0"),
        ("dirichlet", "dirichlet:0.5"),
        ("dirichlet:", "dirichlet:0.5"),
        ("shards:1.5", "integer"),
        ("shards:0", "> 0"),
        ("quantity:x", "not a number"),
        ("labels:2", "expected 'iid', 'dirichlet:ALPHA', 'shards:K' or 'quantity:ALPHA'"),
        ("", "expected 'iid', 'dirichlet:ALPHA', 'shards:K'"),
    ],
)
def test_parse_partition_rejects_bad_specs(spec: str, hint: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_partition(spec)
    assert hint in str(info.value)
    assert repr(spec) in str(info.value)


def test_shards_give_each_agent_few_classes() -> None:
    from fedstack.data.partition import parse_partition, shards

    y = np.repeat(np.arange(10), 50)  # 500 rows, 10 classes
    parts = shards(y, 10, 2, seed=0)
    assert sorted(np.concatenate(parts).tolist()) == list(range(500))  # disjoint, covering
    assert all(len(np.unique(y[p])) <= 3 for p in parts)  # ~2 classes each (shard edges)
    assert np.mean([len(np.unique(y[p])) for p in parts]) <= 2.2
    again = parse_partition("shards:2")(y, 10, 0)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    assert not all(
        np.array_equal(a, b) for a, b in zip(parts, shards(y, 10, 2, seed=1), strict=True)
    )


def test_quantity_skew_sizes_vary_labels_do_not() -> None:
    from fedstack.data.partition import parse_partition, quantity_skew

    y = np.repeat(np.arange(10), 100)
    parts = quantity_skew(y, 10, alpha=0.3, seed=0, min_samples=5)
    sizes = np.array([len(p) for p in parts])
    assert sizes.sum() == 1000 and sizes.min() >= 5
    assert sizes.max() > 3 * np.median(sizes) and sizes.max() > 40 * sizes.min()  # unequal
    even = np.array([len(p) for p in quantity_skew(y, 10, alpha=1000.0, seed=0)])
    assert even.max() - even.min() <= 0.2 * even.mean()  # large alpha: near-equal
    big = parts[int(np.argmax(sizes))]
    assert len(np.unique(y[big])) == 10  # labels stay IID
    assert len(parse_partition("quantity:0.3")(y, 10, 0)) == 10
