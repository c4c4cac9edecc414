"""The simulator: the real aggregator and the real agents, N virtual agents in one process.

Nothing here re-implements federated learning. :func:`simulate` starts a real
:class:`~fedstack.aggregator.Aggregator` (its round engine, strategies, validation and
store) and drives real :class:`~fedstack.agent.Agent` objects through its book API
(``send_initial_model``, ``start``, ``wait_for_global_model``, ``send_trained_model``).
Only two things differ from a deployment:

* the transport: ``inproc`` (default) hands the encoded messages between the agents and
  the aggregator without sockets — every message is still encoded, decoded and validated —
  and ``loopback`` uses real WebSockets on 127.0.0.1;
* the agents' training runs in a backend (:mod:`fedstack.sim.backends`): a pool of worker
  processes sized to the machine, Ray, or inline.

Each round, ``per_round`` of the ``num_agents`` virtual agents are sampled (seeded); they
join, receive the global model, train, upload, and leave; the aggregator completes the
round when all of them uploaded. When every agent takes part in every round
(``per_round == num_agents``, at most :data:`PERSISTENT_MAX` agents), the agents stay
connected for the whole run instead, as in a deployment. Per-agent trainer state
(``get_state``/``set_state``) is kept between rounds. Everything lands in the same store as
a deployment, so ``fedstack db`` and the plots work unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedstack import aio
from fedstack.agent.client import Agent
from fedstack.aggregator.config import AggregatorConfig
from fedstack.aggregator.service import Aggregator
from fedstack.errors import ConfigError, FederationFinished, FedstackError
from fedstack.sim.backends import Backend, create_backend
from fedstack.sim.worker import FitTask
from fedstack.store import Store
from fedstack.types import Metrics, Weights
from fedstack.wire import Error

__all__ = ["PERSISTENT_MAX", "SimError", "SimResult", "simulate"]

log = logging.getLogger("fedstack.sim")

PERSISTENT_MAX = 1000
"""Up to this many agents stay connected when all of them train every round."""

_run_ids = itertools.count(1)


class SimError(FedstackError):
    """The simulation could not complete (e.g. a trainer raised); the message says why."""


@dataclass
class SimResult:
    """What :func:`simulate` returns."""

    run_id: str
    run_name: str
    db: str
    rounds: int
    wall_seconds: float
    """From the start of the simulation (worker pool included) to the final model."""
    round_seconds: list[float]
    """Wall time of each round, from its model's release to the next model."""
    history: list[dict[str, Any]]
    """The store's rows of the run's rounds (metrics include ``eval_*`` of the evaluator)."""
    final_weights: Weights
    final_metrics: Metrics
    """The last round's metrics (mean training metrics and ``eval_*``)."""
    agents_trained: int
    """Distinct virtual agents that trained at least once."""
    fits: int
    backend: str
    transport: str
    setup_seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """A JSON-able summary (what ``fedstack sim --json`` prints)."""
        return {
            "run_id": self.run_id,
            "run_name": self.run_name,
            "db": self.db,
            "rounds": self.rounds,
            "wall_seconds": round(self.wall_seconds, 4),
            "setup_seconds": round(self.setup_seconds, 4),
            "round_seconds": [round(s, 5) for s in self.round_seconds],
            "final_metrics": self.final_metrics,
            "agents_trained": self.agents_trained,
            "fits": self.fits,
            "backend": self.backend,
            "transport": self.transport,
            **self.extra,
        }


