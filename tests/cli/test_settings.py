"""Every setting declared once: bad values from a file, the environment or a flag stop
``fedstack aggregator`` before anything starts, naming the key, the value and what is
accepted; the flags, the variables and the keys all come from one declaration."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fedstack.aggregator.config import AggregatorConfig, settings
from fedstack.cli.aggregator import parse_aggregator_args
from fedstack.cli.main import command
from fedstack.cli.main import main as cli_main
from fedstack.errors import ConfigError

# key, a bad value, words of what is accepted
BAD: list[tuple[str, Any, str]] = [
    ("port", 70000, "an integer in 0..65535"),
    ("port", "eighty", "an integer in 0..65535"),
    ("threshold", 1.5, "a number > 0, <= 1"),
    ("threshold", "high", "a number > 0, <= 1"),
    ("min_agents", 0, "an integer >= 1"),
    ("rounds", -3, "an integer >= 1"),
    ("round_timeout", "inf", "finite"),
    ("send_timeout", -5, "a number > 0, finite"),
    ("heartbeat_interval", 0, "a number > 0, finite"),
    ("inline_blob_bytes", "lots", "an integer in 0..67108864"),
    ("inline_blob_bytes", 1 << 30, "an integer in 0..67108864"),
    ("max_message_bytes", 10, "an integer >= 1024"),
    ("upload_budget_bytes", 0, "an integer >= 1"),
    ("delivery", "pull", "one of 'push', 'poll'"),
    ("staleness", "later", "one of 'next', 'drop'"),
    ("auth", "maybe", "one of 'required', 'off'"),
    ("run_name", "", "non-empty text"),
]
TABLES: list[tuple[str, Any]] = [
    ("strategy_params", "oops"),
    ("federation", 3),
    ("gate", ["norm_bound"]),
]
BOOLS: list[tuple[str, Any]] = [
    ("require_tls", "perhaps"),
    ("operator_api", 2),
    ("init_weights", "sometimes"),
]
IDS = [f"{k}={v!r}" for k, v, _ in BAD]


def _refusal(exc: pytest.ExceptionInfo[ConfigError]) -> str:
    return str(exc.value)


@pytest.mark.parametrize(("key", "value", "accepted"), BAD, ids=IDS)
def test_bad_value_in_a_file(tmp_path: Path, key: str, value: Any, accepted: str) -> None:
    path = tmp_path / "agg.json"
    path.write_text(json.dumps({key: value}))
    with pytest.raises(ConfigError) as info:
        AggregatorConfig.load(path)
    msg = _refusal(info)
    assert str(path) in msg and f"{key} = {value!r}" in msg and accepted in msg, msg


@pytest.mark.parametrize(("key", "value", "accepted"), BAD, ids=IDS)
def test_bad_value_in_the_environment(key: str, value: Any, accepted: str) -> None:
    var = "FEDSTACK_" + key.upper()
    if value == "":  # an empty variable counts as unset
        assert AggregatorConfig.from_sources(env={var: ""}) == AggregatorConfig()
        return
    with pytest.raises(ConfigError) as info:
        AggregatorConfig.from_sources(env={var: str(value)})
    msg = _refusal(info)
    assert msg.startswith("environment:") and f"{var} = {str(value)!r}" in msg, msg
    assert accepted in msg


@pytest.mark.parametrize(("key", "value", "accepted"), BAD, ids=IDS)
def test_bad_value_in_a_flag(
    key: str, value: Any, accepted: str, capsys: pytest.CaptureFixture[str]
) -> None:
    flag = "--" + key.replace("_", "-")
    assert cli_main(["aggregator", f"{flag}={value}"]) == 2  # before anything starts
    err = capsys.readouterr().err
    assert f"command line: {flag} = {str(value)!r}" in err and accepted in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize(("key", "value"), TABLES + BOOLS)
def test_tables_and_booleans_refused_from_files_and_environment(
    tmp_path: Path, key: str, value: Any
) -> None:
    path = tmp_path / "agg.json"
    path.write_text(json.dumps({key: value}))
    with pytest.raises(ConfigError, match=f"{key} = "):
        AggregatorConfig.load(path)
    var = "FEDSTACK_" + key.upper()
    with pytest.raises(ConfigError, match=f"environment: {var} = "):
        AggregatorConfig.from_sources(env={var: str(value)})


def test_bad_words_and_pairs_in_flags(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["aggregator", "--init-weights", "sometimes"]) == 2
    assert "'sometimes' is not one of 'agent', 'zeros'" in capsys.readouterr().err
    assert cli_main(["aggregator", "--strategy-param", "oops"]) == 2
    assert "--strategy-param 'oops' must look like key=value" in capsys.readouterr().err
    assert cli_main(["aggregator", "--require-tls", "perhaps"]) == 2  # a switch: no value
    assert "perhaps" in capsys.readouterr().err


def test_unknown_keys_variables_and_flags(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "agg.toml"
    path.write_text("[aggregator]\nthreshhold = 0.5\n")
    with pytest.raises(ConfigError, match="unknown key 'threshhold'; known: .*threshold"):
        AggregatorConfig.load(path)
    with pytest.raises(ConfigError, match="unknown variable FEDSTACK_THRESHHOLD"):
        AggregatorConfig.from_sources(env={"FEDSTACK_THRESHHOLD": "0.5"})
    # the agent's variables and other programs' are not the aggregator's business
    cfg = AggregatorConfig.from_sources(
        env={
            "FEDSTACK_TOKEN": "x",
            "FEDSTACK_CA": "ca.pem",
            "HOME": "/root",
            "FEDSTACK_CACHE_DIR": "/tmp",
        }
    )
    assert cfg == AggregatorConfig()
    assert cli_main(["aggregator", "--threshhold", "0.5"]) == 2
    assert "No such option: --threshhold" in capsys.readouterr().err


def test_strings_are_converted_wherever_they_come_from(tmp_path: Path) -> None:
    assert AggregatorConfig.from_mapping({"inline_blob_bytes": "1024"}).inline_blob_bytes == 1024
    assert AggregatorConfig(port="9000").port == 9000
    env = {
        "FEDSTACK_PORT": "9001",
        "FEDSTACK_REQUIRE_TLS": "",
        "FEDSTACK_OPERATOR_API": "off",
        "FEDSTACK_STRATEGY_PARAMS": '{"precision": "float64"}',
        "FEDSTACK_ROUNDS": "3",
    }
    cfg = AggregatorConfig.from_sources(env=env)
    assert (cfg.port, cfg.operator_api, cfg.rounds) == (9001, False, 3)
    assert cfg.strategy_params == {"precision": "float64"}
    cfg = parse_aggregator_args(
        [
            "--inline-blob-bytes",
            "2048",
            "--strategy-param",
            "f=2",
            "--strategy-param",
            "name=krum",
            "--init-weights",
            "zeros",
            "--federation",
            "fedprox_mu=0.5",
        ]
    )
    assert cfg.inline_blob_bytes == 2048 and cfg.init_weights is False
    assert cfg.strategy_params == {"f": 2, "name": "krum"}
    assert cfg.federation == {"fedprox_mu": 0.5}


def test_precedence_defaults_file_environment_flags(tmp_path: Path) -> None:
    path = tmp_path / "agg.toml"
    path.write_text(
        "[aggregator]\nport = 9100\nthreshold = 0.5\nrounds = 4\n"
        '[aggregator.strategy_params]\nf = 1\nname = "a"\n'
    )
    env = {"FEDSTACK_THRESHOLD": "0.75", "FEDSTACK_ROUNDS": "5"}
    cfg = parse_aggregator_args(
        ["--config", str(path), "--rounds", "6", "--strategy-param", "f=2"], env=env
    )
    assert (cfg.port, cfg.threshold, cfg.rounds) == (9100, 0.75, 6)
    assert cfg.strategy_params == {"f": 2, "name": "a"}  # flags merge into the file's table


def test_the_enrollment_token_is_not_shown_in_refusals() -> None:
    with pytest.raises(ConfigError) as info:
        AggregatorConfig.from_sources(env={"FEDSTACK_ENROLLMENT_TOKEN": "short-secret"})
    assert "short-secret" not in str(info.value) and "at least 16 characters" in str(info.value)


def test_every_setting_has_a_flag_a_variable_and_help() -> None:
    agg = command().commands["aggregator"]
    flags = {o for p in agg.params for o in (*p.opts, *p.secondary_opts)}
    for s in settings():
        assert s.help and s.env == "FEDSTACK_" + s.name.upper()
        if s.cli:
            assert s.flag in flags, s.flag
    assert {
        "--require-tls",
        "--no-operator-api",
        "--strategy-param",
        "--enrollment-token",
        "--config",
        "--ready-file",
    } <= flags


def _help(*argv: str, capsys: pytest.CaptureFixture[str]) -> str:
    assert cli_main([*argv, "--help"]) == 0
    return capsys.readouterr().out


def test_agent_and_agents_share_their_options(capsys: pytest.CaptureFixture[str]) -> None:
    agents = _help("agents", capsys=capsys)
    agent = _help("agent", capsys=capsys)
    for flag in (
        "--cert",
        "--key",
        "--token",
        "--ca",
        "--enrollment-token",
        "--url",
        "--trainer",
        "--trainer-arg",
        "--init-weights",
    ):
        assert flag in agents and flag in agent, flag
    cmds = command().commands

    def opts(name: str) -> set[str]:
        return {o for p in cmds[name].params for o in p.opts}

    shared = opts("agent") & opts("agents")
    assert {"--cert", "--key", "--token", "--enrollment-token"} <= shared


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["aggregator"],
        ["agent"],
        ["agents"],
        ["demo"],
        ["sim"],
        ["strategies"],
        ["certs"],
        ["db"],
        ["db", "rounds"],
        ["db", "lineage"],
        ["db", "plot"],
        ["credentials"],
        ["credentials", "add"],
    ],
)
def test_every_help_page(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert "Usage: fedstack" in _help(*argv, capsys=capsys)
