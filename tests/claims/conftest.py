"""Fixtures of the claim tests (book rows 2 and 68): one demo run, captured on the wire.

``captured_demo`` runs the processes ``fedstack demo`` runs (the demo's aggregator
options, trainer and evaluator: :mod:`fedstack.cli.demo`), with ``-v`` (debug logging)
everywhere, and with the agents connected through a capturing TCP relay on 127.0.0.1
instead of straight to the aggregator. It runs once per session, whichever of its tests
asked first, and hands over every byte that crossed the relay in each direction, the
WebSocket messages parsed from those bytes by an independent RFC 6455 reader (client
frames unmasked), every process's log, and what an operator scraped from the
aggregator's operator port (``/api/v1/status``, ``/api/v1/rounds``, ``/metrics``) during the run.
"""

from __future__ import annotations

import http.client
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest

from fedstack import Store
from fedstack.cli.demo import EVALUATOR, TRAINER, spawn, wait_ready
from fedstack.testing.capture import CapturedRun, CaptureRelay, parse_ws

AGENTS = 3
ROUNDS = 3
PARTITION = "dirichlet:0.5"
SEED = 0


def _scrape(
    port: int, token: str, agg: subprocess.Popen[bytes], out: list[tuple[str, int, str]]
) -> None:
    """Scrape the operator API's status and round metrics while the aggregator runs."""
    while agg.poll() is None:
        for path in ("/api/v1/status", "/api/v1/rounds?limit=20", "/metrics"):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            try:
                conn.request("GET", path, headers={"Authorization": f"Bearer {token}"})
                resp = conn.getresponse()
                out.append((path, resp.status, resp.read().decode()))
            except (OSError, http.client.HTTPException):
                pass  # the aggregator is leaving
            finally:
                conn.close()
        time.sleep(0.02)


@pytest.fixture(scope="session")
def captured_demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CapturedRun]:
    work = tmp_path_factory.mktemp("captured-demo")
    logs = work / "logs"
    logs.mkdir()
    ready = work / "aggregator.ready"
    procs: list[subprocess.Popen[bytes]] = []
    relay: CaptureRelay | None = None
    scrapes: list[tuple[str, int, str]] = []
    store = Store(str(work / "fedstack.db"))
    try:
        token = store.issue_credential("ops", role="operator")
    finally:
        store.close()
    try:
        agg = spawn(
            [
                "-v",
                "aggregator",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--db",
                str(work / "fedstack.db"),
                "--rounds",
                str(ROUNDS),
                "--threshold",
                "1.0",
                "--min-agents",
                str(AGENTS),
                "--round-timeout",
                "120",
                "--evaluator",
                EVALUATOR,
                "--finish-grace",
                "10",
                "--ready-file",
                str(ready),
                "--auth",
                "off",
                "--operator-port",
                "0",
            ],
            logs / "aggregator.log",
        )
        procs.append(agg)
        info = wait_ready(ready, agg, deadline=time.monotonic() + 60, log=logs / "aggregator.log")
        relay = CaptureRelay(int(info["port"]))
        scraper = threading.Thread(
            target=_scrape, args=(int(info["operator_port"]), token, agg, scrapes), daemon=True
        )
        scraper.start()
        for i in range(AGENTS):
            args = ["-v", "agent", "--url", f"ws://127.0.0.1:{relay.port}"]
            args += ["--name", f"agent-{i + 1}", "--trainer", TRAINER]
            for kv in (f"index={i}", f"num_agents={AGENTS}", f"partition={PARTITION}"):
                args += ["--trainer-arg", kv]
            args += ["--trainer-arg", f"seed={SEED}"]
            procs.append(spawn(args, logs / f"agent-{i + 1}.log"))
        for p in procs:
            p.wait(timeout=120)
        texts = {f.stem: f.read_text(errors="replace") for f in sorted(logs.glob("*.log"))}
        codes = [p.returncode for p in procs]
        assert codes == [0] * len(procs), f"exit codes {codes}: {texts}"
        relay.close()
        scraper.join(10)
        links = [link for link in relay.links if link.up]
        yield CapturedRun(
            agents=AGENTS,
            rounds=ROUNDS,
            partition=PARTITION,
            seed=SEED,
            links=links,
            up=[parse_ws(link.up) for link in links],
            down=[parse_ws(link.down) for link in links],
            logs=texts,
            workdir=work,
            scrapes=scrapes,
        )
    finally:
        if relay is not None:
            relay.close()
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
