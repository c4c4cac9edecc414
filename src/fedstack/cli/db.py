"""``fedstack db VIEW``: inspect the model store, one subcommand per view.

``runs``, ``agents``, ``aggregators`` (a federation's members, ``--liveness``),
``events``, ``models`` (``--kind``), ``rounds``, ``lineage`` (``MODEL_ID``, ``--depth``:
global <- semi-global <- local models in a federation), ``metrics`` and ``plot``
(``--metric``, ``--compare``, ``--out``); each takes ``--db`` and ``--blob-dir``, ``--run``
where a run is meant, and ``--json`` (the data, one line) except ``plot``. Agent- and
peer-controlled text (names, URLs, metric keys, event details) is shown escaped.

The views open the store read-only (:meth:`Store.open_readonly`): a missing file, another
application's database, an empty file or a store of another schema version is refused with
an error (exit 2), never created, converted or migrated. ``export MODEL_ID --format
safetensors|npz|pt --out FILE`` writes any stored model to a file in a native format.
``upgrade`` is the one subcommand
that writes: it brings a store's schema up to date (or creates a new store), as the
aggregator does when it starts.

``export --to mlflow|tensorboard`` writes a run's rounds (figures, metrics, evaluation,
each agent's training metrics) to an experiment tracker (:mod:`fedstack.trackers`): the
rounds it does not hold yet, so exporting again, or after an aggregator followed the run
with ``--track``, never logs a round twice.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from sqlalchemy.exc import SQLAlchemyError

from fedstack.cli.options import BlobDir, DbPath, JsonFlag, RunOpt
from fedstack.cli.output import console, print_json, quiet_logs, table, tree
from fedstack.errors import StoreError
from fedstack.names import safe_text
from fedstack.store import Store, migrations
from fedstack.store.database import redacted, resolve_url
from fedstack.store.modelfiles import Format, write_model_file

__all__ = ["app", "export_run_to", "find_model", "lineage_tree", "plot_rounds", "resolve_run"]

app = typer.Typer(
    help="inspect the model store",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
)


@contextmanager
def _store(db: str, blob_dir: str | None) -> Iterator[Store]:
    store = Store.open_readonly(db, blob_dir)
    try:
        yield store
    finally:
        store.close()


def resolve_run(store: Store, run: str | None) -> str:
    """The id of run ``run`` (an id, a prefix of one or a name; None: the latest).

    Raises:
        StoreError: The database has no run, or none matches.
    """
    runs = store.list_runs()
    if not runs:
        raise StoreError("the database holds no run yet")
    if run is None:
        return str(runs[-1]["id"])
    for r in reversed(runs):
        if r["id"] == run or r["id"].startswith(run) or r["name"] == run:
            return str(r["id"])
    raise StoreError(f"no run {run!r}; runs: {', '.join(r['name'] for r in runs)}")


def lineage_tree(
    store: Store, model_id: str, depth: int, *, members: dict[str, str] | None = None
) -> dict[str, Any]:
    """Model ``model_id`` and, ``depth`` levels deep, the models it was made from.

    A model produced by a federation member (a semi-global or a global model) names it
    under ``"aggregator"`` (``members``: ``{member id: name}``, read from the store if
    not given)."""
    m = store.model(model_id)
    if m is None:
        raise StoreError(f"no model {model_id}")
    if members is None:
        members = store.aggregator_names()
    node: dict[str, Any] = {
        k: m[k]
        for k in (
            "id",
            "kind",
            "round",
            "agent",
            "producer",
            "num_samples",
            "status",
            "metrics",
            "created",
        )
    }
    if m["kind"] != "local" and m["producer"] in members:
        node["aggregator"] = members[m["producer"]]
    if depth > 0:
        node["parents"] = [
            {
                "relation": p["relation"],
                **lineage_tree(store, p["id"], depth - 1, members=members),
            }
            for p in store.parents(model_id)
        ]
    return node


def _show(rows: list[dict[str, Any]], cols: Sequence[str], as_json: bool) -> None:
    if as_json:
        quiet_logs()
        print_json(rows)
        return
    for r in rows:
        for k in ("created", "time", "last_seen", "started"):
            if isinstance(r.get(k), float):
                r[k] = time.strftime("%H:%M:%S", time.localtime(r[k]))
    if rows:
        console().print(table(rows, cols))
    else:
        print("(none)")


@app.command("runs")
def cmd_runs(db: DbPath, blob_dir: BlobDir = None, json_: JsonFlag = False) -> int:
    """The runs in the store."""
    with _store(db, blob_dir) as store:
        _show(store.list_runs(), ["id", "name", "status", "version", "created"], json_)
    return 0


@app.command("agents")
def cmd_agents(db: DbPath, blob_dir: BlobDir = None, json_: JsonFlag = False) -> int:
    """The agents the store has seen."""
    with _store(db, blob_dir) as store:
        _show(store.list_agents(), ["id", "name", "created", "last_seen", "last_address"], json_)
    return 0


Liveness = Annotated[
    float,
    typer.Option("--liveness", help="seconds without a heartbeat after which a member is not live"),
]


@app.command("aggregators")
def cmd_aggregators(
    db: DbPath,
    blob_dir: BlobDir = None,
    run: RunOpt = None,
    liveness: Liveness = 5.0,
    json_: JsonFlag = False,
) -> int:
    """The run's federation: its aggregators, their liveness and semi-global models."""
    with _store(db, blob_dir) as store:
        run_id = resolve_run(store, run)
        now = store.db_now()
        members = store.members(run_id, liveness=liveness)
        delivered = store.semi_globals_delivered(run_id)
    rows = [
        {
            "name": m.name,
            "id": m.id,
            "url": m.url,
            "upstream": m.upstream,
            "state": "live" if m.live else ("stopped" if m.status == "stopped" else "lost"),
            "heartbeat_age": round(max(0.0, now - m.heartbeat), 3),
            "active_agents": m.active_agents,
            "version": m.version,
            "semi_globals": delivered.get(m.id, 0),
            "started": m.started,
        }
        for m in members
    ]
    cols = ["name", "id", "url", "state", "heartbeat_age", "active_agents", "version"]
    _show(rows, [*cols, "semi_globals"], json_)
    return 0


