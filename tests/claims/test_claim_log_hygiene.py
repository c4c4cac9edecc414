"""Book row 68: the logs of a run never contain tensor contents.

The captured demo run (``conftest.captured_demo``: an aggregator and three agents, every
process with ``-v``, i.e. every level down to DEBUG) is scanned for:

- array or tensor representations (``array(``, ``tensor(``, bracketed runs of numbers);
- any value of any tensor that crossed the wire (every upload, welcome and global model,
  decoded from the capture), written the ways Python and numpy write a float
  (``repr``, ``str``, ``%g``), for values precise enough not to be a metric's rounding;
- raw bytes of those tensors (``b'\\x..'`` escapes, hex, base64);
- training rows written as numbers (the bracketed-run check).

A control writes a model the way a careless ``log.debug("... %s", weights)`` would,
through the same check, which must flag it.
"""

from __future__ import annotations

import base64
import json
import logging
import re

import numpy as np
import pytest

from fedstack.testing.capture import CapturedRun
from fedstack.types import Weights
from fedstack.wire import GlobalModel, ModelUpload, Participate, Welcome, decode

NUMBER = r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?"
ARRAY_PATTERNS = [
    re.compile(r"\barray\(|\btensor\(|\bndarray\b|dtype="),
    # six or more numbers in a row, separated by commas and/or spaces (a printed vector)
    re.compile(rf"{NUMBER}(?:(?:\s*,\s*|\s+){NUMBER}){{5,}}"),
    # a bytes literal: escapes with a few printable characters between them
    re.compile(r"(?:(?:\\x[0-9a-fA-F]{2}|\\[tnr'\\])[^\\\s]{0,3}){6,}"),
]
TOKEN = re.compile(r"[-+]?(?:\d+\.\d+|\.\d+)(?:[eE][-+]?\d+)?")


def tensors_of(run: CapturedRun) -> list[np.ndarray]:
    out: list[np.ndarray] = []
    for stream in run.up + run.down:
        for raw in stream.messages:
            msg = decode(raw)
            groups: list[Weights | None] = []
            if isinstance(msg, Participate | Welcome | ModelUpload | GlobalModel):
                groups.append(msg.model)
            if isinstance(msg, Welcome | ModelUpload | GlobalModel):
                groups.append(msg.extra)
            for g in groups:
                out += [np.array(a) for a in (g or {}).values()]
    return out


def value_texts(arrays: list[np.ndarray]) -> set[str]:
    """How the tensors' values would look in a log (precise ones only: >= 6 significant
    digits, so a metric rounded to 4 decimals is not mistaken for a weight)."""
    out: set[str] = set()
    for a in arrays:
        for v in np.unique(a.ravel()):
            for text in (repr(float(v)), str(v), f"{float(v):g}", np.format_float_positional(v)):
                if len(re.sub(r"[^0-9]", "", text).lstrip("0")) >= 6:
                    out.add(text)
    return out


def byte_texts(arrays: list[np.ndarray]) -> set[str]:
    out: set[str] = set()
    for a in arrays:
        head = a.tobytes()[:12]
        if len(head) == 12 and any(head):
            out |= {head.hex(), base64.b64encode(head).decode()}
    return out


def problems(log: str, values: set[str], raw: set[str]) -> list[str]:
    found = [m.group(0)[:80] for p in ARRAY_PATTERNS for m in p.finditer(log)]
    found += [t for t in TOKEN.findall(log) if t in values]
    found += [t for t in raw if t in log]
    return found


def logged(msg: str, *args: object) -> str:
    """What a ``log.debug(msg, *args)`` call writes (with -v)."""
    record = logging.LogRecord("fedstack.agent", logging.DEBUG, __file__, 0, msg, args, None)
    return logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s").format(record)


@pytest.fixture(scope="module")
def scanned(captured_demo: CapturedRun) -> tuple[list[np.ndarray], set[str], set[str]]:
    arrays = tensors_of(captured_demo)
    return arrays, value_texts(arrays), byte_texts(arrays)


def test_logs_hold_no_tensor_contents(
    captured_demo: CapturedRun, scanned: tuple[list[np.ndarray], set[str], set[str]]
) -> None:
    arrays, values, raw = scanned
    assert len(arrays) >= 2 * captured_demo.agents * captured_demo.rounds
    assert len(values) > 1000, "the scan knows the weights' values"
    logs = captured_demo.logs
    assert sorted(logs) == ["agent-1", "agent-2", "agent-3", "aggregator"]
    # debug logging was on (the agents have no debug message in a run without trouble)
    assert " DEBUG " in logs["aggregator"]
    for name, text in logs.items():
        assert "trained on v2" in text or "round 2 aggregated" in text, text[-2000:]
        found = problems(text, values, raw)
        assert not found, f"{name}'s log shows tensor contents: {found[:5]}"


def test_the_scan_flags_a_logged_model(
    captured_demo: CapturedRun, scanned: tuple[list[np.ndarray], set[str], set[str]]
) -> None:
    """Control: a model logged carelessly, in the forms a log call would produce."""
    arrays, values, raw = scanned
    coef = next(a for a in arrays if a.shape == (10, 64) and a.any())
    careless = [
        logged("model %r", {"coef": coef}),
        logged("model %s", coef),
        logged("first weights %s", coef.ravel()[:3].tolist()),
        logged("first weight %s", float(coef.ravel()[np.argmax(coef)])),
        logged("blob %r", coef.tobytes()[:40]),
        logged("blob %s", coef.tobytes()[:12].hex()),
    ]
    for line in careless:
        assert problems(line, values, raw), line
    quiet = logged("round %d evaluation: accuracy=%.4f, loss=%.4f", 1, 0.84444, 0.75661)
    assert not problems(quiet, values, raw)


def test_metrics_scrape_works_and_holds_no_tensors(
    captured_demo: CapturedRun, scanned: tuple[list[np.ndarray], set[str], set[str]]
) -> None:
    """The row's second half: the operator port (``/api/v1/status``, ``/api/v1/rounds``
    and the Prometheus ``/metrics``) was scraped during the run, served the rounds'
    metrics, and its answers hold no tensor contents either."""
    _, values, raw = scanned
    ok = [
        (path, json.loads(body))
        for path, status, body in captured_demo.scrapes
        if status == 200 and path.startswith("/api/")
    ]
    statuses = [body for path, body in ok if path == "/api/v1/status"]
    rounds = [r for path, body in ok if path.startswith("/api/v1/rounds") for r in body["rounds"]]
    assert statuses and rounds, captured_demo.scrapes[-3:]
    assert any("eval_accuracy" in r["metrics"] for r in rounds), rounds[-1]
    assert all({"run_id", "round", "version"} <= set(s) for s in statuses), statuses[-1]
    # the Prometheus endpoint: parsed by prometheus-client's own parser, it counts rounds
    from prometheus_client.parser import text_string_to_metric_families

    completed = [
        sample.value
        for path, status, body in captured_demo.scrapes
        if path == "/metrics" and status == 200
        for family in text_string_to_metric_families(body)
        for sample in family.samples
        if sample.name == "fedstack_rounds_completed_total"
    ]
    assert completed and max(completed) >= 1, completed[-3:]
    for path, _, body in captured_demo.scrapes:
        assert not problems(body, values, raw), (path, body[:500])
