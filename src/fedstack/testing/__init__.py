"""Helpers for testing code that uses fedstack (and for fedstack's own tests).

- :func:`aggregator_thread`: a real aggregator on 127.0.0.1 in a background thread.
- :class:`AggregatorProcess`: ``fedstack aggregator`` as a subprocess that can be killed
  (SIGKILL, SIGSTOP) and restarted on the same port and database.
- :mod:`fedstack.testing.loadgen`: many protocol-level agents in one process
  (``python -m fedstack.testing.loadgen``).
- :mod:`fedstack.testing.probe`: a framework-overhead probe trainer.

Importing this package does not import the aggregator (the load generator runs without it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedstack.aggregator import Aggregator, AggregatorConfig


def small_config(db: Path | str, **overrides: Any) -> AggregatorConfig:
    """A small test aggregator on ``db``: any free port, synchronous rounds of every
    agent (threshold 1.0), float64 averaging, no credentials (loopback), short heartbeats
    and grace; ``overrides`` replace any of these or set other fields."""
    from fedstack.aggregator.config import AggregatorConfig

    base: dict[str, Any] = dict(
        port=0,
        db=str(db),
        threshold=1.0,
        heartbeat_interval=0.5,
        finish_grace=0.5,
        round_timeout=30.0,
        strategy_params={"precision": "float64"},
        auth="off",
    )
    base.update(overrides)
    return AggregatorConfig(**base)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def aggregator_thread(config: AggregatorConfig, **kwargs: object) -> Iterator[Aggregator]:
    """Run an :class:`Aggregator` in a thread with its own event loop; stop it on exit.

    ``config.port`` 0 picks a free port: read it from ``aggregator.port``.
    """
    from fedstack.aggregator import Aggregator

    started = threading.Event()
    stop: list[asyncio.Event] = []
    holder: list[Aggregator] = []
    errors: list[BaseException] = []

    async def main() -> None:
        agg = Aggregator(config, **kwargs)  # type: ignore[arg-type]
        holder.append(agg)
        stop.append(asyncio.Event())
        try:
            await agg.start()
        except BaseException as exc:  # recorded before the caller is woken up
            errors.append(exc)
            raise
        finally:
            started.set()
        await stop[0].wait()
        await agg.stop()

    def run() -> None:
        try:
            asyncio.run(main())
        except BaseException as exc:  # surfaced to the caller below
            if exc not in errors:
                errors.append(exc)
            started.set()

    thread = threading.Thread(target=run, name="fedstack-aggregator", daemon=True)
    thread.start()
    started.wait(30)
    if errors:
        raise errors[0]
    agg = holder[0]
    loop = agg._driver.get_loop() if agg._driver is not None else None
    try:
        yield agg
    finally:
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stop[0].set)
        thread.join(30)


class AggregatorProcess:
    """``python -m fedstack aggregator ...`` in a subprocess, restartable on one port."""

    def __init__(self, workdir: Path, *args: str, port: int | None = None) -> None:
        self.workdir = Path(workdir)
        self.args = list(args)
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> None:
        ready = self.workdir / f"aggregator-{self.starts}.ready"
        log = open(self.workdir / f"aggregator-{self.starts}.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fedstack",
                "aggregator",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--ready-file",
                str(ready),
                *self.args,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
        log.close()
        self.starts += 1
        deadline = time.monotonic() + timeout
        while not ready.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"aggregator exited with {self.proc.returncode}: {self.log_text()[-2000:]}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError("aggregator did not start")
            time.sleep(0.02)

    def log_text(self) -> str:
        return "\n".join(
            p.read_text(errors="replace") for p in sorted(self.workdir.glob("aggregator-*.log"))
        )

    def kill(self, sig: int = signal.SIGKILL) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)
        if sig in (signal.SIGKILL, signal.SIGTERM):
            self.proc.wait(30)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def read_ready(path: Path) -> dict[str, object]:
    data: dict[str, object] = json.loads(path.read_text())
    return data
