"""Options shared by several commands, each declared once as an ``Annotated`` alias.

Commands name these aliases in their signatures (``db: DbPath``). Options that always go
together are a :class:`Group`: its parameters are added to every command that uses it
(:func:`with_group`) and reach the command as one typed object, so ``fedstack agent`` and
``fedstack agents`` cannot drift apart.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar

import typer

from fedstack.aggregator.config import parse_pairs

__all__ = [
    "AgentOptions",
    "BlobDir",
    "DbPath",
    "Group",
    "JsonFlag",
    "RunOpt",
    "TrainerArgs",
    "with_group",
]

F = TypeVar("F", bound=Callable[..., Any])

JsonFlag = Annotated[bool, typer.Option("--json", help="machine-readable output (one line)")]
DbPath = Annotated[str, typer.Option("--db", help="SQLite file or SQLAlchemy URL")]
BlobDir = Annotated[
    str | None, typer.Option("--blob-dir", help="blob directory (non-SQLite databases)")
]
RunOpt = Annotated[
    str | None, typer.Option("--run", help="run id or name (default: the latest run)")
]
TrainerArgs = Annotated[
    list[str] | None,
    typer.Option(
        "--trainer-arg",
        metavar="KEY=VALUE",
        help="a trainer argument, repeatable; the value is JSON if it parses (3, 0.5, true), "
        "else a string",
    ),
]


@dataclass(frozen=True)
class Group:
    """Parameters that several commands take together, packed into one object.

    Attributes:
        parameters: typer parameters (``Annotated`` annotations, defaults).
        build: Makes the object from those parameters' values, by name.
    """

    parameters: tuple[inspect.Parameter, ...]
    build: Callable[..., Any]


def with_group(arg: str, group: Group) -> Callable[[F], F]:
    """Decorate a command taking ``arg`` (the group's object): its command line gets the
    group's options instead of ``arg``."""

    def decorate(func: F) -> F:
        sig = inspect.signature(func, eval_str=True)
        own = [p for p in sig.parameters.values() if p.name != arg]
        names = [p.name for p in group.parameters]

        @functools.wraps(func)
        def command(**values: Any) -> Any:
            packed = group.build(**{n: values.pop(n) for n in names})
            return func(**values, **{arg: packed})

        params = [*own, *group.parameters]
        command.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in params}
        return command  # type: ignore[return-value]

    return decorate


def _option(name: str, annotation: Any, default: Any) -> inspect.Parameter:
    return inspect.Parameter(
        name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=default
    )


@dataclass(frozen=True)
class AgentOptions:
    """How agents connect and train: the options of ``fedstack agent`` and ``agents``.

    Attributes:
        urls: The aggregators' ``ws://`` or ``wss://`` URLs (``--url``, repeatable: members
            of one federation, tried in order; see :class:`fedstack.agent.Agent`).
        trainer: ``module:Class`` implementing :class:`fedstack.Trainer`.
        trainer_args: Keyword arguments of the trainer (``--trainer-arg``, JSON values).
        token: The agent's credential (``FEDSTACK_TOKEN``).
        enrollment_token: The deployment's enrollment token (``FEDSTACK_ENROLLMENT_TOKEN``).
        ca: PEM CA of the aggregator's certificate (``wss://``; ``FEDSTACK_CA``).
        cert: PEM client certificate (mutual TLS).
        key: PEM key of ``cert`` (default: in the ``cert`` file).
        init_weights: Whether the agent's initial model may start the federation.
        he_context: The agents' CKKS key file (``agents.ctx`` of ``fedstack he keygen``):
            models are encrypted before they leave and decrypted when they come (None: off).
    """

    urls: tuple[str, ...]
    trainer: str
    trainer_args: dict[str, Any]
    token: str | None
    enrollment_token: str | None
    ca: str | None
    cert: str | None
    key: str | None
    init_weights: bool
    he_context: str | None = None

    @property
    def url(self) -> str:
        """The first aggregator URL."""
        return self.urls[0]


DEFAULT_AGENT_URL = "ws://127.0.0.1:8765"


def _agent_options(
    url: list[str] | None,
    trainer: str,
    trainer_arg: list[str] | None,
    token: str | None,
    enrollment_token: str | None,
    ca: str | None,
    cert: str | None,
    key: str | None,
    init_weights: str,
    he_context: str | None = None,
) -> AgentOptions:
    from fedstack.agent.urls import check_urls
    from fedstack.errors import ConfigError

    if he_context is not None and init_weights == "zeros":
        raise ConfigError(
            "--he-context cannot be used with --init-weights zeros: a zero model is not a "
            "ciphertext (the first agent's encrypted model starts the run)"
        )

    return AgentOptions(
        urls=tuple(check_urls(url or [DEFAULT_AGENT_URL])),  # ConfigError: not a URL
        trainer=trainer,
        trainer_args=parse_pairs(trainer_arg or [], "--trainer-arg"),
        token=token or None,
        enrollment_token=enrollment_token or None,
        ca=ca,
        cert=cert,
        key=key,
        init_weights=init_weights != "zeros",
        he_context=he_context,
    )


AGENT_OPTIONS = Group(
    parameters=(
        _option(
            "url",
            Annotated[
                list[str] | None,
                typer.Option(
                    "--url",
                    help="an aggregator's URL; repeat it for the members of a federation "
                    f"(tried in order, failover to the next) [default: {DEFAULT_AGENT_URL}]",
                ),
            ],
            None,
        ),
        _option(
            "trainer",
            Annotated[
                str, typer.Option("--trainer", help="module:Class implementing fedstack.Trainer")
            ],
            ...,
        ),
        _option("trainer_arg", TrainerArgs, None),
        _option(
            "token",
            Annotated[
                str | None,
                typer.Option(
                    "--token",
                    envvar="FEDSTACK_TOKEN",
                    show_envvar=True,
                    help="credential (`fedstack credentials add`)",
                ),
            ],
            None,
        ),
        _option(
            "enrollment_token",
            Annotated[
                str | None,
                typer.Option(
                    "--enrollment-token",
                    envvar="FEDSTACK_ENROLLMENT_TOKEN",
                    show_envvar=True,
                    help="the deployment's enrollment token: registers a NEW name with "
                    "its own token",
                ),
            ],
            None,
        ),
        _option(
            "ca",
            Annotated[
                str | None,
                typer.Option(
                    "--ca",
                    help="PEM CA of the aggregator's certificate, for wss:// URLs (or "
                    "FEDSTACK_CA; default: the system's trust store)",
                ),
            ],
            None,
        ),
        _option(
            "cert",
            Annotated[
                str | None,
                typer.Option(
                    "--cert",
                    help="PEM client certificate, if the aggregator requires one (mutual TLS)",
                ),
            ],
            None,
        ),
        _option(
            "key",
            Annotated[
                str | None,
                typer.Option("--key", help="PEM key of --cert (default: in the --cert file)"),
            ],
            None,
        ),
        _option(
            "init_weights",
            Annotated[
                Literal["agent", "zeros"],
                typer.Option(
                    "--init-weights",
                    help="offer the trainer's initial weights, or zeros, to start the federation",
                ),
            ],
            "agent",
        ),
        _option(
            "he_context",
            Annotated[
                str | None,
                typer.Option(
                    "--he-context",
                    help="the agents' CKKS key file (agents.ctx of `fedstack he keygen`): "
                    "models are encrypted before they leave, decrypted when they come "
                    "(the aggregator runs with --he ckks)",
                ),
            ],
            None,
        ),
    ),
    build=_agent_options,
)
