"""An agent that joins, uploads once and then hangs (SIGSTOP) without reading.

    python claims_hung_agent.py URL PARAMS READY_FILE

It speaks the real protocol (:class:`fedstack.wire.session.AgentSession` over
:func:`fedstack.transport.connect`), brings the initial model (the load generator's
structure, :func:`fedstack.testing.loadgen.model_of`), uploads a trained model for
version 0, waits for its acknowledgement, writes READY_FILE and stops itself: from then
on nothing reads its socket, whose receive buffer was made small (64 KiB) before the
welcome, so the kernel cannot swallow a global model either. The test kills it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import uuid
from pathlib import Path

import numpy as np

from fedstack.testing.loadgen import model_of
from fedstack.transport import connect
from fedstack.transport.ws import WSConnection
from fedstack.wire import Limits, ModelUpload, Participate
from fedstack.wire.session import AgentSession, UploadAcknowledged, Welcomed


async def main(url: str, params: int, ready: Path) -> None:
    conn = await connect(url, max_message_bytes=1 << 30)
    assert isinstance(conn, WSConnection) and conn.transport is not None
    sock = conn.transport.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    session = AgentSession(Limits(max_message_bytes=1 << 30))
    model = model_of(params)
    hello = Participate(agent_name="hung", model=model, init_weights=True, num_samples=10)
    conn.write(session.send(hello))
    event = session.receive_bytes(await asyncio.wait_for(conn.recv(), 60))
    assert isinstance(event, Welcomed), event
    version = event.message.version
    upload = ModelUpload(
        upload_id=uuid.uuid4().hex,
        base_version=version,
        num_samples=10,
        model={k: v + np.float32(0.001) for k, v in model.items()},
    )
    session.queue_upload(upload)
    conn.write(session.send(upload))
    await conn.drain()
    while not isinstance(
        session.receive_bytes(await asyncio.wait_for(conn.recv(), 60)), UploadAcknowledged
    ):
        pass
    ready.write_text(str(os.getpid()))
    os.kill(os.getpid(), signal.SIGSTOP)  # hung: alive, connected, never reading again
    await asyncio.sleep(3600)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])))
