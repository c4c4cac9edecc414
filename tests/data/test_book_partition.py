"""The book's non-IID partitioner (book_spec §14 row 48): per-class keep ratios
``sel_count``/``def_count`` with a class-to-agent map; class histograms per agent match
the configured ratios, through the Python API, the spec string, the digits trainer and
``fedstack demo``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedstack.data.digits import load_digits_split, partition_digits
from fedstack.data.partition import class_keep, default_class_map, parse_partition
from fedstack.errors import ConfigError

# unequal class sizes (100..145 rows), shuffled: counts must follow each class's size
SIZES = np.arange(100, 150, 5)
LABELS = np.repeat(np.arange(10), SIZES)
np.random.default_rng(7).shuffle(LABELS)
BOOK_MAP = [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]


def histograms(parts: list[np.ndarray], labels: np.ndarray, k: int = 10) -> np.ndarray:
    return np.stack([np.bincount(labels[p], minlength=k) for p in parts])


def expected_histograms(
    sizes: np.ndarray, class_map: list[list[int]], sel: float, dflt: float
) -> np.ndarray:
    """What the book's scheme asks: int(ratio x class size) per agent and class."""
    return np.array(
        [
            [int((sel if c in group else dflt) * n + 1e-9) for c, n in enumerate(sizes)]
            for group in class_map
        ]
    )


def assert_no_duplicates(parts: list[np.ndarray]) -> None:
    for p in parts:
        assert p.dtype == np.int64
        assert len(np.unique(p)) == len(p)


def test_histograms_match_the_configured_ratios_disjoint() -> None:
    parts = class_keep(LABELS, 3, sel_count=0.6, def_count=0.1, class_map=BOOK_MAP, seed=0)
    assert np.array_equal(histograms(parts, LABELS), expected_histograms(SIZES, BOOK_MAP, 0.6, 0.1))
    assert_no_duplicates(parts)
    joined = np.concatenate(parts)
    assert len(np.unique(joined)) == len(joined)  # disjoint across agents
    assert len(joined) < len(LABELS)  # 0.8 of every class is used, the rest is not
    # shuffled (not grouped by class) and deterministic per seed
    assert not np.all(np.diff(LABELS[parts[0]]) >= 0)
    again = class_keep(LABELS, 3, sel_count=0.6, def_count=0.1, class_map=BOOK_MAP, seed=0)
    other = class_keep(LABELS, 3, sel_count=0.6, def_count=0.1, class_map=BOOK_MAP, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    assert not all(
        np.array_equal(np.sort(a), np.sort(b)) for a, b in zip(parts, other, strict=True)
    )


def test_the_books_chapter8_setting_with_overlap() -> None:
    # sel_count 1.0, def_count 0.2, agents 0-2 / 3-5 / 6-9: 1.4 of every class is asked
    # for, so the agents must share rows; each still holds every row at most once, and
    # rows are shared as little as possible (each held by 1 or 2 agents).
    spec = "keep:sel=1.0,def=0.2,map=0-2/3-5/6-9,overlap=true"
    parts = parse_partition(spec)(LABELS, 3, 0)
    assert np.array_equal(histograms(parts, LABELS), expected_histograms(SIZES, BOOK_MAP, 1.0, 0.2))
    assert_no_duplicates(parts)
    holders = np.bincount(np.concatenate(parts), minlength=len(LABELS))
    assert holders.min() == 1 and holders.max() == 2
    # the default map is the book's: 10 classes over 3 agents -> 0-2, 3-5, 6-9
    assert default_class_map(list(range(10)), 3) == BOOK_MAP
    default = parse_partition("keep:sel=1.0,def=0.2,overlap=true")(LABELS, 3, 0)
    assert all(np.array_equal(a, b) for a, b in zip(parts, default, strict=True))
    # ... and without overlap the same ratios are refused with what to change
    with pytest.raises(ConfigError, match=r"1 \+ 0\.2 \+ 0\.2 .*overlap=true"):
        parse_partition("keep:sel=1.0,def=0.2")(LABELS, 3, 0)


def test_chapter7_fedcurv_flags_and_a_class_selected_twice() -> None:
    # ch7: --sel_count 1.0 --def_count 0.1 --airplane --bird --truck (classes 0, 2, 9) for
    # one agent; a second agent selecting 9 too (shared selected classes are allowed).
    class_map = [[0, 2, 9], [9, 4]]
    parts = parse_partition("keep:sel=0.5,def=0.1,map=0+2+9/4+9")(LABELS, 2, 3)
    assert np.array_equal(
        histograms(parts, LABELS), expected_histograms(SIZES, class_map, 0.5, 0.1)
    )
    joined = np.concatenate(parts)
    assert len(np.unique(joined)) == len(joined)


def test_def_count_zero_gives_only_the_selected_classes() -> None:
    parts = class_keep(LABELS, 3, sel_count=1.0, def_count=0.0, seed=0)
    for part, group in zip(parts, BOOK_MAP, strict=True):
        assert sorted(np.unique(LABELS[part]).tolist()) == group
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(LABELS)))


