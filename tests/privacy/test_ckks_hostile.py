"""Hostile encrypted uploads to a live ``--he ckks`` aggregator: garbage ciphertexts,
ciphertexts under other parameters, another key set or another scale, oversized lengths,
smuggled bytes, wrong sizes. Each is refused with a message saying what is wrong, none
is stored, and the aggregator goes on to make a correct round from the honest agents."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from ckks_support import KnownTrainer, expected_globals, initial, samples

from fedstack.agent import Agent
from fedstack.agent.runner import run_trainer
from fedstack.privacy.ckks import (
    CHUNK_HEADER,
    META,
    CkksContext,
    CkksParams,
    CkksTrainer,
    Meta,
    chunk_name,
    encrypt_model,
    keygen,
    load_context,
    read_meta,
)
from fedstack.testing import aggregator_thread, small_config
from fedstack.types import Weights

Hostile = Callable[[CkksContext, dict[str, CkksContext]], Weights]


def _valid(ctx: CkksContext) -> Weights:
    return encrypt_model(ctx, initial(), 5)


def _garbage(ctx: CkksContext, others: dict[str, CkksContext]) -> Weights:
    enc = _valid(ctx)
    buf = enc[chunk_name(1)]
    length = int.from_bytes(buf[4:8].tobytes(), "little")
    rng = np.random.default_rng(1)
    buf[CHUNK_HEADER : CHUNK_HEADER + length] = rng.integers(0, 256, length, dtype=np.uint8)
    return enc


def _forge_key_id(enc: Weights, ctx: CkksContext) -> Weights:
    meta = read_meta(enc)
    forged = Meta(ctx.key_id, meta.layout, meta.values, meta.chunks, meta.data_slots)
    return {**enc, META: forged.encode()}


def _other_parameters(ctx: CkksContext, others: dict[str, CkksContext]) -> Weights:
    # same ring degree and number of data primes (so the same buffer sizes), other primes;
    # the header is forged to name this run's key set
    return _forge_key_id(encrypt_model(others["params"], initial(), 5), ctx)


def _other_key_set(ctx: CkksContext, others: dict[str, CkksContext]) -> Weights:
    return encrypt_model(others["key"], initial(), 5)


def _other_scale(ctx: CkksContext, others: dict[str, CkksContext]) -> Weights:
    import tenseal as ts

    from fedstack.privacy.ckks import _pack

    enc = _valid(ctx)
    vec = ts.ckks_vector(ctx.ts, np.ones(ctx.data_slots + 1), scale=2.0**30)
    enc[chunk_name(0)] = _pack(vec.serialize(), ctx.buffer_size)
    return enc


def _wrong_count(ctx: CkksContext, others: dict[str, CkksContext]) -> Weights:
    import tenseal as ts

    from fedstack.privacy.ckks import _pack

    enc = _valid(ctx)
    enc[chunk_name(0)] = _pack(ts.ckks_vector(ctx.ts, np.ones(10)).serialize(), ctx.buffer_size)
    return enc


def _oversized_length(ctx: CkksContext, others: dict[str, CkksContext]) -> Weights:
    enc = _valid(ctx)
    enc[chunk_name(0)][4:8] = np.frombuffer((1 << 31).to_bytes(4, "little"), np.uint8)
    return enc


def _smuggled_bytes(ctx: CkksContext, others: dict[str, CkksContext]) -> Weights:
    enc = _valid(ctx)
    enc[chunk_name(2)][-16:] = 7
    return enc


def _bigger_buffers(ctx: CkksContext, others: dict[str, CkksContext]) -> Weights:
    enc = _valid(ctx)
    return {
        k: (np.concatenate([v, np.zeros(100, np.uint8)]) if k != META else v)
        for k, v in enc.items()
    }


def _no_header(ctx: CkksContext, others: dict[str, CkksContext]) -> Weights:
    enc = _valid(ctx)
    enc[META] = np.zeros_like(enc[META])
    return enc


def _plain_model(ctx: CkksContext, others: dict[str, CkksContext]) -> Weights:
    return initial()


HOSTILE: list[tuple[str, Hostile, str]] = [
    ("garbage", _garbage, "not a ciphertext under this run's CKKS parameters"),
    ("other-parameters", _other_parameters, "not a ciphertext under this run's CKKS parameters"),
    ("other-key-set", _other_key_set, "encrypted under key set"),
    ("other-scale", _other_scale, "has scale 2^30.0, not 2^40"),
    ("wrong-count", _wrong_count, "holds 10 values, expected 4096"),
    ("oversized-length", _oversized_length, "does not fit its buffer"),
    ("smuggled-bytes", _smuggled_bytes, "bytes after the ciphertext are not zero"),
    ("bigger-buffers", _bigger_buffers, "has shape"),
    ("no-header", _no_header, "is not a CKKS model header"),
    ("plain-model", _plain_model, "tensor names differ"),
]


def test_hostile_uploads_are_refused_and_the_round_is_right(tmp_path: Path) -> None:
    agents_ctx, aggregator_ctx = keygen(tmp_path / "keys")
    ctx = load_context(agents_ctx, "agents")
    others = {
        "params": load_context(
            keygen(tmp_path / "params", CkksParams(8192, (50, 50, 50), 40))[0], "agents"
        ),
        "key": load_context(keygen(tmp_path / "key")[0], "agents"),
    }
    config = small_config(
        tmp_path / "run.db",
        he="ckks",
        he_context=str(aggregator_ctx),
        strategy_params={},
        rounds=2,
        min_agents=2,
    )
    with aggregator_thread(config) as agg:
        url = f"ws://127.0.0.1:{agg.port}"
        attacker = Agent(url, name="mallory")
        attacker.send_initial_model(_valid(ctx))
        attacker.start(timeout=30)
        attacker.wait_for_global_model(timeout=30)
        for i, (label, make, words) in enumerate(HOSTILE):
            assert attacker.send_trained_model(make(ctx, others), 5), label
            attacker.flush(timeout=30)
            assert len(attacker.refusals) == i + 1, (label, attacker.refusals)
            refusal = attacker.refusals[-1]
            assert refusal.code == "invalid-model" and words in refusal.message, (label, refusal)
        attacker.close()
        assert agg.store is not None
        stored = agg.store.models(agg.run_id, kind="local")
        # the initial model only (round 0): no refused upload was stored
        assert [m["round"] for m in stored] == [0], stored

        # the aggregator is up: two honest agents make both rounds, correctly
        trainers = [KnownTrainer(index=i) for i in range(2)]
        errors: list[BaseException] = []

        def run(i: int) -> None:
            try:
                run_trainer(CkksTrainer(trainers[i], ctx), url, f"agent-{i}")
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
    expected = expected_globals(2, 2)
    for trainer in trainers:
        assert trainer.final is not None
        for k, ref in expected[-1].items():
            assert np.max(np.abs(trainer.final[k] - ref)) <= 1e-6
    assert samples(0) != samples(1)  # the weighting is exercised


def test_foreign_ciphertext_with_a_forged_header_is_caught_by_the_agents(tmp_path: Path) -> None:
    """The aggregator cannot tell a ciphertext under another key set with the same
    parameters (CKKS ciphertexts are indistinguishable by design) once its header is
    forged; the agents can: its sum does not decrypt to the update counters."""
    from fedstack.errors import InvalidUpdate
    from fedstack.privacy.ckks import CkksDecryptError, CkksSum, decrypt_model

    ctx = load_context(keygen(tmp_path / "a")[0], "agents")
    other = load_context(keygen(tmp_path / "b")[0], "agents")
    public = load_context(tmp_path / "a" / "aggregator.ctx", "aggregator")
    honest = encrypt_model(ctx, initial(), 3)
    forged = _forge_key_id(encrypt_model(other, initial(), 4), ctx)
    acc = CkksSum(public, honest)
    acc.add(honest, 3)
    try:
        acc.add(forged, 4)  # indistinguishable from an honest upload
    except InvalidUpdate as exc:  # pragma: no cover - would mean CKKS leaks the key
        pytest.fail(f"the aggregator told ciphertexts of two key sets apart: {exc}")
    summed = acc.result()
    with pytest.raises(CkksDecryptError, match="does not decrypt to a sum under this key set"):
        decrypt_model(ctx, summed, initial())
    # the honest sum alone decrypts
    acc = CkksSum(public, honest)
    acc.add(honest, 3)
    model, total, updates = decrypt_model(ctx, acc.result(), initial())
    assert updates == 1 and abs(total - 3) < 1e-6


def test_a_restarted_aggregator_sums_the_stored_ciphertexts(tmp_path: Path) -> None:
    """An upload stored before a restart is parsed from the store on resume and summed with
    the uploads that come after it."""
    from fedstack.testing import free_port

    agents_ctx, aggregator_ctx = keygen(tmp_path / "keys")
    ctx = load_context(agents_ctx, "agents")
    port = free_port()
    config = small_config(
        tmp_path / "run.db",
        port=port,
        he="ckks",
        he_context=str(aggregator_ctx),
        strategy_params={},
        rounds=1,
        min_agents=2,
    )
    url = f"ws://127.0.0.1:{port}"
    trainers = [CkksTrainer(KnownTrainer(index=i), ctx) for i in range(2)]
    agents = [Agent(url, name=f"agent-{i}", max_backoff=0.3) for i in range(2)]
    with aggregator_thread(config):
        for agent, trainer in zip(agents, trainers, strict=True):
            agent.send_initial_model(trainer.initial_weights())
            agent.start(timeout=30)
        globals_ = [agent.wait_for_global_model(timeout=30) for agent in agents]
        enc, n, _ = trainers[0].fit(globals_[0], {"version": 0})
        assert agents[0].send_trained_model(enc, n)
        agents[0].flush(timeout=30)  # stored: buffered for round 1
        assert agents[0].refusals == []
    with aggregator_thread(config):  # resumes the run from the store
        enc, n, _ = trainers[1].fit(globals_[1], {"version": 0})
        assert agents[1].send_trained_model(enc, n)
        finals = [agent.wait_for_global_model(timeout=60) for agent in agents]
        for agent in agents:
            agent.close()
    expected = expected_globals(2, 1)[-1]
    for final in finals:
        got = trainers[0].decrypt(final)
        assert trainers[0].last_sum is not None and trainers[0].last_sum[1] == 2
        for k, want in expected.items():
            assert np.max(np.abs(got[k] - want)) <= 1e-6


def test_a_plain_first_model_is_refused_and_never_stored(tmp_path: Path) -> None:
    """An agent without --he-context cannot make its plain model the run's first global
    model: it is refused at registration, nothing of it is stored, and an encrypting agent
    then starts the run."""
    from fedstack.errors import FedstackError
    from fedstack.store import Store
    from fedstack.testing import free_port

    agents_ctx, aggregator_ctx = keygen(tmp_path / "keys")
    ctx = load_context(agents_ctx, "agents")
    port = free_port()
    config = small_config(
        tmp_path / "run.db",
        port=port,
        he="ckks",
        he_context=str(aggregator_ctx),
        strategy_params={},
        rounds=1,
        min_agents=1,
    )
    url = f"ws://127.0.0.1:{port}"
    with aggregator_thread(config) as agg:
        plain = Agent(url, name="plain", max_backoff=0.3)
        plain.send_initial_model(initial())
        with pytest.raises(FedstackError, match="not a CKKS-encrypted model"):
            plain.start(timeout=20)
        plain.close()
        assert not agg._initialized.is_set()
        trainer = CkksTrainer(KnownTrainer(index=0), ctx)
        agent = Agent(url, name="encrypting", max_backoff=0.3)
        agent.send_initial_model(trainer.initial_weights())
        agent.start(timeout=30)
        gm = agent.wait_for_global_model(timeout=30)
        assert set(gm) == set(trainer.initial_weights())  # ciphertext chunks, not coef/...
        agent.close()
        run_id = agg.run_id
    store = Store.open_readonly(str(tmp_path / "run.db"))
    try:
        for rec in store.models(run_id):
            names = set(store.load_weights(rec["id"]))
            assert META in names and not names & set(initial()), names
    finally:
        store.close()


def test_an_encrypting_agent_refuses_an_aggregator_without_its_key_set(tmp_path: Path) -> None:
    from fedstack.privacy.ckks import CkksError

    ctx = load_context(keygen(tmp_path / "a")[0], "agents")
    other = load_context(keygen(tmp_path / "b")[0], "agents")
    trainer = CkksTrainer(KnownTrainer(index=0), ctx)
    enc = trainer.initial_weights()
    with pytest.raises(CkksError, match="does not run homomorphic encryption"):
        trainer.fit(enc, {"version": 0, "federation": {}})
    with pytest.raises(CkksError, match="another key set"):
        trainer.fit(
            enc, {"version": 0, "federation": {"he": "ckks", "he_key_id": other.key_id.hex()}}
        )
    out, n, _ = trainer.fit(
        enc, {"version": 0, "federation": {"he": "ckks", "he_key_id": ctx.key_id.hex()}}
    )
    assert n == samples(0) and META in out
