"""SecAgg+ library (fedstack.privacy.secagg): correctness, dropouts, threshold, graph, masking."""

from __future__ import annotations

import math
import random
from collections.abc import Iterable
from typing import Any

import numpy as np
import pytest

from fedstack.privacy import secagg
from fedstack.privacy.secagg import (
    AgentSession,
    PublicKeys,
    SecAggError,
    SecAggParams,
    ServerSession,
    apply_update,
    flatten_update,
    neighbour_graph,
)
from fedstack.types import Weights

SESSION = "run-1:3:0"


class Harness:
    """Drives one session; agents listed in ``drop_*`` stop after that step."""

    def __init__(self, n: int, params: SecAggParams | None = None, seed: int = 0) -> None:
        self.params = params or SecAggParams()
        self.server = ServerSession(self.params, SESSION, random.Random(seed))
        self.ids = [f"agent-{i:03d}" for i in range(n)]
        self.agents = {a: AgentSession(self.params, SESSION, a) for a in self.ids}
        self.masked: dict[str, np.ndarray[Any, Any]] = {}

    def keys(self, drop: Iterable[str] = ()) -> None:
        for a, s in self.agents.items():
            self.server.add_keys(a, s.advertise())
        rosters = self.server.close_keys()
        gone = set(drop)
        for a, s in self.agents.items():
            if a not in gone:
                self.server.add_shares(a, s.share_keys(rosters[a]))
        self.live = [a for a in self.ids if a not in gone]

    def shares(self) -> None:
        fwd = self.server.close_shares()
        for a in self.live:
            self.agents[a].receive_shares(fwd[a])

    def mask(
        self,
        vectors: dict[str, np.ndarray[Any, Any]],
        weights: dict[str, float],
        drop: Iterable[str] = (),
    ) -> None:
        gone = set(drop)
        self.live = [a for a in self.live if a not in gone]
        for a in self.live:
            y = self.agents[a].mask(vectors[a], weights[a])
            self.masked[a] = y
            self.server.add_masked(a, y)

    def unmask(self, drop: Iterable[str] = ()) -> tuple[list[str], list[str]]:
        u3, dropped = self.server.close_masked()
        gone = set(drop)
        for a in u3:
            if a not in gone:
                self.server.add_unmask(a, *self.agents[a].unmask(u3, dropped))
        return u3, dropped


def quantise(v: np.ndarray[Any, Any], p: SecAggParams) -> np.ndarray[Any, Any]:
    """The protocol's quantiser, written out independently of the library."""
    levels = 2**p.quant_bits - 1
    q: np.ndarray[Any, Any] = np.rint(
        (np.clip(v, -p.clip, p.clip) + p.clip) * levels / (2 * p.clip)
    ).astype(np.int64)
    return q


def encoded(x: np.ndarray[Any, Any], n_samples: float, p: SecAggParams) -> np.ndarray[Any, Any]:
    w = min(n_samples, p.max_weight) / p.max_weight
    return np.concatenate([w * x, [w * p.clip]])


def test_ten_agents_weighted_fedavg_within_bound() -> None:
    rng = np.random.default_rng(7)
    p = SecAggParams()
    base = {"w": rng.normal(0, 1, (20, 30)), "b": rng.normal(0, 1, 30)}
    h = Harness(10, p)
    models = {a: {k: v + rng.normal(0, 0.5, v.shape) for k, v in base.items()} for a in h.ids}
    counts = {a: float(rng.integers(20, 1500)) for a in h.ids}  # some above max_weight
    deltas = {a: flatten_update(models[a], base) for a in h.ids}
    h.keys()
    h.shares()
    h.mask(deltas, counts)
    h.unmask()
    total, weight, u3 = h.server.finish()
    assert u3 == sorted(h.ids)
    w = {a: min(counts[a], p.max_weight) / p.max_weight for a in h.ids}
    exp_total = sum(w[a] * deltas[a] for a in h.ids)
    exp_weight = sum(w.values())
    bound = p.error_bound(10)
    err = np.abs(total - exp_total).max()
    assert 0 < err <= bound
    assert err > 0.2 * bound  # the bound is not loose by orders of magnitude
    assert abs(weight - exp_weight) <= bound / p.clip
    # the global model: weighted FedAvg of the models, within the propagated bound
    glob = apply_update(base, total, weight)
    fedavg = {k: sum(w[a] * models[a][k] for a in h.ids) / exp_weight for k in base}
    tol = bound / (weight) + np.abs(exp_total).max() * (bound / p.clip) / (weight * exp_weight)
    for k in base:
        assert glob[k].dtype == base[k].dtype and glob[k].shape == base[k].shape
        assert np.abs(glob[k] - fedavg[k]).max() <= tol * 1.000001


