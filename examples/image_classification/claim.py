"""The book's chapter-6 claim on digits, over several seeds: do two agents reach one?

For each seed and data regime, runs the example's federation (same trainer, same
defaults, FedAvg waiting for every agent) with one agent and with two in the in-process
simulator (:func:`fedstack.sim.simulate`: the real aggregator and agent code, no
sockets), and prints the mean test accuracy of the global model over the last 10 rounds.
``run.py`` gives the same figures for the same seed (its curves are the agents' view of
the same global models)::

    python examples/image_classification/claim.py                 # seeds 0-4, 20 rounds
    python examples/image_classification/claim.py --seeds 0 1 --rounds 30

Regimes:

* ``book``: as in the book, every agent holds the whole training split and trains each
  round on a random sample of it (512 of the 1,437 images), so two agents see twice as
  many images per round as one;
* ``split``: the training split is shared out (IID halves) and every agent trains on
  all of its share each round, so two agents see the same images per round as one, in
  two halves.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from fedstack.sim import simulate

TRAINER = "fedstack.trainers.torch_cifar:BookImageTrainer"
EVALUATOR = "fedstack.trainers.torch_digits:evaluate_global_cnn"
REGIMES = {
    "book": {"partition": "full", "samples_per_round": 512},
    "split": {"partition": "iid", "samples_per_round": 0},
}
LAST = 10


def last_rounds_accuracy(num_agents: int, regime: str, seed: int, rounds: int, db: Path) -> float:
    """Mean central test accuracy of the global models of the last ``LAST`` rounds.

    The central evaluation of round r's model equals the agents' "global accuracy" of
    round r + 1 in ``run.py``'s CSV (the same model on the same test split), so these are
    ``run.py``'s rounds ``rounds - LAST + 2 .. rounds + 1``.
    """
    result = simulate(
        TRAINER,
        {"dataset": "digits", "seed": seed, **REGIMES[regime]},
        num_agents=num_agents,
        rounds=rounds,
        evaluator=EVALUATOR,
        db=str(db),
        backend="inline",
        seed=seed,
    )
    accuracies = [float(h["metrics"]["eval_accuracy"]) for h in result.history]
    return statistics.fmean(accuracies[-LAST:])


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--regimes", nargs="+", choices=list(REGIMES), default=list(REGIMES))
    args = parser.parse_args()
    if args.rounds < LAST:
        parser.error(f"--rounds must be >= {LAST}")
    print(f"mean test accuracy of the global model over the last {LAST} of {args.rounds} rounds")
    print("| regime | seed | One Agent | Two Agents | two - one |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="fedstack-claim-") as tmp:
        for regime in args.regimes:
            diffs = []
            for seed in args.seeds:
                one, two = (
                    last_rounds_accuracy(n, regime, seed, args.rounds, Path(tmp) / f"{regime}.db")
                    for n in (1, 2)
                )
                diffs.append(two - one)
                print(
                    f"| {regime} | {seed} | {one:.4f} | {two:.4f} | {two - one:+.4f} |", flush=True
                )
            print(
                f"| {regime} | mean | | | {statistics.fmean(diffs):+.4f} "
                f"(min {min(diffs):+.4f}, max {max(diffs):+.4f}) |",
                flush=True,
            )


if __name__ == "__main__":
    main()
