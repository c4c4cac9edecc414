"""CLI wrapper of the load generator: many live agents in one process.

    .venv/bin/python bench/loadgen.py --url ws://127.0.0.1:8765 --agents 1000 --rounds 3

Same as ``python -m fedstack.testing.loadgen`` (see :mod:`fedstack.testing.loadgen` for
the options).
"""

from __future__ import annotations

import sys

from fedstack.testing.loadgen import main

if __name__ == "__main__":
    sys.exit(main())
