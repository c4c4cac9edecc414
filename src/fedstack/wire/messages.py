"""The closed set of typed messages exchanged between agents and aggregators.

Every message is a frozen dataclass. Fields are validated on decode by the codec from the
annotations below; the book's list-position messages (``fl_main/lib/util/messengers.py``)
map onto them as follows:

=====================  ==============================================================
book                   fedstack
=====================  ==============================================================
PARTICIPATE            :class:`Participate` (agent name, credential, initial model)
WELCOME                :class:`Welcome` (agent id, current global model, version)
UPDATE (agent)         :class:`ModelUpload` (+ base version, sample count, metrics)
-                      :class:`UploadAck` (persist-before-acknowledge)
UPDATE (aggregator)    :class:`GlobalModel` (version = round it completes)
-                      ``extra``: named arrays beside the model, both ways (FedCurv
                       statistics, SCAFFOLD control variates, ...); ``Welcome.config``:
                       the federation's settings for agents (e.g. FedProx's mu)
POLLING                :class:`Poll` (known version; optional long-poll wait)
ACK                    :class:`NotReady`
-                      :class:`Error`, :class:`Heartbeat`, :class:`Bye`
-                      secure aggregation (SecAgg+, ``fedstack aggregator --secagg``):
                       :class:`SecAggStart`, :class:`SecAggKeys`, :class:`SecAggRoster`,
                       :class:`SecAggShares`, :class:`SecAggForward`, the masked
                       :class:`ModelUpload`, :class:`SecAggUnmask`,
                       :class:`SecAggUnmaskShares`, :class:`SecAggAbort`
=====================  ==============================================================

Secure aggregation's masked input travels as a :class:`ModelUpload` whose model is the one
array ``{"secagg/masked": uint32[P+1]}`` and whose metrics hold only ``secagg_session``:
it is stored (persisted before acknowledged) like any upload. Keys, commitments and
ciphertexts are ``bytes`` fields (bounded by the codec); share maps are bounded maps of
agent id -> ciphertext.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from fedstack.types import Metrics, Weights

PROTOCOL_VERSION = 1

AgentIds = list[str]
"""A list of agent ids of a secure-aggregation session (bounded by the codec's
``MAX_IDS``, longer than ``list[str]``'s bound)."""
ByteMap = dict[str, bytes]
"""Agent id -> bytes (a share map: bounded entries, each value bounded)."""
IntMap = dict[str, int]
"""Agent id -> integer (Shamir indices)."""

SECAGG_MASKED = "secagg/masked"
"""The one tensor of a masked upload: uint32[P+1]."""
SECAGG_SESSION = "secagg_session"
"""The metric of a masked upload naming its session."""


@dataclass(frozen=True, kw_only=True)
class Message:
    """Base of every wire message; ``TYPE`` is its tag on the wire."""

    TYPE: ClassVar[str] = ""


@dataclass(frozen=True, kw_only=True)
class Participate(Message):
    """Agent -> aggregator: join (or re-join) the federation."""

    TYPE: ClassVar[str] = "participate"
    agent_name: str
    token: str | None = None
    enrollment: str | None = None
    """The deployment's shared enrollment token: lets a NEW name register with ``token``."""
    model: Weights | None = None
    init_weights: bool | None = None
    num_samples: int = 1
    metrics: Metrics = field(default_factory=dict)
    known_version: int = -1
    client: str = ""


@dataclass(frozen=True, kw_only=True)
class Welcome(Message):
    """Aggregator -> agent: registration accepted; the current global model."""

    TYPE: ClassVar[str] = "welcome"
    agent_id: str
    aggregator_id: str
    run_id: str
    version: int
    round: int
    model_id: str
    model: Weights | None
    delivery: str
    finished: bool = False
    heartbeat_interval: float = 5.0
    config: Metrics = field(default_factory=dict)
    extra: Weights | None = None
    aggregators: list[str] = field(default_factory=list)
    """The URLs of the federation's other live aggregators (where to fail over to)."""


@dataclass(frozen=True, kw_only=True)
class ModelUpload(Message):
    """Agent -> aggregator: a locally trained model."""

    TYPE: ClassVar[str] = "upload"
    upload_id: str
    base_version: int
    num_samples: int
    metrics: Metrics = field(default_factory=dict)
    model: Weights
    extra: Weights | None = None


@dataclass(frozen=True, kw_only=True)
class UploadAck(Message):
    """Aggregator -> agent: the upload is stored (``status`` says what became of it)."""

    TYPE: ClassVar[str] = "upload_ack"
    upload_id: str
    status: str
    round: int
    message: str = ""


@dataclass(frozen=True, kw_only=True)
class GlobalModel(Message):
    """Aggregator -> agent: a global model (pushed, or the answer to a poll)."""

    TYPE: ClassVar[str] = "global_model"
    version: int
    model_id: str
    model: Weights
    final: bool = False
    extra: Weights | None = None


@dataclass(frozen=True, kw_only=True)
class Poll(Message):
    """Agent -> aggregator: is there a global model newer than ``known_version``?

    ``wait`` > 0 lets the aggregator hold the answer up to that many seconds until a new
    model exists (long polling), instead of answering :class:`NotReady` at once.
    """

    TYPE: ClassVar[str] = "poll"
    known_version: int
    wait: float = 0.0


@dataclass(frozen=True, kw_only=True)
class NotReady(Message):
    """Aggregator -> agent: no newer global model yet (the book's ``ack``)."""

    TYPE: ClassVar[str] = "not_ready"
    version: int
    round: int


@dataclass(frozen=True, kw_only=True)
class Error(Message):
    """Either direction: a request was refused. ``fatal`` means the sender will close."""

    TYPE: ClassVar[str] = "error"
    code: str
    message: str
    fatal: bool = False


@dataclass(frozen=True, kw_only=True)
class Heartbeat(Message):
    """Either direction: I am alive."""

    TYPE: ClassVar[str] = "heartbeat"
    seq: int = 0


@dataclass(frozen=True, kw_only=True)
class Bye(Message):
    """Either direction: I am leaving; close after this."""

    TYPE: ClassVar[str] = "bye"
    reason: str = ""


@dataclass(frozen=True, kw_only=True)
class SecAggStart(Message):
    """Aggregator -> agent: secure-aggregation session ``session`` collects keys for
    ``round`` (agents that trained on version ``round - 1`` advertise)."""

    TYPE: ClassVar[str] = "secagg_start"
    session: str
    round: int


@dataclass(frozen=True, kw_only=True)
class SecAggKeys(Message):
    """Agent -> aggregator (phase 1, advertise): two X25519 public keys and the commitment
    SHA-256(session|agent_id|b) to the self-mask seed (32 bytes each)."""

    TYPE: ClassVar[str] = "secagg_keys"
    session: str
    c_pk: bytes
    s_pk: bytes
    b_commit: bytes


@dataclass(frozen=True, kw_only=True)
class SecAggRoster(Message):
    """Aggregator -> agent (phase 1 closed): the agent's neighbours' public keys
    (c_pk|s_pk|b_commit, 96 bytes each), the Shamir threshold and every holder's index."""

    TYPE: ClassVar[str] = "secagg_roster"
    session: str
    threshold: int
    keys: ByteMap
    index: IntMap


@dataclass(frozen=True, kw_only=True)
class SecAggShares(Message):
    """Agent -> aggregator (phase 2): recipient id -> encrypted share of (b, s_sk)."""

    TYPE: ClassVar[str] = "secagg_shares"
    session: str
    shares: ByteMap


@dataclass(frozen=True, kw_only=True)
class SecAggForward(Message):
    """Aggregator -> agent (phase 2 closed): sender id -> the ciphertext it addressed to
    this agent (senders that completed phase 2 only)."""

    TYPE: ClassVar[str] = "secagg_forward"
    session: str
    shares: ByteMap


@dataclass(frozen=True, kw_only=True)
class SecAggUnmask(Message):
    """Aggregator -> agent (phase 4): the masked inputs of ``survivors`` arrived, those of
    ``dropped`` did not: send the shares that remove their masks."""

    TYPE: ClassVar[str] = "secagg_unmask"
    session: str
    survivors: AgentIds
    dropped: AgentIds


@dataclass(frozen=True, kw_only=True)
class SecAggUnmaskShares(Message):
    """Agent -> aggregator (phase 4): b shares of survivors, s_sk shares of dropped."""

    TYPE: ClassVar[str] = "secagg_unmask_shares"
    session: str
    b_shares: ByteMap
    sk_shares: ByteMap


@dataclass(frozen=True, kw_only=True)
class SecAggAbort(Message):
    """Aggregator -> agent: session ``session`` failed (``code``, ``reason``); nothing of
    it is used. The agent keeps its trained update for the next attempt."""

    TYPE: ClassVar[str] = "secagg_abort"
    session: str
    code: str
    reason: str = ""


SECAGG_TYPES: tuple[type[Message], ...] = (
    SecAggStart,
    SecAggKeys,
    SecAggRoster,
    SecAggShares,
    SecAggForward,
    SecAggUnmask,
    SecAggUnmaskShares,
    SecAggAbort,
)
"""The messages that exist only in a federation running secure aggregation."""

_ALL_TYPES: tuple[type[Message], ...] = (
    Participate,
    Welcome,
    ModelUpload,
    UploadAck,
    GlobalModel,
    Poll,
    NotReady,
    Error,
    Heartbeat,
    Bye,
    *SECAGG_TYPES,
)
MESSAGE_TYPES: dict[str, type[Message]] = {cls.TYPE: cls for cls in _ALL_TYPES}
