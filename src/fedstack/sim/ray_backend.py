"""The Ray backend of the simulator (``fedstack sim --backend ray``).

The virtual agents' fits run on a Ray cluster: one given by ``address`` (e.g.
``--ray-address 127.0.0.1:6379`` or ``ray://...``) or a local Ray started here with one CPU
per worker, no dashboard, no usage statistics, node address 127.0.0.1, its files in a
fresh directory under the system temp dir (removed at the end); :meth:`RayBackend.close`
shuts down only a Ray it started itself. Install it with ``pip install 'fedstack[ray]'``.
Note that Ray's own gRPC servers listen on all interfaces (Ray 2.60 has no setting for
it); they require Ray's token authentication, which Ray 2.60 turns on for a new local
cluster (the token is in ``~/.ray/auth_token``, Ray says so once on stderr).

**Actors (default) or tasks.** Two ways of running fits are implemented:

* ``actors=True`` (default): a pool of ``workers`` Ray actors, each holding ``num_cpus``
  CPUs and ``num_gpus`` GPUs for its life and running one fit at a time. A fit goes to its
  agent's "home" actor (``index % workers``) unless that actor has more fits queued than
  the least busy one, in which case it goes to the least busy one. Trainers are cached per
  agent in each actor (:class:`~fedstack.sim.worker.TrainerCache`), so an agent that trains
  every round builds its trainer (and loads its data) once. After ``max_calls`` fits an
  actor is replaced: a new one takes its slot and the old one exits once its queued fits
  are done (``__ray_terminate__``), so a trainer that leaks memory cannot grow a worker
  without bound.
* ``actors=False``: each fit is a Ray task (``@ray.remote(max_calls=...)``); Ray's worker
  processes exit after ``max_calls`` tasks. Any worker may run any agent, so trainers are
  rebuilt much more often (a worker's cache holds the agents it happened to run), and
  every fit pays for a task lease from the raylet.

The actors are the default because they cost less per fit for the same bounded memory:
an actor call goes straight to its worker, a task first leases a worker from the raylet,
and an agent that trains every round keeps its trainer in its home actor. In whole
simulations the aggregator and the agents' messages dominate and the two are within
run-to-run noise, and neither beats the local process pool on one machine
(``bench/sim_ray.py`` measures all three; figures in ``bench/README.md``): Ray is for
clusters and GPUs, not for speed on one machine. Results do not depend on the choice: the simulator
carries each agent's trainer state in :class:`FitTask.state`, so a fit gives the same
result on any worker, and with an order-independent strategy (FedAvg with
``precision="float64"``) the final model is bit for bit that of the local backend.

**Resources.** ``num_cpus`` and ``num_gpus`` (a fraction is allowed, e.g. 0.25 to put four
agents on one GPU) are reserved per running fit. They are checked against the cluster when
the backend starts: asking for GPUs on a cluster without them, or for more CPUs per agent
than the cluster has, is a :class:`~fedstack.errors.ConfigError` instead of fits that wait
forever for resources that never come.

Trainers are named ``module:Callable`` and imported in Ray's workers: on a local Ray the
driver's ``sys.path`` is passed on, so any module importable here is importable there; on
a remote cluster the trainer's module must be installed on every node.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import importlib
import logging
import math
import os
import shutil
import socket
import sys
import tempfile
import threading
from collections.abc import Mapping
from typing import Any

from fedstack.errors import ConfigError
from fedstack.sim.worker import FitResult, FitTask, initial_weights, run_fit, warm_up
from fedstack.types import Weights

__all__ = ["RayBackend", "ray_available"]

log = logging.getLogger("fedstack.sim.ray")

DEFAULT_MAX_CALLS = 1000
"""Fits per Ray worker before it is replaced."""


def ray_available() -> bool:
    """Whether Ray (the ``ray`` extra) is installed."""
    try:
        importlib.import_module("ray")
    except ImportError:
        return False
    return True


def _import_ray() -> Any:
    try:
        return importlib.import_module("ray")
    except ImportError as exc:
        raise ConfigError(
            "the Ray backend needs Ray: pip install 'fedstack[ray]' "
            f"(or use --backend local) [{exc}]"
        ) from exc


# ---------------------------------------------------------------------- in Ray's workers
def _add_paths(paths: tuple[str, ...]) -> None:
    """Make the driver's importable modules importable here (same file system)."""
    for p in paths:
        if p not in sys.path and os.path.isdir(p):
            sys.path.append(p)


class _FitActor:
    """One Ray worker process running fits one at a time, trainers cached per agent."""

    def __init__(self, paths: tuple[str, ...]) -> None:
        _add_paths(paths)

    def fit(self, task: FitTask) -> FitResult:
        return run_fit(task)

    def initial_weights(
        self, trainer: str, trainer_args: dict[str, Any], num_agents: int
    ) -> Weights:
        return initial_weights(trainer, trainer_args, num_agents)

    def pid(self) -> int:
        return os.getpid()

    def warm_up(self, trainer: str | None) -> int:
        return os.getpid() if trainer is None else warm_up(trainer)


