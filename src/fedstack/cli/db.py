"""``fedstack db``: inspect the model store (models, rounds, lineage, metrics)."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedstack.errors import StoreError
from fedstack.store import Store


def add_parser(sub: Any) -> None:
    p = sub.add_parser("db", help="inspect the model store")
    p.add_argument("what", choices=["runs", "models", "rounds", "lineage", "metrics", "agents",
                                    "events", "plot"])
    p.add_argument("model", nargs="?", help="model id for lineage (default: latest global)")
    p.add_argument("--db", required=True, help="SQLite file or SQLAlchemy URL")
    p.add_argument("--blob-dir", help="blob directory (non-SQLite databases)")
    p.add_argument("--run", help="run id or name (default: the latest run)")
    p.add_argument("--kind", choices=["local", "cluster"], help="models: only this kind")
    p.add_argument("--depth", type=int, default=2, help="lineage: levels to show")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--metric", action="append", default=[],
                   help="plot: a round metric (default eval_accuracy and mean_train_loss)")
    p.add_argument("--compare", action="append", default=[], metavar="RUN",
                   help="plot: another run on the same axes (repeatable)")
    p.add_argument("--out", default="fedstack-rounds.png", help="plot: the PNG to write")
    p.set_defaults(func=cmd_db)


def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    if isinstance(v, str) and len(v) == 32:
        return v[:8]
    return "" if v is None else str(v)


def table(rows: Sequence[dict[str, Any]], cols: Sequence[str]) -> str:
    cells = [[_short(r.get(c)) for c in cols] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def resolve_run(store: Store, run: str | None) -> str:
    runs = store.list_runs()
    if not runs:
        raise StoreError("the database holds no run yet")
    if run is None:
        return str(runs[-1]["id"])
    for r in reversed(runs):
        if r["id"] == run or r["id"].startswith(run) or r["name"] == run:
            return str(r["id"])
    raise StoreError(f"no run {run!r}; runs: {', '.join(r['name'] for r in runs)}")


def lineage_tree(store: Store, model_id: str, depth: int) -> dict[str, Any]:
    m = store.model(model_id)
    if m is None:
        raise StoreError(f"no model {model_id}")
    node: dict[str, Any] = {
        k: m[k] for k in ("id", "kind", "round", "agent", "producer", "num_samples", "status",
                          "metrics", "created")
    }
    if depth > 0:
        node["parents"] = [
            {"relation": p["relation"], **lineage_tree(store, p["id"], depth - 1)}
            for p in store.parents(model_id)
        ]
    return node


def _print_tree(node: dict[str, Any], indent: int = 0) -> None:
    who = node.get("agent") or ("aggregator" if node["kind"] == "cluster" else node["producer"][:8])
    rel = f"[{node['relation']}] " if "relation" in node else ""
    print(f"{'  ' * indent}{rel}{node['kind']} {node['id'][:8]} round {node['round']} by {who} "
          f"(n={node['num_samples']}, {node['status']})")
    for p in node.get("parents", []):
        _print_tree(p, indent + 1)


def plot_rounds(store: Store, run_ids: Sequence[str], metrics: Sequence[str],
                out: str | Path) -> Path:
    """One panel per metric (and one of round times): each run's value per round, to PNG.

    Raises:
        StoreError: matplotlib is missing (``pip install 'fedstack[plot]'``) or no run has
            any of the metrics.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise StoreError("plots need matplotlib: pip install 'fedstack[plot]'") from exc
    names = {r["id"]: r["name"] for r in store.list_runs()}
    series = {rid: store.rounds(rid) for rid in run_ids}
    shown = [m for m in metrics if any(m in (r["metrics"] or {}) for rows in series.values()
                                       for r in rows)]
    if not shown:
        raise StoreError(f"no run has the metrics {', '.join(metrics)}; see `fedstack db "
                         "metrics` for what the rounds hold")
    panels = [*shown, "seconds"]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, metric in zip(axes[0], panels, strict=True):
        for rid, rows in series.items():
            pts = [(r["round"], r["seconds"] if metric == "seconds" else
                    (r["metrics"] or {}).get(metric)) for r in rows]
            pts = [(x, y) for x, y in pts if isinstance(y, int | float)]
            if pts:
                ax.plot([x for x, _ in pts], [y for _, y in pts], marker=".",
                        label=names.get(rid, rid[:8]))
        ax.set_xlabel("round")
        ax.set_title("round seconds" if metric == "seconds" else metric)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def cmd_db(args: argparse.Namespace) -> int:
    store = Store(args.db, args.blob_dir)
    try:
        return _run(store, args)
    finally:
        store.close()


