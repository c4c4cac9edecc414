"""Central DP-FedAvg (fedstack.privacy.dp): clipping, the noise's standard deviation,
adaptive clipping, the agent-side clip-and-noise step, and what is refused."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from fedstack import AggregatorConfig
from fedstack.errors import ConfigError
from fedstack.privacy.dp import (
    CentralDP,
    DPSettings,
    clip_and_noise,
    distributed_noise_std,
    epsilon,
    max_rounds,
    value_noise_multiplier,
    wrap,
)
from fedstack.strategies import Update, create


def _round(
    dp: CentralDP, global_w: dict[str, Any], updates: list[dict[str, Any]], state: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    acc = dp.begin(global_w, state, round=1, rng=np.random.default_rng(0))
    for i, w in enumerate(updates):
        acc.add(Update(agent_id=f"a{i}", weights=w, num_samples=10 * (i + 1)))
    res = acc.result()
    return res.weights, res.state, res.metrics


def test_noise_has_the_configured_std_on_zero_updates() -> None:
    p, m, z, c = 50_000, 4, 1.3, 2.0
    dp = CentralDP(create("fedavg"), DPSettings(noise_multiplier=z, clip=c, delta=1e-5))
    zero = {"a": np.zeros(30_000), "b": np.zeros((200, 100))}  # 50,000 coordinates
    weights, state, metrics = _round(dp, zero, [zero] * m, dp.init_state(zero))
    released = np.concatenate([weights["a"].ravel(), weights["b"].ravel()])
    assert released.size == p
    want = z * c / m
    assert metrics["dp_noise_std"] == pytest.approx(want)
    # the sample std of P normals has standard error sigma / sqrt(2P): 5 of them
    assert abs(released.std() - want) < 5 * want / math.sqrt(2 * p)
    assert abs(released.mean()) < 5 * want / math.sqrt(p)
    assert metrics["num_updates"] == m and state["dp/rounds"] == 1
    # a second round draws fresh noise (not a replayed stream)
    again, _, _ = _round(dp, zero, [zero] * m, state)
    assert not np.array_equal(again["a"], weights["a"])


def test_updates_are_clipped_to_c_and_averaged_with_equal_weights() -> None:
    c = 2.0
    dp = CentralDP(create("fedavg"), DPSettings(noise_multiplier=0.0, clip=c, delta=1e-5))
    base: dict[str, Any] = {"w": np.full(4, 1.0, np.float32), "steps": np.array(7, np.int64)}
    rng = np.random.default_rng(1)
    deltas = []
    updates = []
    for norm in (1.0, 5.0, 10.0):
        d = rng.normal(size=4)
        d *= norm / np.linalg.norm(d)
        deltas.append(d)
        updates.append({"w": (base["w"] + d).astype(np.float32), "steps": np.array(99)})
    weights, _, metrics = _round(dp, base, updates, dp.init_state(base))
    # the float32 uploads differ from base + d by rounding; clip what was sent
    sent = [u["w"].astype(np.float64) - 1.0 for u in updates]
    clipped = [d * min(1.0, c / np.linalg.norm(d)) for d in sent]
    assert all(np.linalg.norm(x) <= c + 1e-12 for x in clipped)
    np.testing.assert_allclose(weights["w"], 1.0 + np.mean(clipped, axis=0), rtol=1e-6)
    assert weights["w"].dtype == np.float32
    assert int(weights["steps"]) == 7  # integer tensors are not released: the global value
    assert metrics["dp_clip"] == c and metrics["dp_noise_std"] == 0.0
    assert "dp_epsilon" not in metrics  # no noise: epsilon is infinite, not stored


def test_clip_and_noise_clips_then_adds_the_given_noise() -> None:
    rng = np.random.default_rng(2)
    d = np.arange(12, dtype=np.float32).reshape(3, 4)
    out = clip_and_noise(d, 1.5, 0.0, rng)
    assert out.shape == d.shape and out.dtype == np.float64
    assert np.linalg.norm(out) == pytest.approx(1.5)
    np.testing.assert_allclose(out, d / np.linalg.norm(d) * 1.5)
    small = np.full(5, 0.1)
    np.testing.assert_array_equal(clip_and_noise(small, 10.0, 0.0, rng), small)
    noisy = clip_and_noise(np.zeros(40_000), 1.0, 0.25, rng)
    assert abs(noisy.std() - 0.25) < 5 * 0.25 / math.sqrt(80_000)
    for bad in ((d, 0.0, 0.1), (d, 1.0, -1.0), (np.array([np.nan]), 1.0, 0.0)):
        with pytest.raises(ValueError):
            clip_and_noise(bad[0], bad[1], bad[2], rng)


def test_distributed_noise_of_the_survivors_sums_to_central_noise() -> None:
    z, c, m_min, p = 1.5, 2.0, 8, 20_000
    std = distributed_noise_std(z, c, m_min)
    assert std == pytest.approx(z * c / math.sqrt(m_min))
    rng = np.random.default_rng(3)
    # m_min agents with zero changes: the sum the aggregator unmasks is pure noise
    total = sum(clip_and_noise(np.zeros(p), c, std, rng) for _ in range(m_min))
    assert abs(np.std(total) - z * c) < 5 * z * c / math.sqrt(2 * p)
    with pytest.raises(ValueError):
        distributed_noise_std(z, c, 0)


def test_adaptive_clipping_moves_the_clip_to_the_target_quantile() -> None:
    norms = np.arange(1.0, 11.0)  # 10 updates with norms 1..10: the median is 5..6
    base = {"w": np.zeros(8)}
    direction = np.ones(8) / math.sqrt(8)
    updates = [{"w": n * direction} for n in norms]

    def run(settings: DPSettings, rounds: int) -> list[float]:
        dp = CentralDP(create("fedavg"), settings)
        state = dp.init_state(base)
        clips = [state["dp/clip"]]
        for _ in range(rounds):
            _, state, metrics = _round(dp, base, updates, state)
            clips.append(state["dp/clip"])
            assert metrics["dp_clip"] == clips[-2]  # the clip the round used
        return clips

    exact = run(
        DPSettings(noise_multiplier=0.0, clip=100.0, delta=1e-5, adaptive=True, clip_lr=0.2),
        60,
    )
    assert all(b < a for a, b in zip(exact[:25], exact[1:25], strict=False))  # all unclipped
    assert exact[1] == pytest.approx(100.0 * math.exp(-0.2 * (1.0 - 0.5)))
    assert 5.0 <= min(exact[-10:]) and max(exact[-10:]) <= 6.5
    low = run(
        DPSettings(noise_multiplier=0.0, clip=0.1, delta=1e-5, adaptive=True, target_quantile=0.9),
        60,
    )
    assert 9.0 <= low[-1] <= 11.0  # from below, towards the 90% quantile
    noisy = run(
        DPSettings(
            noise_multiplier=0.5, clip=100.0, delta=1e-5, adaptive=True, clip_count_stddev=0.5
        ),
        60,
    )
    assert 3.0 <= np.median(noisy[-10:]) <= 8.0


def test_adaptive_noise_multiplier_follows_andrew_et_al_and_refuses_undefined() -> None:
    assert value_noise_multiplier(1.0, 1.0) == pytest.approx((1.0 - 0.25) ** -0.5)
    assert value_noise_multiplier(0.0, 0.0) == 0.0
    with pytest.raises(ConfigError, match="dp_clip_count_stddev > 0.5"):
        value_noise_multiplier(1.0, 0.5)
    s = DPSettings(noise_multiplier=1.0, clip=1.0, delta=1e-5, adaptive=True, clip_count_stddev=2)
    dp = CentralDP(create("fedavg"), s)
    zero = {"w": np.zeros(10)}
    _, _, metrics = _round(dp, zero, [zero, zero], dp.init_state(zero))
    assert metrics["dp_noise_std"] == pytest.approx(value_noise_multiplier(1.0, 2.0) * 1.0 / 2)


def test_server_optimisers_step_on_the_noised_mean_only() -> None:
    dp = CentralDP(
        create("fedavgm", momentum=0.5), DPSettings(noise_multiplier=0.0, clip=1.0, delta=1e-5)
    )
    base = {"w": np.zeros(3)}
    state = dp.init_state(base)
    w1, state, _ = _round(dp, base, [{"w": np.array([3.0, 4.0, 0.0])}], state)
    np.testing.assert_allclose(w1["w"], [0.6, 0.8, 0.0])  # clipped to norm 1, eta 1
    w2, state, _ = _round(dp, w1, [{"w": w1["w"] + np.array([0.0, 0.0, 0.5])}], state)
    np.testing.assert_allclose(w2["w"], w1["w"] + 0.5 * np.array([0.6, 0.8, 0.0]) + [0, 0, 0.5])
    assert state["dp/rounds"] == 2 and "v/w" in state


def test_robust_and_individual_update_strategies_are_refused() -> None:
    s = DPSettings(noise_multiplier=1.0, clip=1.0, delta=1e-5)
    for name in ("median", "krum", "trimmed_mean", "scaffold", "fedbuff"):
        with pytest.raises(ConfigError, match=f"cannot wrap strategy '{name}'"):
            CentralDP(create(name), s)
    with pytest.raises(ConfigError, match="upload='model'"):
        CentralDP(create("fedsgd", upload="gradient"), s)
    from fedstack.aggregator import Aggregator

    with pytest.raises(ConfigError, match="cannot wrap strategy 'median'"):
        Aggregator(
            AggregatorConfig(
                strategy="median", dp="central", dp_noise_multiplier=1, dp_clip=1, dp_delta=1e-5
            )
        )
    with pytest.raises(ConfigError, match="horizontal federation"):
        Aggregator(
            AggregatorConfig(
                name="m1", dp="central", dp_noise_multiplier=1, dp_clip=1, dp_delta=1e-5
            )
        )


def test_dp_settings_are_validated_with_what_to_do() -> None:
    with pytest.raises(ConfigError, match="needs --dp-clip, --dp-delta"):
        AggregatorConfig(dp="central", dp_noise_multiplier=1.0)
    with pytest.raises(ConfigError, match="dp_clip set but dp is off: add --dp central"):
        AggregatorConfig(dp_clip=1.0)
    with pytest.raises(ConfigError, match="dp_clip_lr needs dp_adaptive_clip"):
        AggregatorConfig(
            dp="central", dp_noise_multiplier=1, dp_clip=1, dp_delta=1e-5, dp_clip_lr=0.1
        )
    with pytest.raises(ConfigError, match="dp_delta"):
        AggregatorConfig(dp="central", dp_noise_multiplier=1, dp_clip=1, dp_delta=1.5)
    with pytest.raises(ConfigError, match="dp_clip_count_stddev > 0.5"):
        AggregatorConfig(
            dp="central", dp_noise_multiplier=1, dp_clip=1, dp_delta=1e-5, dp_adaptive_clip=True
        )  # default stddev min_agents / 20 = 0.05
    from fedstack.cli.aggregator import parse_aggregator_args

    flags = ["--dp", "central", "--dp-noise-multiplier", "1", "--dp-clip", "0.5"]
    flags += ["--dp-delta", "1e-5", "--dp-adaptive-clip", "--dp-clip-count-stddev", "1"]
    cli = parse_aggregator_args([*flags, "--dp-epsilon-budget", "8", "--dp-sampling-rate", "0.1"])
    assert (cli.dp, cli.dp_adaptive_clip, cli.dp_clip, cli.dp_epsilon_budget) == (
        "central",
        True,
        0.5,
        8.0,
    )
    env = parse_aggregator_args([], {"FEDSTACK_DP": "central", "FEDSTACK_DP_CLIP": "2",
                                     "FEDSTACK_DP_NOISE_MULTIPLIER": "0.8",
                                     "FEDSTACK_DP_DELTA": "1e-6"})  # fmt: skip
    assert (env.dp_clip, env.dp_noise_multiplier, env.dp_delta) == (2.0, 0.8, 1e-6)
    ok = AggregatorConfig.from_mapping(
        {
            "dp": "central",
            "dp_noise_multiplier": "1.0",
            "dp_clip": 0.5,
            "dp_delta": 1e-5,
            "dp_adaptive_clip": "true",
            "dp_clip_count_stddev": 1,
        }
    )
    assert ok.dp_adaptive_clip and ok.dp_clip == 0.5


def test_budget_refuses_a_run_that_would_exceed_it() -> None:
    z, q, d = 1.0, 1.0, 1e-5
    fits = max_rounds(z, q, d, 10.0)
    assert epsilon(z, q, fits, d) <= 10.0 < epsilon(z, q, fits + 1, d)
    base: dict[str, Any] = dict(
        dp="central", dp_noise_multiplier=z, dp_clip=1.0, dp_delta=d, dp_epsilon_budget=10.0
    )
    inner = create("fedavg")
    assert isinstance(wrap(AggregatorConfig(rounds=fits, **base), inner), CentralDP)
    with pytest.raises(ConfigError, match=f"at most {fits} rounds fit: use --rounds {fits}"):
        wrap(AggregatorConfig(rounds=fits + 1, **base), inner)
    with pytest.raises(ConfigError, match="not even one round fits"):
        wrap(AggregatorConfig(**{**base, "dp_epsilon_budget": 0.01}), inner)


def test_a_restart_with_other_settings_keeps_the_spent_epsilon() -> None:
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    zero = {"w": np.zeros(4)}
    first = CentralDP(create("fedavg"), DPSettings(noise_multiplier=1.0, clip=1.0, delta=1e-5))
    state = first.init_state(zero)
    for _ in range(2):
        _, state, _ = _round(first, zero, [zero, zero], state)
    # restarted with a larger noise multiplier and sampling: the first 2 rounds still count
    s2 = DPSettings(noise_multiplier=2.0, clip=1.0, delta=1e-5, sampling_rate=0.5)
    second = CentralDP(create("fedavg"), s2)
    _, state, metrics = _round(second, zero, [zero, zero], state)
    acc = RdpAccountant()
    acc.compose(dp_accounting.PoissonSampledDpEvent(1.0, dp_accounting.GaussianDpEvent(1.0)), 2)
    acc.compose(dp_accounting.PoissonSampledDpEvent(0.5, dp_accounting.GaussianDpEvent(2.0)), 1)
    assert metrics["dp_epsilon"] == pytest.approx(acc.get_epsilon(1e-5), rel=1e-12)
    assert state["dp/history"] == [[1.0, 1.0, 2], [2.0, 0.5, 1]] and state["dp/rounds"] == 3
    budget = DPSettings(**{**s2.__dict__, "epsilon_budget": metrics["dp_epsilon"] + 1e-9})
    assert CentralDP(create("fedavg"), budget).budget_exhausted(state)
    with pytest.raises(ValueError, match="dp/history"):
        second.begin(zero, {**state, "dp/history": [[1.0, 2.0, 1]]})
