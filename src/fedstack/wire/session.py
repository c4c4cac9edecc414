"""The protocol session: which message may come when, for either end. No I/O.

One :class:`AggregatorSession` or :class:`AgentSession` stands for one connection (an
:class:`AgentSession` is reused across the reconnections of one agent, see
:meth:`AgentSession.reconnect`). It never touches a socket: the I/O adapter feeds it what
arrived and sends what it returns.

* ``receive(msg)`` (or ``receive_bytes(data)``, which decodes with the session's
  :class:`~fedstack.wire.codec.Limits`) checks that ``msg`` is legal now, moves the state
  and returns an :class:`Event` saying what happened.
* ``send(msg)`` checks that ``msg`` may go out now, moves the state and returns the encoded
  parts to write (:func:`fedstack.wire.codec.encode` stays the only encoder);
  ``send_encoded(kind, parts)`` does the same for a message encoded once and shared (the
  global model of a fan-out).

Which message is legal in which state is ONE table, :data:`TRANSITIONS`, keyed by (role,
state); each entry maps (direction, message kind) to the next state. A fatal
:class:`~fedstack.wire.messages.Error` is its own kind (:data:`FATAL_ERROR`) because it
ends the session. What the table does not list is illegal: received, it raises
:class:`~fedstack.errors.RemoteProtocolError` (``code`` ``expected-participate`` for an
aggregator's first message, else ``unexpected-message``) and the session moves to
``FAILED``, where only a fatal error (or ``bye``) may still be sent (a CLOSED session stays
CLOSED); sent, it raises
:class:`~fedstack.errors.LocalProtocolError` and the state does not change.

Aggregator side::

    AWAITING_PARTICIPATE --participate--> REGISTERING --welcome--> JOINED --bye--> CLOSED
    (an error instead of the welcome, or a fatal error or bye at any time -> CLOSED)

Agent side::

    IDLE --participate--> AWAITING_WELCOME --welcome--> JOINED --bye/fatal error--> CLOSED
    (an error instead of the welcome -> CLOSED)

The agent session also keeps what outlives one connection: the latest global version, the
upload awaiting acknowledgement, the federation's model structure, and THE stale-upload
rule (:meth:`AgentSession.is_stale`). It validates what a possibly hostile aggregator sends
(:meth:`AgentSession.receive`): a model of another structure, NaN or infinite values,
absurd or backward versions and heartbeat intervals are refused with a
:class:`~fedstack.errors.RemoteProtocolError` instead of reaching training.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from fedstack.errors import LocalProtocolError, RemoteProtocolError
from fedstack.types import Metrics, Weights
from fedstack.wire import tensors
from fedstack.wire.codec import DEFAULT_LIMITS, Limits, decode, encode
from fedstack.wire.messages import (
    Bye,
    Error,
    GlobalModel,
    Heartbeat,
    Message,
    ModelUpload,
    NotReady,
    Participate,
    Poll,
    SecAggAbort,
    SecAggForward,
    SecAggKeys,
    SecAggRoster,
    SecAggShares,
    SecAggStart,
    SecAggUnmask,
    SecAggUnmaskShares,
    UploadAck,
    Welcome,
)
from fedstack.wire.segments import Segments

__all__ = [
    "AUTH_ERRORS",
    "FATAL_ERROR",
    "MAX_HEARTBEAT_INTERVAL",
    "MAX_VERSION",
    "MIN_HEARTBEAT_INTERVAL",
    "MODEL_MISMATCH",
    "REGISTRATION_REFUSALS",
    "TRANSITIONS",
    "AgentSession",
    "AggregatorSession",
    "Direction",
    "Event",
    "GlobalModelReceived",
    "HeartbeatReceived",
    "Left",
    "NotReadyReceived",
    "ParticipateReceived",
    "PollReceived",
    "Refused",
    "RequestRefused",
    "Role",
    "SecAggReceived",
    "State",
    "UploadAcknowledged",
    "UploadReceived",
    "Welcomed",
    "kind_of",
]

Parts = list[bytes | memoryview]

AUTH_ERRORS = frozenset({"revoked", "auth-required", "bad-credential", "weak-token"})
"""Fatal error codes after which an agent stops instead of reconnecting."""

MODEL_MISMATCH = "model-mismatch"
"""The code refusing an agent whose model has other names, shapes or dtypes than the
federation's (the operator's registered base model or the first agent's)."""

