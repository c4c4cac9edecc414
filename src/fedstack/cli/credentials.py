"""``fedstack credentials``: issue, list and revoke the agents' and operators' credentials.

The store keeps only a salted hash of each token: ``add`` prints the token once.
``add NAME --operator`` issues a token for the aggregator's operator API instead of an
agent's (it cannot register as an agent; an agent's token cannot call the API).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from fedstack.cli.db import table
from fedstack.store import Store


def add_parser(sub: Any) -> None:
    p = sub.add_parser("credentials",
                       help="issue, list and revoke agent and operator credentials")
    p.add_argument("action", choices=["add", "list", "revoke"])
    p.add_argument("name", nargs="?", help="agent name (add, revoke)")
    p.add_argument("--db", required=True, help="the aggregator's SQLite file or SQLAlchemy URL")
    p.add_argument("--blob-dir", help="blob directory (non-SQLite databases)")
    p.add_argument("--replace", action="store_true",
                   help="add: replace the agent's valid credential (disconnects it)")
    p.add_argument("--operator", action="store_true",
                   help="add: an operator credential (for the aggregator's operator API)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_credentials)


def cmd_credentials(args: argparse.Namespace) -> int:
    if args.action in ("add", "revoke") and not args.name:
        print(f"fedstack credentials {args.action}: give the agent NAME", file=sys.stderr)
        return 2
    store = Store(args.db, args.blob_dir)
    try:
        return _run(store, args)
    finally:
        store.close()


def _run(store: Store, args: argparse.Namespace) -> int:
    if args.action == "add":
        role = "operator" if args.operator else "agent"
        token = store.issue_credential(args.name, replace=args.replace, role=role)
        if args.json:
            print(json.dumps({"name": args.name, "role": role, "token": token}))
        elif args.operator:
            print(token)
            print(f"operator credential issued for {args.name!r}; it is shown only this once. "
                  "Call the operator API with 'Authorization: Bearer <token>', e.g. curl -H "
                  "\"Authorization: Bearer $TOKEN\" http://HOST:PORT/api/v1/status",
                  file=sys.stderr)
        else:
            print(token)
            print(f"credential issued for agent {args.name!r}; it is shown only this once. "
                  f"Start the agent with FEDSTACK_TOKEN={token} (or --token / "
                  "Agent(..., token=...)).", file=sys.stderr)
        return 0
    if args.action == "revoke":
        changed = store.revoke_credential(args.name)
        if args.json:
            print(json.dumps({"name": args.name, "revoked": True, "changed": changed}))
        else:
            print(f"revoked the credential of {args.name!r}" if changed
                  else f"the credential of {args.name!r} was already revoked")
        return 0
    rows = store.list_credentials()
    if args.json:
        print(json.dumps(rows))
    else:
        print(table(rows, ["name", "role", "source", "credential", "created", "revoked",
                           "last_seen", "last_address"]))
    return 0
