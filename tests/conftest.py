"""Fixtures shared by the whole suite.

``postgres``: one throwaway PostgreSQL server for the test session
(:class:`fedstack.testing.postgres.PostgresServer`), started on first use and stopped at
the end; the test is skipped where no server can be started. Tests that need isolation
take ``pg_url`` (a fresh database on that server) instead of writing to ``postgres.url``.
A test that restarts or stops the server starts its own ``PostgresServer``: the session's
is shared.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from fedstack.testing.postgres import PostgresServer, PostgresUnavailable, unavailable_reason


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """The session's PostgreSQL server (skip if none can be started here)."""
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    try:
        server = PostgresServer()
    except PostgresUnavailable as exc:
        pytest.skip(str(exc))
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def pg_url(postgres: PostgresServer) -> str:
    """The URL of a new, empty database on the session's server."""
    return postgres.create_database()