def simulate(
    trainer: str,
    trainer_args: Mapping[str, Any] | None = None,
    *,
    num_agents: int,
    rounds: int,
    per_round: int | None = None,
    fraction: float | None = None,
    strategy: str = "fedavg",
    strategy_params: Mapping[str, Any] | None = None,
    federation: Mapping[str, Any] | None = None,
    evaluator: str | None = None,
    db: str = "fedstack-sim.db",
    run_name: str | None = None,
    transport: str = "inproc",
    backend: str = "auto",
    workers: int | None = None,
    backend_options: Mapping[str, Any] | None = None,
    seed: int = 0,
    delivery: str = "push",
    durable: bool = False,
    round_timeout: float = 600.0,
    persistent: bool | None = None,
    progress: bool | Callable[[int, float, Metrics], None] = False,
    aggregator_options: Mapping[str, Any] | None = None,
) -> SimResult:
    """Simulate a federation of ``num_agents`` virtual agents for ``rounds`` rounds.

    Args:
        trainer: ``module:Callable`` building an agent's trainer as
            ``Callable(index=I, num_agents=N, **trainer_args)`` (see
            :class:`~fedstack.agent.trainer.Trainer`; e.g.
            ``fedstack.trainers.torch_digits:DigitsMLPTrainer``).
        trainer_args: keyword arguments for every trainer (e.g. ``partition``, ``seed``).
        num_agents: virtual agents N.
        rounds: rounds to run.
        per_round: agents sampled per round (default: all, or ``fraction`` of N).
        fraction: fraction of N sampled per round (rounded up), instead of ``per_round``.
        strategy, strategy_params: the aggregation strategy (``fedstack strategies``).
        federation: settings sent to every agent (e.g. ``fedprox_mu``).
        evaluator: ``module:function(weights) -> metrics`` run by the aggregator on every
            global model (stored as ``eval_*`` round metrics).
        db: the store (an SQLite path or an SQLAlchemy URL); runs accumulate in it.
        run_name: name of the run (default: unique); an existing name would resume it.
        transport: ``inproc`` (no sockets) or ``loopback`` (WebSockets on 127.0.0.1).
        backend: ``auto`` (inline until fits are slow enough for worker processes to
            pay), ``local`` (worker processes), ``inline`` or ``ray``.
        workers: worker processes (default: one per CPU); 0 means inline.
        backend_options: extra options of the backend (e.g. Ray's ``num_cpus``).
        seed: seed of the sampling and of the aggregator.
        delivery: ``push`` or ``poll``.
        durable: fsync every write (a deployment's setting; off by default here).
        round_timeout: seconds a round may take before the simulation fails.
        persistent: keep agents connected between rounds (default: when all train every
            round and N <= :data:`PERSISTENT_MAX`).
        progress: True for a progress bar on stderr, or a callback
            ``(round, seconds, metrics)``.
        aggregator_options: further aggregator settings (keys of
            :class:`~fedstack.aggregator.config.AggregatorConfig`, e.g. central DP's
            ``dp``, ``dp_noise_multiplier``, ``dp_clip``, ``dp_delta``); not those the
            simulator sets itself from the arguments above.

    With big models call :func:`fedstack.buffers.keep_freed_memory` first (``fedstack
    sim`` does): it is process-wide, so this function does not.

    Raises:
        ConfigError: invalid arguments.
        SimError: a trainer failed or a round did not complete in time.
    """
    k = _sample_size(num_agents, per_round, fraction)
    if rounds < 1:
        raise ConfigError("rounds must be at least 1")
    if transport not in ("inproc", "loopback"):
        raise ConfigError(f"transport {transport!r} must be 'inproc' or 'loopback'")
    if persistent is None:
        persistent = k == num_agents and num_agents <= PERSISTENT_MAX
    elif persistent and k != num_agents:
        raise ConfigError("persistent agents need per_round == num_agents")
    t0 = time.perf_counter()
    be = create_backend(backend, workers, trainer=trainer, **dict(backend_options or {}))
    try:
        sim = _Simulation(
            trainer=trainer,
            trainer_args=dict(trainer_args or {}),
            num_agents=num_agents,
            per_round=k,
            rounds=rounds,
            strategy=strategy,
            strategy_params=dict(strategy_params or {}),
            federation=dict(federation or {}),
            evaluator=evaluator,
            db=db,
            run_name=run_name
            or f"sim-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{next(_run_ids)}",
            transport=transport,
            backend=be,
            seed=seed,
            delivery=delivery,
            durable=durable,
            round_timeout=round_timeout,
            persistent=persistent,
            progress=progress,
            t0=t0,
            aggregator_options=dict(aggregator_options or {}),
        )
        return _run(sim.run())
    finally:
        be.close()


