"""The Keras 3 adapter (book row 23) on the PyTorch backend: a Keras model <-> named
numpy arrays, both ways, losslessly (every variable bit for bit, dtypes kept), with names
that do not depend on Keras's process-wide layer counters; and through a real federation."""

from __future__ import annotations

import concurrent.futures
import os
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "torch")  # before keras is first imported

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from fedstack import Agent, AggregatorConfig, FederationFinished  # noqa: E402
from fedstack.agent.adapters.keras import (  # noqa: E402
    model_to_weights,
    variable_names,
    weights_to_model,
)
from fedstack.errors import InvalidUpdate  # noqa: E402
from fedstack.testing import aggregator_thread  # noqa: E402
from fedstack.wire import ModelUpload, decode, encode  # noqa: E402


def build() -> keras.Model:
    """A small CNN: convolution, batch normalisation (non-trainable moving statistics), a
    nested Sequential block, multi-head attention, a float16 head."""
    inp = keras.Input((6, 6, 1))
    x = keras.layers.Conv2D(3, 3)(inp)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.Flatten()(x)
    x = keras.Sequential([keras.layers.Dense(8), keras.layers.Dense(4)], name="encoder")(x)
    seq = keras.layers.Reshape((2, 2))(x)
    x = keras.layers.MultiHeadAttention(num_heads=2, key_dim=2)(seq, seq)
    x = keras.layers.Flatten()(x)
    out = keras.layers.Dense(3, dtype="float16")(x)
    return keras.Model(inp, out)


