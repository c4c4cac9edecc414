"""Tiers of aggregators (book rows 33 and 71): an aggregator with ``upstream`` set is ONE
agent of the upper aggregator.

Real aggregators (each in its own thread and event loop, its own SQLite store) and real
agents on 127.0.0.1 sockets. The agents upload constants with sample counts, so every
global model is an exact sample-weighted mean of the leaf agents' constants, whatever the
timing: a global model that holds a value of another cluster proves it went through the
upper tier.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedstack import Agent, AggregatorConfig, FederationFinished, Store
from fedstack.aggregator import Aggregator
from fedstack.aggregator.upstream import UPSTREAM_TOKEN_ENV
from fedstack.errors import ConfigError, RegistrationRefused
from fedstack.security import make_test_pki
from fedstack.testing import AggregatorProcess, aggregator_thread, free_port, small_config

SHAPE = (4,)
ROUNDS = 3


def config(db: Path, **kw: Any) -> AggregatorConfig:
    """A small test aggregator: synchronous rounds of ``min_agents`` uploads."""
    return small_config(db, **{"rounds": ROUNDS, "finish_grace": 2.0, "round_timeout": 60.0, **kw})


@dataclass
class ConstAgent:
    """An agent thread that uploads ``value`` (``n`` samples) on every global model."""

    url: str
    name: str
    value: float
    n: int
    initial: float = 0.0
    options: dict[str, Any] = field(default_factory=dict)
    delay: float = 0.0  # seconds of "training" per round
    shape: tuple[int, ...] = SHAPE
    received: list[tuple[int, np.ndarray]] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)
    finished: bool = False
    thread: threading.Thread | None = None

    def start(self) -> ConstAgent:
        self.thread = threading.Thread(target=self._run, daemon=True, name=f"agent-{self.name}")
        self.thread.start()
        return self

    def _run(self) -> None:
        agent = Agent(self.url, self.name, max_backoff=0.5, connect_timeout=5.0, **self.options)
        agent.send_initial_model({"w": np.full(self.shape, self.initial)}, self.n)
        try:
            agent.start(timeout=30)
            while True:
                try:
                    gm = agent.wait_for_global_model(timeout=30)
                except FederationFinished:
                    self.finished = True
                    return
                self.received.append((agent.version, np.array(gm["w"])))
                time.sleep(self.delay)
                agent.send_trained_model({"w": np.full(self.shape, self.value)}, self.n)
        except BaseException as exc:  # reported by join()
            self.errors.append(exc)
        finally:
            agent.close(timeout=5)

    def join(self, timeout: float) -> None:
        assert self.thread is not None
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"agent {self.name} still running"
        assert not self.errors, f"agent {self.name}: {self.errors!r}"
        assert self.finished, f"agent {self.name} did not see the federation finish"


def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def finish(agg: Aggregator, timeout: float = 30.0) -> None:
    """Wait until ``agg`` aggregated its last round."""
    wait_for(lambda: agg.state.finished, timeout, f"aggregator {agg.config.name} to finish")


def weighted(*pairs: tuple[float, int]) -> float:
    return sum(v * n for v, n in pairs) / sum(n for _, n in pairs)


@pytest.fixture
def stack() -> Iterator[ExitStack]:
    with ExitStack() as s:
        yield s


def start_agg(stack: ExitStack, cfg: AggregatorConfig) -> Aggregator:
    agg: Aggregator = stack.enter_context(aggregator_thread(cfg))
    return agg


def read_store(db: Path) -> Store:
    return Store.open_readonly(str(db))


def check_lineage(db: Path, agents: set[str]) -> None:
    """Every global model of the run <-input- its semi-global model <-input- the local
    models of ``agents`` (and <-base- the previous global model)."""
    store = read_store(db)
    try:
        run_id = store.latest_run_id()
        assert run_id is not None
        rounds = store.rounds(run_id)
        assert [r["round"] for r in rounds] == list(range(1, ROUNDS + 1))
        for r in rounds:
            parents = store.parents(r["model_id"])
            inputs = [p for p in parents if p["relation"] == "input"]
            assert [p["kind"] for p in inputs] == ["semi-global"], parents
            semi = inputs[0]
            assert semi["round"] == r["round"]
            assert [p["kind"] for p in parents if p["relation"] == "base"] == ["cluster"]
            locals_ = [p for p in store.parents(semi["id"]) if p["relation"] == "input"]
            assert {p["kind"] for p in locals_} == {"local"}
            assert {p["agent"] for p in locals_} == agents
            assert "upstream_version" in (r["metrics"] or {}), r
            assert "upstream_offline" not in (r["metrics"] or {}), r
    finally:
        store.close()


@pytest.mark.parametrize("delivery", ["push", "poll"])
def test_two_tiers_edge_agents_receive_the_upper_global_model(
    tmp_path: Path, stack: ExitStack, delivery: str
) -> None:
    """upper <- (direct agent, edge <- (e1, e2)): the edge's agents receive the upper's
    global model, which holds the direct agent's contribution; the edge's store has
    global <- semi-global <- local models. The upper pushes its global models, or its
    agents (the edge's link too) poll for them."""
    upper = start_agg(stack, config(tmp_path / "upper.db", min_agents=2, delivery=delivery))
    up_url = f"ws://127.0.0.1:{upper.port}"
    direct = ConstAgent(up_url, "direct", 1.0, 10).start()
    wait_for(lambda: upper.state.version == 0, 20, "the upper run to start")
    edge = start_agg(
        stack,
        config(
            tmp_path / "edge.db", min_agents=2, name="edge1", upstream=up_url, upstream_timeout=15.0
        ),
    )
    assert edge.state.version == 0  # the upper global model started the edge's run
    e_url = f"ws://127.0.0.1:{edge.port}"
    leaves = [ConstAgent(e_url, "e1", 2.0, 20).start(), ConstAgent(e_url, "e2", 5.0, 30).start()]
    for a in [direct, *leaves]:
        a.join(40)
    finish(upper)
    finish(edge)

    expected = weighted((1.0, 10), (2.0, 20), (5.0, 30))  # 10/3, over all three leaves
    for a in [direct, *leaves]:
        versions = [v for v, _ in a.received]
        assert versions == list(range(ROUNDS + 1)), (a.name, versions)
        assert np.all(a.received[0][1] == 0.0)
        for v, w in a.received[1:]:
            np.testing.assert_allclose(w, expected, rtol=0, atol=1e-12, err_msg=f"{a.name} v{v}")
    check_lineage(tmp_path / "edge.db", {"e1", "e2"})

    # the upper aggregator saw the edge as one agent with its cluster's sample count
    store = read_store(tmp_path / "upper.db")
    try:
        run_id = store.latest_run_id()
        ups = [m for m in store.models(run_id, kind="local") if m["agent"] == "edge1"]
        assert [m["num_samples"] for m in ups] == [50] * ROUNDS
        assert {m["status"] for m in ups} == {"aggregated"}
    finally:
        store.close()


def test_three_tiers_end_to_end(tmp_path: Path, stack: ExitStack) -> None:
    """top <- (t, middle <- (m, edge <- (e1, e2))): every leaf agent, on every tier,
    receives the exact sample-weighted mean of all four leaves."""
    top = start_agg(stack, config(tmp_path / "top.db", min_agents=2))
    top_url = f"ws://127.0.0.1:{top.port}"
    t = ConstAgent(top_url, "t", 1.0, 10).start()
    wait_for(lambda: top.state.version == 0, 20, "the top run to start")
    middle = start_agg(
        stack,
        config(
            tmp_path / "middle.db",
            min_agents=2,
            name="middle",
            upstream=top_url,
            upstream_timeout=20.0,
        ),
    )
    mid_url = f"ws://127.0.0.1:{middle.port}"
    m = ConstAgent(mid_url, "m", 3.0, 20).start()
    edge = start_agg(
        stack,
        config(
            tmp_path / "edge.db", min_agents=2, name="edge", upstream=mid_url, upstream_timeout=20.0
        ),
    )
    e_url = f"ws://127.0.0.1:{edge.port}"
    leaves = [ConstAgent(e_url, "e1", 6.0, 30).start(), ConstAgent(e_url, "e2", 10.0, 40).start()]
    everyone = [t, m, *leaves]
    for a in everyone:
        a.join(40)
    for agg in (top, middle, edge):
        finish(agg)

    expected = weighted((1.0, 10), (3.0, 20), (6.0, 30), (10.0, 40))
    assert expected == 6.5
    for a in everyone:
        assert [v for v, _ in a.received] == list(range(ROUNDS + 1)), a.name
        for v, w in a.received[1:]:
            np.testing.assert_allclose(w, expected, rtol=0, atol=1e-9, err_msg=f"{a.name} v{v}")
    check_lineage(tmp_path / "edge.db", {"e1", "e2"})
    check_lineage(tmp_path / "middle.db", {"m", "edge"})

    # what each tier sent up: its cluster's total sample count and its semi-global value
    for db, name, n, value in (
        ("middle.db", "edge", 70, weighted((6.0, 30), (10.0, 40))),
        ("top.db", "middle", 90, weighted((3.0, 20), (6.0, 30), (10.0, 40))),
    ):
        store = read_store(tmp_path / db)
        try:
            ups = [
                m for m in store.models(store.latest_run_id(), kind="local") if m["agent"] == name
            ]
            assert [u["num_samples"] for u in ups] == [n] * ROUNDS
            for u in ups:
                np.testing.assert_allclose(store.load_weights(u["id"])["w"], value, atol=1e-9)
        finally:
            store.close()


def test_edge_started_before_the_upper_has_a_model(tmp_path: Path, stack: ExitStack) -> None:
    """No federation upstream yet: the edge's first agent's model starts the edge's run
    and, proposed upstream, the upper's run; the rounds then flow through both tiers."""
    upper = start_agg(stack, config(tmp_path / "upper.db", min_agents=2))
    up_url = f"ws://127.0.0.1:{upper.port}"
    t0 = time.monotonic()
    edge = start_agg(
        stack,
        config(
            tmp_path / "edge.db", min_agents=1, name="edge1", upstream=up_url, upstream_timeout=5.0
        ),
    )
    assert time.monotonic() - t0 < 15  # the start waited for the upper's welcome, bounded
    assert edge.state.version == -1 and upper.state.version == -1
    e_url = f"ws://127.0.0.1:{edge.port}"
    leaf = ConstAgent(e_url, "e1", 4.0, 30, initial=7.0).start()
    wait_for(lambda: upper.state.version == 0, 20, "the upper run to start from the edge's")
    np.testing.assert_array_equal(upper.global_weights["w"], 7.0)  # type: ignore[index]
    direct = ConstAgent(up_url, "direct", 1.0, 10).start()
    for a in (leaf, direct):
        a.join(40)
    finish(upper)
    finish(edge)
    expected = weighted((1.0, 10), (4.0, 30))
    for a in (leaf, direct):
        assert np.all(a.received[0][1] == 7.0)
        for _, w in a.received[1:]:
            np.testing.assert_allclose(w, expected, atol=1e-12)


def test_upstream_over_tls_with_a_credential(
    tmp_path: Path, stack: ExitStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A wss:// upper aggregator that requires credentials: the edge presents the token
    of FEDSTACK_UPSTREAM_TOKEN and verifies the upper's certificate with upstream_ca; a
    wrong token stops the edge at start with RegistrationRefused."""
    pki = make_test_pki(tmp_path / "pki")
    db = tmp_path / "upper.db"
    store = Store(str(db))
    try:
        direct_token = store.issue_credential("direct")
        edge_token = store.issue_credential("edge1")
    finally:
        store.close()
    upper = start_agg(
        stack,
        config(
            db,
            min_agents=2,
            auth="required",
            tls_cert=str(pki.server_cert),
            tls_key=str(pki.server_key),
        ),
    )
    up_url = f"wss://localhost:{upper.port}"
    options = {"token": direct_token, "ca": str(pki.ca)}
    direct = ConstAgent(up_url, "direct", 1.0, 10, options=options).start()
    wait_for(lambda: upper.state.version == 0, 20, "the upper run to start")
    edge_cfg = config(
        tmp_path / "edge.db",
        min_agents=1,
        name="edge1",
        upstream=up_url,
        upstream_ca=str(pki.ca),
        upstream_timeout=15.0,
    )
    monkeypatch.setenv(UPSTREAM_TOKEN_ENV, "not-the-token-of-edge1-at-all")

    async def refused() -> None:
        agg = Aggregator(edge_cfg.replace(db=str(tmp_path / "refused.db")))
        try:
            with pytest.raises(RegistrationRefused):
                await agg.start()
        finally:
            await agg.stop()

    asyncio.run(refused())
    monkeypatch.setenv(UPSTREAM_TOKEN_ENV, edge_token)
    edge = start_agg(stack, edge_cfg)
    assert edge.state.version == 0
    leaf = ConstAgent(f"ws://127.0.0.1:{edge.port}", "e1", 3.0, 30).start()
    for a in (direct, leaf):
        a.join(40)
    expected = weighted((1.0, 10), (3.0, 30))
    for a in (direct, leaf):
        for _, w in a.received[1:]:
            np.testing.assert_allclose(w, expected, atol=1e-12)


def test_cli_edge_aggregator(
    tmp_path: Path, stack: ExitStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``fedstack aggregator --name edge1 --upstream URL`` in a subprocess, with its
    credential in FEDSTACK_UPSTREAM_TOKEN, below an upper aggregator requiring one."""
    db = tmp_path / "upper.db"
    store = Store(str(db))
    try:
        direct_token = store.issue_credential("direct")
        edge_token = store.issue_credential("edge1")
    finally:
        store.close()
    upper = start_agg(stack, config(db, min_agents=2, auth="required"))
    up_url = f"ws://127.0.0.1:{upper.port}"
    direct = ConstAgent(up_url, "direct", 1.0, 10, options={"token": direct_token}).start()
    wait_for(lambda: upper.state.version == 0, 20, "the upper run to start")
    monkeypatch.setenv(UPSTREAM_TOKEN_ENV, edge_token)
    # the edge's settings: flags, and (auth) a file
    (tmp_path / "edge.json").write_text(json.dumps({"auth": "off", "round_timeout": 60}))
    edge = AggregatorProcess(
        tmp_path,
        *("--config", str(tmp_path / "edge.json"), "--db", str(tmp_path / "edge.db")),
        *("--name", "edge1", "--upstream", up_url, "--upstream-timeout", "15"),
        *("--rounds", str(ROUNDS), "--min-agents", "1", "--threshold", "1.0"),
        *("--heartbeat-interval", "0.5", "--finish-grace", "2"),
        *("--strategy-param", "precision=float64"),
    )
    stack.callback(edge.close)
    edge.start()
    leaf = ConstAgent(edge.url, "e1", 3.0, 30).start()
    for a in (direct, leaf):
        a.join(40)
    assert edge.wait(20) == 0, edge.log_text()[-2000:]
    expected = weighted((1.0, 10), (3.0, 30))
    for a in (direct, leaf):
        assert [v for v, _ in a.received] == list(range(ROUNDS + 1)), a.name
        for _, w in a.received[1:]:
            np.testing.assert_allclose(w, expected, atol=1e-12)


def test_edge_restarted_carries_on(tmp_path: Path, stack: ExitStack) -> None:
    """An edge aggregator stopped after a round and started again on its database and
    port resumes its run (same member) and keeps following the upper global model."""
    upper = start_agg(stack, config(tmp_path / "upper.db", min_agents=2))
    up_url = f"ws://127.0.0.1:{upper.port}"
    direct = ConstAgent(up_url, "direct", 1.0, 10).start()
    wait_for(lambda: upper.state.version == 0, 20, "the upper run to start")
    edge_cfg = config(
        tmp_path / "edge.db",
        port=free_port(),
        min_agents=2,
        name="edge1",
        upstream=up_url,
        upstream_timeout=15.0,
    )
    with aggregator_thread(edge_cfg) as first:
        e_url = f"ws://127.0.0.1:{first.port}"
        leaves = [
            ConstAgent(e_url, "e1", 2.0, 20).start(),
            ConstAgent(e_url, "e2", 5.0, 30).start(),
        ]
        wait_for(lambda: first.state.version >= 1, 20, "a first edge round")
        member = first.aggregator_id
    edge = start_agg(stack, edge_cfg)
    assert edge.aggregator_id == member and edge.state.version >= 1
    for a in [direct, *leaves]:
        a.join(40)
    finish(upper)
    finish(edge)
    expected = weighted((1.0, 10), (2.0, 20), (5.0, 30))
    for a in [direct, *leaves]:
        for v, w in a.received[1:]:
            np.testing.assert_allclose(w, expected, atol=1e-12, err_msg=f"{a.name} v{v}")
    check_lineage(tmp_path / "edge.db", {"e1", "e2"})


def test_edge_below_a_member_of_a_horizontal_federation(tmp_path: Path, stack: ExitStack) -> None:
    """The upper tier is itself a horizontal federation (members A and B on one store):
    the edge is one agent of member A; every leaf, on either member or below the edge,
    receives the synthesis of all clusters."""
    fed = dict(
        run_name="upper",
        federation_heartbeat=0.2,
        liveness_timeout=2.0,
        synthesis_timeout=20.0,
        blob_dir=str(tmp_path / "upper.blobs"),
    )
    up_db = tmp_path / "upper.db"
    a = start_agg(stack, config(up_db, name="A", min_agents=2, **fed))
    b = start_agg(stack, config(up_db, name="B", min_agents=1, **fed))
    a_url, b_url = (f"ws://127.0.0.1:{m.port}" for m in (a, b))
    direct_a = ConstAgent(a_url, "a", 1.0, 10).start()
    wait_for(lambda: a.state.version == 0 and b.state.version == 0, 20, "the upper run")

    def a_has_agents() -> bool:  # A's member row says so (B's synthesis waits for A then)
        store = read_store(up_db)
        try:
            view = store.federation_view(a.run_id, 1, liveness=2.0)
        finally:
            store.close()
        return any(m.name == "A" and m.active_agents > 0 for m in view.members)

    wait_for(a_has_agents, 20, "member A's heartbeat with its agent")
    direct_b = ConstAgent(b_url, "b", 2.0, 20).start()
    edge = start_agg(
        stack,
        config(
            tmp_path / "edge.db", min_agents=2, name="edge", upstream=a_url, upstream_timeout=20.0
        ),
    )
    e_url = f"ws://127.0.0.1:{edge.port}"
    leaves = [ConstAgent(e_url, "e1", 4.0, 30).start(), ConstAgent(e_url, "e2", 8.0, 40).start()]
    everyone = [direct_a, direct_b, *leaves]
    for agent in everyone:
        agent.join(40)
    expected = weighted((1.0, 10), (2.0, 20), (4.0, 30), (8.0, 40))
    for agent in everyone:
        assert [v for v, _ in agent.received] == list(range(ROUNDS + 1)), agent.name
        for v, w in agent.received[1:]:
            np.testing.assert_allclose(w, expected, atol=1e-12, err_msg=f"{agent.name} v{v}")
    check_lineage(tmp_path / "edge.db", {"e1", "e2"})


def test_upper_of_another_model_structure_is_never_adopted(
    tmp_path: Path, stack: ExitStack
) -> None:
    """The upper aggregator is away when the edge starts (its first agent's model starts
    the run), and comes up with a model of another shape: the edge is refused there
    (model-mismatch, when it registers), nothing of the upper is adopted, the upper
    aggregator goes on with its other agent and the edge's cluster trains on its own."""
    # the upper's run exists with its model before it listens on the edge's upstream port
    # (else the edge's link could start it with the edge's model)
    upper_cfg = config(tmp_path / "upper.db", min_agents=1, rounds=50)
    with aggregator_thread(upper_cfg) as seed:
        first = Agent(f"ws://127.0.0.1:{seed.port}", "d", max_backoff=0.5)
        first.send_initial_model({"w": np.zeros(3)}, 10)
        first.start(timeout=20)
        first.close()
    port = free_port()
    edge = start_agg(
        stack,
        config(
            tmp_path / "edge.db",
            min_agents=1,
            rounds=6,
            name="edge1",
            upstream=f"ws://127.0.0.1:{port}",
            upstream_timeout=2.0,
        ),
    )
    assert edge.state.version == -1  # the upper aggregator was unreachable: no wait
    leaf = ConstAgent(f"ws://127.0.0.1:{edge.port}", "e1", 3.0, 30, delay=0.3).start()
    upper = start_agg(stack, upper_cfg.replace(port=port))
    assert upper.state.version == 0
    direct = ConstAgent(f"ws://127.0.0.1:{port}", "d", 1.0, 10, shape=(3,), delay=0.1).start()
    leaf.join(40)
    finish(edge)
    assert all(np.all(w == 3.0) for _, w in leaf.received[1:])  # its own semi-global models
    store = read_store(tmp_path / "edge.db")
    try:
        rounds = store.rounds(store.latest_run_id())  # type: ignore[arg-type]
        assert len(rounds) == 6 and all(r["metrics"]["upstream_offline"] == 1 for r in rounds)
    finally:
        store.close()
    # the edge reached the upper aggregator and was refused: its rounds go on without it
    wait_for(lambda: upper.state.version >= 2, 20, "the upper aggregator's rounds")
    store = read_store(tmp_path / "upper.db")
    try:
        events = store.events(store.latest_run_id())
    finally:
        store.close()
    refused = [
        e["detail"]["message"]
        for e in events
        if e["kind"] == "refused" and (e["detail"] or {}).get("code") == "model-mismatch"
    ]
    assert refused and "other shapes: 'w' [4] (the model's: [3])" in refused[0], refused
    joined = [
        e for e in events if e["kind"] == "joined" and (e["detail"] or {}).get("name") == "edge1"
    ]
    assert not joined
    assert not direct.errors


def test_upstream_settings_are_checked(tmp_path: Path) -> None:
    """An unreadable upstream_ca is a ConfigError at construction, before anything runs."""
    cfg = config(
        tmp_path / "edge.db",
        name="edge1",
        upstream="wss://localhost:1",
        upstream_ca=str(tmp_path / "missing-ca.pem"),
    )
    with pytest.raises(ConfigError, match="upstream_ca"):
        Aggregator(cfg)
