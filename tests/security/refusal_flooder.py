"""Registers as ``alice`` with wrong tokens over raw connections, 32 at a time, for
``SECONDS`` seconds, from its own process (as an attacker would); prints ``flooding``
when it starts and ``attempted=N refused=K`` at the end. Used by
``test_refusal_flood.py``.

    python refusal_flooder.py URL SECONDS
"""

from __future__ import annotations

import asyncio
import secrets
import sys
import time

from fedstack.transport import connect
from fedstack.wire import Error, Participate, decode, encode

CONCURRENCY = 32


async def bad_registration(url: str) -> bool:
    """One registration with a wrong token; True if it was refused as such."""
    conn = await connect(url, max_message_bytes=1 << 20)
    try:
        conn.write(encode(Participate(agent_name="alice", token=secrets.token_urlsafe(16))))
        await conn.drain()
        reply = decode(await asyncio.wait_for(conn.recv(), 20))
        return isinstance(reply, Error) and reply.code == "bad-credential"
    finally:
        conn.abort()


async def main(url: str, seconds: float) -> tuple[int, int]:
    end = time.monotonic() + seconds
    attempted = refused = 0

    async def worker() -> None:
        nonlocal attempted, refused
        while time.monotonic() < end:
            attempted += 1
            ok = await bad_registration(url)
            refused += ok

    print("flooding", flush=True)
    await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(CONCURRENCY))), seconds + 60)
    return attempted, refused


if __name__ == "__main__":
    n, k = asyncio.run(main(sys.argv[1], float(sys.argv[2])))
    print(f"attempted={n} refused={k}", flush=True)
