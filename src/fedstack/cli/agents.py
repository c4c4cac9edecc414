"""``fedstack agents``: N agent processes on one host, forked from one warm parent.

Each agent is a separate process with its own :class:`~fedstack.agent.Agent`, connection
and trainer — exactly what N ``fedstack agent`` commands would run — but the trainer's
module (PyTorch, scikit-learn, the data files it caches) is imported once, in the parent,
before it forks. On a small machine that is the difference between seconds and tens of
seconds of start-up for ten PyTorch agents::

    fedstack agents --url ws://127.0.0.1:8765 --count 10 \\
        --trainer fedstack.trainers.torch_digits:DigitsMLPTrainer \\
        --trainer-arg partition=dirichlet:0.5

Agent ``i`` (``--first-index`` + 0..count-1) is named ``PREFIX + i`` and its trainer is
built as ``Class(index=i, num_agents=--num-agents, **trainer_args)``; if ``Class`` has a
``warm_up()`` class method it runs once in the parent first. Credentials: the
aggregator's ``--auth off``, a shared ``--enrollment-token`` (each agent enrolls its name
with its own token), or ``--tokens-file`` (a JSON object name -> token, as issued by
``fedstack credentials add``). SIGTERM/SIGINT are passed on to every agent, which leaves
cleanly. The exit status is 0 when every agent finished the federation.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

from fedstack.errors import ConfigError

log = logging.getLogger("fedstack.cli")


def add_parser(sub: Any) -> None:
    p = sub.add_parser("agents", help="run N agent processes forked from one warm parent",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="ws://127.0.0.1:8765")
    p.add_argument("--count", type=int, required=True, help="agent processes to run")
    p.add_argument("--trainer", required=True, help="module:Class implementing fedstack.Trainer")
    p.add_argument("--trainer-arg", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--name-prefix", default="agent-")
    p.add_argument("--first-index", type=int, default=0)
    p.add_argument("--num-agents", type=int, default=None,
                   help="num_agents given to every trainer (default: first index + count)")
    p.add_argument("--tokens-file", help="JSON object: agent name -> credential")
    p.add_argument("--enrollment-token", help="shared enrollment token "
                   "(or FEDSTACK_ENROLLMENT_TOKEN)")
    p.add_argument("--ca", help="PEM CA of the aggregator's certificate (wss:// URLs)")
    p.add_argument("--state-root", help="directory holding one state directory per agent")
    p.add_argument("--init-weights", choices=["agent", "zeros"], default="agent")
    p.set_defaults(func=cmd_agents)


_children: list[int] = []


def _forward(signum: int, frame: FrameType | None) -> None:
    for pid in _children:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def cmd_agents(args: argparse.Namespace) -> int:
    from fedstack.cli.main import _parse_kv
    from fedstack.plugins import load_callable

    if args.count < 1:
        raise ConfigError("--count must be at least 1")
    if args.first_index < 0:
        raise ConfigError("--first-index must be >= 0")
    num_agents = args.num_agents or args.first_index + args.count
    tokens: dict[str, str] = {}
    if args.tokens_file:
        try:
            loaded = json.loads(Path(args.tokens_file).read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--tokens-file {args.tokens_file}: {exc}") from exc
        if not isinstance(loaded, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in loaded.items()):
            raise ConfigError("--tokens-file must hold a JSON object of name -> token strings")
        tokens = loaded
    factory = load_callable(args.trainer)  # the expensive imports happen here, once
    warm = getattr(factory, "warm_up", None)
    if callable(warm):  # optional: one-time costs paid once, before forking
        warm()
    trainer_args = _parse_kv(args.trainer_arg)
    sys.stdout.flush()
    sys.stderr.flush()
    t0 = time.monotonic()
    indices = range(args.first_index, args.first_index + args.count)
    for idx in indices:
        pid = os.fork()
        if pid == 0:  # the agent process
            code = 1
            try:
                code = _child(args, factory, trainer_args, idx, num_agents, tokens)
            except BaseException:
                log.exception("agent %s%d failed", args.name_prefix, idx)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        _children.append(pid)
    previous = {s: signal.signal(s, _forward) for s in (signal.SIGTERM, signal.SIGINT)}
    failed = 0
    try:
        for pid in list(_children):
            while True:
                try:
                    _, status = os.waitpid(pid, 0)
                    break
                except InterruptedError:  # pragma: no cover - PEP 475 retries for us
                    continue
            if os.waitstatus_to_exitcode(status) != 0:
                failed += 1
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    log.info("%d agent(s) done in %.1f s, %d failed", args.count, time.monotonic() - t0,
             failed)
    return 1 if failed else 0


def _child(args: argparse.Namespace, factory: Any, trainer_args: dict[str, str], idx: int,
           num_agents: int, tokens: dict[str, str]) -> int:
    from fedstack.agent.runner import run_trainer
    from fedstack.cli.main import _Terminated

    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, signal.SIG_DFL)

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise _Terminated

    signal.signal(signal.SIGTERM, on_sigterm)
    name = f"{args.name_prefix}{idx}"
    trainer = factory(index=idx, num_agents=num_agents, **trainer_args)
    state_dir = None if args.state_root is None else Path(args.state_root) / name
    try:
        history = run_trainer(
            trainer, args.url, name, token=tokens.get(name) or os.environ.get("FEDSTACK_TOKEN"),
            enrollment_token=args.enrollment_token, init_weights=args.init_weights != "zeros",
            state_dir=state_dir, ca=args.ca,
        )
    except _Terminated:
        return 0
    if history:
        # one write(2) per line: the agents share the parent's stdout, and a pipe keeps
        # writes of up to PIPE_BUF bytes whole
        sys.stdout.flush()
        os.write(sys.stdout.fileno(), (json.dumps({"agent": name, **history[-1]}) + "\n").encode())
    return 0
