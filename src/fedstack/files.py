"""Crash-safe file writes and the content digest, shared by the store and the agent.

A file is written atomically: to a temporary file in the same directory (named
``.<final name>.<random>.tmp``, so a directory scan can remove leftovers of a crash), flushed,
fsynced, renamed over the final name, then the directory is fsynced. A crash leaves either
the old or the new content under the final name, never a torn file.

The integrity hash is BLAKE3 (:func:`digest_of`): ``"z3"`` and 62 hex digits, 248 bits,
the 64 characters of the store's digest columns. It is cryptographic, so content uploaded
by untrusted agents cannot be crafted to collide.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterable
from pathlib import Path

import blake3

Buffer = bytes | bytearray | memoryview

DIGEST_PREFIX = "z3"
_DIGEST_BYTES = 31


def digest_of(parts: Iterable[Buffer]) -> tuple[str, int]:
    """The digest of the bytes of ``parts`` back to back, and their total size."""
    h = blake3.blake3()
    size = 0
    for p in parts:
        h.update(p)
        size += len(p) if isinstance(p, bytes) else memoryview(p).nbytes
    return DIGEST_PREFIX + h.hexdigest(length=_DIGEST_BYTES), size


def digest_matches(digest: str, data: Buffer) -> bool:
    """True when ``data`` hashes to ``digest``."""
    return DIGEST_PREFIX + blake3.blake3(data).hexdigest(length=_DIGEST_BYTES) == digest


def file_matches(digest: str, path: str | Path) -> bool:
    """True when the file at ``path`` hashes to ``digest`` (read through a memory map, so
    a big file costs no heap). False when it cannot be read.
    """
    try:
        h = blake3.blake3()
        h.update_mmap(path)
    except (OSError, ValueError):
        return False
    return DIGEST_PREFIX + h.hexdigest(length=_DIGEST_BYTES) == digest


def is_temp_name(name: str, finals: Iterable[str]) -> bool:
    """True when ``name`` is a temporary file :func:`write_temp` made for one of ``finals``."""
    return name.endswith(".tmp") and name.startswith(tuple(f".{n}." for n in finals))


def fsync_dir(directory: str | Path) -> None:
    """Make the directory's entries (a rename, a new or removed file) durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_temp(
    path: Path,
    parts: Iterable[Buffer],
    *,
    fsync: bool = True,
    mode: int = 0o600,
    drop_cache: bool = False,
) -> Path:
    """Write ``parts`` to a new temporary file next to ``path``; returns its path.

    Args:
        path: the final name the file will be installed under (see :func:`install`).
        parts: the content, written in order without joining (zero-copy).
        fsync: fsync the file before returning.
        mode: permissions of the new file (before the umask).
        drop_cache: advise the kernel to drop the written pages from the page cache
            (a file written once and read rarely).

    Raises:
        OSError: the file could not be written; no temporary file is left.
    """
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            for p in parts:
                f.write(p)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
            if drop_cache and hasattr(os, "posix_fadvise"):
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return tmp


def install(tmp: Path, path: Path, *, fsync: bool = True) -> None:
    """Rename ``tmp`` over ``path`` and (``fsync``) make the rename durable.

    Raises:
        OSError: the rename failed (``tmp`` is removed) or the directory fsync failed.
    """
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    if fsync:
        fsync_dir(path.parent)


def atomic_write(
    path: str | Path,
    data: Buffer | Iterable[Buffer],
    *,
    fsync: bool = True,
    mode: int = 0o600,
    drop_cache: bool = False,
) -> None:
    """Replace ``path`` with ``data`` (one buffer or several, written back to back)
    atomically and, with ``fsync``, durably. See :func:`write_temp` for the arguments.

    Raises:
        OSError: nothing was replaced.
    """
    path = Path(path)
    parts: Iterable[Buffer] = [data] if isinstance(data, bytes | bytearray | memoryview) else data
    install(
        write_temp(path, parts, fsync=fsync, mode=mode, drop_cache=drop_cache), path, fsync=fsync
    )
