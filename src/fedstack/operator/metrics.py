"""Prometheus metrics of one aggregator (``GET /metrics`` on the operator port).

Every aggregator has one :class:`AggregatorMetrics` with its OWN registry (several
aggregators may share a process: the simulator, the tests). Two kinds of series:

- **events**, counted where they happen (one call each, see the ``observe_*`` and
  ``count_*`` methods): uploads by status, refusals by reason, upload bytes, round
  durations, store commit durations, operator API requests. They count from the start of
  the process, as Prometheus counters do (``rate()`` handles restarts);
- **state**, read from the aggregator when scraped (:class:`Gauges`): rounds completed,
  current round and version, active and connected agents, byte-budget use. These agree
  with the store: ``fedstack_rounds_completed_total`` is the run's committed rounds (the
  latest global version; the rows ``fedstack db rounds`` lists), also after a restart.

Series (all prefixed ``fedstack_``)::

    rounds_completed_total                  committed rounds of the run (from the store)
    round                                   round in progress
    model_version                           version of the latest global model (-1: none)
    rounds_finished                         1 once the run's last round is committed
    agents_active                           registered agents that count towards rounds
    agents_connected                        open agent connections (incl. not registered)
    uploads_queued                          uploads waiting for the store
    uploads_total{status}                   uploads answered: accepted, accepted-late,
                                            stale-dropped, duplicate, finished, rejected
                                            (each stored once), resent (stored before),
                                            refused (invalid, over quota: not stored)
    upload_bytes_total                      tensor bytes of the uploads received
    refusals_total{reason}                  agents refused or disconnected, by error code
    round_duration_seconds                  histogram: round start to its commit
    store_commit_duration_seconds{operation} histogram: store commits (uploads, round,
                                            semi_global, global)
    byte_budget_used_bytes{budget}          bytes held now (upload, fanout)
    byte_budget_limit_bytes{budget}         the budget's size
    byte_budget_peak_bytes{budget}          most bytes held at once
    byte_budget_waits_total{budget}         requests that had to wait for bytes
    operator_requests_total{status}         operator API calls by HTTP status
    aggregator_info{run_id,aggregator_id,strategy,delivery,fedstack_version}   always 1
"""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

__all__ = ["CONTENT_TYPE", "COMMITS", "AggregatorMetrics", "BudgetUse", "Gauges"]

T = TypeVar("T")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""The Prometheus text exposition format's media type."""

UPLOAD_STATUSES = (
    "accepted",
    "accepted-late",
    "stale-dropped",
    "duplicate",
    "finished",
    "rejected",
    "resent",
    "refused",
)
"""The ``status`` label values of ``fedstack_uploads_total`` (all present from the start)."""

COMMITS: dict[str, str] = {
    "persist_batch": "uploads",
    "commit_round": "round",
    "commit_semi_global": "semi_global",
    "commit_global": "global",
}
"""Store calls timed as commits (function name -> ``operation`` label)."""

_LABEL = re.compile(r"[a-z0-9][a-z0-9_.-]{0,47}")
_ROUND_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0)
_COMMIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


@dataclass(frozen=True, slots=True)
class BudgetUse:
    """One byte budget at one instant."""

    used: int
    limit: int
    peak: int
    waits: int


@dataclass(frozen=True, slots=True)
class Gauges:
    """The state series, read from the aggregator at each scrape."""

    rounds_completed: int
    round: int
    version: int
    finished: bool
    active_agents: int
    connected_agents: int
    uploads_queued: int
    budgets: dict[str, BudgetUse] = field(default_factory=dict)
    info: dict[str, str] = field(default_factory=dict)


