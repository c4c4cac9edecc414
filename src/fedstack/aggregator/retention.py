"""Retention of the agents' local models (setting ``keep_local_models``).

``all`` (the default, what the book asks): every local model keeps its weights.
``last``: after round ``r`` is committed, the local models of rounds up to
``r - keep_local_rounds`` lose their weights; ``metadata``: those of rounds up to ``r``.
Their records (who uploaded what, when, with which metrics and status) always stay, and
the blobs no longer referenced by any record are deleted. The pruning runs on the store
thread after each round commit, in the background: a failure is logged and the next
round's pruning catches up.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from fedstack.errors import StoreError

if TYPE_CHECKING:
    from fedstack.aggregator.service import Aggregator

log = logging.getLogger("fedstack.aggregator")


def prune_up_to(policy: str, keep_rounds: int, committed: int) -> int | None:
    """The last round whose local models lose their weights once round ``committed`` is
    committed (None: nothing is pruned)."""
    if policy == "metadata":
        return committed
    if policy == "last":
        return committed - keep_rounds if committed - keep_rounds >= 0 else None
    return None


class Retention:
    """Applies ``keep_local_models`` to one aggregator's run.

    Args:
        aggregator: whose store, run and settings are used.
    """

    def __init__(self, aggregator: Aggregator) -> None:
        self.agg = aggregator

    async def after_commit(self, round: int) -> None:
        """Round ``round`` was committed: prune what the policy no longer keeps."""
        cfg = self.agg.config
        upto = prune_up_to(cfg.keep_local_models, cfg.keep_local_rounds, round)
        store = self.agg.store
        if upto is None or store is None:
            return
        try:
            models, blobs = await self.agg._db(store.prune_local_models, self.agg.run_id, upto)
        except StoreError as exc:
            log.warning("retention after round %d failed (retried next round): %s", round, exc)
            return
        if models:
            log.debug(
                "retention after round %d: %d local model(s) pruned, %d blob(s) deleted",
                round,
                models,
                blobs,
            )
