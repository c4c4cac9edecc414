"""PostgreSQL restarted (``pg_ctl restart``) and stopped for a few seconds mid-run.

Real aggregator processes (``python -m fedstack aggregator --db postgresql+psycopg://...``,
every blob in the database) and three deterministic thread agents run on a throwaway
PostgreSQL server, which is restarted once and stopped for 3 s, each time with uploads of
a round in flight, then stopped for 2 s while a round commit is in progress (held back by
a row lock the test takes on the run, so that the outage lands inside it). Two layouts:
one aggregator with the three agents, and a federation of two members (a: agents 0 and 1,
b: agent 2) on the same database.

Asserted: while the server is down no aggregator acknowledges anything it had not stored
before; they recover by themselves (no restart, no operator action), retrying the cut
commit; the run then completes exactly: rounds contiguous, no global version twice,
every acknowledged upload in the store, every agent's update counted once per round, and
the final model bit-identical to the fault-free run of the same layout.
"""

from __future__ import annotations

import functools
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from faultlib import aggregator_args, check_run, join_all, start_thread_agent, wait_for

from fedstack import Store
from fedstack.errors import StoreError
from fedstack.testing import AggregatorProcess
from fedstack.testing.postgres import PostgresServer, unavailable_reason

ROUNDS = 8
OUTAGE = 3.0
SINGLE: dict[str | None, list[int]] = {
    None: [0, 1, 2]
}  # one aggregator (no --name) with the three agents
FEDERATION: dict[str | None, list[int]] = {
    "a": [0, 1],
    "b": [2],
}  # member name -> its agents' seeds
FEDERATION_DELAY = 0.6  # seconds an agent of the federation trains (heartbeat: 0.25 s)
NOWHERE = "ws://127.0.0.1:1"
"""The URL the members advertise: agents learn no usable peer, so the clusters stay as
laid out (this test is about the database; failover has its own tests) and the result is
deterministic."""


