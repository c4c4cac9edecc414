"""The tracker interface, the ``KIND:TARGET`` specs that name one, and safe names.

A tracker is made from a spec (``mlflow:URI`` or ``tensorboard:DIR``, :func:`make_tracker`),
which imports its library (a missing extra is a :class:`~fedstack.errors.ConfigError`
naming the ``pip install``); :meth:`Tracker.open` finds or creates the destination of a
fedstack run and says up to which round it already holds the run (so
that following a resumed run, or exporting a run twice, never logs a round twice).
"""

from __future__ import annotations

import abc
import contextlib
import importlib.util
import re
from collections.abc import Mapping, Sequence
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

from fedstack.errors import ConfigError
from fedstack.trackers.records import AgentRecord, RunMeta

__all__ = [
    "KINDS",
    "Tracker",
    "check_installed",
    "make_tracker",
    "parse_spec",
    "redacted",
    "safe_key",
]

Kind = Literal["mlflow", "tensorboard"]
KINDS: dict[str, tuple[str, str]] = {
    "mlflow": ("mlflow", "mlflow"),
    "tensorboard": ("tensorboard", "tensorboard"),
}
"""kind -> (the module it needs, the fedstack extra that installs it)."""
_MODULES = {
    "mlflow": ("mlflow.entities", "mlflow.exceptions", "mlflow.tracking"),
    "tensorboard": (
        "tensorboard.compat.proto.event_pb2",
        "tensorboard.compat.proto.summary_pb2",
        "tensorboard.summary.writer.record_writer",
        "tensorboard.backend.event_processing.event_file_loader",
    ),
}
"""The modules a tracker uses, imported when it is made: in the thread that makes it, as
imports of these libraries from two threads at once can fail half-way (MLflow's
circular imports)."""
_PRELOAD = {
    "mlflow": (
        "mlflow.store.tracking.file_store",
        "mlflow.store.tracking.rest_store",
        "mlflow.utils.name_utils",
        "mlflow.protos.internal_pb2",
    ),
    "tensorboard": (),
}
"""Modules the library imports lazily on first use, imported beforehand for the same
reason where this version of the library has them."""

MAX_KEY = 200
_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-]")


def parse_spec(spec: str) -> tuple[Kind, str]:
    """``"mlflow:URI"`` -> ``("mlflow", "URI")``; ``"tensorboard:DIR"`` likewise.

    Raises:
        ConfigError: Another kind, or no target.
    """
    kind, sep, target = spec.partition(":")
    if not sep or kind not in KINDS or not target.strip():
        raise ConfigError(
            f"tracker {spec!r} is refused: expected mlflow:URI (a tracking URI or a "
            "directory) or tensorboard:DIR"
        )
    if not target.isprintable():
        raise ConfigError(f"tracker {spec!r} is refused: control characters in the target")
    return kind, target  # type: ignore[return-value]


def check_installed(kind: str) -> None:
    """Import what ``kind``'s tracker uses; a missing library is a :class:`ConfigError`
    naming the extra."""
    module, extra = KINDS[kind]
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise ConfigError(f"the {kind} tracker needs {module}: pip install 'fedstack[{extra}]'")
    for name in _MODULES[kind]:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise ConfigError(
                f"the {kind} tracker cannot import {name} ({exc}): pip install 'fedstack[{extra}]'"
            ) from None
    for name in _PRELOAD[kind]:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)


def redacted(target: str) -> str:
    """``target`` with the password of a URL's user information shown as ``***``."""
    try:
        parts = urlsplit(target)
        password = parts.password
    except ValueError:
        return target
    if not password:
        return target
    netloc = parts.netloc.rsplit("@", 1)
    user = netloc[0].split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[1]}"))


def safe_key(key: str) -> str:
    """``key`` (agent-controlled text) as a name every tracker accepts: letters, digits,
    ``_``, ``-`` and ``.`` (anything else becomes ``_``), not starting with ``.``, at most
    :data:`MAX_KEY` characters."""
    out = _UNSAFE.sub("_", key)[:MAX_KEY]
    if not out or out.startswith("."):
        out = "_" + out[: MAX_KEY - 1]
    return out


