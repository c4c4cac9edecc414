"""Prometheus metrics on the operator port agree with the store.

A real aggregator on 127.0.0.1 with two agents trains N rounds; ``GET /metrics`` is parsed
with prometheus-client's own text parser and compared with what ``fedstack db rounds`` and
``fedstack db models`` print from the store: rounds completed, uploads accepted, upload
bytes, round durations. Refusals (a wrong credential, a malformed upload) are counted by
reason; after a restart the round count still matches the store.
"""

from __future__ import annotations

import http.client
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fedstack import Agent, AggregatorConfig, RegistrationRefused, Store
from fedstack.aggregator import Aggregator
from fedstack.cli.main import main as cli_main
from fedstack.testing import aggregator_thread

ROUNDS = 4
MODEL = {"w": np.zeros(1000, np.float32), "b": np.zeros(24, np.float64)}
MODEL_BYTES = 1000 * 4 + 24 * 8


def scrape(agg: Aggregator) -> tuple[dict[tuple[str, tuple[tuple[str, str], ...]], float], str]:
    """Every sample of ``/metrics`` by (name, sorted labels), and the content type."""
    assert agg.operator is not None
    conn = http.client.HTTPConnection("127.0.0.1", agg.operator.port, timeout=10)
    try:
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        assert resp.status == 200
        text = resp.read().decode()
        ctype = resp.getheader("Content-Type") or ""
    finally:
        conn.close()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    return samples, ctype


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def wait_until(cond: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def db_json(capsys: pytest.CaptureFixture[str], *args: str) -> Any:
    capsys.readouterr()
    assert cli_main(["db", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_metrics_agree_with_the_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "m.db"
    st = Store(str(db))
    try:
        tokens = {n: st.issue_credential(n) for n in ("alice", "bob")}
    finally:
        st.close()
    cfg = AggregatorConfig(
        port=0, db=str(db), rounds=ROUNDS, min_agents=2, operator_port=0, finish_grace=0.0
    )
    with aggregator_thread(cfg) as agg:
        url = f"ws://127.0.0.1:{agg.port}"
        before, ctype = scrape(agg)
        assert ctype.startswith("text/plain; version=0.0.4")
        assert value(before, "fedstack_rounds_completed_total") == 0
        assert value(before, "fedstack_model_version") == -1
        assert value(before, "fedstack_uploads_total", status="accepted") == 0
        # refused: a wrong credential (registration), then a malformed upload
        with pytest.raises(RegistrationRefused):
            Agent(url, name="alice", token=tokens["bob"]).start(timeout=10)
        agents = [Agent(url, name=n, token=tokens[n]) for n in ("alice", "bob")]
        agents[0].send_initial_model(MODEL)
        for a in agents:
            a.start(timeout=10)
        for rnd in range(ROUNDS):
            for a in agents:
                gm = a.wait_for_global_model(10)
                if rnd == 0 and a is agents[1]:  # a tensor missing: refused, not stored
                    a.send_trained_model({"w": gm["w"]}, 1)
                    wait_until(lambda: len(agents[1].refusals) == 1)
                a.send_trained_model({k: v + 1 for k, v in gm.items()}, 10)
        wait_until(lambda: agg.rounds_completed >= ROUNDS)
        live, _ = scrape(agg)
        for a in agents:
            a.close()
        run_id = agg.run_id

    rounds = db_json(capsys, "rounds", "--db", str(db))
    models = db_json(capsys, "models", "--db", str(db))
    local = [m for m in models if m["kind"] == "local" and m["round"] > 0]  # not the initial
    assert len(rounds) == ROUNDS
    assert value(live, "fedstack_rounds_completed_total") == len(rounds)
    assert value(live, "fedstack_model_version") == max(r["round"] for r in rounds)
    assert value(live, "fedstack_round") == ROUNDS + 1
    assert value(live, "fedstack_rounds_finished") == 1
    assert value(live, "fedstack_agents_active") == 2
    assert value(live, "fedstack_agents_connected") == 2
    # every stored local model was an accepted upload, and nothing else was
    assert value(live, "fedstack_uploads_total", status="accepted") == len(local) == 2 * ROUNDS
    assert value(live, "fedstack_uploads_total", status="refused") == 1
    assert value(live, "fedstack_upload_bytes_total") == 2 * ROUNDS * MODEL_BYTES + 4000
    assert value(live, "fedstack_refusals_total", reason="bad-credential") == 1
    assert value(live, "fedstack_refusals_total", reason="invalid-model") == 1
    # the round durations are the stored ones
    assert value(live, "fedstack_round_duration_seconds_count") == ROUNDS
    assert value(live, "fedstack_round_duration_seconds_sum") == pytest.approx(
        sum(r["seconds"] for r in rounds), abs=1e-6
    )
    assert value(live, "fedstack_store_commit_duration_seconds_count", operation="round") == ROUNDS
    assert value(live, "fedstack_store_commit_duration_seconds_count", operation="uploads") >= 1
    assert value(live, "fedstack_byte_budget_limit_bytes", budget="upload") == (
        cfg.upload_budget_bytes
    )
    assert value(live, "fedstack_byte_budget_limit_bytes", budget="fanout") == (
        cfg.fanout_budget_bytes
    )
    info = [k for k in live if k[0] == "fedstack_aggregator_info"]
    assert len(info) == 1 and ("run_id", run_id) in info[0][1]

    # restarted on the same store (resumed, finished): the count is still the store's
    with aggregator_thread(cfg.replace(finish_grace=0.0)) as agg:
        again, _ = scrape(agg)
        assert value(again, "fedstack_rounds_completed_total") == len(rounds)
        assert value(again, "fedstack_uploads_total", status="accepted") == 0  # this process
