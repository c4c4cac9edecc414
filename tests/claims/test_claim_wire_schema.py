"""Book row 2 (schema audit): the wire schema is pinned, field by field.

Raw data never leaves an agent: what an agent can send is exactly the fields below, and
this test fails as soon as a message type or a field is added, removed or retyped
(``fedstack.wire.messages``), until :data:`PINNED` is updated by someone who has looked at
what the new field can carry. Kinds and what each can carry:

- ``weights``: named tensors. ``model`` must match the federation's structure (names,
  shapes, dtypes: :mod:`fedstack.aggregator.validation`); of ``extra`` the aggregator
  keeps only the arrays its strategy declares it reads (SCAFFOLD's control variates,
  FedCurv's statistics; FedAvg: none), the rest is dropped, neither stored nor passed on
  (checked end to end below with training rows).
- ``metrics``: a flat map of at most 256 scalars (numbers, booleans, strings of at most
  1,024 characters), stored with the round and shown by ``fedstack db rounds``.
- ``str`` / ``int`` / ``float`` / ``bool`` / ``strs``: identifiers and counters, bounded
  by :class:`fedstack.wire.Limits`.
- secure aggregation (issue 14; only in a federation running ``--secagg``): ``bytes``
  (public keys and the seed commitment: the aggregator accepts exactly 32 bytes each),
  ``ByteMap`` (agent id -> a share ciphertext, exactly one per neighbour, a fixed size,
  encrypted to that neighbour: the aggregator checks all three), ``IntMap`` (Shamir
  indices, aggregator -> agent) and ``AgentIds`` (the session's survivors, aggregator ->
  agent). Binary values are at most 256 bytes and maps at most 256 entries (the decoder).

Nothing else can ride along: the decoder refuses unknown fields, binary values longer
than 256 bytes in the header and binary values in any field whose kind is not ``bytes``
or a byte map, and nested values in metrics (checked below on hand-made headers, as a hostile
agent would send them). The traffic of a real run is checked for training rows in
``test_claim_traffic_capture.py``.
"""

from __future__ import annotations

import dataclasses
import struct
from pathlib import Path

import msgpack
import numpy as np
import pytest

from fedstack import Agent, AggregatorConfig
from fedstack.data.digits import partition_digits
from fedstack.errors import RemoteProtocolError
from fedstack.testing import aggregator_thread
from fedstack.wire import Limits, ModelUpload, decode, encode_to_bytes
from fedstack.wire.codec import _KINDS, _SPECS
from fedstack.wire.messages import MESSAGE_TYPES, PROTOCOL_VERSION

# message type -> field -> annotation (as written in fedstack/wire/messages.py)
PINNED: dict[str, dict[str, str]] = {
    "participate": {
        "agent_name": "str",
        "token": "str | None",
        "enrollment": "str | None",
        "model": "Weights | None",
        "init_weights": "bool | None",
        "num_samples": "int",
        "metrics": "Metrics",
        "known_version": "int",
        "client": "str",
    },
    "welcome": {
        "agent_id": "str",
        "aggregator_id": "str",
        "run_id": "str",
        "version": "int",
        "round": "int",
        "model_id": "str",
        "model": "Weights | None",
        "delivery": "str",
        "finished": "bool",
        "heartbeat_interval": "float",
        "config": "Metrics",
        "extra": "Weights | None",
        "aggregators": "list[str]",
    },
    "upload": {
        "upload_id": "str",
        "base_version": "int",
        "num_samples": "int",
        "metrics": "Metrics",
        "model": "Weights",
        "extra": "Weights | None",
    },
    "upload_ack": {"upload_id": "str", "status": "str", "round": "int", "message": "str"},
    "global_model": {
        "version": "int",
        "model_id": "str",
        "model": "Weights",
        "final": "bool",
        "extra": "Weights | None",
    },
    "poll": {"known_version": "int", "wait": "float"},
    "not_ready": {"version": "int", "round": "int"},
    "error": {"code": "str", "message": "str", "fatal": "bool"},
    "heartbeat": {"seq": "int"},
    "bye": {"reason": "str"},
    "secagg_start": {"session": "str", "round": "int"},
    "secagg_keys": {"session": "str", "c_pk": "bytes", "s_pk": "bytes", "b_commit": "bytes"},
    "secagg_roster": {"session": "str", "threshold": "int", "keys": "ByteMap", "index": "IntMap"},
    "secagg_shares": {"session": "str", "shares": "ByteMap"},
    "secagg_forward": {"session": "str", "shares": "ByteMap"},
    "secagg_unmask": {"session": "str", "survivors": "AgentIds", "dropped": "AgentIds"},
    "secagg_unmask_shares": {"session": "str", "b_shares": "ByteMap", "sk_shares": "ByteMap"},
    "secagg_abort": {"session": "str", "code": "str", "reason": "str"},
}

