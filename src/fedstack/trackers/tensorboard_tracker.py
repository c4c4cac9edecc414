"""TensorBoard: event files of scalars, one TensorBoard run per fedstack run and agent.

Layout under the target directory ``DIR`` (``tensorboard --logdir DIR`` shows it)::

    DIR/<run name>-<run id[:8]>/                  round N's figures and metrics at step N
    DIR/<run name>-<run id[:8]>/agents/<agent>/   the agent's num_samples and training
                                                  metrics at the rounds it contributed to

Tags are the store's names (``eval_accuracy``, ``mean_train_loss``, ``seconds``, ...);
an agent's directory is its name (the agents' name grammar, :data:`~fedstack.names.
NAME_PATTERN`, makes it a safe file name); a stored name outside it is made safe
(letters, digits, ``_``, ``-``, ``.``) with the agent id's first 8 characters appended,
so that two agents never share a directory. Values are TensorBoard's scalars
(32-bit floats). The events are written with TensorBoard's own record writer (no thread
per file), each write flushed to the operating system. Each aggregator (or export) writes
new event files beside the old ones; the last round already written is read back from the
run's event files, so that a resumed run or a second export carries on after it.
"""

from __future__ import annotations

import os
import re
import socket
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from fedstack.names import NAME_PATTERN
from fedstack.trackers.base import Tracker, safe_key
from fedstack.trackers.records import AgentRecord, RunMeta

__all__ = ["TensorBoardTracker", "run_directory"]

MARKER_TAG = "num_updates"
"""Every complete round has this tag: the last step holding it is the last round written."""


def run_directory(root: str | Path, run: RunMeta) -> Path:
    """Where the run's event files go under ``root``."""
    return Path(root) / f"{safe_key(run.name)[:64]}-{run.id[:8]}"


def _agent_directory(agent: AgentRecord) -> str:
    if re.fullmatch(NAME_PATTERN, agent.name):  # the agents' grammar: a safe file name
        return agent.name
    return f"{safe_key(agent.name)[:64]}-{safe_key(agent.agent_id)[:8]}"


class _EventFile:
    """One event file, appended to and flushed by each write."""

    def __init__(self, directory: Path) -> None:
        from tensorboard.compat.proto import event_pb2

        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / (
            f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}."
            f"{os.getpid()}.{id(self)}.fedstack"
        )
        self._write(
            [
                event_pb2.Event(
                    wall_time=time.time(), file_version="brain.Event:2"
                ).SerializeToString()
            ]
        )

    def _write(self, records: list[bytes]) -> None:
        from tensorboard.summary.writer.record_writer import RecordWriter

        with open(self.path, "ab") as f:
            writer = RecordWriter(f)
            for r in records:
                writer.write(r)
            f.flush()

    def scalars(self, step: int, wall_time: float, values: Mapping[str, float]) -> None:
        from tensorboard.compat.proto import event_pb2, summary_pb2

        if not values:
            return
        summary = summary_pb2.Summary(
            value=[summary_pb2.Summary.Value(tag=k, simple_value=v) for k, v in values.items()]
        )
        event = event_pb2.Event(wall_time=wall_time, step=step, summary=summary)
        self._write([event.SerializeToString()])


class TensorBoardTracker(Tracker):
    """The run's rounds to TensorBoard event files (see the module docstring)."""

    kind = "tensorboard"

    def __init__(self, target: str) -> None:
        super().__init__(target)
        self.root = Path(target).expanduser()
        self.directory = self.root
        self._main: _EventFile | None = None
        self._agents: dict[str, _EventFile] = {}

    @property
    def location(self) -> str:
        return str(self.directory)

    def open(self, run: RunMeta) -> None:
        from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

        self.directory = run_directory(self.root, run)
        if self.directory.is_dir():
            for path in sorted(self.directory.glob("events.out.tfevents.*")):
                for event in EventFileLoader(str(path)).Load():
                    if event.HasField("summary"):
                        tags = {v.tag for v in event.summary.value}
                        self.held.setdefault(int(event.step), set()).update(tags)
                        if MARKER_TAG in tags:
                            self.last = max(self.last, int(event.step))
        self._main = _EventFile(self.directory)

    def names(self, scalars: Mapping[str, float]) -> dict[str, float]:
        return _tags(scalars)

    def write(
        self,
        round: int,
        wall_time: float,
        scalars: Mapping[str, float],
        agents: Sequence[AgentRecord],
        *,
        complete: bool,
    ) -> None:
        assert self._main is not None
        for agent in agents:
            f = self._agents.get(agent.agent_id)
            if f is None:
                f = self._agents[agent.agent_id] = _EventFile(
                    self.directory / "agents" / _agent_directory(agent)
                )
            f.scalars(round, wall_time, _tags(agent.scalars()))
        # the run's scalars last: the marker tag says the round is complete
        values = dict(scalars)
        if not complete:
            values.pop(MARKER_TAG, None)
        self._main.scalars(round, wall_time, values)

    def close(self, *, finished: bool) -> None:
        self._main = None
        self._agents.clear()


def _tags(values: Mapping[str, float]) -> dict[str, float]:
    """Tag names from store keys: printable, at most 200 characters."""
    out: dict[str, float] = {}
    for k, v in values.items():
        tag = "".join(c if c.isprintable() else "_" for c in k)[:200] or "_"
        out.setdefault(tag, v)
    return out
