"""Central DP composed with secure aggregation (distributed noise): every agent clips its
change and adds its share of the noise before masking, so the aggregator only ever sees
masked inputs and a noised sum; the round still stores epsilon from dp-accounting."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import dp_accounting
import numpy as np
import pytest

from fedstack import Agent, AggregatorConfig, FederationFinished, Store
from fedstack.errors import ConfigError, ConnectionClosed, FedstackError
from fedstack.testing import aggregator_thread
from fedstack.wire.messages import SECAGG_MASKED

P = 40_000
N = 4
Z, C, DELTA, Q = 1.2, 0.5, 1e-5, 0.5


def _expected_epsilon(rounds: int) -> float:
    acc = dp_accounting.rdp.RdpAccountant()
    event = dp_accounting.PoissonSampledDpEvent(Q, dp_accounting.GaussianDpEvent(Z))
    acc.compose(dp_accounting.SelfComposedDpEvent(event, rounds))
    return float(acc.get_epsilon(DELTA))


def _config(tmp_path: Path, **over: Any) -> AggregatorConfig:
    base: dict[str, Any] = dict(
        auth="off",
        port=0,
        db=str(tmp_path / "s.db"),
        rounds=2,
        min_agents=N,
        finish_grace=3,
        secagg=True,
        secagg_max_weight=1.0,
        secagg_min_survivors=N,
        secagg_threshold=0.5,
        secagg_timeout=20.0,
        heartbeat_interval=1.0,
        dp="central",
        dp_noise_multiplier=Z,
        dp_clip=C,
        dp_delta=DELTA,
        dp_sampling_rate=Q,
    )
    base.update(over)
    return AggregatorConfig(**base)


def test_secagg_with_central_dp_adds_the_noise_on_the_agents(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    big = np.full(P, 1.0, np.float32)  # norm 200 >> C: every change is clipped to C
    with aggregator_thread(cfg) as agg:
        url = f"ws://127.0.0.1:{agg.port}"

        def agent(i: int) -> None:
            a = Agent(url, name=f"a{i}")
            try:
                a.send_initial_model({"w": np.zeros(P, np.float32)})
                a.start(60)
                while True:
                    gm = a.wait_for_global_model(60)
                    a.send_trained_model({"w": gm["w"] + big}, 10 + i)
            except (FederationFinished, ConnectionClosed, FedstackError, TimeoutError):
                pass
            finally:
                a.close(5)

        threads = [threading.Thread(target=agent, args=(i,), daemon=True) for i in range(N)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 90
        while not agg.state.finished and time.monotonic() < deadline:
            time.sleep(0.05)
        run_id = agg.run_id
        for t in threads:
            t.join(30)
    store = Store.open_readonly(cfg.db)
    try:
        rounds = store.rounds(run_id)
        assert [r["round"] for r in rounds] == [1, 2]
        for r in rounds:
            m = r["metrics"]
            assert m["secagg_agents"] == N
            assert m["dp_epsilon"] == pytest.approx(_expected_epsilon(r["round"]), rel=1e-9)
            assert m["dp_noise_std"] == pytest.approx(Z * C / np.sqrt(N))
        g0 = np.asarray(store.load_weights(store.global_model_id(run_id, 0) or "")["w"], float)
        g1 = np.asarray(store.load_weights(store.global_model_id(run_id, 1) or "")["w"], float)
        change = g1 - g0
        # each agent: its change clipped to norm C (every coordinate C/sqrt(P)) plus
        # N(0, (zC)^2/m_min); the mean of N = m_min of them: C/sqrt(P) + N(0, (zC/N)^2)
        assert float(np.mean(change)) == pytest.approx(
            C / np.sqrt(P), abs=5 * Z * C / N / np.sqrt(P)
        )
        want_std = Z * C / N
        se = want_std / np.sqrt(2 * P)
        assert abs(float(np.std(change)) - want_std) < 5 * se + 1e-6, (np.std(change), want_std)
        # the store holds masked inputs only (never a clipped or noised plain change)
        for rec in store.models(run_id):
            if rec["kind"] == "local" and rec["status"] != "initial":
                assert set(store.load_weights(rec["id"])) == {SECAGG_MASKED}
    finally:
        store.close()


@pytest.mark.parametrize(
    ("over", "needle"),
    [
        (
            {"dp_adaptive_clip": True, "dp_clip_count_stddev": 2.0},
            "dp_adaptive_clip cannot be used with secagg",
        ),
        ({"secagg_max_weight": 1000.0}, "secagg_max_weight = 1"),
    ],
)
def test_secagg_with_central_dp_refuses_what_cannot_compose(
    tmp_path: Path, over: dict[str, Any], needle: str
) -> None:
    with pytest.raises(ConfigError, match=needle):
        _config(tmp_path, **over)


def test_secagg_settings_without_secagg_are_refused(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match="secagg_clip, secagg_min_survivors set but secagg is off"
    ):
        AggregatorConfig(db=str(tmp_path / "s.db"), secagg_clip=4.0, secagg_min_survivors=5)


def test_central_dp_without_dp_accounting_is_refused_at_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    from fedstack.privacy.dp import wrap
    from fedstack.strategies import create

    cfg = AggregatorConfig(
        db=str(tmp_path / "s.db"), dp="central", dp_noise_multiplier=Z, dp_clip=C, dp_delta=DELTA
    )
    for name in [m for m in sys.modules if m == "dp_accounting" or m.startswith("dp_accounting.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "dp_accounting", None)
    with pytest.raises(ConfigError, match=r"pip install 'fedstack\[privacy\]'"):
        wrap(cfg, create("fedavg"))


@pytest.mark.parametrize(
    ("first", "then", "needle"),
    [
        ({"secagg": True}, {}, "secagg = True \\(now False\\)"),
        (
            {"dp": "central", "dp_noise_multiplier": Z, "dp_clip": C, "dp_delta": DELTA},
            {},
            "dp = 'central'",
        ),
        ({}, {"secagg": True}, "secagg = False \\(now True\\)"),
    ],
)
def test_a_run_is_not_resumed_with_other_privacy_settings(
    tmp_path: Path, first: dict[str, Any], then: dict[str, Any], needle: str
) -> None:
    def config(over: dict[str, Any]) -> AggregatorConfig:
        return AggregatorConfig(auth="off", port=0, db=str(tmp_path / "s.db"), **over)

    with aggregator_thread(config(first)):
        pass  # the run is recorded with its settings
    with pytest.raises(ConfigError, match=needle), aggregator_thread(config(then)):
        pass
    with aggregator_thread(config(first)):  # the same settings resume it
        pass
