"""Plug-ins named in configuration as ``module:attribute`` (trainers, evaluators, gate
functions)."""

from __future__ import annotations

import pkgutil
from collections.abc import Callable
from typing import Any

from fedstack.errors import ConfigError

__all__ = ["load_callable"]


def load_callable(spec: str) -> Callable[..., Any]:
    """``module:attribute`` (``attribute`` may be dotted) -> the attribute.

    Raises:
        ConfigError: ``spec`` is not of that form, cannot be imported or found, or is not
            callable.
    """
    module, sep, attr = spec.partition(":")
    if not module or not sep or not attr:
        raise ConfigError(f"{spec!r} is not of the form module:attribute")
    try:
        obj = pkgutil.resolve_name(spec)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ConfigError(f"cannot load {spec!r}: {exc}") from exc
    if not callable(obj):
        raise ConfigError(f"{spec!r} is not callable")
    return obj  # type: ignore[no-any-return]
