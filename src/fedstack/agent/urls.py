"""The aggregator URLs an agent knows, and the order it tries them in.

An agent is given one aggregator URL or several (members of one federation: aggregators
sharing a store and a run). :class:`KnownAggregators` keeps them (checked by
:func:`check_url`), adds the URLs it *learns* from each welcome
(:attr:`fedstack.wire.Welcome.aggregators`, the federation's other live members; each
welcome's list replaces the previous one, the given URLs are always kept, at most
:data:`MAX_LEARNED` are kept) and says in which order to try them after a failure
(:meth:`KnownAggregators.cycle`): the current one first, once, then the others in order.

Learned URLs come from the aggregator, so they are treated as attacker-controlled: only
``ws://``/``wss://``/``inproc://`` URLs with a host are kept (not an unspecified address
such as ``0.0.0.0``), never a ``ws://`` URL when the agent was given ``wss://`` ones (no
downgrade to clear text for the credential), and
they are logged only as truncated ``repr`` text (:func:`safe_url`).

Everything here runs on the agent core's event loop (no locks).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from urllib.parse import urlsplit

from fedstack.errors import ConfigError

__all__ = [
    "MAX_LEARNED",
    "SCHEMES",
    "KnownAggregators",
    "check_url",
    "check_urls",
    "endpoint",
    "safe_url",
]

log = logging.getLogger("fedstack.agent")

SCHEMES = ("ws", "wss", "inproc")
"""The URL schemes an agent connects to."""

MAX_LEARNED = 32
"""Most URLs kept from the welcomes (the given ones are always kept)."""

MAX_URL_LEN = 512

UNSPECIFIED = frozenset({"0.0.0.0", "::", "0:0:0:0:0:0:0:0"})
"""Listening addresses that name no host: never learned as an aggregator's URL."""


def safe_url(url: str) -> str:
    """``url`` as text safe to log or show (quoted, truncated, non-printables escaped)."""
    return repr(url[:120]) + ("..." if len(url) > 120 else "")


def check_url(url: object) -> str:
    """``url`` if it is an aggregator URL an agent can connect to: ``ws://HOST:PORT``,
    ``wss://HOST:PORT`` or ``inproc://NAME`` (surrounding blanks removed).

    Raises:
        ConfigError: anything else (the message says why; the URL is quoted safely).
    """
    if not isinstance(url, str):
        raise ConfigError(f"an aggregator URL must be a string, not {type(url).__name__}")
    url = url.strip()
    if not url:
        raise ConfigError("an aggregator URL must not be empty")
    if len(url) > MAX_URL_LEN or not url.isprintable():
        raise ConfigError(f"not an aggregator URL: {safe_url(url)}")
    try:
        parts = urlsplit(url)
        port = parts.port  # ValueError: not a port number
    except ValueError as exc:
        raise ConfigError(f"not an aggregator URL: {safe_url(url)} ({exc})") from None
    if parts.scheme not in SCHEMES or "://" not in url:
        raise ConfigError(
            f"not an aggregator URL: {safe_url(url)} (expected ws://HOST:PORT, "
            "wss://HOST:PORT or inproc://NAME)"
        )
    if parts.scheme == "inproc":
        if not (parts.netloc or parts.path.lstrip("/")):
            raise ConfigError(f"an inproc:// URL needs a name: {safe_url(url)}")
    elif not parts.hostname:
        raise ConfigError(f"an aggregator URL needs a host: {safe_url(url)}")
    elif port == 0:
        raise ConfigError(f"an aggregator URL needs a port other than 0: {safe_url(url)}")
    return url


def endpoint(url: str) -> tuple[str, int] | str:
    """What identifies the aggregator at ``url`` (a checked URL): its host and port, or
    the whole ``inproc://`` URL."""
    parts = urlsplit(url)
    if parts.scheme == "inproc" or parts.hostname is None:
        return url
    return parts.hostname.lower(), parts.port or (443 if parts.scheme == "wss" else 80)


