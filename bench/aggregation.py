"""Aggregation throughput and memory of every registered strategy, next to this machine's
streaming bound measured in the same run.

What it measures: for every strategy in ``fedstack.strategies.names()`` (with the
parameters in :func:`params_for`; strategies that need per-update extra arrays it cannot
make up are skipped, and say why) and N in {10, 100} updates of one float32 tensor of
P in {1e5, 1e6, 1e7} parameters (N x P x 4 bytes of update data, up to 4 GB):

- time = ``strategy.begin(...)``, ``add()`` of all N updates, ``result()``;
  throughput = N x P x 4 bytes / time ("GB/s" = 1e9 bytes of update data per second);
  median of 3 runs after an untimed (traced) one; one run when a run takes > 2 s;
- peak memory = tracemalloc's peak (numpy reports its buffers to tracemalloc) during one
  whole aggregation, on top of the update data the bench already holds (so buffered rules
  show their working memory, not the updates they keep by reference);
- the streaming bound of the same data in the same run, in the same units:
  ``inplace f32``: ``acc = x_0.copy(); acc += x_k`` over the N arrays (float32),
  ``f32->f64``: ``acc = zeros(P, float64); np.add(acc, x_k, out=acc)`` (the least work
  a float64 accumulation of float32 inputs does in numpy), and ``copy``: ``np.copyto``
  of every array into one float32 buffer.
  ``x inplace`` and ``x f32->f64`` in the table are the strategy's throughput over these.
- acceptance: FedAvg (sample-weighted) at P = 1e7 for N = 10 and 100, interleaved with
  the three references over 5 repetitions (median of the per-repetition ratios):
  throughput >= 0.50 x the float32 -> float64 accumulate bound, and (the strict reading)
  >= 0.50 x the in-place float32 bound; peak memory at N = 100 within 5 % (+1 MB) of N = 10.

BLAS threads: the bench runs OpenBLAS single-threaded (``OPENBLAS_NUM_THREADS=1`` unless
the variable is already set). Only the Gram matrix of Krum, Multi-Krum, Bulyan and the
geometric median uses BLAS; single-threaded it is as fast here, while the default two
threads on these two vCPUs, shared with other jobs, stalled at random (Krum N=100,
P=1e6: 0.3 s single-threaded, 1.3-31 s threaded in the same minute). Run with
``OPENBLAS_NUM_THREADS=2`` to see the default.

Combinations whose update data would exceed 6 GB, or whose time predicted from the
smaller runs exceeds 60 s, are skipped and listed as such.

Run::

    .venv/bin/python bench/aggregation.py           # full: ~2.5 min on 2 cores
    .venv/bin/python bench/aggregation.py --quick   # P <= 1e6 + the acceptance: ~35 s

Prints tables and writes ``bench/results/aggregation.json`` (``config.quick`` tells a quick
run from a full one).

Measured on this machine (2 vCPUs shared with other jobs, AMD EPYC, 32 MB L3, Python 3.11.7,
numpy 2.4, OpenBLAS single-threaded), full run in 134 s, P = 1e7, GB/s of update bytes::

    streaming bound   N=10: inplace f32 24.2, f32->f64 5.8, copy 23.8
                      N=100: inplace f32 27.2, f32->f64 6.1, copy 26.7
    strategy          N=10 GB/s  peak MB     N=100 GB/s  peak MB   (time at N=100)
    fedavg            5.65       121         5.95        121       0.67 s
    fedprox/fednova   5.6        120-121     6.2-6.3     120-121
    fedopt/fedavgm    4.3/3.2    240/360     6.0/5.7     240/360
    fedadam/fedyogi   2.4/2.1    520/560     3.2/5.4     520/560
    fedasync          3.0        200         3.3         200
    normclip          1.9        160         1.6         160       2.4 s
    median            1.13       53          3.6         53        1.1 s
    trimmed_mean      0.82       53          2.8         53        1.4 s
    krum              2.9        40          1.0         40        4.0 s
    multikrum         2.0        121         0.84        121       4.8 s
    geometric_median  1.9        121         0.83        121       4.8 s
    bulyan            0.55       54          0.68        53        5.9 s
    scaffold, fedcurv skipped (need per-update extra arrays)

    FedAvg, 5 interleaved repetitions: N=10 5.71 GB/s = 0.24 x inplace f32, 0.92 x f32->f64;
    N=100 6.38 GB/s = 0.24 x inplace f32, 1.02 x f32->f64; peak 120.8 MB at N=10 and N=100
    PASS  throughput >= 0.50 x the float64-accumulation bound (f32->f64)
    FAIL  throughput >= 0.50 x the in-place float32 bound (strict reading; see below)
    PASS  peak memory independent of N

The buffered rules' peak is their working memory; they also hold the N updates (by
reference) until ``result()``: 4 GB at N = 100. Before this bench FedAvg ran at 3.6-4.0
GB/s with a full-size float64 temporary (peak ~200 MB); it now accumulates block by block
(``fedstack/strategies/fedavg.py``).

Why FedAvg cannot reach half of the in-place float32 bound here: FedAvg accumulates in
float64 (see ``fedstack/strategies/fedavg.py``: exact products, order-independent
results, ``test_float32_accumulates_in_float64``). Each update then moves 4 bytes of input
plus 8 + 8 bytes of accumulator per element, against 4 + 4 + 4 for ``acc32 += x32``: even
a perfect kernel would sit at 12 / 20 = 0.60 of the in-place bound. numpy has no fused
convert-multiply-add: the float32 -> float64 conversion, the multiply and the add are
separate passes over each cache-sized block, and the conversion straight from memory runs
at only ~3 G elements/s (the ``f32->f64`` reference); FedAvg copies each float32 block into
the cache first and gets ~1x that reference, ~0.24x the in-place bound. The float64
accumulator of a 1e7 model (80 MB) does not fit the 32 MB L3, so its traffic cannot be
cached away; only float32 accumulation (refused above) would change the picture.
"""

