"""Content-addressed tensor blobs on disk (a hash of the encoded bytes), written atomically.

Digests are BLAKE3 (``"z3"`` + 62 hex digits: 248 bits, the 64 characters of the digest
columns; ``z`` is no hex digit, so they never look like the plain sha256 hex digests of
stores written before, which stay readable and verifiable). BLAKE3 hashes ~4x faster than
sha256 here, and every stored model is hashed once on its way in.

A blob file is ``b"FSTB" | u32 header length | msgpack tensor table | padding | tensor data``,
the same allow-listed tensor codec as the wire (no pickle). Files are written to a temporary
name, fsynced and renamed, so a crash never leaves a half-written blob under its final name.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import struct
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path

import blake3
import msgpack
import numpy as np

from fedstack.errors import RemoteProtocolError, StoreError
from fedstack.types import Array, Weights
from fedstack.wire import tensors

_MAGIC = b"FSTB"
_PREFIX = struct.Struct("<4sI")
_B3 = "z3"
_B3_BYTES = 31

Buffer = bytes | bytearray | memoryview


def digest_of(parts: Iterable[Buffer]) -> tuple[str, int]:
    """The content digest of the bytes of ``parts`` back to back, and their size."""
    h = blake3.blake3()
    size = 0
    for p in parts:
        h.update(p)
        size += len(p) if isinstance(p, bytes) else memoryview(p).nbytes
    return _B3 + h.hexdigest(length=_B3_BYTES), size


def digest_matches(digest: str, data: Buffer) -> bool:
    """True when ``data`` hashes to ``digest`` (BLAKE3, or sha256 for older stores)."""
    if digest.startswith(_B3):
        return _B3 + blake3.blake3(data).hexdigest(length=_B3_BYTES) == digest
    return hashlib.sha256(data).hexdigest() == digest


def encode_weights(weights: Mapping[str, Array]) -> list[bytes | memoryview]:
    entries, arrays = tensors.prepare(weights, 0)
    header = msgpack.packb([e.to_wire() for e in entries], use_bin_type=True)
    head = _PREFIX.pack(_MAGIC, len(header)) + header
    parts: list[bytes | memoryview] = [head + bytes(tensors.padding(len(head)))]
    for arr, view in zip(arrays, tensors.views(arrays), strict=True):
        parts.append(view)
        parts.append(bytes(tensors.padding(arr.nbytes)))
    return parts


def decode_weights(data: memoryview) -> Weights:
    if data.nbytes < _PREFIX.size:
        raise RemoteProtocolError("blob too short", code="malformed")
    magic, header_len = _PREFIX.unpack_from(data, 0)
    if magic != _MAGIC or _PREFIX.size + header_len > data.nbytes:
        raise RemoteProtocolError("not a fedstack tensor blob", code="malformed")
    try:
        table = msgpack.unpackb(
            data[_PREFIX.size : _PREFIX.size + header_len], raw=False, max_bin_len=0,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises several unrelated types on bad input
        raise RemoteProtocolError(f"undecodable blob header: {exc}", code="malformed") from None
    start = _PREFIX.size + header_len
    start += tensors.padding(start)
    weights, _ = tensors.read(table, data[start:], 0, max_tensors=1 << 20, max_name_len=1024)
    return weights


class BlobStore:
    """Tensor blobs in a directory, addressed by the digest of their bytes."""

    def __init__(self, root: str | Path, *, fsync: bool = True) -> None:
        self.root = Path(root)
        self.fsync = fsync
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, digest: str) -> Path:
        hexpart = digest[len(_B3):] if digest.startswith(_B3) else digest
        return self.root / hexpart[:2] / f"{digest}.fstb"

    def put(self, weights: Mapping[str, Array]) -> tuple[str, int]:
        """Store ``weights``; returns (digest, size in bytes). Idempotent."""
        parts = encode_weights(weights)
        digest, size = digest_of(parts)
        final = self.path(digest)
        # unique per call: two threads may store the same content at the same time
        tmp = final.with_suffix(f".tmp{os.getpid()}-{uuid.uuid4().hex[:12]}")
        try:
            if final.exists() and final.stat().st_size == size:
                return digest, size
            final.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                for p in parts:
                    f.write(p)
                f.flush()
                if self.fsync:
                    os.fsync(f.fileno())
                if hasattr(os, "posix_fadvise"):
                    # written once, read rarely: do not let it crowd out the aggregator's
                    # working memory in the page cache
                    os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            os.replace(tmp, final)
            if self.fsync:
                dir_fd = os.open(final.parent, os.O_RDONLY)
                try:
                    os.fsync(dir_fd)
                finally:
                    os.close(dir_fd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise StoreError(f"cannot write blob to {final.parent}: {exc}") from exc
        return digest, size

    def get(self, digest: str, *, verify: bool = True) -> Weights:
        """Load the blob ``digest`` (its hash is checked unless ``verify`` is False)."""
        path = self.path(digest)
        try:
            size = path.stat().st_size
            buf = np.empty(size, dtype=np.uint8)
            with open(path, "rb", buffering=0) as f:
                got = f.readinto(buf.data)
        except OSError as exc:
            raise StoreError(f"cannot read blob {digest[:12]} at {path}: {exc}") from exc
        if got != size:
            raise StoreError(f"blob {digest[:12]} is truncated")
        if verify and not digest_matches(digest, buf.data):
            raise StoreError(f"blob {digest[:12]} is corrupt (hash mismatch)")
        try:
            return decode_weights(buf.data)
        except RemoteProtocolError as exc:
            raise StoreError(f"blob {digest[:12]} is not readable: {exc}") from exc
