"""``fedstack he keygen`` writes the two key files; the aggregator refuses the agents' file
(the secret key) and every setting that would need a model in the clear; the agent refuses
``--he-context`` with ``--init-weights zeros``."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from fedstack.aggregator import Aggregator
from fedstack.aggregator.config import AggregatorConfig
from fedstack.cli.aggregator import parse_aggregator_args
from fedstack.cli.main import main as cli_main
from fedstack.errors import ConfigError
from fedstack.privacy.ckks import (
    MAGIC,
    CkksError,
    context_from_bytes,
    load_context,
)
from fedstack.strategies import create, describe


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("keys")
    assert cli_main(["he", "keygen", "--out", str(out), "--json"]) == 0
    return out


def test_keygen_writes_both_files(keys: Path, capsys: pytest.CaptureFixture[str]) -> None:
    agents, aggregator = keys / "agents.ctx", keys / "aggregator.ctx"
    assert stat.S_IMODE(agents.stat().st_mode) == 0o600
    assert stat.S_IMODE(aggregator.stat().st_mode) == 0o644
    a, g = load_context(agents, "agents"), load_context(aggregator, "aggregator")
    assert a.key_id == g.key_id and a.params == g.params
    assert a.ts.has_secret_key() and a.ts.has_public_key()
    # the aggregator's file holds the parameters only: no secret key, not even a public key
    assert not g.ts.has_secret_key() and not g.ts.has_public_key()
    assert aggregator.stat().st_size < 1024 < agents.stat().st_size
    assert cli_main(["he", "inspect", str(aggregator), "--json"]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["role"] == "aggregator" and info["secret_key"] is False
    assert info["key_id"] == g.key_id.hex()
    # a key set is made once: no silent overwrite
    assert cli_main(["he", "keygen", "--out", str(keys)]) == 2
    assert "--force" in capsys.readouterr().err


def test_keygen_refuses_bad_parameters(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for args, words in [
        (["--poly-modulus-degree", "1000"], "poly_modulus_degree 1000 is refused"),
        (["--coeff-mod-bit-sizes", "60,x"], "integers separated by commas"),
        (["--scale-bits", "70"], "scale_bits 70 is refused"),
        (["--poly-modulus-degree", "4096", "--coeff-mod-bit-sizes", "60,60,60"], "SEAL refuses"),
    ]:
        assert cli_main(["he", "keygen", "--out", str(tmp_path / "k"), *args]) == 2
        assert words in capsys.readouterr().err, args
    assert not (tmp_path / "k" / "agents.ctx").exists()


def test_aggregator_refuses_the_agents_file(
    keys: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    agents = str(keys / "agents.ctx")
    cfg = parse_aggregator_args(
        ["--db", str(tmp_path / "a.db"), "--port", "0", "--he", "ckks", "--he-context", agents]
    )
    with pytest.raises(ConfigError, match="holds the secret key .*give the aggregator"):
        Aggregator(cfg)
    with pytest.raises(ConfigError, match="holds the secret key"):
        create("ckks-fedavg", context=agents)
    rc = cli_main(
        ["aggregator", "--db", str(tmp_path / "b.db"), "--port", "0"]
        + ["--he", "ckks", "--he-context", agents]
    )
    assert rc == 2
    assert "holds the secret key" in capsys.readouterr().err
    assert not (tmp_path / "b.db").exists()


def test_a_file_lying_about_its_role_is_refused_after_parsing(keys: Path) -> None:
    data = (keys / "agents.ctx").read_bytes()
    hlen = int.from_bytes(data[len(MAGIC) : len(MAGIC) + 4], "little")
    start = len(MAGIC) + 4
    header = json.loads(data[start : start + hlen])
    header["role"] = "aggregator"
    head = json.dumps(header).encode()
    lying = MAGIC + len(head).to_bytes(4, "little") + head + data[start + hlen :]
    with pytest.raises(CkksError, match="holds the secret key"):
        context_from_bytes(lying, "aggregator")


def test_aggregator_context_has_no_secret_key(keys: Path) -> None:
    strategy = create("ckks-fedavg", context=str(keys / "aggregator.ctx"))
    ctx = strategy.context  # type: ignore[attr-defined]
    assert ctx.ts.has_secret_key() is False and ctx.ts.is_public()
    assert not ctx.has_secret_key
    # and the agents refuse it
    with pytest.raises(CkksError, match="holds no secret key"):
        load_context(keys / "aggregator.ctx", "agents")


@pytest.mark.parametrize(
    ("bytes_", "words"),
    [
        (b"", "wrong magic"),
        (b"pickle\x80\x04", "wrong magic"),
        (MAGIC + b"\xff\xff\xff\xff", "bad header length"),
        (MAGIC + b"\x02\x00\x00\x00{}", "unknown header format"),
    ],
)
def test_bad_key_files_are_refused(tmp_path: Path, bytes_: bytes, words: str) -> None:
    path = tmp_path / "x.ctx"
    path.write_bytes(bytes_)
    with pytest.raises(CkksError, match=words):
        load_context(path, "aggregator")


def test_garbage_body_is_refused(keys: Path, tmp_path: Path) -> None:
    data = (keys / "aggregator.ctx").read_bytes()
    path = tmp_path / "x.ctx"
    path.write_bytes(data[:-40] + b"\x00" * 40)
    with pytest.raises(CkksError, match="not a valid TenSEAL context"):
        load_context(path, "aggregator")
    with pytest.raises(CkksError, match="cannot read"):
        load_context(tmp_path / "missing.ctx", "aggregator")


@pytest.mark.parametrize(
    ("settings", "words"),
    [
        ({"evaluator": "x:y"}, "evaluator cannot be used with homomorphic encryption"),
        ({"gate": {"norm_bound": 3.0}}, "gate cannot be used"),
        ({"strategy": "median"}, "strategy 'median'"),
        ({"strategy_params": {"precision": "float64"}}, "leave strategy and strategy_params"),
        ({"target_metric": "eval_accuracy>=0.9"}, "needs an evaluator"),
        ({"init_weights": False}, "init_weights zeros"),
        ({"name": "m1"}, "name cannot be used"),
        ({"he_context": None}, "he = ckks needs he_context"),
    ],
)
def test_settings_that_need_plain_models_are_refused(
    keys: Path, settings: dict[str, object], words: str
) -> None:
    base: dict[str, object] = {"he": "ckks", "he_context": str(keys / "aggregator.ctx")}
    with pytest.raises(ConfigError, match=words):
        AggregatorConfig(**{**base, **settings})


def test_accepted_settings(keys: Path) -> None:
    ctx = str(keys / "aggregator.ctx")
    cfg = AggregatorConfig(he="ckks", he_context=ctx, target_metric="mean_train_loss<=0.1")
    assert cfg.strategy_spec() == ("ckks-fedavg", {"context": ctx})
    # the strategy chosen directly gets the same refusals
    with pytest.raises(ConfigError, match="evaluator cannot be used"):
        AggregatorConfig(strategy="ckks-fedavg", strategy_params={"context": ctx}, evaluator="a:b")
    with pytest.raises(ConfigError, match="he_context needs he = ckks"):
        AggregatorConfig(he_context=ctx)
    assert AggregatorConfig().strategy_spec() == ("fedavg", {})


def test_strategies_lists_ckks_fedavg(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["strategies", "--json"]) == 0
    items = {s["name"]: s for s in json.loads(capsys.readouterr().out)}
    assert items["ckks-fedavg"]["federation"] == "refused"
    assert "context" in items["ckks-fedavg"]["params"]


def test_agent_refuses_he_context_with_zeros(
    keys: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = cli_main(
        ["agent", "--name", "a", "--trainer", "ckks_support:KnownTrainer"]
        + ["--he-context", str(keys / "agents.ctx"), "--init-weights", "zeros"]
    )
    assert rc == 2
    assert "--he-context cannot be used with --init-weights zeros" in capsys.readouterr().err


def test_agent_refuses_the_aggregators_file(keys: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = cli_main(
        ["agent", "--name", "a", "--trainer", "ckks_support:KnownTrainer"]
        + ["--he-context", str(keys / "aggregator.ctx"), "--url", "ws://127.0.0.1:9"]
    )
    assert rc == 2
    assert "holds no secret key" in capsys.readouterr().err


def test_encrypt_and_decrypt_model_files(
    keys: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import numpy as np

    from fedstack.store.modelfiles import read_model_file, write_model_file

    plain = {"a": np.linspace(-2, 2, 5000), "b": np.arange(6, dtype=np.float32).reshape(2, 3)}
    write_model_file(plain, tmp_path / "base.safetensors", "safetensors")
    agents = str(keys / "agents.ctx")
    args = ["he", "encrypt", str(tmp_path / "base.safetensors"), "--context", agents]
    assert cli_main([*args, "--out", str(tmp_path / "enc.safetensors")]) == 0
    enc, _ = read_model_file(tmp_path / "enc.safetensors")
    assert all(k.startswith("ckks.") and v.dtype == np.uint8 for k, v in enc.items())
    dec = ["he", "decrypt", str(tmp_path / "enc.safetensors"), "--context", agents]
    assert (
        cli_main(
            [*dec, "--like", str(tmp_path / "base.safetensors")]
            + ["--out", str(tmp_path / "out.npz")]
        )
        == 0
    )
    out, _ = read_model_file(tmp_path / "out.npz")
    assert np.max(np.abs(out["a"] - plain["a"])) < 1e-6 and out["b"].dtype == np.float32
    # the aggregator's file cannot decrypt; another layout is named as such
    capsys.readouterr()
    assert (
        cli_main(
            [
                "he",
                "decrypt",
                str(tmp_path / "enc.safetensors"),
                "--context",
                str(keys / "aggregator.ctx"),
            ]
            + ["--like", str(tmp_path / "base.safetensors"), "--out", str(tmp_path / "x.npz")]
        )
        == 2
    )
    assert "holds no secret key" in capsys.readouterr().err
    write_model_file({"a": np.zeros(5000)}, tmp_path / "other.npz", "npz")
    assert (
        cli_main([*dec, "--like", str(tmp_path / "other.npz"), "--out", str(tmp_path / "y.npz")])
        == 2
    )
    assert "other tensor names, dtypes or shapes" in capsys.readouterr().err
    assert not (tmp_path / "y.npz").exists()


def test_without_tenseal_the_he_extra_is_named(keys: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    for name in [m for m in sys.modules if m == "tenseal" or m.startswith("tenseal.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "tenseal", None)  # import fails
    with pytest.raises(ConfigError, match=r"pip install 'fedstack\[he\]'"):
        create("ckks-fedavg", context=str(keys / "aggregator.ctx"))
    # listing the strategies needs no TenSEAL
    assert "ckks-fedavg" in [s["name"] for s in describe()]
