"""Following a run into trackers: live beside an aggregator, or at once for a past run.

:class:`Follower` logs a run's rounds from the store into trackers: every round after the
last one a tracker holds entirely (its own figures, metrics and agents), and for the rounds
it holds, the values it lacks (the central evaluation's ``eval_*``, stored after the round
was logged). Nothing is logged twice: each tracker reads what it holds when it opens.

:class:`TrackerSink` is the aggregator's side (``--track``): the round owner calls
:meth:`TrackerSink.round_changed` after a round is committed and the driver after its
evaluation is stored; each call only records the round number. A thread of its own reads
the round back from the store and writes to the trackers, so a slow or unreachable
tracker never holds a round. A tracker that fails (cannot open, a write raises) is logged
once, at error level, and disabled for the rest of the run; the others go on. Rounds
committed while no write was possible (a restart, a gap) are caught up from the store
on the next notification.

:func:`export_run` is ``fedstack db export --to``: the same, synchronous, errors raised.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from fedstack.errors import FedstackError, StoreError
from fedstack.store import Store
from fedstack.trackers.base import Tracker, make_tracker
from fedstack.trackers.records import RunMeta, read_rounds, round_record

__all__ = ["ExportResult", "Follower", "TrackerSink", "export_run"]

log = logging.getLogger("fedstack.trackers")

CLOSE_TIMEOUT = 10.0
"""Seconds an aggregator stopping waits for the trackers' pending writes."""
STORE_RETRY = 1.0
"""Seconds before reading the store again after it failed."""


class Follower:
    """Logs run ``run``'s rounds from ``store`` into ``trackers`` (module docstring).

    Args:
        on_error: called with a tracker and the exception that disabled it (default:
            re-raise).
    """

    def __init__(
        self,
        store: Store,
        run: RunMeta,
        trackers: Sequence[Tracker],
        on_error: Callable[[Tracker, BaseException], None] | None = None,
    ) -> None:
        self.store = store
        self.run = run
        self.trackers = list(trackers)
        self._opened: set[int] = set()  # id() of the trackers opened and not failed
        self._on_error = on_error
        self.rounds_logged = 0
        """Rounds logged entirely."""
        self.values_added = 0
        """Values logged into rounds a tracker held already (metrics stored later)."""

    @property
    def active(self) -> list[Tracker]:
        """The trackers opened and not failed."""
        return [t for t in self.trackers if id(t) in self._opened]

    def _fail(self, tracker: Tracker, exc: BaseException) -> None:
        self._opened.discard(id(tracker))
        if self._on_error is None:
            raise exc
        self._on_error(tracker, exc)

    def open(self) -> None:
        """Open every tracker (one that fails is disabled)."""
        for t in self.trackers:
            try:
                t.open(self.run)
                self._opened.add(id(t))
            except Exception as exc:
                self._fail(t, exc)

    def follow(self, wanted: Iterable[int] = (), *, everything: bool = False) -> None:
        """Log what the trackers lack of the rounds up to ``max(wanted)`` that one of them
        does not hold entirely, and of the rounds in ``wanted`` (``everything``: of every
        round of the run).

        Raises:
            StoreError: The store cannot be read (nothing is lost: call again).
        """
        wanted = set(wanted)
        active = self.active
        if not active or not (wanted or everything):
            return
        if everything:
            rows = self.store.rounds(self.run.id)
        else:
            lo = min(t.last for t in active) + 1
            rows = read_rounds(self.store, self.run.id, set(range(lo, max(wanted) + 1)) | wanted)
        for row in rows:
            rnd = int(row["round"])
            full = [t for t in active if rnd > t.last]
            record = round_record(self.store, row, agents=bool(full))
            scalars = record.scalars()
            for t in list(active):
                try:
                    if t in full:
                        t.log(rnd, record.finished, scalars, record.agents, complete=True)
                    else:
                        self.values_added += t.log(rnd, record.finished, scalars)
                except Exception as exc:
                    active.remove(t)
                    self._fail(t, exc)
            if full:
                self.rounds_logged += 1

    def disable_all(self) -> None:
        """Stop logging to every tracker (they are not closed)."""
        self._opened.clear()

    def close(self, *, finished: bool) -> None:
        """Close every tracker that is still active."""
        for t in self.active:
            try:
                t.close(finished=finished)
            except Exception as exc:
                self._fail(t, exc)


