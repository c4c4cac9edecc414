"""The higher-level agent interface: a Trainer is called back by the agent's loop.

``fedstack agent --trainer module:Class`` builds ``Class(**kwargs)`` (keyword values from
``--trainer-arg key=value``, as strings) and runs the federation with it::

    class MyTrainer:
        def initial_weights(self) -> Weights: ...
        def fit(self, weights, config) -> tuple[Weights, int, Metrics]: ...
        def evaluate(self, weights, config) -> Metrics: ...
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

from fedstack.types import Metrics, Weights


@runtime_checkable
class Trainer(Protocol):
    """What a user's training code provides to run as a fedstack agent."""

    def initial_weights(self) -> Weights:
        """The model this agent proposes when it is the first to join (its structure
        fixes the federation's model), unless the operator registered one (``fedstack
        model register``); an agent whose model has other names, shapes or dtypes than
        the federation's is refused (``model-mismatch``)."""
        ...

    def fit(self, weights: Weights, config: Mapping[str, Any]) -> tuple[Weights, int, Metrics]:
        """Train from the global ``weights`` on local data.

        ``config`` holds ``version``, ``name``, ``federation`` (the aggregator's settings
        for agents, e.g. ``fedprox_mu``) and ``global_extra`` (extra arrays sent with the
        model, e.g. FedCurv's statistics).

        Returns the trained weights, the number of samples trained on (the FedAvg weight)
        and metrics (e.g. ``train_loss``, ``local_accuracy``); a Trainer for a strategy
        that needs extra arrays may return them as a fourth element.
        """
        ...

    def evaluate(self, weights: Weights, config: Mapping[str, Any]) -> Metrics:
        """Evaluate ``weights`` (a global model) on local data."""
        ...