from __future__ import annotations

import os

# Before numpy loads OpenBLAS: one BLAS thread unless the environment says otherwise (see
# "BLAS threads" in the docstring).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import tracemalloc  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

from fedstack import strategies  # noqa: E402
from fedstack.strategies import Update  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MEMORY_LIMIT = 6e9  # bytes of update data
TIME_LIMIT = 60.0  # seconds per aggregation (predicted)
ONE_RUN_ABOVE = 2.0  # seconds: a single timed run instead of 3
REPS = 3
ACCEPT_REPS = 5
CLIP = 0.015  # normclip bound / sqrt(P): about half of the bench's updates get clipped

Params = dict[str, Any]


def params_for(name: str, n: int, p: int) -> Params | str:
    """Parameters for ``name`` in a round of ``n`` updates of ``p`` parameters, or the reason
    it is skipped."""
    fixed: dict[str, Params] = {
        "trimmed_mean": {"beta": 0.1},
        "krum": {"f": 1},
        "multikrum": {"f": 1},
        "bulyan": {"f": 1},
        "geometric_median": {"max_iter": 100},
    }
    if name in ("scaffold", "fedcurv"):
        return "needs per-update extra arrays (control variates / Fisher statistics)"
    if name == "ckks-fedavg":
        return "sums CKKS ciphertexts, not float32 updates (bench/ckks_cost.py measures it)"
    out = dict(fixed.get(name, {}))
    if name == "normclip":
        out["bound"] = CLIP * math.sqrt(p)
    if name == "fedbuff":
        out["k"] = n
    return out


def make_round(
    n: int, p: int, seed: int = 0
) -> tuple[dict[str, np.ndarray[Any, Any]], list[Update]]:
    """A global model and ``n`` distinct float32 updates around it (deltas of norm
    ~0.01-0.02 sqrt(p)), with sample counts in [10, 1000)."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal(p, dtype=np.float32)
    pool = [rng.standard_normal(p, dtype=np.float32) for _ in range(4)]
    ups = []
    for i in range(n):
        x = pool[i % 4] * np.float32(0.01 * (1 + i / n))
        x += base
        ups.append(Update(f"a{i}", {"w": x}, int(rng.integers(10, 1000))))
    return {"w": base}, ups


def inputs_for(name: str, ups: list[Update]) -> list[Update]:
    """The updates as ``name`` needs them (same arrays): FedNova's ``local_steps`` metric."""
    if name == "fednova":
        return [dataclasses.replace(u, metrics={"local_steps": 10}) for u in ups]
    return ups


def aggregate_once(name: str, params: Params, glob: dict[str, Any], ups: list[Update]) -> float:
    strat = strategies.create(name, **params)
    state = strat.init_state(glob)
    t0 = time.perf_counter()
    acc = strat.begin(glob, state, round=1, rng=np.random.default_rng(0))
    for u in ups:
        acc.add(u)
    res = acc.result()
    dt = time.perf_counter() - t0
    del res, acc
    return dt


