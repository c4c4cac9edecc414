"""``fedstack sim``: N virtual agents on the real aggregator and agent code.

Example (10,000 agents, 100 sampled per round)::

    fedstack sim --agents 10000 --per-round 100 --rounds 10 \\
        --trainer fedstack.trainers.synthetic:SyntheticTrainer --trainer-arg max_samples=200
"""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any, Literal

import typer

from fedstack.aggregator.config import parse_pairs
from fedstack.cli.options import JsonFlag, TrainerArgs
from fedstack.cli.output import quiet_logs
from fedstack.errors import FedstackError
from fedstack.names import safe_text

__all__ = ["cmd_sim"]

DEFAULT_TRAINER = "fedstack.trainers.digits:DigitsLinearTrainer"
DEFAULT_EVALUATOR = "fedstack.trainers.digits:evaluate_global"


def cmd_sim(
    agents: Annotated[int, typer.Option("--agents", help="virtual agents N")] = 10,
    per_round: Annotated[
        int | None, typer.Option("--per-round", help="agents sampled per round (default: all)")
    ] = None,
    fraction: Annotated[
        float | None, typer.Option("--fraction", help="fraction of the agents sampled per round")
    ] = None,
    rounds: Annotated[int, typer.Option("--rounds")] = 10,
    trainer: Annotated[
        str, typer.Option("--trainer", help="module:Callable built with index=, num_agents=")
    ] = DEFAULT_TRAINER,
    trainer_arg: TrainerArgs = None,
    evaluator: Annotated[
        str | None,
        typer.Option(
            "--evaluator",
            help="module:function(weights) -> metrics, run on every global model "
            f"(default with the default trainer: {DEFAULT_EVALUATOR})",
        ),
    ] = None,
    strategy: Annotated[str, typer.Option("--strategy")] = "fedavg",
    aggregator_setting: Annotated[
        list[str] | None,
        typer.Option(
            "--aggregator-setting",
            metavar="KEY=VALUE",
            help="another aggregator setting (a key of the aggregator's config file, JSON "
            "value), repeatable: e.g. secagg=true, dp=central, dp_noise_multiplier=1.0",
        ),
    ] = None,
    strategy_param: Annotated[
        list[str] | None,
        typer.Option(
            "--strategy-param",
            metavar="KEY=VALUE",
            help="a strategy parameter (JSON value), repeatable",
        ),
    ] = None,
    federation: Annotated[
        list[str] | None,
        typer.Option(
            "--federation",
            metavar="KEY=VALUE",
            help="a setting sent to every agent (e.g. fedprox_mu=1), repeatable",
        ),
    ] = None,
    db: Annotated[str, typer.Option("--db", help="the store")] = "fedstack-sim.db",
    run_name: Annotated[str | None, typer.Option("--run-name")] = None,
    transport: Annotated[Literal["inproc", "loopback"], typer.Option("--transport")] = "inproc",
    backend: Annotated[
        Literal["auto", "local", "inline", "ray"],
        typer.Option(
            "--backend",
            help="where agents train: auto (inline until fits are slow enough for "
            "worker processes to pay), local (worker processes), inline, ray",
        ),
    ] = "auto",
    workers: Annotated[
        int | None,
        typer.Option(
            "--workers", help="training workers (default: one per CPU; 0 = in this process)"
        ),
    ] = None,
    ray_address: Annotated[
        str | None, typer.Option("--ray-address", help="Ray cluster to join (default: local)")
    ] = None,
    cpus_per_agent: Annotated[
        float | None, typer.Option("--cpus-per-agent", help="Ray: CPUs per fit")
    ] = None,
    gpus_per_agent: Annotated[
        float | None, typer.Option("--gpus-per-agent", help="Ray: GPU fraction per fit")
    ] = None,
    delivery: Annotated[Literal["push", "poll"], typer.Option("--delivery")] = "push",
    seed: Annotated[int, typer.Option("--seed")] = 0,
    durable: Annotated[bool, typer.Option("--durable", help="fsync every store write")] = False,
    keep_freed_memory: Annotated[
        bool,
        typer.Option(
            "--keep-freed-memory/--no-keep-freed-memory",
            help="let malloc keep freed big buffers for reuse instead of returning each to the "
            "kernel (much less system time with big models)",
        ),
    ] = True,
    round_timeout: Annotated[float, typer.Option("--round-timeout")] = 600.0,
    json_: JsonFlag = False,
) -> int:
    """Simulate N virtual agents on the real aggregator and agents."""
    from fedstack.buffers import keep_freed_memory as keep
    from fedstack.sim import simulate

    if per_round is not None and fraction is not None:
        raise typer.BadParameter("--per-round and --fraction exclude each other")
    if keep_freed_memory:
        keep()
    if json_:
        quiet_logs()
    if evaluator is None and trainer == DEFAULT_TRAINER:
        evaluator = DEFAULT_EVALUATOR
    options: dict[str, Any] = {}
    if backend == "ray":
        options = {
            k: v
            for k, v in (
                ("address", ray_address),
                ("num_cpus", cpus_per_agent),
                ("num_gpus", gpus_per_agent),
            )
            if v is not None
        }
    elif ray_address or cpus_per_agent or gpus_per_agent:
        raise FedstackError("--ray-address/--cpus-per-agent/--gpus-per-agent need --backend ray")
    say = (lambda *a: print(*a, file=sys.stderr)) if json_ else print
    k = per_round or (f"{fraction:g} x" if fraction else "all")
    say(
        f"fedstack sim: {agents} agents ({k} per round) x {rounds} rounds, "
        f"{trainer}, {strategy}, {transport} transport, {backend} backend"
    )
    res = simulate(
        trainer,
        parse_pairs(trainer_arg or [], "--trainer-arg"),
        num_agents=agents,
        rounds=rounds,
        per_round=per_round,
        fraction=fraction,
        strategy=strategy,
        strategy_params=parse_pairs(strategy_param or [], "--strategy-param"),
        aggregator_options=parse_pairs(aggregator_setting or [], "--aggregator-setting"),
        federation=parse_pairs(federation or [], "--federation"),
        evaluator=evaluator,
        db=db,
        run_name=run_name,
        transport=transport,
        backend=backend,
        workers=workers,
        backend_options=options,
        seed=seed,
        delivery=delivery,
        durable=durable,
        round_timeout=round_timeout,
        progress=sys.stderr.isatty() or not json_,
    )
    say(f"{'round':>5}  {'seconds':>8}  {'updates':>7}  metrics")
    for row, secs in zip(res.history, res.round_seconds, strict=False):
        m = row.get("metrics") or {}
        shown = {k: v for k, v in m.items() if k.startswith("eval_") or k == "mean_train_loss"}
        text = "  ".join(
            f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items()
        )
        say(safe_text(f"{row['round']:>5}  {secs:>8.3f}  {m.get('num_updates', ''):>7}  {text}"))
    say(
        f"done: {res.rounds} rounds in {res.wall_seconds:.2f} s (setup {res.setup_seconds:.2f} s), "
        f"{res.fits} fits by {res.agents_trained} distinct agents; run {res.run_id[:8]} in "
        f"{res.db} (see `fedstack db rounds --db {res.db}`)"
    )
    if json_:
        print(json.dumps(res.summary()))
    return 0
