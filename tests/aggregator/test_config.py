"""Aggregator configuration: defaults, validation, book keys, TOML and JSON files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fedstack.aggregator.config import AggregatorConfig
from fedstack.errors import ConfigError


def test_defaults_are_valid() -> None:
    cfg = AggregatorConfig()
    assert (cfg.host, cfg.port, cfg.threshold, cfg.min_agents) == ("127.0.0.1", 8765, 1.0, 1)
    assert (cfg.delivery, cfg.staleness, cfg.strategy) == ("push", "next", "fedavg")
    assert cfg.rounds is None and not cfg.is_async
    assert AggregatorConfig.from_mapping({}) == cfg


@pytest.mark.parametrize(
    "changes",
    [
        {"threshold": 0},
        {"threshold": 0.0},
        {"threshold": 1.5},
        {"threshold": -0.5},
        {"threshold": float("nan")},
        {"min_agents": 0},
        {"min_agents": -1},
        {"delivery": "x"},
        {"staleness": "x"},
        {"rounds": 0},
        {"rounds": -3},
        {"port": 70000},
        {"port": -1},
        {"round_timeout": 0},
        {"round_timeout": -1.0},
        {"round_timeout": float("inf")},
        {"max_message_bytes": 10},
        {"heartbeat_interval": 0},
        {"send_timeout": -5},
        {"send_timeout": "-5"},
        {"register_timeout": 0},
        {"finish_grace": -1},
        {"strategy_params": "oops"},
        {"federation": [1, 2]},
        {"inline_blob_bytes": "lots"},
        {"inline_blob_bytes": -1},
        {"upload_budget_bytes": 0},
        {"auth": "maybe"},
        {"transport": "udp"},
        {"run_name": ""},
        {"require_tls": "perhaps"},
    ],
    ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()),
)
def test_invalid_values_raise_config_error(changes: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        AggregatorConfig(**changes)
    with pytest.raises(ConfigError):
        AggregatorConfig.from_mapping(changes)
    with pytest.raises(ConfigError):
        AggregatorConfig().replace(**changes)


def test_valid_edge_values() -> None:
    cfg = AggregatorConfig(threshold=1.0, min_agents=1, rounds=1, port=0, round_timeout=None)
    assert cfg.rounds == 1
    assert AggregatorConfig(port=65535, threshold=1e-9).is_async


def test_wrong_types_raise_config_error() -> None:
    with pytest.raises(ConfigError):
        AggregatorConfig.from_mapping({"threshold": "high"})


def test_numbers_written_as_strings_are_converted() -> None:
    cfg = AggregatorConfig.from_mapping(
        {"inline_blob_bytes": "1024", "send_timeout": "5", "rounds": "3", "require_tls": "false"}
    )
    assert (cfg.inline_blob_bytes, cfg.send_timeout, cfg.rounds) == (1024, 5.0, 3)
    assert cfg.require_tls is False


def test_a_refusal_names_the_key_the_value_and_what_is_accepted() -> None:
    with pytest.raises(ConfigError) as info:
        AggregatorConfig.from_mapping({"send_timeout": -5})
    assert "send_timeout = -5" in str(info.value) and "a number > 0" in str(info.value)
    with pytest.raises(ConfigError, match="reg_socket = 'x'.*0..65535"):
        AggregatorConfig.from_mapping({"reg_socket": "x"})  # named as the file names it


def test_book_keys_from_json_file(tmp_path: Path) -> None:
    path = tmp_path / "config_aggregator.json"
    path.write_text(
        json.dumps(
            {
                "aggr_ip": "0.0.0.0",
                "reg_socket": 9001,
                "aggregation_threshold": 0.5,
                "polling": 1,
                "init_weights_flag": 0,
                "round_interval": 5,
                "recv_socket": 4321,
                "exch_socket": 7890,
                "db_ip": "localhost",
                "db_socket": 9017,
            }
        )
    )
    cfg = AggregatorConfig.load(path)
    assert cfg.host == "0.0.0.0"
    assert cfg.port == 9001
    assert cfg.threshold == 0.5 and cfg.is_async
    assert cfg.delivery == "poll"
    assert cfg.init_weights is False
    assert cfg == AggregatorConfig(
        host="0.0.0.0", port=9001, threshold=0.5, delivery="poll", init_weights=False
    )


def test_book_polling_zero_and_init_flag_one() -> None:
    cfg = AggregatorConfig.from_mapping(
        {"polling": 0, "init_weights_flag": 1, "db_data_path": "/tmp/x.db"}
    )
    assert (cfg.delivery, cfg.init_weights, cfg.db) == ("push", True, "/tmp/x.db")


def test_book_config_file_verbatim(tmp_path: Path) -> None:
    # setups/config_aggregator.json of the book's simple-fl repository, as published
    path = tmp_path / "config_aggregator.json"
    path.write_text(
        '{\n  "aggr_ip": "localhost",\n  "db_ip": "localhost",\n  "reg_socket": "8765",\n'
        '  "exch_socket": "7890",\n  "recv_socket": "4321",\n  "db_socket": "9017",\n'
        '  "round_interval": 5,\n  "aggregation_threshold": 1.0,\n  "polling": 1\n}'
    )
    cfg = AggregatorConfig.load(path)
    assert (cfg.host, cfg.port, cfg.threshold, cfg.delivery) == ("localhost", 8765, 1.0, "poll")


def test_toml_file_with_aggregator_table(tmp_path: Path) -> None:
    path = tmp_path / "fedstack.toml"
    path.write_text(
        '[aggregator]\nhost = "0.0.0.0"\nport = 9100\nthreshold = 0.75\nmin_agents = 2\n'
        'rounds = 5\ndelivery = "poll"\nstaleness = "drop"\nround_timeout = 30.5\n'
        "\n[aggregator.strategy_params]\nweighted = false\n"
        '\n[agent]\nname = "ignored: another component\'s table"\n'
    )
    cfg = AggregatorConfig.load(path)
    assert (cfg.host, cfg.port, cfg.threshold, cfg.min_agents, cfg.rounds) == (
        "0.0.0.0",
        9100,
        0.75,
        2,
        5,
    )
    assert (cfg.delivery, cfg.staleness, cfg.round_timeout) == ("poll", "drop", 30.5)
    assert cfg.strategy_params == {"weighted": False}


def test_toml_file_without_table(tmp_path: Path) -> None:
    path = tmp_path / "agg.toml"
    path.write_text('port = 9200\nrun_name = "exp-1"\n')
    cfg = AggregatorConfig.load(path)
    assert (cfg.port, cfg.run_name) == (9200, "exp-1")


def test_unknown_key_raises_config_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="bogus_key"):
        AggregatorConfig.from_mapping({"port": 1, "bogus_key": 3})
    path = tmp_path / "c.toml"
    path.write_text("[aggregator]\nthreshhold = 0.5\n")
    with pytest.raises(ConfigError, match="threshhold"):
        AggregatorConfig.load(path)


@pytest.mark.parametrize(
    ("name", "text"),
    [("bad.json", "{not json"), ("bad.toml", "port = = 1"), ("list.json", "[1, 2]")],
)
def test_bad_files_raise_config_error(tmp_path: Path, name: str, text: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError):
        AggregatorConfig.load(path)


def test_missing_file_raises_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        AggregatorConfig.load(tmp_path / "nope.toml")


def test_replace_ignores_none_and_validates() -> None:
    cfg = AggregatorConfig().replace(port=None, threshold=0.5)
    assert cfg.port == 8765 and cfg.threshold == 0.5
