"""Task supervision: no task of the aggregator outlives it, none fails silently.

A :class:`TaskScope` is the asyncio equivalent of a trio nursery for long-lived servers:
tasks are started with :meth:`TaskScope.spawn` (one-shot work: a broadcast, an
evaluation, a reply) or :meth:`TaskScope.supervise` (a background loop that is restarted
with a back-off when it fails), and :meth:`TaskScope.aclose` cancels every task still
running and awaits it. Unlike ``asyncio.TaskGroup``, a failing child does not cancel its
siblings: the scope reports it to ``on_error`` (the aggregator stops loudly when a task it
cannot run without fails) and logs it with its traceback; nothing is left to a
``Task exception was never retrieved`` warning.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

log = logging.getLogger("fedstack.aggregator")

ErrorHandler = Callable[[str, BaseException], None]


class ScopeClosed(RuntimeError):
    """Raised by :meth:`TaskScope.spawn` once the scope is closing: nothing new starts."""


class TaskScope:
    """Tasks owned by one object (an aggregator, a connection); closed together.

    Args:
        name: for logs.
        on_error: called (on the event loop) with the task name and the exception when a
            task spawned with ``critical=True`` fails; other failures are only logged.
    """

    def __init__(self, name: str, on_error: ErrorHandler | None = None) -> None:
        self.name = name
        self._on_error = on_error
        self._tasks: dict[asyncio.Task[Any], tuple[bool, bool]] = {}  # -> (critical, daemon)
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def __len__(self) -> int:
        return len(self._tasks)

    def spawn(
        self,
        coro: Coroutine[Any, Any, T],
        *,
        name: str = "",
        critical: bool = False,
        daemon: bool = False,
    ) -> asyncio.Task[T]:
        """Start ``coro`` as a task of this scope.

        ``critical``: its failure goes to ``on_error``. ``daemon``: it runs until the scope
        closes, so :meth:`wait_idle` does not wait for it.

        Raises:
            ScopeClosed: the scope is closing (``coro`` is closed, never run).
        """
        if self._closed:
            coro.close()
            raise ScopeClosed(f"{self.name} is closing")
        task = asyncio.get_running_loop().create_task(coro, name=name or None)
        self._tasks[task] = (critical, daemon)
        task.add_done_callback(self._done)
        return task

    def supervise(
        self,
        name: str,
        loop: Callable[[], Awaitable[None]],
        *,
        backoff: float = 1.0,
        max_backoff: float = 30.0,
        daemon: bool = True,
    ) -> asyncio.Task[None]:
        """Run ``loop()`` until the scope closes, restarting it (after ``backoff`` seconds,
        doubling to ``max_backoff``) whenever it raises; each failure is logged with its
        traceback. A ``loop`` that returns is not restarted."""

        async def run() -> None:
            delay = backoff
            while True:
                try:
                    await loop()
                    return
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception(
                        "%s: background task %s failed; restarting it in %.1f s",
                        self.name,
                        name,
                        delay,
                    )
                await asyncio.sleep(delay)
                delay = min(2 * delay, max_backoff)

        return self.spawn(run(), name=name, daemon=daemon)

    def _done(self, task: asyncio.Task[Any]) -> None:
        critical, _ = self._tasks.pop(task, (False, False))
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None:
            return
        if critical and self._on_error is not None:
            self._on_error(task.get_name(), exc)
        else:
            log.error("%s: task %s failed", self.name, task.get_name(), exc_info=exc)

    async def wait_idle(self, timeout: float) -> None:
        """Wait (at most ``timeout`` s) for the running tasks that are not daemons to end
        by themselves (tasks they start meanwhile included)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            pending = [t for t, (_, daemon) in self._tasks.items() if not daemon]
            if not pending or loop.time() >= deadline:
                return
            await asyncio.wait(pending, timeout=deadline - loop.time())

    async def aclose(self) -> None:
        """Cancel every task of the scope and wait until each has ended. Idempotent."""
        self._closed = True
        while self._tasks:
            tasks = list(self._tasks)
            for t in tasks:
                t.cancel()
            await asyncio.wait(tasks)

    async def __aenter__(self) -> TaskScope:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
