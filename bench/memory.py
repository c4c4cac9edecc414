"""Aggregator peak memory (VmHWM) vs number of live agents, and the streaming acceptance case.

    .venv/bin/python bench/memory.py [--quick] [--skip-acceptance]

Each case runs a real ``fedstack aggregator`` subprocess and the load generator
(``python -m fedstack.testing.loadgen``, all agents in one other process) on 127.0.0.1; every
round needs every agent. The aggregator's peak RSS is read from ``/proc/<pid>/status``
(VmHWM) after the agents got the last global model.

1. Fixed model (1e6 float32 = 4 MB), 10 / 50 / 100 agents, 2 rounds: peak RSS vs agents.
2. Acceptance (issue 5): 100 agents x 100 MB model (25 M float32), 1 round: peak RSS must
   stay under 4x the model size (streaming: the global model is encoded once and shared,
   big uploads are received within the aggregator's upload byte budget, 128 MiB by
   default, and freed as soon as they are accumulated). ~20 GB of loopback traffic and
   ~10 GB of blob writes: minutes, not seconds. ``--quick``: 10 agents x 100 MB instead.

Results: table on stdout, JSON in bench/results/memory.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _live import run_live, save  # noqa: E402

MODEL_BYTES_ACCEPT = 100_000_000  # 25 M float32


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true")
    p.add_argument("--skip-acceptance", action="store_true")
    p.add_argument("--only-acceptance", action="store_true")
    args = p.parse_args()
    agents_list = [] if args.only_acceptance else [10, 50] if args.quick else [10, 50, 100]
    params = 1_000_000
    rows = []
    print(
        f"{'agents':>7} {'model MB':>9} {'rounds':>6} {'agg peak MiB':>13} "
        f"{'peak/model':>10} {'wall s':>7} {'errors':>6}"
    )
    for n in agents_list:
        r = run_live(n, 2, params, timeout=300)
        row = {
            "agents": n,
            "model_bytes": params * 4,
            "rounds": len(r["store_rounds"]),
            "aggregator_peak_rss_mib": r["aggregator_peak_rss_mib"],
            "wall_seconds": r["wall_seconds_total"],
            "errors": r["error_count"],
        }
        rows.append(row)
        print(
            f"{n:>7} {params * 4 / 1e6:>9.1f} {row['rounds']:>6} "
            f"{row['aggregator_peak_rss_mib']:>13.1f} "
            f"{row['aggregator_peak_rss_mib'] * 2**20 / (params * 4):>10.2f} "
            f"{row['wall_seconds']:>7.1f} {row['errors']:>6}"
        )
    out: dict[str, object] = {"vs_agents": rows}
    status = 0
    if not args.skip_acceptance:
        n = 10 if args.quick else 100
        print(f"\nacceptance: {n} agents x 100 MB model (25 M float32), 1 round ...")
        r = run_live(n, 1, MODEL_BYTES_ACCEPT // 4, timeout=1800)
        peak = r["aggregator_peak_rss_mib"] * 2**20
        ratio = peak / MODEL_BYTES_ACCEPT
        ok = (
            ratio == ratio and ratio < 4.0 and r["error_count"] == 0 and len(r["store_rounds"]) == 1
        )
        status = 0 if ok else 1
        print(
            f"aggregator peak RSS {peak / 1e6:.0f} MB = {ratio:.2f} x the model size "
            f"(target < 4x): {'PASS' if ok else 'FAIL'}; round "
            f"{r['store_rounds'][0]['seconds'] if r['store_rounds'] else float('nan'):.1f} s, "
            f"wall {r['wall_seconds_total']:.0f} s, load generator peak "
            f"{r.get('max_rss_mib', float('nan'))} MiB, errors {r['error_count']}"
        )
        out["acceptance"] = {
            "agents": n,
            "model_bytes": MODEL_BYTES_ACCEPT,
            "aggregator_peak_rss_bytes": peak,
            "ratio": ratio,
            "pass": ok,
            "report": {k: v for k, v in r.items() if k != "rounds"},
        }
    print(f"\nwrote {save('memory', out)}")
    return status


if __name__ == "__main__":
    sys.exit(main())
