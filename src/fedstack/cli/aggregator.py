"""``fedstack aggregator`` and ``fedstack strategies``."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
from pathlib import Path
from typing import Annotated, Any

import typer

from fedstack import aio
from fedstack.aggregator.config import AggregatorConfig
from fedstack.cli.options import JsonFlag, with_group
from fedstack.cli.output import print_json, quiet_logs
from fedstack.cli.settings import AGGREGATOR_SETTINGS, aggregator_config
from fedstack.names import safe_text

__all__ = ["cmd_aggregator", "cmd_strategies", "parse_aggregator_args"]

log = logging.getLogger("fedstack.cli")

ConfigFile = Annotated[
    Path | None,
    typer.Option(
        "--config",
        help="TOML or JSON file (book keys accepted); the environment's "
        "FEDSTACK_<KEY> variables and the flags override it",
    ),
]
ReadyFile = Annotated[str | None, typer.Option("--ready-file", hidden=True)]


@with_group("flags", AGGREGATOR_SETTINGS)
def cmd_aggregator(
    flags: dict[str, Any], config: ConfigFile = None, ready_file: ReadyFile = None
) -> int:
    """Run an aggregator (until --rounds are done, SIGTERM or SIGINT)."""
    cfg = aggregator_config(config, flags, os.environ)
    with aio.runner() as runner:
        runner.run(_serve(cfg, ready_file))
    return 0


async def _serve(cfg: AggregatorConfig, ready_file: str | None) -> None:
    from fedstack.aggregator import Aggregator

    agg = Aggregator(cfg)
    await agg.start()
    if ready_file:
        tmp = Path(ready_file + ".tmp")
        ready = {
            "port": agg.port,
            "operator_port": agg.operator.port if agg.operator is not None else None,
            "run_id": agg.run_id,
            "pid": os.getpid(),
        }
        tmp.write_text(json.dumps(ready))
        tmp.replace(ready_file)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    finished = asyncio.create_task(agg.wait_finished())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({finished, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if stop.is_set():
        log.info("signal received: stopping (the run resumes from the store on restart)")
    finished.cancel()
    stopping.cancel()
    await agg.stop()


def parse_aggregator_args(argv: list[str], env: dict[str, str] | None = None) -> AggregatorConfig:
    """The configuration ``fedstack aggregator ARGV`` would run with (nothing started).

    Args:
        argv: The aggregator command's arguments (``["--config", "a.toml", "--port", "0"]``).
        env: The environment to read ``FEDSTACK_*`` from (default: none).

    Raises:
        ConfigError: A refused value. typer.TyperException: an unknown flag.
    """
    import typer.main

    command = typer.main.get_command(_aggregator_app())
    ctx = command.make_context("aggregator", list(argv))
    params = dict(ctx.params)
    config, _ = params.pop("config"), params.pop("ready_file")
    return aggregator_config(config, AGGREGATOR_SETTINGS.build(**params), env)


def _aggregator_app() -> typer.Typer:
    app = typer.Typer(add_completion=False)
    app.command()(cmd_aggregator)
    return app


def cmd_strategies(json_: JsonFlag = False) -> int:
    """List the aggregation strategies and their parameters."""
    from fedstack.strategies import describe

    items = describe()
    if json_:
        quiet_logs()
        print_json(items)
        return 0
    for s in items:
        params = ", ".join(f"{k}={v!r}" for k, v in s["params"].items()) or "-"
        kind = "streaming" if s["streaming"] else "buffered"
        print(safe_text(f"{s['name']:<16} {kind:<9}  {s['summary']}"))
        print(safe_text(f"{'':<16} params: {params}"))
        print(safe_text(f"{'':<16} federation: {s['federation']}"))
    return 0
