"""A deterministic test agent run as a subprocess (killed and restarted by the fault tests).

    python agent_det.py --url URL --name N --seed S --report FILE [--delay S] [--state-dir D]

Training is ``faultlib.train`` (a pure function of the global model and the seed). The
report (JSON, rewritten atomically after every step, so a SIGKILLed agent leaves the
acknowledgements it had received) lists the versions received and every acknowledged
upload id. ``--state-dir`` is passed to ``Agent(state_dir=...)`` when the library has it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import faultlib  # noqa: E402

from fedstack import Agent  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--report", required=True)
    p.add_argument("--delay", type=float, default=0.0)
    p.add_argument("--state-dir")
    args = p.parse_args()
    kwargs: dict[str, object] = {}
    if args.state_dir:
        kwargs["state_dir"] = args.state_dir
    agent = Agent(args.url, name=args.name, max_backoff=0.3, connect_timeout=3.0, **kwargs)  # type: ignore[arg-type]
    agent.send_initial_model(faultlib.initial_model())
    report: dict[str, object] = {"pid_started": True}
    out = Path(args.report)
    agent.start(timeout=60)
    faultlib.write_json(out, report)
    try:
        faultlib.agent_loop(
            agent,
            args.seed,
            report,
            delay=args.delay,
            timeout=90,
            on_round=lambda: faultlib.write_json(out, report),
        )
        report["done"] = True
    finally:
        agent.close(timeout=5)
        faultlib.write_json(out, report)


if __name__ == "__main__":
    main()
