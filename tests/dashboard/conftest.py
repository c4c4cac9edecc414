"""Stores for the dashboard tests, filled fast with the store's own tables (bulk inserts)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import insert

from fedstack.store import Store
from fedstack.store import schema as s

XSS = "<img src=x onerror=alert(1)>"
"""Attacker-controlled text: an agent name, a metrics key, a refusal reason."""
SCRIPT = "<script>alert(2)</script>"


@dataclass
class Filled:
    db: Path
    run_ids: list[str]  # oldest first
    agent_ids: dict[str, str] = field(default_factory=dict)
    global_ids: list[str] = field(default_factory=list)  # run_ids[-1]'s, round 1..n
    local_ids: list[str] = field(default_factory=list)


def _id() -> str:
    return uuid.uuid4().hex


def fill(
    db: Path,
    *,
    runs: int = 3,
    rounds: int = 5,
    agents: int = 3,
    events: int = 5,
    running: bool = False,
    local_rounds: int | None = None,
) -> Filled:
    """A store with ``runs`` runs; the newest has ``rounds`` rounds of ``agents`` agents
    (one named :data:`XSS`, its metrics keyed :data:`SCRIPT`), refusals and events; local
    models in the last ``local_rounds`` rounds only (None: all)."""
    st = Store(str(db))
    out = Filled(db, [])
    t0 = time.time() - 3600
    try:
        with st.engine.begin() as c:
            for i in range(runs):
                rid = _id()
                out.run_ids.append(rid)
                c.execute(
                    insert(s.runs).values(
                        id=rid,
                        name=f"run-{i:03d}",
                        created=t0 + i,
                        status="running" if running and i == runs - 1 else "finished",
                        config={"strategy": "fedavg" if i % 2 == 0 else "fedprox"},
                        structure=[["w", "float32", [4]]],
                        init_weights=False,
                        version=rounds if i == runs - 1 else 0,
                        aggregator_id=_id(),
                    )
                )
            rid = out.run_ids[-1]
            names = [XSS] + [f"agent-{k}" for k in range(1, agents)]
            agent_rows = []
            for k, name in enumerate(names):
                aid = _id()
                out.agent_ids[name] = aid
                agent_rows.append(
                    {
                        "id": aid,
                        "name": name,
                        "token_hash": None,
                        "created": t0 + k,
                        "last_seen": t0 + 100 + k,
                        "last_address": f"127.0.0.1:{40000 + k}",
                        "credential_source": "issued",
                        "credential_created": t0,
                        "revoked_at": None,
                        "role": "agent",
                    }
                )
            c.execute(insert(s.agents), agent_rows)
            models, lineage, round_rows = [], [], []
            prev: str | None = None
            for r in range(1, rounds + 1):
                gid = _id()
                out.global_ids.append(gid)
                for name in names if local_rounds is None or r > rounds - local_rounds else ():
                    lid = _id()
                    out.local_ids.append(lid)
                    metrics: dict[str, Any] = {"local_accuracy": 0.5 + r / (4 * rounds)}
                    if name == XSS:
                        metrics[SCRIPT] = 1.0
                    models.append(
                        _model(
                            lid, rid, "local", out.agent_ids[name], r, metrics, "aggregated", t0 + r
                        )
                    )
                    lineage.append({"child_id": gid, "parent_id": lid, "relation": "input"})
                models.append(_model(gid, rid, "cluster", "agg", r, {}, "global", t0 + r + 0.5))
                if prev is not None:
                    lineage.append({"child_id": gid, "parent_id": prev, "relation": "base"})
                prev = gid
                round_rows.append(
                    {
                        "run_id": rid,
                        "round": r,
                        "started": t0 + r,
                        "finished": t0 + r + 0.5,
                        "seconds": 0.5 + r / 100,
                        "model_id": gid,
                        "num_updates": len(names),
                        "num_samples": 10 * len(names),
                        "metrics": {
                            "eval_accuracy": 0.5 + r / (4 * rounds),
                            "eval_loss": 1.0 / r,
                            SCRIPT: r,
                        },
                    }
                )
            if models:
                c.execute(insert(s.models), models)
            if lineage:
                c.execute(insert(s.lineage), lineage)
            if round_rows:
                c.execute(insert(s.rounds), round_rows)
            ev = [
                {
                    "time": t0 + 200 + j,
                    "run_id": rid,
                    "agent_id": out.agent_ids[XSS],
                    "kind": "refused",
                    "detail": {"code": "bad-model", "message": f"{XSS} refused {j}"},
                }
                for j in range(2)
            ]
            ev += [
                {
                    "time": t0 + 300 + j,
                    "run_id": rid,
                    "agent_id": out.agent_ids[names[1 + j % (len(names) - 1)]]
                    if len(names) > 1
                    else None,
                    "kind": "joined",
                    "detail": {"name": SCRIPT},
                }
                for j in range(events)
            ]
            c.execute(insert(s.events), ev)
    finally:
        st.close()
    return out


def _model(
    mid: str,
    rid: str,
    kind: str,
    producer: str,
    rnd: int,
    metrics: dict[str, Any],
    status: str,
    created: float,
) -> dict[str, Any]:
    return {
        "id": mid,
        "run_id": rid,
        "kind": kind,
        "producer": producer,
        "round": rnd,
        "base_version": rnd - 1,
        "num_samples": 10,
        "metrics": metrics,
        "blob": "",
        "nbytes": 0,
        "created": created,
        "status": status,
        "upload_id": None,
        "extra_blob": None,
        "cluster": None,
    }


@pytest.fixture
def make_store() -> Callable[..., Filled]:
    """:func:`fill` (test modules do not import this conftest)."""
    return fill


@pytest.fixture
def filled(tmp_path: Path) -> Filled:
    return fill(tmp_path / "dash.db")


@pytest.fixture
def readonly_store(filled: Filled) -> Iterator[Store]:
    st = Store.open_readonly(str(filled.db))
    try:
        yield st
    finally:
        st.close()