def traced_once(
    name: str, params: Params, glob: dict[str, Any], ups: list[Update]
) -> tuple[float, int]:
    """One aggregation under tracemalloc: (seconds, peak bytes above the starting point)."""
    gc.collect()
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        dt = aggregate_once(name, params, glob, ups)
        peak = tracemalloc.get_traced_memory()[1] - start
    finally:
        tracemalloc.stop()
    return dt, peak


# ------------------------------------------------------------------- references
def ref_inplace32(xs: list[np.ndarray[Any, Any]]) -> float:
    t0 = time.perf_counter()
    acc = xs[0].copy()
    for x in xs[1:]:
        np.add(acc, x, out=acc)
    return time.perf_counter() - t0


def ref_f32_to_f64(xs: list[np.ndarray[Any, Any]]) -> float:
    t0 = time.perf_counter()
    acc = np.zeros(xs[0].size)
    for x in xs:
        np.add(acc, x, out=acc)
    return time.perf_counter() - t0


def ref_copy(xs: list[np.ndarray[Any, Any]]) -> float:
    t0 = time.perf_counter()
    dst = np.empty_like(xs[0])
    for x in xs:
        np.copyto(dst, x)
    return time.perf_counter() - t0


REFERENCES: dict[str, Callable[[list[np.ndarray[Any, Any]]], float]] = {
    "inplace f32": ref_inplace32,
    "f32->f64": ref_f32_to_f64,
    "copy": ref_copy,
}


def references(xs: list[np.ndarray[Any, Any]], reps: int) -> dict[str, list[float]]:
    """GB/s of each reference, ``reps`` interleaved repetitions (after one warm-up each)."""
    nbytes = sum(x.nbytes for x in xs)
    for f in REFERENCES.values():
        f(xs)
    out: dict[str, list[float]] = {k: [] for k in REFERENCES}
    for _ in range(reps):
        for k, f in REFERENCES.items():
            out[k].append(nbytes / f(xs) / 1e9)
    return out


def med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


# ------------------------------------------------------------------------- runs
def predict(
    known: dict[tuple[str, int], tuple[int, float]], name: str, n: int, p: int, ns: list[int]
) -> float:
    """Seconds ``name`` should take for (n, p), from its last smaller run: linear in P;
    linear in N for streaming rules, quadratic for buffered ones (Krum's distances)."""
    if (name, n) in known:
        pp, t = known[(name, n)]
        return t * p / pp
    smaller = [m for m in ns if m < n and (name, m) in known]
    if not smaller:
        return 0.0
    m = smaller[-1]
    pp, t = known[(name, m)]
    power = 1 if strategies.create(name, **_params_or_empty(name, n, p)).streaming else 2
    return t * (p / pp) * (n / m) ** power


def _params_or_empty(name: str, n: int, p: int) -> Params:
    params = params_for(name, n, p)
    return {} if isinstance(params, str) else params


