"""Moving a big model between an agent and an aggregator, against raw loopback TCP.

What it measures (all over 127.0.0.1, a float32 model of ``--mb`` MB, default 100 MB =
25 M parameters, "GB/s" = 1e9 bytes of model payload moved per second, i.e.
2 x size / round-trip time):

(a) raw TCP, the reference: blocking sockets, one stream; the client ``sendall``s the
    payload, the server ``recv_into``s a preallocated buffer and ``sendall``s it back, the
    client ``recv_into``s a preallocated buffer.
(b) fedstack transport + codec: the client sends
    ``encode(ModelUpload(..., model={"w": arr}))`` with ``WSConnection.send``; the server
    decodes it and answers ``encode(GlobalModel(..., model=that model))``; the client
    decodes the answer (arrays are views of the received buffer). With uvloop (what
    fedstack processes use) and with plain asyncio.
    (a) and (b) run server and client in two processes (multiprocessing, spawn), a fresh
    pair per repetition: ``--warmup`` (2) untimed round trips, then ``--inner`` (3) timed
    ones whose median is the repetition's figure; the modes are interleaved within each
    repetition so every ratio is measured in the same run.
(c) the whole stack: a real ``Aggregator`` (``AggregatorConfig(port=0, db=<tmp sqlite>,
    rounds=N, min_agents=1, delivery="push")``, uvloop, in a spawned process, the same
    thing ``fedstack aggregator`` runs) and ONE real ``Agent`` in this process that
    uploads the model each round (``send_trained_model``) and waits for the pushed global
    model (``wait_for_global_model``). Round time = from the upload call to the new
    global model in the agent's hands. Variants: "full" (the real store: every upload and
    every global model is hashed, written and fsynced as a blob, metadata in SQLite) and
    "no blobs" (the same store with a blob store that keeps nothing, so only the SQLite
    rows are written). In the full run the store calls are timed inside the aggregator,
    which gives the persistence share of a round directly. "transport only" is the (b)
    uvloop round trip of the same run.

Run::

    .venv/bin/python bench/transfer.py                 # 100 MB, 5 reps, 5 rounds: ~1 min
    .venv/bin/python bench/transfer.py --mb 10 --reps 3 --rounds 2 --skip-full
    .venv/bin/python bench/transfer.py --think 3       # (c) with 3 s "training" per round

Prints tables and writes ``bench/results/transfer.json``. Target: (b) with uvloop moves
the model at >= 0.50 x raw TCP of the same run (PASS/FAIL is printed).

Measured on this machine (2 vCPUs, Firecracker VM, Python 3.11.7, numpy 2.4, uvloop
0.23), 100 MB, 5 repetitions, median [min - max]::

    (a) raw TCP                 3.30 GB/s [1.87 - 3.60]  round trip 0.061 s
    (b) fedstack, uvloop        2.54 GB/s [2.43 - 2.83]  0.079 s  ratio 0.77 [0.70 - 1.30] PASS
    (b) fedstack, asyncio       0.52 GB/s [0.49 - 0.55]  0.387 s  ratio 0.16 (3.11's
                                transport joins and copies the 100 MB frame 2-3 times)
    (c) round, full store       0.762 s [0.329 - 0.829]  (0.26 GB/s of model moved)
        round, no blobs         0.155 s [0.137 - 0.960]
        store calls in a round  0.191 s (3 blob puts: sha256 x 3, 2 x write+fsync)
        FedAvg add + result     0.350 s full store / 0.052 s no blobs
        transport only          0.079 s

Where the persistence cost beyond the store calls comes from (checked with py-spy and
thread-CPU timers): this VM returns freed memory to the host (virtio-balloon free page
reporting, ~2 s after a free), and touching such memory again runs at ~0.3-1 GB/s
instead of ~14 GB/s. The blob files stay in the page cache, which takes the warm pages the
aggregator freed, so its next fresh allocations (FedAvg's float64 accumulator, the mean,
the cast; ~500 MB per round for a 100 MB model) land on cold pages: FedAvg goes from
0.05 s to 0.2-0.5 s. The same happens without blobs when the agent "trains" for a few
seconds between rounds (``--think 3``: no-blobs rounds of 0.2-1.4 s). The "cold 1st
trip" column shows the same effect in (b): the first round trip of a fresh process.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import platform
import socket
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
TARGET = 0.50
JOIN_TIMEOUT = 120.0


# ---------------------------------------------------------------------- helpers
def _payload(size: int) -> np.ndarray[Any, Any]:
    """A float32 model of ``size`` bytes (finite random values)."""
    return np.random.default_rng(0).standard_normal(size // 4, dtype=np.float32)


def _summary(values: list[float]) -> dict[str, float]:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def _fmt(s: dict[str, float], unit: str = "", digits: int = 2) -> str:
    return f"{s['median']:.{digits}f}{unit} [{s['min']:.{digits}f} - {s['max']:.{digits}f}]"


def _new_loop(kind: str) -> asyncio.AbstractEventLoop:
    if kind == "uvloop":
        import uvloop

        return uvloop.new_event_loop()  # type: ignore[no-any-return]
    return asyncio.new_event_loop()


def _recv_exact(sock: socket.socket, view: memoryview) -> None:
    got, size = 0, view.nbytes
    while got < size:
        n = sock.recv_into(view[got:], size - got)
        if n == 0:
            raise ConnectionError("peer closed")
        got += n


# ---------------------------------------------------------------------- (a) raw TCP
def _raw_server(ctl: Any, size: int, count: int) -> None:
    srv = socket.create_server(("127.0.0.1", 0))
    ctl.send(srv.getsockname()[1])
    conn, _ = srv.accept()
    buf = np.ones(size, dtype=np.uint8)  # preallocated and touched
    view = memoryview(buf)
    with conn:
        for _ in range(count):
            _recv_exact(conn, view)
            conn.sendall(view)
    srv.close()


def _raw_client(ctl: Any, port: int, size: int, count: int) -> None:
    payload = memoryview(_payload(size).view(np.uint8))
    back = np.ones(size, dtype=np.uint8)
    view = memoryview(back)
    times = []
    with socket.create_connection(("127.0.0.1", port)) as sock:
        for _ in range(count):
            t0 = time.perf_counter()
            sock.sendall(payload)
            _recv_exact(sock, view)
            times.append(time.perf_counter() - t0)
    ok = bool(np.array_equal(back, np.frombuffer(payload, dtype=np.uint8)))
    ctl.send({"times": times, "ok": ok})


# ---------------------------------------------------------------------- (b) fedstack
def _fs_server(ctl: Any, size: int, count: int, loop_kind: str) -> None:
    from fedstack.transport import serve
    from fedstack.wire import GlobalModel, Limits, decode, encode

    limit = max(2 * size, 1 << 20)
    limits = Limits(max_message_bytes=limit)

    async def main() -> None:
        done = asyncio.Event()

        async def handler(conn: Any) -> None:
            for _ in range(count):
                msg = decode(await conn.recv(), limits)
                reply = GlobalModel(version=1, model_id=uuid.uuid4().hex, model=msg.model)
                await conn.send(encode(reply, limits))
            done.set()

        server = await serve(handler, "127.0.0.1", 0, max_message_bytes=limit)
        ctl.send(server.sockets[0].getsockname()[1])
        await done.wait()
        await asyncio.sleep(0.05)
        server.close()

    with asyncio.Runner(loop_factory=lambda: _new_loop(loop_kind)) as runner:
        runner.run(main())


def _fs_client(ctl: Any, port: int, size: int, count: int, loop_kind: str) -> None:
    from fedstack.transport import connect
    from fedstack.wire import GlobalModel, Limits, ModelUpload, decode, encode

    limit = max(2 * size, 1 << 20)
    limits = Limits(max_message_bytes=limit)
    arr = _payload(size)

    async def main() -> dict[str, Any]:
        conn = await connect(f"ws://127.0.0.1:{port}", max_message_bytes=limit)
        times = []
        got: Any = None
        for _ in range(count):
            t0 = time.perf_counter()
            up = ModelUpload(
                upload_id=uuid.uuid4().hex, base_version=0, num_samples=1, model={"w": arr}
            )
            await conn.send(encode(up, limits))
            got = decode(await conn.recv(), limits)
            times.append(time.perf_counter() - t0)
        assert isinstance(got, GlobalModel)
        ok = bool(np.array_equal(got.model["w"], arr))
        await conn.close()
        return {"times": times, "ok": ok}

    with asyncio.Runner(loop_factory=lambda: _new_loop(loop_kind)) as runner:
        result = runner.run(main())
    ctl.send(result)


def _run_pair(mode: str, size: int, count: int) -> list[float]:
    """Start a server and a client process for ``mode``; return all ``count`` round trips."""
    ctx = mp.get_context("spawn")
    s_parent, s_child = ctx.Pipe()
    c_parent, c_child = ctx.Pipe()
    if mode == "raw":
        server = ctx.Process(target=_raw_server, args=(s_child, size, count))
    else:
        server = ctx.Process(target=_fs_server, args=(s_child, size, count, mode))
    server.start()
    procs = [server]
    try:
        if not s_parent.poll(JOIN_TIMEOUT):
            raise RuntimeError(f"{mode} server did not start")
        port = s_parent.recv()
        if mode == "raw":
            client = ctx.Process(target=_raw_client, args=(c_child, port, size, count))
        else:
            client = ctx.Process(target=_fs_client, args=(c_child, port, size, count, mode))
        client.start()
        procs.append(client)
        if not c_parent.poll(JOIN_TIMEOUT):
            raise RuntimeError(f"{mode} client did not finish in {JOIN_TIMEOUT:.0f} s")
        result = c_parent.recv()
        if not result["ok"]:
            raise RuntimeError(f"{mode}: the model came back different")
        return list(result["times"])
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join()


# ---------------------------------------------------------------------- (c) full stack
class _NullBlobs:
    """A blob store that keeps nothing (the "no blobs" variant)."""

    def put(self, weights: Any) -> tuple[str, int]:
        return uuid.uuid4().hex, sum(int(np.asarray(v).nbytes) for v in weights.values())

    def get(self, digest: str, *, verify: bool = True) -> Any:
        raise RuntimeError("the no-blobs variant keeps no blobs")


class _Timer:
    """Wraps callables; sums time per name, and at top level (calls not nested in another)."""

    def __init__(self) -> None:
        self.calls: dict[str, list[float]] = {}
        self.top: dict[str, float] = {}
        self._local = threading.local()
        self._lock = threading.Lock()

    def wrap(self, name: str, fn: Any) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            depth = getattr(self._local, "depth", 0)
            self._local.depth = depth + 1
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                dt = time.perf_counter() - t0
                self._local.depth = depth
                with self._lock:
                    c = self.calls.setdefault(name, [0, 0.0])
                    c[0] += 1
                    c[1] += dt
                    if depth == 0:
                        self.top[name] = self.top.get(name, 0.0) + dt

        return timed


STORE_METHODS = (
    "find_upload",
    "add_upload",
    "commit_round",
    "log_event",
    "register_agent",
    "init_federation",
    "finish_run",
)
# Store calls the aggregator makes for each round (top level, i.e. not nested in each other).
ROUND_STORE_CALLS = ("find_upload", "blobs.put", "add_upload", "commit_round")


def _aggregator_worker(ctl: Any, workdir: str, rounds: int, size: int, variant: str) -> None:
    import uvloop

    from fedstack.aggregator import Aggregator, AggregatorConfig
    from fedstack.store import Store

    cfg = AggregatorConfig(
        port=0,
        db=str(Path(workdir) / "fedstack.db"),
        rounds=rounds,
        min_agents=1,
        delivery="push",
        finish_grace=10.0,
        max_message_bytes=max(2 * size, 1 << 30),
        auth="off",
    )

    async def main() -> dict[str, Any]:
        store = Store(cfg.db)
        if variant == "no-blobs":
            store.blobs = _NullBlobs()  # type: ignore[assignment]
        timer = _Timer()
        for name in STORE_METHODS:  # instance attributes shadow the methods
            setattr(store, name, timer.wrap(name, getattr(store, name)))
        store.blobs.put = timer.wrap("blobs.put", store.blobs.put)  # type: ignore[method-assign]
        agg = Aggregator(cfg, store=store)
        begin = agg.strategy.begin

        def timed_begin(*a: Any, **k: Any) -> Any:
            acc = begin(*a, **k)
            acc.add = timer.wrap("fedavg.add", acc.add)
            acc.result = timer.wrap("fedavg.result", acc.result)
            return acc

        agg.strategy.begin = timed_begin  # type: ignore[method-assign]
        await agg.start()
        ctl.send(agg.port)
        try:
            await asyncio.wait_for(agg.wait_finished(), 300)
        finally:
            await agg.stop()
            store.close()
        return {"calls": timer.calls, "top": timer.top, "rounds": agg.rounds_completed}

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        stats = runner.run(main())
    ctl.send(stats)


def _run_full(size: int, rounds: int, variant: str, think: float) -> dict[str, Any]:
    """One federation run: aggregator process + one Agent here; per-round times and stats."""
    from fedstack.agent import Agent
    from fedstack.errors import FederationFinished

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    with tempfile.TemporaryDirectory(prefix="fs-bench-") as work:
        proc = ctx.Process(target=_aggregator_worker, args=(child, work, rounds, size, variant))
        proc.start()
        try:
            if not parent.poll(JOIN_TIMEOUT):
                raise RuntimeError("the aggregator did not start")
            port = parent.recv()
            agent = Agent(
                f"ws://127.0.0.1:{port}",
                name="bench-agent",
                max_message_bytes=max(2 * size, 1 << 30),
            )
            agent.send_initial_model({"w": _payload(size)}, num_samples=100)
            agent.start(timeout=JOIN_TIMEOUT)
            times: list[float] = []
            try:
                gm = agent.wait_for_global_model(timeout=JOIN_TIMEOUT)
                for _ in range(rounds):
                    trained = {"w": gm["w"] + np.float32(0.001)}  # "training", not timed
                    if think:
                        time.sleep(think)
                    t0 = time.perf_counter()
                    if not agent.send_trained_model(trained, 100):
                        raise RuntimeError("the agent refused to upload")
                    gm = agent.wait_for_global_model(timeout=JOIN_TIMEOUT)
                    times.append(time.perf_counter() - t0)
                if not np.allclose(
                    gm["w"][:1000], _payload(4000) + rounds * np.float32(0.001), atol=1e-4
                ):
                    raise RuntimeError("the global model is not what FedAvg should give")
                try:
                    agent.wait_for_global_model(timeout=5)
                except FederationFinished:
                    pass
            finally:
                agent.close()
            if not parent.poll(JOIN_TIMEOUT):
                raise RuntimeError("the aggregator did not finish")
            stats = parent.recv()
        finally:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
                proc.join()
    if stats["rounds"] != rounds:
        raise RuntimeError(f"{stats['rounds']} rounds completed, expected {rounds}")
    top, calls = stats["top"], stats["calls"]
    per_round = {
        "store": sum(top.get(n, 0.0) for n in ROUND_STORE_CALLS) / rounds,
        "fedavg": sum(calls.get(n, [0, 0.0])[1] for n in ("fedavg.add", "fedavg.result")) / rounds,
    }
    return {
        "round_seconds": times,
        "round_mean": statistics.fmean(times),
        "per_round": per_round,
        "blob_puts": calls.get("blobs.put", [0, 0.0])[0],
        "calls": calls,
    }


# ---------------------------------------------------------------------- main
def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--mb", type=float, default=100.0, help="model size in MB (1e6 bytes)")
    ap.add_argument("--reps", type=int, default=5, help="repetitions (>= 3)")
    ap.add_argument(
        "--warmup",
        type=int,
        default=2,
        help="untimed round trips per process pair in (a)/(b) (the first is reported as 'cold')",
    )
    ap.add_argument(
        "--inner",
        type=int,
        default=3,
        help="timed round trips per process pair in (a)/(b); a rep is their median",
    )
    ap.add_argument("--rounds", type=int, default=5, help="rounds per full-stack run (c)")
    ap.add_argument(
        "--think",
        type=float,
        default=0.0,
        help="seconds the agent waits before each upload in (c) (training time)",
    )
    ap.add_argument("--skip-full", action="store_true", help="skip (c)")
    ap.add_argument("--out", default=str(RESULTS / "transfer.json"))
    args = ap.parse_args()
    if args.reps < 3:
        ap.error("--reps must be at least 3 (median and range)")
    if args.warmup < 1 or args.inner < 1:
        ap.error("--warmup and --inner must be at least 1")
    size = int(args.mb * 1e6) // 64 * 64
    modes = ["raw", "uvloop", "asyncio"]
    gbps: dict[str, list[float]] = {m: [] for m in modes}
    rtt: dict[str, list[float]] = {m: [] for m in modes}
    cold: dict[str, list[float]] = {m: [] for m in modes}
    print(
        f"transfer: {size / 1e6:.0f} MB float32 model ({size // 4:,} parameters), "
        f"{args.reps} repetitions, {os.cpu_count()} CPUs",
        flush=True,
    )
    t_start = time.monotonic()
    for rep in range(args.reps):
        line = []
        for mode in modes:
            times = _run_pair(mode, size, args.warmup + args.inner)
            t = statistics.median(times[args.warmup :])
            rtt[mode].append(t)
            cold[mode].append(times[0])
            gbps[mode].append(2 * size / t / 1e9)
            line.append(f"{mode} {gbps[mode][-1]:.2f} GB/s")
        print(f"  rep {rep + 1}: " + ", ".join(line), flush=True)

    variants = ("no-blobs", "full")
    full: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    if not args.skip_full:
        for rep in range(args.reps):
            for variant in variants:
                full[variant].append(_run_full(size, args.rounds, variant, args.think))
            f, n = full["full"][-1], full["no-blobs"][-1]
            print(
                f"  full stack rep {rep + 1}: round {f['round_mean']:.3f} s (full store; "
                f"store calls {f['per_round']['store']:.3f} s), {n['round_mean']:.3f} s "
                f"(no blobs)",
                flush=True,
            )

    summ = {m: _summary(gbps[m]) for m in modes}
    ratios = {
        m: [gbps[m][i] / gbps["raw"][i] for i in range(args.reps)] for m in ("uvloop", "asyncio")
    }
    ratio_of_medians = {m: summ[m]["median"] / summ["raw"]["median"] for m in ratios}
    verdict = "PASS" if ratio_of_medians["uvloop"] >= TARGET else "FAIL"

    print()
    print(
        f"(a)/(b) {size / 1e6:.0f} MB agent -> aggregator -> agent over loopback; GB/s of "
        f"payload = 2 x size / round trip; median [min - max] of {args.reps} reps "
        f"(each: median of {args.inner} round trips after {args.warmup} warm-up)"
    )
    print(
        f"{'path':<32} {'GB/s':>20} {'round trip s':>22} {'ratio to raw':>20} "
        f"{'cold 1st trip s':>16}"
    )
    names = {
        "raw": "(a) raw TCP, blocking sockets",
        "uvloop": "(b) fedstack, uvloop",
        "asyncio": "(b) fedstack, plain asyncio",
    }
    for m in modes:
        ratio = (
            "1"
            if m == "raw"
            else (f"{ratio_of_medians[m]:.2f} [{min(ratios[m]):.2f} - {max(ratios[m]):.2f}]")
        )
        print(
            f"{names[m]:<32} {_fmt(summ[m]):>20} {_fmt(_summary(rtt[m]), digits=3):>22} "
            f"{ratio:>20} {statistics.median(cold[m]):>16.3f}"
        )
    print(
        f"target: fedstack (uvloop) >= {TARGET:.2f} x raw TCP of the same run -> "
        f"{ratio_of_medians['uvloop']:.2f}  {verdict}"
    )
    print(
        f"        plain asyncio: {ratio_of_medians['asyncio']:.2f} "
        f"({'meets' if ratio_of_medians['asyncio'] >= TARGET else 'below'} the target; "
        "fedstack processes use uvloop)"
    )

    full_summary: dict[str, Any] = {}
    if not args.skip_full:
        transport = _summary(rtt["uvloop"])
        t_med = transport["median"]

        def col(v: str, key: str) -> dict[str, float]:
            runs = full[v]
            if key == "round":
                return _summary([r["round_mean"] for r in runs])
            if key == "rest":
                return _summary(
                    [
                        r["round_mean"] - r["per_round"]["store"] - r["per_round"]["fedavg"] - t_med
                        for r in runs
                    ]
                )
            return _summary([r["per_round"][key] for r in runs])

        fu, nb = col("full", "round"), col("no-blobs", "round")
        st, st_nb = col("full", "store"), col("no-blobs", "store")
        puts = full["full"][0]["blob_puts"]
        full_summary = {
            "transport_only": transport,
            "rounds_per_run": args.rounds,
            "think": args.think,
            "blob_puts_per_run": puts,
        }
        for v in variants:
            full_summary[v] = {k: col(v, k) for k in ("round", "store", "fedavg", "rest")}
        print()
        print(
            f"(c) full stack: Aggregator (own process, uvloop, SQLite store) + 1 Agent, "
            f"{args.rounds} rounds per run"
            + (f", {args.think:g} s 'training' before each upload" if args.think else "")
            + f"; seconds per round, median [min - max] of {args.reps} runs (each run: "
            "mean of its rounds)"
        )
        print(f"{'':<46} {'full store':>22} {'no blobs':>22}")
        print(
            f"{'round (upload -> new global model at agent)':<46} {_fmt(fu, digits=3):>22} "
            f"{_fmt(nb, digits=3):>22}"
        )
        print(
            f"{'  model GB/s (2 x size / round)':<46} {2 * size / fu['median'] / 1e9:>22.2f} "
            f"{2 * size / nb['median'] / 1e9:>22.2f}"
        )
        print(
            f"{'  store calls (timed in the aggregator)':<46} {_fmt(st, digits=3):>22} "
            f"{_fmt(st_nb, digits=3):>22}"
        )
        print(
            f"{'  FedAvg add + result (timed)':<46} "
            f"{_fmt(col('full', 'fedavg'), digits=3):>22} "
            f"{_fmt(col('no-blobs', 'fedavg'), digits=3):>22}"
        )
        print(
            f"{'  transport only ((b) uvloop round trip)':<46} "
            f"{_fmt(transport, digits=3):>22} {_fmt(transport, digits=3):>22}"
        )
        print(
            f"{'  rest (round - the three above, per run)':<46} "
            f"{_fmt(col('full', 'rest'), digits=3):>22} "
            f"{_fmt(col('no-blobs', 'rest'), digits=3):>22}"
        )
        print(
            f"persistence cost per round: full - no blobs = "
            f"{fu['median'] - nb['median']:.3f} s (of which in store calls "
            f"{st['median'] - st_nb['median']:.3f} s); blob puts per round: "
            f"{(puts - 2) / args.rounds:.0f} (+2 at start)"
        )
    print(f"\ntotal bench time {time.monotonic() - t_start:.0f} s")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "bench": "transfer",
                "machine": {
                    "cpus": os.cpu_count(),
                    "python": platform.python_version(),
                    "numpy": np.__version__,
                    "platform": platform.platform(),
                },
                "config": {
                    "bytes": size,
                    "params": size // 4,
                    "reps": args.reps,
                    "warmup": args.warmup,
                    "inner": args.inner,
                    "rounds": args.rounds,
                    "think": args.think,
                },
                "gbps": gbps,
                "round_trip_seconds": rtt,
                "cold_first_round_trip_seconds": cold,
                "summary": summ,
                "ratio_per_rep": ratios,
                "ratio_of_medians": ratio_of_medians,
                "target": TARGET,
                "verdict": verdict,
                "full_stack": {"summary": full_summary, "runs": full},
            },
            indent=1,
        )
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
