"""fedstack: a federated learning platform (agents, aggregators, a model store).

The public API::

    from fedstack import Agent, FederationFinished

Names are imported on first use (PEP 562), so ``import fedstack.agent`` loads the agent
only: neither the aggregator nor the store and its database stack.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from fedstack.errors import (
    ConfigError,
    FederationFinished,
    FedstackError,
    InvalidUpdate,
    RegistrationRefused,
    StoreError,
)

if TYPE_CHECKING:
    from fedstack.agent import Agent, ClientState, Trainer
    from fedstack.aggregator import Aggregator, AggregatorConfig
    from fedstack.store import Store

__version__ = "0.1.0"

_LAZY = {
    "Agent": "fedstack.agent",
    "ClientState": "fedstack.agent",
    "Trainer": "fedstack.agent",
    "Aggregator": "fedstack.aggregator",
    "AggregatorConfig": "fedstack.aggregator",
    "Store": "fedstack.store",
}

__all__ = [
    "Agent",
    "Aggregator",
    "AggregatorConfig",
    "ClientState",
    "ConfigError",
    "FederationFinished",
    "FedstackError",
    "InvalidUpdate",
    "RegistrationRefused",
    "Store",
    "StoreError",
    "Trainer",
    "__version__",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fedstack' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
