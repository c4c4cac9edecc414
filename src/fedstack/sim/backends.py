"""Where the simulator runs the sampled agents' training.

* :class:`AutoBackend` (default): inline first; a worker pool once fits are measured to be
  slow enough for the pool to pay.
* :class:`InlineBackend` (``workers=0``): in the simulator's process, one fit at a time.
* :class:`LocalBackend` (default): a pool of worker processes sized to the machine. Each
  agent always trains in the same worker (``index % workers``), so a trainer built there
  is reused round after round; workers are replaced after ``max_tasks_per_worker`` fits
  so that memory cannot grow without bound.
* :class:`~fedstack.sim.ray_backend.RayBackend` (``backend="ray"``): Ray tasks on a Ray
  cluster (a local one by default), with CPU/GPU resources per agent.

Every backend takes a :class:`~fedstack.sim.worker.FitTask` and returns a future of a
:class:`~fedstack.sim.worker.FitResult`; the arrays travel between the simulator and its
own worker processes through the executor's pipes (nothing from outside is deserialised).
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import os
import threading
from collections.abc import Mapping
from typing import Any, Protocol

from fedstack.errors import ConfigError
from fedstack.sim.worker import FitResult, FitTask, TrainerCache, initial_weights, run_fit, warm_up
from fedstack.types import Weights

__all__ = [
    "AutoBackend",
    "Backend",
    "InlineBackend",
    "LocalBackend",
    "create_backend",
    "default_workers",
]


class Backend(Protocol):
    name: str

    def submit(self, task: FitTask) -> cf.Future[FitResult]:
        """Start one fit; the future holds its result (or the trainer's exception)."""
        ...

    def initial_weights(
        self, trainer: str, trainer_args: Mapping[str, Any], num_agents: int
    ) -> Weights:
        """The initial model (agent 0's trainer's ``initial_weights()``)."""
        ...

    def close(self) -> None: ...


def default_workers() -> int:
    """One worker per CPU this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


class InlineBackend:
    """Fits run in the calling thread, one at a time (a lock), trainers cached here."""

    name = "inline"

    def __init__(self, cache_size: int = 1024) -> None:
        self._cache = TrainerCache(cache_size)
        self._lock = threading.Lock()

    def submit(self, task: FitTask) -> cf.Future[FitResult]:
        fut: cf.Future[FitResult] = cf.Future()
        try:
            with self._lock:
                fut.set_result(run_fit(task, self._cache))
        except BaseException as exc:  # the trainer's error goes to the caller
            fut.set_exception(exc)
        return fut

    def initial_weights(
        self, trainer: str, trainer_args: Mapping[str, Any], num_agents: int
    ) -> Weights:
        with self._lock:
            return dict(
                self._cache.get(trainer, dict(trainer_args), 0, num_agents).initial_weights()
            )

    def close(self) -> None:
        pass


class LocalBackend:
    """A pool of worker processes; agent ``i`` trains in worker ``i % workers``."""

    name = "local"

    def __init__(
        self,
        workers: int | None = None,
        *,
        max_tasks_per_worker: int | None = 2000,
        start_method: str = "forkserver",
        warm: str | None = None,
    ) -> None:
        self.workers = workers or default_workers()
        if self.workers < 1:
            raise ConfigError("workers must be at least 1")
        ctx = mp.get_context(start_method)
        if start_method == "forkserver":
            # not the default ["__main__"]: a user's script without a main guard must not
            # run again in the workers (trainers are named as module:Callable anyway)
            ctx.set_forkserver_preload(["fedstack.sim.worker"])
        self._pools = [
            cf.ProcessPoolExecutor(
                max_workers=1, mp_context=ctx, max_tasks_per_child=max_tasks_per_worker
            )
            for _ in range(self.workers)
        ]
        if warm is not None:  # start every worker now, importing the trainer's module
            for f in [p.submit(warm_up, warm) for p in self._pools]:
                f.result()

    def submit(self, task: FitTask) -> cf.Future[FitResult]:
        return self._pools[task.index % self.workers].submit(run_fit, task)

    def initial_weights(
        self, trainer: str, trainer_args: Mapping[str, Any], num_agents: int
    ) -> Weights:
        return (
            self._pools[0].submit(initial_weights, trainer, dict(trainer_args), num_agents).result()
        )

    def close(self) -> None:
        for p in self._pools:
            p.shutdown(wait=True, cancel_futures=True)


class AutoBackend:
    """Starts inline and moves to a :class:`LocalBackend` pool only when that pays.

    A worker process costs every fit a round trip of the model through a pipe; for a small
    model trained in a millisecond that costs more than the parallelism gains (and worker
    start-up adds seconds). After ``probe_fits`` fits measured inline (not counting the
    first three, which pay one-time costs), the pool is started if
    ``median fit time x (1 - 1/workers)`` exceeds twice the estimated
    transfer cost of the fit's arrays (``2 x bytes / 0.5 GB/s + 1 ms``). Per-agent state
    travels with every task, so the switch does not change results.
    """

    name = "auto"
    IPC_BYTES_PER_SECOND = 0.5e9
    IPC_FIXED_SECONDS = 0.001
    SKIP_FITS = 3

    def __init__(
        self,
        workers: int | None = None,
        *,
        trainer: str | None = None,
        probe_fits: int = 10,
        **options: Any,
    ) -> None:
        self.workers = workers or default_workers()
        self._trainer = trainer
        self._options = options
        self._inline = InlineBackend()
        self._pool: LocalBackend | None = None
        self._probe_fits = probe_fits
        self._fits: list[tuple[float, int]] = []  # (fit seconds, bytes moved)
        self._lock = threading.Lock()
        self.decision: str | None = None
        """Why it stayed inline or moved to the pool (after the probe)."""

    @property
    def active(self) -> str:
        return "local" if self._pool is not None else "inline"

    def submit(self, task: FitTask) -> cf.Future[FitResult]:
        with self._lock:
            pool = self._pool
        if pool is not None:
            return pool.submit(task)
        fut = self._inline.submit(task)
        if fut.exception() is None and self.workers > 1 and self.decision is None:
            res = fut.result()
            moved = sum(a.nbytes for a in task.weights.values()) + sum(
                a.nbytes for a in res.weights.values()
            )
            with self._lock:
                self._fits.append((res.fit_seconds, moved))
                if len(self._fits) >= self._probe_fits + self.SKIP_FITS and self.decision is None:
                    self._decide()
        return fut

    def _decide(self) -> None:
        # the first fits of a process pay one-time costs (imports, allocator warm-up):
        # judge by the median of the fits after them
        fits = sorted(f for f, _ in self._fits[self.SKIP_FITS :])
        fit = fits[len(fits) // 2]
        moved = sum(b for _, b in self._fits) / len(self._fits)
        ipc = moved / self.IPC_BYTES_PER_SECOND + self.IPC_FIXED_SECONDS
        gain = fit * (1 - 1 / self.workers)
        if gain > 2 * ipc:
            self._pool = LocalBackend(self.workers, warm=self._trainer, **self._options)
            self.decision = (
                f"worker pool of {self.workers}: median fit {fit * 1e3:.1f} ms, "
                f"transfer ~{ipc * 1e3:.1f} ms"
            )
        else:
            self.decision = (
                f"inline: median fit {fit * 1e3:.1f} ms does not pay for moving "
                f"{moved / 1e6:.2f} MB to a worker (~{ipc * 1e3:.1f} ms)"
            )

    def initial_weights(
        self, trainer: str, trainer_args: Mapping[str, Any], num_agents: int
    ) -> Weights:
        return self._inline.initial_weights(trainer, trainer_args, num_agents)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()


def create_backend(
    name: str, workers: int | None = None, *, trainer: str | None = None, **options: Any
) -> Backend:
    """``auto``, ``inline``, ``local`` (``workers=0`` means inline) or ``ray``."""
    if name in ("local", "auto") and workers == 0:
        name = "inline"
    if name == "inline":
        return InlineBackend()
    if name == "auto":
        return AutoBackend(workers, trainer=trainer, **options)
    if name == "local":
        return LocalBackend(workers, warm=trainer, **options)
    if name == "ray":
        from fedstack.sim.ray_backend import RayBackend

        return RayBackend(workers=workers, warm=trainer, **options)
    raise ConfigError(f"unknown backend {name!r} (choose auto, local, inline or ray)")