def test_float32_model_keeps_dtype() -> None:
    base: Weights = {"a": np.zeros((3, 4), dtype=np.float32), "n": np.array([5], dtype=np.int64)}
    upd: Weights = {"a": np.full((3, 4), 0.5, dtype=np.float32), "n": np.array([7], dtype=np.int64)}
    vec = flatten_update(upd, base)
    assert vec.dtype == np.float64 and vec.size == 13 and vec[-1] == 2
    out = apply_update(base, vec * 2, 2.0)
    assert out["a"].dtype == np.float32 and np.allclose(out["a"], 0.5)
    assert out["n"].dtype == np.int64 and out["n"][0] == 7


def exact_expected(
    h: Harness, xs: dict[str, np.ndarray[Any, Any]], counts: dict[str, float], who: list[str]
) -> np.ndarray[Any, Any]:
    p = h.params
    q = sum(quantise(encoded(xs[a], counts[a], p), p) for a in who)
    assert isinstance(q, np.ndarray)
    step = 2.0 * p.clip / (2**p.quant_bits - 1)
    out: np.ndarray[Any, Any] = q.astype(np.float64) * step - len(who) * p.clip
    return out


def test_drop_after_share_keys_and_after_mask_gives_exact_sum_of_survivors() -> None:
    rng = np.random.default_rng(3)
    h = Harness(10, seed=11)
    xs = {a: rng.normal(0, 2, 500) for a in h.ids}
    counts = {a: float(rng.integers(1, 900)) for a in h.ids}
    late = h.ids[2:5]  # shared keys, never sent a masked input
    silent = h.ids[7]  # sent its masked input, never answers unmask
    h.keys()
    h.shares()
    h.mask(xs, counts, drop=late)
    u3, dropped = h.unmask(drop=[silent])
    assert dropped == sorted(late) and len(u3) == 7 and silent in u3
    total, weight, survivors = h.server.finish()
    assert survivors == u3
    exp = exact_expected(h, xs, counts, u3)
    np.testing.assert_array_equal(np.append(total, weight * h.params.clip), exp)
    assert h.server.bad_senders == {}


def test_drop_after_advertise_is_left_out() -> None:
    rng = np.random.default_rng(4)
    h = Harness(9, seed=5)
    xs = {a: rng.uniform(-1, 1, 64) for a in h.ids}
    counts = dict.fromkeys(h.ids, 100.0)
    h.keys(drop=[h.ids[0], h.ids[4]])
    h.shares()
    assert h.server.u2 == sorted(set(h.ids) - {h.ids[0], h.ids[4]})
    h.mask(xs, counts, drop=[h.ids[8]])
    u3, dropped = h.unmask()
    assert dropped == [h.ids[8]]
    total, weight, _ = h.server.finish()
    exp = exact_expected(h, xs, counts, u3)
    np.testing.assert_array_equal(np.append(total, weight * h.params.clip), exp)


