"""The encrypted model format: fixed sizes from the parameters, CKKS' error on a sum,
dtypes and shapes restored, and the agents' checks of what they decrypt."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from ckks_support import initial

from fedstack.privacy.ckks import (
    META,
    CkksContext,
    CkksDecryptError,
    CkksError,
    CkksParams,
    CkksSum,
    CkksTrainer,
    chunk_name,
    ciphertext_bound,
    decrypt_model,
    encrypt_model,
    keygen,
    load_context,
    read_meta,
)
from fedstack.strategies import Update, create


@pytest.fixture(scope="module")
def key_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("keys")
    keygen(out)
    return out


@pytest.fixture(scope="module")
def contexts(key_dir: Path) -> tuple[CkksContext, CkksContext]:
    return load_context(key_dir / "agents.ctx", "agents"), load_context(
        key_dir / "aggregator.ctx", "aggregator"
    )


@pytest.mark.parametrize("size", [1, 4094, 4095, 4096, 9000])
def test_sizes_are_fixed_by_the_parameters(
    contexts: tuple[CkksContext, CkksContext], size: int
) -> None:
    ctx, public = contexts
    model = {"w": np.linspace(-1, 1, size)}
    enc = encrypt_model(ctx, model, 7)
    # values + the sample count; data_slots values per ciphertext
    assert len(enc) == 1 + ctx.chunks_for(size + 1)
    assert sum(a.nbytes for a in enc.values()) == ctx.encrypted_size(size)
    assert all(a.dtype == np.uint8 for a in enc.values())
    assert {a.shape for k, a in enc.items() if k != META} == {(ctx.buffer_size,)}
    acc = CkksSum(public, enc)
    for n in (7, 1, 1000):
        acc.add(encrypt_model(ctx, model, n), n)
    out = acc.result()
    assert {k: (a.dtype, a.shape) for k, a in out.items()} == {
        k: (a.dtype, a.shape) for k, a in enc.items()
    }


def test_bound_holds_for_fresh_and_summed_ciphertexts(
    contexts: tuple[CkksContext, CkksContext],
) -> None:
    import tenseal as ts

    ctx, _ = contexts
    bound = ciphertext_bound(ctx.params)
    rng = np.random.default_rng(3)
    total = None
    for _ in range(30):
        vec = ts.ckks_vector(ctx.ts, rng.standard_normal(ctx.data_slots + 1) * 1e6)
        assert len(vec.serialize()) <= bound
        total = vec if total is None else total + vec
    assert total is not None and len(total.serialize()) <= bound
    # the bound is tight: within 15 % of the largest serialisation seen
    assert len(total.serialize()) > 0.85 * bound


def test_decrypted_sum_is_weighted_fedavg_within_ckks_error(
    contexts: tuple[CkksContext, CkksContext], key_dir: Path
) -> None:
    ctx, _ = contexts
    rng = np.random.default_rng(5)
    template: dict[str, np.ndarray] = {
        "f64": rng.standard_normal((30, 50)),
        "f32": rng.standard_normal(300).astype(np.float32),
        "i64": np.arange(12, dtype=np.int64).reshape(3, 4),
        "flag": np.array([True, False, True]),
    }
    counts = [int(n) for n in rng.integers(1, 5000, size=20)]
    models: list[dict[str, np.ndarray]] = [
        {
            "f64": rng.standard_normal((30, 50)) * 10,
            "f32": rng.standard_normal(300).astype(np.float32),
            "i64": rng.integers(-100, 100, (3, 4)),
            "flag": rng.random(3) > 0.5,
        }
        for _ in counts
    ]
    strategy = create("ckks-fedavg", context=str(key_dir / "aggregator.ctx"))
    init = encrypt_model(ctx, template, 1)
    acc = strategy.begin(init, {})
    for i, (m, n) in enumerate(zip(models, counts, strict=True)):
        upd = Update(f"a{i}", encrypt_model(ctx, m, n), n)
        strategy.check(upd, init)
        acc.add(upd)
    result = acc.result()
    assert result.metrics == {"num_updates": 20, "num_samples": sum(counts)}
    got, total, updates = decrypt_model(ctx, result.weights, template)
    assert updates == 20 and abs(total - sum(counts)) < 1e-3
    plain = create("fedavg", precision="float64").begin(template, {})
    for i, (m, n) in enumerate(zip(models, counts, strict=True)):
        plain.add(Update(f"a{i}", m, n))
    ref = plain.result().weights
    for k in template:
        assert got[k].dtype == template[k].dtype and got[k].shape == template[k].shape
    # float64: CKKS' error only (observed ~1e-9 here); float32: rounding to float32 on top
    assert np.max(np.abs(got["f64"] - ref["f64"])) <= 1e-6
    assert np.max(np.abs(got["f32"].astype(np.float64) - ref["f32"])) <= 1e-6
    # integers and booleans: the rounded mean, as plain FedAvg (a tie could flip: none here)
    assert np.array_equal(got["i64"], ref["i64"])
    assert np.array_equal(got["flag"], ref["flag"])


def test_agents_check_what_they_decrypt(contexts: tuple[CkksContext, CkksContext]) -> None:
    ctx, _ = contexts
    enc = encrypt_model(ctx, initial(), 2)
    model, total, updates = decrypt_model(ctx, enc, initial())
    assert updates == 1 and abs(total - 2) < 1e-6
    other_layout = dict(initial())
    other_layout["dense/bias"] = other_layout["dense/bias"][:-1]
    with pytest.raises(CkksDecryptError, match="other tensor names, dtypes or shapes"):
        decrypt_model(ctx, enc, other_layout)
    bad = dict(enc)
    bad[chunk_name(1)] = bad[chunk_name(1)].copy()
    bad[chunk_name(1)][100:200] ^= 0xFF
    with pytest.raises(CkksDecryptError, match="the global model"):
        decrypt_model(ctx, bad, initial())
    with pytest.raises(CkksDecryptError, match="not a CKKS-encrypted model"):
        decrypt_model(ctx, initial(), initial())
    zeros = {k: np.zeros_like(v) for k, v in enc.items()}
    with pytest.raises(CkksDecryptError):
        decrypt_model(ctx, zeros, initial())


def test_encryption_refuses_what_it_cannot_carry(
    contexts: tuple[CkksContext, CkksContext],
) -> None:
    ctx, public = contexts
    with pytest.raises(CkksError, match="NaN or infinite"):
        encrypt_model(ctx, {"w": np.array([1.0, np.nan])}, 1)
    with pytest.raises(CkksError, match="exceeds"):
        encrypt_model(ctx, {"w": np.array([1e12])}, 1000)
    with pytest.raises(CkksError, match="cannot encrypt"):
        encrypt_model(public, {"w": np.ones(3)}, 1)
    with pytest.raises(CkksError, match="cannot decrypt"):
        decrypt_model(public, encrypt_model(ctx, {"w": np.ones(3)}, 1), {"w": np.ones(3)})
    assert read_meta(encrypt_model(ctx, {"w": np.ones(3)}, 1)).values == 4
    assert CkksParams().headroom_bits == 59


class _Inner:
    def __init__(self, samples: int, extra: bool = False) -> None:
        self.samples = samples
        self.extra = extra
        self.got: list[dict[str, Any]] = []

    def initial_weights(self) -> dict[str, np.ndarray]:
        return {"w": np.zeros(5)}

    def fit(self, weights: dict[str, np.ndarray], config: Any) -> tuple[Any, ...]:
        self.got.append(weights)
        out = {"w": weights["w"] + 1.0}
        if self.extra:
            return out, self.samples, {}, {"c": np.ones(5)}
        return out, self.samples, {"loss": 0.5}

    def evaluate(self, weights: dict[str, np.ndarray], config: Any) -> dict[str, Any]:
        return {"mean": float(weights["w"].mean())}


def test_trainer_wrapper(contexts: tuple[CkksContext, CkksContext]) -> None:
    ctx, public = contexts
    inner = _Inner(samples=0)
    trainer = CkksTrainer(inner, ctx)
    init = trainer.initial_weights()
    assert set(init) == {META, chunk_name(0)}
    enc, n, metrics = trainer.fit(init, {"version": 0})
    assert n == 0 and metrics == {"loss": 0.5} and np.allclose(inner.got[0]["w"], 0, atol=1e-6)
    # an agent reporting no samples counts once, as in plain FedAvg
    model, total, _ = decrypt_model(ctx, enc, inner.initial_weights())
    assert abs(total - 1) < 1e-6 and np.allclose(model["w"], 1.0, atol=1e-6)
    assert abs(trainer.evaluate(enc, {})["mean"] - 1.0) < 1e-6  # type: ignore[operator]
    with pytest.raises(CkksError, match="extra arrays"):
        CkksTrainer(_Inner(3, extra=True), ctx).fit(init, {"version": 0})
    with pytest.raises(CkksError, match="needs the agents' context"):
        CkksTrainer(inner, public)


def test_add_reuses_what_check_parsed_and_only_that(
    contexts: tuple[CkksContext, CkksContext], key_dir: Path
) -> None:
    ctx, _ = contexts
    strategy = create("ckks-fedavg", context=str(key_dir / "aggregator.ctx"))
    model = {"w": np.linspace(0, 1, 5000)}
    init = encrypt_model(ctx, model, 1)
    first = encrypt_model(ctx, model, 2)
    strategy.check(Update("a", first, 2), init)
    same_values_other_arrays = {k: v.copy() for k, v in first.items()}
    assert strategy.take_parsed(same_values_other_arrays) is None  # type: ignore[attr-defined]
    parsed = strategy.take_parsed(first)  # type: ignore[attr-defined]
    assert parsed is not None and len(parsed[1]) == 2
    assert strategy.take_parsed(first) is None  # type: ignore[attr-defined]  # taken once
    for i in range(10):  # bounded: only the last few checks are kept
        strategy.check(Update(f"b{i}", encrypt_model(ctx, model, 1), 1), init)
    assert len(strategy._parsed) <= 4  # type: ignore[attr-defined]
    # through the accumulator: the sum is the same whether parsed once or twice
    acc = strategy.begin(init, {})
    upd = Update("c", encrypt_model(ctx, model, 3), 3)
    strategy.check(upd, init)
    acc.add(upd)
    acc.add(Update("d", encrypt_model(ctx, model, 5), 5))  # not checked: parsed in add
    got, total, updates = decrypt_model(ctx, acc.result().weights, model)
    assert updates == 2 and abs(total - 8) < 1e-6
    assert np.max(np.abs(got["w"] - model["w"])) < 1e-6


def test_a_header_claiming_billions_of_ciphertexts_is_refused_cheaply(
    contexts: tuple[CkksContext, CkksContext],
) -> None:
    from fedstack.errors import InvalidUpdate
    from fedstack.privacy.ckks import Meta

    ctx, public = contexts
    enc = encrypt_model(ctx, {"w": np.ones(10)}, 1)
    meta = read_meta(enc)
    huge = Meta(meta.key_id, meta.layout, ((1 << 32) - 1) * 4095, (1 << 32) - 1, 4095)
    forged = {**enc, META: huge.encode()}
    damaged_initial = {k: np.zeros_like(v) for k, v in enc.items()}  # no expected layout
    with pytest.raises(InvalidUpdate, match="claims 4294967295 ciphertext"):
        CkksSum(public, damaged_initial).check(forged)