class Progress:
    """The run's global version as seen from the database (the last value while the
    server is down)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.store: Store | None = None
        self.version = 0

    def __call__(self) -> int:
        try:
            if self.store is None:
                self.store = Store(self.url, migrate=False)
            run = self.store.latest_run_id()
            if run is not None:
                self.version = max(self.store.get_run(run).version, 0)
        except StoreError:
            pass
        return self.version

    def close(self) -> None:
        if self.store is not None:
            self.store.close()


class Run:
    """The aggregators (one per layout entry) and the thread agents of one run."""

    def __init__(self, tmp: Path, url: str, layout: dict[str | None, list[int]]) -> None:
        self.members: dict[str | None, AggregatorProcess] = {}
        for name, seeds in layout.items():
            work = tmp / (name or "aggregator")
            work.mkdir()
            args = aggregator_args(work / "fed", ROUNDS)
            args[args.index("--db") + 1] = url  # no --blob-dir: every blob in PostgreSQL
            args[args.index("--min-agents") + 1] = str(len(seeds))
            if name is not None:
                args[args.index("--finish-grace") + 1] = "1"
                args += ["--run-name", "fed", "--name", name, "--advertise-url", NOWHERE]
                args += ["--federation-heartbeat", "0.25"]
            self.members[name] = AggregatorProcess(work, *args)
        starting = [threading.Thread(target=p.start) for p in self.members.values()]
        for th in starting:  # at once (each is a Python process to import)
            th.start()
        for th in starting:
            th.join(60)
        for name, proc in self.members.items():
            assert proc.proc is not None and proc.proc.poll() is None, f"{name} not started"
        # In a federation each agent trains for longer than a heartbeat interval: every
        # member's agents are in its heartbeat before any cluster delivers a round (sync
        # synthesis waits only for members reporting agents)
        delay = 0.05 if None in layout else FEDERATION_DELAY
        self.agents = [
            start_thread_agent(self.members[name].url, f"agent-{seed}", seed, delay=delay)
            for name, seeds in layout.items()
            for seed in seeds
        ]

    def finish(self) -> None:
        join_all(self.agents, 90)
        for name, proc in self.members.items():
            assert proc.wait(60) == 0, f"{name}: {proc.log_text()[-3000:]}"

    def close(self) -> None:
        for proc in self.members.values():
            proc.close()

    @property
    def reports(self) -> list[dict[str, Any]]:
        return [a.report for a in self.agents]

    def log(self) -> str:
        return "\n".join(p.log_text() for p in self.members.values())


def _skip_without_postgres() -> None:
    if (reason := unavailable_reason()) is not None:
        pytest.skip(reason)


@pytest.mark.serial  # the stop lands during round 7's commit only if that commit is the
# first to wait for the held run row: a CPU-starved round on a loaded two-worker run can
# let another write wait first (seen twice in this session's runs)
def test_postgres_restart_and_outage_mid_run(
    tmp_path: Path, reference: dict[int, dict[str, np.ndarray]]
) -> None:
    _skip_without_postgres()
    with PostgresServer() as server:  # its own server: this test stops it
        url = server.create_database("fed")
        run, seen, outages = _faulty_run(server, url, tmp_path, SINGLE)
        summary = check_run(url, ROUNDS, run.reports, reference[ROUNDS])
        created = _created(url)
    log = run.log()
    _check_outages(log, seen, outages, created)
    assert "cannot store round 7 (will retry)" in log, "the round commit was not cut"
    print(
        f"\noutages {[(k, round(b - a, 2)) for k, a, _, _, b in outages]}: "
        f"{summary['acked']} acks, reconnects {[r.get('reconnects') for r in run.reports]}"
    )


def test_federation_on_postgres_restart_and_outage_mid_run(tmp_path: Path) -> None:
    _skip_without_postgres()
    with PostgresServer() as server:
        ref_url = server.create_database("ref")
        (tmp_path / "ref").mkdir()
        ref = Run(tmp_path / "ref", ref_url, FEDERATION)  # fault-free, same layout
        try:
            ref.finish()
        finally:
            ref.close()
        expected, departures = _check_federation(ref_url, ref.reports, None)
        assert not departures, departures  # the fault-free run follows the schedule
        (tmp_path / "faults").mkdir()
        url = server.create_database("fed")
        run, seen, outages = _faulty_run(server, url, tmp_path / "faults", FEDERATION)
        _, departures = _check_federation(url, run.reports, expected)
        created = _created(url)
    log = run.log()
    _check_outages(log, seen, outages, created)
    assert "will retry" in log, "no commit was cut"
    print(
        f"\nfederation outages {[(k, round(b - a, 2)) for k, a, _, _, b in outages]}, "
        f"reconnects {[r.get('reconnects') for r in run.reports]}, departures {departures}"
    )
    # exact: every global from both members, each from its cluster's agents (sync
    # synthesis waits for a live member that delivered the round before, even while its
    # agents reconnect after the outage and its heartbeat counts none)
    assert not departures, departures


Outage = tuple[str, float, float, float, float]
"""kind, stop asked, down (stop returned), start asked, up (start returned)"""


def _faulty_run(
    server: PostgresServer, url: str, tmp: Path, layout: dict[str | None, list[int]]
) -> tuple[Run, dict[str, float], list[Outage]]:
    """Run ``layout`` to the end through a restart, a stop and a stop during a commit.
    Returns the run, when each acknowledgement reached its agent (wall clock) and the
    outages."""
    run = Run(tmp, url, layout)
    progress = Progress(url)
    seen: dict[str, float] = {}
    outages: list[Outage] = []
    stop = threading.Event()

    def monitor() -> None:
        while not stop.is_set():
            for a in run.agents:
                for ack in list(a.agent.acknowledged):
                    seen.setdefault(ack.upload_id, time.time())
            time.sleep(0.002)

    mon = threading.Thread(target=monitor, daemon=True)
    mon.start()
    try:
        for at_version, kind in ((2, "restart"), (4, "stop"), (6, "stop-commit")):
            reached = functools.partial(lambda v: progress() >= v, at_version)
            assert wait_for(reached, 40, 0.01), (
                f"stuck at version {progress.version} before the {kind}; "
                f"agent errors {[a.error for a in run.agents if a.error]}"
            )
            held = _hold_run_row(server) if kind == "stop-commit" else None
            if held is not None:  # the next global version's commit waits for the lock
                assert wait_for(lambda: _lock_waiters(server) > 0, 30, 0.01), "no commit"
            else:
                time.sleep(0.03)  # with uploads of the next round in flight
            t0 = time.time()
            if kind == "restart":
                server.restart()
                down = restart = t0
            else:
                server.stop()  # returns once the server is down (transactions aborted)
                down = time.time()
                time.sleep(OUTAGE if held is None else OUTAGE - 1)
                restart = time.time()
                server.start()
            if held is not None:
                held.close()
            outages.append((kind, t0, down, restart, time.time()))
            for name, proc in run.members.items():
                assert proc.proc is not None and proc.proc.poll() is None, f"{name} died"
        run.finish()
    finally:
        stop.set()
        mon.join(5)
        progress.close()
        run.close()
    return run, seen, outages


def _check_outages(
    log: str, seen: dict[str, float], outages: list[Outage], created: dict[str, float]
) -> None:
    """Nothing acknowledged is missing from the store; no acknowledgement while the server
    was surely down (between the stop's return and the start's call) but for uploads
    stored before; the outages reached the aggregators, which recovered by themselves."""
    assert "Traceback" not in log, log[-3000:]
    assert all(u in created for u in seen), "an acknowledged upload is not in the store"
    for _, _, down, restart, _ in outages[1:]:
        during = {u: (t, created[u]) for u, t in seen.items() if down < t <= restart}
        assert all(c < down for _, c in during.values()), (down, restart, during)
    assert "the store is unavailable" in log, "the outage never reached the aggregator"


def _check_federation(
    url: str, reports: list[dict[str, Any]], expected: dict[str, np.ndarray] | None
) -> tuple[dict[str, np.ndarray], list[str]]:
    """Check a federation's finished run; return its final model and how it departed
    from the fault-free schedule (none: asserted bit-identical to ``expected``).

    Always asserted: global versions 1..ROUNDS once each, each bit-identical to the
    synthesis of the semi-global models its lineage names; no local model aggregated
    twice; nothing left buffered; every acknowledged upload stored; every agent ended
    with the final model. The fault-free schedule: each global made from one semi-global
    model per member, each of those from one update per agent of its cluster, trained on
    the previous global model.
    """
    from fedstack.aggregator.synthesis import SynthesisInput, synthesize

    store = Store(url)
    try:
        (info,) = store.list_runs()
        run_id = info["id"]
        assert info["status"] == "finished", info["status"]
        rounds = store.rounds(run_id)
        assert [r["round"] for r in rounds] == list(range(1, ROUNDS + 1))
        globals_ = store.models(run_id, "cluster")
        assert sorted(m["round"] for m in globals_) == list(range(0, ROUNDS + 1))
        local = {m["id"]: m for m in store.models(run_id, "local")}
        names = {m.id: m.name for m in store.federation_view(run_id, 1, liveness=5).members}
        departures: list[str] = []
        for r in rounds:
            semis = [p for p in store.parents(r["model_id"]) if p["relation"] == "input"]
            members = sorted(names[s["producer"]] for s in semis)
            if members != sorted(str(n) for n in FEDERATION):
                departures.append(f"global {r['round']} synthesised from {members} only")
            inputs = []
            for semi in semis:
                name = names[semi["producer"]]
                ups = [
                    local[q["id"]] for q in store.parents(semi["id"]) if q["relation"] == "input"
                ]
                agents = sorted(u["agent"] for u in ups)
                if agents != [f"agent-{i}" for i in FEDERATION[name]] or any(
                    u["base_version"] != r["round"] - 1 for u in ups
                ):
                    departures.append(f"round {r['round']} of {name}: {agents}")
                weights = store.load_weights(semi["id"])
                inputs.append(SynthesisInput(name, semi["id"], semi["num_samples"], weights))
            synthesized = synthesize(inputs)
            stored = store.load_weights(r["model_id"])
            for k, v in synthesized.items():
                assert np.array_equal(stored[k], v), f"global {r['round']}: {k} not synthesised"
        aggregated = [
            q["id"]
            for semi in store.models(run_id, "semi-global")
            for q in store.parents(semi["id"])
            if q["relation"] == "input"
        ]
        assert len(aggregated) == len(set(aggregated)), "a local model aggregated twice"
        assert not [m for m in local.values() if m["status"] == "buffered"]
        stored_ids = {m["upload_id"] for m in local.values() if m["upload_id"]}
        for rep in reports:
            for upload_id, _status in rep.get("acked", []):
                assert upload_id in stored_ids, f"acknowledged upload {upload_id} not stored"
        final = store.load_weights(rounds[-1]["model_id"])
        for rep in reports:
            assert rep.get("versions", [None])[-1] == ROUNDS
            for k, v in final.items():
                assert np.array_equal(np.asarray(rep["final"][k], v.dtype), v)
        if expected is not None and not departures:
            for k, v in expected.items():
                assert final[k].dtype == v.dtype and np.array_equal(final[k], v), k
        return final, departures
    finally:
        store.close()


def _created(url: str) -> dict[str, float]:
    """upload id -> when the store wrote it (wall clock, this host)."""
    store = Store(url)
    try:
        run = store.latest_run_id()
        assert run is not None
        return {m["upload_id"]: m["created"] for m in store.models(run, "local") if m["upload_id"]}
    finally:
        store.close()


def _hold_run_row(server: PostgresServer) -> Any:
    """A connection holding a ``FOR NO KEY UPDATE`` lock on the run's row: the commit of
    the next global version (which updates the run's version) waits for it; uploads
    (foreign-key checks take ``KEY SHARE``) do not."""
    import psycopg

    con = psycopg.connect(server.conninfo("fed"))
    con.execute("SELECT id FROM runs FOR NO KEY UPDATE")
    return con


def _lock_waiters(server: PostgresServer) -> int:
    import psycopg

    with psycopg.connect(server.conninfo("fed"), autocommit=True) as con:
        row = con.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = 'fed' "
            "AND wait_event_type = 'Lock'"
        ).fetchone()
    return 0 if row is None else int(row[0])