def _run(store: Store, args: argparse.Namespace) -> int:
    out: Any
    if args.what == "runs":
        out = store.list_runs()
        cols = ["id", "name", "status", "version", "created"]
    elif args.what == "agents":
        out = store.list_agents()
        cols = ["id", "name", "created", "last_seen", "last_address"]
    elif args.what == "events":  # the run's events and the deployment's (credentials)
        run_id = resolve_run(store, args.run) if args.run or store.list_runs() else None
        out = store.events(run_id, deployment=True)
        cols = ["id", "time", "kind", "agent_id", "detail"]
    elif args.what == "models":
        out = store.models(resolve_run(store, args.run), args.kind)
        cols = ["id", "kind", "round", "agent", "base_version", "num_samples", "status", "nbytes"]
    elif args.what == "rounds":
        out = store.rounds(resolve_run(store, args.run))
        for r in out:
            r["accuracy"] = r["metrics"].get("eval_accuracy")
        cols = ["round", "num_updates", "num_samples", "seconds", "accuracy", "model_id"]
    elif args.what == "plot":
        runs = [resolve_run(store, args.run)] + [resolve_run(store, r) for r in args.compare]
        path = plot_rounds(store, runs, args.metric or ["eval_accuracy", "mean_train_loss"],
                           args.out)
        print(f"wrote {path}")
        return 0
    elif args.what == "lineage":
        run_id = resolve_run(store, args.run)
        model_id = args.model
        if model_id is None:
            cluster = store.models(run_id, "cluster")
            if not cluster:
                raise StoreError("the run has no global model yet")
            model_id = cluster[-1]["id"]
        else:
            matches = [m["id"] for m in store.models(run_id) if m["id"].startswith(model_id)]
            if len(matches) != 1:
                raise StoreError(f"model id {model_id!r} matches {len(matches)} models")
            model_id = matches[0]
        out = lineage_tree(store, model_id, args.depth)
        if args.json:
            print(json.dumps(out, default=str))
        else:
            _print_tree(out)
        return 0
    else:  # metrics
        run_id = resolve_run(store, args.run)
        out = {
            "rounds": [{"round": r["round"], **r["metrics"]} for r in store.rounds(run_id)],
            "agents": [
                {"round": m["round"], "agent": m["agent"], "num_samples": m["num_samples"],
                 **m["metrics"]}
                for m in store.models(run_id, "local") if m["status"] != "initial"
            ],
        }
        if args.json:
            print(json.dumps(out, default=str))
            return 0
        for title in ("rounds", "agents"):
            rows = out[title]
            keys: list[str] = []
            for r in rows:
                keys += [k for k in r if k not in keys]
            print(f"per {title[:-1]}:" if title == "rounds" else "per agent:")
            print(table(rows, keys) if rows else "(none)")
            print()
        return 0
    if args.json:
        print(json.dumps(out, default=str))
    else:
        for r in out:
            for k in ("created", "time", "last_seen"):
                if isinstance(r.get(k), float):
                    r[k] = time.strftime("%H:%M:%S", time.localtime(r[k]))
        print(table(out, cols) if out else "(none)")
    return 0
