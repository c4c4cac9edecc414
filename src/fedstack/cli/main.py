"""The ``fedstack`` command line. The only place where errors become exit codes."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from fedstack import aio
from fedstack.errors import ConfigError, FedstackError

if TYPE_CHECKING:
    from fedstack.aggregator import AggregatorConfig

log = logging.getLogger("fedstack.cli")


def _setup_logging(verbose: int, quiet: bool = False) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    logging.basicConfig(
        level=level, stream=sys.stderr,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", datefmt="%H:%M:%S",
    )




# ---------------------------------------------------------------------- aggregator
def aggregator_config(args: argparse.Namespace) -> AggregatorConfig:
    """The aggregator's configuration: ``--config`` (if any), overridden by the flags."""
    from fedstack.aggregator import AggregatorConfig

    cfg = AggregatorConfig.load(args.config) if args.config else AggregatorConfig()
    cfg = cfg.replace(
        host=args.host, port=args.port, db=args.db, rounds=args.rounds, threshold=args.threshold,
        min_agents=args.min_agents, round_timeout=args.round_timeout, delivery=args.delivery,
        staleness=args.staleness, evaluator=args.evaluator, run_name=args.run_name,
        strategy=args.strategy, max_message_bytes=args.max_message_bytes,
        heartbeat_interval=args.heartbeat_interval, finish_grace=args.finish_grace,
        tls_cert=args.tls_cert, tls_key=args.tls_key, tls_client_ca=args.tls_client_ca,
        require_tls=args.require_tls,
        operator_api=False if args.no_operator_api else None,
        upload_budget_bytes=args.upload_budget_bytes,
        fanout_budget_bytes=args.fanout_budget_bytes,
        auth=args.auth,
        enrollment_token=args.enrollment_token or os.environ.get("FEDSTACK_ENROLLMENT_TOKEN"),
    )
    if args.init_weights is not None:
        cfg = cfg.replace(init_weights=args.init_weights == "agent")
    if args.strategy_param:
        cfg = cfg.replace(strategy_params={**cfg.strategy_params,
                                           **_parse_json_kv(args.strategy_param)})
    return cfg


def cmd_aggregator(args: argparse.Namespace) -> int:
    from fedstack.aggregator import Aggregator

    cfg = aggregator_config(args)

    async def main() -> None:
        agg = Aggregator(cfg)
        await agg.start()
        if args.ready_file:
            tmp = Path(args.ready_file + ".tmp")
            tmp.write_text(json.dumps({"port": agg.port, "run_id": agg.run_id, "pid": os.getpid()}))
            tmp.replace(args.ready_file)
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

    with aio.runner() as runner:
        runner.run(main())
    return 0


def _parse_json_kv(items: list[str]) -> dict[str, object]:
    """``key=value`` pairs; values are JSON where they parse (numbers, true, lists)."""
    out: dict[str, object] = {}
    for key, value in _parse_kv(items).items():
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def cmd_strategies(args: argparse.Namespace) -> int:
    from fedstack.strategies import describe

    items = describe()
    if args.json:
        print(json.dumps(items))
        return 0
    for s in items:
        params = ", ".join(f"{k}={v!r}" for k, v in s["params"].items()) or "-"
        kind = "streaming" if s["streaming"] else "buffered"
        print(f"{s['name']:<16} {kind:<9}  {s['summary']}")
        print(f"{'':<16} params: {params}")
    return 0


