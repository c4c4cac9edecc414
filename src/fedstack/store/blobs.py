"""Content-addressed tensor blobs on disk, written atomically.

A blob is a tensor file in the safetensors layout (:mod:`fedstack.wire.tensorfile`), so a
stored model opens with ``safetensors.numpy.load_file`` or ``safetensors.torch.load_file``.
It is addressed by the BLAKE3 digest of its bytes (:func:`fedstack.files.digest_of`) and
lives at ``<root>/<2 hex digits>/<digest>.safetensors``. Files are written with
:func:`fedstack.files.atomic_write`, so a crash never leaves a half-written blob under its
final name; every read checks the digest unless told not to.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from fedstack.errors import CorruptBlob, StoreError, TensorFileError
from fedstack.files import DIGEST_PREFIX, digest_matches, digest_of, file_matches, write_temp
from fedstack.files import install as install_file
from fedstack.types import Array, Weights
from fedstack.wire import tensorfile

SUFFIX = ".safetensors"

__all__ = ["BlobStore", "decode_weights", "digest_matches", "digest_of", "encode_weights"]


def encode_weights(weights: Mapping[str, Array]) -> list[bytes | memoryview]:
    """The blob's bytes as parts (header, then views of the arrays: no copy)."""
    return tensorfile.encode(weights)


def decode_weights(data: memoryview) -> Weights:
    """The arrays of a blob's bytes (views of ``data``).

    Raises:
        TensorFileError: ``data`` is not a valid tensor file.
    """
    return tensorfile.decode(data)[0]


class BlobStore:
    """Tensor blobs in a directory, addressed by the digest of their bytes."""

    def __init__(self, root: str | Path, *, fsync: bool = True, create: bool = True) -> None:
        """``create``: make the directory if it is missing (False for inspection)."""
        self.root = Path(root)
        self.fsync = fsync
        self._intact: dict[str, tuple[int, int, int]] = {}
        """digest -> (inode, size, mtime) of a file this store wrote or verified: storing
        the same content again does not read 100 MB back while the file is unchanged."""
        if not create:
            return
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(
                f"cannot create the blob directory {self.root}: {exc.strerror}"
            ) from exc

    def path(self, digest: str) -> Path:
        """Where the blob ``digest`` lives (whether or not it exists)."""
        return self.root / digest[len(DIGEST_PREFIX) :][:2] / f"{digest}{SUFFIX}"

    def put(self, weights: Mapping[str, Array]) -> tuple[str, int]:
        """Store ``weights``; returns (digest, size in bytes).

        Idempotent: a blob already stored with the same digest is kept if it is intact,
        and replaced if it fails its integrity check (a damaged or tampered file is
        repaired by storing its content again). A file this store wrote or verified is not
        hashed again while its inode, size and modification time are unchanged (any write
        to it changes them); :meth:`get` always verifies.

        Raises:
            StoreError: the blob could not be written.
        """
        parts = encode_weights(weights)
        digest, size = digest_of(parts)
        final = self.path(digest)
        try:
            if final.exists():
                st = final.stat()
                seen = (st.st_ino, st.st_size, st.st_mtime_ns)
                if self._intact.get(digest) == seen or (
                    st.st_size == size and file_matches(digest, final)
                ):
                    self._remember(digest, seen)
                    return digest, size
            final.parent.mkdir(parents=True, exist_ok=True)
            # unique temporary name: two threads may store the same content at once
            tmp = write_temp(final, parts, fsync=self.fsync, mode=0o666, drop_cache=True)
            install_file(tmp, final, fsync=self.fsync)
            st = final.stat()
            self._remember(digest, (st.st_ino, st.st_size, st.st_mtime_ns))
        except OSError as exc:
            raise StoreError(f"cannot write blob to {final.parent}: {exc.strerror}") from exc
        return digest, size

    def _remember(self, digest: str, seen: tuple[int, int, int]) -> None:
        if len(self._intact) >= 65536:  # bounded: forget, then verify again on demand
            self._intact.clear()
        self._intact[digest] = seen

    def delete(self, digest: str) -> None:
        """Remove the blob ``digest`` if it exists (the caller made sure no record names it).

        Raises:
            StoreError: it exists but cannot be removed.
        """
        self._intact.pop(digest, None)
        try:
            self.path(digest).unlink(missing_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot remove blob {digest[:12]}: {exc.strerror}") from exc

    def get(self, digest: str, *, verify: bool = True) -> Weights:
        """Load the blob ``digest`` (its hash is checked unless ``verify`` is False).

        Raises:
            StoreError: the blob is missing, unreadable, truncated or corrupt.
        """
        path = self.path(digest)
        try:
            size = path.stat().st_size
            buf = np.empty(size, dtype=np.uint8)
            with open(path, "rb", buffering=0) as f:
                got = f.readinto(buf.data)
        except FileNotFoundError as exc:
            raise CorruptBlob(f"blob {digest[:12]} is missing at {path}") from exc
        except OSError as exc:
            raise StoreError(f"cannot read blob {digest[:12]} at {path}: {exc.strerror}") from exc
        if got != size:
            raise CorruptBlob(f"blob {digest[:12]} is truncated")
        if verify and not digest_matches(digest, buf.data):
            raise CorruptBlob(f"blob {digest[:12]} is corrupt (hash mismatch)")
        try:
            return decode_weights(buf.data)
        except TensorFileError as exc:
            raise TensorFileError(f"blob {digest[:12]} is not readable: {exc}") from exc