def run_grid(
    ns: list[int], ps: list[int], names: list[str]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    rows: list[dict[str, Any]] = []
    bounds: list[dict[str, Any]] = []
    last: dict[tuple[str, int], tuple[int, float]] = {}  # (name, n) -> (p, seconds)
    for p in ps:
        for n in ns:
            nbytes = n * p * 4
            if nbytes > MEMORY_LIMIT:
                for name in names:
                    rows.append(
                        {
                            "strategy": name,
                            "n": n,
                            "p": p,
                            "skipped": f"update data {nbytes / 1e9:.1f} GB > 6 GB",
                        }
                    )
                continue
            glob, ups = make_round(n, p)
            xs = [u.weights["w"] for u in ups]
            ref = references(xs, REPS)
            b = {"n": n, "p": p, **{k: med(v) for k, v in ref.items()}, "samples": ref}
            bounds.append(b)
            print(
                f"  N={n:<4d} P={p:.0e}  bound: inplace f32 {b['inplace f32']:.2f} GB/s, "
                f"f32->f64 {b['f32->f64']:.2f} GB/s, copy {b['copy']:.2f} GB/s",
                flush=True,
            )
            for name in names:
                row: dict[str, Any] = {"strategy": name, "n": n, "p": p}
                rows.append(row)
                params = params_for(name, n, p)
                if isinstance(params, str):
                    row["skipped"] = params
                    continue
                row["params"] = params
                row["streaming"] = bool(strategies.create(name, **params).streaming)
                predicted = predict(last, name, n, p, ns)
                if predicted > TIME_LIMIT:
                    row["skipped"] = f"predicted {predicted:.0f} s > {TIME_LIMIT:.0f} s"
                    continue
                mine = inputs_for(name, ups)
                try:
                    first, peak = traced_once(name, params, glob, mine)
                except Exception as exc:  # a strategy that cannot use these inputs
                    row["skipped"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:70]}"
                    continue
                times = (
                    [first]
                    if first > ONE_RUN_ABOVE
                    else [aggregate_once(name, params, glob, mine) for _ in range(REPS)]
                )
                t = med(times)
                last[(name, n)] = (p, t)
                gbps = nbytes / t / 1e9
                row.update(
                    seconds=t,
                    times=times,
                    gbps=gbps,
                    peak_bytes=peak,
                    x_inplace=gbps / b["inplace f32"],
                    x_f64=gbps / b["f32->f64"],
                    single_run=len(times) == 1,
                )
                print(
                    f"    {name:18s} {t:8.3f} s {gbps:7.2f} GB/s  x{row['x_inplace']:.2f} "
                    f"x{row['x_f64']:.2f}  peak {peak / 1e6:8.1f} MB",
                    flush=True,
                )
            del glob, ups, xs
            gc.collect()
    return rows, bounds


def acceptance(p: int, ns: list[int], reps: int) -> dict[str, Any]:
    """FedAvg at ``p`` interleaved with the references, and its peak memory per N."""
    out: dict[str, Any] = {"p": p, "reps": reps, "by_n": {}}
    for n in ns:
        glob, ups = make_round(n, p, seed=1)
        xs = [u.weights["w"] for u in ups]
        nbytes = n * p * 4
        references(xs, 1)  # warm-up
        aggregate_once("fedavg", {}, glob, ups)
        samples: dict[str, list[float]] = {k: [] for k in (*REFERENCES, "fedavg")}
        for _ in range(reps):
            for k, f in REFERENCES.items():
                samples[k].append(nbytes / f(xs) / 1e9)
            samples["fedavg"].append(nbytes / aggregate_once("fedavg", {}, glob, ups) / 1e9)
        ratios = {
            k: [a / b for a, b in zip(samples["fedavg"], samples[k], strict=True)]
            for k in REFERENCES
        }
        _, peak = traced_once("fedavg", {}, glob, ups)
        out["by_n"][n] = {
            "gbps": samples,
            "median_gbps": {k: med(v) for k, v in samples.items()},
            "ratio": {k: med(v) for k, v in ratios.items()},
            "ratio_range": {k: [min(v), max(v)] for k, v in ratios.items()},
            "peak_bytes": peak,
        }
        del glob, ups, xs
        gc.collect()
    worst = {k: min(out["by_n"][n]["ratio"][k] for n in ns) for k in REFERENCES}
    peaks = [out["by_n"][n]["peak_bytes"] for n in ns]
    out["throughput_f64_pass"] = worst["f32->f64"] >= 0.5
    out["throughput_inplace_pass"] = worst["inplace f32"] >= 0.5
    out["memory_pass"] = max(peaks) <= 1.05 * min(peaks) + 1e6
    out["worst_ratio"] = worst
    return out


def fmt_p(p: int) -> str:
    return f"{p:.0e}".replace("+0", "")