REGISTRATION_REFUSALS = AUTH_ERRORS | {"refused", "bad-name", MODEL_MISMATCH}
"""Error codes answering ``participate`` that no retry can fix (others, e.g.
``unavailable``, are transient)."""

UPLOAD_REFUSALS = frozenset({"invalid-model", "quota-exceeded"})
"""Non-fatal error codes answering an upload that sending it again cannot fix: the agent
drops that upload."""

MAX_VERSION = 2**53
"""Largest global-model version an agent accepts (exact as a float, as JSON needs)."""

MIN_HEARTBEAT_INTERVAL = 0.01
MAX_HEARTBEAT_INTERVAL = 86400.0
"""Heartbeat intervals an agent accepts from a welcome, seconds."""


class Role(enum.StrEnum):
    AGENT = "agent"
    AGGREGATOR = "aggregator"


class State(enum.StrEnum):
    IDLE = "idle"
    """Agent: nothing sent on this connection yet."""
    AWAITING_PARTICIPATE = "awaiting-participate"
    """Aggregator: nothing received yet."""
    AWAITING_WELCOME = "awaiting-welcome"
    """Agent: ``participate`` sent."""
    REGISTERING = "registering"
    """Aggregator: ``participate`` received, no answer sent yet."""
    JOINED = "joined"
    FAILED = "failed"
    """The peer broke the protocol; only a fatal error (or ``bye``) may still be sent."""
    CLOSED = "closed"


class Direction(enum.StrEnum):
    IN = "in"
    OUT = "out"


FATAL_ERROR = "error/fatal"
"""The table's kind for an :class:`Error` with ``fatal=True`` (it ends the session)."""

_IN, _OUT = Direction.IN, Direction.OUT
_ERR, _GM, _ACK = Error.TYPE, GlobalModel.TYPE, UploadAck.TYPE
_HB, _BYE, _NR = Heartbeat.TYPE, Bye.TYPE, NotReady.TYPE
_SECAGG_UP = (SecAggKeys.TYPE, SecAggShares.TYPE, SecAggUnmaskShares.TYPE)
_SECAGG_DOWN = (
    SecAggStart.TYPE,
    SecAggRoster.TYPE,
    SecAggForward.TYPE,
    SecAggUnmask.TYPE,
    SecAggAbort.TYPE,
)
SECAGG_KINDS = frozenset(_SECAGG_UP + _SECAGG_DOWN)
"""The secure-aggregation messages: legal only once joined, and only in a federation
running secure aggregation (the aggregator's session has ``secagg`` set; the agent's
welcome config has ``secagg``). Which of them is expected WHEN within a round is the
secure-aggregation session's business (``fedstack.aggregator.secagg``): a message out
of phase there is refused with a non-fatal error, not a protocol failure."""

