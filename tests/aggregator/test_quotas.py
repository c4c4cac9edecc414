"""Storage quotas and the extra arrays kept (issue 16 finding 5)."""

from __future__ import annotations

import numpy as np

from fedstack.aggregator.quotas import (
    AUTO_UPLOADS,
    RECORD_BYTES,
    StorageQuota,
    auto_quota,
    kept_extra,
    nbytes,
)
from fedstack.strategies import create


def test_kept_extra_keeps_only_what_the_strategy_reads() -> None:
    junk = np.zeros(4, np.float32)
    extra = {"u/w": junk, "v/w": junk, "junk": junk}
    assert kept_extra(extra, ()) is None
    assert kept_extra(None, ("u/",)) is None
    assert kept_extra(extra, None) is extra
    assert set(kept_extra(extra, ("u/", "v/")) or {}) == {"u/w", "v/w"}
    both = {"u/w": junk}
    assert kept_extra(both, ("u/",)) is both  # nothing dropped: the same mapping


def test_builtin_strategies_declare_the_extras_they_read() -> None:
    assert create("fedavg").reads_extra == ()
    assert create("fedcurv").reads_extra == ("u/", "v/")
    assert create("scaffold").reads_extra == ("dc/",)


def test_quota_per_agent_and_per_round() -> None:
    q = StorageQuota(per_agent=3 * (100 + RECORD_BYTES), per_round=5 * (100 + RECORD_BYTES))
    assert all(q.charge("a", 1, 100) is None for _ in range(3))
    refused = q.charge("a", 1, 100)
    assert refused is not None and "agent's storage quota" in refused
    assert q.used("a") == 3 * (100 + RECORD_BYTES)  # a refusal is not charged
    assert q.charge("b", 1, 100) is None
    assert q.charge("c", 1, 100) is None
    refused = q.charge("d", 1, 100)
    assert refused is not None and "for round 1" in refused
    assert q.charge("a", 2, 100) is None  # a new round: the charges start over
    assert q.used("a") == 100 + RECORD_BYTES


def test_nbytes() -> None:
    assert nbytes(None) == 0
    assert nbytes({"a": np.zeros(3, np.float32), "b": np.zeros(2, np.float64)}) == 28


def test_automatic_quota_follows_the_model_size() -> None:
    assert auto_quota(1000, 1 << 40) == AUTO_UPLOADS * (3000 + RECORD_BYTES)
    assert auto_quota(1 << 30, 1 << 31) == 1 << 31  # capped
    q = StorageQuota(per_agent=None, cap=1 << 40)
    for _ in range(AUTO_UPLOADS):
        assert q.charge("a", 1, 3000, model_bytes=1000) is None
    assert q.charge("a", 1, 3000, model_bytes=1000) is not None
