"""The pure round state machine, with explicit clocks."""

from __future__ import annotations

import pytest

from fedstack.aggregator.rounds import RoundState, UploadStatus


def state(
    threshold: float = 1.0,
    min_agents: int = 1,
    timeout: float | None = None,
    max_rounds: int | None = None,
    policy: str = "next",
    version: int = 0,
    now: float = 100.0,
) -> RoundState:
    st = RoundState(
        threshold=threshold,
        min_agents=min_agents,
        round_timeout=timeout,
        max_rounds=max_rounds,
        staleness_policy=policy,
    )
    st.start(version, now)
    return st


@pytest.mark.parametrize(
    ("active", "threshold", "min_agents", "needed"),
    [
        (4, 0.5, 1, 2),
        (3, 0.8, 1, 3),
        (10, 0.25, 1, 3),
        (0, 0.5, 1, 1),
        (0, 1.0, 2, 2),
        (0, 0.25, 3, 3),
        (5, 1.0, 1, 5),
        (5, 0.2, 3, 3),  # min_agents dominates
        (1, 0.01, 1, 1),
        (10, 0.3, 1, 3),
        (50, 0.14, 1, 7),  # 0.14 * 50 is 7.000000000000001 in floating point
        (25, 0.28, 1, 7),  # 7.000000000000001 as well
        (3, 0.1, 1, 1),
        (7, 0.5, 1, 4),
        (100, 0.99, 1, 99),
    ],
)
def test_needed(active: int, threshold: float, min_agents: int, needed: int) -> None:
    assert state(threshold, min_agents).needed(active) == needed


def test_ready_needs_distinct_contributors() -> None:
    st = state(threshold=0.5)
    active = 4  # needs 2
    assert not st.ready(100.0, active)  # nobody yet
    st.contribute("a", "m1")
    assert not st.ready(100.0, active)
    st.contribute("a", "m2")  # the same agent again does not count twice
    assert len(st.contributors) == 1 and st.contributors["a"] == "m2"
    assert not st.ready(1e9, active)  # no deadline: never by time alone
    st.contribute("b", "m3")
    assert st.ready(100.0, active)
    st.contribute("c", "m4")
    assert st.ready(100.0, active)  # still ready past the count


def test_ready_follows_the_number_of_active_agents() -> None:
    st = state(threshold=1.0)
    st.contribute("a", "m1")
    st.contribute("b", "m2")
    assert not st.ready(100.0, 3)
    assert st.ready(100.0, 2)  # an agent left: two of two is enough


def test_ready_false_before_initialisation() -> None:
    st = RoundState(
        threshold=0.5, min_agents=1, round_timeout=1.0, max_rounds=None, staleness_policy="next"
    )
    assert not st.initialized and st.round == 0
    st.contribute("a", "m")
    assert not st.ready(1e9, 1)
    assert st.deadline() is None


def test_deadline_with_enough_contributors() -> None:
    st = state(threshold=1.0, min_agents=1, timeout=10.0, now=100.0)
    assert st.deadline() == 110.0
    st.contribute("a", "m1")
    active = 5  # needs 5
    assert not st.ready(100.0, active)
    assert not st.ready(109.999, active)
    assert st.ready(110.0, active)
    assert st.ready(500.0, active)


def test_deadline_not_with_fewer_than_min_agents() -> None:
    st = state(threshold=1.0, min_agents=2, timeout=10.0, now=100.0)
    st.contribute("a", "m1")
    assert not st.ready(110.0, 5)
    assert not st.ready(10_000.0, 5)
    st.contribute("b", "m2")
    assert not st.ready(109.0, 5)
    assert st.ready(110.0, 5)


@pytest.mark.parametrize("min_agents", [0, 1])
def test_deadline_without_contributors_is_not_ready(min_agents: int) -> None:
    st = state(threshold=1.0, min_agents=min_agents, timeout=1.0, now=0.0)
    assert not st.ready(100.0, 3)
    assert not st.ready(100.0, 0)


def test_no_timeout_means_no_deadline() -> None:
    st = state(timeout=None)
    assert st.deadline() is None
    st.contribute("a", "m")
    assert not st.ready(1e12, 2)


