"""The simulator's progress bar on stderr (rich), one step per completed round."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

__all__ = ["RoundBar"]


class RoundBar:
    """A ``rounds`` bar: completed/total, elapsed and remaining time, the sampled agents
    and the last round's seconds. Shown from construction until :meth:`close`."""

    def __init__(self, total: int, agents: str) -> None:
        self._agents = agents
        self._progress = Progress(
            TextColumn("rounds"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[status]}"),
            console=Console(file=sys.stderr, markup=False, highlight=False),
        )
        self._task = self._progress.add_task("rounds", total=total, status="")
        self._progress.start()

    def advance(self, seconds: float) -> None:
        """One more round done, which took ``seconds``."""
        self._progress.update(
            self._task, advance=1, status=f"agents={self._agents} s={seconds:.3f}"
        )

    def close(self) -> None:
        """Stop refreshing; the bar's last state stays on the terminal."""
        self._progress.stop()
