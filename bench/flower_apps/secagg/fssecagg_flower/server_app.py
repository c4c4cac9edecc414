"""The ServerApp: Flower's ``DefaultWorkflow`` with ``SecAggPlusWorkflow`` as its fit
workflow and the legacy ``FedAvg`` strategy (every node every round, no federated
evaluation). A central ``evaluate_fn`` time-stamps every global model (round 0 is the
initial one) into the ``out`` file; the final model is saved to ``final`` after its
timestamp is written (outside the timed interval).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import Context
from flwr.common import ndarrays_to_parameters
from flwr.server import LegacyContext, ServerApp, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid

from fssecagg_flower.task import config, log_event

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = config()
    log_event(cfg, event="serverapp-start")
    num = int(cfg["num-agents"])
    rounds = int(cfg["num-rounds"])

    def evaluate_fn(
        server_round: int, parameters: list[np.ndarray[Any, Any]], _: dict[str, Any]
    ) -> tuple[float, dict[str, float]]:
        log_event(cfg, event="round", round=server_round)
        if server_round == rounds and cfg.get("final"):
            np.save(cfg["final"], np.asarray(parameters[0]))
        return 0.0, {}

    strategy = FedAvg(
        fraction_fit=1.0,
        fraction_evaluate=0.0,
        min_fit_clients=num,
        min_evaluate_clients=0,
        min_available_clients=num,
        initial_parameters=ndarrays_to_parameters([np.zeros(int(cfg["params"]), np.float32)]),
        evaluate_fn=evaluate_fn,
    )
    legacy = LegacyContext(
        context=context, config=ServerConfig(num_rounds=rounds), strategy=strategy
    )
    if not cfg.get("secagg", True):  # Flower's own plain-FedAvg baseline
        DefaultWorkflow()(grid, legacy)
        log_event(cfg, event="serverapp-end")
        return
    fit_workflow = SecAggPlusWorkflow(
        num_shares=int(cfg["num-shares"]),
        reconstruction_threshold=int(cfg["threshold"]),
        max_weight=float(cfg["max-weight"]),
        clipping_range=float(cfg["clipping-range"]),
        quantization_range=int(cfg["quantization-range"]),
        modulus_range=int(cfg["modulus-range"]),
        timeout=None if cfg.get("timeout") is None else float(cfg["timeout"]),
    )
    DefaultWorkflow(fit_workflow=fit_workflow)(grid, legacy)
    log_event(cfg, event="serverapp-end")
