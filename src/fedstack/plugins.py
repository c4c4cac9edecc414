"""Plug-ins named in configuration as ``module:attribute`` (trainers, evaluators, gate
functions)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from fedstack.errors import ConfigError

__all__ = ["load_callable"]


def load_callable(spec: str) -> Callable[..., Any]:
    """``module:attribute`` -> the attribute (for evaluators and trainers)."""
    module, _, attr = spec.partition(":")
    if not module or not attr:
        raise ConfigError(f"{spec!r} is not of the form module:attribute")
    try:
        obj = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"cannot load {spec!r}: {exc}") from exc
    if not callable(obj):
        raise ConfigError(f"{spec!r} is not callable")
    return obj  # type: ignore[no-any-return]