def print_table(rows: list[dict[str, Any]]) -> None:
    print(
        "\npeak MB: tracemalloc peak of one aggregation beyond the update data; 'keeps': "
        "the rule also holds the N updates by reference (N x P x 4 bytes) until result()"
    )
    print(
        f"{'strategy':18s} {'N':>4s} {'P':>5s} {'time s':>8s} {'GB/s':>7s} "
        f"{'x inplace':>9s} {'x f32->f64':>10s} {'peak MB':>9s} {'keeps':>6s}  note"
    )
    for r in rows:
        head = f"{r['strategy']:18s} {r['n']:4d} {fmt_p(r['p']):>5s}"
        if "skipped" in r:
            print(
                f"{head} {'-':>8s} {'-':>7s} {'-':>9s} {'-':>10s} {'-':>9s} {'-':>6s}  "
                f"skipped: {r['skipped']}"
            )
            continue
        note = "1 run" if r["single_run"] else ""
        keeps = "-" if r["streaming"] else f"{r['n'] * r['p'] * 4 / 1e9:.1f}GB"
        print(
            f"{head} {r['seconds']:8.3f} {r['gbps']:7.2f} {r['x_inplace']:9.2f} "
            f"{r['x_f64']:10.2f} {r['peak_bytes'] / 1e6:9.1f} {keeps:>6s}  {note}"
        )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument(
        "--quick",
        action="store_true",
        help="P in {1e5, 1e6} for the grid (the acceptance still runs at 1e7)",
    )
    ap.add_argument("--only", default="", help="comma-separated strategy names")
    args = ap.parse_args()

    names = strategies.names()
    if args.only:
        names = [n for n in names if n in args.only.split(",")]
    ns = [10, 100]
    ps = [100_000, 1_000_000] if args.quick else [100_000, 1_000_000, 10_000_000]
    started = time.perf_counter()
    print(f"strategies: {', '.join(names)}", flush=True)
    print("grid (times: begin + add x N + result; GB/s of float32 update bytes):", flush=True)
    rows, bounds = run_grid(ns, ps, names)
    print("\nacceptance: FedAvg at P=1e7, interleaved with the references", flush=True)
    acc = acceptance(10_000_000, ns, 3 if args.quick else ACCEPT_REPS)
    wall = time.perf_counter() - started

    print("\nstreaming bound of the same data (GB/s of update bytes, median of 3):")
    print(f"{'N':>4s} {'P':>5s} {'inplace f32':>12s} {'f32->f64':>9s} {'copy':>7s}")
    for b in bounds:
        print(
            f"{b['n']:4d} {fmt_p(b['p']):>5s} {b['inplace f32']:12.2f} {b['f32->f64']:9.2f} "
            f"{b['copy']:7.2f}"
        )
    print_table(rows)

    print(f"\nFedAvg at P=1e7, median of {acc['reps']} interleaved repetitions:")
    for n, r in acc["by_n"].items():
        g = r["median_gbps"]
        print(
            f"  N={n:<4d} fedavg {g['fedavg']:.2f} GB/s | inplace f32 {g['inplace f32']:.2f} "
            f"(x{r['ratio']['inplace f32']:.2f}) | f32->f64 {g['f32->f64']:.2f} "
            f"(x{r['ratio']['f32->f64']:.2f}) | copy {g['copy']:.2f} "
            f"(x{r['ratio']['copy']:.2f}) | peak {r['peak_bytes'] / 1e6:.1f} MB"
        )

    def verdict(ok: bool) -> str:
        return "PASS" if ok else "FAIL"

    w = acc["worst_ratio"]
    peaks = {n: r["peak_bytes"] / 1e6 for n, r in acc["by_n"].items()}
    print(
        f"\n{verdict(acc['throughput_f64_pass'])}: FedAvg throughput at P=1e7 >= 0.50 x the "
        "streaming bound of a float64 accumulation (f32->f64 accumulate): "
        f"worst x{w['f32->f64']:.2f}"
    )
    print(
        f"{verdict(acc['throughput_inplace_pass'])}: (strict) FedAvg throughput at P=1e7 "
        f">= 0.50 x the in-place float32 acc += x bound: worst x{w['inplace f32']:.2f} "
        "(a float64 accumulator caps this at ~0.60; see the module docstring)"
    )
    print(
        f"{verdict(acc['memory_pass'])}: FedAvg peak memory does not grow with N at P=1e7: "
        + ", ".join(f"N={n}: {v:.1f} MB" for n, v in peaks.items())
    )
    print(f"\nwall time {wall:.0f} s")

    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "aggregation.json"
    out.write_text(
        json.dumps(
            {
                "bench": "aggregation",
                "machine": {
                    "cpus": os.cpu_count(),
                    "python": platform.python_version(),
                    "numpy": np.__version__,
                    "platform": platform.platform(),
                    "openblas_num_threads": os.environ.get("OPENBLAS_NUM_THREADS"),
                },
                "config": {
                    "ns": ns,
                    "ps": ps,
                    "reps": REPS,
                    "accept_reps": ACCEPT_REPS,
                    "quick": args.quick,
                    "memory_limit": MEMORY_LIMIT,
                    "time_limit": TIME_LIMIT,
                },
                "bounds": bounds,
                "rows": rows,
                "acceptance": acc,
                "wall_seconds": wall,
            },
            indent=1,
            default=str,
        )
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
