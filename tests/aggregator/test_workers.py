"""Workers: which thread runs what."""

from __future__ import annotations

import asyncio
import threading

from fedstack.aggregator.workers import COMPUTE_INLINE_BYTES, Workers


def where() -> str:
    return threading.current_thread().name


def test_each_kind_of_work_runs_on_its_own_thread() -> None:
    async def main() -> dict[str, str]:
        w = Workers(inline=False)
        try:
            return {
                "db": await w.db(where),
                "registry": await w.registry(where),
                "small": await w.compute(where, nbytes=COMPUTE_INLINE_BYTES),
                "big": await w.compute(where, nbytes=COMPUTE_INLINE_BYTES + 1),
                "loop": where(),
            }
        finally:
            w.close()

    got = asyncio.run(main())
    assert got["db"].startswith("fedstack-store")
    assert got["registry"].startswith("fedstack-registry")
    assert got["big"].startswith("fedstack-compute")
    assert got["small"] == got["loop"]  # small arrays: inline, a hop costs more


def test_inline_mode_and_calls_after_close() -> None:
    async def main() -> tuple[str, str, str]:
        w = Workers(inline=True)
        inline = await w.db(where)
        w.close()
        w2 = Workers(inline=False)
        w2.close()
        after = await w2.db(where)  # still works, on a plain worker thread
        return inline, after, where()

    inline, after, loop = asyncio.run(main())
    assert inline == loop
    assert after != loop and not after.startswith("fedstack-store")
