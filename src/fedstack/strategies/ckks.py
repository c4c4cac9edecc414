"""``ckks-fedavg``: weighted FedAvg over CKKS ciphertexts (see :mod:`fedstack.privacy.ckks`).

The aggregator holds only the encryption parameters (``aggregator.ctx``); each upload is
``n_i * x_i`` and ``n_i`` encrypted by its agent; the round's result is their encrypted sum,
which the agents decrypt and divide. TenSEAL (extra ``he``) is imported when the strategy
is built, not when the registry lists it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import numpy as np

from fedstack.strategies.base import Result, Strategy, Update, register
from fedstack.types import Metrics, Weights

PARSED_KEPT = 4
"""Uploads whose parsed ciphertexts ``check()`` keeps for ``add()`` (memory: about that
many encrypted models)."""


class CkksAccumulator:
    def __init__(self, strategy: CkksFedAvg, global_weights: Weights) -> None:
        from fedstack.privacy.ckks import CkksSum

        self._strategy = strategy
        self._sum = CkksSum(strategy.context, global_weights)

    @property
    def count(self) -> int:
        return self._sum.count

    def add(self, update: Update) -> None:
        parsed = self._strategy.take_parsed(update.weights)
        self._sum.add(update.weights, update.num_samples, update.agent_id, parsed)

    def result(self) -> Result:
        weights = self._sum.result()
        return Result(
            weights, {}, {"num_updates": self._sum.count, "num_samples": self._sum.samples}
        )


@register
class CkksFedAvg(Strategy):
    """Sample-weighted FedAvg of CKKS-encrypted models: the aggregator sums ciphertexts.

    ``context``: the aggregator's key file (``aggregator.ctx`` of ``fedstack he keygen``;
    one holding the secret key is refused). Agents run with ``--he-context agents.ctx``.
    Selected by ``fedstack aggregator --he ckks --he-context aggregator.ctx``.
    """

    name = "ckks-fedavg"
    federation_refusal = (
        "members would synthesise the global model by averaging their clusters' models, "
        "which are encrypted sums here: run one aggregator per key set"
    )

    def __init__(self, context: str) -> None:
        from fedstack.privacy.ckks import load_context

        self.context_path = str(context)
        self.context = load_context(self.context_path, "aggregator")
        self._parsed: OrderedDict[int, tuple[Any, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def check(self, update: Update, global_weights: Weights) -> None:
        from fedstack.privacy.ckks import META, CkksSum

        parsed = CkksSum(self.context, global_weights).check(update.weights, update.agent_id)
        # parsing is most of the cost: keep the result for add(), which the aggregator
        # calls with the same arrays once the upload is stored (a few, bounded)
        with self._lock:
            self._parsed[id(update.weights[META])] = (update.weights[META], parsed)
            while len(self._parsed) > PARSED_KEPT:
                self._parsed.popitem(last=False)

    def agent_config(self) -> Metrics:
        """Tells agents the aggregator sums CKKS ciphertexts, under which key set."""
        return {"he": "ckks", "he_key_id": self.context.key_id.hex()}

    def check_initial(self, weights: Weights, agent_id: str) -> None:
        """The first model must be encrypted under this run's key set too: a plain model
        would be stored and sent as the run's first global model."""
        from fedstack.privacy.ckks import CkksSum

        CkksSum(self.context, weights).check(weights, agent_id)

    def take_parsed(self, weights: Weights) -> tuple[Any, list[Any]] | None:
        """What :meth:`check` parsed of these very arrays (None: not kept)."""
        from fedstack.privacy.ckks import META

        arr = weights.get(META)
        with self._lock:
            kept = self._parsed.pop(id(arr), None)
        if kept is None or kept[0] is not arr:
            return None
        parsed: tuple[Any, list[Any]] = kept[1]
        return parsed

    def begin(
        self,
        global_weights: Weights,
        state: Mapping[str, Any],
        *,
        round: int = 1,
        rng: np.random.Generator | None = None,
    ) -> CkksAccumulator:
        return CkksAccumulator(self, global_weights)