# the codec's kinds: annotation -> (kind, nullable)
PINNED_KINDS: dict[str, tuple[str, bool]] = {
    "str": ("str", False),
    "str | None": ("str", True),
    "int": ("int", False),
    "int | None": ("int", True),
    "float": ("float", False),
    "bool": ("bool", False),
    "bool | None": ("bool", True),
    "Metrics": ("metrics", False),
    "Weights": ("weights", False),
    "Weights | None": ("weights", True),
    "list[str]": ("strs", False),
    "bytes": ("bytes", False),
    "AgentIds": ("ids", False),
    "ByteMap": ("bytemap", False),
    "IntMap": ("intmap", False),
}

TENSOR_FIELDS = {
    ("participate", "model"),
    ("welcome", "model"),
    ("welcome", "extra"),
    ("upload", "model"),
    ("upload", "extra"),
    ("global_model", "model"),
    ("global_model", "extra"),
}
"""Every field that carries arrays. An agent sends arrays in exactly three of them."""


def actual_schema() -> dict[str, dict[str, str]]:
    return {
        tag: {f.name: str(f.type) for f in dataclasses.fields(cls)}
        for tag, cls in MESSAGE_TYPES.items()
    }


def test_message_types_and_fields_are_pinned() -> None:
    actual = actual_schema()
    assert sorted(actual) == sorted(PINNED), (
        "message types changed: audit what the new type carries, then update PINNED"
    )
    for tag, fields in PINNED.items():
        assert actual[tag] == fields, (
            f"fields of {tag!r} changed: {actual[tag]} != pinned {fields}; audit what a "
            "changed field can carry (row 2: no raw data leaves an agent), then update PINNED"
        )


def test_codec_kinds_are_pinned_and_follow_the_annotations() -> None:
    assert PINNED_KINDS == _KINDS, "the codec gained or changed a value kind: audit it"
    for tag, spec in _SPECS.items():
        assert [f.name for f in spec] == list(PINNED[tag])
        for f in spec:
            assert (f.kind, f.optional) == PINNED_KINDS[PINNED[tag][f.name]], (tag, f.name)
    tensor_fields = {
        (tag, f.name) for tag, spec in _SPECS.items() for f in spec if f.kind == "weights"
    }
    assert tensor_fields == TENSOR_FIELDS


def _tampered(fields: dict[str, object]) -> bytes:
    """A real encoded upload whose header fields are replaced as a hostile peer would
    (bypassing the encoder's checks); the tensor table and data are kept."""
    good = encode_to_bytes(
        ModelUpload(
            upload_id="u1", base_version=0, num_samples=5, model={"w": np.ones(8, np.float32)}
        )
    )
    _, _, _, n = struct.unpack_from("<2sBBI", good)
    header = msgpack.unpackb(good[8 : 8 + n])
    header["f"] = fields
    packed: bytes = msgpack.packb(header, use_bin_type=True)
    head = struct.pack("<2sBBI", b"FS", PROTOCOL_VERSION, 0, len(packed)) + packed
    head += bytes(-len(head) % 64)
    data_start = 8 + n + (-(8 + n) % 64)
    return head + good[data_start:]