def test_small_sessions_use_complete_graph() -> None:
    for n in (2, 3, 5):
        h = Harness(n)
        xs = {a: np.full(8, 0.25) for a in h.ids}
        h.keys()
        assert h.server.degree == n - 1
        h.shares()
        h.mask(xs, dict.fromkeys(h.ids, 1000.0))
        h.unmask()
        total, weight, _ = h.server.finish()
        assert abs(weight - n) <= h.params.error_bound(n) / h.params.clip
        assert np.abs(total - 0.25 * n).max() <= h.params.error_bound(n)


def arrays_in(obj: object, seen: set[int] | None = None) -> list[np.ndarray[Any, Any]]:
    """Every numpy array reachable from ``obj``'s attributes and containers."""
    seen = seen if seen is not None else set()
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, np.ndarray):
        return [obj]
    out: list[np.ndarray[Any, Any]] = []
    if isinstance(obj, dict):
        for v in obj.values():
            out += arrays_in(v, seen)
    elif isinstance(obj, list | tuple | set):
        for v in obj:
            out += arrays_in(v, seen)
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):
        for v in vars(obj).values():
            out += arrays_in(v, seen)
    return out


@pytest.fixture
def prg_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = secagg._add_prg

    def counting(acc: np.ndarray[Any, Any], seed: bytes, sign: int) -> None:
        calls.append(acc.size)
        real(acc, seed, sign)

    monkeypatch.setattr(secagg, "_add_prg", counting)
    return calls


def test_below_threshold_close_masked_fails_without_unmasking(prg_calls: list[int]) -> None:
    rng = np.random.default_rng(5)
    h = Harness(10)
    xs = {a: rng.normal(0, 1, 200) for a in h.ids}
    h.keys()
    h.shares()
    t = h.server.threshold
    assert t == 5
    h.mask(xs, dict.fromkeys(h.ids, 10.0), drop=h.ids[: 10 - (t - 1)])
    prg_calls.clear()
    with pytest.raises(SecAggError) as e:
        h.server.close_masked()
    assert e.value.code == "secagg-too-few"
    assert prg_calls == []  # no mask was removed: no partial sum exists
    assert h.server.phase == "failed"
    assert arrays_in(h.server) == []  # not even the masked sum is kept
    with pytest.raises(SecAggError) as e2:
        h.server.finish()
    assert e2.value.code == "secagg-phase"


def test_too_few_unmask_answers_finish_fails_without_unmasking(prg_calls: list[int]) -> None:
    rng = np.random.default_rng(6)
    h = Harness(10)
    xs = {a: rng.normal(0, 1, 200) for a in h.ids}
    h.keys()
    h.shares()
    h.mask(xs, dict.fromkeys(h.ids, 10.0), drop=h.ids[:2])
    qs = [quantise(encoded(xs[a], 10.0, h.params), h.params) for a in h.ids[2:]]
    held = arrays_in(h.server)
    assert len(held) == 1  # the running masked sum only
    plain = sum(qs)
    assert isinstance(plain, np.ndarray)
    assert not np.array_equal(held[0].astype(np.int64), plain % 2**32)
    u3, _ = h.server.close_masked()
    for a in u3[:3]:  # t = 5 answers needed
        h.server.add_unmask(a, *h.agents[a].unmask(u3, h.ids[:2]))
    assert not h.server.can_finish()
    prg_calls.clear()
    with pytest.raises(SecAggError) as e:
        h.server.finish()
    assert e.value.code == "secagg-too-few"
    assert prg_calls == []
    assert arrays_in(h.server) == [] and h.server.phase == "failed"


def test_too_few_keys_or_shares() -> None:
    h = Harness(1)
    h.server.add_keys(h.ids[0], h.agents[h.ids[0]].advertise())
    with pytest.raises(SecAggError) as e:
        h.server.close_keys()
    assert e.value.code == "secagg-too-few"
    h2 = Harness(4)
    h2.keys(drop=h2.ids[1:])
    with pytest.raises(SecAggError) as e:
        h2.server.close_shares()
    assert e.value.code == "secagg-too-few"


