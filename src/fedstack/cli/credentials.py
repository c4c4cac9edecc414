"""``fedstack credentials``: issue, list and revoke the agents' and operators' credentials.

The store keeps only a salted hash of each token: ``add`` prints the token once.
``add NAME --operator`` issues a token for the aggregator's operator API instead of an
agent's (it cannot register as an agent; an agent's token cannot call the API). Names
follow :data:`fedstack.names.NAME_PATTERN`.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

import typer

from fedstack.cli.options import BlobDir, JsonFlag
from fedstack.cli.output import console, print_json, quiet_logs, table
from fedstack.names import check_agent_name
from fedstack.store import Store

__all__ = ["app"]

app = typer.Typer(
    help="issue, list and revoke agent and operator credentials",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
)

Db = Annotated[str, typer.Option("--db", help="the aggregator's SQLite file or SQLAlchemy URL")]
Name = Annotated[str, typer.Argument(metavar="NAME", help="the agent's (or operator's) name")]


@contextmanager
def _store(db: str, blob_dir: str | None, *, readonly: bool = False) -> Iterator[Store]:
    """The store at ``db``: read-only (no file created, no migration) for ``list``; for
    ``add`` and ``revoke`` opened for writing, which creates a new store (credentials may
    be issued before the aggregator's first start) but refuses another application's
    SQLite file."""
    store = Store.open_readonly(db, blob_dir) if readonly else Store(db, blob_dir)
    try:
        yield store
    finally:
        store.close()


@app.command("add")
def cmd_add(
    name: Name,
    db: Db,
    blob_dir: BlobDir = None,
    replace: Annotated[
        bool,
        typer.Option("--replace", help="replace the agent's valid credential (disconnects it)"),
    ] = False,
    operator: Annotated[
        bool,
        typer.Option(
            "--operator", help="an operator credential (for the aggregator's operator API)"
        ),
    ] = False,
    json_: JsonFlag = False,
) -> int:
    """Issue a credential for NAME and print its token (once)."""
    check_agent_name(name)
    role = "operator" if operator else "agent"
    with _store(db, blob_dir) as store:
        token = store.issue_credential(name, replace=replace, role=role)
    if json_:
        quiet_logs()
        print(json.dumps({"name": name, "role": role, "token": token}))
    elif operator:
        print(token)
        print(
            f"operator credential issued for {name!r}; it is shown only this once. "
            "Call the operator API with 'Authorization: Bearer <token>', e.g. curl -H "
            '"Authorization: Bearer $TOKEN" http://HOST:OPERATOR_PORT/api/v1/status '
            "(the aggregator's --operator-port)",
            file=sys.stderr,
        )
    else:
        print(token)
        print(
            f"credential issued for agent {name!r}; it is shown only this once. "
            f"Start the agent with FEDSTACK_TOKEN={token} (or --token / "
            "Agent(..., token=...)).",
            file=sys.stderr,
        )
    return 0


@app.command("revoke")
def cmd_revoke(name: Name, db: Db, blob_dir: BlobDir = None, json_: JsonFlag = False) -> int:
    """Revoke NAME's credential (a connected agent is disconnected)."""
    with _store(db, blob_dir) as store:
        changed = store.revoke_credential(name)
    if json_:
        quiet_logs()
        print(json.dumps({"name": name, "revoked": True, "changed": changed}))
    else:
        shown = repr(name)  # repr escapes what a terminal would interpret
        print(
            f"revoked the credential of {shown}"
            if changed
            else f"the credential of {shown} was already revoked"
        )
    return 0


@app.command("list")
def cmd_list(db: Db, blob_dir: BlobDir = None, json_: JsonFlag = False) -> int:
    """List every credential: name, role, source, fingerprint, state."""
    with _store(db, blob_dir, readonly=True) as store:
        rows = store.list_credentials()
    if json_:
        quiet_logs()
        print_json(rows)
    else:
        console().print(
            table(
                rows,
                [
                    "name",
                    "role",
                    "source",
                    "credential",
                    "created",
                    "revoked",
                    "last_seen",
                    "last_address",
                ],
            )
        )
    return 0
