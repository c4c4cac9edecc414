"""Issue 16 finding 13 (a): internal exception text never reaches an agent.

A store failure whose message carries a server path (what a blob directory that cannot be
written looks like) happens while an agent's upload is stored. The agent gets a fatal
``internal-error`` with a generic message and an incident id; the path and the exception
text are in the aggregator's log, under the same incident id, and nowhere in the reply.
"""

from __future__ import annotations

import asyncio
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedstack import AggregatorConfig, Store
from fedstack.errors import StoreError
from fedstack.testing import aggregator_thread
from fedstack.transport import connect
from fedstack.wire import Error, GlobalModel, ModelUpload, Participate, Welcome, decode, encode

SECRET = "/srv/fedstack-secret/blobs/ab/cdef"


class BrokenStore(Store):
    """Stores everything but uploads: those fail with a path in the error text."""

    def add_uploads(self, run_id: str, uploads: Any) -> Any:
        raise StoreError(f"cannot write blob to {SECRET}: Permission denied")


async def _upload_once(url: str) -> Error:
    conn = await connect(url, max_message_bytes=1 << 20)
    try:
        model = {"w": np.zeros(4, np.float32)}
        conn.write(encode(Participate(agent_name="a1", model=model)))
        assert isinstance(decode(await asyncio.wait_for(conn.recv(), 10)), Welcome)
        upload = ModelUpload(upload_id="u1", base_version=0, num_samples=1, model=model)
        await conn.send(encode(upload))
        while True:
            reply = decode(await asyncio.wait_for(conn.recv(), 10))
            if not isinstance(reply, GlobalModel):
                assert isinstance(reply, Error), reply
                return reply
    finally:
        conn.abort()


def test_internal_error_reply_carries_no_server_detail(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = AggregatorConfig(auth="off", port=0, db=str(tmp_path / "f.db"), rounds=2, min_agents=1)
    store = BrokenStore(cfg.db)
    caplog.set_level(logging.ERROR, logger="fedstack.aggregator")
    try:
        with aggregator_thread(cfg, store=store) as agg:
            reply = asyncio.run(_upload_once(f"ws://127.0.0.1:{agg.port}"))
    finally:
        store.close()
    assert reply.code == "internal-error" and reply.fatal
    assert SECRET not in reply.message and "/srv" not in reply.message
    assert "StoreError" not in reply.message and "Permission" not in reply.message
    m = re.search(r"incident ([0-9a-f]{12})", reply.message)
    assert m is not None, reply.message
    logged = [r for r in caplog.records if m.group(1) in r.getMessage()]
    assert logged, "the incident id is not in the log"
    assert any(SECRET in (r.exc_text or "") or r.exc_info for r in logged)
