"""Book row 54: a VGG-16-size model (~0.5 GB) makes a round trip within the limits.

A real ``fedstack aggregator`` process, its largest accepted message configured just
above the model (``--max-message-bytes``), and one real :class:`fedstack.Agent` (this
process) with a VGG-16 model's tensors and shapes: the agent seeds the federation with
it, receives it back in its welcome, uploads a trained version, and receives the global
model of the round, which must be that upload bit for bit (FedAvg of one). Before that,
a model one MiB over the limit is refused with a message saying so. The aggregator's
peak resident memory above its resident size at start must stay under 4 models (the
upload being received, the FedAvg accumulator, the global model, and the transport's
buffers).

The suite runs ImageNet's VGG-16 (138,357,544 float32 parameters, 553 MB; limit
560 MiB): measured on this 2-core VM under a load of ~3.7, the seed, welcome, upload and
global model took 10.8 s (16 s with building the model and starting the aggregator) and
the aggregator peaked 3.00 models above its start (1,674 MiB). ``CLAIMS_REDUCED_SIZE=1``
runs VGG-16 for CIFAR-10 instead (the same 13 convolutions, a 512-512-10 classifier:
15.2 M parameters, 61 MB; limit 64 MiB) for a quick check; the code path is the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from pathlib import Path

import numpy as np
import pytest

from fedstack import Agent, FederationFinished
from fedstack.errors import ConnectionClosed
from fedstack.testing import AggregatorProcess
from fedstack.transport import connect
from fedstack.wire import Error, Participate, decode, encode

FULL = os.environ.get("CLAIMS_REDUCED_SIZE") != "1"
LIMIT = (560 if FULL else 64) << 20  # bytes: the configured largest message
PARAMS = 138_357_544 if FULL else 15_245_130

CONV = [(64, 3), (64, 64), (128, 64), (128, 128), (256, 128), (256, 256), (256, 256)]
CONV += [(512, 256), (512, 512), (512, 512), (512, 512), (512, 512), (512, 512)]
FC = [(4096, 25088), (4096, 4096), (1000, 4096)] if FULL else [(512, 512), (512, 512), (10, 512)]

pytestmark = pytest.mark.slow


def vgg16_shapes() -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for i, (out, inp) in enumerate(CONV):
        shapes[f"features.{i}.weight"] = (out, inp, 3, 3)
        shapes[f"features.{i}.bias"] = (out,)
    for i, (out, inp) in enumerate(FC):
        shapes[f"classifier.{i}.weight"] = (out, inp)
        shapes[f"classifier.{i}.bias"] = (out,)
    return shapes


def vgg16_model() -> dict[str, np.ndarray]:
    block = np.random.default_rng(0).standard_normal(1 << 20, dtype=np.float32) * 0.01
    return {k: np.resize(block, s) for k, s in vgg16_shapes().items()}


async def _over_the_limit(url: str) -> str:
    """Offer a model one MiB over the limit; what the aggregator answers."""
    conn = await connect(url, max_message_bytes=1 << 30)
    try:
        big = {"w": np.zeros((LIMIT >> 2) + (1 << 18), np.float32)}  # untouched pages
        conn.write(encode(Participate(agent_name="too-big", model=big)))
        with contextlib.suppress(ConnectionClosed, OSError):
            await conn.drain()
        try:
            reply = decode(await asyncio.wait_for(conn.recv(), 30))
        except ConnectionClosed as exc:
            return exc.reason
        assert isinstance(reply, Error), reply
        return reply.message
    finally:
        conn.abort()


def _status(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {key} for {pid}")


@pytest.mark.timeout(240)
def test_vgg16_size_model_round_trip(tmp_path: Path) -> None:
    model = vgg16_model()
    size = sum(a.nbytes for a in model.values())
    assert sum(a.size for a in model.values()) == PARAMS
    assert 0.9 * LIMIT < size < LIMIT
    agg = AggregatorProcess(
        tmp_path,
        "--db", str(tmp_path / "agg.db"),
        "--auth", "off",
        "--min-agents", "1",
        "--rounds", "1",
        "--max-message-bytes", str(LIMIT),
        "--send-timeout", "120",
        "--finish-grace", "30",
    )  # fmt: skip
    agg.start()
    agent = Agent(agg.url, name="vgg", max_message_bytes=LIMIT)
    try:
        assert agg.proc is not None
        start = _status(agg.proc.pid, "VmRSS")
        refusal = asyncio.run(_over_the_limit(agg.url))
        assert f"exceeds the limit of {LIMIT} bytes" in refusal, refusal
        t0 = time.monotonic()
        agent.send_initial_model(model)
        agent.start(timeout=120)
        welcomed = agent.wait_for_global_model(120)  # the seed, back in the welcome
        assert set(welcomed) == set(model)
        assert all(np.array_equal(welcomed[k], model[k]) for k in model)
        trained = {k: v + np.float32(0.001) for k, v in welcomed.items()}
        del welcomed
        agent.send_trained_model(trained, 1)
        try:
            final = agent.wait_for_global_model(120)
        except FederationFinished:
            pytest.fail("the federation finished without handing over the round's model")
        seconds = time.monotonic() - t0
        assert agent.version == 1
        for k, v in trained.items():
            assert final[k].shape == v.shape and final[k].dtype == np.float32
            assert np.array_equal(final[k], v), k
        peak = _status(agg.proc.pid, "VmHWM")
    finally:
        agent.close()
        agg.close()
    print(
        f"VGG-16 ({PARAMS:,} parameters, {size / 1e6:.0f} MB): seed, welcome, upload and "
        f"global model in {seconds:.1f} s; aggregator RSS {start / 2**20:.0f} MiB at start, peak "
        f"{peak / 2**20:.0f} MiB ({(peak - start) / size:.2f} models above the start)"
    )
    assert peak - start < 4 * size
