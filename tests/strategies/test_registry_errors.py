"""Strategy parameters given wrong say what the strategy takes."""

from __future__ import annotations

import pytest

from fedstack.errors import ConfigError
from fedstack.strategies import create


def test_a_missing_required_parameter_is_named() -> None:
    with pytest.raises(ConfigError, match=r"'normclip' needs the parameter\(s\) bound"):
        create("normclip")
    assert create("normclip", bound=1.0) is not None


def test_an_unknown_parameter_lists_the_accepted_ones() -> None:
    with pytest.raises(ConfigError, match="no parameter.*bogus.*takes: weighted, precision"):
        create("fedavg", bogus=1)


def test_an_unknown_strategy_lists_the_registered_ones() -> None:
    with pytest.raises(ConfigError, match="unknown strategy 'nope'; available: .*fedavg"):
        create("nope")
