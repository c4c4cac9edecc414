"""Uploads: validation, batch planning and the group commit.

An upload goes through three steps:

1. :func:`check_upload` (on the connection's task): sizes, versions, structure, the
   strategy's own check. A refusal is an :class:`~fedstack.errors.InvalidUpdate`.
2. :func:`plan_batch` (by the round owner): the queued uploads, up to and including the
   one that makes the round ready, each classified with an :class:`UploadStatus` exactly
   as one-by-one processing would (an agent's second upload in a batch is a duplicate).
3. :class:`Committer` (one background task): the update gate, ONE store transaction for
   the whole batch (the store thread does only that), then, on the event loop or the
   compute thread but never the store thread, the uploads this batch stored are fed to the
   round's accumulator. The owner then counts them and answers in arrival order: persisted
   before counted, counted before acknowledged.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from fedstack.aggregator.events import BatchCommitted, UploadReceived
from fedstack.aggregator.gate import UpdateGate
from fedstack.aggregator.rounds import RoundState, UploadStatus
from fedstack.aggregator.validation import Structure, validate_extra, validate_model
from fedstack.errors import InvalidUpdate
from fedstack.store import Store, UploadRecord
from fedstack.strategies import Accumulator, Strategy, Update
from fedstack.types import Metrics, Weights
from fedstack.wire import ModelUpload

log = logging.getLogger("fedstack.aggregator")

Results = list[tuple[UploadRecord, bool, str | None]]
"""Per planned upload: (stored record, stored by this batch, the accumulator's refusal)."""


def check_upload(
    msg: ModelUpload,
    *,
    agent_id: str,
    version: int,
    round: int,
    structure: Structure | None,
    global_weights: Weights,
    strategy: Strategy,
    max_num_samples: int,
) -> None:
    """Refuse an upload that cannot count, whatever the round's state.

    Raises:
        InvalidUpdate: naming the problem (sent to the agent as ``invalid-model``).
    """
    if not 0 <= msg.num_samples <= max_num_samples:
        raise InvalidUpdate(f"num_samples {msg.num_samples} is outside 0..{max_num_samples}")
    if msg.base_version > version or msg.base_version < 0:
        raise InvalidUpdate(
            f"base_version {msg.base_version} was never issued (latest global model is {version})"
        )
    validate_model(msg.model, structure, agent_id=agent_id, round=round)
    extra = msg.extra or {}
    validate_extra(extra, agent_id=agent_id, round=round)
    strategy.check(
        Update(
            agent_id,
            msg.model,
            msg.num_samples,
            max(0, version - msg.base_version),
            msg.metrics,
            "",
            extra,
        ),
        global_weights,
    )


def upload_id_problem(upload_id: str) -> str | None:
    """Why ``upload_id`` is unusable (None if it is fine)."""
    return None if 0 < len(upload_id) <= 64 else "upload_id must be 1-64 chars"


@dataclass(eq=False)
class Planned:
    """One upload of a batch, classified by the owner; ``status`` may become
    :attr:`UploadStatus.REJECTED` (the update gate) before it is stored."""

    upload: UploadReceived
    status: UploadStatus
    round: int
    update: Update
    metrics: Metrics = field(default_factory=dict)
    message: str = ""


def plan_batch(
    queue: collections.deque[UploadReceived], state: RoundState, now: float, active: int
) -> list[Planned]:
    """Take queued uploads up to (and including) the one that makes the round ready,
    classified as one-by-one processing would. Pure but for popping ``queue``."""
    batch: list[Planned] = []
    counted = set(state.contributors)
    while queue:
        up = queue.popleft()
        agent, msg = up.session.agent_id, up.msg
        status = state.classify(agent, msg.base_version)
        if status.counts and agent in counted:
            status = UploadStatus.DUPLICATE
        update = Update(
            agent,
            msg.model,
            msg.num_samples,
            state.version - msg.base_version,
            msg.metrics,
            "",
            msg.extra or {},
        )
        batch.append(Planned(up, status, state.round, update, msg.metrics, status.explanation))
        if status.counts:
            counted.add(agent)
            if state.ready_with(len(counted), now, active):
                break
    return batch


def persist_batch(
    store: Store, run_id: str, batch: list[Planned], cluster: str | None = None
) -> list[tuple[UploadRecord, bool]]:
    """The store thread's part: every upload of ``batch`` in ONE transaction (idempotent
    by upload_id). Database work only. ``cluster``: the federation member that holds
    them (None: a standalone aggregator)."""
    held = {} if cluster is None else {"cluster": cluster}
    return store.add_uploads(
        run_id,
        [
            {
                **held,
                "agent_id": p.upload.session.agent_id,
                "upload_id": p.upload.msg.upload_id,
                "round": p.round,
                "base_version": p.upload.msg.base_version,
                "num_samples": p.upload.msg.num_samples,
                "metrics": p.metrics,
                "weights": p.upload.msg.model,
                "status": p.status.stored,
                "blob": p.upload.blob,
                "extra": p.upload.msg.extra,
            }
            for p in batch
        ],
    )


def gated(update: Update, decision: Any) -> Update:
    """``update`` with the weights the gate decided on (the same object if unchanged)."""
    if decision.weights is update.weights:
        return update
    return dataclasses.replace(update, weights=decision.weights)


class Committer:
    """Stores planned batches one at a time and reports each as a :class:`BatchCommitted`.

    Args:
        db: runs a store call on the store thread.
        compute: ``await compute(fn, *args, nbytes=N)`` runs CPU work (the gate, the
            accumulator) on N bytes of arrays, off the store thread.
        store: returns the open store.
        run_id: returns the run id.
        gate_check: the update gate's check of a model (None: no gate).
        accumulator: returns the round's accumulator at the time a batch is counted.
        post: hands the result to the round owner.
        cluster: returns the federation member id the uploads are held by (None: a
            standalone aggregator; nothing is recorded).
    """

    def __init__(
        self,
        *,
        db: Callable[..., Awaitable[Any]],
        compute: Callable[..., Awaitable[Any]],
        store: Callable[[], Store | None],
        run_id: Callable[[], str],
        gate: UpdateGate | None,
        gate_check: Callable[[Weights], Any],
        accumulator: Callable[[], Accumulator | None],
        post: Callable[[BatchCommitted], Awaitable[None]],
        cluster: Callable[[], str] | None = None,
    ) -> None:
        self._db = db
        self._compute = compute
        self._store = store
        self._run_id = run_id
        self._gate = gate
        self._gate_check = gate_check
        self._accumulator = accumulator
        self._post = post
        self._cluster = cluster
        self._batches: asyncio.Queue[list[Planned]] = asyncio.Queue(maxsize=1)

    def submit(self, batch: list[Planned]) -> None:
        """Hand ``batch`` over (the owner submits one at a time: never blocks)."""
        self._batches.put_nowait(batch)

    async def run(self) -> None:
        """Store batches until cancelled."""
        while True:
            batch = await self._batches.get()
            try:
                results = await self._commit(batch)
            except Exception as exc:  # e.g. the store is unavailable: no acks
                await self._post(BatchCommitted(batch, [], exc))
                del batch
                continue
            await self._post(BatchCommitted(batch, results))
            # Drop the batch now: its uploads' receive buffers hold the upload budget
            # until freed, and the next batch cannot arrive while they do.
            del batch, results

    async def _commit(self, batch: list[Planned]) -> Results:
        if self._gate is not None:
            for p in batch:
                if not p.status.counts:
                    continue
                decision = await self._compute(
                    self._gate_check, p.upload.msg.model, nbytes=_nbytes(p.upload.msg.model)
                )
                p.metrics = {**p.metrics, **{f"gate_{k}": v for k, v in decision.metrics.items()}}
                if not decision.accepted:
                    p.status = UploadStatus.REJECTED
                    p.message = decision.reason
                p.update = gated(p.update, decision)
        store = self._store()
        assert store is not None
        cluster = None if self._cluster is None else self._cluster()
        stored = await self._db(persist_batch, store, self._run_id(), batch, cluster)
        fresh = [
            (p, rec)
            for p, (rec, created) in zip(batch, stored, strict=True)
            if created and p.status.counts
        ]
        errors: dict[int, str] = {}
        if fresh:
            errors = await self._compute(
                self._count, fresh, nbytes=sum(_nbytes(p.update.weights) for p, _ in fresh)
            )
        return [
            (rec, created, errors.get(id(p)))
            for p, (rec, created) in zip(batch, stored, strict=True)
        ]

    def _count(self, fresh: list[tuple[Planned, UploadRecord]]) -> dict[int, str]:
        """Feed the stored uploads to the accumulator (never on the store thread)."""
        acc = self._accumulator()
        assert acc is not None
        errors: dict[int, str] = {}
        for p, rec in fresh:
            try:
                acc.add(dataclasses.replace(p.update, model_id=rec.model_id))
            except InvalidUpdate as exc:
                errors[id(p)] = str(exc)
        return errors


def _nbytes(weights: Weights) -> int:
    return sum(int(getattr(a, "nbytes", 0)) for a in weights.values())
