"""Cost of the SecAgg+ library itself (fedstack.privacy.secagg), no network.

One full session of N agents (default 100) with P parameters (default 1e6), run in this one
process: every agent's advertise / share_keys / receive_shares / mask / unmask and the server's
side. Prints the time of each step (per agent: median over the agents; server: total) for D
agents dropping after the key exchange (default D = 0 and 5), and checks the result against the
exact sum of the survivors' quantised inputs.

What to read: ``mask`` is one agent's masking of its 1e6-element update (k + 1 AES-CTR keystreams
and the quantisation); ``finish`` is the server's unmasking (Shamir reconstruction of every seed,
|U3| self-mask keystreams plus, per dropped agent, one keystream per surviving neighbour).

Run::

    .venv/bin/python bench/secagg_protocol.py                    # N=100, P=1e6, D=0,5: ~25 s
    .venv/bin/python bench/secagg_protocol.py --repeat 3         # medians of 3 sessions each
    .venv/bin/python bench/secagg_protocol.py --agents 10 --params 100000 --dropped 0 3
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from fedstack.privacy.secagg import AgentSession, SecAggParams, ServerSession  # noqa: E402

T = TypeVar("T")


def session(n: int, p: int, dropped: int, seed: int) -> dict[str, float]:
    params = SecAggParams()
    sid = f"bench:{seed}:{dropped}"
    rng = np.random.default_rng(seed)
    ids = [f"agent-{i:04d}" for i in range(n)]
    server = ServerSession(params, sid, random.Random(seed), vector_length=p + 1)
    t: dict[str, list[float]] = {
        k: [] for k in ("advertise", "share_keys", "receive", "mask", "unmask")
    }

    def timed(step: str, fn: Callable[..., T], *args: Any) -> T:
        t0 = time.perf_counter()
        out = fn(*args)
        t[step].append(time.perf_counter() - t0)
        return out

    agents = {a: AgentSession(params, sid, a) for a in ids}
    for a, s in agents.items():
        server.add_keys(a, timed("advertise", s.advertise))
    t0 = time.perf_counter()
    rosters = server.close_keys()
    close_keys = time.perf_counter() - t0
    for a, s in agents.items():
        server.add_shares(a, timed("share_keys", s.share_keys, rosters[a]))
    t0 = time.perf_counter()
    fwd = server.close_shares()
    close_shares = time.perf_counter() - t0
    drop = set(rng.choice(ids, size=dropped, replace=False).tolist())
    live = [a for a in ids if a not in drop]
    # one shared update (scaled per agent) keeps the bench's own memory at one vector
    base = rng.uniform(-0.5, 0.5, p)
    q_sum = np.zeros(p + 1, dtype=np.int64)
    add_masked = 0.0
    for i, a in enumerate(live):
        timed("receive", agents[a].receive_shares, fwd[a])
        x = base * (1 + i % 3) / 3
        y = timed("mask", agents[a].mask, x, 100.0 + i)
        t0 = time.perf_counter()
        server.add_masked(a, y)
        add_masked += time.perf_counter() - t0
        w = min(100.0 + i, params.max_weight) / params.max_weight
        v = np.append(w * x, w * params.clip)
        levels = 2**params.quant_bits - 1
        q_sum += np.rint((v + params.clip) * levels / (2 * params.clip)).astype(np.int64)
    u3, gone = server.close_masked()
    for a in u3:
        server.add_unmask(a, *timed("unmask", agents[a].unmask, u3, gone))
    t0 = time.perf_counter()
    total, weight, _ = server.finish()
    finish = time.perf_counter() - t0
    exp = q_sum.astype(np.float64) * params.step - len(u3) * params.clip
    assert np.array_equal(np.append(total, weight * params.clip), exp), "wrong sum"
    out = {f"agent {k} (median)": statistics.median(v) for k, v in t.items()}
    out |= {
        "server close_keys": close_keys,
        "server close_shares": close_shares,
        "server add_masked (all)": add_masked,
        "server finish": finish,
    }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--agents", type=int, default=100)
    ap.add_argument("--params", type=float, default=1e6)
    ap.add_argument("--dropped", type=int, nargs="+", default=[0, 5])
    ap.add_argument(
        "--repeat", type=int, default=1, help="sessions per setting; the median of each step"
    )
    args = ap.parse_args()
    n, p = args.agents, int(args.params)
    params = SecAggParams()
    print(
        f"SecAgg+ library, N={n} agents, P={p:,} parameters, k={params.degree(n)}, "
        f"t={params.holders_threshold(n)}, quant_bits={params.quant_bits}"
    )
    rows: dict[int, dict[str, float]] = {}
    for d in args.dropped:
        runs = [session(n, p, d, seed=100 * r + d + 1) for r in range(args.repeat)]
        rows[d] = {k: statistics.median(run[k] for run in runs) for k in runs[0]}
    keys = list(next(iter(rows.values())))
    print(f"{'step':32s}" + "".join(f"{f'dropped={d}':>14s}" for d in rows))
    for k in keys:
        print(f"{k:32s}" + "".join(f"{rows[d][k] * 1e3:12.1f}ms" for d in rows))
    print(
        f"(median of {args.repeat} session(s) per column; every result checked equal to the "
        "exact sum of the survivors' quantised inputs)"
    )


if __name__ == "__main__":
    main()
