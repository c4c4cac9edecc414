"""The Ray backend (``--backend ray``): the same final model as the local backends, CPU/GPU
resources per agent, workers recycled so memory stays bounded, and the CLI.

One local Ray (2 CPUs) serves the whole module; backends made here join it and leave it
running, the fixture shuts it down."""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedstack.cli.main import main as cli_main
from fedstack.errors import ConfigError
from fedstack.sim import SimError, simulate
from fedstack.sim.worker import FitResult, FitTask

from . import ray_trainers, stateless

ray = pytest.importorskip("ray")

from fedstack.sim.ray_backend import RayBackend, _probe  # noqa: E402

DIGITS = "fedstack.trainers.digits:DigitsLinearTrainer"
PROBE = f"{ray_trainers.__name__}:ResourceProbe"
LEAKY = f"{ray_trainers.__name__}:LeakyTrainer"
FAILING = f"{stateless.__name__}:FailingTrainer"
EXACT = {"precision": "float64"}  # order-independent sums: arrival order cannot matter


@pytest.fixture(scope="module", autouse=True)
def local_ray() -> Iterator[None]:
    # tasks mode holds no actors, so the cluster's 2 CPUs stay free for the tests' backends
    owner = RayBackend(workers=2, actors=False)
    assert owner._owned and ray.is_initialized()
    try:
        yield
    finally:
        owner.close()
        assert not ray.is_initialized()


def _fits(
    backend: RayBackend, trainer: str, n: int, args: dict[str, Any] | None = None, batch: int = 1
) -> list[FitResult]:
    w = {"w": np.zeros(4, np.float32)}
    out: list[FitResult] = []
    for start in range(0, n, batch):
        futs = [
            backend.submit(FitTask(trainer, dict(args or {}), i, n, w, {}))
            for i in range(start, min(n, start + batch))
        ]
        out += [f.result(timeout=60) for f in futs]
    return out


def _same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_same_final_model_as_the_local_backends(tmp_path: Path) -> None:
    def final(name: str, per_round: int | None, **kw: Any) -> dict[str, np.ndarray]:
        res = simulate(
            DIGITS,
            {"partition": "dirichlet:0.5", "epochs": 2},
            num_agents=8,
            per_round=per_round,
            rounds=3,
            strategy_params=EXACT,
            db=str(tmp_path / f"{name}.db"),
            seed=4,
            **kw,
        )
        assert res.rounds == 3
        return res.final_weights

    # every agent in every round (connected throughout), fits on a pool of actors
    _same(final("actors", None, backend="ray", workers=2), final("inline", None, workers=0))
    # 3 of 8 sampled per round, every fit a Ray task (any worker may run any agent)
    _same(
        final("tasks", 3, backend="ray", workers=2, backend_options={"actors": False}),
        final("local", 3, workers=2),
    )


def test_cpus_per_agent_are_reserved_and_gpus_without_gpus_are_refused() -> None:
    b = RayBackend(num_cpus=2.0)  # the whole cluster per agent: one actor
    try:
        assert b.workers == 1
        assert ray.available_resources().get("CPU", 0.0) == 0.0
        res = _fits(b, PROBE, 2)
        assert {r.metrics["cpus"] for r in res} == {2.0}
    finally:
        b.close()
    b = RayBackend(num_cpus=0.5, actors=False)
    try:
        assert {r.metrics["cpus"] for r in _fits(b, PROBE, 3)} == {0.5}
    finally:
        b.close()
    with pytest.raises(ConfigError, match=r"GPU.*--gpus-per-agent 0"):
        RayBackend(num_gpus=0.25)
    with pytest.raises(ConfigError, match="--cpus-per-agent"):
        RayBackend(num_cpus=3.0)
    with pytest.raises(ConfigError, match="at most 2 workers"):
        RayBackend(workers=3)
    assert ray.available_resources().get("CPU", 0.0) <= 2.0  # nothing left reserved


def test_workers_are_recycled_and_a_leaky_trainer_stays_bounded() -> None:
    b = RayBackend(workers=1, max_calls=20)
    try:
        res = _fits(b, LEAKY, 60, {"leak_mb": 4})
    finally:
        b.close()
    pids = [r.worker for r in res]
    assert [pids[i] for i in (0, 20, 40)] == list(dict.fromkeys(pids))  # 3 workers in turn
    assert Counter(pids) == {p: 20 for p in set(pids)}
    rss = [float(r.metrics["rss_mb"]) for r in res]
    windows = [rss[i : i + 20] for i in (0, 20, 40)]
    assert windows[0][-1] - windows[0][0] > 40  # the leak is real (4 MiB x 19 fits) ...
    assert max(windows[2]) < max(windows[0]) + 40  # ... but a new worker starts afresh
    # tasks: Ray's workers exit after max_calls tasks
    b = RayBackend(max_calls=4, actors=False)
    try:
        counts = Counter(r.worker for r in _fits(b, PROBE, 8))
    finally:
        b.close()
    assert max(counts.values()) <= 4 and len(counts) >= 2


def test_a_trainer_error_reaches_the_caller(tmp_path: Path) -> None:
    with pytest.raises(SimError, match="boom in fit"):
        simulate(
            FAILING,
            {},
            num_agents=3,
            per_round=2,
            rounds=2,
            backend="ray",
            workers=2,
            backend_options={"actors": False},
            db=str(tmp_path / "f.db"),
            round_timeout=30,
        )


def test_without_ray_the_error_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ConfigError, match=r"fedstack\[ray\]"):
        RayBackend()


def test_a_cluster_address_nobody_answers_fails_fast() -> None:
    with pytest.raises(ConfigError, match="no Ray cluster answers at 127.0.0.1:1"):
        _probe("127.0.0.1:1", timeout=5)


def test_sim_cli_with_the_ray_backend(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = cli_main(
        [
            "sim",
            "--backend",
            "ray",
            "--workers",
            "2",
            "--cpus-per-agent",
            "1",
            "--agents",
            "6",
            "--per-round",
            "4",
            "--rounds",
            "2",
            "--db",
            str(tmp_path / "cli.db"),
            "--json",
        ]
    )
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["backend"] == "ray" and out["rounds"] == 2 and out["fits"] == 8
    assert out["final_metrics"]["eval_accuracy"] > 0.3
