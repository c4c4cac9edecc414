"""`secagg` settings: the `[secagg]` table, what reaches the agents, and everything an
aggregator with secure aggregation refuses to start with (a clear ConfigError)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedstack.aggregator import Aggregator
from fedstack.aggregator.config import AggregatorConfig
from fedstack.errors import ConfigError
from fedstack.strategies import names
from fedstack.strategies.base import _REGISTRY


def _agg(tmp_path: Path, **kw: object) -> Aggregator:
    return Aggregator(AggregatorConfig(db=str(tmp_path / "c.db"), port=0, secagg=True, **kw))


def test_a_secagg_table_in_a_toml_file(tmp_path: Path) -> None:
    p = tmp_path / "agg.toml"
    p.write_text("[aggregator]\nrounds = 3\n[aggregator.secagg]\nclip = 2.5\nquant_bits = 16\n")
    cfg = AggregatorConfig.load(p)
    assert cfg.secagg is True and cfg.secagg_clip == 2.5 and cfg.secagg_quant_bits == 16
    p.write_text("[aggregator.secagg]\nenabled = false\ntimeout = 3\n")
    cfg = AggregatorConfig.load(p)
    assert cfg.secagg is False and cfg.secagg_timeout == 3.0
    p.write_text("[aggregator.secagg]\nclipp = 3\n")
    with pytest.raises(ConfigError, match="secagg_clipp"):
        AggregatorConfig.load(p)


def test_the_agents_learn_the_parameters(tmp_path: Path) -> None:
    agg = _agg(tmp_path, secagg_clip=4.0, secagg_neighbours=4)
    cfg = agg.federation_config
    assert cfg["secagg"] is True and cfg["secagg_clip"] == 4.0 and cfg["secagg_neighbours"] == 4
    assert _agg(tmp_path).federation_config["secagg_neighbours"] == 0  # auto


def test_only_mean_strategies_run_under_secagg(tmp_path: Path) -> None:
    allowed = {n for n in names() if _REGISTRY[n].secure_aggregation}
    assert allowed == {
        "fedavg",
        "fedprox",
        "fedopt",
        "fedavgm",
        "fedsgd",
        "fedadagrad",
        "fedadam",
        "fedyogi",
    }
    for name in ("median", "trimmed_mean", "krum", "bulyan", "scaffold", "fednova"):
        if name in names():
            with pytest.raises(ConfigError, match=f"cannot run with strategy '{name}'"):
                _agg(tmp_path, strategy=name)
    for name in ("fedasync", "fedbuff"):
        with pytest.raises(ConfigError, match="asynchronous"):
            _agg(tmp_path, strategy=name)
    _agg(tmp_path, strategy="fedadam")  # a server optimiser only needs the mean


@pytest.mark.parametrize(
    ("settings", "why"),
    [
        ({"gate": {"max_norm": 10}}, "update gate"),
        ({"name": "m1"}, "horizontal or hierarchical"),
        ({"secagg_neighbours": 3}, "even"),
        ({"min_agents": 2000}, "at most 1024 agents"),
        ({"strategy_params": {"weighted": False}}, "secagg_max_weight = 1"),
        ({"secagg_threshold": 0.3}, "threshold"),
        ({"secagg_min_survivors": 1}, "secagg_min_survivors"),
    ],
)
def test_refused_at_start(tmp_path: Path, settings: dict[str, object], why: str) -> None:
    with pytest.raises(ConfigError, match=why):
        _agg(tmp_path, **settings)
    assert not (tmp_path / "c.db").exists()