TRANSITIONS: dict[tuple[Role, State], dict[tuple[Direction, str], State]] = {
    (Role.AGGREGATOR, State.AWAITING_PARTICIPATE): {
        (_IN, Participate.TYPE): State.REGISTERING,
        (_OUT, _ERR): State.CLOSED,
        (_OUT, FATAL_ERROR): State.CLOSED,
    },
    (Role.AGGREGATOR, State.REGISTERING): {
        (_IN, _BYE): State.CLOSED,
        (_OUT, Welcome.TYPE): State.JOINED,
        (_OUT, _ERR): State.CLOSED,
        (_OUT, FATAL_ERROR): State.CLOSED,
    },
    (Role.AGGREGATOR, State.JOINED): {
        (_IN, ModelUpload.TYPE): State.JOINED,
        (_IN, Poll.TYPE): State.JOINED,
        (_IN, _HB): State.JOINED,
        (_IN, _BYE): State.CLOSED,
        (_OUT, _GM): State.JOINED,
        (_OUT, _ACK): State.JOINED,
        (_OUT, _NR): State.JOINED,
        (_OUT, _HB): State.JOINED,
        (_OUT, _ERR): State.JOINED,
        (_OUT, FATAL_ERROR): State.CLOSED,
        (_OUT, _BYE): State.CLOSED,
        **{(_IN, k): State.JOINED for k in _SECAGG_UP},
        **{(_OUT, k): State.JOINED for k in _SECAGG_DOWN},
    },
    (Role.AGGREGATOR, State.FAILED): {
        (_OUT, FATAL_ERROR): State.CLOSED,
        (_OUT, _BYE): State.CLOSED,
    },
    (Role.AGGREGATOR, State.CLOSED): {},
    (Role.AGENT, State.IDLE): {
        (_OUT, Participate.TYPE): State.AWAITING_WELCOME,
    },
    (Role.AGENT, State.AWAITING_WELCOME): {
        (_IN, Welcome.TYPE): State.JOINED,
        (_IN, _ERR): State.CLOSED,
        (_IN, FATAL_ERROR): State.CLOSED,
        (_OUT, _BYE): State.CLOSED,
    },
    (Role.AGENT, State.JOINED): {
        (_IN, _GM): State.JOINED,
        (_IN, _ACK): State.JOINED,
        (_IN, _NR): State.JOINED,
        (_IN, _HB): State.JOINED,
        (_IN, _ERR): State.JOINED,
        (_IN, FATAL_ERROR): State.CLOSED,
        (_IN, _BYE): State.CLOSED,
        (_OUT, ModelUpload.TYPE): State.JOINED,
        (_OUT, Poll.TYPE): State.JOINED,
        (_OUT, _HB): State.JOINED,
        (_OUT, _BYE): State.CLOSED,
        **{(_IN, k): State.JOINED for k in _SECAGG_DOWN},
        **{(_OUT, k): State.JOINED for k in _SECAGG_UP},
    },
    (Role.AGENT, State.FAILED): {
        (_OUT, _BYE): State.CLOSED,
    },
    (Role.AGENT, State.CLOSED): {},
}
"""THE protocol: (role, state) -> {(direction, message kind): next state}."""


def kind_of(msg: Message) -> str:
    """The table's name for ``msg``: its wire type, or :data:`FATAL_ERROR`."""
    if isinstance(msg, Error) and msg.fatal:
        return FATAL_ERROR
    return msg.TYPE


# ---------------------------------------------------------------------- events
@dataclass(frozen=True, slots=True)
class Event:
    """Something a received message means for the session's owner."""


@dataclass(frozen=True, slots=True)
class ParticipateReceived(Event):
    """Aggregator: an agent asks to join; answer with ``welcome`` or a fatal ``error``."""

    message: Participate


@dataclass(frozen=True, slots=True)
class UploadReceived(Event):
    """Aggregator: a trained model; answer with ``upload_ack`` or an ``error``."""

    message: ModelUpload


@dataclass(frozen=True, slots=True)
class SecAggReceived(Event):
    """Either side: a secure-aggregation message (legal now; its content is checked by
    the secure-aggregation session it names)."""

    message: Message


@dataclass(frozen=True, slots=True)
class PollReceived(Event):
    """Aggregator: answer with ``global_model`` or ``not_ready`` (within ``wait`` s)."""

    message: Poll


@dataclass(frozen=True, slots=True)
class HeartbeatReceived(Event):
    """Either side: the peer is alive. ``reply`` is what to send back (None: nothing)."""

    message: Heartbeat
    reply: Heartbeat | None


@dataclass(frozen=True, slots=True)
class Left(Event):
    """Either side: the peer said ``bye``; the session is closed."""

    reason: str


@dataclass(frozen=True, slots=True)
class Welcomed(Event):
    """Agent: registration accepted. ``new_model``: the welcome carries a global model
    newer than the one known (now :attr:`AgentSession.known_version`)."""

    message: Welcome
    new_model: bool


@dataclass(frozen=True, slots=True)
class Refused(Event):
    """Agent: the aggregator refused registration, or ended the session with a fatal
    error. ``permanent``: reconnecting cannot help (a credential or name problem)."""

    error: Error
    permanent: bool


