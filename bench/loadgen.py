"""CLI wrapper of the load generator: many live agents in one process.

    .venv/bin/python bench/loadgen.py --url ws://127.0.0.1:8765 --agents 1000 --rounds 3

Same as ``python -m fedstack.loadgen`` (see :mod:`fedstack.loadgen` for the options).
"""

from __future__ import annotations

import sys

from fedstack.loadgen import main

if __name__ == "__main__":
    sys.exit(main())
