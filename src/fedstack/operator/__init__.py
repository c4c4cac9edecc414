"""The operator surface: a web application on its own port, next to the agents' port.

``fedstack aggregator --operator-host H --operator-port P`` serves, with Starlette under
uvicorn in the aggregator's own event loop:

- ``/metrics``: Prometheus metrics (:mod:`fedstack.operator.metrics`);
- ``/api/v1/...``: the operator REST API (:mod:`fedstack.operator.api`);
- ``/healthz``: liveness.

:func:`~fedstack.operator.app.create_app` builds the application from routes (a dashboard
mounts its pages there); :class:`~fedstack.operator.server.OperatorServer` serves one.
The web stack is imported on first use (an aggregator without an operator port, or the
simulator, never loads it).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedstack.operator.app import aggregator_app, create_app
    from fedstack.operator.metrics import AggregatorMetrics
    from fedstack.operator.server import OperatorServer

__all__ = ["AggregatorMetrics", "OperatorServer", "aggregator_app", "create_app"]

_WHERE = {
    "AggregatorMetrics": "fedstack.operator.metrics",
    "OperatorServer": "fedstack.operator.server",
    "aggregator_app": "fedstack.operator.app",
    "create_app": "fedstack.operator.app",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
