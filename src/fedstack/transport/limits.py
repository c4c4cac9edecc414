"""Process limits that matter for many connections."""

from __future__ import annotations

import contextlib
import logging

log = logging.getLogger("fedstack.transport")


def raise_nofile_limit(want: int | None = None) -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE (one descriptor per connection) to the hard limit, or
    to ``want`` if smaller. Returns the (soft, hard) limits in force afterwards; (-1, -1)
    where the platform has no such limit."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not POSIX
        return -1, -1
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if want is not None:
        target = min(target, max(soft, want))
    if target > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4096:
        log.info("open-file limit is %d: at most about %d agents can connect", soft, soft - 64)
    return soft, hard
