"""The simulator: N virtual agents on the real aggregator and agent code (``fedstack sim``).

See :func:`simulate` and :mod:`fedstack.sim.engine`.
"""

from fedstack.sim.backends import Backend, InlineBackend, LocalBackend, create_backend
from fedstack.sim.engine import PERSISTENT_MAX, SimError, SimResult, simulate
from fedstack.sim.worker import FitResult, FitTask

__all__ = [
    "PERSISTENT_MAX",
    "Backend",
    "FitResult",
    "FitTask",
    "InlineBackend",
    "LocalBackend",
    "SimError",
    "SimResult",
    "create_backend",
    "simulate",
]