def _sample_size(n: int, per_round: int | None, fraction: float | None) -> int:
    if n < 1:
        raise ConfigError("num_agents must be at least 1")
    if per_round is not None and fraction is not None:
        raise ConfigError("give per_round or fraction, not both")
    if fraction is not None:
        if not 0.0 < fraction <= 1.0:
            raise ConfigError(f"fraction {fraction} must be in (0, 1]")
        return max(1, math.ceil(fraction * n - 1e-9))
    k = n if per_round is None else per_round
    if not 1 <= k <= n:
        raise ConfigError(f"per_round {k} must be in 1..num_agents ({n})")
    return k


def _run(coro: Any) -> SimResult:
    with aio.runner() as r:
        result: SimResult = r.run(coro)
        return result


class _Simulation:
    def __init__(
        self,
        *,
        trainer: str,
        trainer_args: dict[str, Any],
        num_agents: int,
        per_round: int,
        rounds: int,
        strategy: str,
        strategy_params: dict[str, Any],
        federation: dict[str, Any],
        evaluator: str | None,
        db: str,
        run_name: str,
        transport: str,
        backend: Backend,
        seed: int,
        delivery: str,
        durable: bool,
        round_timeout: float,
        persistent: bool,
        progress: bool | Callable[[int, float, Metrics], None],
        t0: float,
        aggregator_options: dict[str, Any] | None = None,
    ) -> None:
        self.trainer, self.trainer_args = trainer, trainer_args
        self.n, self.k, self.rounds = num_agents, per_round, rounds
        self.backend, self.transport = backend, transport
        self.persistent, self.round_timeout = persistent, round_timeout
        self.rng = np.random.default_rng(seed)
        self.t0 = t0
        self.db, self.durable, self.run_name = db, durable, run_name
        fixed = {
            "host", "port", "transport", "db", "run_name", "rounds", "threshold",
            "min_agents", "round_timeout", "delivery", "strategy", "strategy_params",
            "federation", "seed", "evaluator", "auth", "finish_grace",
            "heartbeat_interval", "register_timeout", "send_timeout",
        }  # fmt: skip
        options = dict(aggregator_options or {})
        if fixed & set(options):
            raise ConfigError(
                "aggregator_options (fedstack sim --aggregator-setting) may not set "
                f"{', '.join(sorted(fixed & set(options)))}: the simulator sets them (use "
                "its own arguments)"
            )
        self.config = AggregatorConfig(
            **options,
            host="127.0.0.1",
            port=0,
            transport="tcp" if transport == "loopback" else "inproc",
            db=db,
            run_name=run_name,
            rounds=rounds,
            threshold=1.0,
            min_agents=per_round,
            round_timeout=None,
            delivery=delivery,
            strategy=strategy,
            strategy_params=strategy_params,
            federation=federation,
            seed=seed,
            evaluator=evaluator,
            auth="off",
            finish_grace=0.0,
            heartbeat_interval=30.0,
            register_timeout=60.0,
            send_timeout=round_timeout,
        )
        self.states: dict[int, dict[str, Any]] = {}
        self.trained: set[int] = set()
        self.fits = 0
        self.initial: Weights | None = None
        self.url = ""
        self.width = len(str(num_agents - 1))
        self.failure: BaseException | None = None
        self._progress = progress
        self._bar: Any = None

    # ------------------------------------------------------------------ the run
    async def run(self) -> SimResult:
        store = await asyncio.to_thread(
            Store, self.db, durable=self.durable, inline_blob_bytes=self.config.inline_blob_bytes
        )
        agg = Aggregator(self.config, store=store)
        try:
            self._check_strategy(agg)
            self.initial = await asyncio.to_thread(
                self.backend.initial_weights, self.trainer, self.trainer_args, self.n
            )
            await agg.start()
            self.url = agg.url
            setup = time.perf_counter() - self.t0
            self._open_progress()
            if self.persistent:
                round_seconds = await self._run_persistent(agg)
            else:
                round_seconds = await self._run_sampled(agg)
            await asyncio.wait_for(agg.wait_finished(), 60.0)
            wall = time.perf_counter() - self.t0
            history = await asyncio.to_thread(store.rounds, agg.run_id)
            assert agg.global_weights is not None
            final = {k: np.array(v) for k, v in agg.global_weights.items()}
            last = history[-1]["metrics"] if history else {}
            return SimResult(
                run_id=agg.run_id,
                run_name=self.run_name,
                db=str(self.db),
                rounds=agg.statistics().version,
                wall_seconds=wall,
                round_seconds=round_seconds,
                history=history,
                final_weights=final,
                final_metrics=dict(last or {}),
                agents_trained=len(self.trained),
                fits=self.fits,
                backend=self.backend.name,
                transport=self.transport,
                setup_seconds=setup,
                extra={
                    k: v
                    for k, v in (("backend_decision", getattr(self.backend, "decision", None)),)
                    if v is not None
                },
            )
        finally:
            if self._bar is not None:
                self._bar.close()
            await agg.stop()
            await asyncio.to_thread(store.close)

    async def _wait_version(
        self, agg: Aggregator, version: int, tasks: Sequence[asyncio.Future[Any]] = ()
    ) -> None:
        """Return when the aggregator published ``version``; SimError if an agent or the
        run failed first, or the round took longer than the round timeout."""
        deadline = time.monotonic() + self.round_timeout
        waiter = asyncio.ensure_future(agg.wait_for_version(version))
        try:
            while not waiter.done():
                if isinstance(self.failure, SimError):
                    raise self.failure
                if self.failure is not None:
                    raise SimError(f"simulation failed: {self.failure!r}") from self.failure
                for t in tasks:
                    if t.done() and t.exception() is not None:
                        exc = t.exception()
                        raise SimError(f"a virtual agent failed: {exc!r}") from exc
                left = deadline - time.monotonic()
                if left <= 0:
                    raise SimError(
                        f"round {version} did not complete within {self.round_timeout} s "
                        f"({agg.statistics().contributors}/{self.k} updates)"
                    )
                # woken by the new version or an agent task ending; failures set from
                # callbacks are noticed within 50 ms
                await asyncio.wait(
                    [waiter, *(t for t in tasks if not t.done())],
                    timeout=min(left, 0.05),
                    return_when=asyncio.FIRST_COMPLETED,
                )
            if waiter.exception() is not None:
                raise SimError(f"round {version}: the aggregator stopped") from waiter.exception()
        finally:
            waiter.cancel()

    async def _run_sampled(self, agg: Aggregator) -> list[float]:
        seconds: list[float] = []
        for rnd in range(1, self.rounds + 1):
            start = time.perf_counter()
            chosen = [int(i) for i in np.sort(self.rng.choice(self.n, self.k, replace=False))]
            tasks = [
                asyncio.ensure_future(self._one_round(idx, rnd == 1 and j == 0))
                for j, idx in enumerate(chosen)
            ]
            try:
                await asyncio.gather(*tasks)
            except BaseException as exc:
                for t in tasks:
                    t.cancel()
                raise SimError(f"round {rnd}: a virtual agent failed: {exc!r}") from exc
            await self._wait_version(agg, rnd)
            seconds.append(time.perf_counter() - start)
            self._report(rnd, seconds[-1], agg)
        return seconds

    async def _run_persistent(self, agg: Aggregator) -> list[float]:
        tasks = [
            asyncio.ensure_future(self._persistent_agent(idx, idx == 0)) for idx in range(self.n)
        ]
        seconds: list[float] = []
        try:
            await self._wait_version(agg, 0, tasks)
            last = time.perf_counter()
            for rnd in range(1, self.rounds + 1):
                await self._wait_version(agg, rnd, tasks)
                now = time.perf_counter()
                seconds.append(now - last)
                last = now
                self._report(rnd, seconds[-1], agg)
            await asyncio.wait_for(asyncio.gather(*tasks), self.round_timeout)
        except BaseException:
            self.failure = self.failure or SimError("simulation stopped")
            await agg.stop()  # unblocks the agents waiting for a model...
            _, waiting = await asyncio.wait(tasks, timeout=2.0)
            for t in waiting:  # ...and those still waiting (e.g. after a refusal) are ended
                t.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30.0)
            raise
        return seconds

    # ------------------------------------------------------------------ one virtual agent
    def _agent(self, idx: int, initial: bool) -> Agent:
        agent = Agent(
            self.url, name=f"sim-{idx:0{self.width}d}", max_backoff=1.0, connect_timeout=30.0
        )
        agent.on_refusal = functools.partial(self._refused, agent.name)
        if initial:
            assert self.initial is not None
            agent.send_initial_model(self.initial)
        return agent

    def _refused(self, name: str, err: Error) -> None:
        # a virtual agent's request refused: its trainer does not fit the strategy (or the
        # federation's settings); no later round can go differently, so stop now
        self.failure = self.failure or SimError(
            f"the aggregator refused {name}'s {err.code} request: {err.message} "
            f"(trainer {self.trainer}, strategy {self.config.strategy!r})"
        )

    def _check_strategy(self, agg: Aggregator) -> None:
        s = agg.strategy
        need = max(s.min_updates, s.trigger or 0)
        if need > self.k:
            what = (
                f"aggregates every {s.trigger} updates"
                if (s.trigger or 0) >= s.min_updates
                else f"needs at least {s.min_updates} updates to aggregate"
            )
            raise ConfigError(
                f"strategy {self.config.strategy!r} {what}, but {self.k} agents train per "
                f"round: sample at least {need} per round, or change the strategy's "
                "parameters"
            )

    async def _train(self, agent: Agent, idx: int, gm: Weights) -> None:
        config = {
            "version": agent.version,
            "name": agent.name,
            "federation": dict(agent.federation_config),
            "global_extra": dict(agent.global_extra),
        }
        task = FitTask(
            self.trainer, self.trainer_args, idx, self.n, gm, config, self.states.get(idx)
        )
        fut = self.backend.submit(task)  # inline: already done; else a worker's future
        res = fut.result() if fut.done() else await asyncio.wrap_future(fut)
        del fut, task, gm
        if res.state is not None:
            self.states[idx] = res.state
        self.trained.add(idx)
        self.fits += 1
        # the result is ours alone: arrays the trainer does not keep go out uncopied
        weights, extra = res.weights, res.extra
        res.weights, res.extra = {}, None
        agent.send_owned_model(weights, res.num_samples, res.metrics, extra=extra)

    async def _one_round(self, idx: int, initial: bool) -> None:
        agent = self._agent(idx, initial)
        try:
            await agent.start_async(timeout=self.round_timeout)
            gm = await agent.wait_for_global_model_async(timeout=self.round_timeout)
            await self._train(agent, idx, gm)
            del gm
            await agent.flush_async(timeout=self.round_timeout)
        finally:
            await agent.close_async()

    async def _persistent_agent(self, idx: int, initial: bool) -> None:
        agent = self._agent(idx, initial)
        try:
            await agent.start_async(timeout=self.round_timeout)
            while self.failure is None:
                try:
                    gm = await agent.wait_for_global_model_async(timeout=self.round_timeout)
                except FederationFinished:
                    return
                if agent.finished:
                    return  # the final model: nothing left to train for
                await self._train(agent, idx, gm)
                del gm  # not held while waiting: its buffer is reused for the next one
        except BaseException as exc:
            self.failure = self.failure or exc
            raise
        finally:
            await agent.close_async()

    # ------------------------------------------------------------------ progress
    def _open_progress(self) -> None:
        if self._progress is True:
            from fedstack.sim.progress import RoundBar

            self._bar = RoundBar(self.rounds, f"{self.k}/{self.n}")

    def _report(self, rnd: int, seconds: float, agg: Aggregator) -> None:
        if self._bar is not None:
            self._bar.advance(seconds)
        elif callable(self._progress):
            self._progress(rnd, seconds, {"version": agg.statistics().version})
