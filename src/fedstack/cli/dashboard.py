"""``fedstack dashboard --db URL``: the dashboard over a store alone, read-only.

Past runs, runs of other aggregators, a horizontal federation's shared database: the
store is opened read-only (:meth:`Store.open_readonly`: SQLite's ``mode=ro``,
PostgreSQL's read-only transactions), live views poll it for new rounds, and the pages
offer no login and no action (those are on the dashboard of an aggregator's operator
port). Serves until SIGINT or SIGTERM.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import signal
from pathlib import Path
from typing import Annotated

import typer

from fedstack import aio
from fedstack.cli.options import BlobDir, DbPath
from fedstack.errors import ConfigError

__all__ = ["cmd_dashboard"]

log = logging.getLogger("fedstack.cli")

Host = Annotated[
    str,
    typer.Option(
        "--host",
        help="address to listen on (the dashboard has no login: anyone who reaches it "
        "reads the store)",
    ),
]
Port = Annotated[int, typer.Option("--port", help="port to listen on (0: a free one)")]
ReadyFile = Annotated[
    str | None,
    typer.Option("--ready-file", help='write {"port": N, "url": ...} here once serving'),
]


def cmd_dashboard(
    db: DbPath,
    blob_dir: BlobDir = None,
    host: Host = "127.0.0.1",
    port: Port = 8080,
    ready_file: ReadyFile = None,
) -> int:
    """Serve the dashboard over a store, read-only (until SIGINT or SIGTERM)."""
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port {port} is not a port number (0-65535)")
    from fedstack.store import Store

    store = Store.open_readonly(db, blob_dir)
    try:
        with aio.runner() as runner:
            runner.run(_serve(store, host, port, ready_file))
    finally:
        store.close()
    return 0


async def _serve(store: object, host: str, port: int, ready_file: str | None) -> None:
    from fedstack.dashboard import Dashboard, dashboard_middleware
    from fedstack.operator import OperatorServer, create_app
    from fedstack.store import Store

    assert isinstance(store, Store)
    dashboard = Dashboard(store)
    app = create_app(dashboard.routes(), middleware=dashboard_middleware(host))
    server = OperatorServer(app, host, port, label="dashboard (read-only)")
    try:
        await server.start()
    except OSError as exc:
        raise ConfigError(
            f"cannot serve the dashboard on {host}:{port} (--host, --port): {exc.strerror or exc}"
        ) from exc
    try:
        if not _loopback(host):
            log.warning(
                "the dashboard listens on %s, beyond this machine: it has no login, "
                "anyone who reaches it reads the store",
                host,
            )
        print(f"fedstack dashboard (read-only) on {server.url}/", flush=True)
        if ready_file:
            tmp = Path(ready_file + ".tmp")
            tmp.write_text(json.dumps({"port": server.port, "url": server.url, "pid": os.getpid()}))
            tmp.replace(ready_file)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        dashboard.close()  # the live views' streams end: nothing holds the server up
        await server.stop()


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