@app.command("events")
def cmd_events(
    db: DbPath, blob_dir: BlobDir = None, run: RunOpt = None, json_: JsonFlag = False
) -> int:
    """The audit trail: the run's events and the deployment's (credentials)."""
    with _store(db, blob_dir) as store:
        run_id = resolve_run(store, run) if run or store.list_runs() else None
        _show(
            store.events(run_id, deployment=True),
            ["id", "time", "kind", "agent_id", "detail"],
            json_,
        )
    return 0


Kind = Annotated[
    Literal["local", "cluster", "semi-global"] | None,
    typer.Option("--kind", help="only this kind of model"),
]


@app.command("models")
def cmd_models(
    db: DbPath,
    blob_dir: BlobDir = None,
    run: RunOpt = None,
    kind: Kind = None,
    json_: JsonFlag = False,
) -> int:
    """The run's models (local uploads, semi-global and global models)."""
    with _store(db, blob_dir) as store:
        rows = store.models(resolve_run(store, run), kind)
    _show(
        rows,
        ["id", "kind", "round", "agent", "base_version", "num_samples", "status", "nbytes"],
        json_,
    )
    return 0


@app.command("rounds")
def cmd_rounds(
    db: DbPath, blob_dir: BlobDir = None, run: RunOpt = None, json_: JsonFlag = False
) -> int:
    """The run's completed rounds."""
    with _store(db, blob_dir) as store:
        run_id = resolve_run(store, run)
        rows = store.rounds(run_id)
        synthesis = store.round_synthesis(run_id)
    cols = ["round", "num_updates", "num_samples", "seconds", "accuracy", "model_id"]
    for r in rows:
        r["accuracy"] = r["metrics"].get("eval_accuracy")
        if synthesis:  # a federated run: what each global model was synthesised from
            r["semi_globals"], r["aggregators"] = synthesis.get(r["round"], (0, 0))
    if synthesis:
        cols[3:3] = ["semi_globals", "aggregators"]
    if any("dp_epsilon" in r["metrics"] for r in rows):  # central DP: privacy spent so far
        for r in rows:
            r["dp_epsilon"] = r["metrics"].get("dp_epsilon")
        cols[-1:-1] = ["dp_epsilon"]
    extra = [
        ("max_dp_epsilon", "max_dp_epsilon"),  # local DP: the largest agent's epsilon
        ("secagg_agents", "secagg_agents"),  # secure aggregation: masked inputs summed
        ("secagg_dropped", "secagg_dropped"),  # ... and agents that dropped in the session
    ]
    for key, col in extra:
        if any(key in r["metrics"] for r in rows):
            for r in rows:
                r[col] = r["metrics"].get(key)
            cols[-1:-1] = [col]
    _show(rows, cols, json_)
    return 0