def test_string_labels_and_an_explicit_map() -> None:
    labels = np.array(["cat", "dog", "emu", "fox"] * 50)
    parts = class_keep(
        labels, 2, sel_count=0.8, def_count=0.1, class_map=[{"cat", "dog"}, {"fox"}], seed=0
    )
    counts = [{c: int((labels[p] == c).sum()) for c in ("cat", "dog", "emu", "fox")} for p in parts]
    assert counts == [
        {"cat": 40, "dog": 40, "emu": 5, "fox": 5},
        {"cat": 5, "dog": 5, "emu": 5, "fox": 40},
    ]


def test_digits_agents_get_the_configured_histograms() -> None:
    # what every agent of `fedstack demo --partition keep:...` / the digits trainers gets
    _, y_train, _, _ = load_digits_split()
    sizes = np.bincount(y_train, minlength=10)
    spec = "keep:sel=0.7,def=0.1,map=0-4/5-9"
    want = expected_histograms(sizes, [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]], 0.7, 0.1)
    for index in range(2):
        _, y = partition_digits(index, 2, spec, seed=0)
        assert np.array_equal(np.bincount(y, minlength=10), want[index])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sel_count": 1.5, "def_count": 0.1}, "sel_count"),
        ({"sel_count": 0.5, "def_count": -0.1}, "def_count"),
        ({"sel_count": float("nan"), "def_count": 0.1}, "sel_count"),
        ({"sel_count": 0.5, "def_count": 0.1, "class_map": [[0], [1]]}, "2 groups but there are 3"),
        (
            {"sel_count": 0.5, "def_count": 0.1, "class_map": [[0], [1], [12]]},
            r"class\(es\) \[12\]",
        ),
        ({"sel_count": 0.5, "def_count": 0.0, "class_map": [[0], [1], []]}, "agent 2 gets no rows"),
        ({"sel_count": 0.5, "def_count": 0.1, "overlap": "yes"}, "overlap"),
    ],
)
def test_class_keep_rejects_bad_arguments(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        class_keep(LABELS, 3, seed=0, **kwargs)  # type: ignore[arg-type]


def test_default_map_needs_enough_classes() -> None:
    with pytest.raises(ConfigError, match="explicit map"):
        class_keep(LABELS, 11, sel_count=0.05, def_count=0.01)


@pytest.mark.parametrize(
    ("spec", "hint"),
    [
        ("keep", "lacks its keep ratios"),
        ("keep:sel=1.0", "lacks def"),
        ("keep:def=0.1", "lacks sel"),
        ("keep:sel=2,def=0.1", "sel must be a number in [0, 1]"),
        ("keep:sel=x,def=0.1", "sel must be a number in [0, 1]"),
        ("keep:sel=1,def=0.1,def=0.2", "given twice"),
        ("keep:sel=1,def=0.1,colour=red", "unknown option 'colour'"),
        ("keep:sel=1,def=0.1,map", "key=value"),
        ("keep:sel=1,def=0.1,map=0-2/x", "'x' in the map"),
        ("keep:sel=1,def=0.1,map=3-1", "empty or negative"),
        ("keep:sel=1,def=0.1,overlap=maybe", "overlap must be true or false"),
    ],
)
def test_parse_partition_rejects_bad_keep_specs(spec: str, hint: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_partition(spec)
    assert hint in str(info.value)
    assert repr(spec) in str(info.value)


def test_unknown_partition_names_the_keep_form() -> None:
    with pytest.raises(ConfigError, match="keep:sel=S,def=D"):
        parse_partition("labels:2")


def test_demo_refuses_ratios_the_digits_cannot_satisfy(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedstack",
            "demo",
            "--partition",
            "keep:sel=1,def=0.2",
            "--workdir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "overlap=true" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "fedstack.db").exists()  # refused before anything started


def test_sim_agents_train_on_the_keep_shares(tmp_path: Path) -> None:
    # `fedstack sim --trainer-arg partition=keep:...`: the round's sample count is the sum
    # of the three agents' keep counts (the book's chapter-8 setting, 1.4x the rows)
    _, y_train, _, _ = load_digits_split()
    sizes = np.bincount(y_train, minlength=10)
    want = int(expected_histograms(sizes, BOOK_MAP, 1.0, 0.2).sum())
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedstack",
            "sim",
            "--agents",
            "3",
            "--rounds",
            "1",
            "--trainer-arg",
            "partition=keep:sel=1.0,def=0.2,overlap=true",
            "--db",
            str(tmp_path / "sim.db"),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = json.loads(proc.stdout.strip().splitlines()[-1])["final_metrics"]
    assert metrics["num_updates"] == 3
    assert metrics["num_samples"] == want > len(y_train)
