"""An edge aggregator cut off from its upstream aggregator (book row 71: edge aggregators
with intermittent connectivity).

The edge (``upstream`` set) reaches the upper aggregator through the chaos proxy, which
the test partitions (:meth:`ChaosProxy.cut`) and heals (:meth:`ChaosProxy.restore`).
While cut, the edge's cluster keeps completing rounds: its versions advance from its own
semi-global models (``upstream_offline`` = 1) and the upper aggregator goes on with its
direct agent. Once the link is back, the edge's latest semi-global model reaches the upper
aggregator, whose staleness policy decides: ``next`` -> stored and aggregated as
accepted-late, ``drop`` -> stored as stale; and the edge follows the upper global model
again (``upstream_version``). Real sockets on 127.0.0.1, agents uploading constants.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from chaosproxy import ChaosProxy

from fedstack import Agent, FederationFinished, Store
from fedstack.testing import aggregator_thread, small_config

SHAPE = (3,)
EDGE_SAMPLES = (20, 30)
EDGE_VALUES = (3.0, 5.0)
SEMI = sum(v * n for v, n in zip(EDGE_VALUES, EDGE_SAMPLES, strict=True)) / sum(EDGE_SAMPLES)


config = small_config


@dataclass
class LoopAgent:
    """Uploads ``value`` (``n`` samples) on every global model until stopped."""

    url: str
    name: str
    value: float
    n: int
    delay: float
    stop: threading.Event
    versions: list[int] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)
    thread: threading.Thread | None = None

    def start(self) -> LoopAgent:
        self.thread = threading.Thread(target=self._run, daemon=True, name=f"agent-{self.name}")
        self.thread.start()
        return self

    def _run(self) -> None:
        agent = Agent(self.url, self.name, max_backoff=0.5, connect_timeout=5.0)
        agent.send_initial_model({"w": np.zeros(SHAPE)}, self.n)
        try:
            agent.start(timeout=30)
            while not self.stop.is_set():
                try:
                    agent.wait_for_global_model(timeout=0.5)
                except TimeoutError:
                    continue
                except FederationFinished:
                    return
                self.versions.append(agent.version)
                time.sleep(self.delay)
                agent.send_trained_model({"w": np.full(SHAPE, self.value)}, self.n)
        except BaseException as exc:  # reported to the test
            self.errors.append(exc)
        finally:
            agent.close(timeout=3)

    def join(self) -> None:
        assert self.thread is not None
        self.thread.join(10)
        assert not self.errors, f"{self.name}: {self.errors!r}"


def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.05)


class Watch:
    """Reads an aggregator's store while it runs."""

    def __init__(self, db: Path) -> None:
        self.db = db
        self._store: Store | None = None

    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = Store.open_readonly(str(self.db))
        return self._store

    def run_id(self) -> str:
        rid = self.store.latest_run_id()
        assert rid is not None
        return rid

    def rounds(self) -> list[dict[str, Any]]:
        return self.store.rounds(self.run_id()) if self.db.exists() else []

    def uploads_of(self, name: str) -> list[dict[str, Any]]:
        return [m for m in self.store.models(self.run_id(), kind="local") if m["agent"] == name]

    def close(self) -> None:
        if self._store is not None:
            self._store.close()


def offline(r: dict[str, Any]) -> bool:
    return bool((r["metrics"] or {}).get("upstream_offline"))


def online(r: dict[str, Any]) -> bool:
    return "upstream_version" in (r["metrics"] or {})


@pytest.mark.parametrize("policy", ["next", "drop"])
def test_edge_keeps_training_while_cut_off_and_merges_after(tmp_path: Path, policy: str) -> None:
    stop = threading.Event()
    agents: list[LoopAgent] = []
    edge_watch, upper_watch = Watch(tmp_path / "edge.db"), Watch(tmp_path / "upper.db")
    started = time.monotonic()
    try:
        with (
            aggregator_thread(config(tmp_path / "upper.db", min_agents=1, staleness=policy)) as up,
            ChaosProxy(up.port, seed=0, max_cuts=0, max_stalls=0, fault_seconds=0) as proxy,
        ):
            up_url = f"ws://127.0.0.1:{up.port}"
            agents.append(LoopAgent(up_url, "direct", 1.0, 10, 0.1, stop).start())
            wait_for(lambda: up.state.version >= 0, 20, "the upper run to start")
            with aggregator_thread(
                config(
                    tmp_path / "edge.db",
                    min_agents=2,
                    name="edge1",
                    upstream=f"ws://127.0.0.1:{proxy.port}",
                    upstream_timeout=2.0,
                )
            ) as edge:
                e_url = f"ws://127.0.0.1:{edge.port}"
                for i, (v, n) in enumerate(zip(EDGE_VALUES, EDGE_SAMPLES, strict=True)):
                    agents.append(LoopAgent(e_url, f"e{i}", v, n, 0.05, stop).start())

                # 1. connected: the edge's versions come from the upper aggregator
                wait_for(lambda: sum(map(online, edge_watch.rounds())) >= 2, 20, "2 rounds through")
                # 2. partition: the cluster keeps training on its own semi-global models
                proxy.cut()
                cut_at = len(edge_watch.rounds())
                upper_at = up.state.version
                wait_for(
                    lambda: sum(map(offline, edge_watch.rounds()[cut_at:])) >= 3,
                    20,
                    "3 edge rounds while cut off",
                )
                wait_for(lambda: up.state.version >= upper_at + 3, 10, "upper rounds without it")
                during = edge_watch.rounds()
                late = during[-1]
                assert offline(late) and not online(late)
                # 3. healed: the latest semi-global model goes up, the policy decides
                proxy.restore()
                healed_at = len(during)

                def merged() -> bool:
                    return any(
                        u["base_version"] < u["round"] - 1
                        and u["status"] == ("aggregated" if policy == "next" else "stale")
                        for u in upper_watch.uploads_of("edge1")
                    )

                wait_for(merged, 20, f"the edge's semi-global model merged by policy {policy}")
                wait_for(
                    lambda: any(online(r) for r in edge_watch.rounds()[healed_at:]),
                    20,
                    "the edge to follow the upper global model again",
                )
                stop.set()
                for a in agents:
                    a.join()

        rounds = edge_watch.rounds()
        assert [r["round"] for r in rounds] == list(range(1, len(rounds) + 1))  # contiguous
        assert sum(map(offline, rounds)) >= 3
        assert all(online(r) != offline(r) for r in rounds)
        # what reached the upper aggregator after the partition: the cluster's semi-global
        # model with the cluster's sample count, trained on an old upper version
        stale = [u for u in upper_watch.uploads_of("edge1") if u["base_version"] < u["round"] - 1]
        assert stale
        for u in stale:
            assert u["num_samples"] == sum(EDGE_SAMPLES)
            np.testing.assert_allclose(upper_watch.store.load_weights(u["id"])["w"], SEMI)
        statuses = {u["status"] for u in stale}
        if policy == "next":  # a second upload within the same upper round: a duplicate
            assert "aggregated" in statuses and statuses <= {"aggregated", "duplicate"}, statuses
        else:
            assert statuses == {"stale"}, statuses
        # the edge's global models while cut off were its own semi-global models
        for r in rounds:
            if offline(r):
                w = edge_watch.store.load_weights(r["model_id"])["w"]
                np.testing.assert_allclose(w, SEMI)
        assert proxy.stats.partitions == 1 and proxy.stats.refused >= 1
        assert time.monotonic() - started < 60
    finally:
        stop.set()
        edge_watch.close()
        upper_watch.close()
