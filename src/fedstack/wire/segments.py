"""A message held as consecutive read-only buffers instead of one contiguous buffer.

The in-process transport hands an agent's upload to the aggregator this way: the encoded
parts (header, then each tensor's bytes) are passed on as they are, so a 100 MB model is
not copied into a message buffer only to be decoded as views again.
:func:`fedstack.wire.decode` accepts a :class:`Segments` wherever it accepts bytes; a
tensor that lies inside one part is decoded as a (read-only) view of it, one that spans
parts is copied.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

Buffer = bytes | bytearray | memoryview

__all__ = ["Segments"]


class Segments:
    """Read-only, zero-copy concatenation of ``parts`` (see the module docstring)."""

    __slots__ = ("_parts", "_starts", "nbytes")

    def __init__(self, parts: Sequence[Buffer]) -> None:
        self._parts = [memoryview(p).cast("B").toreadonly() for p in parts]
        starts = [0]
        for p in self._parts:
            starts.append(starts[-1] + p.nbytes)
        self._starts = starts
        self.nbytes = starts[-1]

    def __len__(self) -> int:
        return self.nbytes

    def __getitem__(self, key: slice) -> Segments:
        """The bytes ``key`` selects (no step), as Segments; nothing is copied."""
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("Segments support only contiguous slices")
        start, stop, _ = key.indices(self.nbytes)
        parts: list[memoryview] = []
        i = bisect.bisect_right(self._starts, start) - 1
        while start < stop and i < len(self._parts) and self._starts[i] < stop:
            lo = max(start, self._starts[i]) - self._starts[i]
            hi = min(stop, self._starts[i + 1]) - self._starts[i]
            if hi > lo:
                parts.append(self._parts[i][lo:hi])
            i += 1
        return Segments(parts)

    def contiguous(self) -> memoryview:
        """All the bytes as one read-only buffer: a view when they lie in one part, else a
        copy."""
        if len(self._parts) == 1:
            return self._parts[0]
        return memoryview(b"".join(self._parts))