ModelId = Annotated[
    str | None,
    typer.Argument(
        metavar="MODEL_ID", help="a model id or a prefix of one (default: the latest global)"
    ),
]
Depth = Annotated[int, typer.Option("--depth", help="levels to show")]


@app.command("lineage")
def cmd_lineage(
    db: DbPath,
    model: ModelId = None,
    blob_dir: BlobDir = None,
    run: RunOpt = None,
    depth: Depth = 2,
    json_: JsonFlag = False,
) -> int:
    """Which models (and which previous global model) a model was made from: a
    federation's global model from semi-global models, those from local ones."""
    with _store(db, blob_dir) as store:
        run_id = resolve_run(store, run)
        if model is None:
            cluster = store.models(run_id, "cluster")
            if not cluster:
                raise StoreError("the run has no global model yet")
            model_id = cluster[-1]["id"]
        else:
            matches = [m["id"] for m in store.models(run_id) if m["id"].startswith(model)]
            if len(matches) != 1:
                raise StoreError(f"model id {model!r} matches {len(matches)} models")
            model_id = matches[0]
        out = lineage_tree(store, model_id, depth)
    if json_:
        quiet_logs()
        print_json(out)
    else:
        console().print(tree(out))
    return 0


@app.command("metrics")
def cmd_metrics(
    db: DbPath, blob_dir: BlobDir = None, run: RunOpt = None, json_: JsonFlag = False
) -> int:
    """Every round's metrics and every agent's reported metrics."""
    with _store(db, blob_dir) as store:
        run_id = resolve_run(store, run)
        out = {
            "rounds": [{"round": r["round"], **r["metrics"]} for r in store.rounds(run_id)],
            "agents": [
                {
                    "round": m["round"],
                    "agent": m["agent"],
                    "num_samples": m["num_samples"],
                    **m["metrics"],
                }
                for m in store.models(run_id, "local")
                if m["status"] != "initial"
            ],
        }
    if json_:
        quiet_logs()
        print_json(out)
        return 0
    for title in ("rounds", "agents"):
        rows = out[title]
        keys: list[str] = []
        for r in rows:
            keys += [k for k in r if k not in keys]
        print("per round:" if title == "rounds" else "per agent:")
        if rows:
            console().print(table(rows, keys))
        else:
            print("(none)")
        print()
    return 0


Metric = Annotated[
    list[str] | None,
    typer.Option(
        "--metric", help="a round metric, repeatable (default eval_accuracy and mean_train_loss)"
    ),
]
Compare = Annotated[
    list[str] | None,
    typer.Option("--compare", metavar="RUN", help="another run on the same axes, repeatable"),
]
Out = Annotated[str, typer.Option("--out", help="the PNG to write")]


@app.command("plot")
def cmd_plot(
    db: DbPath,
    blob_dir: BlobDir = None,
    run: RunOpt = None,
    metric: Metric = None,
    compare: Compare = None,
    out: Out = "fedstack-rounds.png",
) -> int:
    """Draw round metrics and round times of one or more runs to a PNG."""
    with _store(db, blob_dir) as store:
        runs = [resolve_run(store, run)] + [resolve_run(store, r) for r in compare or []]
        path = plot_rounds(store, runs, metric or ["eval_accuracy", "mean_train_loss"], out)
    print(f"wrote {path}")
    return 0


