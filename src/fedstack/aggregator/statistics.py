"""Immutable snapshots of an aggregator, for the operator API, the simulator and tests.

:meth:`Aggregator.statistics <fedstack.aggregator.service.Aggregator.statistics>` returns
an :class:`AggregatorStatistics`; nothing outside the aggregator reads its round state.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class AgentStatistics:
    """One connected agent. ``last_seen`` is wall-clock, ``idle_seconds`` since then."""

    name: str
    agent_id: str
    address: str
    last_seen: float
    idle_seconds: float
    known_version: int
    welcomed: bool
    credential_source: str | None
    credential: str | None  # fingerprint of the stored credential


@dataclass(frozen=True, slots=True)
class AggregatorStatistics:
    """The aggregator at one instant: version ``version`` is the latest global model and
    round ``round`` is in progress with ``contributors`` of the ``needed`` uploads."""

    run_id: str
    aggregator_id: str
    version: int
    round: int
    active_agents: int
    contributors: int
    needed: int
    finished: bool
    rounds_completed: int
    strategy: str
    delivery: str
    tls: bool
    uploads_queued: int
    """Uploads waiting for the store (behind the batch being stored)."""
    agents: tuple[AgentStatistics, ...] = ()
    """The connected agents (empty unless asked for: ``statistics(agents=True)``)."""
    name: str | None = None
    """The member's name in a horizontal federation (None: standalone)."""
    peers: tuple[str, ...] = ()
    """The other live members' advertised URLs (what agents are told in welcomes)."""
