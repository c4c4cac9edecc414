"""The connection gate: strangers are dropped oldest first, admitted peers never."""

from __future__ import annotations

import pytest

from fedstack.transport.limits import ConnectionGate


class Conn:
    def __init__(self, name: str) -> None:
        self.name = name
        self.aborted = False

    def abort(self) -> None:
        self.aborted = True


def test_oldest_strangers_go_first_and_admitted_peers_stay() -> None:
    gate = ConnectionGate(max_connections=5, max_unadmitted=3)
    a, b, c, d = (Conn(n) for n in "abcd")
    for x in (a, b):
        gate.opened(x)
        gate.admitted(x)
    gate.opened(c)
    gate.opened(d)
    assert (gate.open, gate.unadmitted) == (4, 2) and not c.aborted
    e, f = Conn("e"), Conn("f")
    gate.opened(e)  # 5 open, 3 strangers: fine
    assert not any(x.aborted for x in (a, b, c, d, e))
    gate.opened(f)  # 6 open: the oldest stranger (c) goes
    assert c.aborted and not d.aborted and gate.open == 5 and gate.dropped == 1
    for x in (d, e, f):
        gate.admitted(x)
    g = Conn("g")
    gate.opened(g)  # every other connection is admitted: the newcomer is refused
    assert g.aborted and not any(x.aborted for x in (a, b, d, e, f))
    gate.closed(a)
    h = Conn("h")
    gate.opened(h)
    assert not h.aborted and gate.open == 5


def test_unadmitted_bound_alone() -> None:
    gate = ConnectionGate(max_connections=100, max_unadmitted=2)
    conns = [Conn(str(i)) for i in range(5)]
    for x in conns:
        gate.opened(x)
    assert [x.aborted for x in conns] == [True, True, True, False, False]
    gate.closed(conns[0])  # a dropped connection's loss is harmless
    assert gate.unadmitted == 2


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError):
        ConnectionGate(0, 1)
    assert ConnectionGate.for_process().max_unadmitted >= 16
