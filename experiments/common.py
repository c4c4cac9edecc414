"""An in-process federation loop for experiments, driving the real strategy objects.

:func:`run_federation` does, round by round, what the aggregator and its agents do over the
network, minus the network: it samples agents, simulates stragglers, calls a local-training
callback per agent, wraps each result in a :class:`fedstack.strategies.Update`, and
aggregates with ``strategy.begin(...)`` / ``acc.add(...)`` / ``acc.result()``, carrying
``Result.state`` and ``Result.extra`` into the next round exactly as
``fedstack.aggregator.service`` does (including ``strategy.check`` before ``add``).

Everything is seeded: the round-``r`` selection, straggler set and straggler work come from
``default_rng([seed, r])``, each agent's local randomness from
``default_rng([seed, r, agent])``, so two strategies run with the same seed see the same
agents, stragglers and minibatch orders.

Also here: a plain-text progress line on stderr, a process pool for independent runs,
result tables, JSON output and matplotlib plots (:func:`save_plot`, :func:`save_heatmap`).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TextIO

import numpy as np

from fedstack.errors import InvalidUpdate
from fedstack.strategies import Strategy, Update, create
from fedstack.types import Metrics, Weights

RESULTS_DIR = Path(__file__).resolve().parent / "results"

StragglerMode = Literal["drop", "partial"]


# ------------------------------------------------------------------------------- the loop
@dataclass(frozen=True)
class Task:
    """What one agent is asked to do in one round.

    Attributes:
        round: Round number, from 1.
        agent: Agent index, ``0 <= agent < num_agents``.
        weights: The global model (do not modify in place).
        epochs: Local epochs for this round (fewer than configured for a straggler that
            sends partial work).
        straggler: True when this agent is a straggler sending partial work.
        config: ``strategy.agent_config()`` (e.g. ``{"fedprox_mu": 1.0}``) plus
            ``{"epochs": epochs}``: what a real agent's ``Trainer.fit`` receives.
        extra: The extra arrays the strategy sent with the global model.
        rng: This agent's generator for this round (``default_rng([seed, round, agent])``).
    """

    round: int
    agent: int
    weights: Weights
    epochs: int
    straggler: bool
    config: Mapping[str, Any]
    extra: Weights
    rng: np.random.Generator


@dataclass(frozen=True)
class LocalResult:
    """What a local-training callback returns (``Trainer.fit``'s triple plus extras)."""

    weights: Weights
    num_samples: int
    metrics: Metrics = field(default_factory=dict)
    extra: Weights = field(default_factory=dict)


LocalTrain = Callable[[Task], LocalResult]
Evaluate = Callable[[Weights], Metrics]


@dataclass(frozen=True)
class FederationConfig:
    """The schedule of a simulated federation.

    Attributes:
        rounds: Number of rounds.
        num_agents: Number of agents.
        agents_per_round: Agents selected per round, uniformly without replacement
            (``None`` or ``>= num_agents``: every agent every round).
        epochs: Local epochs of a full (non-straggler) round of work.
        stragglers: Fraction of the selected agents that are stragglers; the
            ``round(K * (1 - stragglers))`` *active* ones are drawn from the selected ones.
        straggler_mode: ``"drop"``: stragglers send nothing (FedAvg in the FedProx paper);
            ``"partial"``: they send the result of ``uniform{1, ..., epochs-1}`` local epochs.
        seed: Seed of selection, stragglers, local randomness and the strategy's generator.
        eval_every: Evaluate the global model every this many rounds (and after round 0
            and the last round).
    """

    rounds: int
    num_agents: int
    agents_per_round: int | None = None
    epochs: int = 1
    stragglers: float = 0.0
    straggler_mode: StragglerMode = "drop"
    seed: int = 0
    eval_every: int = 1

    def __post_init__(self) -> None:
        if self.rounds < 1 or self.num_agents < 1 or self.epochs < 1 or self.eval_every < 1:
            raise ValueError(f"rounds, num_agents, epochs, eval_every must be >= 1: {self}")
        if not 0.0 <= self.stragglers <= 1.0:
            raise ValueError(f"stragglers must be in [0, 1], got {self.stragglers}")
        if self.straggler_mode not in ("drop", "partial"):
            raise ValueError(f"straggler_mode must be 'drop' or 'partial': {self.straggler_mode}")

    @property
    def cohort(self) -> int:
        k = self.agents_per_round
        return self.num_agents if k is None else max(1, min(k, self.num_agents))


@dataclass(frozen=True)
class RoundPlan:
    """Who trains in a round, and how much."""

    selected: list[int]
    active: list[int]
    epochs: dict[int, int]
    """Local epochs per agent that reports this round (stragglers in partial mode included)."""


def plan_round(config: FederationConfig, round: int) -> RoundPlan:
    """The seeded selection, active set and local work of round ``round``.

    The draws do not depend on ``straggler_mode``, so a "drop" run and a "partial" run
    with the same seed see the same selected agents and the same stragglers.
    """
    rng = np.random.default_rng([config.seed, round])
    k = config.cohort
    selected = [int(a) for a in rng.choice(config.num_agents, k, replace=False)]
    num_active = round_half_even(k * (1.0 - config.stragglers))
    active = [int(a) for a in rng.choice(selected, num_active, replace=False)]
    partial = rng.integers(1, max(2, config.epochs), size=k)  # uniform{1, ..., E-1}
    epochs = {a: config.epochs for a in active}
    if config.straggler_mode == "partial":
        for a, e in zip(selected, partial, strict=True):
            epochs.setdefault(a, min(int(e), config.epochs))
    return RoundPlan(selected, active, epochs)


def round_half_even(x: float) -> int:
    """Python's ``round`` (the FedProx code's ``round(K * (1 - drop_percent))``)."""
    return int(round(x + 0.0))


@dataclass
class History:
    """What a simulated federation produced.

    Attributes:
        label: The run's name.
        evals: One dict per evaluation: ``{"round": r, **evaluate(weights)}`` (round 0 is
            the initial model).
        rounds: One dict per round: agents selected/reporting/rejected, aggregation
            metrics, seconds spent in local training and in aggregation.
        weights: The final global model.
        seconds: Wall time of the whole run.
    """

    label: str
    evals: list[dict[str, Any]] = field(default_factory=list)
    rounds: list[dict[str, Any]] = field(default_factory=list)
    weights: Weights = field(default_factory=dict)
    seconds: float = 0.0

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """``(rounds, values)`` of an evaluation metric."""
        rows = [e for e in self.evals if key in e]
        return [int(e["round"]) for e in rows], [float(e[key]) for e in rows]

    def final(self, key: str) -> float:
        """The last evaluated value of ``key``."""
        return self.series(key)[1][-1]

    def at(self, key: str, round: int) -> float:
        """The value of ``key`` at the last evaluation no later than ``round``."""
        xs, ys = self.series(key)
        values = [y for x, y in zip(xs, ys, strict=True) if x <= round]
        return values[-1] if values else math.nan

    def to_json(self, with_rounds: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {"label": self.label, "seconds": self.seconds, "evals": self.evals}
        if with_rounds:
            out["rounds"] = self.rounds
        return out


def run_federation(
    strategy: Strategy | str,
    initial_weights: Weights,
    train: LocalTrain,
    evaluate: Evaluate,
    config: FederationConfig,
    *,
    strategy_params: Mapping[str, Any] | None = None,
    label: str = "",
    progress: Progress | bool = True,
) -> History:
    """Run a synchronous federation in process with a real strategy object.

    Args:
        strategy: A strategy, or a registered name built with
            ``fedstack.strategies.create(name, **strategy_params)``.
        initial_weights: The first global model.
        train: Local training: called once per reporting agent per round with a
            :class:`Task`; returns a :class:`LocalResult`. An attack is a ``train`` that
            returns something else than honest work.
        evaluate: Central evaluation of a global model, e.g. ``{"test_accuracy": ...}``.
        config: The schedule (rounds, cohort, stragglers, seed, ...).
        strategy_params: Parameters when ``strategy`` is a name.
        label: Name of the run (progress line and :class:`History`).
        progress: A :class:`Progress`, or True for a fresh one on stderr, False for none.

    Returns:
        The :class:`History` (evaluations, per-round records, final weights).

    Raises:
        ValueError: For an asynchronous strategy (``trigger`` set): this loop is
            synchronous.
    """
    if isinstance(strategy, str):
        strategy = create(strategy, **dict(strategy_params or {}))
    if strategy.trigger is not None:
        raise ValueError(
            f"strategy {strategy.name!r} aggregates every {strategy.trigger} "
            "update(s); this synchronous loop does not simulate that"
        )
    bar = (
        progress
        if isinstance(progress, Progress)
        else Progress(label, config.rounds, enabled=bool(progress))
    )
    history = History(label)
    started = time.perf_counter()
    weights = initial_weights
    state: Mapping[str, Any] = strategy.init_state(weights)
    extra: Weights = strategy.initial_extra(weights)
    agent_config = dict(strategy.agent_config())
    strategy_rng = np.random.default_rng([config.seed, 2**32 - 1])

    history.evals.append({"round": 0, **evaluate(weights)})
    for r in range(1, config.rounds + 1):
        plan = plan_round(config, r)
        acc = strategy.begin(weights, state, round=r, rng=strategy_rng)
        rejected: list[str] = []
        t0 = time.perf_counter()
        train_seconds = 0.0
        for agent in plan.selected:
            if agent not in plan.epochs:
                continue  # a dropped straggler
            epochs = plan.epochs[agent]
            task = Task(
                r,
                agent,
                weights,
                epochs,
                agent not in plan.active,
                {**agent_config, "epochs": epochs},
                extra,
                np.random.default_rng([config.seed, r, agent]),
            )
            t1 = time.perf_counter()
            local = train(task)
            train_seconds += time.perf_counter() - t1
            update = Update(
                f"agent-{agent}",
                local.weights,
                int(local.num_samples),
                0,
                dict(local.metrics),
                "",
                dict(local.extra),
            )
            try:
                strategy.check(update, weights)
                acc.add(update)
            except InvalidUpdate as exc:
                rejected.append(f"{update.agent_id}: {exc}")
        aggregate_seconds = time.perf_counter() - t0 - train_seconds
        record: dict[str, Any] = {
            "round": r,
            "selected": plan.selected,
            "active": plan.active,
            "reported": acc.count,
            "rejected": rejected,
            "train_seconds": train_seconds,
        }
        if acc.count:
            t2 = time.perf_counter()
            result = acc.result()
            aggregate_seconds += time.perf_counter() - t2
            weights, state, extra = result.weights, result.state, result.extra
            record["metrics"] = dict(result.metrics)
        record["aggregate_seconds"] = aggregate_seconds
        history.rounds.append(record)
        if r % config.eval_every == 0 or r == config.rounds:
            history.evals.append({"round": r, **evaluate(weights)})
        bar.update(r, _summary(history.evals[-1]))
    bar.close()
    history.weights = weights
    history.seconds = time.perf_counter() - started
    return history


def _summary(metrics: Mapping[str, Any]) -> str:
    parts = [
        f"{k}={v:.4g}"
        for k, v in metrics.items()
        if k != "round" and isinstance(v, float | int) and not isinstance(v, bool)
    ]
    return " ".join(parts[:3])


# ----------------------------------------------------------------------------- progress
class Progress:
    """A plain-text progress line on stderr: ``label round 12/100 (3.1 s) loss=...``.

    On a terminal the line is rewritten in place; otherwise (a log file, a pool worker) a
    line is printed about every 10 % of the rounds.
    """

    def __init__(
        self, label: str, total: int, *, enabled: bool = True, stream: TextIO | None = None
    ) -> None:
        self.label = label
        self.total = total
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.step = max(1, total // 10)
        self.started = time.perf_counter()

    def update(self, done: int, note: str = "") -> None:
        if not self.enabled:
            return
        if not self.tty and done % self.step and done != self.total:
            return
        text = (
            f"{self.label} round {done}/{self.total} "
            f"({time.perf_counter() - self.started:.1f} s) {note}"
        ).rstrip()
        if self.tty:
            self.stream.write("\r\x1b[K" + text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()


def log(message: str) -> None:
    """A line on stderr (progress and status; results go to stdout)."""
    print(message, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------- a pool
@dataclass(frozen=True)
class Job:
    """One independent run for :func:`run_jobs`: ``fn(**kwargs)`` (both picklable)."""

    key: tuple[Any, ...]
    fn: Callable[..., Any]
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    cost: float = 1.0
    """Relative cost estimate: expensive jobs are started first."""


def run_jobs(jobs: Sequence[Job], workers: int = 1) -> dict[tuple[Any, ...], Any]:
    """Run ``jobs`` (in a process pool if ``workers > 1``); results keyed by ``job.key``.

    Prints ``[done i/n] key (s)`` on stderr as jobs finish.
    """
    results: dict[tuple[Any, ...], Any] = {}
    order = sorted(jobs, key=lambda j: -j.cost)
    started = time.perf_counter()

    def done(i: int, job: Job) -> None:
        log(
            f"[done {i}/{len(jobs)}] {' '.join(map(str, job.key))} "
            f"({time.perf_counter() - started:.0f} s elapsed)"
        )

    if workers <= 1:
        for i, job in enumerate(order, 1):
            results[job.key] = job.fn(**job.kwargs)
            done(i, job)
        return results
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    with ProcessPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(job.fn, **job.kwargs): job for job in order}
        for i, future in enumerate(as_completed(futures), 1):
            job = futures[future]
            results[job.key] = future.result()
            done(i, job)
    return results


def default_workers() -> int:
    """The CPUs this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


# ------------------------------------------------------------------------------- output
def mean_sd(values: Sequence[float], fmt: str = ".3f") -> str:
    """``"0.912±0.013"`` (sample sd; just the value for one number)."""
    arr = np.asarray(values, dtype=float)
    if arr.size == 1:
        return format(float(arr[0]), fmt)
    return f"{format(float(arr.mean()), fmt)}±{format(float(arr.std(ddof=1)), fmt)}"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str = "") -> str:
    """A Markdown (pipe) table with aligned columns; floats as 4 significant digits."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "nan" if math.isnan(v) else f"{v:.4g}"
        return str(v)

    text = [[cell(v) for v in row] for row in rows]
    widths = [
        max(len(h), *(len(r[i]) for r in text)) if text else len(h) for i, h in enumerate(headers)
    ]
    numeric = [all(_looks_numeric(r[i]) for r in text) and bool(text) for i in range(len(headers))]

    def line(values: Sequence[str]) -> str:
        return (
            "| "
            + " | ".join(
                v.rjust(w) if num else v.ljust(w)
                for v, w, num in zip(values, widths, numeric, strict=True)
            )
            + " |"
        )

    rule = (
        "| "
        + " | ".join(
            ("-" * (w - 1) + ":") if num else "-" * w
            for w, num in zip(widths, numeric, strict=True)
        )
        + " |"
    )
    out = [line(headers), rule, *(line(r) for r in text)]
    return (f"{title}\n\n" if title else "") + "\n".join(out)


def _looks_numeric(text: str) -> bool:
    head = text.split("±")[0].split(" ")[0].rstrip("%")
    try:
        float(head)
    except ValueError:
        return False
    return True


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else str(value)
    return value


def save_json(path: Path | str, data: Any) -> Path:
    """Write ``data`` (numpy values converted, NaN as null) as indented JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(data), indent=1) + "\n")
    return path


@dataclass(frozen=True)
class Curve:
    """One line of a plot: ``y`` against ``x``, optionally a band ``[low, high]``."""

    label: str
    x: Sequence[float]
    y: Sequence[float]
    low: Sequence[float] | None = None
    high: Sequence[float] | None = None
    style: str = "-"
    color: str | None = None


@dataclass(frozen=True)
class Panel:
    """One subplot."""

    title: str
    curves: Sequence[Curve]
    xlabel: str = "round"
    ylabel: str = ""
    logy: bool = False
    ylim: tuple[float, float] | None = None


def save_plot(
    path: Path | str,
    panels: Sequence[Panel],
    *,
    ncols: int = 3,
    title: str = "",
    panel_size: tuple[float, float] = (4.2, 3.0),
) -> Path:
    """Draw ``panels`` in a grid (matplotlib, Agg) and save them as ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ncols = max(1, min(ncols, len(panels)))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(
        nrows, ncols, squeeze=False, figsize=(panel_size[0] * ncols, panel_size[1] * nrows)
    )
    for ax, panel in zip(axes.flat, panels, strict=False):
        for curve in panel.curves:
            (line,) = ax.plot(
                curve.x, curve.y, curve.style, label=curve.label, linewidth=1.2, color=curve.color
            )
            if curve.low is not None and curve.high is not None:
                ax.fill_between(
                    curve.x, curve.low, curve.high, alpha=0.15, color=line.get_color(), linewidth=0
                )
        ax.set_title(panel.title, fontsize=10)
        ax.set_xlabel(panel.xlabel)
        ax.set_ylabel(panel.ylabel)
        if panel.logy:
            ax.set_yscale("log")
        if panel.ylim is not None:
            ax.set_ylim(*panel.ylim)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def save_heatmap(
    path: Path | str,
    matrices: Sequence[tuple[str, np.ndarray[Any, Any]]],
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    *,
    title: str = "",
    vmin: float = 0.0,
    vmax: float = 1.0,
) -> Path:
    """Annotated heatmaps side by side (one per ``(subtitle, matrix)``), saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = len(matrices)
    fig, axes = plt.subplots(
        1, n, squeeze=False, figsize=(1.1 * len(col_labels) * n + 1.5, 0.6 * len(row_labels) + 1.8)
    )
    image = None
    for ax, (subtitle, matrix) in zip(axes.flat, matrices, strict=True):
        image = ax.imshow(matrix, vmin=vmin, vmax=vmax, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(col_labels)), col_labels, rotation=30, ha="right")
        ax.set_yticks(range(len(row_labels)), row_labels)
        for i in range(matrix.shape[0]):
            for j in range(matrix.shape[1]):
                ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=8)
        ax.set_title(subtitle, fontsize=10)
    if image is not None:
        fig.colorbar(image, ax=list(axes.flat), shrink=0.8)
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def pass_fail(ok: bool) -> str:
    return "PASS" if ok else "FAIL"