class TrackerSink:
    """An aggregator's trackers (module docstring); built from ``--track`` specs.

    Raises:
        ConfigError: A spec is refused or its extra is not installed.
    """

    def __init__(self, specs: Sequence[str]) -> None:
        self.trackers = [make_tracker(s) for s in specs]
        self._cond = threading.Condition()
        self._pending: set[int] = set()
        self._closing = False
        self._finished = False
        self._thread: threading.Thread | None = None
        self.failed: list[str] = []
        """Specs of the trackers disabled by an error."""

    def start(self, store: Store, run: RunMeta) -> None:
        """Open the trackers and catch up on the run's rounds, in the sink's thread."""
        follower = Follower(store, run, self.trackers, self._disable)
        self._thread = threading.Thread(
            target=self._run, args=(follower,), name="fedstack-trackers", daemon=True
        )
        self._thread.start()

    def round_changed(self, round: int) -> None:
        """Round ``round`` was committed, or metrics of it were stored (returns at once)."""
        with self._cond:
            self._pending.add(round)
            self._cond.notify()

    async def close(self, *, finished: bool, timeout: float = CLOSE_TIMEOUT) -> None:
        """Write what is pending (for ``timeout`` seconds at most) and close the trackers;
        ``finished``: the run is over."""
        with self._cond:
            self._closing = True
            self._finished = finished
            self._cond.notify()
        thread = self._thread
        if thread is None:
            return
        await asyncio.to_thread(thread.join, timeout)
        if thread.is_alive():
            log.warning(
                "experiment trackers still writing after %g s; not waiting for them", timeout
            )

    def _disable(self, tracker: Tracker, exc: BaseException) -> None:
        self.failed.append(tracker.spec)
        log.error(
            "experiment tracker %s failed and is disabled for the rest of this run "
            "(the rounds go on; `fedstack db export --to %s` can fill it in later): %s",
            tracker.spec,
            tracker.kind,
            _reason(exc, tracker),
        )

    def _run(self, follower: Follower) -> None:
        follower.open()
        for t in follower.active:
            log.info("tracking run %s in %s %s", follower.run.id[:8], t.kind, t.location)
        # first and last, what the trackers lack of the whole run (a resumed run, a gap,
        # an evaluation stored after the notification was handled)
        self._follow(follower, everything=True)
        while True:
            with self._cond:
                while not self._pending and not self._closing:
                    self._cond.wait()
                pending, self._pending = self._pending, set()
                closing = self._closing
            if pending and not self._follow(follower, pending):
                with self._cond:  # the store failed: again after a pause
                    self._pending |= pending
                    if not self._closing:
                        self._cond.wait(STORE_RETRY)
                continue
            if closing:
                with self._cond:
                    if self._pending:
                        continue
                self._follow(follower, everything=True)
                break
        follower.close(finished=self._finished)

    def _follow(
        self, follower: Follower, wanted: Iterable[int] = (), *, everything: bool = False
    ) -> bool:
        """One pass; False if the store could not be read (logged)."""
        if not follower.active:
            return True
        try:
            follower.follow(wanted, everything=everything)
        except StoreError as exc:
            if self._closing:
                log.warning("trackers: rounds not written (the store failed): %s", exc)
                return True  # closing: give up
            log.warning("trackers: cannot read the store (retrying): %s", exc)
            return False
        except Exception:  # reading the run back failed unexpectedly: stop tracking it
            log.exception("experiment trackers disabled for the rest of this run")
            follower.disable_all()
        return True


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_run` did."""

    rounds: int
    """Rounds logged entirely."""
    values_added: int
    """Values added to rounds the tracker held already (e.g. an evaluation stored after
    the round was logged live)."""
    last: int
    """The last round the tracker holds now."""
    location: str
    """Where the run is (an MLflow run, a directory)."""


def export_run(store: Store, run: RunMeta, spec: str) -> ExportResult:
    """Log the stored rounds of ``run`` that tracker ``spec`` does not hold yet.

    Raises:
        ConfigError: A bad spec or a missing extra.
        FedstackError: The tracker failed (its message says why).
    """
    tracker = make_tracker(spec)
    follower = Follower(store, run, [tracker])
    try:
        follower.open()
        follower.follow(everything=True)
        follower.close(finished=run.status == "finished")
    except FedstackError:
        raise
    except Exception as exc:
        raise FedstackError(f"{tracker.spec}: {_reason(exc, tracker)}") from exc
    return ExportResult(
        follower.rounds_logged, follower.values_added, tracker.last, tracker.location
    )


def _reason(exc: BaseException, tracker: Tracker) -> str:
    """The first line of ``exc``'s message, without the tracker's password."""
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0][:300]}" if lines else type(exc).__name__
    for secret in tracker.secrets:
        text = text.replace(secret, "***")
    return text
