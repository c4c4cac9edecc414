"""The aggregator: serves its cluster of agents, runs rounds, persists, distributes.

One WebSocket port serves everything. Each connection runs :meth:`Aggregator._serve_agent`,
which turns messages into calls on the round state; every change of round state happens
under one lock, and every change is committed to the store before it is acknowledged or
announced (persist before acknowledge). A single driver task decides when a round is
complete (threshold over *active* agents, ``min_agents``, deadline) and aggregates.

On start the aggregator reloads the run from the store (structure, latest global model,
round, the current round's acknowledged uploads) and carries on.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures as cf
import contextlib
import dataclasses
import functools
import hmac
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

import numpy as np

from fedstack.aggregator.config import AggregatorConfig
from fedstack.aggregator.fanout import Fanout
from fedstack.aggregator.gate import UpdateGate
from fedstack.aggregator.operator_api import OperatorAPI
from fedstack.aggregator.rounds import RoundState, Verdict
from fedstack.aggregator.validation import Structure, validate_extra, validate_model
from fedstack.errors import (
    ConfigError,
    ConnectionClosed,
    InvalidUpdate,
    RegistrationRefused,
    RemoteProtocolError,
    StoreError,
)
from fedstack.plugins import load_callable
from fedstack.security.tls import server_context
from fedstack.store import CredentialRefused, Store, UploadRecord
from fedstack.store.repository import fingerprint
from fedstack.strategies import Accumulator, Result, Update, create
from fedstack.transport import Connection, inproc, serve
from fedstack.transport.budget import ByteBudget
from fedstack.transport.limits import raise_nofile_limit
from fedstack.types import Metrics, Weights
from fedstack.wire import (
    Bye,
    Error,
    Heartbeat,
    Limits,
    Message,
    ModelUpload,
    NotReady,
    Participate,
    Poll,
    Segments,
    UploadAck,
    Welcome,
    decode,
    encode,
)
from fedstack.wire.tensors import structure as structure_of

T = TypeVar("T")

CHECKPOINT_INTERVAL = 1.0
"""Seconds between background checkpoints of the store's log (one after a round at most)."""

log = logging.getLogger("fedstack.aggregator")

Evaluator = Callable[[Weights], Metrics]


@dataclass(eq=False)
class AgentSession:
    agent_id: str
    name: str
    conn: Connection
    address: str
    known_version: int = -1
    welcomed: bool = False
    last_seen: float = field(default_factory=time.monotonic)
    poll_task: asyncio.Task[None] | None = None
    credential: str | None = None  # stored hash it registered with (re-checked periodically)
    source: str | None = None  # issued | enrolled | first-use | None

    def write(self, msg: Message) -> None:
        """Queue ``msg`` on the connection now (frames keep program order)."""
        self.conn.write(encode(msg))

    def write_parts(self, parts: list[bytes | memoryview]) -> None:
        """Queue an already encoded message (e.g. the shared global model)."""
        self.conn.write(parts)

    async def send(self, msg: Message, timeout: float) -> None:
        self.write(msg)
        async with asyncio.timeout(timeout):  # not wait_for: no task per message
            await self.conn.drain()


@dataclass
class _Pending:
    """An upload validated and waiting for the round lock (see ``_drain_uploads``)."""

    session: AgentSession
    msg: ModelUpload
    blob: tuple[str, int] | None
    done: asyncio.Future[Message]


@dataclass
class _Planned:
    """An upload of a batch, classified; the rest is filled in by ``_store_batch``."""

    pending: _Pending
    verdict: Verdict
    status: str = ""
    message: str = ""
    ack_status: str = ""
    metrics: Metrics = field(default_factory=dict)
    update: Update | None = None


