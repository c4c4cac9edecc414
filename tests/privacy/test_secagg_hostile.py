"""SecAgg+ library under hostile input: every refusal is a SecAggError with the right code."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from fedstack.privacy.secagg import (
    CIPHERTEXT_BYTES,
    AgentSession,
    PublicKeys,
    Roster,
    SecAggError,
    SecAggParams,
    ServerSession,
    apply_update,
    flatten_update,
)

S = "run-9:1:0"


def code_of(fn: Callable[[], object]) -> str:
    with pytest.raises(SecAggError) as e:
        fn()
    assert str(e.value)  # a message, not an empty error
    return e.value.code


def advertised(
    n: int, session: str = S, seed: int = 0
) -> tuple[ServerSession, dict[str, AgentSession], dict[str, Roster]]:
    p = SecAggParams()
    srv = ServerSession(p, session, random.Random(seed))
    agents = {f"a{i}": AgentSession(p, session, f"a{i}") for i in range(n)}
    for a, s in agents.items():
        srv.add_keys(a, s.advertise())
    return srv, agents, srv.close_keys()


def masked(
    n: int, drop_after_advertise: tuple[str, ...] = ()
) -> tuple[ServerSession, dict[str, AgentSession], dict[str, dict[str, bytes]]]:
    srv, agents, rosters = advertised(n)
    sent = {}
    for a, s in agents.items():
        if a not in drop_after_advertise:
            sent[a] = s.share_keys(rosters[a])
            srv.add_shares(a, sent[a])
    fwd = srv.close_shares()
    for a in fwd:
        agents[a].receive_shares(fwd[a])
        srv.add_masked(a, agents[a].mask(np.linspace(-1, 1, 16), 50))
    return srv, agents, sent


def test_agent_refuses_bad_unmask_requests() -> None:
    srv, agents, _ = masked(10, drop_after_advertise=("a3",))
    u3, dropped = srv.close_masked()
    assert dropped == []
    a = next(x for x in u3 if "a3" in srv.neighbours(x))
    s = agents[a]
    t = srv.threshold
    assert (
        code_of(
            lambda: s.unmask(
                u3[: t - 1] if a in u3[: t - 1] else [a, *[x for x in u3 if x != a][: t - 2]], []
            )
        )
        == "secagg-too-few"
    )
    others = [x for x in u3 if x != a]
    assert code_of(lambda: s.unmask(u3, [others[0]])) == "secagg-refused"  # overlap
    assert code_of(lambda: s.unmask(others, [a])) == "secagg-refused"  # itself as dropped
    assert code_of(lambda: s.unmask(u3, ["a3"])) == "secagg-refused"  # a3 never shared: not in U2
    assert code_of(lambda: s.unmask([*u3, "a3"], [])) == "secagg-refused"
    assert code_of(lambda: s.unmask([*u3, u3[0]], [])) == "secagg-refused"
    assert code_of(lambda: s.unmask("a0", [])) == "secagg-bad-input"
    b, sk = s.unmask(u3, [])  # the refusals consumed nothing
    assert a in b and sk == {}
    assert code_of(lambda: s.unmask(u3, [])) == "secagg-replay"
    assert code_of(lambda: s.unmask(u3[:-1], [u3[-1]])) == "secagg-replay"


def test_server_refuses_hostile_shares() -> None:
    srv, agents, rosters = advertised(10)
    sh = {a: s.share_keys(rosters[a]) for a, s in agents.items()}
    a = "a0"
    non = next(x for x in agents if x != a and x not in srv.neighbours(a))
    some = next(iter(sh[a]))
    assert code_of(lambda: srv.add_shares(a, {**sh[a], non: sh[a][some]})) == "secagg-not-neighbour"
    assert (
        code_of(lambda: srv.add_shares(a, {**sh[a], "nobody": sh[a][some]}))
        == "secagg-unknown-agent"
    )
    assert code_of(lambda: srv.add_shares("nobody", sh[a])) == "secagg-unknown-agent"
    short = dict(sh[a])
    short.pop(some)
    assert code_of(lambda: srv.add_shares(a, short)) == "secagg-bad-share"
    assert (
        code_of(lambda: srv.add_shares(a, {**sh[a], some: sh[a][some][:-1]})) == "secagg-bad-share"
    )
    # a ciphertext moved to another recipient's slot
    other = next(x for x in sh[a] if x != some)
    assert code_of(lambda: srv.add_shares(a, {**sh[a], some: sh[a][other]})) == "secagg-replay"
    # replayed from another session (same agent ids, same recipient)
    _, agents2, rosters2 = advertised(10, session="run-9:1:1")
    old = agents2[a].share_keys(rosters2[a])
    if some in old:
        assert code_of(lambda: srv.add_shares(a, {**sh[a], some: old[some]})) == "secagg-replay"
    srv.add_shares(a, sh[a])
    assert code_of(lambda: srv.add_shares(a, sh[a])) == "secagg-replay"  # duplicate
    assert code_of(lambda: srv.add_masked(a, np.zeros(3, np.uint32))) == "secagg-phase"


def test_agent_refuses_tampered_and_replayed_ciphertexts() -> None:
    srv, agents, rosters = advertised(6)
    sh = {a: s.share_keys(rosters[a]) for a, s in agents.items()}
    # tampered in transit (the aggregator cannot see it): AEAD fails at the recipient
    for a in agents:
        srv.add_shares(a, sh[a])
    fwd = srv.close_shares()
    r = "a1"
    sender = next(iter(fwd[r]))
    ct = bytearray(fwd[r][sender])
    ct[-20] ^= 1
    assert (
        code_of(lambda: agents[r].receive_shares({**fwd[r], sender: bytes(ct)}))
        == "secagg-bad-share"
    )
    # a share from another session, same sender and recipient
    _, agents2, rosters2 = advertised(6, session="run-9:1:1")
    old = agents2[sender].share_keys(rosters2[sender])
    if r in old:
        assert (
            code_of(lambda: agents[r].receive_shares({**fwd[r], sender: old[r]})) == "secagg-replay"
        )
    # a share addressed to another agent
    other = next(x for x in fwd if x != r and sender in fwd[x])
    assert (
        code_of(lambda: agents[r].receive_shares({sender: fwd[other][sender]})) == "secagg-replay"
    )
    assert (
        code_of(lambda: agents[r].receive_shares({"zz": fwd[r][sender]})) == "secagg-not-neighbour"
    )
    assert code_of(lambda: agents[r].receive_shares({r: fwd[r][sender]})) == "secagg-not-neighbour"
    agents[r].receive_shares(fwd[r])  # the honest forward still works after refusals


def test_wrong_keys_and_rosters_refused() -> None:
    for bad in (b"x" * 31, b"x" * 33, "x" * 32, None):
        with pytest.raises(SecAggError) as e:
            PublicKeys(bad, bytes(32), bytes(32))  # type: ignore[arg-type]
        assert e.value.code == "secagg-bad-key"
    p = SecAggParams()
    srv = ServerSession(p, S)
    keys = AgentSession(p, S, "a").advertise()
    srv.add_keys("a", keys)
    assert code_of(lambda: srv.add_keys("a", keys)) == "secagg-replay"
    assert code_of(lambda: srv.add_keys("b", keys)) == "secagg-bad-key"  # copied keys
    assert code_of(lambda: srv.add_keys("c", "keys")) == "secagg-bad-key"  # type: ignore[arg-type]
    # a low-order point as a neighbour's key: refused by the agent at key agreement
    ag = AgentSession(p, S, "me")
    ag.advertise()
    zero = PublicKeys(bytes(32), bytes(32), bytes(32))
    roster = Roster(S, 2, {"x": zero}, {"me": 1, "x": 2})
    assert code_of(lambda: ag.share_keys(roster)) == "secagg-bad-key"
    good = AgentSession(p, S, "x").advertise()
    assert (
        code_of(lambda: ag.share_keys(Roster(S, 1, {"x": good}, {"me": 1, "x": 2})))
        == "secagg-params"
    )
    assert (
        code_of(lambda: ag.share_keys(Roster("other", 2, {"x": good}, {"me": 1, "x": 2})))
        == "secagg-replay"
    )
    assert (
        code_of(lambda: ag.share_keys(Roster(S, 2, {"x": good}, {"me": 1, "x": 3})))
        == "secagg-bad-input"
    )
    assert (
        code_of(lambda: ag.share_keys(Roster(S, 2, {"me": good}, {"me": 1}))) == "secagg-bad-input"
    )
    assert len(ag.share_keys(Roster(S, 2, {"x": good}, {"me": 1, "x": 2}))) == 1


def test_masked_vector_checks() -> None:
    srv, agents, rosters = advertised(4)
    for a, s in agents.items():
        srv.add_shares(a, s.share_keys(rosters[a]))
    fwd = srv.close_shares()
    for a in fwd:
        agents[a].receive_shares(fwd[a])
    s = agents["a0"]
    assert code_of(lambda: s.mask(np.array([1.0, np.nan]), 1)) == "secagg-bad-input"
    assert code_of(lambda: s.mask(np.zeros((2, 2)), 1)) == "secagg-bad-input"
    assert code_of(lambda: s.mask(np.array(["a"]), 1)) == "secagg-bad-input"
    assert code_of(lambda: s.mask(np.zeros(4), -1)) == "secagg-bad-input"
    assert code_of(lambda: s.mask(np.zeros(4), float("inf"))) == "secagg-bad-input"
    assert code_of(lambda: s.mask(np.zeros(4), True)) == "secagg-bad-input"
    v = np.linspace(-20, 20, 4)  # beyond clip: clipped in the agent's copy, not in place
    y = s.mask(v, 3)
    np.testing.assert_array_equal(v, np.linspace(-20, 20, 4))
    assert y.dtype == np.uint32 and y.shape == (5,)
    assert code_of(lambda: s.mask(np.zeros(4), 3)) == "secagg-phase"
    srv.add_masked("a0", y)
    assert code_of(lambda: srv.add_masked("a0", y)) == "secagg-replay"
    assert code_of(lambda: srv.add_masked("a1", np.zeros(6, np.uint32))) == "secagg-bad-input"
    assert code_of(lambda: srv.add_masked("a1", y.astype(np.int64))) == "secagg-bad-input"
    assert code_of(lambda: srv.add_masked("a1", y.astype(np.float32))) == "secagg-bad-input"
    assert code_of(lambda: srv.add_masked("a1", y.astype(">u4"))) == "secagg-bad-input"
    assert code_of(lambda: srv.add_masked("a1", y.reshape(1, 5))) == "secagg-bad-input"
    assert code_of(lambda: srv.add_masked("zz", y)) == "secagg-unknown-agent"
    fixed = ServerSession(SecAggParams(), S, vector_length=7)
    assert fixed.vector_length == 7


def run_to_unmask(
    n: int,
) -> tuple[ServerSession, dict[str, AgentSession], list[str], dict[str, np.ndarray[Any, Any]]]:
    srv, agents, rosters = advertised(n)
    for a, s in agents.items():
        srv.add_shares(a, s.share_keys(rosters[a]))
    fwd = srv.close_shares()
    xs = {}
    for a in fwd:
        agents[a].receive_shares(fwd[a])
        xs[a] = np.arange(10, dtype=np.float64) / (2 + int(a[1:]))
        srv.add_masked(a, agents[a].mask(xs[a], 1000))
    u3, _ = srv.close_masked()
    return srv, agents, u3, xs


def test_wrong_shamir_share_detected_and_tolerated() -> None:
    srv, agents, u3, xs = run_to_unmask(5)  # k = 4 (complete), t = 3, 5 holders each
    assert srv.threshold == 3
    liar = "a2"
    for a in u3:
        b, sk = agents[a].unmask(u3, [])
        if a == liar:
            b = {o: bytes(x ^ 0x5A for x in v) for o, v in b.items()}
        srv.add_unmask(a, b, sk)
    total, weight, _ = srv.finish()
    assert np.abs(total - sum(xs.values())).max() <= srv.params.error_bound(5)
    assert liar in srv.bad_senders and len(srv.bad_senders) == 1


def test_wrong_shamir_shares_beyond_tolerance_fail_naming_senders() -> None:
    srv, agents, u3, _ = run_to_unmask(5)
    liars = {"a1", "a3", "a4"}  # 2 honest holders left, t = 3
    for a in u3:
        b, sk = agents[a].unmask(u3, [])
        if a in liars:
            b = {o: bytes(16) for o in b}
        srv.add_unmask(a, b, sk)
    with pytest.raises(SecAggError) as e:
        srv.finish()
    assert e.value.code == "secagg-bad-share"
    assert all(x in str(e.value) for x in liars)
    assert srv.phase == "failed"


def test_hostile_unmask_replies() -> None:
    srv, agents, u3, _ = run_to_unmask(4)
    a = u3[0]
    b, sk = agents[a].unmask(u3, [])
    owner = next(iter(b))
    assert (
        code_of(lambda: srv.add_unmask(a, {**b, "nobody": b[owner]}, sk)) == "secagg-unknown-agent"
    )
    assert code_of(lambda: srv.add_unmask(a, b, {u3[1]: bytes(32)})) == "secagg-unknown-agent"
    assert code_of(lambda: srv.add_unmask(a, {owner: b[owner][:8]}, sk)) == "secagg-bad-share"
    assert code_of(lambda: srv.add_unmask("zz", b, sk)) == "secagg-unknown-agent"
    srv.add_unmask(a, b, sk)
    assert code_of(lambda: srv.add_unmask(a, b, sk)) == "secagg-replay"


def test_calls_out_of_phase() -> None:
    p = SecAggParams()
    ag = AgentSession(p, S, "a")
    assert code_of(lambda: ag.mask(np.zeros(3), 1)) == "secagg-phase"
    assert code_of(lambda: ag.receive_shares({})) == "secagg-phase"
    assert code_of(lambda: ag.unmask(["a"], [])) == "secagg-phase"
    ag.advertise()
    assert code_of(ag.advertise) == "secagg-phase"
    srv = ServerSession(p, S)
    assert code_of(lambda: srv.add_shares("a", {})) == "secagg-phase"
    assert code_of(srv.close_shares) == "secagg-phase"
    assert code_of(srv.close_masked) == "secagg-phase"
    assert code_of(srv.finish) == "secagg-phase"
    assert code_of(lambda: srv.add_unmask("a", {}, {})) == "secagg-phase"
    assert code_of(lambda: AgentSession(p, "", "a")) == "secagg-bad-input"
    assert code_of(lambda: ServerSession(p, S, vector_length=0)) == "secagg-params"
    assert (
        code_of(lambda: flatten_update({"a": np.zeros(2)}, {"b": np.zeros(2)}))
        == "secagg-bad-input"
    )
    assert (
        code_of(lambda: flatten_update({"a": np.zeros(3)}, {"a": np.zeros(2)}))
        == "secagg-bad-input"
    )
    assert code_of(lambda: apply_update({"a": np.zeros(2)}, np.zeros(3), 1.0)) == "secagg-bad-input"
    assert code_of(lambda: apply_update({"a": np.zeros(2)}, np.zeros(2), 0.0)) == "secagg-bad-input"


def _garbage(rng: random.Random) -> object:
    kind = rng.randrange(10)
    if kind == 0:
        return None
    if kind == 1:
        return rng.randbytes(rng.choice([0, 1, 16, 31, 32, 33, CIPHERTEXT_BYTES, 200]))
    if kind == 2:
        return rng.choice(["", "a0", "a1", "x" * 300, "\ud800", "a9"])
    if kind == 3:
        return rng.randint(-5, 5)
    if kind == 4:
        keys: list[object] = ["", "a0", "a1", "a5", 3, None, b"a1", "x" * 300]
        return {rng.choice(keys): _garbage(rng) for _ in range(rng.randrange(4))}
    if kind == 5:
        return [f"a{rng.randrange(8)}" for _ in range(rng.randrange(6))]
    if kind == 6:
        dt = rng.choice([np.uint32, np.int64, np.float64, np.float32, np.uint8, object])
        return np.zeros(rng.choice([0, 1, 5, 17]), dtype=dt)
    if kind == 7:
        return float(rng.choice(["nan", "inf", "-1", "2.5"]))
    if kind == 8:
        return PublicKeys(rng.randbytes(32), rng.randbytes(32), rng.randbytes(32))
    return Roster(S, rng.randint(0, 9), {}, {})


def test_random_garbage_only_raises_secagg_error() -> None:
    """Garbage to every method in every phase of both sides: a SecAggError or success only."""
    rng = random.Random(1234)
    seen: set[tuple[str, str]] = set()
    for _ in range(300):
        stop = rng.randrange(5)
        server, agents, rosters = advertised(4, seed=rng.randrange(100))
        if stop >= 1:
            shares = {a: s.share_keys(rosters[a]) for a, s in agents.items()}
            for a in agents:
                server.add_shares(a, shares[a])
        if stop >= 2:
            fwd = server.close_shares()
            for a in fwd:
                agents[a].receive_shares(fwd[a])
        if stop >= 3:
            for a in agents:
                server.add_masked(a, agents[a].mask(np.full(3, 0.1), 10))
        if stop >= 4:
            server.close_masked()
        agent = agents["a0"]
        seen.add((server.phase, agent.phase))
        _fuzz(server, agent, rng)
    assert len(seen) == 5  # every pair of phases was fuzzed


def _fuzz(server: ServerSession, agent: AgentSession, rng: random.Random) -> None:
    g = _garbage
    calls: list[Callable[[], object]] = [
        lambda: server.add_keys(g(rng), g(rng)),  # type: ignore[arg-type]
        lambda: server.add_shares(g(rng), g(rng)),  # type: ignore[arg-type]
        lambda: server.add_shares("a1", g(rng)),  # type: ignore[arg-type]
        lambda: server.add_masked(g(rng), g(rng)),  # type: ignore[arg-type]
        lambda: server.add_masked("a1", g(rng)),  # type: ignore[arg-type]
        lambda: server.add_unmask("a1", g(rng), g(rng)),  # type: ignore[arg-type]
        lambda: agent.share_keys(g(rng)),  # type: ignore[arg-type]
        lambda: agent.receive_shares(g(rng)),  # type: ignore[arg-type]
        lambda: agent.mask(g(rng), g(rng)),  # type: ignore[arg-type]
        lambda: agent.unmask(g(rng), g(rng)),  # type: ignore[arg-type]
    ]
    for _ in range(5):
        try:
            rng.choice(calls)()
        except SecAggError as e:
            assert e.code in SecAggError.CODES and str(e)


def test_wrong_mask_key_share_of_dropped_agent_detected() -> None:
    srv, agents, rosters = advertised(6)  # complete graph, k = 5, t = 4
    for a, s in agents.items():
        srv.add_shares(a, s.share_keys(rosters[a]))
    fwd = srv.close_shares()
    xs = {}
    for a in fwd:
        agents[a].receive_shares(fwd[a])
        if a != "a5":  # a5 drops after sharing its keys
            xs[a] = np.full(7, 0.5)
            srv.add_masked(a, agents[a].mask(xs[a], 1000))
    u3, dropped = srv.close_masked()
    assert dropped == ["a5"] and srv.threshold == 4
    for a in u3:
        b, sk = agents[a].unmask(u3, dropped)
        assert set(sk) == {"a5"}
        if a == "a0":
            sk = {"a5": bytes(reversed(sk["a5"]))}
        srv.add_unmask(a, b, sk)
    total, weight, _ = srv.finish()
    assert np.abs(total - 2.5).max() <= srv.params.error_bound(5)
    assert set(srv.bad_senders) == {"a0"} and "a5" in srv.bad_senders["a0"]


@pytest.mark.parametrize("missing", ["Crypto", "cryptography"])
def test_without_the_privacy_extra_the_import_names_it(
    missing: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib
    import sys

    for name in [m for m in sys.modules if m == missing or m.startswith(missing + ".")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.delitem(sys.modules, "fedstack.privacy.secagg")
    monkeypatch.setitem(sys.modules, missing, None)  # import fails
    with pytest.raises(ImportError, match=r"pip install 'fedstack\[privacy\]'"):
        importlib.import_module("fedstack.privacy.secagg")
