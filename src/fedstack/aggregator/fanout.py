"""Memory-bounded fan-out of the global model (and of welcomes that carry it).

The global model of a version is encoded ONCE (:class:`Fanout.encoded`): every agent's
``global_model`` message is the same list of buffers, views of the aggregator's arrays,
so sending it to N agents copies nothing. A send of a big message first takes its size
from a shared :class:`~fedstack.transport.budget.ByteBudget` and holds it until the
connection flushed it to the kernel (server connections' ``drain()`` waits for an empty
transport buffer). Sends are concurrent across agents up to the budget, each with its own
timeout; whatever an event loop's transport copies of a partly sent message (asyncio's
selector transport does, uvloop does not) is therefore bounded by the budget, not by
N x the model size.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, Protocol

from fedstack.transport.budget import ByteBudget
from fedstack.types import Weights
from fedstack.wire import GlobalModel, encode, encoded_size

Parts = list[bytes | memoryview]


class _Writable(Protocol):
    def write(self, parts: Sequence[Any]) -> None: ...

    async def drain(self) -> None: ...


class Fanout:
    """The encoded global model of the current version, and the byte budget of sends."""

    def __init__(self, budget_bytes: int, *, min_bytes: int = 1 << 20) -> None:
        self.budget = ByteBudget(budget_bytes, min_bytes=min_bytes)
        self._key: tuple[int, str, bool] | None = None
        self._parts: Parts = []
        self._size = 0
        self.encodings = 0
        """How many times a global model was encoded (once per version and finality)."""

    def encoded(
        self, version: int, model_id: str, weights: Weights, final: bool, extra: Weights | None
    ) -> tuple[Parts, int]:
        """The ``global_model`` message of ``version``, encoded once and shared."""
        key = (version, model_id, final)
        if key != self._key:
            self._parts = encode(
                GlobalModel(
                    version=version,
                    model_id=model_id,
                    model=weights,
                    final=final,
                    extra=extra or None,
                )
            )
            self._size = encoded_size(self._parts)
            self._key = key
            self.encodings += 1
        return self._parts, self._size

    def forget(self) -> None:
        """Drop the cached encoding (and with it the references to old arrays)."""
        self._key, self._parts, self._size = None, [], 0

    async def acquire(self, nbytes: int, timeout: float) -> int:
        """Take ``nbytes`` of the budget (0 if the message is too small to count)."""
        if not self.budget.counts(nbytes):
            return 0
        await asyncio.wait_for(self.budget.acquire(nbytes), timeout)
        return nbytes

    def release(self, held: int) -> None:
        if held:
            self.budget.release(held)

    async def send(self, conn: _Writable, parts: Parts, nbytes: int, timeout: float) -> None:
        """Write ``parts`` on ``conn`` within the budget and wait until flushed.

        ``timeout`` bounds this agent's transfer; the wait for the budget (a queue behind
        other agents' transfers, each bounded by its own timeout) is bounded by 10x that.
        """
        held = await self.acquire(nbytes, 10 * timeout)
        try:
            conn.write(parts)
            async with asyncio.timeout(timeout):
                await conn.drain()
        finally:
            self.release(held)
