"""The raw-socket floor of a multi-process round: no framework, no store, no validation.

One server process and ``agents`` agent processes on 127.0.0.1, blocking TCP sockets with
TCP_NODELAY, a model of ``params`` float32. Each round the server sends the global model
to every agent (``sendall`` of the array's own buffer), each agent receives it into a
preallocated array (``recv_into``), adds ``delta`` in place and sends it back, and the
server adds each reply into an accumulator as it arrives and scales it: the least any
deployment must do to move 2 x agents x model bytes through the kernel per round on this
machine. ``overhead_probe.py`` runs it next to the framework-free loop, in the same run.

    .venv/bin/python bench/raw_socket_floor.py      # prints seconds per round (rounds 2+)
"""

from __future__ import annotations

import multiprocessing as mp
import socket
import statistics
import time
from typing import Any

import numpy as np


def _recv_into(sock: socket.socket, arr: np.ndarray[Any, Any]) -> None:
    view = memoryview(arr).cast("B")
    got = 0
    while got < view.nbytes:
        n = sock.recv_into(view[got:])
        if n == 0:
            raise EOFError("peer closed")
        got += n


def _agent(port: int, params: int, delta: float, rounds: int) -> None:
    s = socket.create_connection(("127.0.0.1", port), timeout=120)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    w = np.empty(params, np.float32)
    for _ in range(rounds):
        _recv_into(s, w)
        w += np.float32(delta)
        s.sendall(memoryview(w).cast("B"))
    s.close()


def raw_socket_floor(
    params: int = 25_000_000, agents: int = 10, rounds: int = 5, delta: float = 0.001
) -> dict[str, Any]:
    """Seconds per round of the raw-socket loop (see the module docstring)."""
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(agents)
    ls.settimeout(60)
    port = ls.getsockname()[1]
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(target=_agent, args=(port, params, delta, rounds), daemon=True)
        for _ in range(agents)
    ]
    for p in procs:
        p.start()
    try:
        conns = [ls.accept()[0] for _ in range(agents)]
        for c in conns:
            c.settimeout(120)
        g = np.zeros(params, np.float32)
        acc = np.empty(params, np.float32)
        buf = np.empty(params, np.float32)
        times = []
        for _ in range(rounds):
            t = time.perf_counter()
            for c in conns:
                c.sendall(memoryview(g).cast("B"))
            acc.fill(0.0)
            for c in conns:
                _recv_into(c, buf)
                acc += buf
            acc *= np.float32(1.0 / agents)
            g, acc = acc, g
            times.append(time.perf_counter() - t)
        for c in conns:
            c.close()
    finally:
        ls.close()
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    after = times[1:]
    return {
        "seconds_per_round": statistics.fmean(after),
        "median": statistics.median(after),
        "rounds": times,
        "final_mean_weight": float(g.mean()),
        "bytes_per_round": 2 * agents * params * 4,
    }


if __name__ == "__main__":
    r = raw_socket_floor()
    print(
        f"raw-socket floor: {r['seconds_per_round']:.3f} s per round (rounds 2+; "
        f"{r['bytes_per_round'] / 1e9:.1f} GB through loopback per round), "
        f"final mean weight {r['final_mean_weight']:.4f}"
    )
