"""Terminal output of the CLI: rich tables and trees, JSON lines, safe logging.

Everything agent-controlled goes through :func:`fedstack.names.safe_text` before it is
shown, and rich's markup and highlighting are off, so a name such as ``[red]x`` or
``\\x1b]8;;...`` prints as the characters it is. ``--json`` output is ``json.dumps`` of the
data, unchanged, one line.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from rich import box
from rich.console import Console
from rich.table import Table
from rich.tree import Tree

from fedstack.names import SafeFormatter, safe_text

__all__ = ["console", "print_json", "setup_logging", "short", "table", "tree"]


def setup_logging(verbose: int, quiet: bool) -> None:
    """Log to stderr: INFO by default, DEBUG with ``-v``, WARNING with ``-q``; messages
    escaped (:class:`~fedstack.names.SafeFormatter`). Only the first call configures."""
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(
            SafeFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", datefmt="%H:%M:%S")
        )
        root.addHandler(handler)
    root.setLevel(logging.WARNING if quiet else (logging.DEBUG if verbose else logging.INFO))


def quiet_logs() -> None:
    """Only warnings and errors from here on (``--json``: stdout carries the result)."""
    logging.getLogger().setLevel(max(logging.getLogger().level, logging.WARNING))


def console(file: TextIO | None = None) -> Console:
    """A console on ``file`` (default: the current ``sys.stdout``) that prints text as it
    is: no markup, no highlighting, no emoji codes; not wrapped when not a terminal."""
    out = file if file is not None else sys.stdout
    wide = None if out.isatty() else 10_000
    return Console(
        file=out, markup=False, highlight=False, emoji=False, width=wide, soft_wrap=False
    )


def print_json(data: Any) -> None:
    """One line of JSON on stdout (what ``--json`` prints)."""
    print(json.dumps(data, default=str))


def short(v: Any) -> str:
    """A cell: floats to 4 decimals (3 significant digits below 0.001), 32-character
    ids to 8, anything else escaped."""
    if isinstance(v, float):
        # 4 decimals; a small non-zero value (a delta, an error bound) keeps 3 digits
        return f"{v:.3g}" if v != 0 and abs(v) < 1e-3 else f"{v:.4f}"
    if isinstance(v, str) and len(v) == 32:
        return safe_text(v[:8])
    return "" if v is None else safe_text(v)


def table(rows: Sequence[dict[str, Any]], cols: Sequence[str]) -> Table:
    """A table of ``rows`` with the columns ``cols`` (header first, then a rule)."""
    t = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, header_style="bold")
    for c in cols:
        t.add_column(safe_text(c), overflow="fold")
    for r in rows:
        t.add_row(*(short(r.get(c)) for c in cols))
    return t


def tree(node: dict[str, Any]) -> Tree:
    """The lineage tree of :func:`fedstack.cli.db.lineage_tree`'s ``node``."""
    root = Tree(_label(node))
    _grow(root, node)
    return root


def _grow(branch: Tree, node: dict[str, Any]) -> None:
    for p in node.get("parents", []):
        _grow(branch.add(_label(p)), p)


def _label(node: dict[str, Any]) -> str:
    member = node.get("aggregator")  # a federation member's name (semi-global, global)
    if node["kind"] == "semi-global":
        who = f"of aggregator {member or str(node['producer'])[:8]}"
    elif node["kind"] == "cluster":
        who = f"by aggregator {member}" if member else "by aggregator"
    else:
        who = f"by {node.get('agent') or str(node['producer'])[:8]}"
    rel = f"[{node['relation']}] " if "relation" in node else ""
    return safe_text(
        f"{rel}{node['kind']} {str(node['id'])[:8]} round {node['round']} "
        f"{who} (n={node['num_samples']}, {node['status']})"
    )
