"""The ``fedstack`` command line. The only place where errors become exit codes.

Exit codes: 0 done; 1 some agent of ``fedstack agents`` failed; 2 a refused setting or
argument (:class:`~fedstack.errors.FedstackError`, a usage error); 130 interrupted.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Annotated, Any

import typer
import typer.main

from fedstack.cli import (
    agents,
    aggregator,
    certs,
    credentials,
    dashboard,
    db,
    demo,
    he,
    model,
    sim,
)
from fedstack.cli.output import setup_logging
from fedstack.errors import FedstackError
from fedstack.names import safe_text

__all__ = ["app", "main"]

app = typer.Typer(
    name="fedstack",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="fedstack: federated learning with agents, aggregators and a model store.",
)


@app.callback()
def _root(
    verbose: Annotated[
        int, typer.Option("-v", "--verbose", count=True, help="more log output (-v: debug)")
    ] = 0,
    quiet: Annotated[bool, typer.Option("-q", "--quiet", help="only warnings and errors")] = False,
) -> None:
    setup_logging(verbose, quiet)


app.command("aggregator", short_help="run an aggregator")(aggregator.cmd_aggregator)
app.command("agent", short_help="run an agent from a Trainer class")(agents.cmd_agent)
app.command("agent-state", short_help="report an agent's state directory (no aggregator needed)")(
    agents.cmd_agent_state
)
app.command("agents", short_help="run N agent processes forked from one warm parent")(
    agents.cmd_agents
)
app.command("strategies", short_help="list the aggregation strategies and parameters")(
    aggregator.cmd_strategies
)
app.command("demo", short_help="run a whole federation on bundled data")(demo.cmd_demo)
app.command("sim", short_help="simulate N virtual agents on the real aggregator and agents")(
    sim.cmd_sim
)
app.add_typer(db.app, name="db", help="inspect the model store")
app.command("dashboard", short_help="serve the web dashboard over a store, read-only")(
    dashboard.cmd_dashboard
)
app.add_typer(model.app, name="model", help="register the federation's base model")
app.command("certs", short_help="make a self-signed CA and TLS certificates for a test deployment")(
    certs.cmd_certs
)
app.add_typer(he.app, name="he", help="CKKS key sets for homomorphic encryption (extra he)")
app.add_typer(
    credentials.app,
    name="credentials",
    help="issue, list and revoke agent and operator credentials",
)


def command() -> Any:
    """The click command behind ``fedstack`` (for introspection: flags, help)."""
    return typer.main.get_command(app)


def main(argv: list[str] | None = None) -> int:
    """Run ``fedstack ARGV`` (default: ``sys.argv[1:]``) and return its exit code."""
    try:
        rc = command().main(
            args=sys.argv[1:] if argv is None else list(argv),
            prog_name="fedstack",
            standalone_mode=False,
        )
        return rc if isinstance(rc, int) else 0
    except typer.TyperException as exc:  # usage errors (typer's own click)
        show = getattr(exc, "show", None)
        if callable(show):
            show()
        else:
            print(f"fedstack: error: {exc.format_message()}", file=sys.stderr)
        return exc.exit_code
    except FedstackError as exc:
        print(f"fedstack: error: {safe_text(exc)}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, typer.Abort):
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
