"""Fuzzing of the protocol session and codec in the suite: the target of
``bench/fuzz_session.py`` run on 10,000 seeded inputs in process, and the coverage-guided
script itself on 10,000 inputs. Only documented errors may come out."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "fuzz_session.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fuzz_session", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ten_thousand_seeded_inputs() -> None:
    fuzz = _load()
    rng = np.random.default_rng(20261202)
    seeds = [bytes([mode, i]) + raw for i, raw in enumerate(fuzz.ENCODED) for mode in range(5)]
    for n in range(10_000):
        kind = n % 3
        if kind == 0:  # random bytes of random length
            data = rng.bytes(int(rng.integers(2, 600)))
        else:  # a seed with some bytes overwritten (keeps the structure mostly intact)
            mutable = bytearray(seeds[int(rng.integers(len(seeds)))])
            for _ in range(int(rng.integers(1, 6))):
                pos = int(rng.integers(len(mutable)))
                mutable[pos] = int(rng.integers(256))
            data = bytes(mutable)
        fuzz.one_input(data)


def test_the_target_catches_an_undocumented_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """The invariant checks are live: a session that breaks its contract is caught."""
    fuzz = _load()

    def broken(self: object, data: object) -> None:
        raise KeyError("not a documented error")

    monkeypatch.setattr(fuzz.AggregatorSession, "receive_bytes", broken)
    with pytest.raises(KeyError):
        fuzz.one_input(bytes([0, 0]) + fuzz.ENCODED[0])


@pytest.mark.skipif(importlib.util.find_spec("atheris") is None, reason="atheris missing")
def test_coverage_guided_script_runs_ten_thousand_inputs() -> None:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(SCRIPT.parents[1] / "src"), os.environ.get("PYTHONPATH", "")]
        ),
    }
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--runs", "10000", "--seconds", "60", "--seed", "3"],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "inputs: 10,000" in out.stdout and "no unexpected exception" in out.stdout
