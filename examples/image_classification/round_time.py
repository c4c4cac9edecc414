"""How long one agent's round of the CIFAR-10 example takes on this machine.

Times :class:`fedstack.trainers.torch_cifar.CifarCNNTrainer` with the book's settings:
loading the data, one ``fit`` (evaluate the received model on the test set, train on
8,000 images in minibatches of 4, evaluate the trained model) and one evaluation. With
``--data-dir`` it uses your CIFAR-10 folder; without, generated images of CIFAR-10's
size (50,000 training and 10,000 test images, written to a temporary folder), which
cost the same to train on::

    python examples/image_classification/round_time.py
    python examples/image_classification/round_time.py --data-dir ~/data/cifar10 --threads 2
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--data-dir", type=Path, help="a CIFAR-10 folder (default: generated)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--rounds", type=int, default=2, help="fits to time (default 2)")
    args = parser.parse_args()

    from fedstack.testing.cifar import make_cifar10_folder
    from fedstack.trainers.torch_cifar import CifarCNNTrainer

    with tempfile.TemporaryDirectory(prefix="fedstack-cifar-size-") as tmp:
        data_dir = args.data_dir
        if data_dir is None:
            start = time.perf_counter()
            data_dir = make_cifar10_folder(tmp, 50_000, 10_000)
            seconds = time.perf_counter() - start
            print(f"generated 50,000 + 10,000 CIFAR-format images in {seconds:.1f} s")
        start = time.perf_counter()
        trainer = CifarCNNTrainer(0, 1, data_dir=data_dir, threads=args.threads)
        print(
            f"loaded {trainer.num_samples} training and {len(trainer.y_test)} test images "
            f"in {time.perf_counter() - start:.1f} s"
        )
        weights = trainer.initial_weights()
        for round_ in range(1, args.rounds + 1):
            start = time.perf_counter()
            weights, n, metrics = trainer.fit(weights, {})
            total = time.perf_counter() - start
            print(
                f"round {round_}: fit {total:.1f} s (training on {n} images "
                f"{metrics['train_seconds']:.1f} s, the rest two evaluations on the test set); "
                f"global accuracy {metrics['global_accuracy']:.3f}, "
                f"local accuracy {metrics['local_accuracy']:.3f}"
            )
        start = time.perf_counter()
        trainer.evaluate(weights, {})
        print(f"one evaluation on the test set: {time.perf_counter() - start:.2f} s")


if __name__ == "__main__":
    main()