ExportModel = Annotated[
    str | None,
    typer.Argument(
        metavar="MODEL_ID",
        help="a model id or a prefix of one (any run); not with --to",
        show_default=False,
    ),
]
ExportTo = Annotated[
    Literal["mlflow", "tensorboard"] | None,
    typer.Option("--to", help="export the run's rounds to this experiment tracker"),
]
ExportUri = Annotated[
    str | None,
    typer.Option(
        "--uri",
        help="--to mlflow: a tracking URI or directory (default $MLFLOW_TRACKING_URI, else "
        "./mlruns); --to tensorboard: the log directory (default ./runs)",
    ),
]
ExportFormat = Annotated[
    Literal["safetensors", "npz", "pt"] | None,
    typer.Option(
        "--format",
        help="safetensors, npz, or pt (a PyTorch state dict); default: from --out's suffix",
    ),
]
ExportOut = Annotated[
    Path | None, typer.Option("--out", help="the file to write (with MODEL_ID)", show_default=False)
]


def find_model(store: Store, model: str, run_id: str | None = None) -> dict[str, Any]:
    """The stored model whose id is ``model`` or starts with it (in run ``run_id``, or any).

    Raises:
        StoreError: no model or several match.
    """
    if not model or not all(c in "0123456789abcdef" for c in model):
        raise StoreError(f"model id {safe_text(model[:64])!r} is not a hex id or prefix")
    exact = store.model(model)
    if exact is not None and (run_id is None or exact["run_id"] == run_id):
        return exact
    matches = [m for m in store.models(run_id) if m["id"].startswith(model)]
    if len(matches) != 1:
        raise StoreError(
            f"model id {model!r} matches {len(matches)} models"
            + ("; see `fedstack db models`" if not matches else "; give more of it")
        )
    return matches[0]


@app.command("export")
def cmd_export(
    db: DbPath,
    model: ExportModel = None,
    out: ExportOut = None,
    blob_dir: BlobDir = None,
    run: RunOpt = None,
    format_: ExportFormat = None,
    to: ExportTo = None,
    uri: ExportUri = None,
    json_: JsonFlag = False,
) -> int:
    """Export a stored model, or a run to an experiment tracker.

    MODEL_ID --out FILE [--format F]: write a stored model (a global, semi-global or local
    model, any round) in a native format: safetensors (the stored bytes), npz, or a PyTorch
    state dict (pt, loads with torch.load(weights_only=True) and module.load_state_dict).
    --to mlflow|tensorboard --run RUN [--uri URI]: the rounds of the run the tracker does
    not hold yet (extras mlflow, tensorboard).
    """
    from fedstack.errors import ConfigError

    if to is not None:
        if model is not None:
            raise ConfigError(f"--to exports a run (--run RUN), not a model: drop {model!r}")
        if out is not None or format_ is not None:
            raise ConfigError("--to exports a run to a tracker (--uri), not to --out/--format")
        return export_run_to(db, blob_dir, run, to, uri, json_)
    if model is None or out is None:
        raise ConfigError(
            "say what to export: MODEL_ID --out FILE (a stored model), or a run with "
            "--to mlflow or --to tensorboard --run RUN"
        )
    if json_:
        quiet_logs()
    fmt: Format = format_ or _format_of(out)
    with _store(db, blob_dir) as store:
        run_id = resolve_run(store, run) if run is not None else None
        m = find_model(store, model, run_id)
        if fmt == "safetensors":  # the stored tensor file itself, byte for byte
            store.export_model(m["id"], out)
        else:
            write_model_file(store.load_weights(m["id"]), out, fmt)
    info = {
        "model_id": m["id"],
        "run": m["run_id"],
        "kind": m["kind"],
        "round": m["round"],
        "metrics": m["metrics"],
        "format": fmt,
        "out": str(out),
        "bytes": out.stat().st_size,
    }
    if json_:
        print_json(info)
    else:
        what = "global model" if m["kind"] == "cluster" else f"{m['kind']} model"
        print(
            f"wrote {what} {m['id'][:12]} (run {m['run_id'][:8]}, round {m['round']}) "
            f"to {safe_text(out)} ({fmt}, {info['bytes']:,} bytes)"
        )
    return 0