@dataclass(frozen=True, slots=True)
class RequestRefused(Event):
    """Agent: the aggregator refused one request and keeps the session.
    ``dropped_upload``: the id of the pending upload it refused (no longer pending)."""

    error: Error
    dropped_upload: str | None


@dataclass(frozen=True, slots=True)
class GlobalModelReceived(Event):
    """Agent: a global model. ``new``: newer than every one before (a repeat is not)."""

    message: GlobalModel
    new: bool


@dataclass(frozen=True, slots=True)
class UploadAcknowledged(Event):
    """Agent: an upload is stored. ``matched``: it is the pending upload (now cleared)."""

    message: UploadAck
    matched: bool


@dataclass(frozen=True, slots=True)
class NotReadyReceived(Event):
    """Agent: a poll found no newer global model (poll again)."""

    message: NotReady


# ---------------------------------------------------------------------- sessions
class _Session:
    """The table-driven core shared by both roles."""

    role: Role

    def __init__(self, state: State, limits: Limits) -> None:
        self.state = state
        self.limits = limits

    def _advance(self, direction: Direction, msg: Message) -> None:
        nxt = TRANSITIONS[(self.role, self.state)].get((direction, kind_of(msg)))
        if nxt is not None and msg.TYPE in SECAGG_KINDS and not self.secagg_enabled:
            if direction is _IN and self.state is State.JOINED:
                self.state = State.FAILED
                raise RemoteProtocolError(
                    f"unexpected {msg.TYPE} message: this federation does not run secure "
                    "aggregation",
                    code="unexpected-message",
                )
            nxt = None
        if nxt is not None:
            self.state = nxt
            return
        if direction is _OUT:
            raise LocalProtocolError(
                f"{self.role} may not send {kind_of(msg)} in state {self.state}"
            )
        before = self.state
        if before is not State.CLOSED:  # CLOSED stays the end
            self.state = State.FAILED
        if before is State.AWAITING_PARTICIPATE:
            raise RemoteProtocolError(
                "the first message must be participate", code="expected-participate"
            )
        if before is State.AWAITING_WELCOME:
            raise RemoteProtocolError(f"expected welcome, got {msg.TYPE}")
        if self.role is Role.AGGREGATOR:
            raise RemoteProtocolError(
                f"unexpected {msg.TYPE} message from an agent", code="unexpected-message"
            )
        raise RemoteProtocolError(
            f"unexpected {msg.TYPE} message from the aggregator (session {before})",
            code="unexpected-message",
        )

    secagg_enabled = False

    def can_send(self, msg: Message) -> bool:
        """Whether ``msg`` may be sent now."""
        if msg.TYPE in SECAGG_KINDS and not self.secagg_enabled:
            return False
        return (_OUT, kind_of(msg)) in TRANSITIONS[(self.role, self.state)]

    def can_receive(self, msg: Message) -> bool:
        """Whether ``msg`` would be legal if it arrived now (its content unchecked)."""
        if msg.TYPE in SECAGG_KINDS and not self.secagg_enabled:
            return False
        return (_IN, kind_of(msg)) in TRANSITIONS[(self.role, self.state)]

    def send(self, msg: Message) -> Parts:
        """Check that ``msg`` may go out now, move the state, return its encoded parts.

        Raises:
            LocalProtocolError: ``msg`` is not legal in this state (nothing changes).
        """
        if not self.can_send(msg):
            self._advance(_OUT, msg)  # raises
        parts = encode(msg, self.limits)
        self._advance(_OUT, msg)
        self._sent(msg)
        return parts

    def send_encoded(self, msg_type: type[Message], parts: Parts) -> Parts:
        """:meth:`send` for a message already encoded (e.g. shared by a fan-out): checks
        that a ``msg_type`` message (never a fatal error) may go out and returns ``parts``.

        Raises:
            LocalProtocolError: not legal in this state.
        """
        nxt = TRANSITIONS[(self.role, self.state)].get((_OUT, msg_type.TYPE))
        if msg_type.TYPE in SECAGG_KINDS and not self.secagg_enabled:
            nxt = None
        if nxt is None:
            raise LocalProtocolError(
                f"{self.role} may not send {msg_type.TYPE} in state {self.state}"
            )
        self.state = nxt
        return parts

    def receive_bytes(self, data: bytes | bytearray | memoryview | Segments) -> Event:
        """Decode ``data`` with the session's limits, then :meth:`receive` it.

        Raises:
            RemoteProtocolError: the bytes are no valid message, or it is not legal now.
        """
        try:
            msg = decode(data, self.limits)
        except RemoteProtocolError:
            if self.state is not State.CLOSED:
                self.state = State.FAILED
            raise
        return self.receive(msg)

    def receive(self, msg: Message) -> Event:  # pragma: no cover - overridden
        raise NotImplementedError

    def _sent(self, msg: Message) -> None:
        """Bookkeeping after ``msg`` went out (the role's own)."""


