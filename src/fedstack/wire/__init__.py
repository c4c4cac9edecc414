"""The wire protocol: typed messages and a codec with no I/O (sans-I/O)."""

from fedstack.wire.codec import Limits, decode, encode, encode_to_bytes, encoded_size
from fedstack.wire.messages import (
    PROTOCOL_VERSION,
    Bye,
    Error,
    GlobalModel,
    Heartbeat,
    Message,
    ModelUpload,
    NotReady,
    Participate,
    Poll,
    UploadAck,
    Welcome,
)
from fedstack.wire.segments import Segments

__all__ = [
    "PROTOCOL_VERSION",
    "Bye",
    "Error",
    "GlobalModel",
    "Heartbeat",
    "Limits",
    "Message",
    "ModelUpload",
    "NotReady",
    "Participate",
    "Poll",
    "Segments",
    "UploadAck",
    "Welcome",
    "decode",
    "encode",
    "encode_to_bytes",
    "encoded_size",
]
