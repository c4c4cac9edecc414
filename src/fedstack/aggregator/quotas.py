"""Storage quotas: what one agent, and all agents together, may add to the store per round.

Every upload is persisted before it is acknowledged (duplicates and stale ones too: their
record makes a re-send idempotent), so an authenticated agent that uploads in a loop would
fill the disk. :class:`StorageQuota` charges each upload its stored size (its weights, the
extra arrays the strategy reads, and :data:`RECORD_BYTES` for the record) against the
round it arrives in, on the event loop before anything is written, and refuses what goes
over with :data:`QUOTA_EXCEEDED`. The charges of a round are forgotten when the next one
starts: together with the retention policy (:mod:`fedstack.aggregator.retention`) the
store's growth is bounded by the quotas times the rounds kept.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

from fedstack.types import Weights

QUOTA_EXCEEDED = "quota-exceeded"
"""The error code of an upload refused by a storage quota (not fatal: the agent may upload
again in a later round)."""

RECORD_BYTES = 1024
"""What one stored upload is charged besides its arrays (its database record and audit)."""

AUTO_UPLOADS = 8
"""Without a configured per-agent quota: one agent may store this many uploads a round,
each as big as the model with twice its size in extra arrays (what FedCurv's and SCAFFOLD's
extras amount to; an honest agent stores one, or a few if it re-sends after a reconnect)."""


def auto_quota(model_bytes: int, cap: int) -> int:
    """The per-agent quota when none is configured: :data:`AUTO_UPLOADS` uploads of a
    model of ``model_bytes`` with twice that in extra arrays, at most ``cap``."""
    return min(cap, AUTO_UPLOADS * (3 * model_bytes + RECORD_BYTES))


def nbytes(weights: Mapping[str, Any] | None) -> int:
    """The bytes of the arrays of ``weights`` (0 for None)."""
    return sum(int(getattr(a, "nbytes", 0)) for a in (weights or {}).values())


def kept_extra(extra: Weights | None, reads: Iterable[str] | None) -> Weights | None:
    """The extra arrays of an upload worth storing: those whose name starts with one of
    the strategy's ``reads`` prefixes (``None``: all of them). Returns ``extra`` itself if
    nothing is dropped, None if nothing is left."""
    if not extra:
        return None
    if reads is None:
        return extra
    prefixes = tuple(reads)
    kept = {k: v for k, v in extra.items() if k.startswith(prefixes)} if prefixes else {}
    if len(kept) == len(extra):
        return extra
    return kept or None


@dataclasses.dataclass
class StorageQuota:
    """Per-round storage accounting (owned by the event loop: not thread-safe).

    Args:
        per_agent: bytes one agent may have stored in one round (None: the
            :func:`auto_quota` of the model passed to :meth:`charge`, at most ``cap``).
        per_round: bytes all agents together may have stored in one round (None: no
            limit).
        cap: the largest automatic per-agent quota.
    """

    per_agent: int | None
    per_round: int | None = None
    cap: int = 4 << 30
    _round: int = -1
    _used: dict[str, int] = dataclasses.field(default_factory=dict)
    _total: int = 0

    def charge(self, agent_id: str, round: int, size: int, model_bytes: int = 0) -> str | None:
        """Charge ``size`` stored bytes (plus :data:`RECORD_BYTES`) to ``agent_id`` in
        ``round`` (``model_bytes``: the size of the federation's model, for the automatic
        quota). Returns why it does not fit (nothing is charged then), or None."""
        if round != self._round:  # a new round: the previous one's charges are over
            self._round, self._used, self._total = round, {}, 0
        cost = size + RECORD_BYTES
        used = self._used.get(agent_id, 0)
        limit = self.per_agent
        if limit is None:
            limit = auto_quota(model_bytes, self.cap)
        if used + cost > limit:
            return (
                f"this upload ({cost} bytes) would exceed the agent's storage quota of "
                f"{limit} bytes for round {round} ({used} used)"
            )
        if self.per_round is not None and self._total + cost > self.per_round:
            return (
                f"this upload ({cost} bytes) would exceed the storage quota of "
                f"{self.per_round} bytes for round {round}"
            )
        self._used[agent_id] = used + cost
        self._total += cost
        return None

    def used(self, agent_id: str) -> int:
        """Bytes charged to ``agent_id`` in the current round."""
        return self._used.get(agent_id, 0)
