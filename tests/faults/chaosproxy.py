"""A TCP proxy for tests that cuts and stalls connections (asyncio, in a thread).

Every accepted connection is forwarded to ``upstream``. While the fault budget lasts, a
seeded RNG decides per connection after how long it is cut (both sides aborted, possibly
mid-frame) and when its traffic stalls (forwarding paused in one or both directions for
``stall`` seconds). Once ``max_cuts`` cuts and ``max_stalls`` stalls were spent, or
``fault_seconds`` after the start, the proxy forwards faithfully: every fault is bounded.

A test can also cut the link on command (a network partition): :meth:`ChaosProxy.cut`
aborts every open connection now and, until :meth:`ChaosProxy.restore`, aborts each new
one as soon as it is accepted (the client sees its connection reset); the random faults
above go on as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
import time
from dataclasses import dataclass, field


@dataclass
class ProxyStats:
    connections: int = 0
    cuts: int = 0
    stalls: int = 0
    stalled_seconds: float = 0.0
    bytes: int = 0
    partitions: int = 0  # cut() calls
    refused: int = 0  # connections aborted at once while cut
    log: list[str] = field(default_factory=list)


class ChaosProxy:
    def __init__(
        self,
        upstream_port: int,
        *,
        seed: int,
        max_cuts: int = 10,
        max_stalls: int = 10,
        cut_after: tuple[float, float] = (0.05, 0.8),
        stall: tuple[float, float] = (0.1, 0.8),
        fault_seconds: float = 15.0,
        cut_probability: float = 0.7,
    ) -> None:
        self.upstream_port = upstream_port
        self.rng = random.Random(seed)
        self.max_cuts, self.max_stalls = max_cuts, max_stalls
        self.cut_after, self.stall = cut_after, stall
        self.fault_seconds = fault_seconds
        self.cut_probability = cut_probability
        self.stats = ProxyStats()
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="chaos-proxy")
        self._t0 = 0.0
        self._tasks: set[asyncio.Task[None]] = set()
        self._partitioned = threading.Event()

    @property
    def partitioned(self) -> bool:
        """True between :meth:`cut` and :meth:`restore`."""
        return self._partitioned.is_set()

    def cut(self, timeout: float = 5.0) -> None:
        """Partition now: abort every open connection (both sides) and, until
        :meth:`restore`, every new one as soon as it is accepted. Returns once the open
        connections are aborted."""
        self._partitioned.set()
        assert self._loop is not None
        done = threading.Event()

        def abort_all() -> None:
            self.stats.partitions += 1
            self.stats.log.append(f"partition: {len(self._tasks)} connection(s) cut")
            for t in list(self._tasks):
                t.cancel()
            done.set()

        self._loop.call_soon_threadsafe(abort_all)
        assert done.wait(timeout), "the proxy's loop did not answer"

    def restore(self) -> None:
        """End the partition: new connections are forwarded again."""
        self._partitioned.clear()
        self.stats.log.append("partition restored")

    @property
    def faulty(self) -> bool:
        return time.monotonic() - self._t0 < self.fault_seconds

    def __enter__(self) -> ChaosProxy:
        self._thread.start()
        assert self._started.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._shutdown)
        self._thread.join(10)

    def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for t in self._tasks:
            t.cancel()
        assert self._loop is not None
        self._loop.call_later(0.2, self._loop.stop)

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop

        async def start() -> None:
            self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
            self.port = self._server.sockets[0].getsockname()[1]
            self._t0 = time.monotonic()

        loop.run_until_complete(start())
        self._started.set()
        try:
            loop.run_forever()
        finally:
            loop.close()

    async def _handle(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.stats.connections += 1
        if self.partitioned:
            self.stats.refused += 1
            cw.transport.abort()
            self._tasks.discard(task)
            return
        try:
            ur, uw = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            cw.close()
            self._tasks.discard(task)
            return
        except asyncio.CancelledError:  # cut while connecting upstream
            cw.transport.abort()
            self._tasks.discard(task)
            return
        if self.partitioned:  # cut while connecting upstream
            self.stats.refused += 1
            for w in (cw, uw):
                w.transport.abort()
            self._tasks.discard(task)
            return
        stall_until = [0.0, 0.0]  # per direction
        cut_at = None
        if (
            self.faulty
            and self.stats.cuts < self.max_cuts
            and self.rng.random() < self.cut_probability
        ):
            cut_at = time.monotonic() + self.rng.uniform(*self.cut_after)

        async def pump(r: asyncio.StreamReader, w: asyncio.StreamWriter, d: int) -> None:
            while True:
                data = await r.read(65536)
                if not data:
                    break
                if self.faulty and self.stats.stalls < self.max_stalls and self.rng.random() < 0.05:
                    dur = self.rng.uniform(*self.stall)
                    self.stats.stalls += 1
                    self.stats.stalled_seconds += dur
                    stall_until[d] = time.monotonic() + dur
                wait = stall_until[d] - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                self.stats.bytes += len(data)
                w.write(data)
                await w.drain()
            with contextlib.suppress(OSError):
                w.write_eof()

        async def cutter() -> None:
            if cut_at is None:
                await asyncio.Event().wait()
            assert cut_at is not None
            await asyncio.sleep(max(0.0, cut_at - time.monotonic()))
            if self.stats.cuts < self.max_cuts:
                self.stats.cuts += 1
                self.stats.log.append(f"cut connection {self.stats.connections}")
                return
            await asyncio.Event().wait()

        pumps = [asyncio.ensure_future(pump(cr, uw, 0)), asyncio.ensure_future(pump(ur, cw, 1))]
        cut = asyncio.ensure_future(cutter())
        try:
            done, _ = await asyncio.wait([*pumps, cut], return_when=asyncio.FIRST_COMPLETED)
            if cut not in done:  # one direction ended: let the other finish, bounded
                await asyncio.wait(pumps, timeout=5)
        except asyncio.CancelledError:
            pass
        finally:
            for t in [*pumps, cut]:
                t.cancel()
            for w in (cw, uw):
                w.transport.abort()
            self._tasks.discard(task)