def randomize(model: keras.Model, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for v in model.weights:
        v.assign(rng.standard_normal(tuple(v.shape)).astype(str(v.dtype)))


def arr(x: object) -> np.ndarray:
    """A Keras variable's (or a torch tensor's) value as numpy, on the torch backend."""
    t = getattr(x, "value", x)
    return np.asarray(t.detach().cpu().numpy())  # type: ignore[attr-defined]


def test_backend_is_torch() -> None:
    assert keras.backend.backend() == "torch"


def test_round_trip_is_lossless_between_two_instances() -> None:
    a, b = build(), build()
    randomize(a, 1)
    # Keras named b's layers dense_3, conv2d_1, ...: the adapter's names are the same
    assert [v.path for v in a.weights] != [v.path for v in b.weights]
    names = variable_names(a)
    assert names == variable_names(b)
    assert "batch_normalization/moving_mean" in names
    assert "encoder/dense_1/kernel" in names
    assert "multi_head_attention/query/kernel" in names
    assert len(names) == len(a.weights)

    weights = model_to_weights(a)
    assert weights["dense/kernel"].dtype == np.float16  # the head (the encoder's are inside)
    assert weights["conv2d/kernel"].dtype == np.float32
    # through the wire, as an agent's upload, then into the other instance
    msg = decode(
        b"".join(
            bytes(p)
            for p in encode(
                ModelUpload(
                    upload_id="u1", base_version=0, num_samples=1, metrics={}, model=weights
                )
            )
        )
    )
    assert isinstance(msg, ModelUpload)
    weights_to_model(b, msg.model)
    for va, vb in zip(a.weights, b.weights, strict=True):
        xa, xb = arr(va), arr(vb)
        assert xa.dtype == xb.dtype and xa.tobytes() == xb.tobytes(), va.path
    back = model_to_weights(b)
    assert list(back) == list(weights)
    for k, v in weights.items():
        assert back[k].dtype == v.dtype and back[k].tobytes() == v.tobytes(), k
    x = np.random.default_rng(2).standard_normal((4, 6, 6, 1)).astype(np.float32)
    ya, yb = arr(a(x, training=False)), arr(b(x, training=False))
    np.testing.assert_array_equal(ya, yb)
    # the arrays are copies: changing them changes neither model
    weights["conv2d/kernel"][...] = 0
    assert np.any(arr(a.weights[0]) != 0)


def test_mismatches_are_refused_with_what_differs() -> None:
    model = build()
    good = model_to_weights(model)
    bad = dict(good)
    del bad["conv2d/bias"]
    bad["extra/w"] = np.zeros(2, np.float32)
    bad["dense/kernel"] = np.zeros((5, 5), np.float16)
    with pytest.raises(InvalidUpdate) as info:
        weights_to_model(model, bad)
    text = str(info.value)
    assert "missing: conv2d/bias" in text and "unexpected: extra/w" in text
    assert "dense/kernel (model (4, 3), got (5, 5))" in text
    before = model_to_weights(model)
    with pytest.raises(InvalidUpdate, match="shape mismatch"):
        weights_to_model(model, bad, strict=False)  # shapes are checked either way
    partial = {"conv2d/kernel": np.ones((3, 3, 1, 3), np.float32)}
    weights_to_model(model, partial, strict=False)
    after = model_to_weights(model)
    np.testing.assert_array_equal(after["conv2d/kernel"], 1)
    np.testing.assert_array_equal(after["conv2d/bias"], before["conv2d/bias"])
    with pytest.raises(InvalidUpdate, match="cannot become"):
        weights_to_model(model, {**good, "conv2d/bias": np.array(["a", "b", "c"])})
    with pytest.raises(InvalidUpdate, match="build it first"):
        model_to_weights(keras.Sequential([keras.layers.Dense(2)]))


def test_keras_agents_federate_through_a_real_aggregator(tmp_path: Path) -> None:
    """Two agents with Keras models: the global model after one FedAvg round, loaded
    into a Keras model, is the sample-weighted mean of what they uploaded."""
    models = [build() for _ in range(3)]
    randomize(models[0], 7)
    start = model_to_weights(models[0])
    cfg = AggregatorConfig(
        host="127.0.0.1", port=0, db=str(tmp_path / "agg.db"), rounds=1, min_agents=2, auth="off"
    )

    def run(i: int, url: str) -> dict[str, np.ndarray]:
        model = models[i]
        agent = Agent(url, name=f"keras{i}", token=f"keras-agent-token-{i}-0123456789")
        agent.send_initial_model(start)
        agent.start(timeout=20)
        try:
            final: dict[str, np.ndarray] = {}
            while True:
                try:
                    gm = agent.wait_for_global_model(timeout=20)
                except FederationFinished:
                    return final
                weights_to_model(model, gm)
                final = model_to_weights(model)
                # "training": every float weight moves by i + 1
                trained = {
                    k: (v + (i + 1)).astype(v.dtype) if v.dtype.kind == "f" else v
                    for k, v in final.items()
                }
                agent.send_trained_model(trained, 10 * (i + 1), {})
        finally:
            agent.close()

    with aggregator_thread(cfg) as agg:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            finals = list(pool.map(lambda i: run(i, agg.url), [0, 1]))
    for final in finals:
        for k, v in start.items():
            # FedAvg of start + 1 (10 samples) and start + 2 (20 samples): start + 5/3
            expected = (v.astype(np.float64) + 5 / 3).astype(v.dtype)
            tol = 2e-3 if v.dtype == np.float16 else 1e-6
            np.testing.assert_allclose(final[k], expected, rtol=tol, atol=tol)
            assert final[k].dtype == v.dtype


def test_bfloat16_travels_as_float32_and_comes_back_exactly() -> None:
    def small() -> keras.Model:
        return keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, dtype="bfloat16")])

    a, b = small(), small()
    randomize(a, 3)
    weights = model_to_weights(a)
    assert {str(v.dtype) for v in a.weights} == {"bfloat16"}
    assert {w.dtype for w in weights.values()} == {np.dtype(np.float32)}  # numpy has no bf16
    weights_to_model(b, weights)
    for va, vb in zip(a.weights, b.weights, strict=True):
        assert str(vb.dtype) == "bfloat16"
        assert (
            arr(keras.ops.cast(va.value, "float32")).tobytes()
            == arr(keras.ops.cast(vb.value, "float32")).tobytes()
        )
