"""Fairness in the receive budget (issue 16 finding 7): pools by standing, cool-downs that
follow identities, a capped first message and bounded fragment counts."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from fedstack.errors import MessageTooLarge
from fedstack.transport import standing
from fedstack.transport.budget import PROBATION_POOL, TRUSTED_POOL, ByteBudget
from fedstack.transport.frames import (
    FREE_FRAGMENTS,
    MIN_FRAGMENT_AVERAGE,
    OP_BINARY,
    OP_CONT,
    FrameParser,
    Message,
    Violation,
    serialize,
)
from fedstack.transport.standing import NEW, SUSPECT, TRUSTED, Standing, host_of

MB = 1 << 20


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def wire(opcode: int, data: bytes, fin: bool = True) -> bytes:
    return b"".join(bytes(p) for p in serialize(opcode, [data], mask=True, fin=fin, key=b"\0" * 4))


def test_an_account_earns_standing_and_loses_it_with_a_strike() -> None:
    clock = Clock()
    table = Standing(clock)
    agent = table.account("agent a", parent="host h")
    assert agent.tier() == NEW
    agent.completed()
    assert agent.tier() == TRUSTED
    assert agent.tier(stranger=True) == NEW  # unregistered: never trusted
    until = agent.strike()
    assert agent.tier() == SUSPECT and until == clock.now + standing.COOL_DOWN_BASE
    again = agent.strike()  # each strike doubles the cool-down
    assert again == clock.now + 2 * standing.COOL_DOWN_BASE
    agent.completed()  # one strike forgiven per completed message
    assert agent.tier() == SUSPECT
    agent.completed()
    assert agent.tier() == TRUSTED
    agent.strike()
    clock.now += standing.FORGIVE_AFTER + 1  # all forgotten after a quiet minute
    assert agent.tier() == NEW


def test_the_penalty_follows_the_identity_and_its_host_not_the_connection() -> None:
    clock = Clock()
    table = Standing(clock)
    table.account("agent slow", parent="host h").strike()
    # it rejoins (another connection, same identity): still suspect, still cooling down
    rejoined = table.account("agent slow", parent="host h")
    assert rejoined.tier() == SUSPECT and rejoined.not_before() > clock.now
    # a fresh name from that host inherits the host's penalty...
    minted = table.account("agent slow-2", parent="host h")
    assert minted.tier() == SUSPECT and minted.not_before() > clock.now
    # ...but an agent in good standing from the same host is judged by its own record
    honest = table.account("agent honest", parent="host h")
    honest.completed()
    assert honest.tier() == TRUSTED and honest.not_before() < clock.now
    # and another host is not concerned
    assert table.account("agent x", parent="host other").tier() == NEW


def test_standing_table_is_bounded() -> None:
    table = Standing(Clock(), max_accounts=8)
    for i in range(100):
        table.account(f"agent {i}")
    assert len(table) == 8


def test_host_of() -> None:
    assert host_of("10.0.0.1:5000") == "10.0.0.1"
    assert host_of("[::1]:5000") == "[::1]"
    assert host_of("pipe") == "pipe"


def _request(b: ByteBudget, n: int, got: list[str], name: str, **kw: object) -> Callable[[], None]:
    def granted() -> None:
        got.append(name)

    if b.request(n, granted, **kw):  # type: ignore[arg-type]
        got.append(name)
    return granted


def test_untrusted_holders_never_hold_back_trusted_uploads() -> None:
    """An oversized message of a newcomer (or a stranger) is admitted alone in the
    probation pool; agents in good standing keep their whole pool meanwhile."""

    async def main() -> None:
        b = ByteBudget(4 * MB, min_bytes=1)
        got: list[str] = []
        _request(b, 8 * MB, got, "attacker", tier=NEW)  # larger than everything: alone
        _request(b, 1 * MB, got, "newcomer", tier=NEW)  # waits: probation is taken
        _request(b, 2 * MB, got, "honest-1", tier=TRUSTED)
        _request(b, 2 * MB, got, "honest-2", tier=TRUSTED)
        assert got == ["attacker", "honest-1", "honest-2"]
        assert b.held == [4 * MB, 8 * MB]
        b.release(8 * MB, PROBATION_POOL)
        await asyncio.sleep(0.01)
        assert got[-1] == "newcomer" and b.held[PROBATION_POOL] == MB
        # and untrusted requests never take trusted bytes
        b.release(4 * MB, TRUSTED_POOL)
        _request(b, MB, got, "newcomer-2", tier=NEW)  # probation holds 1 of its 1 MiB
        assert got[-1] == "newcomer" and b.held == [0, MB]

    asyncio.run(main())


def test_a_cooling_account_is_served_after_its_cool_down_and_others_overtake_it() -> None:
    async def main() -> None:
        clock = Clock()
        b = ByteBudget(4 * MB, min_bytes=1, clock=clock)
        suspect = b.standing.account("agent s", parent="host h")
        suspect.strike()
        fresh = b.standing.account("agent f", parent="host other")
        got: list[str] = []
        _request(b, MB, got, "suspect", tier=SUSPECT, account=suspect)
        assert got == []  # cooling down, although the pool is empty
        _request(b, MB, got, "fresh", tier=NEW, account=fresh)
        assert got == ["fresh"]
        b.release(MB, PROBATION_POOL)  # the pool is free again: still cooling down
        await asyncio.sleep(0.01)
        assert got == ["fresh"]
        clock.now += standing.COOL_DOWN_BASE + 0.01
        b.poke()
        await asyncio.sleep(0.01)
        assert got == ["fresh", "suspect"]

    asyncio.run(main())


def test_a_cool_down_ends_by_itself_on_the_real_clock() -> None:
    async def main() -> float:
        b = ByteBudget(4 * MB, min_bytes=1)
        acc = b.standing.account("agent s")
        acc.strike()
        loop = asyncio.get_running_loop()
        start = loop.time()
        done = loop.create_future()
        assert not b.request(MB, lambda: done.set_result(None), tier=SUSPECT, account=acc)
        await asyncio.wait_for(done, 5)
        return loop.time() - start

    took = asyncio.run(main())
    assert standing.COOL_DOWN_BASE * 0.8 <= took < standing.COOL_DOWN_BASE + 1.0


def test_a_tab_earns_standing_only_once_registered_and_releases_to_its_pool() -> None:
    async def main() -> None:
        b = ByteBudget(4 * MB, min_bytes=1)
        host = b.standing.account("host h")
        tab = b.tab(host)
        p = FrameParser(client=False, max_message_bytes=64 * MB, budget=tab)
        (m,) = p.feed(wire(OP_BINARY, bytes(2 * MB)))
        assert isinstance(m, Message) and m.hold is not None and tab.tier == NEW
        assert b.held == [0, 2 * MB] and host.completions == 0  # a stranger earns nothing
        m.hold.release()
        assert b.held == [0, 0]
        agent = b.standing.account("agent a", parent="host h")
        tab.admit(agent)
        (m,) = p.feed(wire(OP_BINARY, bytes(2 * MB)))
        assert isinstance(m, Message) and m.hold is not None and agent.tier() == TRUSTED
        (m2,) = p.feed(wire(OP_BINARY, bytes(3 * MB)))  # now served as trusted
        assert isinstance(m2, Message) and m2.hold is not None
        assert b.held == [3 * MB, 2 * MB]
        m.hold.release()
        m2.hold.release()
        assert b.held == [0, 0] and b.used == 0

    asyncio.run(main())


def test_a_flood_of_tiny_continuation_frames_is_refused() -> None:
    """Empty or tiny continuation frames cost CPU per frame: beyond a few, a fragmented
    message must carry on average MIN_FRAGMENT_AVERAGE bytes a frame."""
    p = FrameParser(client=False, max_message_bytes=64 * MB)
    p.admit()
    events = p.feed(wire(OP_BINARY, bytes(100), fin=False))
    empty = wire(OP_CONT, b"", fin=False)
    for _ in range(FREE_FRAGMENTS + 10):
        events += p.feed(empty)
        if events:
            break
    assert len(events) == 1 and isinstance(events[0], Violation), events
    assert "fragments" in str(events[0].error)
    # honest fragmentation (large fragments) is not concerned
    q = FrameParser(client=False, max_message_bytes=64 * MB)
    q.admit()
    frames = [wire(OP_BINARY, bytes(MIN_FRAGMENT_AVERAGE), fin=False)]
    frames += [wire(OP_CONT, bytes(MIN_FRAGMENT_AVERAGE), fin=False)] * (4 * FREE_FRAGMENTS)
    frames.append(wire(OP_CONT, b"end"))
    (msg,) = q.feed(b"".join(frames))
    assert isinstance(msg, Message)
    assert msg.data.nbytes == (4 * FREE_FRAGMENTS + 1) * MIN_FRAGMENT_AVERAGE + 3


def test_a_strangers_first_message_is_capped_before_anything_is_allocated() -> None:
    limit = [1 * MB]
    p = FrameParser(client=False, max_message_bytes=64 * MB, first_cap=lambda: limit[0])
    head = wire(OP_BINARY, bytes(2 * MB))[:14]  # only the header: 2 MiB announced
    (ev,) = p.feed(head)
    assert isinstance(ev, Violation) and isinstance(ev.error, MessageTooLarge)
    assert ev.error.limit == MB and p.capacity == 0
    limit[0] = 4 * MB  # the limit in force when the message begins
    q = FrameParser(client=False, max_message_bytes=64 * MB, first_cap=lambda: limit[0])
    assert [type(e) for e in q.feed(wire(OP_BINARY, bytes(2 * MB)))] == [Message]
    q.admit()  # registered: only the message limit applies
    assert [type(e) for e in q.feed(wire(OP_BINARY, bytes(8 * MB)))] == [Message]


@pytest.mark.parametrize("held_by", [TRUSTED, NEW])
def test_two_oversized_messages_are_never_held_at_once(held_by: int) -> None:
    async def main() -> None:
        b = ByteBudget(4 * MB, min_bytes=1)
        got: list[str] = []
        _request(b, 8 * MB, got, "first", tier=held_by)
        other = NEW if held_by == TRUSTED else TRUSTED
        _request(b, 16 * MB, got, "second", tier=other)
        assert got == ["first"]
        b.release(8 * MB, TRUSTED_POOL if held_by == TRUSTED else PROBATION_POOL)
        await asyncio.sleep(0.01)
        assert got == ["first", "second"]

    asyncio.run(main())