class AggregatorSession(_Session):
    """The aggregator's end of one agent connection.

    Call :meth:`receive` (or :meth:`receive_bytes`) with each message that arrives, in
    order, and act on the returned event; send every reply through :meth:`send` (or
    :meth:`send_encoded`), which refuses what the protocol does not allow.
    """

    role = Role.AGGREGATOR

    def __init__(self, limits: Limits = DEFAULT_LIMITS, *, secagg: bool = False) -> None:
        super().__init__(State.AWAITING_PARTICIPATE, limits)
        self.secagg_enabled = secagg
        """The federation runs secure aggregation: its messages are legal once joined."""

    @property
    def welcomed(self) -> bool:
        """True once the welcome went out (and the session is not over)."""
        return self.state is State.JOINED

    def receive(self, msg: Message) -> Event:
        """The event ``msg`` means.

        Raises:
            RemoteProtocolError: ``msg`` is not legal now (``code``
                ``expected-participate`` or ``unexpected-message``); the session is then
                ``FAILED``: send the fatal error reply.
        """
        self._advance(_IN, msg)
        if isinstance(msg, ModelUpload):
            return UploadReceived(msg)
        if isinstance(msg, Poll):
            return PollReceived(msg)
        if isinstance(msg, Heartbeat):
            return HeartbeatReceived(msg, Heartbeat(seq=msg.seq))
        if isinstance(msg, Participate):
            return ParticipateReceived(msg)
        if msg.TYPE in SECAGG_KINDS:
            return SecAggReceived(msg)
        assert isinstance(msg, Bye)
        return Left(msg.reason)


