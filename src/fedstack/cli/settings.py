"""``fedstack aggregator``'s flags, derived from :class:`AggregatorConfig`'s declaration.

Every setting with a flag (:func:`fedstack.aggregator.config.settings`) becomes one typer
option: ``--<key>`` taking a value (its help says what is accepted, the default and the
environment variable), ``--<key>/--no-<key>`` for a boolean, a repeatable ``KEY=VALUE``
option for a table (``--strategy-param``), the declared words for ``--init-weights``. The
flags are read as given and converted by the same code as a file's values and the
environment's (:meth:`AggregatorConfig.from_sources`), so a bad value gives the same
:class:`~fedstack.errors.ConfigError` wherever it comes from.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from fedstack.aggregator.config import AggregatorConfig, Setting, accepted, settings
from fedstack.cli.options import Group

__all__ = ["AGGREGATOR_SETTINGS", "aggregator_config"]


def _default_text(s: Setting) -> str:
    if s.secret or s.default is None:
        return "unset"
    if s.is_table:
        return "empty"
    if s.is_list:
        return "none"
    if isinstance(s.default, bool):
        return "true" if s.default else "false"
    if s.flag_values:
        return next((w for w, v in s.flag_values.items() if v == s.default), "unset")
    return str(s.default)


def _metavar(s: Setting) -> str:
    what = accepted(s.type)
    if what.startswith("one of "):
        return (
            "["
            + "|".join(w.strip(" '") for w in what[7:].removesuffix(" (or unset)").split(","))
            + "]"
        )
    if "integer" in what:
        return "INTEGER"
    if "number" in what:
        return "FLOAT"
    return "TEXT"


def _parameter(s: Setting) -> inspect.Parameter:
    extra = f" (default {_default_text(s)}; env {s.env})"
    if s.is_table:
        option = typer.Option(s.flag, metavar="KEY=VALUE", help=s.help + extra)
        annotation: Any = Annotated[list[str] | None, option]
    elif s.is_list:
        option = typer.Option(s.flag, metavar="TEXT", help=s.help + extra)
        annotation = Annotated[list[str] | None, option]
    elif s.flag_values:
        words = tuple(s.flag_values)
        option = typer.Option(s.flag, help=s.help + extra)
        annotation = Annotated[Literal[words] | None, option]
    elif accepted(s.type) in ("true or false", "true or false (or unset)"):
        option = typer.Option(f"{s.flag}/--no-{s.flag[2:]}", help=s.help + extra)
        annotation = Annotated[bool | None, option]
    else:
        what = accepted(s.type)
        shown = "" if what.startswith("text") else f": {what}"
        option = typer.Option(s.flag, metavar=_metavar(s), help=f"{s.help}{shown}{extra}")
        annotation = Annotated[str | None, option]
    return inspect.Parameter(
        s.name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=None
    )


def _flag_values(**given: Any) -> dict[str, Any]:
    by_name = {s.name: s for s in settings()}
    out: dict[str, Any] = {}
    for name, value in given.items():
        words = by_name[name].flag_values
        out[name] = words[value] if words and value is not None else value
    return out


AGGREGATOR_SETTINGS = Group(
    parameters=tuple(_parameter(s) for s in settings() if s.cli), build=_flag_values
)
"""The flags of every aggregator setting, packed into ``{name: value or None}``."""


def aggregator_config(
    config: Path | str | None, flags: Mapping[str, Any], env: Mapping[str, str] | None
) -> AggregatorConfig:
    """The aggregator's configuration: the ``--config`` file, then the environment, then
    the flags (see :meth:`AggregatorConfig.from_sources`).

    Raises:
        ConfigError: Anything refused, named with where it came from.
    """
    return AggregatorConfig.from_sources(file=config, env=env, flags=flags)
