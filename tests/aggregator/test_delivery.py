"""Delivery: the long polls the owner holds."""

from __future__ import annotations

from fedstack.aggregator.delivery import PollWaiters
from fedstack.aggregator.registry import Session


def s(name: str) -> Session:
    return Session(name, name, None, "x")  # type: ignore[arg-type]


def test_polls_expire_in_order_and_a_new_poll_replaces_the_old() -> None:
    polls = PollWaiters()
    a, b, c = s("a"), s("b"), s("c")
    polls.add(a, 0, 10.0)
    polls.add(b, 1, 5.0)
    polls.add(c, 0, 7.0)
    assert polls.next_expiry() == 5.0 and len(polls) == 3
    polls.add(b, 1, 20.0)  # b polled again: its first wait no longer counts
    assert polls.next_expiry() == 7.0
    assert polls.take_due(9.0) == [(c, 0)]
    polls.remove(a)
    assert polls.take_due(15.0) == [] and polls.next_expiry() == 20.0
    assert polls.take_all() == [(b, 1)]
    assert len(polls) == 0 and polls.next_expiry() is None
