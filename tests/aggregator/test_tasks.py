"""TaskScope: children never outlive the scope, failures are never silent."""

from __future__ import annotations

import asyncio
import inspect
import logging
from typing import Any

import pytest

from fedstack.aggregator.tasks import ScopeClosed, TaskScope


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_aclose_cancels_and_awaits_every_task() -> None:
    async def main() -> None:
        ended: list[str] = []

        async def forever(name: str) -> None:
            try:
                await asyncio.sleep(3600)
            finally:
                await asyncio.sleep(0)  # cleanup that itself awaits
                ended.append(name)

        scope = TaskScope("t")
        tasks = [scope.spawn(forever(f"t{i}"), name=f"t{i}") for i in range(3)]
        await asyncio.sleep(0)
        assert len(scope) == 3
        await scope.aclose()
        assert sorted(ended) == ["t0", "t1", "t2"]
        assert all(t.cancelled() for t in tasks) and len(scope) == 0

        coro = forever("late")
        with pytest.raises(ScopeClosed):
            scope.spawn(coro)
        # closed, never run: no "never awaited" warning
        assert inspect.getcoroutinestate(coro) == inspect.CORO_CLOSED

    run(main())


def test_a_critical_failure_reaches_on_error_and_others_are_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> list[tuple[str, BaseException]]:
        seen: list[tuple[str, BaseException]] = []
        scope = TaskScope("t", on_error=lambda name, exc: seen.append((name, exc)))

        async def fail(msg: str) -> None:
            raise ValueError(msg)

        scope.spawn(fail("critical"), name="owner", critical=True)
        scope.spawn(fail("plain"), name="effect")
        await asyncio.sleep(0.01)
        await scope.aclose()
        return seen

    with caplog.at_level(logging.ERROR, logger="fedstack.aggregator"):
        seen = run(main())
    assert [(n, str(e)) for n, e in seen] == [("owner", "critical")]
    assert any("effect" in r.getMessage() and r.exc_info for r in caplog.records)


def test_supervise_restarts_a_failing_loop_with_backoff() -> None:
    async def main() -> int:
        runs = 0

        async def loop() -> None:
            nonlocal runs
            runs += 1
            if runs < 3:
                raise RuntimeError("transient")
            await asyncio.sleep(3600)

        scope = TaskScope("t")
        scope.supervise("watcher", loop, backoff=0.01)
        for _ in range(200):
            if runs >= 3:
                break
            await asyncio.sleep(0.01)
        await scope.aclose()
        return runs

    assert run(main()) == 3


def test_wait_idle_waits_for_work_but_not_for_daemons() -> None:
    async def main() -> None:
        scope = TaskScope("t")
        done: list[str] = []

        async def work(delay: float) -> None:
            await asyncio.sleep(delay)
            done.append("work")
            if delay > 0.01:  # work that starts more work is waited for too
                scope.spawn(work(0.0))

        scope.spawn(asyncio.sleep(3600), daemon=True)
        scope.spawn(work(0.02))
        await scope.wait_idle(5)
        assert done == ["work", "work"]
        await scope.aclose()

    run(main())