def check_urls(url: str | Sequence[str]) -> list[str]:
    """The aggregator URL(s) given to an agent, checked, in order, without duplicates.

    Two URLs naming the same host and port name one aggregator: the later one replaces
    the earlier (a repeated ``--url`` for one aggregator overrides, as a single option did).

    Raises:
        ConfigError: none given, or one of them is not an aggregator URL.
    """
    urls: Sequence[object] = [url] if isinstance(url, str) else url
    if isinstance(urls, (bytes, bytearray)) or not isinstance(urls, Sequence):
        raise ConfigError(f"url must be a URL or a sequence of URLs, not {type(urls).__name__}")
    out: list[str] = []
    where: dict[tuple[str, int] | str, int] = {}
    for u in urls:
        checked = check_url(u)
        key = endpoint(checked)
        if key in where:  # the same aggregator again: the later URL replaces the earlier
            out[where[key]] = checked
        else:
            where[key] = len(out)
            out.append(checked)
    if not out:
        raise ConfigError("an agent needs at least one aggregator URL")
    return out


class KnownAggregators:
    """The URLs an agent may connect to (see the module docstring).

    Attributes:
        given: the URLs given to the agent (and those it was moved to), in order.
        learned: the URLs learned from the latest welcome, in its order.
        home: the URL the agent was last welcomed by (at first: the first given).
    """

    def __init__(self, url: str | Sequence[str]) -> None:
        self.given = check_urls(url)
        self.learned: list[str] = []
        self.home = self.given[0]
        self.tls_only = any(u.startswith("wss://") for u in self.given)
        """Given wss:// URLs: learned URLs must be wss:// too."""

    @property
    def all(self) -> list[str]:
        """Every known URL: the given ones, then the learned ones."""
        return [*self.given, *self.learned]

    def add(self, url: str) -> str:
        """Add ``url`` (checked) to the given URLs if it is not given yet; return it.

        Raises:
            ConfigError: ``url`` is not an aggregator URL.
        """
        url = check_url(url)
        key = endpoint(url)
        given = [endpoint(u) for u in self.given]
        if key in given:  # the same aggregator: this URL replaces the one known
            self.given[given.index(key)] = url
        else:
            self.given.append(url)
        self.learned = [u for u in self.learned if endpoint(u) != key]
        if url.startswith("wss://"):
            self.tls_only = True
        return url

    def learn(self, urls: Iterable[str], via: str) -> bool:
        """Replace the learned URLs with ``urls`` (a welcome's list, received from ``via``;
        ``via`` itself is kept as known). URLs that are not acceptable are skipped (logged
        at DEBUG). Returns True if the learned list changed."""
        learned: list[str] = []
        seen = {endpoint(u) for u in self.given}
        if via not in self.given:
            learned.append(via)
            seen.add(endpoint(via))
        for raw in urls:
            if len(learned) >= MAX_LEARNED:
                log.debug("ignoring learned aggregator URLs beyond %d", MAX_LEARNED)
                break
            try:
                url = check_url(raw)
            except ConfigError as exc:
                log.debug("ignoring a learned aggregator URL: %s", exc)
                continue
            if self.tls_only and not url.startswith("wss://"):
                log.debug("ignoring a learned aggregator URL without TLS: %s", safe_url(url))
                continue
            if urlsplit(url).hostname in UNSPECIFIED:
                # a member listening on all interfaces that advertises no address: from
                # here that would be this host, not the member
                log.debug("ignoring a learned aggregator URL without an address: %s", safe_url(url))
                continue
            key = endpoint(url)
            if key not in seen:
                seen.add(key)
                learned.append(url)
        changed = learned != self.learned
        self.learned = learned
        return changed

    def cycle(self, start: str | None = None, *, demote: str | None = None) -> list[str]:
        """The URLs to try in order, once each: ``start`` (default: :attr:`home`) first,
        then the others as :attr:`all` lists them. ``demote`` (e.g. an aggregator that
        stopped answering) goes last instead."""
        first = self.home if start is None else start
        known = self.all
        order = [first, *(u for u in known if u != first)]
        if demote is not None and demote in order and len(order) > 1:
            order.remove(demote)
            order.append(demote)
        return order
