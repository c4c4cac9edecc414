"""The events the round owner consumes (see :class:`fedstack.aggregator.service.Aggregator`).

Connections, the credential watcher and the owner's own effect tasks turn what happened
into one of these and put it on the owner's bounded queue; the owner applies them one at a
time, in order, to the round state. An event that expects an answer carries a ``reply``
future the owner resolves once the event is applied. The owner also wakes up by itself at its next
deadline (round deadline, poll expiry, retry); :class:`DeadlineFired` asks it to look at
its deadlines now (a test that moves a fake clock posts one).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fedstack.strategies import Result
from fedstack.types import Metrics, Weights
from fedstack.wire import Message, ModelUpload, Poll

if TYPE_CHECKING:
    from fedstack.aggregator.driver import Replayed
    from fedstack.aggregator.federation import Adopted
    from fedstack.aggregator.registry import Session
    from fedstack.aggregator.uploads import Planned
    from fedstack.store import UploadRecord


@dataclass(eq=False)
class AgentJoined:
    """An authenticated agent is ready to count (``reply``: set once it counts)."""

    session: Session
    reply: asyncio.Future[None]


@dataclass(eq=False)
class AgentLeft:
    """``session`` stopped counting (it left, went silent, or was disconnected)."""

    session: Session


@dataclass(eq=False)
class FederationStarted:
    """The first model was stored: the federation starts at version 0 (or, for a member
    of a federation that another member started, at the run's ``version``)."""

    structure: list[tuple[str, str, tuple[int, ...]]]
    weights: Weights
    model_id: str
    reply: asyncio.Future[None]
    version: int = 0


@dataclass(eq=False)
class UploadReceived:
    """A validated upload (its blob, if any, already written) waits to be persisted.

    ``reply`` resolves with the message to send back (the ack or an error) once the upload
    is stored and counted, or with an exception if it could not be stored."""

    session: Session
    msg: ModelUpload
    blob: tuple[str, int] | None
    reply: asyncio.Future[Message] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


@dataclass(eq=False)
class PollReceived:
    """``session`` asks for a newer global model, waiting up to ``msg.wait`` seconds."""

    session: Session
    msg: Poll


@dataclass(eq=False)
class BatchCommitted:
    """A batch of uploads is stored (and fed to the accumulator): count and answer them.

    ``results`` holds, per planned upload, (stored record, stored by this batch, the
    accumulator's refusal or None); ``error`` is set instead if the batch failed."""

    batch: list[Planned]
    results: list[tuple[UploadRecord, bool, str | None]]
    error: BaseException | None = None


@dataclass(eq=False)
class RoundCommitted:
    """The round in progress is aggregated and stored as ``model_id`` (or failed).

    ``version`` is the global version to adopt when it is not ``round`` (a federation's
    asynchronous synthesis may jump versions; None: ``round``)."""

    round: int
    result: Result | None
    model_id: str
    finished_wall: float
    error: BaseException | None = None
    rebuilt: Replayed | None = None  # a fresh accumulator after a broken one
    version: int | None = None
    metrics: Metrics | None = None  # the round's metrics as stored (None: not known)


@dataclass(eq=False)
class GlobalAdvanced:
    """Federation: the run's global version moved past this member's (others synthesised
    it): adopt ``adopted`` once no round of this member is being aggregated.

    ``recheck``: ``adopted`` is the member's current global model; the round in progress
    is rebuilt from the uploads the member still holds (after a heartbeat gap, others may
    have claimed some)."""

    adopted: Adopted
    recheck: bool = False


@dataclass(eq=False)
class Followed:
    """Federation: the in-progress contributions were carried into the round after
    ``adopted`` (``replayed``: the new round's accumulator), or ``error``."""

    adopted: Adopted
    replayed: Replayed | None
    error: BaseException | None = None


@dataclass(eq=False)
class UploadsClaimed:
    """Federation: buffered uploads that a dead member held, of agents connected here,
    are now held by this member (not counted yet)."""

    records: list[UploadRecord]


@dataclass(eq=False)
class ClaimsAbsorbed:
    """Federation: claimed uploads fed to the round's accumulator (``added``), or
    ``error`` (they stay claimed and buffered: the next resume replays them)."""

    added: list[UploadRecord]
    error: BaseException | None = None


@dataclass(eq=False)
class DeadlineFired:
    """Time passed: act on the round deadline, expired polls and retries now."""


@dataclass(eq=False)
class Excused:
    """Federation: ``agents`` (connected here) contributed to ``round`` through another
    member before they moved here (see ``RoundState.excused``)."""

    round: int
    agents: set[str]


@dataclass(eq=False)
class BarrierOpened:
    """Sync synthesis: every live member's cluster is complete for ``round`` (or the
    wait timed out): this member may deliver its semi-global model of ``round``."""

    round: int


@dataclass(eq=False)
class SecAggMessage:
    """Secure aggregation: a message of its session from agent ``session``."""

    session: Session
    msg: Message


@dataclass(eq=False)
class SecAggWelcomed:
    """Secure aggregation: ``session`` was welcomed (it learns the attempt in progress)."""

    session: Session


Event = (
    DeadlineFired
    | SecAggMessage
    | SecAggWelcomed
    | AgentJoined
    | AgentLeft
    | FederationStarted
    | UploadReceived
    | PollReceived
    | BatchCommitted
    | RoundCommitted
    | GlobalAdvanced
    | Followed
    | UploadsClaimed
    | ClaimsAbsorbed
    | Excused
    | BarrierOpened
)