def _fit_task(task: FitTask, paths: tuple[str, ...]) -> FitResult:
    _add_paths(paths)
    return run_fit(task)


def _initial_weights_task(
    trainer: str, trainer_args: dict[str, Any], num_agents: int, paths: tuple[str, ...]
) -> Weights:
    _add_paths(paths)
    return initial_weights(trainer, trainer_args, num_agents)


# ---------------------------------------------------------------------- in the simulator
def _probe(address: str, timeout: float = 10.0) -> None:
    """Fail fast on a ``host:port`` nobody listens on (``ray.init`` retries for minutes)."""
    hostport = address.removeprefix("ray://")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        return  # "auto", "local", ...: left to Ray
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise ConfigError(
            f"no Ray cluster answers at {address} ({exc}); start one with "
            "`ray start --head` or leave out --ray-address for a local Ray"
        ) from exc


class _Slot:
    """A place in the actor pool: the current actor, its fits so far and those in flight."""

    def __init__(self, actor: Any) -> None:
        self.actor = actor
        self.calls = 0
        self.pending = 0


class RayBackend:
    """Fits as Ray actors (default) or tasks; see the module's documentation.

    Args:
        workers: actors in the pool (default: as many as the cluster's CPUs and GPUs allow
            with ``num_cpus``/``num_gpus`` each); for a local Ray also its CPU count
            (default: this machine's). With tasks, only the local Ray's CPU count.
        address: a running Ray cluster to join (``host:port``, ``ray://host:port`` or
            ``auto``); default: start a local one.
        num_cpus: CPUs reserved per running fit.
        num_gpus: GPUs (a fraction is allowed) reserved per running fit.
        max_calls: fits per worker process before it is replaced (bounds its memory).
        actors: a pool of actors (default) or one Ray task per fit.
        init_options: more keyword arguments of ``ray.init`` (override the defaults).
        timeout: bound, in seconds, of the waits of this class (starting the workers,
            the initial model).
        warm: a trainer (``module:Callable``) whose module the actors import when they
            start, so that the first round is not slower than the others.
    """

    name = "ray"

    def __init__(
        self,
        workers: int | None = None,
        *,
        address: str | None = None,
        num_cpus: float = 1.0,
        num_gpus: float = 0.0,
        max_calls: int = DEFAULT_MAX_CALLS,
        actors: bool = True,
        init_options: Mapping[str, Any] | None = None,
        timeout: float = 600.0,
        warm: str | None = None,
    ) -> None:
        if workers is not None and workers < 1:
            raise ConfigError("the Ray backend needs workers >= 1 (or none: from the cluster)")
        if num_cpus < 0 or num_gpus < 0:
            raise ConfigError("num_cpus and num_gpus per agent must not be negative")
        if max_calls < 1:
            raise ConfigError("max_calls must be at least 1")
        self.ray = _import_ray()
        self.num_cpus = float(num_cpus)
        self.num_gpus = float(num_gpus)
        self.max_calls = int(max_calls)
        self.actors = actors
        self.timeout = timeout
        self._owned = False
        self._temp_dir: str | None = None
        self._lock = threading.Lock()
        self._slots: list[_Slot] = []
        self._closed = False
        self._paths = tuple(os.path.abspath(p) for p in sys.path if p)
        self._connect(workers, address, dict(init_options or {}))
        try:
            self.workers = self._check_resources(workers)
            if actors:
                self._actor_cls = self.ray.remote(
                    num_cpus=self.num_cpus,
                    num_gpus=self.num_gpus,
                    max_concurrency=1,
                    max_restarts=0,
                )(_FitActor)
                self._slots = [_Slot(self._new_actor()) for _ in range(self.workers)]
                self._wait(
                    [s.actor.warm_up.remote(warm) for s in self._slots],
                    f"start {self.workers} Ray workers",
                )
            else:
                self._fit = self.ray.remote(
                    num_cpus=self.num_cpus,
                    num_gpus=self.num_gpus,
                    max_calls=self.max_calls,
                    max_retries=0,
                )(_fit_task)
                self._init = self.ray.remote(
                    num_cpus=self.num_cpus,
                    num_gpus=self.num_gpus,
                    max_calls=self.max_calls,
                    max_retries=0,
                )(_initial_weights_task)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ setup
    def _connect(self, workers: int | None, address: str | None, options: dict[str, Any]) -> None:
        ray = self.ray
        if ray.is_initialized():
            log.info("using the Ray this process is already connected to")
            return
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        kwargs: dict[str, Any] = {
            "include_dashboard": False,
            "log_to_driver": False,
            "configure_logging": False,
        }
        if address is None:
            from fedstack.sim.backends import default_workers

            self._temp_dir = tempfile.mkdtemp(prefix="fedstack-ray-")
            kwargs.update(
                num_cpus=workers or default_workers(),
                _temp_dir=self._temp_dir,
                _node_ip_address="127.0.0.1",
            )
        else:
            _probe(address)
            kwargs["address"] = address
        kwargs.update(options)
        try:
            ray.init(**kwargs)
        except Exception as exc:
            with contextlib.suppress(Exception):
                ray.shutdown()  # whatever it started
            self._remove_temp_dir()
            where = f"the Ray cluster at {address}" if address else "a local Ray"
            raise ConfigError(f"could not start or join {where}: {exc}") from exc
        self._owned = True

    def _check_resources(self, workers: int | None) -> int:
        total = self.ray.cluster_resources()
        cpus, gpus = float(total.get("CPU", 0.0)), float(total.get("GPU", 0.0))
        if self.num_gpus > 0 and gpus < self.num_gpus:
            raise ConfigError(
                f"{self.num_gpus:g} GPU per agent was asked for but the Ray cluster has "
                f"{gpus:g} GPU: use --gpus-per-agent 0 (num_gpus=0) to train on CPUs, or "
                "join a cluster with GPUs (--ray-address)"
            )
        if self.num_cpus > cpus:
            raise ConfigError(
                f"{self.num_cpus:g} CPU per agent was asked for but the Ray cluster has "
                f"{cpus:g} CPU: lower --cpus-per-agent (num_cpus)"
            )
        fit = math.inf
        if self.num_cpus > 0:
            fit = cpus // self.num_cpus
        if self.num_gpus > 0:
            fit = min(fit, gpus // self.num_gpus)
        if workers is None:
            if math.isinf(fit):
                from fedstack.sim.backends import default_workers

                return default_workers()
            return max(1, int(fit))
        if self.actors and workers > fit:
            raise ConfigError(
                f"{workers} Ray workers with {self.num_cpus:g} CPU and {self.num_gpus:g} GPU "
                f"each do not fit in the cluster ({cpus:g} CPU, {gpus:g} GPU): ask for at "
                f"most {int(fit)} workers, or fewer CPUs/GPUs per agent"
            )
        return workers

    def _new_actor(self) -> Any:
        return self._actor_cls.remote(self._paths)

    # ------------------------------------------------------------------ the backend
    def submit(self, task: FitTask) -> cf.Future[FitResult]:
        if not self.actors:
            fut: cf.Future[FitResult] = self._fit.remote(task, self._paths).future()
            return fut
        with self._lock:
            if self._closed:
                raise RuntimeError("the Ray backend is closed")
            home = self._slots[task.index % len(self._slots)]
            least = min(self._slots, key=lambda s: s.pending)
            slot = home if home.pending <= least.pending else least
            if slot.calls >= self.max_calls:  # replace it; the old one finishes its queue
                old = slot.actor
                slot.actor, slot.calls = self._new_actor(), 0
                old.__ray_terminate__.remote()
            slot.calls += 1
            slot.pending += 1
            fut = slot.actor.fit.remote(task).future()

        def done(_: cf.Future[FitResult]) -> None:
            with self._lock:
                slot.pending -= 1

        fut.add_done_callback(done)
        return fut

    def initial_weights(
        self, trainer: str, trainer_args: Mapping[str, Any], num_agents: int
    ) -> Weights:
        if self.actors:
            with self._lock:
                actor = self._slots[0].actor
            ref = actor.initial_weights.remote(trainer, dict(trainer_args), num_agents)
        else:
            ref = self._init.remote(trainer, dict(trainer_args), num_agents, self._paths)
        weights: Weights = self._wait(ref, "build the initial model")
        return weights

    def _wait(self, refs: Any, what: str) -> Any:
        try:
            return self.ray.get(refs, timeout=self.timeout)
        except self.ray.exceptions.GetTimeoutError as exc:
            raise ConfigError(
                f"the Ray cluster did not {what} within {self.timeout:g} s "
                "(are its resources taken by other jobs?)"
            ) from exc

    def worker_pids(self) -> list[int]:
        """The process ids of the pool's current actors (empty with tasks)."""
        with self._lock:
            refs = [s.actor.pid.remote() for s in self._slots]
        return [int(p) for p in self._wait(refs, "report its workers")]

    def close(self) -> None:
        with self._lock:
            self._closed = True
            slots, self._slots = self._slots, []
        ray = self.ray
        if ray.is_initialized():
            for s in slots:
                with contextlib.suppress(Exception):
                    ray.kill(s.actor)
            if self._owned:
                ray.shutdown()
        self._owned = False
        self._remove_temp_dir()

    def _remove_temp_dir(self) -> None:
        if self._temp_dir is not None:
            shutil.rmtree(self._temp_dir, ignore_errors=True)
            self._temp_dir = None
