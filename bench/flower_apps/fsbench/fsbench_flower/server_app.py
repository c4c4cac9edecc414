"""The ServerApp: Flower's own FedAvg strategy, every node every round, central evaluation.

The initial model is what fedstack's first agent proposes (``initial_weights()`` of the
same trainer and seed); the central evaluation is fedstack's evaluator on the same
held-out split. Every global model's arrival is time-stamped into the ``out`` file.
"""

from __future__ import annotations

from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from fsbench_flower.task import log_event, run_config, to_record, to_weights

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run ``num-rounds`` rounds of FedAvg over ``num-agents`` nodes."""
    cfg = run_config(context)
    log_event(cfg, event="serverapp-start")
    num = int(cfg["num-agents"])
    evaluator: Any
    if cfg["task"] == "probe":
        from fedstack.testing.probe import ProbeTrainer, evaluate_probe

        initial = ProbeTrainer(params=cfg["probe-params"]).initial_weights()
        evaluator = evaluate_probe
    else:
        from fedstack.trainers.torch_digits import DigitsMLPTrainer, evaluate_global_mlp

        initial = DigitsMLPTrainer(
            index=0, num_agents=num, partition=cfg["partition"], seed=cfg["seed"]
        ).initial_weights()
        evaluator = evaluate_global_mlp

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        metrics = {k: float(v) for k, v in evaluator(to_weights(arrays)).items()}
        log_event(cfg, event="round", round=server_round, metrics=metrics)
        return MetricRecord(metrics)

    # Every node trains in every round (fraction_train 1.0, all num-agents nodes);
    # no federated (client-side) evaluation: the task evaluates centrally, like fedstack.
    strategy = FedAvg(
        fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=num, min_available_nodes=num
    )
    strategy.start(
        grid=grid,
        initial_arrays=to_record(initial),
        num_rounds=int(cfg["num-rounds"]),
        train_config=ConfigRecord(),
        evaluate_fn=evaluate_fn,
    )
    log_event(cfg, event="serverapp-end")