# ---------------------------------------------------------------------- agent
def _parse_kv(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--trainer-arg {item!r} must look like key=value")
        out[key] = value
    return out


class _Terminated(BaseException):
    """Raised in the main thread on SIGTERM: unwinds the training loop, which closes the
    agent (not an Exception, so a trainer's ``except Exception`` does not swallow it)."""


def cmd_agent(args: argparse.Namespace) -> int:
    from fedstack.agent.runner import run_trainer
    from fedstack.plugins import load_callable

    factory = load_callable(args.trainer)
    trainer = factory(**_parse_kv(args.trainer_arg))
    token = args.token or os.environ.get("FEDSTACK_TOKEN")

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one clean shutdown, not two
        raise _Terminated

    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        history = run_trainer(trainer, args.url, args.name, token=token,
                              init_weights=args.init_weights != "zeros",
                              state_dir=args.state_dir, ca=args.ca, cert=args.cert,
                              key=args.key)
    except _Terminated:
        # run_trainer closed the agent on the way out (bye sent); a pending upload stays
        # in --state-dir and is re-sent by the next start
        log.info("SIGTERM: agent %s left the federation", args.name)
        return 0
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if history:
        print(json.dumps(history[-1]))
    return 0


# ---------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fedstack", description="fedstack: federated learning with agents, aggregators "
        "and a model store.",
    )
    p.add_argument("-v", "--verbose", action="count", default=1)
    p.add_argument("-q", "--quiet", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    a = sub.add_parser("aggregator", help="run an aggregator")
    a.add_argument("--config", help="TOML or JSON file (book keys accepted)")
    a.add_argument("--host")
    a.add_argument("--port", type=int)
    a.add_argument("--db", help="SQLite file or SQLAlchemy URL (default fedstack.db)")
    a.add_argument("--rounds", type=int, help="stop after this many rounds (default: never)")
    a.add_argument("--threshold", type=float,
                   help="fraction of active agents whose uploads complete a round (1.0 = sync)")
    a.add_argument("--min-agents", type=int)
    a.add_argument("--round-timeout", type=float, help="round deadline in seconds")
    a.add_argument("--delivery", choices=["push", "poll"])
    a.add_argument("--staleness", choices=["drop", "next"],
                   help="what to do with uploads trained on an older global model")
    a.add_argument("--init-weights", choices=["agent", "zeros"],
                   help="start from the first agent's weights or zeros (default: agent's flag)")
    a.add_argument("--strategy", help="aggregation strategy (default fedavg; see "
                   "`fedstack strategies`)")
    a.add_argument("--strategy-param", action="append", default=[], metavar="KEY=VALUE",
                   help="a strategy parameter (JSON value), repeatable")
    a.add_argument("--evaluator", help="module:function evaluating each global model centrally")
    a.add_argument("--run-name", help="name of the run to start or resume (default 'default')")
    a.add_argument("--max-message-bytes", type=int)
    a.add_argument("--heartbeat-interval", type=float)
    a.add_argument("--finish-grace", type=float)
    a.add_argument("--tls-cert", help="PEM certificate: serve wss:// (TLS only) on the port")
    a.add_argument("--tls-key", help="PEM key of --tls-cert (default: in the --tls-cert file)")
    a.add_argument("--tls-client-ca", help="PEM CA: agents must present a client "
                   "certificate it signed (mutual TLS)")
    a.add_argument("--require-tls", action="store_true", default=None,
                   help="refuse to start without --tls-cert")
    a.add_argument("--auth", choices=["required", "off"],
                   help="required (default): agents present credentials (`fedstack "
                   "credentials add`) or enroll; off: names bound to their first token")
    a.add_argument("--enrollment-token", help="shared secret letting NEW agents register "
                   "with their own token (or FEDSTACK_ENROLLMENT_TOKEN)")
    a.add_argument("--upload-budget-bytes", type=int,
                   help="bytes of large uploads received at once (default 128 MiB)")
    a.add_argument("--fanout-budget-bytes", type=int,
                   help="bytes of the global model queued for sending at once (default 256 MiB)")
    a.add_argument("--no-operator-api", action="store_true",
                   help="do not serve the operator REST API (/healthz, /api/v1/...) on the port")
    a.add_argument("--ready-file", help=argparse.SUPPRESS)
    a.set_defaults(func=cmd_aggregator)

    g = sub.add_parser("agent", help="run an agent from a Trainer class")
    g.add_argument("--url", default="ws://127.0.0.1:8765")
    g.add_argument("--name", required=True)
    g.add_argument("--trainer", required=True, help="module:Class implementing fedstack.Trainer")
    g.add_argument("--trainer-arg", action="append", default=[], metavar="KEY=VALUE")
    g.add_argument("--token", help="credential (or FEDSTACK_TOKEN)")
    g.add_argument("--ca", help="PEM CA of the aggregator's certificate, for wss:// URLs "
                   "(or FEDSTACK_CA; default: the system's trust store)")
    g.add_argument("--cert", help="PEM client certificate, if the aggregator requires one")
    g.add_argument("--key", help="PEM key of --cert (default: in the --cert file)")
    g.add_argument("--init-weights", choices=["agent", "zeros"], default="agent")
    g.add_argument("--state-dir", help="directory keeping the agent's identity and its "
                   "unacknowledged upload across crashes (default: memory only)")
    g.set_defaults(func=cmd_agent)

    st = sub.add_parser("strategies", help="list the aggregation strategies and parameters")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=cmd_strategies)

    from fedstack.cli import agents as agents_cli
    from fedstack.cli import certs as certs_cli
    from fedstack.cli import credentials as credentials_cli
    from fedstack.cli import db as db_cli
    from fedstack.cli import demo as demo_cli
    from fedstack.cli import sim as sim_cli

    demo_cli.add_parser(sub)
    agents_cli.add_parser(sub)
    sim_cli.add_parser(sub)
    db_cli.add_parser(sub)
    certs_cli.add_parser(sub)
    credentials_cli.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose, args.quiet or getattr(args, "json", False))
    try:
        rc: int = args.func(args)
        return rc
    except FedstackError as exc:
        print(f"fedstack: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