def test_classify_current_duplicate_and_stale() -> None:
    st = state(version=3, policy="next")
    assert st.round == 4
    assert st.classify("a", 3) is UploadStatus.CURRENT
    assert st.classify("a", 4) is UploadStatus.CURRENT  # from the future: not stale
    assert st.classify("a", 2) is UploadStatus.NEXT
    assert st.classify("a", -1) is UploadStatus.NEXT
    st.contribute("a", "m1")
    assert st.classify("a", 3) is UploadStatus.DUPLICATE
    assert st.classify("a", 0) is UploadStatus.DUPLICATE
    assert st.classify("b", 3) is UploadStatus.CURRENT


def test_classify_stale_with_drop_policy() -> None:
    st = state(version=3, policy="drop")
    assert st.classify("a", 2) is UploadStatus.DROP
    assert st.classify("a", 3) is UploadStatus.CURRENT


def test_classify_finished_after_max_rounds() -> None:
    st = state(version=1, max_rounds=2)
    assert not st.finished
    assert st.classify("a", 1) is UploadStatus.CURRENT
    st.contribute("a", "m")
    st.advance(200.0)
    assert st.version == 2 and st.finished
    assert st.classify("a", 2) is UploadStatus.FINISHED
    assert st.classify("b", 0) is UploadStatus.FINISHED
    st.contribute("b", "m2")
    assert not st.ready(1e9, 1)  # nothing more is aggregated
    assert st.deadline() is None


def test_never_finished_without_max_rounds() -> None:
    st = state(version=10**6, max_rounds=None)
    assert not st.finished
    assert st.classify("a", 10**6) is UploadStatus.CURRENT


def test_advance_increments_version_and_clears_contributors() -> None:
    st = state(threshold=0.5, timeout=5.0, version=0, now=10.0)
    st.contribute("a", "m1")
    st.contribute("b", "m2")
    assert st.ready(10.0, 4)
    st.advance(20.0)
    assert (st.version, st.round, st.started) == (1, 2, 20.0)
    assert st.contributors == {}
    assert st.deadline() == 25.0
    assert not st.ready(21.0, 4)
    assert st.classify("a", 0) is UploadStatus.NEXT  # was current a round ago
    assert st.classify("a", 1) is UploadStatus.CURRENT  # no longer a duplicate


def test_verdict_wire_values() -> None:
    # the ack statuses agents read; "rejected" (the update gate's) was a fourth string
    # vocabulary before and is now a member of the one enum
    assert {v.value for v in UploadStatus} == {
        "accepted",
        "accepted-late",
        "stale-dropped",
        "duplicate",
        "finished",
        "rejected",
    }


def test_upload_status_round_trips_through_the_stored_status() -> None:
    stored = {v: v.stored for v in UploadStatus}
    assert stored == {
        UploadStatus.CURRENT: "buffered",
        UploadStatus.NEXT: "buffered",
        UploadStatus.DROP: "stale",
        UploadStatus.DUPLICATE: "duplicate",
        UploadStatus.FINISHED: "late",
        UploadStatus.REJECTED: "rejected",
    }
    for v in UploadStatus:
        back = UploadStatus.from_stored(v.stored)
        assert back is (UploadStatus.CURRENT if v is UploadStatus.NEXT else v)
    assert UploadStatus.from_stored("aggregated") is UploadStatus.CURRENT
    assert UploadStatus.from_stored("something-new") == "something-new"
    assert [v for v in UploadStatus if v.counts] == [UploadStatus.CURRENT, UploadStatus.NEXT]


def test_strategy_min_updates_hold_the_round() -> None:
    from fedstack.aggregator.rounds import RoundState

    s = RoundState(
        threshold=0.5,
        min_agents=1,
        round_timeout=10.0,
        max_rounds=None,
        staleness_policy="next",
        min_updates=5,
    )
    s.start(0, now=0.0)
    for i in range(4):
        s.contribute(f"a{i}", f"m{i}")
    assert s.needed(4) == 5
    assert not s.ready(now=100.0, active=4)  # not even after the deadline
    s.contribute("a4", "m4")
    assert s.ready(now=1.0, active=5)
