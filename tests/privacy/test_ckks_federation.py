"""CKKS through a real aggregator process and real agents (two in threads, one through
``fedstack agent --he-context``): the decrypted global model is plain weighted FedAvg
within CKKS' error, the aggregator's memory never holds the secret key nor an agent's
plain update, and the store holds nothing but ciphertexts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from ckks_support import (
    KnownTrainer,
    expected_globals,
    initial,
    scan_memory,
    secret_key_needle,
)

from fedstack.agent.runner import run_trainer
from fedstack.cli.main import main as cli_main
from fedstack.privacy.ckks import CkksTrainer, keygen, load_context
from fedstack.store import Store
from fedstack.store.modelfiles import read_model_file, write_model_file
from fedstack.testing import AggregatorProcess

ROUNDS = 3
AGENTS = 3
BOUND = 1e-6
"""Largest absolute difference accepted between the decrypted global model and plain
weighted FedAvg (float64, values of order 1; scale 2**40). Observed: ~2e-8."""

SRC = Path(__file__).resolve().parents[2] / "src"
HERE = Path(__file__).resolve().parent

pytestmark = pytest.mark.skipif(
    not os.path.exists("/proc/self/mem"), reason="needs Linux /proc for the memory scan"
)


def _env() -> dict[str, str]:
    path = os.pathsep.join([str(SRC), str(HERE), os.environ.get("PYTHONPATH", "")])
    return dict(os.environ, PYTHONPATH=path, PYTHONUNBUFFERED="1")


def _control_holding_the_key(agents_ctx: Path) -> subprocess.Popen[str]:
    code = (
        "import sys\n"
        "from fedstack.privacy.ckks import load_context\n"
        f"ctx = load_context({str(agents_ctx)!r}, 'agents')\n"
        "print('ready', flush=True)\n"
        "sys.stdin.read()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    return proc


@pytest.mark.slow
def test_encrypted_federation_equals_plain_fedavg_and_aggregator_never_holds_the_key(
    tmp_path: Path,
) -> None:
    if os.geteuid() != 0:
        pytest.skip("reading another process's memory needs root (the suite runs as root)")
    agents_ctx, aggregator_ctx = keygen(tmp_path / "keys")
    ctx = load_context(agents_ctx, "agents")
    sk_needle = secret_key_needle(ctx)
    db = tmp_path / "run.db"
    agg = AggregatorProcess(
        tmp_path,
        "--db",
        str(db),
        "--rounds",
        str(ROUNDS),
        "--min-agents",
        str(AGENTS),
        "--he",
        "ckks",
        "--he-context",
        str(aggregator_ctx),
        "--auth",
        "off",
        "--heartbeat-interval",
        "0.5",
        "--finish-grace",
        "1",
        "--round-timeout",
        "120",
    )
    agg.start()
    assert agg.proc is not None
    pid = agg.proc.pid
    scans: dict[str, list[bool]] = {}
    trainers = [KnownTrainer(index=i, num_agents=AGENTS) for i in range(2)]

    def scan_at(version: int) -> None:
        # agent 0 at version 2: the aggregator has checked, summed and stored two rounds
        if version == 2 and "aggregator" not in scans:
            plain = np.concatenate([v.ravel() for v in trainers[1].uploaded[0].values()])
            scans["aggregator"] = scan_memory(pid, [sk_needle, plain[100:108].tobytes()])

    trainers[0].on_fit = scan_at
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            run_trainer(CkksTrainer(trainers[i], agents_ctx), agg.url, f"agent-{i}")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(2)]
    for t in threads:
        t.start()
    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedstack",
            "agent",
            "--name",
            "agent-2",
            "--url",
            agg.url,
            "--trainer",
            "ckks_support:KnownTrainer",
            "--trainer-arg",
            "index=2",
            "--he-context",
            str(agents_ctx),
        ],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=240,
    )
    for t in threads:
        t.join(120)
    assert cli.returncode == 0, cli.stderr[-3000:]
    assert not errors, errors
    assert agg.wait(60) == 0, agg.log_text()[-3000:]

    # the global model of every version, decrypted by the agents, is plain weighted FedAvg
    expected = expected_globals(AGENTS, ROUNDS)
    worst = 0.0
    for trainer in trainers:
        # run_trainer fits every global model, the final one (version ROUNDS) too
        assert sorted(trainer.seen) == list(range(ROUNDS + 1))
        assert trainer.final is not None
        got = [*(trainer.seen[v] for v in range(ROUNDS)), trainer.final]
        for version, (model, ref) in enumerate(zip(got, expected, strict=True)):
            assert model is not None
            for k in ref:
                assert model[k].dtype == np.float64 and model[k].shape == ref[k].shape
                err = float(np.max(np.abs(model[k] - ref[k])))
                worst = max(worst, err)
                assert err <= BOUND, (version, k, err)
    assert worst > 0.0  # CKKS is approximate: an exact match would mean no encryption
    final_cli = json.loads(cli.stdout.strip().splitlines()[-1])
    flat = np.concatenate([v.ravel() for v in expected[-1].values()])
    assert abs(final_cli["checksum"] - flat.sum()) <= BOUND * flat.size
    assert abs(final_cli["first"] - flat[0]) <= BOUND

    # the aggregator's memory never held the secret key nor an agent's plain update ...
    assert scans["aggregator"] == [False, False], scans
    # ... while the same scan finds the key in a process that loaded agents.ctx
    control = _control_holding_the_key(agents_ctx)
    try:
        assert scan_memory(control.pid, [sk_needle]) == [True]
    finally:
        assert control.stdin is not None
        control.stdin.close()
        control.wait(30)

    # the store holds only ciphertexts: every model, from the first on
    store = Store.open_readonly(str(db))
    try:
        # the final global model exported from the store decrypts (fedstack he decrypt)
        run_id = store.latest_run_id()
        assert run_id is not None
        final_id = store.global_model_id(run_id, ROUNDS)
        assert final_id is not None
        store.export_model(final_id, tmp_path / "final.safetensors")
        write_model_file(initial(), tmp_path / "like.npz", "npz")
        rc = cli_main(
            ["he", "decrypt", str(tmp_path / "final.safetensors"), "--context", str(agents_ctx)]
            + ["--like", str(tmp_path / "like.npz"), "--out", str(tmp_path / "plain.npz")]
        )
        assert rc == 0
        plain, _ = read_model_file(tmp_path / "plain.npz")
        for k, want in expected[-1].items():
            assert np.max(np.abs(plain[k] - want)) <= BOUND
        models = store.models()
        assert {m["kind"] for m in models} == {"local", "cluster"}
        assert len(models) >= AGENTS * ROUNDS + ROUNDS + 1
        for m in models:
            weights = store.load_weights(m["id"])
            assert weights and all(k.startswith("ckks.") for k in weights), list(weights)[:3]
            assert all(a.dtype == np.uint8 for a in weights.values())
    finally:
        store.close()
    stored = db.read_bytes() + b"".join(
        p.read_bytes() for p in (tmp_path / "run.db.blobs").rglob("*") if p.is_file()
    )
    plain_models: list[dict[str, Any]] = [initial(), *trainers[0].uploaded, *trainers[1].uploaded]
    for model in plain_models:
        for arr in model.values():
            for dtype in (np.float64, np.float32):
                assert arr.ravel()[:8].astype(dtype).tobytes() not in stored


def test_a_registered_encrypted_base_model_starts_the_run(tmp_path: Path) -> None:
    """``fedstack he encrypt`` + ``fedstack model register``: the operator's base model,
    encrypted, is the agents' first global model."""
    from fedstack.testing import aggregator_thread, small_config

    agents_ctx, aggregator_ctx = keygen(tmp_path / "keys")
    base = {k: v + 1.0 for k, v in initial().items()}  # not what the trainer proposes
    write_model_file(base, tmp_path / "base.npz", "npz")
    enc = tmp_path / "base-enc.safetensors"
    assert (
        cli_main(
            ["he", "encrypt", str(tmp_path / "base.npz"), "--context", str(agents_ctx)]
            + ["--out", str(enc)]
        )
        == 0
    )
    db = tmp_path / "run.db"
    assert cli_main(["model", "register", str(enc), "--db", str(db)]) == 0
    config = small_config(
        db, he="ckks", he_context=str(aggregator_ctx), strategy_params={}, rounds=1
    )
    trainer = KnownTrainer(index=0)
    with aggregator_thread(config) as agg:
        run_trainer(CkksTrainer(trainer, agents_ctx), f"ws://127.0.0.1:{agg.port}", "agent-0")
    for k, v in base.items():
        assert np.max(np.abs(trainer.seen[0][k] - v)) <= BOUND
