"""Load generator: many live agents in ONE process, on one asyncio (uvloop) event loop.

Each simulated agent speaks the real agent protocol over its own WebSocket connection
(:func:`fedstack.transport.connect`), through the same protocol session as
:class:`fedstack.agent.Agent` (:class:`fedstack.wire.session.AgentSession`, which holds the
rules): ``participate`` -> ``welcome`` (with the global model) -> "train" (``weights +
delta``, optionally a sleep) -> ``upload`` (unique ``upload_id``, ``base_version``) ->
``upload_ack`` -> the next ``global_model`` (pushed, or long-polled) -> ... -> ``bye``;
heartbeats at the interval the welcome gives.

Memory stays small whatever the number of agents: agents keep no model of their own (only
the version they trained on); the "trained" model of a version is computed once and shared
by every agent that uploads for that version; uploads in flight (client frames are masked,
so each costs one copy of the model while it is being sent) are bounded by a byte budget
(:class:`fedstack.transport.budget.ByteBudget`).

Usage::

    python -m fedstack.testing.loadgen --url ws://127.0.0.1:8765 --agents 1000 --rounds 3 \\
        --params 256 --json out.json

Every loop is bounded by ``--rounds`` and ``--timeout``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import resource
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from fedstack import aio
from fedstack.errors import ConnectionClosed, FedstackError, LocalProtocolError
from fedstack.transport import Connection, connect
from fedstack.transport.budget import ByteBudget
from fedstack.transport.limits import raise_nofile_limit
from fedstack.types import Weights
from fedstack.wire import Bye, Heartbeat, Limits, ModelUpload, Participate, Poll
from fedstack.wire.session import (
    AgentSession,
    Event,
    GlobalModelReceived,
    Left,
    Refused,
    RequestRefused,
    UploadAcknowledged,
    Welcomed,
)

log = logging.getLogger("fedstack.testing.loadgen")


def model_of(params: int, tensors: int = 2, dtype: str = "float32") -> Weights:
    """A model of about ``params`` parameters in ``tensors`` tensors (zeros)."""
    tensors = max(1, min(tensors, params))
    base = params // tensors
    sizes = [base] * tensors
    sizes[0] += params - base * tensors
    return {f"t{i}": np.zeros(n, dtype=dtype) for i, n in enumerate(sizes)}


@dataclass
class LoadConfig:
    """What to generate. ``rounds``: uploads per agent; ``timeout``: the whole run."""

    url: str
    agents: int = 10
    rounds: int = 3
    params: int = 256
    tensors: int = 2
    delta: float = 0.001
    train_seconds: float = 0.0
    num_samples: int = 10
    name_prefix: str = "lg"
    token_prefix: str | None = None
    """Agents present ``f"{token_prefix}-{i}"`` as their token (auth off binds it)."""
    connect_concurrency: int = 256
    """Connections being opened at once (the rest wait their turn)."""
    upload_budget_bytes: int = 256 << 20
    """Bytes of uploads being sent at once (at least one upload, whatever its size)."""
    unique_below_bytes: int = 1 << 20
    """Models up to this size are uploaded with a per-agent difference (distinct blobs in
    the store, as real agents make); bigger ones share one buffer (deduplicated)."""
    heartbeats: bool = True
    poll_wait: float = 30.0
    timeout: float = 120.0
    max_message_bytes: int = 1 << 31
    stop_at_version: int | None = None
    """Stop (bye) once a global model of at least this version was received."""


@dataclass
class AgentStats:
    name: str
    welcomed: bool = False
    uploads: int = 0
    acks: int = 0
    ack_statuses: dict[str, int] = field(default_factory=dict)
    models: int = 0
    versions: list[int] = field(default_factory=list)
    error: str | None = None


@dataclass
class LoadReport:
    agents: int
    connected_peak: int
    welcomed: int
    uploads: int
    acks: int
    ack_statuses: dict[str, int]
    errors: list[str]
    error_count: int
    join_seconds: float
    wall_seconds: float
    rounds: list[dict[str, Any]]
    """Per global-model version: first and last arrival (s since start), agents reached."""
    max_rss_mib: float
    acked_upload_ids: list[str] = field(default_factory=list, repr=False)

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("acked_upload_ids")
        return d


class LoadGenerator:
    """Run ``config.agents`` protocol-level agents against one aggregator."""

    def __init__(
        self, config: LoadConfig, train: Callable[[Weights, int], Weights] | None = None
    ) -> None:
        self.cfg = config
        self.limits = Limits(max_message_bytes=config.max_message_bytes)
        self.initial = model_of(config.params, config.tensors)
        self._train = train
        self._trained: tuple[int, Weights] | None = None  # shared by every agent
        self._upload_budget = ByteBudget(max(1, config.upload_budget_bytes), min_bytes=0)
        self._connect_sem: asyncio.Semaphore | None = None
        self.stats = [AgentStats(f"{config.name_prefix}-{i:05d}") for i in range(config.agents)]
        self.connected = 0
        self.connected_peak = 0
        self.arrivals: dict[int, list[float]] = {}
        self.acked: list[str] = []
        self._t0 = 0.0
        self._deadline = 0.0

    # ------------------------------------------------------------------ model
    def trained(self, version: int, model: Weights | None) -> Weights:
        """The upload for ``version``: computed once per version, shared by all agents."""
        if self._trained is not None and self._trained[0] == version:
            return self._trained[1]
        base = model if model is not None else self.initial
        if self._train is not None:
            out = self._train(base, version)
        else:
            out = {k: np.add(v, np.asarray(self.cfg.delta, dtype=v.dtype)) for k, v in base.items()}
        self._trained = (version, out)
        return out

    # ------------------------------------------------------------------ run
    async def run(self) -> LoadReport:
        cfg = self.cfg
        raise_nofile_limit(cfg.agents * 2 + 256)
        self._t0 = time.monotonic()
        self._deadline = self._t0 + cfg.timeout
        self._connect_sem = asyncio.Semaphore(max(1, cfg.connect_concurrency))
        joined = asyncio.Event()
        welcomed = [0]

        def on_welcome() -> None:
            welcomed[0] += 1
            if welcomed[0] >= cfg.agents:
                joined.set()

        # the first agent brings the initial model (it fixes the structure); the others
        # join once the federation exists
        first = asyncio.create_task(self._agent(0, on_welcome))
        while not self.stats[0].welcomed and not first.done():
            if time.monotonic() > self._deadline:
                break
            await asyncio.sleep(0.01)
        tasks = [first] + [
            asyncio.create_task(self._agent(i, on_welcome)) for i in range(1, cfg.agents)
        ]
        remaining = max(0.0, self._deadline - time.monotonic())
        join_task = asyncio.create_task(joined.wait())
        await asyncio.wait({join_task}, timeout=remaining)
        join_task.cancel()
        join_seconds = time.monotonic() - self._t0
        remaining = max(0.0, self._deadline - time.monotonic()) + 5.0
        done, pending = await asyncio.wait(tasks, timeout=remaining)
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.wait(pending, timeout=5.0)
        wall = time.monotonic() - self._t0
        return self._report(join_seconds, wall)

    def _report(self, join_seconds: float, wall: float) -> LoadReport:
        statuses: dict[str, int] = {}
        for s in self.stats:
            for k, v in s.ack_statuses.items():
                statuses[k] = statuses.get(k, 0) + v
        errors = [f"{s.name}: {s.error}" for s in self.stats if s.error]
        rounds = []
        for v in sorted(self.arrivals):
            ts = self.arrivals[v]
            rounds.append(
                {
                    "version": v,
                    "agents": len(ts),
                    "first_s": round(min(ts), 4),
                    "last_s": round(max(ts), 4),
                }
            )
        for prev, cur in zip(rounds, rounds[1:], strict=False):
            cur["round_seconds"] = round(cur["last_s"] - prev["last_s"], 4)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return LoadReport(
            agents=self.cfg.agents,
            connected_peak=self.connected_peak,
            welcomed=sum(s.welcomed for s in self.stats),
            uploads=sum(s.uploads for s in self.stats),
            acks=sum(s.acks for s in self.stats),
            ack_statuses=statuses,
            errors=errors[:20],
            error_count=len(errors),
            join_seconds=round(join_seconds, 4),
            wall_seconds=round(wall, 4),
            rounds=rounds,
            max_rss_mib=round(rss, 1),
            acked_upload_ids=list(self.acked),
        )

    def _left(self) -> float:
        return max(0.001, self._deadline - time.monotonic())

    async def _agent(self, i: int, on_welcome: Callable[[], None]) -> None:
        st = self.stats[i]
        conn: Connection | None = None
        # the aggregator under load is trusted: its models' values are not re-checked
        session = AgentSession(self.limits, check_values=False)
        try:
            assert self._connect_sem is not None
            async with self._connect_sem:
                c = await connect(
                    self.cfg.url,
                    max_message_bytes=self.cfg.max_message_bytes,
                    open_timeout=min(30.0, self._left()),
                )
                conn = c
                self.connected += 1
                self.connected_peak = max(self.connected_peak, self.connected)
                c.write(
                    session.send(
                        Participate(
                            agent_name=st.name,
                            token=(
                                f"{self.cfg.token_prefix}-{i}" if self.cfg.token_prefix else None
                            ),
                            model=self.initial if i == 0 else None,
                            init_weights=True,
                            num_samples=self.cfg.num_samples,
                            known_version=-1,
                            client="fedstack-loadgen/0.1",
                        )
                    )
                )
                await c.drain()
                holder = [session.receive_bytes(await asyncio.wait_for(c.recv(), self._left()))]
            await self._session(c, session, st, holder, on_welcome)
        except (TimeoutError, asyncio.CancelledError):
            st.error = st.error or "timed out"
        except (ConnectionClosed, OSError, FedstackError) as exc:
            st.error = st.error or f"{type(exc).__name__}: {exc}"
        except Exception as exc:  # a bug in the generator: report it, keep the others going
            st.error = f"{type(exc).__name__}: {exc!r}"
        finally:
            if conn is not None:
                self.connected -= 1
                conn.abort()

    async def _session(
        self,
        conn: Connection,
        session: AgentSession,
        st: AgentStats,
        holder: list[Event],
        on_welcome: Callable[[], None],
    ) -> None:
        cfg = self.cfg
        first = holder.pop()  # no frame keeps the welcome (and its model) alive
        if isinstance(first, Refused):
            raise FedstackError(f"refused: {first.error.code}: {first.error.message}")
        assert isinstance(first, Welcomed)
        welcome = first.message
        del first
        st.welcomed = True
        on_welcome()
        self._arrived(welcome.version)
        state: dict[str, Any] = {
            "final": welcome.finished,
            "model": welcome.model,
            "ack": None,
            "error": None,
        }
        del welcome
        heart: asyncio.Task[None] | None = None
        news = asyncio.Event()
        news.set()
        reader = asyncio.create_task(self._reader(conn, session, st, state, news))
        if cfg.heartbeats:
            heart = asyncio.create_task(self._heartbeat(conn, session))
        try:
            trained_on = -1
            while st.uploads < cfg.rounds and not state["final"]:
                if cfg.stop_at_version is not None and session.known_version >= cfg.stop_at_version:
                    break
                # wait for a global model newer than the last one trained on
                while session.known_version <= trained_on and not state["final"]:
                    if reader.done():
                        reader.result()
                        raise ConnectionClosed(reason="reader stopped")
                    self._poll(conn, session)
                    news.clear()
                    await self._wait(news, reader)
                if state["final"]:
                    break
                base = session.known_version
                if cfg.train_seconds > 0:
                    await asyncio.sleep(cfg.train_seconds)
                weights = self.trained(base, state["model"])
                state["model"] = None  # the agent keeps no model of its own
                trained_on = base
                size = sum(int(a.nbytes) for a in weights.values())
                if size <= cfg.unique_below_bytes:
                    weights = _personal(weights, int(st.name.rpartition("-")[2]))
                upload = ModelUpload(
                    upload_id=uuid.uuid4().hex,
                    base_version=base,
                    num_samples=cfg.num_samples,
                    metrics={"train_seconds": cfg.train_seconds},
                    model=weights,
                )
                del weights
                await asyncio.wait_for(self._upload_budget.acquire(size), self._left())
                try:
                    state["ack"] = None
                    session.queue_upload(upload)
                    conn.write(session.send(upload))
                    st.uploads += 1
                    await asyncio.wait_for(conn.drain(), self._left())
                    while state["ack"] != upload.upload_id:
                        if state["error"] is not None:
                            raise FedstackError(state["error"])
                        news.clear()
                        await self._wait(news, reader)
                finally:
                    self._upload_budget.release(size)
                self.acked.append(upload.upload_id)
                del upload
            # the global model made from the last upload (or the final one) closes the run
            while session.known_version <= trained_on and not state["final"]:
                if cfg.stop_at_version is not None and session.known_version >= cfg.stop_at_version:
                    break
                self._poll(conn, session)
                news.clear()
                await self._wait(news, reader)
            with contextlib.suppress(Exception):
                conn.write(session.send(Bye(reason="load generator done")))
                await asyncio.wait_for(conn.close(), 2.0)
        finally:
            if heart is not None:
                heart.cancel()
            reader.cancel()
            with contextlib.suppress(BaseException):
                await reader

    def _poll(self, conn: Connection, session: AgentSession) -> None:
        """With polling delivery, ask about the known version (once, until answered)."""
        if session.poll_due():
            conn.write(
                session.send(Poll(known_version=session.known_version, wait=self.cfg.poll_wait))
            )

    async def _wait(self, news: asyncio.Event, reader: asyncio.Task[None]) -> None:
        woken = asyncio.ensure_future(news.wait())
        try:
            await asyncio.wait(
                {woken, reader}, timeout=self._left(), return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            woken.cancel()
        if reader.done():
            exc = reader.exception() if not reader.cancelled() else None
            if exc is not None:
                raise exc
            if not news.is_set():
                raise ConnectionClosed(reason="connection ended")
        elif not news.is_set():
            raise TimeoutError("load generator timeout")

    def _arrived(self, version: int) -> None:
        self.arrivals.setdefault(version, []).append(time.monotonic() - self._t0)

    async def _reader(
        self,
        conn: Connection,
        session: AgentSession,
        st: AgentStats,
        state: dict[str, Any],
        news: asyncio.Event,
    ) -> None:
        while True:
            event = session.receive_bytes(await asyncio.wait_for(conn.recv(), self._left()))
            if isinstance(event, GlobalModelReceived):
                msg = event.message
                st.models += 1
                st.versions.append(msg.version)
                self._arrived(msg.version)
                if event.new:
                    # only the agent that computes the shared upload needs the weights
                    have = self._trained is not None and self._trained[0] == msg.version
                    last = st.uploads >= self.cfg.rounds or msg.final
                    state["model"] = None if have or last else msg.model
                state["final"] = state["final"] or msg.final
                del msg
            elif isinstance(event, UploadAcknowledged):
                ack = event.message
                st.acks += 1
                st.ack_statuses[ack.status] = st.ack_statuses.get(ack.status, 0) + 1
                state["ack"] = ack.upload_id
            elif isinstance(event, RequestRefused):
                state["error"] = f"{event.error.code}: {event.error.message}"
            elif isinstance(event, Refused):  # fatal: the aggregator closes
                raise FedstackError(f"aggregator error {event.error.code}: {event.error.message}")
            elif isinstance(event, Left):
                state["final"] = True
                news.set()
                return
            del event
            news.set()

    async def _heartbeat(self, conn: Connection, session: AgentSession) -> None:
        interval = session.heartbeat_interval
        seq = 0
        for _ in range(int(self.cfg.timeout / interval) + 2):  # bounded by the run's timeout
            await asyncio.sleep(interval)
            seq += 1
            try:
                conn.write(session.send(Heartbeat(seq=seq)))
            except (ConnectionClosed, LocalProtocolError):
                return


def _personal(weights: Weights, i: int) -> Weights:
    """A copy of ``weights`` that differs per agent (first element of the first tensor)."""
    out = {k: v.copy() for k, v in weights.items()}
    first = next(iter(out.values()), None)
    if first is not None and first.size and first.dtype.kind == "f":
        first.reshape(-1)[0] += (i + 1) * 1e-6
    return out


def run_load(config: LoadConfig) -> LoadReport:
    """Run the generator on a fresh uvloop (asyncio if uvloop is missing) event loop."""
    with aio.runner() as r:
        report: LoadReport = r.run(LoadGenerator(config).run())
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m fedstack.testing.loadgen",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--url", default="ws://127.0.0.1:8765")
    p.add_argument("--agents", type=int, default=100)
    p.add_argument("--rounds", type=int, default=3, help="uploads per agent")
    p.add_argument("--params", type=float, default=256, help="model parameters (float32)")
    p.add_argument("--tensors", type=int, default=2)
    p.add_argument("--train-seconds", type=float, default=0.0)
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--connect-concurrency", type=int, default=256)
    p.add_argument("--upload-budget-mb", type=float, default=256.0)
    p.add_argument("--stop-at-version", type=int)
    p.add_argument("--token-prefix")
    p.add_argument("--name-prefix", default="lg")
    p.add_argument("--json", help="write the report (with acked upload ids) here")
    p.add_argument("-q", "--quiet", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    cfg = LoadConfig(
        url=args.url,
        agents=args.agents,
        rounds=args.rounds,
        params=int(args.params),
        tensors=args.tensors,
        train_seconds=args.train_seconds,
        timeout=args.timeout,
        connect_concurrency=args.connect_concurrency,
        upload_budget_bytes=int(args.upload_budget_mb * (1 << 20)),
        stop_at_version=args.stop_at_version,
        token_prefix=args.token_prefix,
        name_prefix=args.name_prefix,
    )
    report = run_load(cfg)
    summary = report.summary()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**summary, "acked_upload_ids": report.acked_upload_ids}, f)
    if not args.quiet:
        print(json.dumps({k: v for k, v in summary.items() if k != "rounds"}, indent=1))
        for r in report.rounds:
            print(
                f"v{r['version']:>4}: {r['agents']:>6} agents, first {r['first_s']:.3f} s, "
                f"last {r['last_s']:.3f} s, round {r.get('round_seconds', math.nan):.3f} s"
            )
    return 0 if report.error_count == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
