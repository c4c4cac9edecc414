"""Shared helpers of bench/scaling.py and bench/memory.py: one ``fedstack aggregator``
subprocess on 127.0.0.1 and the load generator (:mod:`fedstack.testing.loadgen`) in another."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from fedstack.testing import free_port

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
LOGV: tuple[str, ...] = ()  # e.g. ("-v",) to keep INFO logs of the aggregator


def vm_hwm_mib(pid: int) -> float:
    """Peak resident memory (VmHWM) of process ``pid``, MiB (nan if unreadable)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def run_live(
    agents: int,
    rounds: int,
    params: int,
    *,
    timeout: float = 300.0,
    tensors: int = 2,
    upload_budget_mb: float | None = None,
    fanout_budget_mb: float | None = None,
    extra_args: tuple[str, ...] = (),
    workdir: Path | None = None,
) -> dict[str, Any]:
    """Run one federation: aggregator subprocess + load-generator subprocess.

    Every round needs all ``agents`` (``--min-agents agents``). Returns the load
    generator's report plus the aggregator's peak RSS and its round timings from the store.
    """
    tmp = tempfile.TemporaryDirectory(prefix="fedstack-live-", dir=workdir)
    d = Path(tmp.name)
    port = free_port()
    ready = d / "ready.json"
    args = [
        sys.executable,
        "-m",
        "fedstack",
        *(LOGV or ("-q",)),
        "aggregator",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--db",
        str(d / "agg.db"),
        "--auth",
        "off",
        "--min-agents",
        str(agents),
        "--threshold",
        "1.0",
        "--rounds",
        str(rounds),
        "--round-timeout",
        str(timeout),
        "--finish-grace",
        "2",
        "--ready-file",
        str(ready),
        *extra_args,
    ]
    cfg: dict[str, Any] = {}
    if upload_budget_mb is not None:
        cfg["upload_budget_bytes"] = int(upload_budget_mb * (1 << 20))
    if fanout_budget_mb is not None:
        cfg["fanout_budget_bytes"] = int(fanout_budget_mb * (1 << 20))
    if cfg:
        (d / "agg.json").write_text(json.dumps(cfg))
        args += ["--config", str(d / "agg.json")]
    log = open(d / "agg.log", "wb")  # noqa: SIM115
    agg = subprocess.Popen(
        args, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1")
    )
    log.close()
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            if agg.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    "aggregator did not start: "
                    + (d / "agg.log").read_text(errors="replace")[-2000:]
                )
            time.sleep(0.02)
        out = d / "lg.json"
        # VmHWM is monotonic: sample it until the aggregator exits (it exits soon after
        # the last agent left, possibly before we could read it once at the end)
        hwm_samples: list[float] = []
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set() and agg.poll() is None:
                v = vm_hwm_mib(agg.pid)
                if v == v:  # not nan
                    hwm_samples.append(v)
                stop.wait(0.1)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        t0 = time.perf_counter()
        lg = subprocess.run(
            [
                sys.executable,
                "-m",
                "fedstack.testing.loadgen",
                "--url",
                f"ws://127.0.0.1:{port}",
                "--agents",
                str(agents),
                "--rounds",
                str(rounds),
                "--params",
                str(params),
                "--tensors",
                str(tensors),
                "--timeout",
                str(timeout),
                "--json",
                str(out),
                "-q",
            ],
            capture_output=True,
            text=True,
            timeout=timeout + 60,
        )
        wall = time.perf_counter() - t0
        last = vm_hwm_mib(agg.pid)
        stop.set()
        sampler.join(5)
        hwm = max([*hwm_samples, last] if last == last else hwm_samples or [float("nan")])
        report: dict[str, Any] = (
            json.loads(out.read_text())
            if out.exists()
            else {"error_count": 1, "errors": [lg.stderr[-2000:]]}
        )
        report.pop("acked_upload_ids", None)
        try:
            agg.wait(30)
        except subprocess.TimeoutExpired:
            agg.send_signal(signal.SIGTERM)
            agg.wait(30)
        rounds_db = _rounds(d / "agg.db")
        agg_log = (d / "agg.log").read_text(errors="replace")
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "last_aggregator.log").write_text(agg_log[-200_000:])
        report.update(
            aggregator_peak_rss_mib=round(hwm, 1),
            wall_seconds_total=round(wall, 3),
            store_rounds=rounds_db,
            loadgen_rc=lg.returncode,
            aggregator_errors=sum(
                1 for ln in agg_log.splitlines() if "Traceback" in ln or " ERROR " in ln
            ),
        )
        return report
    finally:
        if agg.poll() is None:
            agg.kill()
            agg.wait(10)
        tmp.cleanup()


def _rounds(db: Path) -> list[dict[str, Any]]:
    from fedstack.store import Store

    store = Store(str(db))
    try:
        run_id = store.latest_run_id()
        if run_id is None:
            return []
        return [
            {
                "round": r["round"],
                "seconds": round(r["seconds"], 4),
                "num_updates": r["num_updates"],
            }
            for r in store.rounds(run_id)
        ]
    finally:
        store.close()


def save(name: str, data: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=1))
    return path
