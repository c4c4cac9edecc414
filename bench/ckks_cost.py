"""The cost of CKKS homomorphic encryption (``--he ckks``) against plain FedAvg, by model size.

What it measures, for P in {1e3, 1e4, 1e5, 1e6} float32 parameters and N agents (default
10), with the default key set (N = 8192, primes 60/40/60 bits, scale 2**40: 4095 values per
ciphertext):

- ``encrypt``: one agent's :func:`~fedstack.privacy.ckks.encrypt_model` (its weights times
  its sample count, and the count), median over the N agents;
- ``aggregate``: the aggregator's whole round with strategy ``ckks-fedavg`` on the public
  context: ``check()`` of every upload (what the aggregator does on arrival: every
  ciphertext parsed and validated), ``add()`` (parsed again and summed) and ``result()``
  (serialised); against ``plain``: strategy ``fedavg`` (precision auto) on the N float32
  updates; ``check/up``: the ``check()`` of one upload alone (it runs on the aggregator's
  event loop when the upload arrives);
- ``decrypt``: one agent's :func:`~fedstack.privacy.ckks.decrypt_model` of the sum;
- ``upload``: bytes of one encrypted upload (fixed by the parameters and P) against the
  float32 model's P x 4 bytes;
- ``live``: mean seconds per round of a real aggregator (thread) and 3 agents (threads) over
  loopback WebSockets, with ``--he ckks`` and with plain FedAvg (everything on the same 2
  cores: encryption, decryption and the aggregator compete);
- ``max err``: the largest absolute difference between the decrypted global model (float64
  template) and plain float64 weighted FedAvg of the same updates (values ~N(0, 1), sample
  counts 10..1000).

Run::

    .venv/bin/python bench/ckks_cost.py            # ~1 min on 2 cores
    .venv/bin/python bench/ckks_cost.py --agents 3 --sizes 1e3,1e4,1e5

Prints a table, writes ``bench/results/ckks_cost.json`` and ``bench/plots/ckks_cost.png``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from fedstack.privacy.ckks import decrypt_model, encrypt_model, keygen, load_context
from fedstack.strategies import Update, create

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
PLOTS = HERE / "plots"


def measure(p: int, agents: int, keys: Path, seed: int = 0) -> dict[str, Any]:
    ctx = load_context(keys / "agents.ctx", "agents")
    strategy = create("ckks-fedavg", context=str(keys / "aggregator.ctx"))
    rng = np.random.default_rng(seed)
    template = {"w": np.zeros(p, dtype=np.float64)}
    models = [{"w": rng.standard_normal(p).astype(np.float32)} for _ in range(agents)]
    counts = [int(n) for n in rng.integers(10, 1000, agents)]
    enc_times, uploads = [], []
    for m, n in zip(models, counts, strict=True):
        t0 = time.perf_counter()
        enc = encrypt_model(ctx, {"w": m["w"].astype(np.float64)}, n)
        enc_times.append(time.perf_counter() - t0)
        uploads.append(enc)
    init = encrypt_model(ctx, template, 1)
    check_time = 0.0
    t0 = time.perf_counter()
    acc = strategy.begin(init, {})
    for i, (enc, n) in enumerate(zip(uploads, counts, strict=True)):
        upd = Update(f"a{i}", enc, n)
        t1 = time.perf_counter()
        strategy.check(upd, init)
        check_time += time.perf_counter() - t1
        acc.add(upd)
    result = acc.result()
    agg_time = time.perf_counter() - t0
    del uploads
    t0 = time.perf_counter()
    got, _, _ = decrypt_model(ctx, result.weights, template)
    dec_time = time.perf_counter() - t0
    plain = create("fedavg")
    t0 = time.perf_counter()
    pacc = plain.begin({"w": np.zeros(p, np.float32)}, {})
    for i, (m, n) in enumerate(zip(models, counts, strict=True)):
        pacc.add(Update(f"a{i}", m, n))
    pacc.result()
    plain_time = time.perf_counter() - t0
    ref = sum(n * m["w"].astype(np.float64) for m, n in zip(models, counts, strict=True))
    ref = np.asarray(ref) / sum(counts)
    return {
        "params": p,
        "agents": agents,
        "ciphertexts": ctx.chunks_for(p + 1),
        "encrypt_s": statistics.median(enc_times),
        "aggregate_s": agg_time,
        "check_per_upload_s": check_time / agents,
        "plain_aggregate_s": plain_time,
        "decrypt_s": dec_time,
        "upload_bytes": ctx.encrypted_size(p),
        "plain_bytes": 4 * p,
        "max_abs_error": float(np.max(np.abs(got["w"] - ref))),
    }


class _Step:
    """A trainer for the live rounds: the global model plus a small agent-specific step."""

    def __init__(self, p: int, index: int, stamps: list[float] | None = None) -> None:
        self.p, self.index, self.stamps = p, index, stamps

    def initial_weights(self) -> dict[str, np.ndarray[Any, Any]]:
        return {"w": np.zeros(self.p, dtype=np.float32)}

    def fit(self, weights: dict[str, Any], config: Any) -> tuple[Any, int, dict[str, float]]:
        if self.stamps is not None:
            self.stamps.append(time.perf_counter())
        return {"w": weights["w"] + np.float32(0.01 * (self.index + 1))}, 10 + self.index, {}

    def evaluate(self, weights: dict[str, Any], config: Any) -> dict[str, float]:
        return {}


def live_round(p: int, agents: int, rounds: int, keys: Path | None) -> float:
    """Mean seconds per round of a real aggregator (in a thread, loopback WebSockets) with
    ``agents`` agents in threads, with CKKS (``keys``) or plain FedAvg (None)."""
    import threading

    from fedstack.agent.runner import run_trainer
    from fedstack.privacy.ckks import CkksTrainer
    from fedstack.testing import aggregator_thread, small_config

    with tempfile.TemporaryDirectory() as tmp:
        extra: dict[str, Any] = {"strategy_params": {}}
        if keys is not None:
            extra.update(he="ckks", he_context=str(keys / "aggregator.ctx"))
        cfg = small_config(Path(tmp) / "run.db", rounds=rounds, min_agents=agents, **extra)
        stamps: list[float] = []
        with aggregator_thread(cfg) as agg:
            url = f"ws://127.0.0.1:{agg.port}"
            threads = []
            for i in range(agents):
                trainer: Any = _Step(p, i, stamps if i == 0 else None)
                if keys is not None:
                    trainer = CkksTrainer(trainer, keys / "agents.ctx")
                t = threading.Thread(target=run_trainer, args=(trainer, url, f"a{i}"))
                t.start()
                threads.append(t)
            for t in threads:
                t.join(600)
    gaps = np.diff(stamps)
    return float(np.mean(gaps)) if gaps.size else float("nan")


def table(rows: list[dict[str, Any]]) -> None:
    head = (
        f"{'params':>9} {'cts':>5} {'encrypt s':>10} {'aggregate s':>12} {'plain s':>9} "
        f"{'x plain':>8} {'check/up s':>10} {'decrypt s':>10} {'upload MB':>10} "
        f"{'plain MB':>9} {'x size':>7} {'max err':>9}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['params']:>9.0e} {r['ciphertexts']:>5} {r['encrypt_s']:>10.4f} "
            f"{r['aggregate_s']:>12.4f} {r['plain_aggregate_s']:>9.5f} "
            f"{r['aggregate_s'] / max(r['plain_aggregate_s'], 1e-9):>8.0f} "
            f"{r['check_per_upload_s']:>10.4f} {r['decrypt_s']:>10.4f} "
            f"{r['upload_bytes'] / 1e6:>10.2f} "
            f"{r['plain_bytes'] / 1e6:>9.3f} {r['upload_bytes'] / r['plain_bytes']:>7.0f} "
            f"{r['max_abs_error']:>9.1e}"
        )


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[plot]'): no plot")
        return
    ps = [r["params"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    a.plot(ps, [r["encrypt_s"] for r in rows], "o-", label="encrypt (one agent)")
    a.plot(ps, [r["aggregate_s"] for r in rows], "s-", label=f"aggregate ({rows[0]['agents']})")
    a.plot(ps, [r["decrypt_s"] for r in rows], "^-", label="decrypt (one agent)")
    a.plot(ps, [r["plain_aggregate_s"] for r in rows], "x:", label="plain FedAvg aggregate")
    a.set(xscale="log", yscale="log", xlabel="parameters", ylabel="seconds", title="CKKS time")
    a.legend()
    a.grid(True, which="both", alpha=0.3)
    b.plot(ps, [r["upload_bytes"] for r in rows], "o-", label="CKKS upload")
    b.plot(ps, [r["plain_bytes"] for r in rows], "x:", label="float32 upload")
    b.set(xscale="log", yscale="log", xlabel="parameters", ylabel="bytes", title="upload size")
    b.legend()
    b.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--agents", type=int, default=10)
    ap.add_argument("--sizes", default="1e3,1e4,1e5,1e6")
    ap.add_argument(
        "--live",
        type=int,
        default=3,
        metavar="AGENTS",
        help="also time live rounds (aggregator + AGENTS agents in threads over loopback, "
        "with CKKS and plain; 0: skip)",
    )
    args = ap.parse_args(argv)
    sizes = [int(float(s)) for s in args.sizes.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        keys = Path(tmp)
        keygen(keys)
        for p in sizes:
            row = measure(p, args.agents, keys)
            if args.live:
                row["live_agents"] = args.live
                row["live_round_s"] = live_round(p, args.live, 4, keys)
                row["live_plain_round_s"] = live_round(p, args.live, 4, None)
            rows.append(row)
            print(f"  measured P={p:.0e}", file=sys.stderr)
    table(rows)
    if args.live:
        print(f"\nlive rounds ({args.live} agents in threads, loopback, mean of 3 rounds):")
        for r in rows:
            print(
                f"  P={r['params']:.0e}: CKKS {r['live_round_s']:.3f} s/round, plain FedAvg "
                f"{r['live_plain_round_s']:.3f} s/round"
            )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ckks_cost.json").write_text(json.dumps({"rows": rows}, indent=1))
    plot(rows, PLOTS / "ckks_cost.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