class AgentSession(_Session):
    """The agent's end: one object for the agent's life, reset per connection by
    :meth:`reconnect`.

    Args:
        limits: what :meth:`receive_bytes` accepts.
        check_values: refuse global models holding NaN or infinity (one pass over the
            model). An aggregator in the same process is trusted: the simulator turns
            this off.

    Attributes:
        known_version: the latest global-model version received (-1: none yet).
        pending: the upload awaiting acknowledgement (kept across reconnections).
        delivery, config, agent_id, aggregator_id, run_id, heartbeat_interval: from the
            latest welcome.
    """

    role = Role.AGENT

    def __init__(self, limits: Limits = DEFAULT_LIMITS, *, check_values: bool = True) -> None:
        super().__init__(State.IDLE, limits)
        self.check_values = check_values
        self.known_version = -1
        self.pending: ModelUpload | None = None
        self.sent_upload: str | None = None
        self.polled_version: int | None = None
        self.delivery = "push"
        self.config: Metrics = {}
        self.agent_id: str | None = None
        self.aggregator_id: str | None = None
        self.run_id: str | None = None
        self.heartbeat_interval = 5.0
        self.structure: list[tuple[str, str, tuple[int, ...]]] | None = None
        """The federation's model structure (names, dtypes, shapes): fixed by the first
        global model received in a run; every later one must have it."""

    # ------------------------------------------------------------------ agent state
    def reconnect(self) -> None:
        """Start over on a new connection (state IDLE); what the agent knows stays."""
        self.state = State.IDLE
        self.sent_upload = None
        self.polled_version = None

    @property
    def discard_stale(self) -> bool:
        """The federation's ``discard_stale`` setting (default true)."""
        return bool(self.config.get("discard_stale", True))

    def is_stale(self, base_version: int, *, restored: bool = False) -> bool:
        """THE stale-upload rule: a model trained on ``base_version`` is discarded when a
        newer global model arrived and the federation discards stale uploads
        (``discard_stale``, default true; asynchronous strategies turn it off). An upload
        restored after a restart is judged so only with push delivery (with polling the
        aggregator's staleness policy decides)."""
        if restored and self.delivery != "push":
            return False
        return self.discard_stale and self.known_version > base_version

    def queue_upload(self, upload: ModelUpload) -> None:
        """Make ``upload`` the one awaiting acknowledgement (it replaces any other)."""
        self.pending = upload

    def drop_upload(self, upload_id: str | None = None) -> bool:
        """Forget the pending upload (only if it is ``upload_id``, when given)."""
        if self.pending is None or (upload_id is not None and self.pending.upload_id != upload_id):
            return False
        self.pending = None
        return True

    def upload_to_send(self) -> ModelUpload | None:
        """The pending upload if this connection has not sent it yet."""
        up = self.pending
        if up is None or up.upload_id == self.sent_upload or self.state is not State.JOINED:
            return None
        return up

    def poll_due(self) -> bool:
        """Whether to send a poll now (polling delivery, nothing pending, the known
        version not asked about yet on this connection)."""
        return (
            self.state is State.JOINED
            and self.delivery == "poll"
            and self.pending is None
            and self.polled_version != self.known_version
        )

    def participate(
        self,
        name: str,
        *,
        token: str | None,
        enrollment: str | None,
        model: Weights | None,
        init_weights: bool,
        num_samples: int,
        metrics: Metrics,
        client: str,
    ) -> Participate:
        """The ``participate`` for this connection (the model only if none is known)."""
        return Participate(
            agent_name=name,
            token=token,
            enrollment=enrollment,
            model=model if self.known_version < 0 else None,
            init_weights=init_weights,
            num_samples=num_samples,
            metrics=metrics,
            known_version=self.known_version,
            client=client,
        )

    def _sent(self, msg: Message) -> None:
        if isinstance(msg, ModelUpload):
            self.sent_upload = msg.upload_id
        elif isinstance(msg, Poll):
            self.polled_version = msg.known_version

    # ------------------------------------------------------------------ receive
    def receive(self, msg: Message) -> Event:
        """The event ``msg`` means, after checking it.

        Raises:
            RemoteProtocolError: ``msg`` is not legal now (``unexpected-message``), or
                carries what no honest aggregator sends (``invalid-model``: a model of
                another structure or with NaN/infinity; ``bad-field``: an absurd or
                backward version, an absurd heartbeat interval). The session is then
                ``FAILED``; the agent should drop the connection.
        """
        legal = self.can_receive(msg)
        if legal:
            try:
                self._check(msg)
            except RemoteProtocolError:
                self.state = State.FAILED
                raise
        was = self.state
        self._advance(_IN, msg)  # raises if not legal
        if isinstance(msg, GlobalModel):
            new = msg.version > self.known_version
            if new:
                self.known_version = msg.version
            if self.structure is None:
                self.structure = tensors.structure(msg.model)
            self.polled_version = None
            return GlobalModelReceived(msg, new)
        if isinstance(msg, UploadAck):
            return UploadAcknowledged(msg, self.drop_upload(msg.upload_id))
        if isinstance(msg, NotReady):
            self.polled_version = None
            return NotReadyReceived(msg)
        if isinstance(msg, Heartbeat):
            return HeartbeatReceived(msg, None)
        if isinstance(msg, Error):
            if was is State.AWAITING_WELCOME:
                return Refused(msg, msg.code in REGISTRATION_REFUSALS)
            if msg.fatal:
                return Refused(msg, msg.code in AUTH_ERRORS)
            dropped = None
            if msg.code in UPLOAD_REFUSALS and self.pending is not None:
                dropped, self.pending = self.pending.upload_id, None
            return RequestRefused(msg, dropped)
        if isinstance(msg, Welcome):
            return self._welcomed(msg)
        if msg.TYPE in SECAGG_KINDS:
            return SecAggReceived(msg)
        assert isinstance(msg, Bye)
        return Left(msg.reason)

    def _welcomed(self, w: Welcome) -> Welcomed:
        if self.run_id is not None and w.run_id != self.run_id:
            self.structure = None  # another run: its own model
        if self.structure is None and w.model is not None:
            self.structure = tensors.structure(w.model)
        self.agent_id, self.aggregator_id, self.run_id = w.agent_id, w.aggregator_id, w.run_id
        self.delivery = w.delivery
        self.config = dict(w.config)
        self.secagg_enabled = self.config.get("secagg") is True
        self.heartbeat_interval = w.heartbeat_interval
        new = w.model is not None and w.version > self.known_version
        if new:
            self.known_version = w.version
        return Welcomed(w, new)

    def _check(self, msg: Message) -> None:
        """Refuse what a hostile aggregator could send to hurt the agent."""

        def bad(why: str, code: str = "bad-field") -> RemoteProtocolError:
            return RemoteProtocolError(f"the aggregator sent {msg.TYPE} {why}", code=code)

        if isinstance(msg, Welcome):
            if not -1 <= msg.version <= MAX_VERSION or not 0 <= msg.round <= MAX_VERSION + 1:
                raise bad(f"with an absurd version {msg.version} (round {msg.round})")
            if not MIN_HEARTBEAT_INTERVAL <= msg.heartbeat_interval <= MAX_HEARTBEAT_INTERVAL:
                raise bad(
                    f"with heartbeat_interval {msg.heartbeat_interval} s, outside "
                    f"{MIN_HEARTBEAT_INTERVAL}..{MAX_HEARTBEAT_INTERVAL:.0f} s"
                )
            if msg.delivery not in ("push", "poll"):
                raise bad(f"with an unknown delivery {msg.delivery[:20]!r}")
            for url in msg.aggregators:
                if not url.startswith(("ws://", "wss://", "inproc://")) or not url.isprintable():
                    raise bad(f"with an aggregator address that is not a URL: {url[:64]!r}")
            if msg.model is not None:
                structure = self.structure
                if self.run_id is not None and msg.run_id != self.run_id:
                    structure = None
                self._check_model(msg.model, msg.extra, structure)
        elif isinstance(msg, GlobalModel):
            if not 0 <= msg.version <= MAX_VERSION:
                raise bad(f"with an absurd version {msg.version}")
            if msg.version < self.known_version:
                raise bad(
                    f"version {msg.version}, older than version {self.known_version} it sent before"
                )
            self._check_model(msg.model, msg.extra, self.structure)

    def _check_model(
        self,
        model: Weights,
        extra: Weights | None,
        structure: Sequence[tuple[str, str, tuple[int, ...]]] | None,
    ) -> None:
        def refuse(why: str) -> RemoteProtocolError:
            return RemoteProtocolError(
                f"the aggregator sent a global model {why}; refused", code="invalid-model"
            )

        if not model:
            raise refuse("without tensors")
        if structure is not None:
            got = tensors.structure(model)
            if got != list(structure):
                raise refuse(
                    f"of another structure than the federation's: got "
                    f"{_describe(got)}, expected {_describe(structure)}"
                )
        if self.check_values:
            for name, arr in model.items():
                if not tensors.all_finite(arr):
                    raise refuse(f"whose tensor {name[:64]!r} holds NaN or infinity")
            for name, arr in (extra or {}).items():
                if not tensors.all_finite(arr):
                    raise refuse(f"whose extra array {name[:64]!r} holds NaN or infinity")


def _describe(structure: Sequence[tuple[str, str, tuple[int, ...]]], most: int = 4) -> str:
    items = [f"{n[:32]}{list(s)}:{d}" for n, d, s in structure[:most]]
    more = f" (+{len(structure) - most} more)" if len(structure) > most else ""
    return ", ".join(items) + more
