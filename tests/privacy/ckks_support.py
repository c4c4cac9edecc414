"""Shared pieces of the CKKS tests: a deterministic trainer with known updates, the plain
weighted FedAvg it should produce, and a scanner of another process's memory."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

SHAPES = {"dense/kernel": (40, 200), "dense/bias": (200,), "head/kernel": (200, 3)}
"""8600 values: three ciphertexts of 4095 values at N = 8192."""


def initial(seed: int = 7) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s) for k, s in SHAPES.items()}


def samples(index: int) -> int:
    return 10 * (index + 1) + 3


def step(weights: Mapping[str, np.ndarray], index: int, version: int) -> dict[str, np.ndarray]:
    """Agent ``index``'s training on global ``version``: a known, agent-specific move."""
    out = {}
    for j, (k, w) in enumerate(weights.items()):
        phase = np.arange(w.size, dtype=np.float64).reshape(w.shape)
        out[k] = w + 0.1 * (index + 1) * np.sin(phase * 0.01 + version + j) - 0.05 * index
    return out


def fedavg(models: list[dict[str, np.ndarray]], counts: list[int]) -> dict[str, np.ndarray]:
    total = float(sum(counts))
    out = {}
    for k in models[0]:
        acc = np.zeros_like(models[0][k], dtype=np.float64)
        for m, n in zip(models, counts, strict=True):
            acc += n * m[k]
        out[k] = acc / total
    return out


def expected_globals(num_agents: int, rounds: int) -> list[dict[str, np.ndarray]]:
    """Plain weighted FedAvg of the known updates: the global model of every version."""
    g = initial()
    out = [g]
    for version in range(rounds):
        g = fedavg(
            [step(g, i, version) for i in range(num_agents)],
            [samples(i) for i in range(num_agents)],
        )
        out.append(g)
    return out


class KnownTrainer:
    """A Trainer whose updates are :func:`step`; it records every model it was given."""

    def __init__(
        self,
        index: int = 0,
        num_agents: int = 1,
        on_fit: Callable[[int], None] | None = None,
        **_: Any,
    ) -> None:
        self.index = index
        self.seen: dict[int, dict[str, np.ndarray]] = {}
        self.uploaded: list[dict[str, np.ndarray]] = []
        self.final: dict[str, np.ndarray] | None = None
        self.on_fit = on_fit

    def initial_weights(self) -> dict[str, np.ndarray]:
        return initial()

    def fit(
        self, weights: dict[str, np.ndarray], config: Mapping[str, Any]
    ) -> tuple[dict[str, np.ndarray], int, dict[str, float]]:
        version = int(config["version"])
        self.seen[version] = {k: np.array(v) for k, v in weights.items()}
        if self.on_fit is not None:
            self.on_fit(version)
        out = step(weights, self.index, version)
        self.uploaded.append(out)
        return out, samples(self.index), {"train_loss": 1.0 / (version + 1)}

    def evaluate(self, weights: dict[str, np.ndarray], config: Mapping[str, Any]) -> dict[str, Any]:
        self.final = {k: np.array(v) for k, v in weights.items()}
        flat = np.concatenate([v.ravel() for v in weights.values()])
        return {"checksum": float(flat.sum()), "first": float(flat[0]), "last": float(flat[-1])}


def secret_key_needle(agents_ctx: Any, count: int = 8) -> bytes:
    """``count`` consecutive 64-bit coefficients from the middle of the secret key, as
    SEAL holds them in memory (NTT form, little-endian): in the memory of every process
    that loaded the secret key."""
    plain = agents_ctx.ts.secret_key().data.data()
    mid = plain.coeff_count() // 2
    coeffs = [plain.data(i) for i in range(mid, mid + count)]
    return np.array(coeffs, dtype="<u8").tobytes()


_MAP = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S{4}) \S+ \S+ \S+\s*(.*)$")


def scan_memory(pid: int, needles: list[bytes], chunk: int = 32 << 20) -> list[bool]:
    """Which of ``needles`` occur anywhere in the readable memory of process ``pid``
    (/proc/PID/maps and /proc/PID/mem; needs ptrace rights over it, e.g. root)."""
    found = [False] * len(needles)
    overlap = max(len(n) for n in needles) - 1
    with open(f"/proc/{pid}/maps") as f:
        regions = []
        for line in f:
            m = _MAP.match(line.strip())
            if m is None or m.group(3)[0] != "r" or m.group(4) in ("[vvar]", "[vsyscall]"):
                continue
            regions.append((int(m.group(1), 16), int(m.group(2), 16)))
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    try:
        for lo, hi in regions:
            tail = b""
            pos = lo
            while pos < hi:
                try:
                    data = os.pread(fd, min(chunk, hi - pos), pos)
                except OSError:
                    break
                if not data:
                    break
                window = tail + data
                for i, needle in enumerate(needles):
                    if not found[i] and needle in window:
                        found[i] = True
                tail = window[-overlap:] if overlap else b""
                pos += len(data)
    finally:
        os.close(fd)
    return found
