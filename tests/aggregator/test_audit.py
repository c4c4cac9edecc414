"""The refusal audit: bounded writes per source, counts kept, floods throttled."""

from __future__ import annotations

import asyncio
from typing import Any

from fedstack.aggregator.audit import RefusalAudit, source_host


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make(**kw: Any) -> tuple[RefusalAudit, list[tuple[str, dict[str, Any]]], Clock]:
    written: list[tuple[str, dict[str, Any]]] = []
    clock = Clock()

    async def write(
        kind: str, detail: dict[str, Any], run_id: str | None, agent_id: str | None
    ) -> None:
        written.append((kind, detail))

    return RefusalAudit(write, clock=clock, **kw), written, clock


def test_source_host() -> None:
    assert source_host("127.0.0.1:5555") == "127.0.0.1"
    assert source_host("[::1]:80") == "::1"
    assert source_host("inproc-7") == "inproc-7"
    assert source_host("::1") == "::1"


def test_a_flood_from_one_source_is_written_once_per_window_with_its_count() -> None:
    audit, written, clock = make(interval=10.0, burst=3, global_burst=100)

    async def main() -> None:
        for i in range(50):  # a flood from one host, many ports
            ok = await audit.record(
                "refused",
                {"reason": "wrong-token" if i % 2 else "no-token"},
                address=f"10.0.0.9:{1000 + i}",
                run_id="r",
            )
            assert ok == (i < 3)
        assert await audit.record(
            "refused", {"reason": "no-token"}, address="10.0.0.7:1", run_id="r"
        )  # another source keeps its own budget
        assert len(written) == 4
        await audit.flush()
        assert len(written) == 4  # the window is not over yet
        clock.now = 10.0
        await audit.flush()

    asyncio.run(main())
    assert len(written) == 5
    kind, summary = written[-1]
    assert kind == "refused" and summary["aggregated"] is True
    assert summary["count"] == 47 and summary["source_host"] == "10.0.0.9"
    assert summary["reasons"] == {"no-token": 23, "wrong-token": 24}
    assert audit.suppressed_total == 47


def test_a_new_window_starts_after_the_interval_and_flush_force_writes_the_rest() -> None:
    audit, written, clock = make(interval=1.0, burst=1, global_burst=100)

    async def main() -> None:
        await audit.record("refused", {"reason": "x"}, address="h:1", run_id=None)
        await audit.record("refused", {"reason": "x"}, address="h:2", run_id=None)
        clock.now = 1.5  # next window: its first refusal is written (after the summary)
        await audit.record("refused", {"reason": "y"}, address="h:3", run_id=None)
        await audit.record("refused", {"reason": "y"}, address="h:4", run_id=None)
        await audit.flush(force=True)

    asyncio.run(main())
    assert [(d.get("reason"), d.get("count")) for _, d in written] == [
        ("x", None),
        ("x", 1),
        ("y", None),
        ("y", 1),
    ]


def test_the_global_budget_bounds_many_sources() -> None:
    audit, written, _ = make(interval=10.0, burst=5, global_burst=20)

    async def main() -> None:
        for i in range(200):
            await audit.record("refused", {"reason": "r"}, address=f"10.1.{i}.1:9", run_id=None)
        await audit.flush(force=True)

    asyncio.run(main())
    one_by_one = [d for _, d in written if not d.get("aggregated")]
    summaries = [d for _, d in written if d.get("aggregated")]
    assert len(one_by_one) == 20
    assert [(d["source_host"], d["count"]) for d in summaries] == [("*", 180)]


def test_a_host_over_its_burst_is_throttled_until_the_window_ends() -> None:
    audit, _, clock = make(interval=10.0, burst=2, global_burst=100)

    async def main() -> None:
        for port in (1, 2):
            assert not audit.over_budget("refused", f"10.0.0.9:{port}")
            await audit.record("refused", {}, address=f"10.0.0.9:{port}", run_id=None)
        assert audit.over_budget("refused", "10.0.0.9:3")  # any port of that host
        assert not audit.over_budget("refused", "10.0.0.8:3")
        assert not audit.over_budget("operator_api", "10.0.0.9:3")
        clock.now = 10.0
        assert not audit.over_budget("refused", "10.0.0.9:3")

    asyncio.run(main())
