"""Agent names and agent-controlled text shown to people.

An agent chooses its own name, and its metrics, reasons and event details travel into the
operator's terminal and logs. Two rules keep them from forging log lines, recolouring a
terminal or impersonating another name visually:

- **Names follow a grammar**, :data:`NAME_PATTERN`: 1 to 128 characters, ASCII letters and
  digits first, then letters, digits and ``. _ @ + -``. That covers host names, e-mail
  style ``site@org`` names and numbered agents (``agent-7``, ``sim-00042``), and excludes
  spaces, control characters, escape sequences, bidirectional and zero-width characters
  and look-alike letters from other scripts. :func:`check_agent_name` enforces it where a
  name enters: the :class:`~fedstack.agent.Agent` constructor, the wire decoder of
  ``participate`` (the aggregator refuses with error code ``bad-name``) and
  ``fedstack credentials add``.
- **Text is escaped when shown**, :func:`safe_text`: every character Python does not
  consider printable (control characters, so ANSI/OSC escape sequences and newlines; format
  characters such as U+202E RIGHT-TO-LEFT OVERRIDE and U+200B ZERO WIDTH SPACE; separators
  other than the ASCII space; unassigned and private-use code points) is shown as its
  Python escape (``\\x1b``, ``\\n``, ``\\u202e``). The CLI uses it for every name, metric
  key, reason and event detail it prints, and :class:`SafeFormatter` for its log lines.
"""

from __future__ import annotations

import logging
import re

from fedstack.errors import ConfigError

__all__ = [
    "MAX_NAME_LENGTH",
    "NAME_PATTERN",
    "BadName",
    "SafeFormatter",
    "check_agent_name",
    "safe_text",
]

MAX_NAME_LENGTH = 128
NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}"
"""The grammar of agent (and operator credential) names."""
_NAME = re.compile(NAME_PATTERN)
_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


class BadName(ConfigError, ValueError):
    """A name outside :data:`NAME_PATTERN` (a ``ValueError`` too, as the ``Agent``
    constructor raised for an empty name before)."""


def check_agent_name(name: object) -> str:
    """Return ``name`` if it follows :data:`NAME_PATTERN`.

    Raises:
        BadName: ``name`` is not a string of that grammar; the message shows it escaped.
    """
    if isinstance(name, str) and _NAME.fullmatch(name):
        return name
    shown = safe_text(name if isinstance(name, str) else repr(name), limit=80)
    raise BadName(
        f"agent name '{shown}' is refused: a name has 1-{MAX_NAME_LENGTH} "
        "characters, ASCII letters and digits first, then letters, digits and "
        ". _ @ + -"
    )


def safe_text(text: object, limit: int | None = None) -> str:
    """``str(text)`` with every non-printable character shown as its escape.

    Args:
        text: Anything; agent-controlled strings in particular.
        limit: If given, longer results are cut to this many characters plus ``...``.

    Returns:
        Text that cannot move the cursor, change colours, start a new line or reorder
        what follows it on a terminal.
    """
    s = text if isinstance(text, str) else str(text)
    if not s.isprintable():
        s = "".join(c if c.isprintable() else _escape(c) for c in s)
    if limit is not None and len(s) > limit:
        s = s[:limit] + "..."
    return s


def _escape(c: str) -> str:
    if c in _SHORT:
        return _SHORT[c]
    n = ord(c)
    return f"\\x{n:02x}" if n < 0x100 else (f"\\u{n:04x}" if n < 0x10000 else f"\\U{n:08x}")


class SafeFormatter(logging.Formatter):
    """A log formatter that escapes the message (:func:`safe_text`), so a log line stays
    one line whatever an agent put in a name or reason; tracebacks are kept as they are."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - stdlib name
        record.message = safe_text(record.message)
        return super().formatMessage(record)
