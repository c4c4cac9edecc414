"""The round state machine, pure: no I/O, no clock (``now`` is an argument).

``now`` is a monotonic time (the aggregator's clock, ``time.monotonic`` unless a test
injects another); stored timestamps are wall-clock and never pass through here.

Version ``v`` is the global model after ``v`` completed rounds (0 = the initial model);
round ``v + 1`` is in progress and collects updates. An upload says which version it was
trained from (``base_version``); its staleness is ``version - base_version``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum


class UploadStatus(StrEnum):
    """What became of an upload, from the round's verdict to the store to the agent's ack.

    The value is what the agent reads in its ``upload_ack``; :attr:`stored` is the status
    column of the stored local model (the store later marks ``buffered`` ones
    ``aggregated``); :meth:`from_stored` maps a stored status back (a re-sent upload is
    acknowledged with what happened to the first one).
    """

    CURRENT = "accepted"  # counts for the round in progress
    NEXT = "accepted-late"  # stale, accepted into the round in progress (policy "next")
    DROP = "stale-dropped"  # stale, stored but not aggregated (policy "drop")
    DUPLICATE = "duplicate"  # this agent already contributed to the round in progress
    FINISHED = "finished"  # the federation is over
    REJECTED = "rejected"  # stored, but refused by the update gate

    @property
    def counts(self) -> bool:
        """True if the upload counts for the round in progress."""
        return self in (UploadStatus.CURRENT, UploadStatus.NEXT)

    @property
    def stored(self) -> str:
        """The status the store records for an upload with this outcome."""
        return _STORED[self]

    @property
    def explanation(self) -> str:
        """The ack's human-readable message ('' for a plain acceptance)."""
        return _EXPLAIN[self]

    @classmethod
    def from_stored(cls, stored: str) -> UploadStatus | str:
        """The outcome of an upload the store recorded as ``stored`` (unknown: as is)."""
        return _FROM_STORED.get(stored, stored)


_STORED = {
    UploadStatus.CURRENT: "buffered",
    UploadStatus.NEXT: "buffered",
    UploadStatus.DROP: "stale",
    UploadStatus.DUPLICATE: "duplicate",
    UploadStatus.FINISHED: "late",
    UploadStatus.REJECTED: "rejected",
}
_FROM_STORED = {
    "buffered": UploadStatus.CURRENT,
    "aggregated": UploadStatus.CURRENT,
    "stale": UploadStatus.DROP,
    "duplicate": UploadStatus.DUPLICATE,
    "late": UploadStatus.FINISHED,
    "rejected": UploadStatus.REJECTED,
    "quarantined": UploadStatus.REJECTED,  # its stored data was found damaged
}
_EXPLAIN = {
    UploadStatus.CURRENT: "",
    UploadStatus.NEXT: "trained on an older global model; accepted into the current round",
    UploadStatus.DROP: "trained on an older global model; stored but not aggregated",
    UploadStatus.DUPLICATE: "this agent already contributed to the current round",
    UploadStatus.FINISHED: "the federation is finished",
    UploadStatus.REJECTED: "refused by the update gate",
}


@dataclass
class RoundState:
    """Which round is in progress, who contributed, and when it must end."""

    threshold: float
    min_agents: int
    round_timeout: float | None
    max_rounds: int | None
    staleness_policy: str
    trigger: int | None = None  # aggregate every `trigger` updates (FedAsync/FedBuff)
    min_updates: int = 1  # the strategy cannot aggregate fewer (Krum, Bulyan, ...)
    target_reached: bool = False
    """The run's target metric was reached (``--target-metric``): the run is over."""
    version: int = -1
    started: float = 0.0
    contributors: dict[str, str] = field(default_factory=dict)  # agent id -> model id
    excused: set[str] = field(default_factory=set)
    """Agents that contributed to the round in progress through another member of a
    horizontal federation (they moved here after uploading): they count towards the
    round's completeness, and a second upload of theirs is a duplicate."""

    @property
    def round(self) -> int:
        return self.version + 1

    @property
    def initialized(self) -> bool:
        return self.version >= 0

    @property
    def finished(self) -> bool:
        return self.target_reached or (
            self.max_rounds is not None and self.version >= self.max_rounds
        )

    def needed(self, active: int) -> int:
        """Distinct uploads that complete the round: max(min_agents, ceil(threshold x active),
        the strategy's min_updates)."""
        return max(self.min_agents, math.ceil(self.threshold * active - 1e-9), 1, self.min_updates)

    def classify(self, agent_id: str, base_version: int) -> UploadStatus:
        """What to do with an upload from ``agent_id`` trained on ``base_version``."""
        if self.finished:
            return UploadStatus.FINISHED
        if agent_id in self.contributors or agent_id in self.excused:
            return UploadStatus.DUPLICATE
        if base_version >= self.version:
            return UploadStatus.CURRENT
        return UploadStatus.NEXT if self.staleness_policy == "next" else UploadStatus.DROP

    def contribute(self, agent_id: str, model_id: str) -> None:
        self.contributors[agent_id] = model_id

    def deadline(self) -> float | None:
        if self.round_timeout is None or not self.initialized or self.finished:
            return None
        return self.started + self.round_timeout

    def ready(self, now: float, active: int) -> bool:
        """True when the round in progress should be aggregated now."""
        n = len(self.contributors)
        if self.excused:  # counted for completeness; nothing of theirs to aggregate here
            if n == 0:
                return False
            n += len(self.excused - self.contributors.keys())
        return self.ready_with(n, now, active)

    def ready_with(self, n: int, now: float, active: int) -> bool:
        """:meth:`ready` if the round had ``n`` contributions."""
        if not self.initialized or self.finished:
            return False
        if n == 0 or n < self.min_updates:
            return False
        if self.trigger is not None:
            if n >= self.trigger:
                return True
        elif n >= self.needed(active):
            return True
        dl = self.deadline()
        return dl is not None and now >= dl and n >= self.min_agents

    def advance(self, now: float) -> None:
        """The round in progress was aggregated: start the next one."""
        self.version += 1
        self.started = now
        self.contributors = {}
        self.excused = set()

    def start(self, version: int, now: float) -> None:
        self.version = version
        self.started = now
        self.contributors = {}
        self.excused = set()
