"""Local DP: the torch digits trainers with DP-SGD (Opacus) train in a real federation and
report as ``dp_epsilon`` what Opacus' own accountant gives for the steps they took."""

from __future__ import annotations

import concurrent.futures
import math
from pathlib import Path

import numpy as np
import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from fedstack import Store
from fedstack.agent.runner import run_trainer
from fedstack.errors import ConfigError
from fedstack.testing import aggregator_thread, small_config
from fedstack.trainers.torch_digits import DigitsCNNTrainer, DigitsMLPTrainer

Z, C, DELTA, BATCH = 1.2, 1.0, 1e-5, 24


def _opacus_epsilon(steps: int, sample_rate: float, accountant: str = "rdp") -> float:
    """Opacus' accountant for ``steps`` DP-SGD steps, computed here without fedstack."""
    acc = RDPAccountant() if accountant == "rdp" else PRVAccountant()
    acc.history = [(Z, sample_rate, steps)]
    return float(acc.get_epsilon(DELTA))


def test_dp_sgd_agents_train_and_report_opacus_epsilon(tmp_path: Path) -> None:
    cfg = small_config(tmp_path / "agg.db", min_agents=2, rounds=3, strategy_params={})
    trainers = [
        DigitsMLPTrainer(
            index=i,
            num_agents=2,
            lr=0.1,
            batch_size=BATCH,
            dp_noise_multiplier=Z,
            dp_max_grad_norm=C,
            dp_delta=DELTA,
        )
        for i in range(2)
    ]
    with aggregator_thread(cfg) as agg:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            futures = [
                pool.submit(run_trainer, t, agg.url, f"dp{i}", token=f"token-dp{i}-0123456789")
                for i, t in enumerate(trainers)
            ]
            histories = [f.result(timeout=120) for f in futures]
        assert agg.state.finished and agg.state.version == 3
    for t, history in zip(trainers, histories, strict=True):
        steps_per_fit = math.ceil(len(t._y) / BATCH)  # one pass of Poisson batches
        q = 1 / steps_per_fit  # Opacus' sampling rate: 1 / len(data loader)
        fits = [h for h in history if "dp_steps" in h]  # not the final evaluation
        assert [h["version"] for h in fits][:3] == [0, 1, 2]
        for k, m in enumerate(fits, start=1):
            assert m["dp_steps"] == k * steps_per_fit
            assert m["dp_epsilon"] == pytest.approx(_opacus_epsilon(k * steps_per_fit, q))
        assert float(fits[0]["dp_epsilon"]) < float(fits[-1]["dp_epsilon"])
        assert float(history[-1]["accuracy"]) > 0.3  # it learns (10 classes: chance is 0.1)
    store = Store(cfg.db)
    try:
        (run,) = store.list_runs()
        last = store.rounds(run["id"])[-1]["metrics"]
    finally:
        store.close()
    worst = max(h["dp_epsilon"] for hs in histories for h in hs if h.get("version") == 2)
    assert last["max_dp_epsilon"] == pytest.approx(worst)  # the least private agent


def test_dp_sgd_prv_accountant_and_state_round_trip() -> None:
    t = DigitsCNNTrainer(
        index=0,
        num_agents=4,
        epochs=1,
        batch_size=BATCH,
        dp_noise_multiplier=Z,
        dp_accountant="prv",
    )
    w = t.initial_weights()
    w1, n, m1 = t.fit(w, {})
    assert set(w1) == set(w) and all(w1[k].shape == w[k].shape for k in w)
    assert not all(np.array_equal(w1[k], w[k]) for k in w)
    steps = int(m1["dp_steps"])
    assert steps == math.ceil(n / BATCH)
    assert m1["dp_epsilon"] == pytest.approx(_opacus_epsilon(steps, 1 / steps, "prv"))
    # the simulator moves trainer state between workers: the epsilon keeps counting
    other = DigitsCNNTrainer(
        index=0,
        num_agents=4,
        epochs=1,
        batch_size=BATCH,
        dp_noise_multiplier=Z,
        dp_accountant="prv",
    )
    other.set_state(t.get_state())
    _, _, m2 = other.fit(w1, {})
    assert m2["dp_steps"] == 2 * steps
    assert float(m2["dp_epsilon"]) > float(m1["dp_epsilon"])
    with pytest.raises(ConfigError, match="dp_noise_multiplier must be a number > 0"):
        DigitsMLPTrainer(dp_noise_multiplier=0)
    with pytest.raises(ConfigError, match="dp_accountant"):
        DigitsMLPTrainer(dp_noise_multiplier=1.0, dp_accountant="moments")


def test_book_image_trainer_dp_sgd_on_its_round_sample() -> None:
    from fedstack.trainers.torch_cifar import BookImageTrainer

    t = BookImageTrainer(
        dataset="digits", num_agents=2, samples_per_round=200, batch_size=20,
        dp_noise_multiplier=Z, dp_delta=DELTA,
    )  # fmt: skip
    w = t.initial_weights()
    w1, n, m1 = t.fit(w, {})
    _, _, m2 = t.fit(w1, {})
    assert n == 200 and m1["dp_steps"] == 10 and m2["dp_steps"] == 20  # ceil(200 / 20)
    assert m2["dp_epsilon"] == pytest.approx(_opacus_epsilon(20, 1 / 10))
    assert not all(np.array_equal(w1[k], w[k]) for k in w)
    plain = BookImageTrainer(dataset="digits", num_agents=2, samples_per_round=200)
    assert "dp_epsilon" not in plain.fit(w, {})[2]


def test_a_dp_sgd_argument_without_the_noise_multiplier_is_refused() -> None:
    from fedstack.errors import ConfigError
    from fedstack.trainers.torch_digits import DigitsMLPTrainer

    with pytest.raises(ConfigError, match="dp_max_grad_norm given without dp_noise_multiplier"):
        DigitsMLPTrainer(dp_max_grad_norm=1.0)
    assert DigitsMLPTrainer().dp is None
    assert DigitsMLPTrainer(dp_noise_multiplier=1.0).dp is not None
