"""The federation's pure parts and its refusals: synthesis, settings, strategies."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedstack import AggregatorConfig
from fedstack.aggregator.config import OTHER_ENVIRONMENT
from fedstack.aggregator.service import Aggregator
from fedstack.aggregator.synthesis import SynthesisInput, synthesize, weights_of
from fedstack.cli.aggregator import parse_aggregator_args
from fedstack.cli.main import main as cli_main
from fedstack.errors import ConfigError, InvalidUpdate
from fedstack.strategies import describe


def _inputs(seed: int = 0) -> list[SynthesisInput]:
    rng = np.random.default_rng(seed)
    return [
        SynthesisInput(
            name,
            f"model-{name}",
            n,
            {
                "w": rng.standard_normal((17, 5)).astype(np.float32),
                "b": rng.standard_normal(5).astype(np.float64),
                "steps": rng.integers(0, 100, 3).astype(np.int64),
            },
        )
        for name, n in (("edge-2", 7), ("edge-10", 1234), ("a", 3), ("zz", 99))
    ]


def _digest(weights: dict[str, Any]) -> dict[str, str]:
    return {k: v.dtype.str + ":" + v.tobytes().hex() for k, v in weights.items()}


def test_synthesis_is_the_sample_weighted_mean_cast_back() -> None:
    out = synthesize(
        [
            SynthesisInput("b", "m2", 30, {"w": np.full(2, 10, np.float32)}),
            SynthesisInput("a", "m1", 10, {"w": np.zeros(2, np.float32)}),
        ]
    )
    assert out["w"].dtype == np.float32
    np.testing.assert_array_equal(out["w"], [7.5, 7.5])
    assert weights_of([SynthesisInput("x", "m", 0, {}), SynthesisInput("y", "n", 0, {})]) == [
        0.5,
        0.5,
    ]
    ints = synthesize(
        [
            SynthesisInput("a", "1", 1, {"k": np.array([1], np.int32)}),
            SynthesisInput("b", "2", 1, {"k": np.array([2], np.int32)}),
        ]
    )
    assert ints["k"].dtype == np.int32 and ints["k"][0] == 2  # 1.5 rounded half to even


def test_synthesis_is_bit_identical_whatever_the_order() -> None:
    inputs = _inputs()
    reference = _digest(synthesize(inputs))
    for perm in ([3, 2, 1, 0], [1, 3, 0, 2], [2, 0, 3, 1]):
        assert _digest(synthesize([inputs[i] for i in perm])) == reference
    assert list(synthesize(inputs)) == ["w", "b", "steps"]


def test_two_processes_synthesise_bit_identical_arrays(tmp_path: Path) -> None:
    """Two members (here: two interpreters) given the same semi-global models compute the
    same bits."""
    inputs = _inputs(7)
    for i in inputs:
        np.savez(tmp_path / f"{i.name}.npz", **i.weights)  # type: ignore[arg-type]
    meta = [(i.name, i.model_id, i.num_samples) for i in inputs]
    script = (
        "import json, sys, numpy as np\n"
        "from fedstack.aggregator.synthesis import SynthesisInput, synthesize\n"
        "meta = json.loads(sys.argv[1]); d = sys.argv[2]\n"
        "ins = [SynthesisInput(n, m, k, dict(np.load(f'{d}/{n}.npz'))) for n, m, k in meta]\n"
        "out = synthesize(ins[::-1])\n"
        "print(json.dumps({k: v.dtype.str + ':' + v.tobytes().hex() for k, v in out.items()}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, json.dumps(meta), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert json.loads(done.stdout) == _digest(synthesize(inputs))


def test_synthesis_refuses_mismatched_structures() -> None:
    with pytest.raises(InvalidUpdate, match="structure"):
        synthesize(
            [
                SynthesisInput("a", "1", 1, {"w": np.zeros(2)}),
                SynthesisInput("b", "2", 1, {"w": np.zeros(3)}),
            ]
        )
    with pytest.raises(ValueError):
        synthesize([])


@pytest.mark.parametrize(
    "values,message",
    [
        ({"name": "a b"}, "name = 'a b' is refused"),
        ({"name": "-a"}, "letters, digits"),
        ({"upstream": "ws://up:8765"}, "upstream needs name"),
        ({"name": "a", "upstream": "http://up:8765"}, "ws:// or wss://"),
        ({"name": "a", "advertise_url": "tcp://h:1"}, "ws:// or wss://"),
        ({"name": "a", "advertise_url": "ws://"}, "ws:// or wss://"),
        ({"advertise_url": "ws://h:1"}, "advertise_url needs name"),
        ({"name": "a", "upstream_ca": "ca.pem"}, "upstream_ca needs a wss:// upstream"),
        ({"name": "a", "liveness_timeout": 1.0, "federation_heartbeat": 1.0}, "longer than"),
        ({"name": "a", "synthesis": "eventually"}, "one of 'sync', 'async'"),
        ({"name": "a", "staleness_bound": -1}, "staleness_bound"),
        ({"name": "a", "synthesis_timeout": 0}, "synthesis_timeout"),
    ],
)
def test_federation_settings_are_checked(values: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        AggregatorConfig(**values)


def test_federation_flags_and_environment() -> None:
    cfg = parse_aggregator_args(
        [
            "--name",
            "edge-1",
            "--advertise-url",
            "wss://edge-1.example:8765",
            "--synthesis",
            "async",
            "--synthesis-timeout",
            "12",
            "--staleness-bound",
            "3",
            "--federation-heartbeat",
            "0.5",
            "--liveness-timeout",
            "2",
            "--upstream",
            "wss://top.example:8765",
            "--upstream-ca",
            "ca.pem",
            "--upstream-timeout",
            "9",
        ],
        env={"FEDSTACK_UPSTREAM_TOKEN": "secret", "FEDSTACK_STALENESS_BOUND": "1"},
    )
    assert (cfg.name, cfg.synthesis, cfg.staleness_bound, cfg.upstream_timeout) == (
        "edge-1",
        "async",
        3,
        9.0,
    )
    assert cfg.federated and not AggregatorConfig().federated
    assert "FEDSTACK_UPSTREAM_TOKEN" in OTHER_ENVIRONMENT
    defaults = AggregatorConfig(name="x")
    assert (defaults.synthesis, defaults.synthesis_timeout, defaults.staleness_bound) == (
        "sync",
        30.0,
        2,
    )
    assert (defaults.federation_heartbeat, defaults.liveness_timeout) == (1.0, 5.0)


@pytest.mark.parametrize("strategy", ["scaffold", "fednova"])
def test_refused_strategy_in_a_federation(tmp_path: Path, strategy: str) -> None:
    db = str(tmp_path / "f.db")
    with pytest.raises(ConfigError, match=f"strategy '{strategy}' cannot run") as info:
        Aggregator(AggregatorConfig(db=db, name="a", strategy=strategy))
    assert "fedavg" in str(info.value)  # what to use instead
    Aggregator(AggregatorConfig(db=db, strategy=strategy))  # standalone: fine


def test_trigger_strategies_need_async_synthesis(tmp_path: Path) -> None:
    db = str(tmp_path / "f.db")
    with pytest.raises(ConfigError, match="--synthesis async"):
        Aggregator(AggregatorConfig(db=db, name="a", strategy="fedasync"))
    agg = Aggregator(AggregatorConfig(db=db, name="a", strategy="fedasync", synthesis="async"))
    assert agg.sink is not None and agg.membership is not None
    plain = Aggregator(AggregatorConfig(db=db))
    assert plain.sink is None and plain.membership is None and plain.driver.sink is None


def test_every_strategy_states_how_it_federates(capsys: pytest.CaptureFixture[str]) -> None:
    table = {d["name"]: d for d in describe()}
    assert table["scaffold"]["federation"] == "refused"
    assert table["fednova"]["federation"] == "refused"
    assert table["ckks-fedavg"]["federation"] == "refused"  # sums of ciphertexts
    for name in ("fedavg", "fedprox", "fedadam", "median", "krum", "fedbuff", "normclip"):
        assert table[name]["federation"] == "per-cluster", name
    for d in table.values():
        assert (d["federation"] == "refused") == bool(d["federation_refusal"])
    assert cli_main(["strategies"]) == 0
    out = capsys.readouterr().out
    assert out.count("federation: refused") == 3 and "federation: per-cluster" in out
