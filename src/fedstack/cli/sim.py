"""``fedstack sim``: N virtual agents on the real aggregator and agent code.

Example (10,000 agents, 100 sampled per round)::

    fedstack sim --agents 10000 --per-round 100 --rounds 10 \\
        --trainer fedstack.trainers.synthetic:SyntheticTrainer --trainer-arg max_samples=200
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from fedstack.errors import FedstackError

DEFAULT_TRAINER = "fedstack.trainers.digits:DigitsLinearTrainer"
DEFAULT_EVALUATOR = "fedstack.trainers.digits:evaluate_global"


def add_parser(sub: Any) -> None:
    p = sub.add_parser("sim", help="simulate N virtual agents on the real aggregator and agents",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--agents", type=int, default=10, help="virtual agents N (default 10)")
    who = p.add_mutually_exclusive_group()
    who.add_argument("--per-round", type=int, help="agents sampled per round (default: all)")
    who.add_argument("--fraction", type=float, help="fraction of the agents sampled per round")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--trainer", default=DEFAULT_TRAINER,
                   help="module:Callable built with index=, num_agents= "
                   f"(default {DEFAULT_TRAINER})")
    p.add_argument("--trainer-arg", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--evaluator", default=None,
                   help="module:function(weights) -> metrics, run on every global model "
                   f"(default with the default trainer: {DEFAULT_EVALUATOR})")
    p.add_argument("--strategy", default="fedavg")
    p.add_argument("--strategy-param", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--federation", action="append", default=[], metavar="KEY=VALUE",
                   help="a setting sent to every agent (e.g. fedprox_mu=1)")
    p.add_argument("--db", default="fedstack-sim.db", help="the store (default fedstack-sim.db)")
    p.add_argument("--run-name", default=None)
    p.add_argument("--transport", choices=["inproc", "loopback"], default="inproc")
    p.add_argument("--backend", choices=["auto", "local", "inline", "ray"], default="auto",
                   help="where agents train: auto (inline until fits are slow enough for "
                   "worker processes to pay), local (worker processes), inline, ray")
    p.add_argument("--workers", type=int, default=None,
                   help="training workers (default: one per CPU; 0 = in this process)")
    p.add_argument("--ray-address", default=None, help="Ray cluster to join (default: local)")
    p.add_argument("--cpus-per-agent", type=float, default=None, help="Ray: CPUs per fit")
    p.add_argument("--gpus-per-agent", type=float, default=None, help="Ray: GPU fraction per fit")
    p.add_argument("--delivery", choices=["push", "poll"], default="push")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--durable", action="store_true", help="fsync every store write")
    p.add_argument("--keep-freed-memory", action=argparse.BooleanOptionalAction, default=True,
                   help="let malloc keep freed big buffers for reuse instead of returning "
                   "each to the kernel (default on; much less system time with big models)")
    p.add_argument("--round-timeout", type=float, default=600.0)
    p.add_argument("--json", action="store_true", help="end with one JSON line of results")
    p.set_defaults(func=cmd_sim)


def cmd_sim(args: argparse.Namespace) -> int:
    from fedstack.buffers import keep_freed_memory
    from fedstack.cli.main import _parse_json_kv
    from fedstack.sim import simulate

    if args.keep_freed_memory:
        keep_freed_memory()

    evaluator = args.evaluator
    if evaluator is None and args.trainer == DEFAULT_TRAINER:
        evaluator = DEFAULT_EVALUATOR
    trainer_args = _parse_json_kv(args.trainer_arg)
    options: dict[str, Any] = {}
    if args.backend == "ray":
        options = {k: v for k, v in (("address", args.ray_address),
                                     ("num_cpus", args.cpus_per_agent),
                                     ("num_gpus", args.gpus_per_agent)) if v is not None}
    elif args.ray_address or args.cpus_per_agent or args.gpus_per_agent:
        raise FedstackError("--ray-address/--cpus-per-agent/--gpus-per-agent need --backend ray")
    say = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    k = args.per_round or (f"{args.fraction:g} x" if args.fraction else "all")
    say(f"fedstack sim: {args.agents} agents ({k} per round) x {args.rounds} rounds, "
        f"{args.trainer}, {args.strategy}, {args.transport} transport, {args.backend} backend")
    res = simulate(
        args.trainer, trainer_args, num_agents=args.agents, rounds=args.rounds,
        per_round=args.per_round, fraction=args.fraction, strategy=args.strategy,
        strategy_params=_parse_json_kv(args.strategy_param),
        federation=_parse_json_kv(args.federation), evaluator=evaluator, db=args.db,
        run_name=args.run_name, transport=args.transport, backend=args.backend,
        workers=args.workers, backend_options=options, seed=args.seed,
        delivery=args.delivery, durable=args.durable, round_timeout=args.round_timeout,
        progress=sys.stderr.isatty() or not args.json,
    )
    say(f"{'round':>5}  {'seconds':>8}  {'updates':>7}  metrics")
    for row, secs in zip(res.history, res.round_seconds, strict=False):
        m = row.get("metrics") or {}
        shown = {k: v for k, v in m.items() if k.startswith("eval_") or k == "mean_train_loss"}
        text = "  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                         for k, v in shown.items())
        say(f"{row['round']:>5}  {secs:>8.3f}  {m.get('num_updates', ''):>7}  {text}")
    say(f"done: {res.rounds} rounds in {res.wall_seconds:.2f} s (setup {res.setup_seconds:.2f} s), "
        f"{res.fits} fits by {res.agents_trained} distinct agents; run {res.run_id[:8]} in "
        f"{res.db} (see `fedstack db rounds --db {res.db}`)")
    if args.json:
        print(json.dumps(res.summary()))
    return 0
