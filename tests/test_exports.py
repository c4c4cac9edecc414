"""The public names of ``fedstack`` and what importing the agent loads."""

from __future__ import annotations

import subprocess
import sys

import pytest

import fedstack

PUBLIC = [
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


def test_public_names_are_exported() -> None:
    assert sorted(fedstack.__all__) == sorted(PUBLIC)
    from fedstack import (  # noqa: F401  every name resolves through the lazy loader
        Agent,
        Aggregator,
        AggregatorConfig,
        ClientState,
        ConfigError,
        FederationFinished,
        FedstackError,
        InvalidUpdate,
        RegistrationRefused,
        Store,
        StoreError,
        Trainer,
    )
    from fedstack.agent import Agent as AgentClass
    from fedstack.store import Store as StoreClass

    assert fedstack.Agent is AgentClass and Store is StoreClass
    assert isinstance(fedstack.__version__, str)
    assert set(PUBLIC) <= set(dir(fedstack))


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        fedstack.Nope  # noqa: B018


def loaded_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print('\\n'.join(sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    return set(out.stdout.split())


@pytest.mark.parametrize("statement", ["import fedstack.agent", "from fedstack import Agent"])
def test_the_agent_never_loads_the_store_or_the_server_stack(statement: str) -> None:
    loaded = loaded_after(statement)
    assert "fedstack.agent.client" in loaded  # the statement did import the agent
    for server_side in (
        "sqlalchemy",
        "alembic",
        "fedstack.store",
        "fedstack.aggregator",
        "cryptography",
        "sklearn",
    ):
        assert server_side not in loaded, server_side


def test_the_acceptance_one_liner() -> None:
    subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, fedstack.agent; assert 'sqlalchemy' not in sys.modules",
        ],
        check=True,
        timeout=120,
    )
