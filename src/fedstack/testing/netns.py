"""Throw-away network namespaces for tests that need real, separate network addresses.

:func:`hosts` creates one or two Linux network namespaces ("hosts"): one has only its
loopback interface; two are joined by a veth pair with an address each (``10.79.0.1/24``
and ``10.79.0.2/24`` by default), so a process in one reaches the other only across the
veth, by that address, as two machines on a LAN would. ``Namespace.argv(cmd)`` runs a
command inside (``ip netns exec``), ``Namespace.set_hosts`` gives a namespace its own
``/etc/hosts`` (``ip netns exec`` bind-mounts ``/etc/netns/NAME/hosts``), so a process
inside resolves a host name (the name a TLS certificate is made for) to the other
namespace's address.

Everything is removed on exit, whatever happened inside: the processes still running in
the namespaces (which only the test started) are killed, the namespaces deleted (which
deletes the veth pair), ``/etc/netns/NAME`` removed. Namespaces left behind by a test
process that was killed (their name carries its pid) are removed by the next use.

Needs root and iproute2's ``ip``: :func:`unavailable` says why not, for a skip.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Namespace", "hosts", "unavailable"]

ETC_NETNS = Path("/etc/netns")
RUN_NETNS = Path("/run/netns")
PREFIX = "fedstack-t"
_OURS = re.compile(rf"^{PREFIX}(\d+)-[0-9a-f]+-\d$")
_HOST_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$")


def unavailable() -> str | None:
    """Why :func:`hosts` cannot run here (not root, no ``ip``), or None if it can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2's ip command is not installed"
    return None


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {done.stderr.strip()}")


@dataclass(frozen=True)
class Namespace:
    """One network namespace made by :func:`hosts`.

    Attributes:
        name: Its name (``ip netns list``).
        address: Its address on the veth pair; ``None`` for a lone namespace (loopback
            only).
    """

    name: str
    address: str | None

    def argv(self, command: Sequence[str]) -> list[str]:
        """``command`` run inside this namespace (with its ``/etc/hosts``, if set)."""
        return ["ip", "netns", "exec", self.name, *command]

    def pids(self) -> list[int]:
        """The processes running in this namespace."""
        done = subprocess.run(
            ["ip", "netns", "pids", self.name], capture_output=True, text=True, timeout=30
        )
        return [int(p) for p in done.stdout.split() if p.isdigit()]

    def set_hosts(self, names: Mapping[str, str]) -> None:
        """Give this namespace an ``/etc/hosts`` resolving ``names`` (host name ->
        address) besides ``localhost``, for the commands run through :meth:`argv`.

        Raises:
            ValueError: A name that is not a host name, or an address that is not one.
        """
        lines = ["127.0.0.1 localhost", "::1 localhost ip6-localhost ip6-loopback"]
        for host, addr in names.items():
            if not _HOST_NAME.match(host):
                raise ValueError(f"not a host name: {host!r}")
            lines.append(f"{ipaddress.ip_address(addr)} {host}")
        directory = ETC_NETNS / self.name
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "hosts").write_text("\n".join(lines) + "\n")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(name: str) -> None:
    """Kill what runs in namespace ``name`` and delete it (and its /etc/netns entry)."""
    ns = Namespace(name, None)
    deadline = time.monotonic() + 10
    while (pids := ns.pids()) and time.monotonic() < deadline:
        for pid in pids:  # only this test's processes run in its namespaces
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
    with contextlib.suppress(RuntimeError):
        _ip("netns", "delete", name)
    shutil.rmtree(ETC_NETNS / name, ignore_errors=True)


def _remove_stale() -> None:
    """Delete the namespaces of earlier test processes that died without cleaning up."""
    if not RUN_NETNS.is_dir():
        return
    for entry in RUN_NETNS.iterdir():
        m = _OURS.match(entry.name)
        if m and not _pid_alive(int(m.group(1))):
            _remove(entry.name)


@contextlib.contextmanager
def hosts(count: int, *, subnet: str = "10.79.0.0/24") -> Iterator[tuple[Namespace, ...]]:
    """``count`` (1 or 2) new network namespaces; two are joined by a veth pair with the
    first two addresses of ``subnet``. Removed on exit (see the module docstring).

    Raises:
        ValueError: ``count`` is not 1 or 2, or ``subnet`` is too small.
        RuntimeError: An ``ip`` command failed (the message is its error).
    """
    if count not in (1, 2):
        raise ValueError("hosts() makes 1 or 2 namespaces")
    net = ipaddress.ip_network(subnet)
    if net.num_addresses < 4:
        raise ValueError(f"subnet {subnet} has no room for two hosts")
    _remove_stale()
    tag = f"{PREFIX}{os.getpid()}-{secrets.token_hex(3)}"
    names = [f"{tag}-{i}" for i in range(count)]
    made_etc = not ETC_NETNS.exists()
    made: list[str] = []
    try:
        for name in names:
            _ip("netns", "add", name)
            made.append(name)
            _ip("-n", name, "link", "set", "lo", "up")
        addresses: list[str | None] = [None]
        if count == 2:
            first, second = (str(a) for a in list(net.hosts())[:2])
            addresses = [first, second]
            # made inside the namespaces: nothing is added to the host's own network
            _ip(
                "link", "add", "veth0", "netns", names[0], "type", "veth",
                "peer", "name", "veth0", "netns", names[1],
            )  # fmt: skip
            for name, addr in zip(names, addresses, strict=True):
                _ip("-n", name, "addr", "add", f"{addr}/{net.prefixlen}", "dev", "veth0")
                _ip("-n", name, "link", "set", "veth0", "up")
        yield tuple(Namespace(n, a) for n, a in zip(names, addresses, strict=True))
    finally:
        for name in made:
            _remove(name)
        if made_etc:
            with contextlib.suppress(OSError):  # not empty: someone else's now
                ETC_NETNS.rmdir()
