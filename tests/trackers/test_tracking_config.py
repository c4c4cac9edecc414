"""The ``track`` setting: repeatable flags, a list in a file, one spec or a JSON list in the
environment; a spec of another kind, without a target or with control characters is
refused before anything starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedstack.aggregator.config import AggregatorConfig
from fedstack.cli.aggregator import parse_aggregator_args
from fedstack.errors import ConfigError


def test_track_is_a_repeatable_setting_from_flags_file_and_environment(tmp_path: Path) -> None:
    cfg = parse_aggregator_args(
        ["--track", "mlflow:http://127.0.0.1:5000", "--track", "tensorboard:tb"]
    )
    assert cfg.track == ("mlflow:http://127.0.0.1:5000", "tensorboard:tb")
    assert parse_aggregator_args([]).track == ()
    toml = tmp_path / "a.toml"
    toml.write_text('[aggregator]\ntrack = ["tensorboard:runs", "mlflow:mlruns"]\n')
    assert AggregatorConfig.load(toml).track == ("tensorboard:runs", "mlflow:mlruns")
    env = {"FEDSTACK_TRACK": "tensorboard:runs"}
    assert AggregatorConfig.from_sources(env=env).track == ("tensorboard:runs",)
    env = {"FEDSTACK_TRACK": '["tensorboard:a", "mlflow:b"]'}
    assert AggregatorConfig.from_sources(env=env).track == ("tensorboard:a", "mlflow:b")
    for bad in ("wandb:x", "mlflow:", "tensorboard", "mlflow:a\x1bb"):
        with pytest.raises(ConfigError, match="track"):
            AggregatorConfig(track=(bad,))
