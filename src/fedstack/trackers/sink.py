"""Following a run into trackers: live beside an aggregator, or at once for a past run.

:class:`Follower` logs a run's rounds from the store into trackers: every round after the
last one a tracker holds (its own figures, metrics and agents), and for the rounds it
logged itself, metrics stored later (the central evaluation's ``eval_*``).

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

from fedstack.errors import FedstackError, StoreError
from fedstack.store import Store
from fedstack.trackers.base import Tracker, make_tracker
from fedstack.trackers.records import RunMeta, read_rounds, round_record

__all__ = ["ExportResult", "Follower", "TrackerSink", "export_run"]

log = logging.getLogger("fedstack.trackers")

KEEP_LOGGED = 64
"""Rounds whose logged metric names are remembered (for metrics stored after the round)."""
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
        self.last: dict[int, int] = {}  # id(tracker) -> last round it holds
        self._logged: dict[int, set[str]] = {}  # round -> scalars logged by this follower
        self._on_error = on_error
        self.rounds_logged = 0

    @property
    def active(self) -> list[Tracker]:
        """The trackers opened and not failed."""
        return [t for t in self.trackers if id(t) in self.last]

    def _fail(self, tracker: Tracker, exc: BaseException) -> None:
        self.last.pop(id(tracker), None)
        if self._on_error is None:
            raise exc
        self._on_error(tracker, exc)

    def open(self) -> None:
        """Open every tracker (one that fails is disabled)."""
        for t in self.trackers:
            try:
                self.last[id(t)] = t.open(self.run)
            except Exception as exc:
                self._fail(t, exc)

    def follow(self, wanted: Iterable[int]) -> None:
        """Log the rounds up to ``max(wanted)`` that a tracker lacks and the new metrics of
        the rounds in ``wanted`` this follower logged.

        Raises:
            StoreError: The store cannot be read (nothing is lost: call again).
        """
        wanted = set(wanted)
        active = self.active
        if not wanted or not active:
            return
        lo = min(self.last[id(t)] for t in active) + 1
        rounds = set(range(lo, max(wanted) + 1)) | (wanted & set(self._logged))
        for row in read_rounds(self.store, self.run.id, rounds):
            rnd = int(row["round"])
            full = {id(t) for t in active if rnd > self.last[id(t)]}
            record = round_record(self.store, row, agents=bool(full))
            scalars = record.scalars()
            seen = self._logged.get(rnd)
            for t in list(active):
                try:
                    if id(t) in full:
                        t.log(rnd, record.finished, scalars, record.agents, complete=True)
                        self.last[id(t)] = rnd
                    elif seen is not None:
                        new = {k: v for k, v in scalars.items() if k not in seen}
                        if new:
                            t.log(rnd, record.finished, new, (), complete=False)
                except Exception as exc:
                    active.remove(t)
                    self._fail(t, exc)
            if full:
                self.rounds_logged += 1
            self._logged[rnd] = set(scalars)
        for rnd in sorted(self._logged)[:-KEEP_LOGGED]:
            del self._logged[rnd]

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
            _reason(exc),
        )

    def _run(self, follower: Follower) -> None:
        follower.open()
        for t in follower.active:
            log.info("tracking run %s in %s %s", follower.run.id[:8], t.kind, t.location)
        try:
            latest = follower.store.rounds(follower.run.id, limit=1)
            if latest:
                self.round_changed(int(latest[-1]["round"]))
        except StoreError as exc:
            log.warning("trackers: cannot read the run's rounds yet: %s", exc)
        while True:
            with self._cond:
                while not self._pending and not self._closing:
                    self._cond.wait()
                pending, self._pending = self._pending, set()
                closing = self._closing
            if not follower.active:
                if closing:
                    break
                continue
            try:
                follower.follow(pending)
            except StoreError as exc:
                if closing:
                    log.warning("trackers: pending rounds not written: %s", exc)
                    break
                log.warning("trackers: cannot read the store (retrying): %s", exc)
                with self._cond:
                    self._pending |= pending
                    self._cond.wait(STORE_RETRY)
                continue
            if closing:
                with self._cond:
                    if not self._pending:
                        break
        follower.close(finished=self._finished)


class ExportResult:
    """What :func:`export_run` did: rounds written and where."""

    def __init__(self, rounds: int, last: int, location: str) -> None:
        self.rounds = rounds
        self.last = last
        self.location = location


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
        latest = store.rounds(run.id, limit=1)
        if latest:
            follower.follow([int(latest[-1]["round"])])
        follower.close(finished=run.status == "finished")
    except FedstackError:
        raise
    except Exception as exc:
        raise FedstackError(f"{spec}: {_reason(exc)}") from exc
    return ExportResult(follower.rounds_logged, follower.last.get(id(tracker), 0), tracker.location)


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300]}" if text else type(exc).__name__
