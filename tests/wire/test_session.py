"""The sans-I/O protocol session, through an in-memory connection pair (no sockets).

An :class:`AgentSession` is wired to an :class:`AggregatorSession`: what one side sends is
encoded by the codec, joined into bytes and fed to the other side's ``receive_bytes``.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pytest

from fedstack.errors import LocalProtocolError, RemoteProtocolError
from fedstack.wire import (
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
from fedstack.wire.session import (
    FATAL_ERROR,
    MAX_VERSION,
    SECAGG_KINDS,
    TRANSITIONS,
    AgentSession,
    AggregatorSession,
    Direction,
    Event,
    GlobalModelReceived,
    HeartbeatReceived,
    Left,
    NotReadyReceived,
    ParticipateReceived,
    PollReceived,
    Refused,
    RequestRefused,
    Role,
    State,
    UploadAcknowledged,
    UploadReceived,
    Welcomed,
    kind_of,
)

MODEL = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.zeros(3, np.float32)}


def model(delta: float = 0.0) -> dict[str, np.ndarray]:
    return {k: v + np.asarray(delta, v.dtype) for k, v in MODEL.items()}


def welcome(
    version: int = 0,
    *,
    with_model: bool = True,
    run: str = "run1",
    delivery: str = "push",
    interval: float = 5.0,
    **kw: Any,
) -> Welcome:
    return Welcome(
        agent_id="a" * 32,
        aggregator_id="agg",
        run_id=run,
        version=version,
        round=version + 1,
        model_id="m",
        model=model(version) if with_model else None,
        delivery=delivery,
        heartbeat_interval=interval,
        **kw,
    )


def upload(uid: str = "u1", base: int = 0) -> ModelUpload:
    return ModelUpload(upload_id=uid, base_version=base, num_samples=3, model=model(0.5))


SAMPLES: dict[str, Message] = {
    Participate.TYPE: Participate(agent_name="a1", model=model()),
    Welcome.TYPE: welcome(config={"secagg": True}),
    ModelUpload.TYPE: upload(),
    UploadAck.TYPE: UploadAck(upload_id="u1", status="accepted", round=1),
    GlobalModel.TYPE: GlobalModel(version=1, model_id="m1", model=model(1)),
    Poll.TYPE: Poll(known_version=0, wait=1.0),
    NotReady.TYPE: NotReady(version=0, round=1),
    Error.TYPE: Error(code="invalid-model", message="no"),
    FATAL_ERROR: Error(code="revoked", message="gone", fatal=True),
    Heartbeat.TYPE: Heartbeat(seq=3),
    Bye.TYPE: Bye(reason="done"),
    SecAggStart.TYPE: SecAggStart(session="s1", round=1),
    SecAggKeys.TYPE: SecAggKeys(session="s1", c_pk=b"c" * 32, s_pk=b"s" * 32, b_commit=b"b" * 32),
    SecAggRoster.TYPE: SecAggRoster(session="s1", threshold=2, keys={}, index={"a": 1}),
    SecAggShares.TYPE: SecAggShares(session="s1", shares={"a2": b"x" * 92}),
    SecAggForward.TYPE: SecAggForward(session="s1", shares={"a2": b"x" * 92}),
    SecAggUnmask.TYPE: SecAggUnmask(session="s1", survivors=["a1", "a2"], dropped=[]),
    SecAggUnmaskShares.TYPE: SecAggUnmaskShares(session="s1", b_shares={}, sk_shares={}),
    SecAggAbort.TYPE: SecAggAbort(session="s1", code="secagg-too-few"),
}
"""A valid message of every kind in the table (the sessions below run secure aggregation:
its messages are legal once joined; see test_secagg_messages_need_secagg)."""

SECAGG_WELCOME = welcome(config={"secagg": True})


def wire(parts: list[bytes | memoryview]) -> bytes:
    return b"".join(bytes(p) for p in parts)


class Pair:
    """An agent session linked to an aggregator session through bytes."""

    def __init__(self, *, check_values: bool = True) -> None:
        self.agent = AgentSession(check_values=check_values)
        self.agg = AggregatorSession()

    def agent_sends(self, msg: Message) -> Event:
        return self.agg.receive_bytes(wire(self.agent.send(msg)))

    def agg_sends(self, msg: Message) -> Event:
        return self.agent.receive_bytes(wire(self.agg.send(msg)))

    def join(self, w: Welcome | None = None) -> Welcomed:
        ev = self.agent_sends(
            self.agent.participate(
                "a1",
                token=None,
                enrollment=None,
                model=model(),
                init_weights=True,
                num_samples=1,
                metrics={},
                client="test",
            )
        )
        assert isinstance(ev, ParticipateReceived)
        out = self.agg_sends(w or welcome())
        assert isinstance(out, Welcomed)
        return out


# ---------------------------------------------------------------------- golden sequences
def test_golden_push_sequence() -> None:
    p = Pair()
    assert (p.agent.state, p.agg.state) == (State.IDLE, State.AWAITING_PARTICIPATE)
    ev = p.agent_sends(Participate(agent_name="a1", model=model(), known_version=-1))
    assert isinstance(ev, ParticipateReceived) and ev.message.agent_name == "a1"
    assert p.agent.state is State.AWAITING_WELCOME and p.agg.state is State.REGISTERING
    w = p.agg_sends(welcome(0))
    assert isinstance(w, Welcomed) and w.new_model
    assert p.agent.known_version == 0 and p.agent.agent_id == "a" * 32
    # (mypy keeps the narrowing of an earlier assert across the calls that change the state)
    assert p.agg.welcomed and p.agent.state is State.JOINED  # type: ignore[comparison-overlap]
    p.agent.queue_upload(upload("u1", 0))
    up = p.agent.upload_to_send()
    assert up is not None
    ev = p.agent_sends(up)
    assert isinstance(ev, UploadReceived) and ev.message.upload_id == "u1"
    np.testing.assert_array_equal(ev.message.model["w"], model(0.5)["w"])
    assert p.agent.upload_to_send() is None  # sent on this connection
    ack = p.agg_sends(UploadAck(upload_id="u1", status="accepted", round=1))
    assert ack == UploadAcknowledged(UploadAck(upload_id="u1", status="accepted", round=1), True)
    assert p.agent.pending is None
    gm = p.agg_sends(GlobalModel(version=1, model_id="m1", model=model(1)))
    assert isinstance(gm, GlobalModelReceived) and gm.new and p.agent.known_version == 1
    hb = p.agent_sends(Heartbeat(seq=7))
    assert hb == HeartbeatReceived(Heartbeat(seq=7), Heartbeat(seq=7))
    assert isinstance(hb, HeartbeatReceived) and hb.reply is not None
    assert p.agg_sends(hb.reply) == HeartbeatReceived(Heartbeat(seq=7), None)
    assert p.agent_sends(Bye(reason="agent closing")) == Left("agent closing")
    assert p.agent.state is State.CLOSED and p.agg.state is State.CLOSED


def test_golden_poll_sequence() -> None:
    p = Pair()
    p.join(welcome(0, delivery="poll"))
    assert p.agent.delivery == "poll" and p.agent.poll_due()
    ev = p.agent_sends(Poll(known_version=p.agent.known_version, wait=30.0))
    assert ev == PollReceived(Poll(known_version=0, wait=30.0))
    assert not p.agent.poll_due()  # asked about version 0 already
    assert p.agg_sends(NotReady(version=0, round=1)) == NotReadyReceived(
        NotReady(version=0, round=1)
    )
    assert p.agent.poll_due()  # the long poll ran out: ask again
    p.agent_sends(Poll(known_version=0, wait=30.0))
    gm = p.agg_sends(GlobalModel(version=1, model_id="m1", model=model(1), final=True))
    assert isinstance(gm, GlobalModelReceived) and gm.message.final
    assert p.agent.poll_due()  # version 1 not asked about
    p.agent.queue_upload(upload("u2", 1))
    assert not p.agent.poll_due()  # an upload is pending: no poll


def test_shared_global_model_goes_out_encoded_once() -> None:
    p = Pair()
    p.join()
    parts = AggregatorSession().send_encoded  # bound method of a fresh session: illegal
    with pytest.raises(LocalProtocolError):
        parts(GlobalModel, [b""])
    from fedstack.wire import encode

    enc = encode(GlobalModel(version=1, model_id="m1", model=model(1)))
    assert p.agg.send_encoded(GlobalModel, enc) is enc
    ev = p.agent.receive_bytes(wire(enc))
    assert isinstance(ev, GlobalModelReceived) and ev.new


def test_registration_refused_then_reconnect() -> None:
    p = Pair()
    p.agent_sends(Participate(agent_name="a1"))
    ev = p.agg_sends(Error(code="bad-credential", message="no", fatal=True))
    assert ev == Refused(Error(code="bad-credential", message="no", fatal=True), True)
    assert p.agent.state is State.CLOSED and p.agg.state is State.CLOSED
    # a transient refusal (the store is away) is not permanent
    agent = AgentSession()
    agent.send(Participate(agent_name="a1"))
    ev2 = agent.receive(Error(code="unavailable", message="retry", fatal=True))
    assert isinstance(ev2, Refused) and not ev2.permanent
    for code in ("refused", "bad-name", "revoked", "auth-required", "weak-token"):
        a = AgentSession()
        a.send(Participate(agent_name="a1"))
        r = a.receive(Error(code=code, message="x", fatal=True))
        assert isinstance(r, Refused) and r.permanent, code
    agent.reconnect()
    assert agent.state is State.IDLE
    agent.send(Participate(agent_name="a1"))


def test_fatal_error_after_welcome() -> None:
    p = Pair()
    p.join()
    ev = p.agg_sends(Error(code="revoked", message="revoked", fatal=True))
    assert isinstance(ev, Refused) and ev.permanent
    assert p.agent.state is State.CLOSED and p.agg.state is State.CLOSED
    q = Pair()
    q.join()
    ev = q.agg_sends(Error(code="internal-error", message="bug", fatal=True))
    assert isinstance(ev, Refused) and not ev.permanent  # reconnect and retry


def test_refused_upload_is_dropped_and_other_refusals_keep_it() -> None:
    p = Pair()
    p.join()
    p.agent.queue_upload(upload("u1"))
    p.agent_sends(upload("u1"))
    ev = p.agg_sends(Error(code="bad-field", message="upload_id"))
    assert ev == RequestRefused(Error(code="bad-field", message="upload_id"), None)
    assert p.agent.pending is not None
    ev = p.agg_sends(Error(code="invalid-model", message="shape"))
    assert ev == RequestRefused(Error(code="invalid-model", message="shape"), "u1")
    assert p.agent.pending is None and p.agent.state is State.JOINED


def test_upload_over_the_storage_quota_is_dropped() -> None:
    p = Pair()
    p.join()
    p.agent.queue_upload(upload("u1"))
    p.agent_sends(upload("u1"))
    ev = p.agg_sends(Error(code="quota-exceeded", message="over"))
    assert ev == RequestRefused(Error(code="quota-exceeded", message="over"), "u1")
    assert p.agent.pending is None and p.agent.state is State.JOINED


def test_ack_of_another_upload_does_not_clear_the_pending_one() -> None:
    p = Pair()
    p.join()
    p.agent.queue_upload(upload("u2"))
    ev = p.agg_sends(UploadAck(upload_id="u1", status="accepted", round=1))
    assert isinstance(ev, UploadAcknowledged) and not ev.matched
    assert p.agent.pending is not None and p.agent.pending.upload_id == "u2"


def test_pending_upload_is_resent_after_reconnect() -> None:
    p = Pair()
    p.join()
    p.agent.queue_upload(upload("u1"))
    sent = p.agent.upload_to_send()
    assert sent is not None
    p.agent_sends(sent)
    assert p.agent.upload_to_send() is None
    p.agent.reconnect()
    assert p.agent.upload_to_send() is None  # not before the welcome
    q = Pair()
    q.agent = p.agent
    w = q.join(welcome(0, with_model=False))
    assert not w.new_model and q.agent.known_version == 0
    again = q.agent.upload_to_send()
    assert again is not None and again.upload_id == "u1"
    # the participate of a reconnecting agent carries no model and its known version
    part = p.agent.participate(
        "a1",
        token="t",
        enrollment=None,
        model=model(),
        init_weights=True,
        num_samples=1,
        metrics={},
        client="c",
    )
    assert part.model is None and part.known_version == 0


# ---------------------------------------------------------------------- the stale rule
def test_stale_rule() -> None:
    s = AgentSession()
    s.send(Participate(agent_name="a1"))
    s.receive(welcome(3))
    assert not s.is_stale(3)
    assert s.is_stale(2)  # a newer global model arrived since version 2
    s.config = {"discard_stale": False}  # asynchronous strategies weigh stale uploads
    assert not s.is_stale(2)
    s.config = {}
    s.delivery = "poll"
    assert s.is_stale(2) and not s.is_stale(2, restored=True)
    s.delivery = "push"
    assert s.is_stale(2, restored=True)


# ---------------------------------------------------------------------- the table, exhaustively
def drive(role: Role, state: State) -> AgentSession | AggregatorSession:
    """A fresh session of ``role`` brought into ``state`` by legal messages."""
    if role is Role.AGGREGATOR:
        g = AggregatorSession(secagg=True)
        if state is State.AWAITING_PARTICIPATE:
            return g
        if state is State.FAILED:
            with pytest.raises(RemoteProtocolError):
                g.receive(Poll(known_version=0))
            return g
        g.receive(Participate(agent_name="a1"))
        if state is State.REGISTERING:
            return g
        g.send(welcome())
        if state is State.JOINED:
            return g
        assert state is State.CLOSED
        g.receive(Bye())
        return g
    a = AgentSession()
    if state is State.IDLE:
        return a
    a.send(Participate(agent_name="a1"))
    if state is State.AWAITING_WELCOME:
        return a
    if state is State.FAILED:
        with pytest.raises(RemoteProtocolError):
            a.receive(Poll(known_version=0))
        return a
    a.receive(SECAGG_WELCOME)
    if state is State.JOINED:
        return a
    assert state is State.CLOSED
    a.receive(Bye())
    return a


@pytest.mark.parametrize(("role", "state"), sorted(TRANSITIONS, key=str))
@pytest.mark.parametrize("kind", sorted(SAMPLES))
def test_every_message_in_every_state(role: Role, state: State, kind: str) -> None:
    rules = TRANSITIONS[(role, state)]
    msg = SAMPLES[kind]
    assert kind_of(msg) == kind
    # received
    s = drive(role, state)
    assert s.state is state
    if (Direction.IN, kind) in rules:
        assert s.can_receive(msg)
        event = s.receive_bytes(_encoded(msg))
        assert isinstance(event, Event)
        assert s.state is rules[(Direction.IN, kind)]
    else:
        assert not s.can_receive(msg)
        with pytest.raises(RemoteProtocolError) as err:
            s.receive(msg)
        expected = {
            State.AWAITING_PARTICIPATE: "expected-participate",
            State.AWAITING_WELCOME: "bad-message",
        }.get(state, "unexpected-message")
        assert err.value.code == expected
        assert s.state is (State.CLOSED if state is State.CLOSED else State.FAILED)
    # sent
    s = drive(role, state)
    if (Direction.OUT, kind) in rules:
        assert s.can_send(msg)
        parts = s.send(msg)
        assert isinstance(parts, list) and parts
        assert s.state is rules[(Direction.OUT, kind)]
    else:
        assert not s.can_send(msg)
        with pytest.raises(LocalProtocolError):
            s.send(msg)
        assert s.state is state  # a refused send changes nothing


@pytest.mark.parametrize("kind", sorted(SECAGG_KINDS))
def test_secagg_messages_need_secagg(kind: str) -> None:
    """Without secure aggregation its messages are illegal in every state, both ways: a
    received one fails the session (unexpected-message), a sent one is refused."""
    msg = SAMPLES[kind]
    up = (Direction.IN, kind) in TRANSITIONS[(Role.AGGREGATOR, State.JOINED)]
    g = AggregatorSession()
    g.receive(Participate(agent_name="a1"))
    g.send(welcome())
    a = AgentSession()
    a.send(Participate(agent_name="a1"))
    a.receive(welcome())
    assert not g.can_receive(msg) and not g.can_send(msg)
    assert not a.can_receive(msg) and not a.can_send(msg)
    receiver, sender = (g, a) if up else (a, g)
    with pytest.raises(LocalProtocolError):
        sender.send(msg)
    assert sender.state is State.JOINED
    with pytest.raises(RemoteProtocolError, match="secure aggregation|unexpected") as err:
        receiver.receive_bytes(_encoded(msg))
    assert err.value.code == "unexpected-message"
    assert receiver.state is State.FAILED


def _encoded(msg: Message) -> bytes:
    from fedstack.wire import encode_to_bytes

    return encode_to_bytes(msg)


def test_table_covers_every_state_of_each_role() -> None:
    agent_states = {State.IDLE, State.AWAITING_WELCOME, State.JOINED, State.FAILED, State.CLOSED}
    agg_states = {
        State.AWAITING_PARTICIPATE,
        State.REGISTERING,
        State.JOINED,
        State.FAILED,
        State.CLOSED,
    }
    assert {s for r, s in TRANSITIONS if r is Role.AGENT} == agent_states
    assert {s for r, s in TRANSITIONS if r is Role.AGGREGATOR} == agg_states
    # a welcome goes out exactly once, and before anything but an error
    for state in agg_states:
        outs = {k for d, k in TRANSITIONS[(Role.AGGREGATOR, state)] if d is Direction.OUT}
        if state is State.JOINED:
            assert Welcome.TYPE not in outs
        elif state is not State.REGISTERING:
            assert outs <= {Error.TYPE, FATAL_ERROR, Bye.TYPE}
    # nothing is legal after the end
    assert TRANSITIONS[(Role.AGENT, State.CLOSED)] == {}
    assert TRANSITIONS[(Role.AGGREGATOR, State.CLOSED)] == {}


@pytest.mark.parametrize(
    "seq",
    list(
        itertools.permutations(
            [Participate.TYPE, ModelUpload.TYPE, Poll.TYPE, Heartbeat.TYPE, Bye.TYPE], 3
        )
    ),
)
def test_aggregator_sequences_of_three(seq: tuple[str, ...]) -> None:
    """Every ordering of three agent messages: legal exactly as the table says."""
    g = AggregatorSession()
    for kind in seq:
        allowed = (Direction.IN, kind) in TRANSITIONS[(g.role, g.state)]
        if allowed:
            g.receive(SAMPLES[kind])
            if g.state is State.REGISTERING:
                g.send(welcome())
        else:
            with pytest.raises(RemoteProtocolError):
                g.receive(SAMPLES[kind])
            return


def test_bad_bytes_fail_the_session() -> None:
    g = AggregatorSession()
    with pytest.raises(RemoteProtocolError) as err:
        g.receive_bytes(b"GET / HTTP/1.1\r\n\r\n")
    assert err.value.code == "malformed" and g.state is State.FAILED
    g.send(Error(code="malformed", message="x", fatal=True))
    assert g.state is State.CLOSED  # type: ignore[comparison-overlap]  # changed by send()


def test_local_encode_error_keeps_the_state() -> None:
    g = AggregatorSession()
    g.receive(Participate(agent_name="a1"))
    with pytest.raises(LocalProtocolError):
        g.send(
            Welcome(
                agent_id="a",
                aggregator_id="g",
                run_id="r",
                version=0,
                round=1,
                model_id="m",
                model=None,
                delivery="x" * 10_000,
            )
        )
    assert g.state is State.REGISTERING


# ---------------------------------------------------------------------- a hostile aggregator
def joined() -> AgentSession:
    s = AgentSession()
    s.send(Participate(agent_name="a1"))
    s.receive(welcome(0))
    return s


@pytest.mark.parametrize(
    "bad_model",
    [
        {"w": np.zeros((3, 2), np.float32), "b": np.zeros(3, np.float32)},  # shape
        {"w": np.zeros((2, 3), np.float64), "b": np.zeros(3, np.float32)},  # dtype
        {"w": np.zeros((2, 3), np.float32)},  # a name missing
        {
            "w": np.zeros((2, 3), np.float32),
            "b": np.zeros(3, np.float32),
            "evil": np.zeros(1, np.float32),
        },  # one too many
        {"w": np.full((2, 3), np.nan, np.float32), "b": np.zeros(3, np.float32)},
        {"w": np.zeros((2, 3), np.float32), "b": np.array([0, np.inf, 0], np.float32)},
        {"w": np.zeros((2, 3), np.float32), "b": np.array([0, -np.inf, 0], np.float32)},
    ],
)
def test_global_model_of_another_structure_or_not_finite_is_refused(
    bad_model: dict[str, np.ndarray],
) -> None:
    s = joined()
    with pytest.raises(RemoteProtocolError) as err:
        s.receive_bytes(_encoded(GlobalModel(version=1, model_id="m", model=bad_model)))
    assert err.value.code == "invalid-model"
    assert "global model" in str(err.value)
    assert s.known_version == 0 and s.state is State.FAILED


def test_the_first_model_of_a_run_fixes_the_structure() -> None:
    """The agent's own initial model does not decide (the federation may have been
    started by another agent's); the first global model received does, and a welcome
    after a reconnection in the same run must match it."""
    s = AgentSession()
    assert s.structure is None
    s.send(Participate(agent_name="a1", model={"other": np.zeros(5, np.float32)}))
    s.receive(welcome(0))
    assert s.structure == [("w", "float32", (2, 3)), ("b", "float32", (3,))]
    s.reconnect()
    s.send(Participate(agent_name="a1"))
    bad = Welcome(**{**welcome(1).__dict__, "model": {"x": np.zeros(2, np.float32)}})
    with pytest.raises(RemoteProtocolError) as err:
        s.receive(bad)
    assert err.value.code == "invalid-model" and "x[2]:float32" in str(err.value)
    nan = Welcome(**{**welcome(0).__dict__, "extra": {"c": np.array([np.nan], np.float32)}})
    s2 = AgentSession()
    s2.send(Participate(agent_name="a1"))
    with pytest.raises(RemoteProtocolError, match="extra array"):
        s2.receive(nan)


def test_a_welcome_lists_only_aggregator_urls() -> None:
    """The federation's other aggregators are where the agent fails over to: only
    ws://, wss:// or inproc:// addresses are accepted, nothing an agent could be
    tricked into opening otherwise."""
    s = AgentSession()
    s.send(Participate(agent_name="a1"))
    peers = ["ws://127.0.0.1:9001", "wss://b.example:8765"]
    event = s.receive(Welcome(**{**welcome(0).__dict__, "aggregators": peers}))
    assert isinstance(event, Welcomed) and event.message.aggregators == peers
    for bad in ("http://x", "file:///etc/passwd", "ws://a\x1b[2J"):
        s2 = AgentSession()
        s2.send(Participate(agent_name="a1"))
        with pytest.raises(RemoteProtocolError, match="not a URL"):
            s2.receive(Welcome(**{**welcome(0).__dict__, "aggregators": [bad]}))


def test_nan_allowed_through_when_values_are_not_checked() -> None:
    s = AgentSession(check_values=False)
    s.send(Participate(agent_name="a1"))
    s.receive(welcome(0))
    nan = {"w": np.full((2, 3), np.nan, np.float32), "b": np.zeros(3, np.float32)}
    ev = s.receive(GlobalModel(version=1, model_id="m", model=nan))
    assert isinstance(ev, GlobalModelReceived) and ev.new
    with pytest.raises(RemoteProtocolError):  # the structure is still checked
        s.receive(GlobalModel(version=2, model_id="m", model={"w": np.zeros(1, np.float32)}))


@pytest.mark.parametrize("version", [MAX_VERSION + 1, 2**62, -1])
def test_absurd_global_versions_are_refused(version: int) -> None:
    s = joined()
    with pytest.raises(RemoteProtocolError) as err:
        s.receive(GlobalModel(version=version, model_id="m", model=model()))
    assert err.value.code == "bad-field" and s.known_version == 0


def test_backward_global_version_is_refused_a_repeat_is_not() -> None:
    s = joined()
    first = s.receive(GlobalModel(version=5, model_id="m", model=model()))
    assert isinstance(first, GlobalModelReceived) and first.new
    ev = s.receive(GlobalModel(version=5, model_id="m", model=model()))
    assert isinstance(ev, GlobalModelReceived) and not ev.new
    with pytest.raises(RemoteProtocolError, match="older"):
        s.receive(GlobalModel(version=4, model_id="m", model=model()))
    assert s.known_version == 5


@pytest.mark.parametrize("interval", [0.0, -1.0, 1e-9, 1e9])
def test_absurd_heartbeat_interval_is_refused(interval: float) -> None:
    s = AgentSession()
    s.send(Participate(agent_name="a1"))
    with pytest.raises(RemoteProtocolError) as err:
        s.receive_bytes(_encoded(welcome(0, interval=interval)))
    assert err.value.code == "bad-field" and "heartbeat_interval" in str(err.value)
    assert s.state is State.FAILED and s.agent_id is None  # nothing taken from it


@pytest.mark.parametrize(
    "w",
    [
        welcome(MAX_VERSION + 1),
        welcome(0, delivery="carrier-pigeon"),
    ],
)
def test_absurd_welcomes_are_refused(w: Welcome) -> None:
    s = AgentSession()
    s.send(Participate(agent_name="a1"))
    with pytest.raises(RemoteProtocolError):
        s.receive(w)


def test_a_new_run_may_restart_versions_and_structure() -> None:
    s = joined()
    s.receive(GlobalModel(version=7, model_id="m", model=model()))
    s.reconnect()
    s.send(Participate(agent_name="a1"))
    ev = s.receive(welcome(0, run="run2"))
    assert isinstance(ev, Welcomed) and not ev.new_model  # older than known: not delivered
    assert s.run_id == "run2"
    s.reconnect()
    s.send(Participate(agent_name="a1"))
    other = Welcome(**{**welcome(9, run="run3").__dict__, "model": {"x": np.zeros(1, np.float32)}})
    ev = s.receive(other)
    assert isinstance(ev, Welcomed) and ev.new_model
    assert s.structure == [("x", "float32", (1,))]


def _paths(role: Role, start: State, length: int) -> list[list[tuple[Direction, str]]]:
    """Every path of ``length`` legal steps through the table from ``start``."""
    out: list[list[tuple[Direction, str]]] = []

    def walk(state: State, path: list[tuple[Direction, str]]) -> None:
        if len(path) == length:
            out.append(path)
            return
        for step, nxt in TRANSITIONS[(role, state)].items():
            walk(nxt, [*path, step])

    walk(start, [])
    return out


@pytest.mark.parametrize(
    ("role", "start"), [(Role.AGENT, State.IDLE), (Role.AGGREGATOR, State.AWAITING_PARTICIPATE)]
)
def test_every_legal_sequence_of_four_steps(role: Role, start: State) -> None:
    """Every path of four legal steps the table allows is accepted by a fresh session,
    which ends in the state the table says."""
    paths = _paths(role, start, 4)
    assert len(paths) > 20
    for path in paths:
        s: AgentSession | AggregatorSession = (
            AgentSession() if role is Role.AGENT else AggregatorSession(secagg=True)
        )
        state = start
        for direction, kind in path:
            msg = SAMPLES[kind]
            if direction is Direction.OUT:
                s.send(msg)
            else:
                assert isinstance(s.receive_bytes(_encoded(msg)), Event)
            state = TRANSITIONS[(role, state)][(direction, kind)]
            assert s.state is state, path
