"""``fedstack agent`` (one agent) and ``fedstack agents`` (N agents forked from one parent).

Both take the same connection and trainer options (:data:`~fedstack.cli.options.AGENT_OPTIONS`:
``--url`` (repeatable: the members of a federation, with failover), ``--trainer``,
``--trainer-arg``, ``--token``, ``--enrollment-token``, ``--ca``, ``--cert``, ``--key``,
``--init-weights``), declared once.

``fedstack agents`` runs each agent as a separate process with its own
:class:`~fedstack.agent.Agent`, connection and trainer, exactly what N ``fedstack agent``
commands would run, but the trainer's module (PyTorch, scikit-learn, the data files it
caches) is imported once, in the parent, before it forks: on a small machine that is the
difference between seconds and tens of seconds of start-up for ten PyTorch agents. Agent
``i`` (``--first-index`` + 0..count-1) is named ``PREFIX + i`` and its trainer is built as
``Class(index=i, num_agents=--num-agents, **trainer_args)``; if ``Class`` has a
``warm_up()`` class method it runs once in the parent first. SIGTERM and SIGINT are passed
on to every agent, which leaves cleanly; the exit status is 0 when every agent finished.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

import typer

from fedstack.cli.options import AGENT_OPTIONS, AgentOptions, JsonFlag, with_group
from fedstack.cli.output import print_json, quiet_logs
from fedstack.errors import ConfigError, FedstackError
from fedstack.names import check_agent_name, safe_text

__all__ = ["Terminated", "cmd_agent", "cmd_agent_state", "cmd_agents", "sigterm_unwinds"]

log = logging.getLogger("fedstack.cli")


class Terminated(BaseException):
    """Raised in the main thread on SIGTERM: unwinds the training loop, which closes the
    agent (not an Exception, so a trainer's ``except Exception`` does not swallow it)."""


@contextlib.contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """While inside, SIGTERM raises :class:`Terminated` in the main thread, once (a second
    SIGTERM is ignored: one clean shutdown, not two). Outside the main thread: no change."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(
    opts: AgentOptions, trainer: Any, name: str, state_dir: str | Path | None, token: str | None
) -> list[dict[str, Any]] | None:
    """One agent until the federation finishes; None if SIGTERM ended it first."""
    from fedstack.agent.runner import run_trainer

    if opts.he_context is not None:
        from fedstack.privacy.ckks import CkksTrainer

        trainer = CkksTrainer(trainer, opts.he_context)  # CkksError: a bad key file
    try:
        with sigterm_unwinds():
            return run_trainer(
                trainer,
                list(opts.urls),
                name,
                token=token,
                enrollment_token=opts.enrollment_token,
                init_weights=opts.init_weights,
                state_dir=state_dir,
                ca=opts.ca,
                cert=opts.cert,
                key=opts.key,
            )
    except Terminated:
        # run_trainer closed the agent on the way out (bye sent); a pending upload stays
        # in the state directory and is re-sent by the next start
        log.info("SIGTERM: agent %s left the federation", name)
        return None


Name = Annotated[
    str,
    typer.Option(
        "--name", help="the agent's name (letters, digits, . _ @ + -; see fedstack.names)"
    ),
]
StateDir = Annotated[
    str | None,
    typer.Option(
        "--state-dir",
        help="directory keeping the agent's identity, its unacknowledged upload and the "
        "last global model across crashes (read it with `fedstack agent-state DIR`; "
        "default: memory only)",
    ),
]


@with_group("opts", AGENT_OPTIONS)
def cmd_agent(opts: AgentOptions, name: Name, state_dir: StateDir = None) -> int:
    """Run an agent from a Trainer class."""
    from fedstack.plugins import load_callable

    check_agent_name(name)
    trainer = _make_trainer(load_callable(opts.trainer), opts.trainer_args)
    history = _run(opts, trainer, name, state_dir, opts.token)
    if history:
        print(json.dumps(history[-1]))
    return 0


Count = Annotated[int, typer.Option("--count", help="agent processes to run")]
NamePrefix = Annotated[str, typer.Option("--name-prefix", help="agent i is named PREFIX + i")]
FirstIndex = Annotated[int, typer.Option("--first-index", help="index of the first agent")]
NumAgents = Annotated[
    int | None,
    typer.Option(
        "--num-agents", help="num_agents given to every trainer (default: first index + count)"
    ),
]
TokensFile = Annotated[
    str | None,
    typer.Option(
        "--tokens-file", help="JSON object: agent name -> credential (others use --token)"
    ),
]
StateRoot = Annotated[
    str | None, typer.Option("--state-root", help="directory holding one state directory per agent")
]

_children: list[int] = []


def _forward(signum: int, frame: FrameType | None) -> None:
    for pid in _children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


@with_group("opts", AGENT_OPTIONS)
def cmd_agents(
    opts: AgentOptions,
    count: Count,
    name_prefix: NamePrefix = "agent-",
    first_index: FirstIndex = 0,
    num_agents: NumAgents = None,
    tokens_file: TokensFile = None,
    state_root: StateRoot = None,
) -> int:
    """Run N agent processes forked from one warm parent.

    The trainer's module is imported (and its warm_up() run, if it has one) once in the
    parent, which then forks --count agents: agent i (--first-index + 0..count-1) is named
    PREFIX + i, its trainer built as Class(index=i, num_agents=--num-agents,
    **trainer_args). Credentials: --tokens-file (name -> token), else --token; or
    --enrollment-token; --ca, --cert and --key apply to every agent. SIGTERM and SIGINT are
    passed on to every agent; the exit status is 0 when every agent finished.
    """
    from fedstack.plugins import load_callable

    if count < 1:
        raise ConfigError("--count must be at least 1")
    if first_index < 0:
        raise ConfigError("--first-index must be >= 0")
    names = {
        i: check_agent_name(f"{name_prefix}{i}") for i in range(first_index, first_index + count)
    }
    total = num_agents or first_index + count
    tokens = _read_tokens(tokens_file) if tokens_file else {}
    factory = load_callable(opts.trainer)  # the expensive imports happen here, once
    warm = getattr(factory, "warm_up", None)
    if callable(warm):  # optional: one-time costs paid once, before forking
        warm()
    sys.stdout.flush()
    sys.stderr.flush()
    t0 = time.monotonic()
    for idx, name in names.items():
        pid = os.fork()
        if pid == 0:  # the agent process
            code = 1
            try:
                code = _child(
                    opts, factory, idx, name, total, tokens.get(name) or opts.token, state_root
                )
            except FedstackError as exc:  # refused, misconfigured: one line, no traceback
                log.error("agent %s failed: %s", name, exc)
            except BaseException:
                log.exception("agent %s failed", name)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        _children.append(pid)
    previous = {s: signal.signal(s, _forward) for s in (signal.SIGTERM, signal.SIGINT)}
    failed = 0
    try:
        for pid in list(_children):
            _, status = os.waitpid(pid, 0)
            if os.waitstatus_to_exitcode(status) != 0:
                failed += 1
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    log.info("%d agent(s) done in %.1f s, %d failed", count, time.monotonic() - t0, failed)
    return 1 if failed else 0


def _read_tokens(path: str) -> dict[str, str]:
    try:
        loaded = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--tokens-file {path}: {exc}") from exc
    if not isinstance(loaded, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in loaded.items()
    ):
        raise ConfigError("--tokens-file must hold a JSON object of name -> token strings")
    return loaded


def _make_trainer(factory: Any, trainer_args: dict[str, Any], **given: Any) -> Any:
    """``factory(**given, **trainer_args)``; a TypeError of its signature (an unknown or
    missing ``--trainer-arg``) becomes a ConfigError saying so, not a traceback."""
    try:
        return factory(**given, **trainer_args)
    except TypeError as exc:
        if "argument" not in str(exc):  # a bug inside the trainer: keep its traceback
            raise
        raise ConfigError(
            f"the trainer {getattr(factory, '__name__', factory)!s} refused its arguments "
            f"({exc}): check the --trainer-arg names"
        ) from None


def _child(
    opts: AgentOptions,
    factory: Any,
    idx: int,
    name: str,
    num_agents: int,
    token: str | None,
    state_root: str | None,
) -> int:
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, signal.SIG_DFL)
    trainer = _make_trainer(factory, opts.trainer_args, index=idx, num_agents=num_agents)
    state_dir = None if state_root is None else Path(state_root) / name
    history = _run(opts, trainer, name, state_dir, token)
    if history:
        # one write(2) per line: the agents share the parent's stdout, and a pipe keeps
        # writes of up to PIPE_BUF bytes whole
        sys.stdout.flush()
        os.write(sys.stdout.fileno(), (json.dumps({"agent": name, **history[-1]}) + "\n").encode())
    return 0


StateDirArg = Annotated[Path, typer.Argument(help="the agent's --state-dir")]
OutFile = Annotated[
    Path | None,
    typer.Option("--out", help="also write the last global model to FILE (.safetensors or .npz)"),
]


def cmd_agent_state(state_dir: StateDirArg, json_: JsonFlag = False, out: OutFile = None) -> int:
    """Report what an agent's state directory holds: its identity, the last global model
    it received (version, run, final or not, tensors) and any upload awaiting its
    acknowledgement. Reads only; needs no aggregator."""
    import numpy as np

    from fedstack.agent.state import report_state
    from fedstack.files import atomic_write
    from fedstack.wire import tensorfile

    if out is not None and out.suffix not in (".safetensors", ".npz"):
        raise ConfigError(f"--out {out}: the file name must end in .safetensors or .npz")
    report, saved = report_state(state_dir)
    if out is not None:
        if saved is None:
            raise ConfigError(f"{state_dir} holds no global model to write to {out}")
        if out.suffix == ".npz":
            tmp = out.with_name(f".{out.name}.tmp")
            with open(tmp, "wb") as f:
                np.savez(f, allow_pickle=False, **saved.model)
            os.replace(tmp, out)
        else:
            atomic_write(out, tensorfile.encode(saved.model, {"version": str(saved.version)}))
        report["written"] = str(out)
    if json_:
        quiet_logs()
        print_json(report)
        return 0
    ident = report["identity"]
    print(
        safe_text(
            f"agent {ident['name']} (id {ident['agent_id'] or '-'}), run {ident['run_id'] or '-'}, "
            f"last version {ident['version']}"
        )
    )
    gm = report["global_model"]
    if gm is None:
        print("global model: none kept")
    else:
        received = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(gm["received"]))
        print(
            safe_text(
                f"global model: version {gm['version']}{' (final)' if gm['final'] else ''}, "
                f"run {gm['run_id'] or '-'}, received {received}, {len(gm['tensors'])} "
                f"tensors, {gm['bytes']} bytes"
            )
        )
        for name, t in gm["tensors"].items():
            print(safe_text(f"  {name}: {t['dtype']} {tuple(t['shape'])}"))
    pending = report["pending_upload"]
    print(safe_text(f"pending upload: {pending if pending is not None else 'none'}"))
    if out is not None:
        print(safe_text(f"written: {out}"))
    return 0
