"""Scaling curves: round time vs number of live agents, and vs model size.

    .venv/bin/python bench/scaling.py [--quick] [--no-plot] [--simulated]

Each point runs a real ``fedstack aggregator`` subprocess and the load generator
(``python -m fedstack.testing.loadgen``: all agents in one other process, one event loop, the real
protocol over real WebSocket connections) on 127.0.0.1; every round needs every agent
(``--min-agents N``). Round time = the store's round duration (from the previous global
model to this one: fan-out, "training" (+0.001), uploads, persistence, aggregation),
median over the rounds after the first.

- live agents: 10 -> 100 -> 1,000, small model (1e4 float32), 3 rounds;
- model size: 1e4 -> 1e5 -> 1e6 -> 1e7 -> 1e8 parameters (float32; 1e8 = 400 MB), 2 agents,
  2 rounds (the 1e8 point moves ~3 GB over loopback and writes ~2 GB of blobs).
- ``--simulated``: the simulated-agent curve (10 -> 10,000 agents in one process with the
  in-process transport) from :func:`simulated_curve`, a hook for :mod:`fedstack.sim`.

``--quick``: 10 / 100 live agents and 1e4 -> 1e6 parameters. The reference measured in the
same run is raw: the time to move the model over one loopback TCP connection (PERF.md:
an absolute time means little on this shared machine; the ratio does).
Results: table on stdout, JSON in bench/results/scaling.json, plot bench/results/scaling.png
(if matplotlib is installed).
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _live import RESULTS, run_live, save  # noqa: E402


def round_time(report: dict[str, Any]) -> float:
    secs = [r["seconds"] for r in report["store_rounds"][1:]] or [
        r["seconds"] for r in report["store_rounds"]
    ]
    return statistics.median(secs) if secs else float("nan")


def loopback_seconds(nbytes: int) -> float:
    """Reference: seconds to push ``nbytes`` through one blocking loopback TCP socket."""
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    got = [0]

    def sink() -> None:
        conn, _ = srv.accept()
        buf = bytearray(1 << 20)
        with conn:
            while got[0] < nbytes:
                n = conn.recv_into(buf)
                if not n:
                    break
                got[0] += n

    t = threading.Thread(target=sink)
    t.start()
    chunk = bytes(min(nbytes, 16 << 20))
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as c:
        sent = 0
        while sent < nbytes:
            view = memoryview(chunk)[: min(len(chunk), nbytes - sent)]
            c.sendall(view)
            sent += len(view)
    t.join(60)
    srv.close()
    return time.perf_counter() - t0


def simulated_curve(agent_counts: list[int], params: int) -> list[dict[str, Any]] | None:
    """Round time vs number of SIMULATED agents (:mod:`fedstack.sim`: the real aggregator
    and agents in one process, in-process transport), every agent in every round like the
    live curve, the same "training" (+0.001 on ``params`` float32). Up to 1,000 agents stay
    connected; above that they join, train and leave each round (the simulator's sampled
    mode with everyone sampled), which also measures registration.
    """
    import tempfile

    from fedstack.sim import simulate

    rows = []
    with tempfile.TemporaryDirectory(prefix="fedstack-scaling-") as tmp:
        for n in agent_counts:
            rounds = 3 if n <= 1000 else 2
            res = simulate(
                "fedstack.testing.probe:ProbeTrainer",
                {"params": params},
                num_agents=n,
                rounds=rounds,
                db=f"{tmp}/sim{n}.db",
                workers=0,
            )
            secs = res.round_seconds[1:] or res.round_seconds
            rows.append(
                {
                    "agents": n,
                    "round_seconds": statistics.median(secs),
                    "rounds": res.round_seconds,
                    "wall_seconds": res.wall_seconds,
                    "persistent": n <= 1000,
                }
            )
            print(f"{n:>7} {rows[-1]['round_seconds']:>9.3f}  (simulated)")
    return rows


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument(
        "--simulated",
        action="store_true",
        help="add the simulated-agent curve (needs fedstack.sim)",
    )
    args = p.parse_args()
    agents = [10, 100] if args.quick else [10, 100, 1000]
    sizes = [10**4, 10**5, 10**6] if args.quick else [10**4, 10**5, 10**6, 10**7, 10**8]

    print("round time vs live agents (1e4 float32 parameters, 3 rounds)")
    print(f"{'agents':>7} {'round s':>9} {'join s':>8} {'agg peak MiB':>13} {'errors':>6}")
    vs_agents = []
    for n in agents:
        r = run_live(n, 3, 10**4, timeout=300)
        row = {
            "agents": n,
            "round_seconds": round_time(r),
            "join_seconds": r["join_seconds"],
            "aggregator_peak_rss_mib": r["aggregator_peak_rss_mib"],
            "errors": r["error_count"],
            "rounds": r["store_rounds"],
        }
        vs_agents.append(row)
        print(
            f"{n:>7} {row['round_seconds']:>9.3f} {row['join_seconds']:>8.2f} "
            f"{row['aggregator_peak_rss_mib']:>13.1f} {row['errors']:>6}"
        )

    print("\nround time vs model size (2 live agents, 2 rounds)")
    print(
        f"{'params':>8} {'MB':>7} {'round s':>9} {'loopback s':>10} {'ratio':>7} "
        f"{'agg peak MiB':>13} {'errors':>6}"
    )
    vs_size = []
    for n_params in sizes:
        r = run_live(2, 2, n_params, timeout=900)
        nbytes = 4 * n_params
        # a round moves the model 2x per agent (down and up): 4 model transfers
        ref = loopback_seconds(4 * nbytes)
        rt = round_time(r)
        row = {
            "params": n_params,
            "model_bytes": nbytes,
            "round_seconds": rt,
            "loopback_seconds_4_transfers": ref,
            "ratio": rt / ref if ref > 0 else None,
            "aggregator_peak_rss_mib": r["aggregator_peak_rss_mib"],
            "errors": r["error_count"],
            "rounds": r["store_rounds"],
        }
        vs_size.append(row)
        print(
            f"{n_params:>8.0e} {nbytes / 1e6:>7.1f} {rt:>9.3f} {ref:>10.3f} "
            f"{rt / ref:>7.1f} {row['aggregator_peak_rss_mib']:>13.1f} {row['errors']:>6}"
        )

    simulated = None
    if args.simulated:
        print("\nround time vs simulated agents (1e4 float32 parameters)")
        simulated = simulated_curve(
            [10, 100, 1000] if args.quick else [10, 100, 1000, 10000], 10**4
        )
        if simulated is None:
            print("\nsimulated-agent curve: not available yet (fedstack.sim hook returns None)")
    out = {"vs_agents": vs_agents, "vs_model_size": vs_size, "simulated": simulated}
    print(f"\nwrote {save('scaling', out)}")
    if not args.no_plot:
        plot(out)
    return 0 if all(r["errors"] == 0 for r in vs_agents + vs_size) else 1


def plot(out: dict[str, Any]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[plot]'): no plot")
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    va = out["vs_agents"]
    a.plot([r["agents"] for r in va], [r["round_seconds"] for r in va], "o-", label="live")
    if out.get("simulated"):
        sim = out["simulated"]
        a.plot(
            [r["agents"] for r in sim], [r["round_seconds"] for r in sim], "s--", label="simulated"
        )
    a.set(
        xscale="log",
        yscale="log",
        xlabel="agents",
        ylabel="round time (s)",
        title="round time vs agents (1e4 params)",
    )
    a.legend()
    a.grid(True, which="both", alpha=0.3)
    vs = out["vs_model_size"]
    b.plot(
        [r["params"] for r in vs],
        [r["round_seconds"] for r in vs],
        "o-",
        label="fedstack round (2 agents)",
    )
    b.plot(
        [r["params"] for r in vs],
        [r["loopback_seconds_4_transfers"] for r in vs],
        "x:",
        label="raw loopback TCP, 4 transfers",
    )
    b.set(
        xscale="log",
        yscale="log",
        xlabel="parameters (float32)",
        ylabel="seconds",
        title="round time vs model size",
    )
    b.legend()
    b.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    path = RESULTS / "scaling.png"
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
