"""The agent library: the book's client API, over one outbound connection.

Usage from a plain training loop (the book's names)::

    agent = Agent("ws://127.0.0.1:8765", name="a1")
    agent.send_initial_model(weights)
    agent.start()                       # or agent.start_fl_client()
    while True:
        try:
            gm = agent.wait_for_global_model()
        except FederationFinished:
            break
        weights, n, metrics = train(gm)
        agent.send_trained_model(weights, n, metrics)
    agent.close()

:class:`Agent` is a thin facade over the asyncio core (:class:`fedstack.agent.core.AgentCore`
and its connection loop, :class:`fedstack.agent.connection.AgentConnection`):
registration, uploads (kept until acknowledged and re-sent after a reconnect), pushed
global models or (long-)polling, heartbeats, and reconnection with capped exponential
backoff and jitter all happen there. :meth:`Agent.start` runs the core on an event loop in
a background thread; each blocking call runs its step on that loop and waits for a future
the core completes. Code that already runs on an event loop (the simulator: thousands of
agents on one loop) uses the same agent without a thread: ``await agent.start_async()``,
``await agent.wait_for_global_model_async()``, ``agent.send_trained_model(...)`` (never
blocks without a ``state_dir``) and ``await agent.close_async()``. The book's state
machine (``waiting_gm -> training -> sending -> gm_ready``) is kept, driven by events
instead of a state file polled every 5 s.

Several aggregators (members of one federation, book rows 34-37): ``Agent(["ws://a:8765",
"ws://b:8765"], name=...)`` connects to the first and fails over to the others (and to
those the welcomes name, :attr:`Agent.aggregators`) when its aggregator dies or stops
answering; :meth:`Agent.move_to` moves on purpose. The pending upload follows either way.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from fedstack import aio
from fedstack.agent.connection import AgentConnection
from fedstack.agent.core import AgentCore, ClientState
from fedstack.agent.state import SavedGlobal
from fedstack.agent.urls import safe_url
from fedstack.buffers import take_arrays
from fedstack.errors import StoreError
from fedstack.types import Metrics, Weights
from fedstack.wire import Error, Limits, ModelUpload, UploadAck
from fedstack.wire.session import AUTH_ERRORS

__all__ = ["AUTH_ERRORS", "Agent", "ClientState"]

log = logging.getLogger("fedstack.agent")

T = TypeVar("T")


class Agent:
    """A federated-learning agent: trains where its data lives, exchanges only weights.

    Args:
        url: the aggregator, ``ws://HOST:PORT`` (``wss://`` with TLS), or a sequence of
            them: members of one federation (aggregators sharing a store and a run). The
            agent connects to the first; when its aggregator refuses connections, drops
            the connection or stops answering, it fails over to the next one known (see
            :attr:`aggregators`; :mod:`fedstack.agent.connection`) and continues with the
            federation's global model, its credential and its pending upload.
        name: this agent's stable name (same name and token -> same agent after restarts).
        token: the agent's credential (``fedstack credentials add NAME`` prints it);
            default: the ``FEDSTACK_TOKEN`` environment variable.
        enrollment_token: the deployment's shared enrollment token (default:
            ``FEDSTACK_ENROLLMENT_TOKEN``): lets this agent register a NEW name; without a
            ``token`` the agent then makes its own at :meth:`start` (see :attr:`token`).
        init_weights: the book's ``init_weights_flag``: whether this agent's initial model
            seeds the global model (True) or only its structure, with zeros (False).
        max_message_bytes: largest message accepted from the aggregator.
        poll_wait: in polling mode, seconds the aggregator may hold a poll open.
        max_backoff: cap of the reconnection backoff, seconds.
        connect_timeout: seconds to open one connection.
        ca: for ``wss://`` URLs, PEM file of the CA that signed the aggregator's certificate
            (default: ``FEDSTACK_CA``, else the system's trust store). The certificate and
            the URL's host name are always verified.
        cert, key: a client certificate (PEM) and its key, for aggregators that require
            one (mutual TLS); ``key`` may be omitted if it is in the ``cert`` file.
        state_dir: a directory (created, mode 0700) where the agent keeps its identity,
            the upload awaiting acknowledgement and the last global model it received
            (written before :meth:`wait_for_global_model` returns it), each atomically, so
            that after a crash (even SIGKILL) the agent restarted with the same directory
            resumes as the same agent and re-sends that upload with the same id, and can
            report its last global model with no aggregator reachable
            (:attr:`saved_global`; see :mod:`fedstack.agent.state`). None (the default)
            keeps everything in memory.

    A global model the aggregator sends is checked before the trainer sees it: one of
    another structure than this agent's initial model (or the federation's first), with
    NaN or infinite values, an absurd or backward version, or a welcome with an absurd
    heartbeat interval is refused (logged; the agent reconnects with backoff).

    Raises:
        ConfigError: ``url`` is not an aggregator URL (or a sequence of them, at least
            one), or ``state_dir`` belongs to an agent of another name, or is unusable.
    """

    def __init__(
        self,
        url: str | Sequence[str],
        name: str,
        *,
        token: str | None = None,
        enrollment_token: str | None = None,
        init_weights: bool = True,
        max_message_bytes: int = 1 << 30,
        poll_wait: float = 30.0,
        max_backoff: float = 10.0,
        connect_timeout: float = 10.0,
        ca: str | os.PathLike[str] | None = None,
        cert: str | os.PathLike[str] | None = None,
        key: str | os.PathLike[str] | None = None,
        state_dir: str | Path | None = None,
    ) -> None:
        self._core = AgentCore(
            url,
            name,
            token=token,
            enrollment_token=enrollment_token,
            init_weights=init_weights,
            max_message_bytes=max_message_bytes,
            poll_wait=poll_wait,
            max_backoff=max_backoff,
            connect_timeout=connect_timeout,
            ca=ca,
            cert=cert,
            key=key,
            state_dir=state_dir,
        )
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_ready = threading.Event()
        self._task: asyncio.Task[None] | None = None  # the core, without a thread

    # ------------------------------------------------------------------ what the core knows
    @property
    def url(self) -> str:
        """The aggregator connected to (or being tried now)."""
        return self._core.url

    @property
    def aggregators(self) -> list[str]:
        """Every aggregator URL known: the given ones (and those moved to), then the ones
        learned from the latest welcome (the federation's other live members, at most
        :data:`~fedstack.agent.urls.MAX_LEARNED`)."""
        return list(self._core.known.all)

    @property
    def name(self) -> str:
        return self._core.name

    @property
    def init_weights(self) -> bool:
        return self._core.init_weights

    @property
    def limits(self) -> Limits:
        return self._core.limits

    @property
    def poll_wait(self) -> float:
        return self._core.poll_wait

    @property
    def max_backoff(self) -> float:
        return self._core.max_backoff

    @property
    def connect_timeout(self) -> float:
        return self._core.connect_timeout

    @property
    def ca(self) -> str | os.PathLike[str] | None:
        return self._core.ca

    @property
    def state_dir(self) -> Path | None:
        return self._core.state_dir

    @property
    def token(self) -> str | None:
        """This agent's credential (after :meth:`start`, also one it made to enroll):
        keep it to reconnect as the same agent (e.g. as ``FEDSTACK_TOKEN``)."""
        return self._core.token

    @property
    def state(self) -> ClientState:
        return self._core.state

    @property
    def agent_id(self) -> str | None:
        return self._core.session.agent_id

    @property
    def aggregator_id(self) -> str | None:
        return self._core.session.aggregator_id

    @property
    def run_id(self) -> str | None:
        return self._core.session.run_id

    @property
    def delivery(self) -> str:
        return self._core.session.delivery

    @property
    def federation_config(self) -> Metrics:
        """Settings the aggregator sends every agent (e.g. ``fedprox_mu``)."""
        return self._core.session.config

    @property
    def round(self) -> int:
        return self._core.round

    @property
    def reconnects(self) -> int:
        return self._core.reconnects

    @property
    def refusals(self) -> list[Error]:
        """Requests the aggregator refused (e.g. an upload that failed validation)."""
        return self._core.refusals

    @property
    def on_refusal(self) -> Callable[[Error], None] | None:
        """Called (on the connection's loop) with each request the aggregator refuses
        without closing the connection, e.g. an upload that does not fit its strategy."""
        return self._core.on_refusal

    @on_refusal.setter
    def on_refusal(self, callback: Callable[[Error], None] | None) -> None:
        self._core.on_refusal = callback

    @property
    def acknowledged(self) -> list[UploadAck]:
        """Every upload acknowledgement received (the upload is then in the store)."""
        return self._core.acknowledged

    @property
    def global_extra(self) -> Weights:
        """Extra arrays that came with the global model last returned (e.g. FedCurv's
        summed statistics, SCAFFOLD's server control variate)."""
        return self._core.gm_extra

    @property
    def finished(self) -> bool:
        """True once :meth:`wait_for_global_model` returned the federation's final model."""
        return self._core.final_delivered

    @property
    def version(self) -> int:
        """Version of the latest global model received (-1: none yet)."""
        return self._core.session.known_version

    @property
    def _pending(self) -> ModelUpload | None:
        """The upload awaiting acknowledgement (tests read it)."""
        return self._core.session.pending

    # ------------------------------------------------------------------ book API
    def send_initial_model(
        self,
        weights: Mapping[str, Any],
        num_samples: int = 1,
        metrics: Mapping[str, Any] | None = None,
    ) -> None:
        """Propose the initial model (the book's template model). Call before :meth:`start`.

        If this agent is the first to join, the model fixes the federation's tensor names,
        shapes and dtypes, and (with ``init_weights``) its weights start the federation.
        """
        if self._thread is not None or self._task is not None:
            raise RuntimeError("send_initial_model() must be called before start()")
        self._core.propose(weights, num_samples, metrics)

    def start(self, timeout: float | None = 120.0) -> None:
        """Connect and register; return once the aggregator welcomed this agent.

        Keeps retrying (with backoff) while the aggregator is unreachable, up to ``timeout``.

        Raises:
            RegistrationRefused: the aggregator refused this agent.
            TLSError: the TLS handshake failed in a way no retry fixes (the aggregator's
                certificate does not verify against the CA, a client certificate is missing
                or refused, or a ws:// URL names a port that speaks only TLS): at once.
            TimeoutError: no welcome within ``timeout`` seconds.
        """
        self._prepare_start()
        self._thread = threading.Thread(
            target=self._thread_main, name=f"fedstack-agent-{self.name}", daemon=True
        )
        self._thread.start()
        self._loop_ready.wait()
        try:
            self._wait(self._core.started, timeout, self._no_welcome(timeout))
        except TimeoutError:
            self.close()
            raise

    start_fl_client = start
    """The book's name for :meth:`start`."""

    def wait_for_global_model(self, timeout: float | None = None) -> Weights:
        """Block until a global model newer than the last one returned is available.

        Raises:
            FederationFinished: the final global model was already returned.
            TimeoutError: nothing arrived within ``timeout`` seconds.
        """
        gm, record = self._wait(
            self._core.take_global_kept,
            timeout,
            lambda: TimeoutError("no new global model in time"),
        )
        if record is not None:
            self._keep_global(record)
        return gm

    @property
    def saved_global(self) -> SavedGlobal | None:
        """The last global model this agent kept in its ``state_dir`` (None without one,
        or before the first): readable with no aggregator running, e.g. by an agent
        restarted offline. Its arrays are this call's own copies.

        Raises:
            StoreError: the file is there but unreadable or damaged.
        """
        disk = self._core.disk
        return None if disk is None else disk.load_global()

    def _keep_global(self, record: SavedGlobal) -> None:
        """Write ``record`` to the state directory (a failure is logged: training goes on
        without it)."""
        disk = self._core.disk
        assert disk is not None
        try:
            disk.save_global(record)
        except StoreError as exc:
            log.warning("%s: the global model v%d is not kept: %s", self.name, record.version, exc)

    def send_trained_model(
        self,
        weights: Mapping[str, Any],
        num_samples: int,
        metrics: Mapping[str, Any] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> bool:
        """Upload a locally trained model (and optional extra named arrays).

        Returns False (and sends nothing) when the result is stale: a newer global model
        arrived while training (the book's rule; asynchronous strategies such as FedAsync
        turn it off through the federation config ``discard_stale: false``, because they
        weigh stale updates themselves), or the federation is finished.

        With a ``state_dir`` the upload is written there before it is sent (StoreError if
        that fails) and removed when the aggregator acknowledges it.
        """
        model = {k: np.array(v, copy=True) for k, v in weights.items()}
        extras = {k: np.array(v, copy=True) for k, v in (extra or {}).items()} or None
        return self._queue_upload(model, num_samples, metrics, extras)

    def send_owned_model(
        self,
        weights: dict[str, Any],
        num_samples: int,
        metrics: Mapping[str, Any] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> bool:
        """:meth:`send_trained_model` for a caller that gives ``weights`` (and ``extra``)
        up: the dicts are emptied, and each array nothing else refers to (a trainer's
        fresh result) is sent as it is instead of copied; anything still referred to
        elsewhere is copied. The simulator uploads this way."""
        model = take_arrays(weights)
        extras = take_arrays(extra) if extra else None
        return self._queue_upload(model, num_samples, metrics, extras)

    def _queue_upload(
        self,
        model: Weights,
        num_samples: int,
        metrics: Mapping[str, Any] | None,
        extras: Weights | None,
    ) -> bool:
        """Queue the upload of ``model``/``extras``, which are private to this agent."""
        core = self._core
        if core.secagg is not None:
            # secure aggregation: the model stays here; only its masked form is sent, and
            # it is never written to the state directory as a plain upload to re-send
            return self._call(core.secagg_update, model, num_samples)
        upload = self._call(core.new_upload, model, num_samples, metrics, extras)
        if upload is None:
            return False
        if core.disk is None:
            return True
        # on disk BEFORE it is sent (here, not on the connection's loop: it may be large),
        # so that after a crash from here on the restarted agent re-sends it
        core.disk.save_pending(upload, core.session.run_id)
        if self._call(core.commit_upload, upload):
            return True
        core.disk.clear_pending(upload.upload_id)  # stale after all
        return False

    def flush(self, timeout: float | None = 60.0) -> None:
        """Block until the aggregator acknowledged the last upload (it is then stored), or
        refused it. Returns at once when nothing is pending.

        Raises:
            TimeoutError: still unacknowledged after ``timeout`` seconds.
        """
        self._wait(self._core.flushed, timeout, self._not_flushed(timeout))

    def close(self, timeout: float = 10.0) -> None:
        """Leave the federation cleanly (sends ``bye``) and stop the background thread."""
        self._call(self._core.close)
        if self._thread is not None:
            self._thread.join(timeout)

    def move_to(self, url: str, timeout: float | None = 60.0) -> None:
        """Leave the current aggregator (``bye``) and join the one at ``url`` (book row 37),
        added to :attr:`aggregators`; return once it welcomed this agent. The upload
        awaiting acknowledgement follows (re-sent with its upload_id) and the agent
        continues with the global model that aggregator has.

        Raises:
            ConfigError: ``url`` is not an aggregator URL.
            RuntimeError: the agent is not started.
            TimeoutError: not welcomed by ``url`` within ``timeout`` seconds (the agent
                keeps running, with whichever known aggregator it reaches).
            RegistrationRefused, TLSError: as :meth:`start`.
        """
        if self._thread is None:
            raise RuntimeError("move_to() needs a started agent (start())")
        since = self._call(lambda: self._core.welcomes)
        target = self._call(self._core.move_to, url)
        self._wait(
            lambda: self._core.moved(target, since), timeout, self._not_moved(target, timeout)
        )

    def __enter__(self) -> Agent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ on an event loop
    async def start_async(self, timeout: float | None = 120.0) -> None:
        """:meth:`start` for code running on an event loop: the connection runs as a task
        of the running loop instead of a thread. Then use the ``*_async`` methods (and
        :meth:`send_trained_model`) from that loop only.

        Raises:
            RegistrationRefused, TLSError, TimeoutError: as :meth:`start`.
        """
        self._prepare_start()
        self._task = asyncio.create_task(
            AgentConnection(self._core).run(), name=f"fedstack-agent-{self.name}"
        )
        try:
            await self._wait_async(self._core.started, timeout, self._no_welcome(timeout))
        except TimeoutError:
            await self.close_async()
            raise

    async def wait_for_global_model_async(self, timeout: float | None = None) -> Weights:
        """:meth:`wait_for_global_model` without blocking the event loop."""
        gm, record = await self._wait_async(
            self._core.take_global_kept,
            timeout,
            lambda: TimeoutError("no new global model in time"),
        )
        if record is not None:
            await asyncio.to_thread(self._keep_global, record)
        return gm

    async def flush_async(self, timeout: float | None = 60.0) -> None:
        """:meth:`flush` without blocking the event loop."""
        await self._wait_async(self._core.flushed, timeout, self._not_flushed(timeout))

    async def move_to_async(self, url: str, timeout: float | None = 60.0) -> None:
        """:meth:`move_to` without blocking the event loop (after :meth:`start_async`)."""
        if self._task is None:
            raise RuntimeError("move_to_async() needs an agent started with start_async()")
        since = self._core.welcomes
        target = self._core.move_to(url)
        await self._wait_async(
            lambda: self._core.moved(target, since), timeout, self._not_moved(target, timeout)
        )

    async def close_async(self, timeout: float = 10.0) -> None:
        """:meth:`close` without blocking the event loop."""
        self._core.close()
        if self._task is not None:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self._task), timeout)
            if not self._task.done():
                self._task.cancel()

    # ------------------------------------------------------------------ plumbing
    def _prepare_start(self) -> None:
        if self._thread is not None or self._task is not None:
            raise RuntimeError("the agent is already started")
        self._core.prepare_start()

    def _no_welcome(self, timeout: float | None) -> Callable[[], BaseException]:
        return lambda: TimeoutError(
            f"no welcome from {self.url} within {timeout} s; is the aggregator running?"
        )

    def _not_moved(self, url: str, timeout: float | None) -> Callable[[], BaseException]:
        return lambda: TimeoutError(
            f"{self.name}: no welcome from {safe_url(url)} within {timeout} s "
            f"(now with {safe_url(self.url)})"
        )

    def _not_flushed(self, timeout: float | None) -> Callable[[], BaseException]:
        return lambda: TimeoutError(f"{self.name}: upload not acknowledged within {timeout} s")

    def _thread_main(self) -> None:
        try:
            with aio.runner() as r:
                self._loop = r.get_loop()
                self._loop_ready.set()
                r.run(AgentConnection(self._core).run())
        finally:
            self._core.stopped = True
            self._loop_ready.set()  # start() never waits for a loop that failed to open

    def _call(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the core's loop (the core is touched from its loop only); at
        once when there is no other thread, or the loop is gone."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or threading.current_thread() is thread:
            return fn(*args)
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn(*args))
                except BaseException as exc:
                    fut.set_exception(exc)

        try:
            loop.call_soon_threadsafe(run)
        except RuntimeError:  # the loop is closed: the core stopped, nothing runs there
            return fn(*args)
        while True:
            try:
                return fut.result(0.1)
            except concurrent.futures.TimeoutError:
                if not thread.is_alive() and fut.cancel():  # the loop ended without it
                    return fn(*args)

    def _wait(
        self,
        check: Callable[[], T | None],
        timeout: float | None,
        on_timeout: Callable[[], BaseException],
    ) -> T:
        """Block until ``check()`` (run on the core's loop) gives a result."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            got: tuple[T | None, concurrent.futures.Future[None] | None] = self._call(
                self._check_or_wait, check
            )
            result, changed = got
            if result is not None:
                return result
            assert changed is not None
            while not changed.done():
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise on_timeout()
                with contextlib.suppress(concurrent.futures.TimeoutError):
                    changed.result(1.0 if remaining is None else min(remaining, 1.0))

    def _check_or_wait(
        self, check: Callable[[], T | None]
    ) -> tuple[T | None, concurrent.futures.Future[None] | None]:
        result = check()
        if result is not None:
            return result, None
        fut = self._core.waiter(threadsafe=True)
        assert isinstance(fut, concurrent.futures.Future)
        return None, fut

    async def _wait_async(
        self,
        check: Callable[[], T | None],
        timeout: float | None,
        on_timeout: Callable[[], BaseException],
    ) -> T:
        """Wait on the running loop until ``check()`` gives a result."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            result = check()
            if result is not None:
                return result
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise on_timeout()
            changed = self._core.waiter()
            try:
                async with asyncio.timeout(remaining):
                    if isinstance(changed, concurrent.futures.Future):  # not started yet
                        await asyncio.wrap_future(changed)
                    else:
                        await changed
            except TimeoutError:
                raise on_timeout() from None