def safe_scalars(values: Mapping[str, float]) -> dict[str, float]:
    """``values`` with :func:`safe_key` names, in name order; where two names become
    equal, the later one gets ``_2`` (``_3``, ...) appended."""
    out: dict[str, float] = {}
    for k in sorted(values):
        name = safe_key(k)
        if name in out:
            n = 2
            while f"{name}_{n}" in out:
                n += 1
            name = f"{name}_{n}"
        out[name] = values[k]
    return out


class Tracker(abc.ABC):
    """One destination of a run's rounds (see the module docstring).

    A subclass opens the destination (:meth:`open`: it sets :attr:`last` and fills
    :attr:`held` with what is already there), names values its own way (:meth:`names`)
    and writes (:meth:`write`); :meth:`log` writes only what the destination lacks.
    """

    kind: str = ""

    def __init__(self, target: str) -> None:
        self.target = target
        self.last = 0
        """The last round entirely logged (its figures, metrics and agents)."""
        self.held: dict[int, set[str]] = {}
        """round -> the run's values held at that step, by the tracker's names."""

    @property
    def spec(self) -> str:
        """``KIND:TARGET`` for logs and messages (a password in the target hidden)."""
        return f"{self.kind}:{redacted(self.target)}"

    @abc.abstractmethod
    def open(self, run: RunMeta) -> None:
        """Find or create the run's destination; set :attr:`last` and :attr:`held`.

        Raises:
            Exception: Whatever the tracker's library raises.
        """

    @abc.abstractmethod
    def names(self, scalars: Mapping[str, float]) -> dict[str, float]:
        """``scalars`` (store names) by the names this tracker writes."""

    @abc.abstractmethod
    def write(
        self,
        round: int,
        wall_time: float,
        scalars: Mapping[str, float],
        agents: Sequence[AgentRecord],
        *,
        complete: bool,
    ) -> None:
        """Write the run's ``scalars`` (tracker names) and each agent's at step ``round``
        (``complete``: as the last write of a round logged entirely)."""

    @abc.abstractmethod
    def close(self, *, finished: bool) -> None:
        """Flush and release; ``finished``: the fedstack run is over (the destination is
        marked finished where the tracker has such a state)."""

    def log(
        self,
        round: int,
        wall_time: float,
        scalars: Mapping[str, float],
        agents: Sequence[AgentRecord] = (),
        *,
        complete: bool = False,
    ) -> int:
        """Log the run's ``scalars`` the destination does not hold at step ``round`` (and,
        with ``complete``, ``agents``: the round is then logged entirely). Returns the
        number of the run's values written.

        Raises:
            Exception: Whatever the tracker's library raises.
        """
        held = self.held.setdefault(round, set())
        new = {k: v for k, v in self.names(scalars).items() if k not in held}
        if not new and not complete:
            return 0
        self.write(round, wall_time, new, agents if complete else (), complete=complete)
        held.update(new)
        if complete:
            self.last = max(self.last, round)
        return len(new)

    @property
    def location(self) -> str:
        """Where the run went (an MLflow run id, a directory), once opened."""
        return redacted(self.target)

    @property
    def secrets(self) -> list[str]:
        """Text never to show: the password of the target's URL, if it has one."""
        try:
            password = urlsplit(self.target).password
        except ValueError:
            return []
        return [password] if password else []


def make_tracker(spec: str) -> Tracker:
    """The tracker of ``spec`` (``mlflow:URI`` or ``tensorboard:DIR``), not opened.

    Raises:
        ConfigError: A bad spec, or its extra is not installed.
    """
    kind, target = parse_spec(spec)
    check_installed(kind)
    if kind == "mlflow":
        from fedstack.trackers.mlflow_tracker import MlflowTracker

        return MlflowTracker(target)
    from fedstack.trackers.tensorboard_tracker import TensorBoardTracker

    return TensorBoardTracker(target)