class Aggregator:
    """A fedstack aggregator. ``await start()``, then ``await wait_finished()`` or ``stop()``."""

    def __init__(
        self,
        config: AggregatorConfig,
        *,
        store: Store | None = None,
        evaluator: Evaluator | None = None,
    ) -> None:
        self.config = config
        self._own_store = store is None
        self.store = store
        self.strategy = create(config.strategy, **config.strategy_params)
        if self.strategy.trigger is not None and config.staleness == "drop":
            raise ConfigError(
                f"strategy {config.strategy!r} is asynchronous and weighs stale updates "
                "itself: use staleness 'next' (the default), not 'drop'"
            )
        if evaluator is None and config.evaluator:
            evaluator = load_callable(config.evaluator)
        self.evaluator = evaluator
        self.limits = Limits(max_message_bytes=config.max_message_bytes)
        self.ssl_context = (
            server_context(config.tls_cert, config.tls_key, config.tls_client_ca)
            if config.tls_cert else None
        )
        """The TLS context the port serves with (None: plaintext ws://)."""
        self.gate = UpdateGate.from_config(config.gate)
        self._baseline: tuple[int, Any] | None = None  # (version, probe outputs)
        self.rng = np.random.default_rng(config.seed)
        self.federation_config: Metrics = {**config.federation, **self.strategy.agent_config()}
        if self.strategy.trigger is not None:
            # asynchronous rules weigh stale updates themselves: agents must send them
            self.federation_config.setdefault("discard_stale", False)
        self.state = RoundState(
            threshold=config.threshold, min_agents=config.min_agents,
            round_timeout=config.round_timeout, max_rounds=config.rounds,
            staleness_policy=config.staleness, trigger=self.strategy.trigger,
            min_updates=self.strategy.min_updates,
        )
        self.aggregator_id = uuid.uuid4().hex
        self.run_id = ""
        self.structure: Structure | None = None
        self.global_weights: Weights | None = None
        self.global_model_id = ""
        self.global_extra: Weights = {}
        self.strategy_state: dict[str, Any] = {}
        self._acc: Accumulator | None = None
        self._pending_result: Result | None = None
        self._warned_round = 0
        self._round_inputs: list[tuple[int, Metrics]] = []
        self.sessions: dict[str, AgentSession] = {}
        self._lock = asyncio.Lock()
        self._eval_lock = asyncio.Lock()
        self._wakeup = asyncio.Event()
        self._new_version = asyncio.Event()
        self._initialized = asyncio.Event()
        self._finished = asyncio.Event()
        self._stopped = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._server: asyncio.Server | None = None
        self._inproc: inproc.InProcServer | None = None
        self._driver: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self.port = config.port
        self.rounds_completed = 0
        self.fanout = Fanout(config.fanout_budget_bytes)
        """Global model encoded once per version; bytes of big sends in flight bounded."""
        self.upload_budget = ByteBudget(config.upload_budget_bytes)
        """Bytes of big uploads being received or processed at once (all connections)."""
        self._db_thread = cf.ThreadPoolExecutor(1, thread_name_prefix="fedstack-store")
        """Every database call runs on this one thread, in the order it was made: the
        aggregator's writes never wait on each other's SQLite locks (a lock conflict
        costs a busy-wait sleep of a millisecond or more)."""
        self._db_closed = False
        self._checkpointing = False
        self._last_checkpoint = 0.0
        self._upload_queue: collections.deque[_Pending] = collections.deque()
        self._draining = False
        self._db_inline = config.transport == "inproc"
        """In-process transport (the simulator): every party shares this process and its
        GIL, so a store thread buys no parallelism, only lock hand-offs: calls run inline."""

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Open the store, resume the run, and start listening."""
        cfg = self.config
        raise_nofile_limit()  # one descriptor per agent: 1,000s of agents need more than 1,024
        if self.store is None:
            self.store = await self._db(Store, cfg.db, cfg.blob_dir,
                                                 inline_blob_bytes=cfg.inline_blob_bytes)
        run = await self._db(
            self.store.open_run, cfg.run_name, _public_config(cfg), self.aggregator_id
        )
        self.run_id = run.id
        self.aggregator_id = run.aggregator_id
        if run.version >= 0:
            await self._resume(run.structure, run.version)
        if cfg.transport == "inproc":
            self._inproc = await inproc.serve(self._serve_agent, cfg.run_name,
                                              max_message_bytes=cfg.max_message_bytes)
        else:
            self._server = await serve(
                self._serve_agent, cfg.host, cfg.port, max_message_bytes=cfg.max_message_bytes,
                ssl=self.ssl_context, handshake_timeout=cfg.register_timeout,
                http_handler=OperatorAPI(self).handle if cfg.operator_api else None,
                receive_budget=self.upload_budget,
            )
            self.port = self._server.sockets[0].getsockname()[1]
        self._driver = asyncio.create_task(self._drive())
        self._watcher = asyncio.create_task(self._watch_credentials())
        log.info(
            "aggregator listening on %s%s (run %s, %s, version %d, store %s)",
            self.url, " with mutual TLS" if cfg.tls_client_ca else "", self.run_id[:8],
            "resumed" if run.resumed else "new", self.state.version, self.store.url,
        )
        if self.state.finished:
            self._finished.set()

    @property
    def url(self) -> str:
        """Where agents connect: ``ws://HOST:PORT``, ``wss://HOST:PORT`` or
        ``inproc://NAME`` (valid once :meth:`start` returned)."""
        if self._inproc is not None:
            return self._inproc.url
        host = self.config.host
        if ":" in host:
            host = f"[{host}]"
        return f"{'wss' if self.ssl_context else 'ws'}://{host}:{self.port}"

    async def _resume(self, structure: Structure | None, version: int) -> None:
        assert self.store is not None
        resume = await self._db(self.store.resume_state, self.run_id)
        if resume.global_model_id is None:
            raise StoreError(f"run {self.run_id}: global model {version} is missing")
        self.structure = structure
        self.global_model_id = resume.global_model_id
        self.global_weights = await self._db(self.store.load_weights,
                                                      resume.global_model_id)
        self.state.start(resume.version, time.time())
        if resume.strategy_state is None:  # no round committed yet: the initial state
            self.strategy_state = self.strategy.init_state(self.global_weights)
            self.global_extra = self.strategy.initial_extra(self.global_weights)
        else:
            self.strategy_state = resume.strategy_state
            self.global_extra = resume.global_extra
        await self._rebuild_round(resume.buffered)
        self._initialized.set()
        log.info("resumed at version %d with %d buffered upload(s)", resume.version,
                 len(resume.buffered))

    async def _rebuild_round(self, buffered: list[UploadRecord] | None = None) -> None:
        """A fresh accumulator for the round in progress, fed from the stored uploads."""
        assert self.store is not None and self.global_weights is not None
        if buffered is None:
            buffered = (await self._db(self.store.resume_state, self.run_id)).buffered
        self._acc = self._begin_round()
        self.state.contributors = {}
        self._round_inputs = []
        for rec in buffered:
            weights = await self._db(self.store.load_weights, rec.model_id)
            extra = await self._db(self.store.load_extra, rec.model_id)
            update = Update(rec.agent_id, weights, rec.num_samples,
                            max(0, self.state.version - rec.base_version), rec.metrics,
                            rec.model_id, extra)
            if self.gate is not None:
                update = self._gated(update, self.gate.check(weights, self.global_weights))
            self._acc.add(update)
            self.state.contribute(rec.agent_id, rec.model_id)
            self._round_inputs.append((rec.num_samples, rec.metrics))

    async def wait_finished(self) -> None:
        """Return when the last round is over and the agents had ``finish_grace`` seconds
        to collect the final model (or when :meth:`stop` was called)."""
        finished = asyncio.create_task(self._finished.wait())
        stopped = asyncio.create_task(self._stopped.wait())
        await asyncio.wait({finished, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finished.cancel()
        stopped.cancel()
        if self._stopped.is_set():
            return
        deadline = time.monotonic() + self.config.finish_grace
        while self.sessions and time.monotonic() < deadline and not self._stopped.is_set():
            await asyncio.sleep(0.05)
        await self._wait_tasks()
        assert self.store is not None
        await self._db(self.store.finish_run, self.run_id)
        log.info("run %s finished after %d rounds", self.run_id[:8], self.state.version)

    _stopping: asyncio.Future[None] | None = None

    async def stop(self) -> None:
        """Stop serving: say bye to the agents, close connections, close the store.

        Idempotent: a second (or concurrent) call waits for the first one's work (the
        operator API's shutdown and the CLI's signal handling may both call it)."""
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._stop())
        await asyncio.shield(self._stopping)

    async def _stop(self) -> None:
        self._stopped.set()
        if self._server is not None:
            self._server.close()
        if self._inproc is not None:
            self._inproc.close()
        for s in list(self.sessions.values()):
            with contextlib.suppress(Exception):
                await s.send(Bye(reason="aggregator stopping"), 1.0)
            with contextlib.suppress(Exception):
                await s.conn.close(1001, "aggregator stopping", timeout=1.0)
        if self._watcher is not None:
            self._watcher.cancel()
        if self._driver is not None:
            self._driver.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._driver
        await self._wait_tasks()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
        if self._own_store and self.store is not None:
            await self._db(self.store.close)
        self._db_closed = True
        self._db_thread.shutdown(wait=False)

    async def _wait_tasks(self) -> None:
        pending = [t for t in self._tasks if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=60)

    async def _db(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a database call on the store thread (a plain worker thread once stopped;
        inline with the in-process transport)."""
        call = functools.partial(fn, *args, **kwargs)
        if self._db_inline:
            return call()
        if self._db_closed:
            return await asyncio.to_thread(call)
        return await asyncio.get_running_loop().run_in_executor(self._db_thread, call)

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def statistics(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "version": self.state.version,
            "round": self.state.round,
            "active_agents": len(self.sessions),
            "contributors": len(self.state.contributors),
            "needed": self.state.needed(len(self.sessions)),
            "finished": self.state.finished,
        }

    # ------------------------------------------------------------------ connections
    async def _serve_agent(self, conn: Connection) -> None:
        cfg = self.config
        session: AgentSession | None = None
        lease = 3 * cfg.heartbeat_interval
        try:
            raw = await asyncio.wait_for(conn.recv(), cfg.register_timeout)
            first = decode(raw, self.limits)
            if not isinstance(first, Participate):
                raise RemoteProtocolError("the first message must be participate",
                                          code="expected-participate")
            session = await self._register(conn, first)
            del raw, first  # free the initial model's receive buffer (the store has it)
            if session is None:
                return
            await self._welcome(session)
            assert self.store is not None
            await self._db(
                self.store.log_event, "joined", {"name": session.name, "address": session.address},
                run_id=self.run_id, agent_id=session.agent_id,
            )
            while True:
                raw = await self._recv_leased(conn, lease)
                session.last_seen = time.monotonic()
                msg = decode(raw, self.limits)
                if isinstance(msg, ModelUpload):
                    await self._on_upload(session, msg)
                elif isinstance(msg, Poll):
                    if session.poll_task is not None and not session.poll_task.done():
                        session.poll_task.cancel()
                    session.poll_task = self._spawn(self._on_poll(session, msg))
                elif isinstance(msg, Heartbeat):
                    await session.send(Heartbeat(seq=msg.seq), cfg.send_timeout)
                elif isinstance(msg, Bye):
                    return
                else:
                    raise RemoteProtocolError(f"unexpected {msg.TYPE} message from an agent",
                                              code="unexpected-message")
                del raw, msg  # an upload's buffer is freed now, not at the next message
        except RemoteProtocolError as exc:
            who = session.name if session else conn.remote_address
            log.warning("protocol error from %s: %s", who, exc)
            await self._refuse(conn, exc.code, str(exc), session)
        except TimeoutError:
            who = session.name if session else conn.remote_address
            log.warning("%s went silent; closing its connection", who)
        except ConnectionClosed:
            pass
        except Exception as exc:  # a bug: keep serving everyone else, tell this agent
            log.exception("internal error while serving %s",
                          session.name if session else conn.remote_address)
            await self._refuse(conn, "internal-error", f"aggregator error: {exc!r}"[:500],
                               session)
        finally:
            if session is not None:
                await self._leave(session)

    async def _recv_leased(self, conn: Connection, lease: float) -> memoryview | Segments:
        """The next message; TimeoutError after ``lease`` s of silence. A connection in the
        middle of a big message (arriving, or held back by the upload budget) is not
        silent: it gets up to ``10 x send_timeout`` more."""
        extra = 10 * self.config.send_timeout
        while True:
            try:
                async with asyncio.timeout(lease):
                    return await conn.recv()
            except TimeoutError:
                if not getattr(conn, "in_message", False) or extra <= 0:
                    raise
                extra -= lease

    async def _refuse(self, conn: Connection, code: str, message: str,
                      session: AgentSession | None, detail: dict[str, Any] | None = None,
                      agent_id: str | None = None) -> None:
        # the audit record first: closing may wait for the peer, and an aggregator that
        # stops meanwhile must not lose it
        assert self.store is not None
        with contextlib.suppress(StoreError):
            await self._db(
                self.store.log_event, "refused",
                {"code": code, "message": message[:500], "address": conn.remote_address,
                 **(detail or {})},
                run_id=self.run_id, agent_id=session.agent_id if session else agent_id,
            )
        with contextlib.suppress(Exception):
            await asyncio.wait_for(
                conn.send(encode(Error(code=code, message=message, fatal=True))), 5.0
            )
        with contextlib.suppress(Exception):
            await conn.close(1009 if code == "too-large" else 1008, code, timeout=1.0)

    async def _register(self, conn: Connection, msg: Participate) -> AgentSession | None:
        assert self.store is not None
        name = msg.agent_name.strip()
        if not name or len(name) > 128:
            raise RemoteProtocolError("agent_name must have 1-128 characters", code="bad-name")
        cfg = self.config
        enrollment: bool | None = None  # not presented
        if msg.enrollment is not None:
            enrollment = cfg.enrollment_token is not None and hmac.compare_digest(
                msg.enrollment.encode(), cfg.enrollment_token.encode())
        audit: dict[str, Any] = {"name": name, "auth": cfg.auth, "client": msg.client[:64],
                                 "enrollment": {None: "none", True: "valid",
                                                False: "invalid"}[enrollment]}
        try:
            reg = await self._db(
                self.store.authenticate, name, msg.token, conn.remote_address,
                auth=cfg.auth, enrollment=enrollment,
            )
        except CredentialRefused as exc:
            log.warning("refused agent %r from %s: %s (%s)", name, conn.remote_address, exc,
                        exc.reason)
            await self._refuse(conn, exc.code, str(exc), None, {
                **audit, "stage": "auth", "reason": exc.reason, "credential": exc.credential,
                "source": exc.source})
            return None
        except RegistrationRefused as exc:
            log.warning("refused agent %r from %s: %s", name, conn.remote_address, exc)
            await self._refuse(conn, exc.code, str(exc), None, {**audit, "stage": "auth"})
            return None
        except StoreError as exc:
            # the database is away: nothing is wrong with the agent, it should retry
            log.error("cannot register %r now, the store is unavailable: %s", name, exc)
            await self._refuse(conn, "unavailable",
                               "the aggregator's store is unavailable; retry later", None)
            return None
        agent_id, new = reg.agent_id, reg.new
        with contextlib.suppress(StoreError):
            await self._db(
                self.store.log_event, "authenticated",
                {**audit, "address": conn.remote_address, "source": reg.source,
                 "credential": reg.fingerprint, "new": new},
                run_id=self.run_id, agent_id=agent_id,
            )
        old = self.sessions.get(agent_id)
        if old is not None:
            log.info("agent %s reconnected; dropping its previous connection", name)
            old.conn.abort()
        session = AgentSession(agent_id, name, conn, conn.remote_address,
                               known_version=msg.known_version, credential=reg.credential,
                               source=reg.source)
        if not self._initialized.is_set():
            if msg.model is not None:
                await self._initialize(session, msg)
            else:
                log.info("agent %s waits: the federation has no model yet", name)
                await self._initialized.wait()
        self.sessions[agent_id] = session
        log.info("agent %s %s (%d active)", name, "joined" if new else "rejoined",
                 len(self.sessions))
        return session

    def disconnect_agent(self, name: str, code: str, message: str,
                         detail: dict[str, Any]) -> bool:
        """Drop the connected agent called ``name`` now: it stops counting towards rounds,
        gets a fatal ``code`` error and its connection closes (audited as ``refused`` with
        ``detail``). False if no agent of that name is connected."""
        found = False
        for s in [s for s in self.sessions.values() if s.name == name]:
            found = True
            if self.sessions.get(s.agent_id) is s:
                del self.sessions[s.agent_id]
                self._wakeup.set()
            self._spawn(self._refuse(s.conn, code, message, s,
                                     {**detail, "credential": fingerprint(s.credential),
                                      "source": s.source}))
        return found

    async def _watch_credentials(self) -> None:
        """Every heartbeat interval, one query re-checks the connected agents' credentials;
        an agent whose credential was revoked (or replaced) gets a fatal ``revoked`` error
        and its connection is closed."""
        interval = self.config.heartbeat_interval
        while not self._stopped.is_set():
            await asyncio.sleep(interval)
            sessions = [s for s in self.sessions.values() if s.welcomed]
            if not sessions or self.store is None:
                continue
            try:
                status = await self._db(self.store.credential_status,
                                                 [s.agent_id for s in sessions])
            except StoreError as exc:
                log.warning("cannot re-check credentials: %s", exc)
                continue
            for s in sessions:
                stored, revoked = status.get(s.agent_id, (None, True))
                if not revoked and stored == s.credential:
                    continue
                why = "revoked" if revoked else "replaced"
                log.warning("credential of agent %s was %s: disconnecting it", s.name, why)
                if self.sessions.get(s.agent_id) is s:
                    del self.sessions[s.agent_id]  # no longer counts towards rounds
                    self._wakeup.set()
                self._spawn(self._refuse(
                    s.conn, "revoked", f"the credential of agent {s.name!r} was {why}", s,
                    {"name": s.name, "stage": "credential-check", "reason": why,
                     "credential": fingerprint(s.credential), "source": s.source}))

    async def _initialize(self, session: AgentSession, msg: Participate) -> None:
        """The first model fixes names, shapes and dtypes; its weights or zeros start."""
        assert self.store is not None and msg.model is not None
        async with self._lock:
            if self._initialized.is_set():
                return
            try:
                validate_model(msg.model, None, agent_id=session.agent_id)
            except InvalidUpdate as exc:
                raise RemoteProtocolError(f"initial model refused: {exc}",
                                          code="invalid-model") from None
            use_weights = self.config.init_weights
            if use_weights is None:
                use_weights = True if msg.init_weights is None else msg.init_weights
            initial = {k: np.array(v) for k, v in msg.model.items()}
            glob = initial if use_weights else {k: np.zeros_like(v) for k, v in initial.items()}
            structure = structure_of(initial)
            gid = await self._db(
                self.store.init_federation, self.run_id, agent_id=session.agent_id,
                structure=structure, init_weights=use_weights, initial=initial,
                global_weights=glob, num_samples=max(msg.num_samples, 0),
                metrics=msg.metrics, aggregator_id=self.aggregator_id,
            )
            self.structure = structure
            self.global_weights = glob
            self.global_model_id = gid
            self.strategy_state = self.strategy.init_state(glob)
            self.global_extra = self.strategy.initial_extra(glob)
            self.state.start(0, time.time())
            self._acc = self._begin_round()
            self._initialized.set()
            log.info("model structure fixed by %s: %s (init from %s)", session.name,
                     ", ".join(f"{n}{list(s)}:{d}" for n, d, s in structure),
                     "its weights" if use_weights else "zeros")

    async def _welcome(self, session: AgentSession) -> None:
        assert self.global_weights is not None
        send_model = session.known_version != self.state.version
        held = 0
        if send_model:  # a welcome with the model is as big as a global model: budget it
            held = await self.fanout.acquire(
                sum(int(a.nbytes) for a in self.global_weights.values()),
                10 * self.config.send_timeout)
        try:
            await self._write_welcome(session)
        finally:
            self.fanout.release(held)

    async def _write_welcome(self, session: AgentSession) -> None:
        assert self.global_weights is not None
        version = self.state.version
        send_model = session.known_version != version
        session.write(
            Welcome(
                agent_id=session.agent_id, aggregator_id=self.aggregator_id, run_id=self.run_id,
                version=version, round=self.state.round, model_id=self.global_model_id,
                model=self.global_weights if send_model else None,
                delivery=self.config.delivery, finished=self.state.finished,
                heartbeat_interval=self.config.heartbeat_interval,
                config=self.federation_config,
                extra=self.global_extra if send_model and self.global_extra else None,
            )
        )
        session.known_version = version
        session.welcomed = True
        self._wakeup.set()
        await asyncio.wait_for(session.conn.drain(), self.config.send_timeout)

    async def _leave(self, session: AgentSession) -> None:
        if session.poll_task is not None:
            session.poll_task.cancel()
        if self.sessions.get(session.agent_id) is session:
            del self.sessions[session.agent_id]
            log.info("agent %s left (%d active)", session.name, len(self.sessions))
            self._wakeup.set()
            assert self.store is not None
            with contextlib.suppress(StoreError):
                await self._db(self.store.log_event, "left", {"name": session.name},
                                        run_id=self.run_id, agent_id=session.agent_id)
        with contextlib.suppress(Exception):
            await session.conn.close(timeout=1.0)

    # ------------------------------------------------------------------ uploads
    async def _on_upload(self, session: AgentSession, msg: ModelUpload) -> None:
        assert self.store is not None
        cfg = self.config
        try:
            if not 0 <= msg.num_samples <= cfg.max_num_samples:
                raise InvalidUpdate(
                    f"num_samples {msg.num_samples} is outside 0..{cfg.max_num_samples}"
                )
            if msg.base_version > self.state.version or msg.base_version < 0:
                raise InvalidUpdate(
                    f"base_version {msg.base_version} was never issued "
                    f"(latest global model is {self.state.version})"
                )
            validate_model(msg.model, self.structure, agent_id=session.agent_id,
                           round=self.state.round)
            extra = msg.extra or {}
            validate_extra(extra, agent_id=session.agent_id, round=self.state.round)
            assert self.global_weights is not None
            self.strategy.check(
                Update(session.agent_id, msg.model, msg.num_samples,
                       max(0, self.state.version - msg.base_version), msg.metrics, "", extra),
                self.global_weights,
            )
        except InvalidUpdate as exc:
            log.warning("refused upload from %s: %s", session.name, exc)
            await self._db(
                self.store.log_event, "upload_refused",
                {"upload_id": msg.upload_id[:64], "reason": str(exc)[:500]},
                run_id=self.run_id, agent_id=session.agent_id,
            )
            await session.send(Error(code="invalid-model", message=str(exc)), cfg.send_timeout)
            return
        if len(msg.upload_id) > 64 or not msg.upload_id:
            await self._db(
                self.store.log_event, "upload_refused",
                {"upload_id": msg.upload_id[:64], "reason": "upload_id must be 1-64 chars"},
                run_id=self.run_id, agent_id=session.agent_id,
            )
            await session.send(Error(code="bad-field", message="upload_id must be 1-64 chars"),
                               cfg.send_timeout)
            return
        # The blob first, outside the lock: content-addressed and idempotent (a re-sent
        # upload costs a hash and a stat). Then, under the lock, ONE thread hop persists the
        # record (add_upload is idempotent by upload_id: a duplicate returns the stored one)
        # and, only if this call stored it, adds it to the round's accumulator: persisted
        # before it is counted, counted before it is acknowledged.
        blob = (None if self.store.will_inline(msg.model)
                else await asyncio.to_thread(self.store.put_blob, msg.model))
        done: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._upload_queue.append(_Pending(session, msg, blob, done))
        if not self._draining:
            self._draining = True
            self._spawn(self._drain_uploads())
        await session.send(await done, cfg.send_timeout)

    async def _drain_uploads(self) -> None:
        """Group commit: the uploads that queued up while the previous batch was being
        stored are classified, persisted in ONE transaction (one fsync), counted and
        answered together, under the round lock, in arrival order. A batch ends where the
        round becomes ready, so the rest count for the next round exactly as one by one."""
        batch: list[_Planned] = []
        try:
            while self._upload_queue:
                async with self._lock:
                    batch = self._next_batch()
                    try:
                        replies = await self._store_batch(batch)
                    except Exception as exc:  # e.g. the store is unavailable: no acks
                        for item in batch:
                            if not item.pending.done.done():
                                item.pending.done.set_exception(exc)
                        continue
                    for item, reply in zip(batch, replies, strict=True):
                        if not item.pending.done.done():
                            item.pending.done.set_result(reply)
        finally:  # cancelled (the aggregator stopping) or done: nobody waits forever
            self._draining = False
            left = [item.pending for item in batch]
            if self._stopped.is_set():
                left += self._upload_queue
            for waiting in left:
                if not waiting.done.done():
                    waiting.done.set_exception(ConnectionClosed(1001, "aggregator stopping"))

    def _next_batch(self) -> list[_Planned]:
        """Take queued uploads up to (and including) the one that makes the round ready;
        classify them as one-by-one processing would (an agent's second upload in the
        batch is a duplicate)."""
        batch: list[_Planned] = []
        counted = set(self.state.contributors)
        now, active = time.time(), len(self.sessions)
        while self._upload_queue:
            p = self._upload_queue.popleft()
            agent = p.session.agent_id
            verdict = self.state.classify(agent, p.msg.base_version)
            if verdict in (Verdict.CURRENT, Verdict.NEXT) and agent in counted:
                verdict = Verdict.DUPLICATE
            batch.append(_Planned(p, verdict))
            if verdict in (Verdict.CURRENT, Verdict.NEXT):
                counted.add(agent)
                if self.state.ready_with(len(counted), now, active):
                    break
        return batch

    async def _store_batch(self, batch: list[_Planned]) -> list[Message]:
        """Gate, persist (one transaction), count; returns each upload's reply."""
        assert self.store is not None
        for item in batch:
            msg, agent = item.pending.msg, item.pending.session.agent_id
            item.status = {
                Verdict.CURRENT: "buffered", Verdict.NEXT: "buffered",
                Verdict.DROP: "stale", Verdict.DUPLICATE: "duplicate",
                Verdict.FINISHED: "late",
            }[item.verdict]
            item.update = Update(agent, msg.model, msg.num_samples,
                                 self.state.version - msg.base_version, msg.metrics, "",
                                 msg.extra or {})
            item.message = _explain(item.verdict)
            item.ack_status = item.verdict.value
            item.metrics = msg.metrics
            if item.status == "buffered" and self.gate is not None:
                decision = await asyncio.to_thread(self._gate_check, msg.model)
                item.metrics = {**msg.metrics, **{f"gate_{k}": v
                                                  for k, v in decision.metrics.items()}}
                if not decision.accepted:
                    item.status = item.ack_status = "rejected"
                    item.message = decision.reason
                item.update = self._gated(item.update, decision)
        stored = await self._db(self._persist_batch, batch)
        replies: list[Message] = []
        for item, (rec, created, add_error) in zip(batch, stored, strict=True):
            session, msg = item.pending.session, item.pending.msg
            if not created:
                replies.append(UploadAck(upload_id=msg.upload_id,
                                         status=_ack_status(rec.status), round=rec.round,
                                         message="already received"))
                continue
            if item.status == "rejected":
                log.warning("round %d: rejected the update of %s: %s", self.state.round,
                            session.name, item.message)
                await self._db(
                    self.store.log_event, "update_rejected",
                    {"upload_id": msg.upload_id, "model_id": rec.model_id,
                     "reason": item.message},
                    run_id=self.run_id, agent_id=session.agent_id,
                )
            if item.status == "buffered":
                if add_error is not None:  # e.g. a buffered strategy is full
                    replies.append(Error(code="invalid-model", message=add_error))
                    continue
                self.state.contribute(session.agent_id, rec.model_id)
                self._round_inputs.append((msg.num_samples, msg.metrics))
                self._wakeup.set()
            replies.append(UploadAck(upload_id=msg.upload_id, status=item.ack_status,
                                     round=self.state.round, message=item.message))
            log.info("round %d: %s from %s (%d/%d)", self.state.round, item.verdict.value,
                     session.name, len(self.state.contributors),
                     self.state.needed(len(self.sessions)))
        return replies

    def _persist_batch(self, batch: list[_Planned]
                       ) -> list[tuple[UploadRecord, bool, str | None]]:
        """On the store thread, under the round lock: store the uploads in one transaction
        (idempotent by upload_id) and add each one this call stored as ``buffered`` to the
        round's accumulator: persisted before counted, counted before acknowledged.
        Returns (record, stored by this call, accumulator refusal) per upload."""
        assert self.store is not None
        stored = self.store.add_uploads(self.run_id, [{
            "agent_id": item.pending.session.agent_id, "upload_id": item.pending.msg.upload_id,
            "round": self.state.round, "base_version": item.pending.msg.base_version,
            "num_samples": item.pending.msg.num_samples, "metrics": item.metrics,
            "weights": item.pending.msg.model, "status": item.status,
            "blob": item.pending.blob, "extra": item.pending.msg.extra,
        } for item in batch])
        out: list[tuple[UploadRecord, bool, str | None]] = []
        for item, (rec, created) in zip(batch, stored, strict=True):
            error = None
            if created and item.status == "buffered":
                assert self._acc is not None and item.update is not None
                try:
                    self._acc.add(dataclasses.replace(item.update, model_id=rec.model_id))
                except InvalidUpdate as exc:
                    error = str(exc)
            out.append((rec, created, error))
        return out

    def _gate_check(self, weights: Weights) -> Any:
        assert self.gate is not None and self.global_weights is not None
        baseline = None
        if self.gate.max_deviation is not None:
            if self._baseline is None or self._baseline[0] != self.state.version:
                self._baseline = (self.state.version, self.gate.baseline(self.global_weights))
            baseline = self._baseline[1]
        return self.gate.check(weights, self.global_weights, baseline)

    @staticmethod
    def _gated(update: Update, decision: Any) -> Update:
        if decision.weights is update.weights:
            return update
        return dataclasses.replace(update, weights=decision.weights)

    def _begin_round(self) -> Accumulator:
        assert self.global_weights is not None
        return self.strategy.begin(self.global_weights, self.strategy_state,
                                   round=self.state.round, rng=self.rng)

    async def _on_poll(self, session: AgentSession, msg: Poll) -> None:
        cfg = self.config
        try:
            if self.state.version <= msg.known_version and msg.wait > 0:
                waiter = self._new_version
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(waiter.wait(), min(msg.wait, 3600.0))
            if self.state.version > msg.known_version and self.global_weights is not None:
                await self._send_global(session)
            else:
                await session.send(NotReady(version=self.state.version, round=self.state.round),
                                   cfg.send_timeout)
        except (ConnectionClosed, TimeoutError):
            session.conn.abort()

    async def _send_global(self, session: AgentSession) -> None:
        """Send the latest global model: encoded once per version and shared by every
        agent; big sends take bytes of the fan-out budget until flushed."""
        assert self.global_weights is not None
        timeout = self.config.send_timeout
        _, nbytes = self._encoded_global()
        held = await self.fanout.acquire(nbytes, 10 * timeout)
        try:
            version = self.state.version  # the latest, once our turn came
            parts, _ = self._encoded_global()
            session.write_parts(parts)
            session.known_version = max(session.known_version, version)
            async with asyncio.timeout(timeout):
                await session.conn.drain()
        finally:
            self.fanout.release(held)

    def _encoded_global(self) -> tuple[list[bytes | memoryview], int]:
        assert self.global_weights is not None
        return self.fanout.encoded(self.state.version, self.global_model_id,
                                   self.global_weights, self.state.finished, self.global_extra)

    # ------------------------------------------------------------------ rounds
    async def _drive(self) -> None:
        """The one task that decides when a round completes."""
        while not self._stopped.is_set():
            deadline = self.state.deadline()
            timeout = None if deadline is None else max(0.0, deadline - time.time())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wakeup.wait()
            self._wakeup.clear()
            async with self._lock:
                dl = self.state.deadline()
                n = len(self.state.contributors)
                if (dl is not None and time.time() >= dl and 0 < n < self.state.min_updates
                        and self._warned_round != self.state.round):
                    self._warned_round = self.state.round
                    log.warning(
                        "round %d is past its deadline with %d update(s); strategy %s needs "
                        "at least %d (%d agents active)", self.state.round, n,
                        self.strategy.name, self.state.min_updates, len(self.sessions))
                if self.state.ready(time.time(), len(self.sessions)):
                    try:
                        await self._aggregate()
                    except StoreError as exc:
                        log.error("cannot store round %d (will retry): %s", self.state.round, exc)
                        await asyncio.sleep(1.0)
                        self._wakeup.set()
                    except Exception:
                        # A bug must not silently stop the federation: log it loudly and
                        # retry; the round's uploads are safe in the store.
                        log.exception("aggregation of round %d failed (will retry)",
                                      self.state.round)
                        await asyncio.sleep(1.0)
                        self._wakeup.set()

    async def _aggregate(self) -> None:
        assert self.store is not None and self._acc is not None
        rnd = self.state.round
        started = self.state.started
        inputs = list(self.state.contributors.values())
        if self._pending_result is None:
            try:
                self._pending_result = await asyncio.to_thread(self._acc.result)
            except Exception:
                # the accumulator is spent or broken: rebuild it from the stored uploads
                # (they are all persisted) before the driver retries
                await self._rebuild_round()
                raise
        result = self._pending_result  # kept until committed: a store failure retries it
        weights = result.weights
        num_samples = sum(max(n, 0) for n, _ in self._round_inputs)
        metrics: Metrics = {**result.metrics, **_mean_metrics(self._round_inputs)}
        finished = time.time()
        model_id = await self._db(
            self.store.commit_round, self.run_id, round=rnd, weights=weights, inputs=inputs,
            base_model_id=self.global_model_id or None, num_samples=num_samples,
            metrics=metrics, started=started, finished=finished,
            aggregator_id=self.aggregator_id, strategy_state=result.state,
            extra=result.extra,
        )
        self._pending_result = None
        self.global_weights = weights
        self.global_model_id = model_id
        self.global_extra = result.extra
        self.strategy_state = result.state
        self.state.advance(finished)
        self._acc = self._begin_round()
        self._round_inputs = []
        self.rounds_completed += 1
        waiter, self._new_version = self._new_version, asyncio.Event()
        waiter.set()
        log.info("round %d aggregated from %d update(s) in %.3f s%s", rnd, len(inputs),
                 finished - started, " (final)" if self.state.finished else "")
        if self.config.delivery == "push":
            self._spawn(self._broadcast())
        if self.evaluator is not None:
            self._spawn(self._evaluate(rnd, weights))
        if not self._checkpointing and (
                self.state.finished
                or time.monotonic() - self._last_checkpoint >= CHECKPOINT_INTERVAL):
            self._spawn(self._checkpoint())
        if self.state.finished:
            self._finished.set()

    async def _checkpoint(self) -> None:
        """Checkpoint the store's log while the agents train (not on the store thread:
        a checkpoint never blocks the writes of uploads); at most once a second, after a
        round (fewer fsyncs of the database file when rounds are fast)."""
        assert self.store is not None
        self._checkpointing = True
        self._last_checkpoint = time.monotonic()
        try:
            await asyncio.to_thread(self.store.checkpoint)
        except StoreError as exc:
            log.warning("store checkpoint failed (retried after the next round): %s", exc)
        finally:
            self._checkpointing = False

    async def _broadcast(self) -> None:
        """Push the global model to every agent concurrently, each with its own timeout."""
        version = self.state.version
        targets = [s for s in self.sessions.values() if s.welcomed and s.known_version < version]

        async def one(s: AgentSession) -> None:
            try:
                await self._send_global(s)
            except ConnectionClosed:  # it is leaving (e.g. a sampled agent that uploaded)
                log.debug("%s closed its connection before version %d reached it", s.name,
                          version)
                s.conn.abort()
            except (TimeoutError, OSError):
                log.warning("could not push version %d to %s; dropping it", version, s.name)
                s.conn.abort()

        await asyncio.gather(*(one(s) for s in targets))

    async def _evaluate(self, rnd: int, weights: Weights) -> None:
        assert self.evaluator is not None and self.store is not None
        try:
            async with self._eval_lock:  # one at a time, in round order
                metrics = await asyncio.to_thread(self.evaluator, weights)
            await self._db(self.store.update_round_metrics, self.run_id, rnd,
                                    {f"eval_{k}" if not k.startswith("eval_") else k: v
                                     for k, v in metrics.items()})
            log.info("round %d evaluation: %s", rnd,
                     ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                               for k, v in metrics.items()))
        except Exception:
            log.exception("evaluation of round %d failed", rnd)


def _mean_metrics(inputs: list[tuple[int, Metrics]]) -> Metrics:
    """Sample-weighted means of the agents' numeric metrics (and the max of train_seconds)."""
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    out: Metrics = {}
    for n, m in inputs:
        w = float(max(n, 1))
        for k, v in m.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                sums[k] = sums.get(k, 0.0) + w * float(v)
                weights[k] = weights.get(k, 0.0) + w
                if k == "train_seconds":
                    out["max_train_seconds"] = max(float(out.get("max_train_seconds", 0.0)),
                                                   float(v))
    for k, total in sums.items():
        out[f"mean_{k}"] = total / weights[k]
    return out


def _ack_status(stored: str) -> str:
    return {"buffered": Verdict.CURRENT.value, "aggregated": Verdict.CURRENT.value,
            "stale": Verdict.DROP.value, "duplicate": Verdict.DUPLICATE.value,
            "late": Verdict.FINISHED.value}.get(stored, stored)


def _explain(verdict: Verdict) -> str:
    return {
        Verdict.CURRENT: "",
        Verdict.NEXT: "trained on an older global model; accepted into the current round",
        Verdict.DROP: "trained on an older global model; stored but not aggregated",
        Verdict.DUPLICATE: "this agent already contributed to the current round",
        Verdict.FINISHED: "the federation is finished",
    }[verdict]


def _public_config(cfg: AggregatorConfig) -> dict[str, Any]:
    return {k: v for k, v in asdict(cfg).items()
            if k not in ("db", "blob_dir", "enrollment_token")}
