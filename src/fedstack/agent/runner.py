"""Run a :class:`~fedstack.agent.trainer.Trainer` as a federation agent."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fedstack.agent.client import Agent
from fedstack.agent.trainer import Trainer
from fedstack.errors import FederationFinished
from fedstack.types import Metrics

log = logging.getLogger("fedstack.agent")


def run_trainer(
    trainer: Trainer, url: str | Sequence[str], name: str, **agent_args: Any
) -> list[Metrics]:
    """Join the federation at ``url`` (one aggregator URL, or several: see
    :class:`~fedstack.agent.client.Agent`) as ``name`` and train until it finishes.

    Each global model goes to ``trainer.fit`` with a config holding the round's version,
    the agent's name, the federation's settings (``federation``: e.g. ``fedprox_mu``) and
    the extra arrays that came with the model (``global_extra``). ``fit`` returns
    ``(weights, num_samples, metrics)`` or ``(weights, num_samples, metrics, extra)``; the
    result is uploaded. Returns the metrics of every fit, then of ``trainer.evaluate`` on
    the final global model.
    """
    agent = Agent(url, name=name, **agent_args)
    history: list[Metrics] = []
    agent.send_initial_model(trainer.initial_weights())
    final = None
    try:
        agent.start()  # inside: an interrupt (SIGTERM in `fedstack agent`) still closes it
        while True:
            try:
                gm = agent.wait_for_global_model()
            except FederationFinished:
                break
            final = gm
            version = agent.version
            config = {
                "version": version,
                "name": name,
                "federation": dict(agent.federation_config),
                "global_extra": agent.global_extra,
            }
            out = trainer.fit(gm, config)
            # our own dicts of the result: arrays the trainer does not keep are then held
            # by nothing else, and the agent sends them without a copy (send_owned_model)
            weights = dict(out[0])
            num_samples, metrics = out[1], out[2]
            extra = dict(out[3]) if len(out) > 3 and out[3] else None
            del out, gm
            history.append({"version": version, **metrics})
            log.info("%s: trained on v%d (%d samples): %s", name, version, num_samples, metrics)
            agent.send_owned_model(weights, num_samples, metrics, extra=extra)
    finally:
        agent.close()
    if final is not None:
        history.append({"final": True, **trainer.evaluate(final, {"name": name})})
    return history
