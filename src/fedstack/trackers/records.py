"""What a tracker is given: a run's rounds as the store holds them, as plain scalars.

A :class:`RoundRecord` is one committed round: its own figures (``seconds``,
``num_updates``, ``num_samples``, as ``fedstack db rounds`` shows them), its numeric
metrics (the strategy's, the sample-weighted means of the agents' ``mean_*``, the central
evaluation's ``eval_*`` once stored) and, per contributing agent, the sample count and
numeric metrics of its upload (an :class:`AgentRecord`; in a federation, the agents below
the semi-global models the round was synthesised from). Text metrics are left out;
booleans count as 0 and 1; non-finite values are left out (trackers refuse or mangle
them).

Everything named here comes from the store: the agents' names and metric keys are
attacker-controlled text, which each tracker makes safe for its own format.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedstack.store import Store

__all__ = ["AgentRecord", "RoundRecord", "RunMeta", "numeric", "read_rounds", "round_record"]

ROUND_FIELDS = ("seconds", "num_updates", "num_samples")
"""The round's own figures, logged beside its metrics under these names."""


@dataclass(frozen=True)
class RunMeta:
    """The fedstack run a tracker logs: id, name, status and its (public) configuration."""

    id: str
    name: str
    status: str
    created: float
    config: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> RunMeta:
        """From a row of :meth:`Store.list_runs`."""
        return cls(
            id=str(row["id"]),
            name=str(row["name"]),
            status=str(row["status"]),
            created=float(row["created"]),
            config=dict(row.get("config") or {}),
        )


@dataclass(frozen=True)
class AgentRecord:
    """One agent's upload that went into a round."""

    agent_id: str
    name: str
    num_samples: int
    metrics: dict[str, float]

    def scalars(self) -> dict[str, float]:
        """What a tracker logs for the agent at the round's step."""
        return {**self.metrics, "num_samples": float(self.num_samples)}


@dataclass(frozen=True)
class RoundRecord:
    """One committed round (see the module docstring)."""

    round: int
    finished: float
    seconds: float
    num_updates: int
    num_samples: int
    metrics: dict[str, float]
    agents: tuple[AgentRecord, ...]

    def scalars(self) -> dict[str, float]:
        """What a tracker logs for the run at the round's step (the round's own figures
        win over a metric of the same name)."""
        return {
            **self.metrics,
            "seconds": float(self.seconds),
            "num_updates": float(self.num_updates),
            "num_samples": float(self.num_samples),
        }


def numeric(metrics: Mapping[str, Any] | None) -> dict[str, float]:
    """The numeric, finite entries of ``metrics`` as floats (booleans: 0.0 and 1.0)."""
    out: dict[str, float] = {}
    for k, v in (metrics or {}).items():
        if isinstance(v, bool):
            out[str(k)] = float(v)
        elif isinstance(v, int | float) and math.isfinite(v):
            out[str(k)] = float(v)
    return out


def _contributors(store: Store, model_id: str, depth: int = 2) -> list[AgentRecord]:
    """The local models model ``model_id`` was aggregated from (through semi-global
    models, ``depth`` levels down)."""
    out: list[AgentRecord] = []
    for p in store.parents(model_id):
        if p["relation"] != "input":
            continue
        if p["kind"] == "local":
            out.append(
                AgentRecord(
                    agent_id=str(p["producer"]),
                    name=str(p["agent"] if p["agent"] is not None else p["producer"]),
                    num_samples=int(p["num_samples"]),
                    metrics=numeric(p["metrics"]),
                )
            )
        elif p["kind"] == "semi-global" and depth > 1:
            out.extend(_contributors(store, str(p["id"]), depth - 1))
    return out


def round_record(store: Store, row: Mapping[str, Any], *, agents: bool = True) -> RoundRecord:
    """A row of :meth:`Store.rounds` as a record (``agents``: with its contributors, one
    lineage query)."""
    return RoundRecord(
        round=int(row["round"]),
        finished=float(row["finished"]),
        seconds=float(row["seconds"]),
        num_updates=int(row["num_updates"]),
        num_samples=int(row["num_samples"]),
        metrics=numeric(row["metrics"]),
        agents=tuple(_contributors(store, str(row["model_id"]))) if agents else (),
    )


def read_rounds(store: Store, run_id: str, rounds: Iterable[int]) -> list[dict[str, Any]]:
    """The store's rows of ``rounds`` of ``run_id`` (those that exist), in round order.

    Reads the latest rounds only when the wanted ones are among them (the usual case, a
    tracker following the run), else the whole run."""
    wanted = set(rounds)
    if not wanted:
        return []
    span = max(wanted) - min(wanted) + 1
    rows = store.rounds(run_id, limit=span + 16)
    if rows and rows[0]["round"] > min(wanted):
        rows = store.rounds(run_id)
    return [r for r in rows if r["round"] in wanted]