def _format_of(out: Path) -> Format:
    suffix = out.suffix.lower()
    for fmt, suffixes in (("safetensors", (".safetensors", ".st")), ("npz", (".npz",))):
        if suffix in suffixes:
            return fmt  # type: ignore[return-value]
    if suffix in (".pt", ".pth"):
        return "pt"
    raise StoreError(
        f"cannot tell the format from {safe_text(out.name)!r}: pass --format "
        "safetensors|npz|pt or name the file .safetensors, .npz or .pt"
    )


def export_run_to(
    db: str,
    blob_dir: str | None,
    run: str | None,
    to: Literal["mlflow", "tensorboard"],
    uri: str | None,
    json_: bool,
) -> int:
    """``fedstack db export --to TO``: the run's rounds a tracker lacks, written to it."""
    import os

    from fedstack.trackers import RunMeta, export_run

    if json_:
        quiet_logs()
    target = uri or (
        (os.environ.get("MLFLOW_TRACKING_URI") or "mlruns") if to == "mlflow" else "runs"
    )
    with _store(db, blob_dir) as store:
        run_id = resolve_run(store, run)
        row = next(r for r in store.list_runs() if r["id"] == run_id)
        result = export_run(store, RunMeta.from_row(row), f"{to}:{target}")
    if json_:
        print_json(
            {
                "run": run_id,
                "to": to,
                "location": result.location,
                "rounds": result.rounds,
                "values_added": result.values_added,
                "last_round": result.last,
            }
        )
    elif result.rounds or result.values_added:
        added = f", {result.values_added} value(s) added to rounds held before"
        print(
            safe_text(
                f"exported {result.rounds} round(s) of run {row['name']} ({run_id[:8]})"
                f"{added if result.values_added else ''} to {to}: {result.location}"
            )
        )
    elif result.last == 0:
        print(safe_text(f"run {row['name']} ({run_id[:8]}) has no committed round yet"))
    else:
        print(safe_text(f"{to} already holds run {row['name']} up to round {result.last}"))
    return 0


@app.command("upgrade")
def cmd_upgrade(db: DbPath, blob_dir: BlobDir = None, json_: JsonFlag = False) -> int:
    """Bring the store's schema up to date (migrations), or create a new store at DB.

    Another application's SQLite file is refused, not converted.
    """
    if json_:
        quiet_logs()
    url, path = resolve_url(db)
    created = path is not None and not path.exists()
    store = Store(db, blob_dir)
    try:
        after = migrations.current(store.engine)
    except SQLAlchemyError as exc:
        raise StoreError(f"cannot read the schema revision ({type(exc).__name__})") from None
    finally:
        store.close()
    before = store.schema_from
    shown = str(path) if path is not None else redacted(url)
    if json_:
        print_json(
            {
                "db": shown,
                "created": created,
                "from": before,
                "to": after,
                "changed": before != after,
            }
        )
    elif created or before is None:
        print(f"created a fedstack store at {shown} (schema {after})")
    elif before != after:
        print(f"upgraded {shown} from schema {before} to {after}")
    else:
        print(f"{shown} is up to date (schema {after})")
    return 0


def plot_rounds(
    store: Store, run_ids: Sequence[str], metrics: Sequence[str], out: str | Path
) -> Path:
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
    shown = [
        m
        for m in metrics
        if any(m in (r["metrics"] or {}) for rows in series.values() for r in rows)
    ]
    if not shown:
        raise StoreError(
            f"no run has the metrics {', '.join(metrics)}; see `fedstack db "
            "metrics` for what the rounds hold"
        )
    panels = [*shown, "seconds"]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, metric in zip(axes[0], panels, strict=True):
        for rid, rows in series.items():
            pts = [
                (
                    r["round"],
                    r["seconds"] if metric == "seconds" else (r["metrics"] or {}).get(metric),
                )
                for r in rows
            ]
            pts = [(x, y) for x, y in pts if isinstance(y, int | float)]
            if pts:
                ax.plot(
                    [x for x, _ in pts],
                    [y for _, y in pts],
                    marker=".",
                    label=names.get(rid, rid[:8]),
                )
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