ROW = [0.0, 0.3125, 0.8125, 0.9375, 0.5, 0.0625] * 10 + [0.0] * 4  # a digits-like row

UPLOAD = {"upload_id": "u1", "base_version": 0, "num_samples": 5}


@pytest.mark.parametrize(
    ("fields", "why"),
    [
        ({**UPLOAD, "sample": ROW}, "unknown field"),
        ({**UPLOAD, "metrics": {"row": ROW}}, "must be a number, string or boolean"),
        ({**UPLOAD, "metrics": {"row": {"x": 1.0}}}, "must be a number, string or boolean"),
        ({**UPLOAD, "metrics": {"row": bytes(257)}}, "undecodable header"),
        ({**UPLOAD, "upload_id": bytes(257)}, "undecodable header"),
        ({**UPLOAD, "metrics": {"row": bytes(256)}}, "must be a number, string or boolean"),
        ({**UPLOAD, "upload_id": bytes(256)}, "must be a string"),
        ({**UPLOAD, "metrics": {"row": "x" * 1025}}, "longer than 1024"),
        ({**UPLOAD, "upload_id": "x" * 4097}, "longer than 4096"),
        ({**UPLOAD, "extra": ROW}, "tensors must be sent in the tensor table"),
        ({**UPLOAD, "num_samples": ROW}, "must be an integer"),
    ],
)
def test_no_other_channel_can_carry_a_sample(fields: dict[str, object], why: str) -> None:
    """Values outside the pinned kinds (a list of floats, a nested map, bytes, over-long
    strings, a field the schema does not have) are refused, not passed on."""
    with pytest.raises(RemoteProtocolError, match=why):
        decode(_tampered(fields), Limits())


def test_the_tampered_messages_are_otherwise_valid() -> None:
    """Control: the same rebuilt upload with well-formed fields decodes, so the refusals
    above are for the smuggled value, not for the framing."""
    msg = decode(_tampered({**UPLOAD, "metrics": {"loss": 0.5}}), Limits())
    assert isinstance(msg, ModelUpload)
    assert msg.metrics == {"loss": 0.5}
    assert list(msg.model) == ["w"]


def test_undeclared_extra_arrays_are_dropped_not_stored_or_passed_on(tmp_path: Path) -> None:
    """The one free-form tensor field an agent has, ``extra``, keeps only the arrays the
    strategy declares it reads (:attr:`fedstack.strategies.base.Strategy.reads_extra`;
    FedAvg: none). Training rows an agent puts there reach neither the store nor any
    agent. Control: a row put into the model itself (the model is stored) is found in the
    store by the same search, so the search sees what is stored."""
    x, _ = partition_digits(0, 1, "iid", 0)
    smuggled = np.ascontiguousarray(x[:8])
    cfg = AggregatorConfig(
        auth="off", port=0, db=str(tmp_path / "f.db"), rounds=1, min_agents=1, finish_grace=2
    )
    with aggregator_thread(cfg) as agg:
        agent = Agent(f"ws://127.0.0.1:{agg.port}", name="smuggler")
        try:
            agent.send_initial_model({"w": np.zeros(64, np.float32)})
            agent.start(timeout=30)
            agent.wait_for_global_model(30)
            assert agent.send_trained_model({"w": x[8]}, 5, extra={"rows": smuggled})
            final = agent.wait_for_global_model(30)
            assert np.array_equal(final["w"], x[8])
            assert not agent.global_extra
        finally:
            agent.close()
    stored = b"".join(p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file())
    assert x[8].tobytes() in stored, "control: the stored model is visible to the search"
    for i, row in enumerate(smuggled):
        assert row.tobytes() not in stored, f"smuggled row {i} was stored"
