"""``fedstack model``: the operator's base model of a run.

``register FILE`` records a model file (safetensors, npz, or a PyTorch state dict) in the
store as the run's model: its tensor names, shapes and dtypes become the federation's
model instead of the first agent's, and its weights (or zeros of them, ``--init zeros``)
are global model version 0. Register before starting the aggregator with the same
``--db`` and ``--run-name`` (or while an aggregator of that run waits for its first
model): agents then receive this model, and one whose own model has other names, shapes
or dtypes is refused with what differs (error code ``model-mismatch``). A run that has a
model already is refused: its structure is fixed for the run.

``show`` prints a run's model structure and where it came from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import typer

from fedstack.cli.db import resolve_run
from fedstack.cli.options import BlobDir, DbPath, JsonFlag, RunOpt
from fedstack.cli.output import console, print_json, quiet_logs, table
from fedstack.errors import ConfigError
from fedstack.names import safe_text
from fedstack.store import Store
from fedstack.store.modelfiles import Format, read_model_file
from fedstack.types import Weights

__all__ = ["app", "register_model_file"]

app = typer.Typer(
    help="register the federation's base model",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
)

ModelFile = Annotated[
    Path,
    typer.Argument(
        metavar="FILE", help="the model: .safetensors, .npz, or a PyTorch state dict (.pt)"
    ),
]
FormatOpt = Annotated[
    Literal["safetensors", "npz", "pt"] | None,
    typer.Option("--format", help="the file's format (default: from its name or content)"),
]
RunName = Annotated[
    str,
    typer.Option("--run-name", help="the run the model is for (the aggregator's --run-name)"),
]
Init = Annotated[
    Literal["weights", "zeros"],
    typer.Option("--init", help="start from the model's weights, or from zeros of its structure"),
]


def register_model_file(
    store: Store,
    path: str | Path,
    *,
    run_name: str = "default",
    fmt: Format | None = None,
    init_weights: bool = True,
    loaded: tuple[Weights, Format] | None = None,
) -> dict[str, Any]:
    """Read model file ``path`` (or take ``loaded``, what :func:`read_model_file` read of
    it) and register it as run ``run_name``'s base model (see
    :meth:`~fedstack.store.Store.register_model`). Returns a summary: run, model id,
    format, tensors, parameters and the structure.

    Raises:
        ConfigError: a bad run name or model file.
        StoreConflict: the run has a model already.
    """
    _check_run_name(run_name)
    weights, fmt = loaded if loaded is not None else read_model_file(path, fmt)
    run, model_id = store.register_model(
        run_name,
        weights,
        init_weights=init_weights,
        detail={"file": Path(path).name[:200], "format": fmt},
    )
    structure = [
        {"name": n, "dtype": str(np.asarray(a).dtype), "shape": list(np.shape(a))}
        for n, a in weights.items()
    ]
    return {
        "run": run.id,
        "run_name": run.name,
        "model_id": model_id,
        "format": fmt,
        "init": "weights" if init_weights else "zeros",
        "tensors": len(structure),
        "parameters": int(sum(int(np.asarray(a).size) for a in weights.values())),
        "structure": structure,
    }


def _check_run_name(run_name: str) -> None:
    if not 1 <= len(run_name) <= 128 or not run_name.isprintable():
        raise ConfigError("--run-name must have 1-128 printable characters")


@app.command("register")
def cmd_register(
    file: ModelFile,
    db: DbPath,
    blob_dir: BlobDir = None,
    run_name: RunName = "default",
    format_: FormatOpt = None,
    init: Init = "weights",
    json_: JsonFlag = False,
) -> int:
    """Fix the federation's model (names, shapes, dtypes; global model 0) from FILE,
    instead of letting the first agent's model decide."""
    if json_:
        quiet_logs()
    _check_run_name(run_name)
    loaded = read_model_file(file, format_)  # a bad file leaves no store behind
    store = Store(db, blob_dir)  # creates or upgrades the store, as the aggregator does
    try:
        out = register_model_file(
            store,
            file,
            run_name=run_name,
            fmt=format_,
            init_weights=init == "weights",
            loaded=loaded,
        )
    finally:
        store.close()
    if json_:
        print_json(out)
        return 0
    print(
        f"registered {safe_text(file)} ({out['format']}, {out['tensors']} tensors, "
        f"{out['parameters']:,} parameters) as the model of run "
        f"{safe_text(out['run_name'])} ({out['run'][:8]}); global model 0 = "
        f"{out['model_id'][:12]} ({out['init']})"
    )
    console().print(table(out["structure"], ["name", "dtype", "shape"]))
    return 0


@app.command("show")
def cmd_show(
    db: DbPath, blob_dir: BlobDir = None, run: RunOpt = None, json_: JsonFlag = False
) -> int:
    """A run's model structure (names, dtypes, shapes) and what fixed it."""
    if json_:
        quiet_logs()
    store = Store.open_readonly(db, blob_dir)
    try:
        spec = store.model_spec(resolve_run(store, run))
    finally:
        store.close()
    if json_:
        print_json(spec)
        return 0
    source = {
        "registered": f"registered by the operator ({spec['file']})",
        "agent": f"the first agent's model ({spec['agent']})",
    }.get(spec["source"], "none yet")
    print(
        f"run {safe_text(spec['run_name'])} ({spec['run'][:8]}), global version "
        f"{spec['version']}: model {safe_text(source)}"
    )
    if spec["structure"]:
        console().print(table(spec["structure"], ["name", "dtype", "shape"]))
    return 0