class StoreCall(Protocol):
    """``await db(fn, *args, **kwargs)``: ``fn`` run on the store thread."""

    def __call__(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Awaitable[T]: ...


def label(value: str) -> str:
    """A bounded, safe label value: server-defined codes pass, anything else is ``other``."""
    return value if _LABEL.fullmatch(value) else "other"


class AggregatorMetrics:
    """The metrics of one aggregator.

    Args:
        gauges: returns the state series when scraped (None: only the event series).
    """

    def __init__(self, gauges: Callable[[], Gauges] | None = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.uploads = Counter(
            "fedstack_uploads", "Uploads answered, by status", ["status"], registry=r
        )
        for status in UPLOAD_STATUSES:
            self.uploads.labels(status)
        self.upload_bytes = Counter(
            "fedstack_upload_bytes", "Tensor bytes of the uploads received", registry=r
        )
        self.refusals = Counter(
            "fedstack_refusals",
            "Agents refused or disconnected (registration, upload, operator revoke), by code",
            ["reason"],
            registry=r,
        )
        self.round_duration = Histogram(
            "fedstack_round_duration_seconds",
            "Seconds from a round's start to its commit",
            buckets=_ROUND_BUCKETS,
            registry=r,
        )
        self.store_commit = Histogram(
            "fedstack_store_commit_duration_seconds",
            "Seconds a store commit takes on the store thread",
            ["operation"],
            buckets=_COMMIT_BUCKETS,
            registry=r,
        )
        self.operator_requests = Counter(
            "fedstack_operator_requests",
            "Operator API requests, by HTTP status",
            ["status"],
            registry=r,
        )
        if gauges is not None:
            r.register(_StateCollector(gauges))

    # ------------------------------------------------------------------ events
    def count_upload(self, status: str) -> None:
        """An upload was answered with ``status`` (see :data:`UPLOAD_STATUSES`)."""
        self.uploads.labels(status if status in UPLOAD_STATUSES else "refused").inc()

    def count_refusal(self, reason: str) -> None:
        """An agent was refused or disconnected with error code ``reason``."""
        self.refusals.labels(label(reason)).inc()

    def observe_round(self, seconds: float) -> None:
        """A round was committed ``seconds`` after it started."""
        self.round_duration.observe(max(0.0, seconds))

    def count_operator_request(self, status: int) -> None:
        self.operator_requests.labels(str(status)).inc()

    def timed_store(self, db: StoreCall) -> StoreCall:
        """``db`` (runs a store call on the store thread), timing the calls named in
        :data:`COMMITS` where they run (the wait for the thread is not counted)."""

        def call(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Awaitable[T]:
            operation = COMMITS.get(getattr(fn, "__name__", ""))
            if operation is None:
                return db(fn, *args, **kwargs)
            histogram = self.store_commit.labels(operation)

            def timed(*a: Any, **k: Any) -> T:
                t0 = time.perf_counter()
                try:
                    return fn(*a, **k)
                finally:
                    histogram.observe(time.perf_counter() - t0)

            return db(timed, *args, **kwargs)

        return call

    # ------------------------------------------------------------------ exposition
    def render(self) -> bytes:
        """The text exposition of every series (:data:`CONTENT_TYPE`)."""
        return generate_latest(self.registry)


class _StateCollector(Collector):
    """The state series, computed at each scrape from a :class:`Gauges` snapshot."""

    def __init__(self, gauges: Callable[[], Gauges]) -> None:
        self._gauges = gauges

    def describe(self) -> list[Metric]:
        return []  # computed at collect time (the registry does not call collect() early)

    def collect(self) -> Iterator[Metric]:
        g = self._gauges()
        yield CounterMetricFamily(
            "fedstack_rounds_completed",
            "Committed rounds of the run (as the store has them)",
            value=g.rounds_completed,
        )
        for name, doc, value in (
            ("fedstack_round", "Round in progress", g.round),
            ("fedstack_model_version", "Version of the latest global model (-1: none)", g.version),
            ("fedstack_rounds_finished", "1 once the run's last round is committed", g.finished),
            (
                "fedstack_agents_active",
                "Registered agents counting towards rounds",
                g.active_agents,
            ),
            (
                "fedstack_agents_connected",
                "Open agent connections (registered or not)",
                g.connected_agents,
            ),
            ("fedstack_uploads_queued", "Uploads waiting for the store", g.uploads_queued),
        ):
            yield GaugeMetricFamily(name, doc, value=float(value))
        used = GaugeMetricFamily(
            "fedstack_byte_budget_used_bytes", "Bytes of the budget held now", labels=["budget"]
        )
        limit = GaugeMetricFamily(
            "fedstack_byte_budget_limit_bytes", "The budget's size in bytes", labels=["budget"]
        )
        peak = GaugeMetricFamily(
            "fedstack_byte_budget_peak_bytes", "Most bytes held at once", labels=["budget"]
        )
        waits = CounterMetricFamily(
            "fedstack_byte_budget_waits", "Requests that waited for bytes", labels=["budget"]
        )
        for name, b in sorted(g.budgets.items()):
            used.add_metric([name], b.used)
            limit.add_metric([name], b.limit)
            peak.add_metric([name], b.peak)
            waits.add_metric([name], b.waits)
        yield from (used, limit, peak, waits)
        if g.info:
            info = InfoMetricFamily("fedstack_aggregator", "The aggregator and its run")
            info.add_metric([], g.info)
            yield info