def test_masked_vectors_uncorrelated_and_uniform() -> None:
    rng = np.random.default_rng(8)
    P = 100_000
    h = Harness(3)
    xs = {a: rng.normal(0, 2, P) + np.linspace(-3, 3, P) for a in h.ids}
    h.keys()
    h.shares()
    h.mask(xs, dict.fromkeys(h.ids, 500.0))
    for a in h.ids:
        y = h.masked[a].astype(np.float64)
        q = quantise(encoded(xs[a], 500.0, h.params), h.params).astype(np.float64)
        assert abs(np.corrcoef(y, q)[0, 1]) < 0.05
        assert abs(np.corrcoef(y[:-1], xs[a])[0, 1]) < 0.05
        # uniform over [0, 2**32): 16 equal bins, each within 6 sigma of P/16
        counts = np.bincount((h.masked[a] >> 28).astype(np.int64), minlength=16)
        sigma = math.sqrt(P / 16 * (15 / 16))
        assert np.abs(counts - P / 16).max() < 6 * sigma
        assert abs(y.mean() / 2**32 - 0.5) < 0.01
    # the same input masked in another session gives an unrelated vector
    h2 = Harness(3)
    h2.keys()
    h2.shares()
    h2.mask(xs, dict.fromkeys(h.ids, 500.0))
    a = h.ids[0]
    assert abs(np.corrcoef(h.masked[a].astype(float), h2.masked[a].astype(float))[0, 1]) < 0.05


def test_graph_degree_grows_like_log_n_and_each_agent_shares_k() -> None:
    p = SecAggParams()
    for n in (10, 100, 1000):
        k = p.degree(n)
        assert k == 2 * math.ceil(math.log2(n)) and k % 2 == 0
        assert k <= 2 * math.log2(n) + 2
        ids = [f"a{i}" for i in range(n)]
        g = neighbour_graph(ids, k, random.Random(n))
        assert all(len(set(v)) == k and a not in v for a, v in g.items())
        assert all(a in g[b] for a, v in g.items() for b in v)  # symmetric
        srv = ServerSession(p, SESSION, random.Random(1))
        for i, a in enumerate(ids):
            srv.add_keys(
                a, PublicKeys(i.to_bytes(32, "big"), (i + n).to_bytes(32, "big"), bytes(32))
            )
        rosters = srv.close_keys()
        t = p.holders_threshold(n)
        assert t == (k + 1) // 2 + 1
        for r in rosters.values():
            assert len(r.neighbours) == k and r.threshold == t
            assert sorted(r.index.values()) == list(range(1, k + 2))
    for n in (10, 100):
        h = Harness(n)
        for a, s in h.agents.items():
            h.server.add_keys(a, s.advertise())
        rosters = h.server.close_keys()
        for a, s in h.agents.items():
            shares = s.share_keys(rosters[a])
            assert len(shares) == p.degree(n) == len(set(shares))
    # the ring is shuffled by the rng: two seeds give different graphs
    ids = [f"a{i}" for i in range(50)]
    assert neighbour_graph(ids, 12, random.Random(1)) != neighbour_graph(ids, 12, random.Random(2))


def test_params_validation_and_config_round_trip() -> None:
    p = SecAggParams(clip=2.0, quant_bits=20, neighbours=6, threshold=0.6, min_survivors=3)
    assert SecAggParams.from_config(p.to_config()) == p
    assert p.max_agents() == (2**32 - 1) // (2**20 - 1)
    assert p.error_bound(4) == pytest.approx(4 * (4.0 / (2**20 - 1)) / 2)
    assert p.degree(100) == 6 and p.degree(5) == 4
    assert p.holders_threshold(100) == math.floor(0.6 * 7) + 1
    bad: list[dict[str, Any]] = [
        {"clip": 0},
        {"clip": float("nan")},
        {"quant_bits": 32},
        {"quant_bits": 1.5},
        {"neighbours": 3},
        {"neighbours": True},
        {"threshold": 0.3},
        {"min_survivors": 1},
        {"timeout": -1},
        {"max_weight": "10"},
        {"bogus": 1},
    ]
    for d in bad:
        with pytest.raises(SecAggError) as e:
            SecAggParams.from_config(d)
        assert e.value.code == "secagg-params", d
    with pytest.raises(SecAggError) as e:
        SecAggParams.from_config(["clip"])  # type: ignore[arg-type]
    assert e.value.code == "secagg-params"


