"""The load generator (``fedstack.testing.loadgen``) against a real aggregator: every agent
joins, uploads each round and is acknowledged, with push and with poll delivery, while
uploads in flight stay within the byte budget."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from fedstack import AggregatorConfig
from fedstack.testing import aggregator_thread
from fedstack.testing.loadgen import LoadConfig, LoadGenerator, run_load


@pytest.mark.parametrize("delivery", ["push", "poll"])
def test_agents_complete_every_round(tmp_path: Path, delivery: str) -> None:
    agents, rounds = 12, 3
    cfg = AggregatorConfig(
        auth="off",
        port=0,
        db=str(tmp_path / "f.db"),
        rounds=rounds,
        min_agents=agents,
        threshold=1.0,
        delivery=delivery,
        finish_grace=1,
    )
    with aggregator_thread(cfg) as agg:
        report = run_load(
            LoadConfig(url=f"ws://127.0.0.1:{agg.port}", agents=agents, rounds=rounds, timeout=60)
        )
        assert agg.state.version == rounds
    assert report.errors == [] and report.welcomed == agents
    assert report.uploads == report.acks == agents * rounds
    assert report.ack_statuses == {"accepted": agents * rounds}
    assert len(set(report.acked_upload_ids)) == agents * rounds
    assert [r["version"] for r in report.rounds] == list(range(rounds + 1))
    assert all(r["agents"] == agents for r in report.rounds)


def test_a_tiny_upload_budget_sends_one_upload_at_a_time(tmp_path: Path) -> None:
    """The transport's ByteBudget bounds uploads in flight: with a 1-byte budget, one
    upload (of 1 KiB) at a time, and every byte is given back at the end."""
    agents = 6
    cfg = AggregatorConfig(
        auth="off",
        port=0,
        db=str(tmp_path / "f.db"),
        rounds=2,
        min_agents=agents,
        threshold=1.0,
        finish_grace=1,
    )
    with aggregator_thread(cfg) as agg:
        gen = LoadGenerator(
            LoadConfig(
                url=f"ws://127.0.0.1:{agg.port}",
                agents=agents,
                rounds=2,
                params=256,
                upload_budget_bytes=1,
                timeout=60,
            )
        )
        report = asyncio.run(gen.run())
    assert report.errors == [] and report.acks == agents * 2
    budget = gen._upload_budget
    assert budget.used == 0
    assert budget.peak == 256 * 4  # never two uploads at once
    assert budget.waited > 0  # others queued behind
