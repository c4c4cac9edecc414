"""Issue 16 finding 13 (c): deleting the database file while the aggregator runs is
detected and stops the aggregator loudly.

SQLite goes on writing to an unlinked file without an error: an aggregator that did not
notice would accept registrations, uploads and rounds that all vanish on its next start
(with the credentials). The aggregator checks the file every second and before each
round commit, and stops with :class:`~fedstack.aggregator.AggregatorFailed`.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import pytest

from fedstack import AggregatorConfig, Store
from fedstack.aggregator.service import Aggregator, AggregatorFailed
from fedstack.errors import DatabaseReplaced


def test_deleted_database_stops_the_aggregator(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "fed.db"
    cfg = AggregatorConfig(auth="off", port=0, db=str(db), rounds=3, min_agents=1)
    caplog.set_level(logging.CRITICAL, logger="fedstack.aggregator")

    async def main() -> BaseException | None:
        agg = Aggregator(cfg)
        await agg.start()
        try:
            for suffix in ("", "-wal", "-shm"):
                Path(str(db) + suffix).unlink(missing_ok=True)
            await asyncio.wait_for(agg.wait_finished(), 10)
        except AggregatorFailed as exc:
            return exc
        finally:
            await agg.stop()
        return None

    failure = asyncio.run(main())
    assert isinstance(failure, AggregatorFailed), "the aggregator did not notice"
    assert isinstance(failure.__cause__, DatabaseReplaced)
    assert any(r.levelno == logging.CRITICAL for r in caplog.records)


def test_replaced_database_file_is_detected(tmp_path: Path) -> None:
    db = tmp_path / "fed.db"
    store = Store(str(db))
    try:
        store.check_database()  # the file it opened: fine
        other = tmp_path / "other.db"
        other.write_bytes(db.read_bytes())
        os.replace(other, db)  # e.g. a restore from backup over the live file
        with pytest.raises(DatabaseReplaced, match="replaced"):
            store.check_database()
        db.unlink()
        with pytest.raises(DatabaseReplaced, match="deleted"):
            store.check_database()
    finally:
        store.close()