def test_overflow_refused_with_the_max_agents() -> None:
    p = SecAggParams(quant_bits=30)
    assert p.max_agents() == 4
    srv = ServerSession(p, SESSION)
    for i in range(4):
        srv.add_keys(f"a{i}", AgentSession(p, SESSION, f"a{i}").advertise())
    with pytest.raises(SecAggError) as e:
        srv.add_keys("a4", AgentSession(p, SESSION, "a4").advertise())
    assert e.value.code == "secagg-params" and "at most 4 agents" in str(e.value)
    with pytest.raises(SecAggError):
        p.check_agents(5)
    p.check_agents(4)


def components(h: Harness, members: set[str]) -> list[set[str]]:
    """Connected components of the session graph restricted to ``members`` (test's own BFS)."""
    out: list[set[str]] = []
    for a in sorted(members):
        if any(a in c for c in out):
            continue
        comp, todo = {a}, [a]
        while todo:
            for b in h.server.neighbours(todo.pop()):
                if b in members and b not in comp:
                    comp.add(b)
                    todo.append(b)
        out.append(comp)
    return out


def test_random_dropouts_exact_sum_or_clean_failure() -> None:
    """Random sessions with agents dropping at every step: the exact sum of U3 whenever it can
    be unmasked safely, else secagg-too-few at the first step that sees it (no unmasking)."""
    rng = random.Random(99)
    outcomes = {"ok": 0, "keys": 0, "masked": 0, "finish": 0}
    for trial in range(60):
        n = rng.randint(3, 14)
        h = Harness(n, seed=trial, params=SecAggParams(neighbours=rng.choice([None, 2, 4])))
        ids = h.ids
        gen = np.random.default_rng(trial)
        xs = {a: gen.uniform(-2, 2, 12) * (i + 1) / n for i, a in enumerate(ids)}
        counts = {a: float(rng.randint(0, 1200)) for a in ids}
        a_drop = set(rng.sample(ids, rng.randint(0, n // 3)))
        b_drop = set(rng.sample(ids, rng.randint(0, n // 2))) - a_drop
        c_drop = set(rng.sample(ids, rng.randint(0, n // 3))) - a_drop - b_drop
        u2 = set(ids) - a_drop
        u3 = u2 - b_drop
        h.keys(drop=a_drop)
        if len(u2) < 2:
            with pytest.raises(SecAggError) as e:
                h.server.close_shares()
            assert e.value.code == "secagg-too-few"
            outcomes["keys"] += 1
            continue
        h.shares()
        h.mask(xs, counts, drop=b_drop)
        t = h.server.threshold
        if len(u3) < max(2, t) or min(len(c) for c in components(h, u3)) < 2:
            with pytest.raises(SecAggError) as e:
                h.server.close_masked()
            assert e.value.code == "secagg-too-few" and h.server.phase == "failed"
            outcomes["masked"] += 1
            continue
        got_u3, dropped = h.unmask(drop=c_drop)
        assert set(got_u3) == u3 and set(dropped) == u2 - u3
        live = u3 - c_drop
        enough = all(len({u, *h.server.neighbours(u)} & live) >= t for u in u3) and all(
            len(set(h.server.neighbours(d)) & live) >= t for d in dropped
        )
        assert h.server.can_finish() == enough
        if not enough:
            with pytest.raises(SecAggError) as e:
                h.server.finish()
            assert e.value.code == "secagg-too-few"
            outcomes["finish"] += 1
            continue
        total, weight, survivors = h.server.finish()
        exp = exact_expected(h, xs, counts, survivors)
        np.testing.assert_array_equal(np.append(total, weight * h.params.clip), exp)
        outcomes["ok"] += 1
    assert min(outcomes["ok"], outcomes["masked"], outcomes["finish"]) >= 3, outcomes


def test_prg_is_the_aes_ctr_keystream() -> None:
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    n = 3 * secagg._CHUNK + 5  # blocks end mid-vector
    for seed in (bytes(range(16)), bytes(range(32))):
        whole = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor().update(bytes(4 * n))
        ks = np.frombuffer(whole, dtype="<u4")
        acc = np.zeros(n, dtype=np.uint32)
        secagg._add_prg(acc, seed, +1)
        np.testing.assert_array_equal(acc, ks)
        secagg._add_prg(acc, seed, -1)
        assert not acc.any()
        secagg._add_prg(acc, seed, -1)
        np.testing.assert_array_equal(acc, (-ks.astype(np.int64)) % 2**32)


def test_unmask_refused_when_the_survivors_split_into_a_small_group() -> None:
    # a ring (k = 2) of 8: dropping two opposite agents leaves two groups of three; dropping
    # the two neighbours of one agent leaves it alone: its update would be revealed
    p = SecAggParams(neighbours=2)
    h = Harness(8, p, seed=3)
    h.keys()
    h.shares()
    ring = [h.ids[0]]
    while len(ring) < 8:
        ring.append(next(b for b in h.server.neighbours(ring[-1]) if b not in ring))
    alone = ring[0]
    xs = {a: np.zeros(4) for a in h.ids}
    h.mask(xs, dict.fromkeys(h.ids, 1.0), drop=[ring[1], ring[-1]])
    with pytest.raises(SecAggError) as e:
        h.server.close_masked()
    assert e.value.code == "secagg-too-few" and "1 agent" in str(e.value)
    # the agent itself refuses too, whatever the aggregator does
    survivors = sorted(set(h.ids) - {ring[1], ring[-1]})
    with pytest.raises(SecAggError) as e:
        h.agents[alone].unmask(survivors, sorted([ring[1], ring[-1]]))
    assert e.value.code == "secagg-refused"


def test_error_bound_holds_for_random_parameters() -> None:
    rng = random.Random(5)
    worst = 0.0
    for trial in range(12):
        p = SecAggParams(
            clip=rng.choice([0.05, 0.5, 1.0, 3.0, 20.0]),
            quant_bits=rng.choice([8, 12, 16, 22, 26]),
            max_weight=rng.choice([1.0, 50.0, 1000.0]),
        )
        n = rng.randint(2, min(12, p.max_agents()))
        h = Harness(n, p, seed=trial)
        gen = np.random.default_rng(trial)
        counts = {a: float(gen.integers(0, int(2 * p.max_weight) + 2)) for a in h.ids}
        w = {a: min(counts[a], p.max_weight) / p.max_weight for a in h.ids}
        # inputs whose weighted values stay inside [-clip, clip] (the bound's domain)
        xs = {a: gen.uniform(-p.clip, p.clip, 300) for a in h.ids}
        h.keys()
        h.shares()
        h.mask(xs, counts)
        h.unmask()
        total, weight, _ = h.server.finish()
        bound = p.error_bound(n)
        err = float(np.abs(total - sum(w[a] * xs[a] for a in h.ids)).max())
        assert err <= bound * (1 + 1e-9), (p, n, err, bound)
        assert abs(weight - sum(w.values())) <= bound / p.clip * (1 + 1e-9)
        worst = max(worst, err / bound)
    assert worst > 0.3  # the bound is reached in order of magnitude
