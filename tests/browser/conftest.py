"""Fixtures of the dashboard's browser tests: Playwright driving the system's Chromium.

``browser``: one headless Chromium per test module (Debian's ``chromium`` package at
``/usr/bin/chromium``, or ``FEDSTACK_CHROMIUM``; ``.ci/run`` installs it; nothing downloads
a browser). The tests are skipped where there is no Chromium or no Playwright.

``screenshots``: the folder the tests write a screenshot of each view to, for a person to
look at: ``tests/browser/screenshots/`` (ignored by git), or ``FEDSTACK_SCREENSHOTS``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from fedstack.testing.dashboard import find_chromium

if TYPE_CHECKING:
    from playwright.sync_api import Browser


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """A headless Chromium (the system's), shared by a module's tests. Not by the session:
    Playwright's sync API keeps an event loop running in the main thread while it is
    open, and every later test of the process that calls ``asyncio.run`` would fail."""
    path = find_chromium()
    if path is None:
        pytest.skip("no Chromium (apt-get install chromium; .ci/run does)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install 'fedstack[browser]')")
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=path, args=["--disable-gpu"])
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="session")
def screenshots() -> Path:
    """Where the tests write their screenshots (created)."""
    folder = Path(os.environ.get("FEDSTACK_SCREENSHOTS") or Path(__file__).parent / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder
