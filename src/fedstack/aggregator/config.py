"""Aggregator configuration: every setting declared once, here.

Each field of :class:`AggregatorConfig` carries its type with its constraints
(``Annotated[int, msgspec.Meta(...)]``, ``Literal[...]`` for enumerations), its default and
its help text (:func:`setting`). Everything else derives from that declaration:

- the keys of a TOML (optionally under ``[aggregator]``) or JSON file (:meth:`load`), with
  the book's keys accepted where they make sense: ``aggr_ip`` -> host, ``reg_socket`` ->
  port, ``aggregation_threshold`` -> threshold, ``polling`` (1 = poll) -> delivery,
  ``init_weights_flag`` -> init_weights, ``db_data_path`` -> db; ``round_interval``,
  ``recv_socket`` and the book's other socket and database keys are accepted and ignored
  (rounds are event-driven and one port serves the agents);
- the environment variables ``FEDSTACK_<KEY>`` (:meth:`from_sources`);
- the ``fedstack aggregator`` flags ``--<key>`` and their help (``fedstack.cli.settings``).

Values are converted with ``msgspec.convert(..., strict=False)``, so ``"1024"`` is the
integer 1024 wherever it comes from. A value of the wrong type, out of range, an unknown key
or an unknown enumeration value raises :class:`~fedstack.errors.ConfigError` naming the key,
the value and what is accepted, before anything starts. Precedence, lowest first: defaults,
the file, the environment, the flags.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
import sys
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from fedstack.errors import ConfigError

__all__ = [
    "ENV_PREFIX",
    "OTHER_ENVIRONMENT",
    "AggregatorConfig",
    "Setting",
    "TargetMetric",
    "accepted",
    "settings",
]

ENV_PREFIX = "FEDSTACK_"
OTHER_ENVIRONMENT = {
    "FEDSTACK_TOKEN": "an agent's credential (fedstack agent, fedstack agents)",
    "FEDSTACK_CA": "PEM CA an agent verifies the aggregator's certificate with",
    "FEDSTACK_CACHE_DIR": "where derived data sets are cached",
    "FEDSTACK_UPSTREAM_TOKEN": "the credential an aggregator with `upstream` presents to its "
    "upper aggregator (as an agent called `name`)",
}
"""Environment variables fedstack reads outside the aggregator's settings: the aggregator
accepts them in its environment, and refuses any other unknown ``FEDSTACK_*`` name."""

IGNORED_BOOK_KEYS = frozenset(
    {
        "round_interval",
        "recv_socket",
        "exch_socket",
        "db_ip",
        "db_socket",
        "model_path",
        "db_name",
        "db_model_path",
    }
)
_FLOAT_MAX = sys.float_info.max  # msgspec bounds must be finite: ``le`` this refuses inf

MAX_STORED_INT = 2**31 - 1
"""The largest sample count the store's integer columns hold on every database (PostgreSQL's
INTEGER is 32 bits)."""
Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]
Count = Annotated[int, msgspec.Meta(ge=1)]
Seconds = Annotated[float, msgspec.Meta(gt=0, le=_FLOAT_MAX)]
Fraction = Annotated[float, msgspec.Meta(gt=0, le=1)]
Name = Annotated[str, msgspec.Meta(min_length=1)]
MemberName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
"""A federation member's name: 1-64 letters, digits, ``.``, ``_``, ``-`` (shown to
operators and agents: no spaces, no control characters)."""
Params = dict[str, Any]


def setting(
    default: Any,
    help: str,
    *,
    book: str | None = None,
    flag: str | None = None,
    flag_values: Mapping[str, Any] | None = None,
    cli: bool = True,
    secret: bool = False,
) -> Any:
    """Declare one configuration field (a :func:`dataclasses.field` with its metadata).

    Args:
        default: The default value (a ``dict`` default means an empty table).
        help: One line for the reference and ``--help``.
        book: The book's name for the key, accepted in files.
        flag: The flag's name when it is not ``--<key>`` (e.g. ``--strategy-param``).
        flag_values: Words the flag takes instead of the value (``agent`` -> True).
        cli: Whether ``fedstack aggregator`` has a flag for it.
        secret: Kept out of ``repr`` and of error messages.
    """
    meta = {
        "help": help,
        "book": book,
        "flag": flag,
        "flag_values": flag_values,
        "cli": cli,
        "secret": secret,
    }
    if isinstance(default, dict):
        return dataclasses.field(default_factory=dict, metadata=meta, repr=not secret)
    return dataclasses.field(default=default, metadata=meta, repr=not secret)


@dataclass(frozen=True)
class AggregatorConfig:
    """Everything an aggregator needs; see the README's configuration reference.

    Constructing one (directly, by :meth:`replace` or from a source) converts and checks
    every field and raises :class:`~fedstack.errors.ConfigError` on a bad value.
    """

    host: str = setting("127.0.0.1", "address to listen on", book="aggr_ip")
    port: Port = setting(8765, "port agents connect to (0: any free port)", book="reg_socket")
    transport: Literal["tcp", "inproc"] = setting(
        "tcp",
        "tcp: WebSockets on host:port; inproc: an in-process endpoint "
        "inproc://RUN_NAME for agents in the same process (the simulator)",
        cli=False,
    )
    db: str = setting("fedstack.db", "SQLite file or SQLAlchemy URL", book="db_data_path")
    blob_dir: str | None = setting(
        None,
        "tensor blob directory (default <db>.blobs for SQLite; on PostgreSQL unset = every "
        "blob in the database, set = a directory every aggregator shares; needed for other "
        "URLs)",
    )
    inline_blob_bytes: Annotated[int, msgspec.Meta(ge=0, le=64 << 20)] = setting(
        256 * 1024,
        "models up to this size are kept in the database, in the transaction "
        "that records them (no blob file, no extra fsync); 0: always files",
    )
    agent_round_storage_bytes: Count | None = setting(
        None,
        "bytes of uploads (weights and the extra arrays the strategy reads, plus 1 KiB a "
        "record) one agent may have stored in one round; further uploads are refused with "
        "quota-exceeded (default: 8 uploads of the model with twice its size in extra "
        "arrays, at most 4 x max_message_bytes)",
    )
    round_storage_bytes: Count | None = setting(
        None,
        "bytes of uploads all agents together may have stored in one round; further "
        "uploads are refused with quota-exceeded (default: no limit beyond the per-agent one)",
    )
    keep_local_models: Literal["all", "last", "metadata"] = setting(
        "all",
        "retention of the agents' local models after each round: all (every one, as the "
        "book asks), last (their weights for the last keep_local_rounds rounds only) or "
        "metadata (their records only, no weights)",
    )
    keep_local_rounds: Count = setting(
        1, "rounds whose local models keep their weights with keep_local_models = last"
    )
    run_name: Name = setting("default", "name of the run to start or resume")
    rounds: Count | None = setting(None, "stop after this many rounds (default: never)")
    target_metric: str | None = setting(
        None,
        "stop after the first round whose metrics reach NAME>=VALUE or NAME<=VALUE: a "
        "round metric (mean_<agent metric>, e.g. mean_local_accuracy, or a strategy's) "
        "or eval_<name> from the evaluator (then evaluated before the round's model is "
        "sent); with rounds, whichever comes first",
    )
    threshold: Fraction = setting(
        1.0,
        "fraction of active agents whose uploads complete a round (1.0 = synchronous)",
        book="aggregation_threshold",
    )
    min_agents: Count = setting(1, "fewest uploads that make a round")
    round_timeout: Seconds | None = setting(300.0, "round deadline in seconds")
    delivery: Literal["push", "poll"] = setting("push", "how agents get the global model")
    staleness: Literal["next", "drop"] = setting(
        "next", "what to do with uploads trained on an older global model"
    )
    init_weights: bool | None = setting(
        None,
        "start from the first agent's weights (agent) or zeros (default: the agent's flag)",
        book="init_weights_flag",
        flag_values={"agent": True, "zeros": False},
    )
    strategy: Name = setting("fedavg", "aggregation strategy (see `fedstack strategies`)")
    strategy_params: Params = setting(
        {}, "a strategy parameter (JSON value), repeatable", flag="--strategy-param"
    )
    federation: Params = setting(
        {}, "a setting sent to every agent when it joins (merged with the strategy's), repeatable"
    )
    gate: Params = setting(
        {},
        "an update check before aggregation (see fedstack.aggregator.gate.UpdateGate), repeatable",
    )
    seed: int = setting(0, "seed of the strategies' random generator")
    # ---- secure aggregation (issue 14): SecAgg+; a `[secagg]` table in a file
    secagg: bool = setting(
        False,
        "secure aggregation (SecAgg+): the aggregator only ever sees masked updates and "
        "their sum (weighted FedAvg and the server optimisers; see docs/privacy.md)",
    )
    secagg_clip: Annotated[float, msgspec.Meta(gt=0, le=1e6)] = setting(
        8.0,
        "secure aggregation: every element of an agent's pre-scaled update is clipped to +-this",
    )
    secagg_quant_bits: Annotated[int, msgspec.Meta(ge=2, le=31)] = setting(
        22, "secure aggregation: bits each clipped element is quantised to"
    )
    secagg_max_weight: Annotated[float, msgspec.Meta(gt=0, le=MAX_STORED_INT)] = setting(
        1000.0,
        "secure aggregation: an agent's FedAvg weight is min(num_samples, this) (1: plain mean)",
    )
    secagg_neighbours: Annotated[int, msgspec.Meta(ge=2, le=254)] | None = setting(
        None,
        "secure aggregation: neighbours k of each agent (even; unset: 2*ceil(log2 n), "
        "a complete graph for few agents)",
    )
    secagg_threshold: Fraction = setting(
        0.5,
        "secure aggregation: Shamir threshold t = floor(this*(k+1))+1 of an agent's k+1 holders",
    )
    secagg_min_survivors: Annotated[int, msgspec.Meta(ge=2)] = setting(
        2, "secure aggregation: fewest masked updates a round is unmasked from (else it fails)"
    )
    secagg_timeout: Seconds = setting(
        30.0, "secure aggregation: seconds each phase of a session waits for slow agents"
    )
    secagg_max_attempts: Annotated[int, msgspec.Meta(ge=1, le=1000)] = setting(
        5,
        "secure aggregation: failed attempts of one round before the aggregator waits "
        "for the set of agents to change (a join) to try again",
    )
    evaluator: str | None = setting(None, "module:function evaluating each global model centrally")
    max_message_bytes: Annotated[int, msgspec.Meta(ge=1024)] = setting(
        1 << 30, "largest accepted message"
    )
    max_num_samples: Annotated[int, msgspec.Meta(ge=1, le=MAX_STORED_INT)] = setting(
        10_000_000,
        "cap on the sample count an upload claims (its FedAvg weight): an upload claiming "
        "more is refused with invalid-model and counts for nothing",
    )
    heartbeat_interval: Seconds = setting(
        5.0, "seconds; an agent silent for 3 intervals is dropped"
    )
    register_timeout: Seconds = setting(10.0, "seconds a new connection has to register")
    send_timeout: Seconds = setting(120.0, "seconds a message may take to send")
    finish_grace: Annotated[float, msgspec.Meta(ge=0, le=_FLOAT_MAX)] = setting(
        30.0, "seconds to wait for agents to collect the final model"
    )
    min_transfer_rate: Annotated[int, msgspec.Meta(ge=0)] = setting(
        32 * 1024,
        "bytes/s an agent must keep up while sending a big message or reading a global "
        "model (checked every 2 s; slower: dropped, so that it does not hold the shared "
        "budgets); a message may take max(send_timeout, its size / this rate); 0: no minimum",
    )
    upload_budget_bytes: Count = setting(
        128 << 20, "bytes of large uploads received at once, over all agents (further senders wait)"
    )
    fanout_budget_bytes: Count = setting(
        256 << 20, "bytes of the global model queued for sending at once, over all agents"
    )
    auth: Literal["required", "off"] = setting(
        "required",
        "required: agents present credentials (`fedstack credentials add`) or "
        "enroll; off: a name is bound to the first token it shows",
    )
    enrollment_token: Annotated[str, msgspec.Meta(min_length=16)] | None = setting(
        None,
        "shared secret letting NEW agent names register with their own token (never stored)",
        secret=True,
    )
    tls_cert: str | None = setting(
        None, "PEM certificate (chain): the port then speaks only TLS (wss://)"
    )
    tls_key: str | None = setting(None, "PEM key of tls_cert (default: in the tls_cert file)")
    tls_client_ca: str | None = setting(
        None, "PEM CA: agents must present a client certificate it signed (mutual TLS)"
    )
    require_tls: bool = setting(False, "refuse to start without tls_cert")
    operator_host: str = setting(
        "127.0.0.1",
        "address the operator surface (/metrics, the operator API /api/v1) listens on",
    )
    operator_port: Port | None = setting(
        None,
        "port of the operator surface: Prometheus /metrics and the operator API /api/v1 "
        "(HTTPS with tls_cert; 0: any free port); unset: none (the agents' port serves "
        "only agents and /healthz)",
    )
    track: tuple[str, ...] = setting(
        (),
        "an experiment tracker each committed round (and its evaluation) is logged to, "
        "repeatable: mlflow:URI (a tracking URI or a directory; extra mlflow) or "
        "tensorboard:DIR (extra tensorboard); a failing tracker is logged and disabled, "
        "never failing a round",
    )
    operator_api: bool = setting(
        True, "serve the operator REST API (/api/v1/...) on the operator port (off: metrics only)"
    )
    # ---- the horizontal federation (issue 12): unset name and upstream = standalone
    name: MemberName | None = setting(
        None,
        "this aggregator's name in its federation (all aggregators with the same db and "
        "run_name and a name form one; unique among the live ones); unset: standalone",
    )
    advertise_url: str | None = setting(
        None,
        "ws:// or wss:// URL agents reach this aggregator at, told to the other members' "
        "agents for failover (default: ws(s)://host:port)",
    )
    synthesis: Literal["sync", "async"] = setting(
        "sync",
        "how the global model is made from the members' semi-global models: sync (those of "
        "the same round, waiting up to synthesis_timeout) or async (each member's latest "
        "within staleness_bound)",
    )
    synthesis_timeout: Seconds = setting(
        30.0,
        "sync synthesis: seconds after delivering its semi-global model a member waits for "
        "the other live members' before synthesising from those delivered",
    )
    staleness_bound: Annotated[int, msgspec.Meta(ge=0)] = setting(
        2,
        "async synthesis: global version V uses semi-global models of rounds >= V - this",
    )
    federation_heartbeat: Seconds = setting(
        1.0, "seconds between two heartbeats of a member in the shared store"
    )
    liveness_timeout: Seconds = setting(
        5.0,
        "a member whose heartbeat is older than this (database clock) is dead: its agents' "
        "buffered uploads may be claimed by the members they reconnect to",
    )
    upstream: str | None = setting(
        None,
        "ws:// or wss:// URL of an upper aggregator: this one takes part there as ONE agent "
        "called `name` whose upload is its semi-global model (token: FEDSTACK_UPSTREAM_TOKEN)",
    )
    upstream_ca: str | None = setting(
        None, "PEM CA the upstream aggregator's certificate is verified with (wss://)"
    )
    upstream_timeout: Seconds = setting(
        60.0,
        "seconds to wait for the upper aggregator's global model after uploading; then the "
        "own semi-global model becomes the global one (metrics upstream_offline = 1)",
    )

    if typing.TYPE_CHECKING:
        # the generated __init__ converts what it is given (``port="8765"`` is 8765), so
        # callers may pass any convertible value; a bad one raises ConfigError
        def __init__(self, **values: Any) -> None: ...

    def __post_init__(self) -> None:
        for s in settings():
            value = getattr(self, s.name)
            converted = s.convert(value, "aggregator config", s.name)
            if converted is not value:
                object.__setattr__(self, s.name, converted)
        self._check_together()

    def _check_together(self) -> None:
        def bad(msg: str) -> ConfigError:
            return ConfigError(f"aggregator config: {msg}")

        if self.transport == "inproc" and self.tls_cert:
            raise bad("tls_cert needs transport 'tcp' (the in-process transport has no sockets)")
        if self.require_tls and not self.tls_cert:
            raise bad(
                "require_tls is set but tls_cert (and tls_key) are not: refusing to "
                "serve without TLS (make test certificates with `fedstack certs`)"
            )
        if not self.tls_cert and (self.tls_key or self.tls_client_ca):
            raise bad("tls_key / tls_client_ca need tls_cert")
        if self.operator_port is not None and self.transport == "inproc":
            raise bad(
                "operator_port needs transport 'tcp' (the in-process transport has no sockets)"
            )
        if (
            self.operator_port is not None
            and self.operator_port != 0
            and self.operator_port == self.port
            and self.operator_host == self.host
        ):
            raise bad(
                f"operator_port {self.operator_port} is the agents' port: give the operator "
                "surface a port of its own"
            )
        if self.target_metric is not None:
            TargetMetric.parse(self.target_metric)  # ConfigError naming the value
            if self.federated:
                raise bad(
                    "target_metric is not supported with name or upstream: the members of "
                    "a federation end together after `rounds`"
                )
        if self.track:
            from fedstack.trackers.base import parse_spec

            for spec in self.track:
                try:
                    parse_spec(spec)
                except ConfigError as exc:
                    raise bad(f"track: {exc}") from None
        self._check_federation(bad)
        if self.secagg:
            self._check_secagg(bad)

    def _check_secagg(self, bad: typing.Callable[[str], ConfigError]) -> None:
        """Secure aggregation's settings that no strategy can change (the strategy and the
        overflow bound are checked by the aggregator, which knows both)."""
        if self.federated:
            raise bad(
                "secagg is not supported with name or upstream (a horizontal or hierarchical "
                "federation): run a standalone aggregator with --secagg"
            )
        if self.gate:
            raise bad(
                "secagg cannot run with an update gate: the gate inspects individual "
                "updates, which secure aggregation hides from the aggregator (drop gate)"
            )
        if self.secagg_neighbours is not None and self.secagg_neighbours % 2:
            raise bad(f"secagg_neighbours must be even, not {self.secagg_neighbours}")

    def secagg_params(self) -> Any:
        """The :class:`~fedstack.privacy.secagg.SecAggParams` of these settings."""
        from fedstack.privacy.secagg import SecAggParams

        return SecAggParams(
            clip=self.secagg_clip,
            quant_bits=self.secagg_quant_bits,
            max_weight=self.secagg_max_weight,
            neighbours=self.secagg_neighbours,
            threshold=self.secagg_threshold,
            min_survivors=self.secagg_min_survivors,
            timeout=self.secagg_timeout,
        )

    def _check_federation(self, bad: typing.Callable[[str], ConfigError]) -> None:
        for key in ("advertise_url", "upstream"):
            url = getattr(self, key)
            if url is not None and not _is_ws_url(url):
                raise bad(f"{key} = {url!r} is refused: a ws:// or wss:// URL with a host")
        if self.upstream is not None and self.name is None:
            raise bad(
                "upstream needs name (the aggregator joins the upper aggregator as an "
                "agent of that name)"
            )
        if self.advertise_url is not None and self.name is None:
            raise bad("advertise_url needs name (only federation members advertise a URL)")
        if self.upstream_ca is not None and not (self.upstream or "").startswith("wss://"):
            raise bad("upstream_ca needs a wss:// upstream")
        if self.liveness_timeout <= self.federation_heartbeat:
            raise bad(
                f"liveness_timeout ({self.liveness_timeout:g} s) must be longer than "
                f"federation_heartbeat ({self.federation_heartbeat:g} s), or every member "
                "would look dead between two heartbeats (3 heartbeats or more is wise)"
            )

    @property
    def federated(self) -> bool:
        """Whether this aggregator is a member of a federation or has an upstream (else it
        is standalone: no federation code runs at all)."""
        return self.name is not None or self.upstream is not None

    @property
    def target(self) -> TargetMetric | None:
        """:attr:`target_metric` parsed (None: unset)."""
        return None if self.target_metric is None else TargetMetric.parse(self.target_metric)

    @property
    def is_async(self) -> bool:
        """Whether rounds complete before every active agent uploaded."""
        return self.threshold < 1.0

    def replace(self, **changes: Any) -> AggregatorConfig:
        """A copy with ``changes`` applied; ``None`` values leave a field as it is.

        Raises:
            ConfigError: A changed value is not accepted.
        """
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    @classmethod
    def from_mapping(
        cls, data: Mapping[str, Any], source: str = "aggregator config"
    ) -> AggregatorConfig:
        """A configuration from a file's table (book keys accepted; see the module doc).

        Raises:
            ConfigError: An unknown key or a bad value, named with ``source``.
        """
        return cls(**_file_values(data, source))

    @classmethod
    def load(cls, path: str | Path) -> AggregatorConfig:
        """A configuration from a TOML or JSON file (see :meth:`from_sources`)."""
        return cls.from_sources(file=path)

    @classmethod
    def from_sources(
        cls,
        *,
        file: str | Path | None = None,
        env: Mapping[str, str] | None = None,
        flags: Mapping[str, Any] | None = None,
    ) -> AggregatorConfig:
        """The configuration from its layered sources, lowest precedence first.

        Args:
            file: A TOML or JSON file (a TOML file's ``[aggregator]`` table, if it has one).
            env: An environment (``os.environ``): ``FEDSTACK_<KEY>`` values, strings; an
                empty value counts as unset. Unknown ``FEDSTACK_*`` names are refused
                unless listed in :data:`OTHER_ENVIRONMENT`.
            flags: Values given on the command line, by field name (``None``: not given);
                a table field takes a list of ``KEY=VALUE`` strings, merged into the
                lower layers' table.

        Raises:
            ConfigError: The file cannot be read or parsed, or a key or value is refused.
        """
        values: dict[str, Any] = {}
        if file is not None:
            values.update(_file_values(_read_file(Path(file)), f"config file {file}"))
        by_name = {s.name: s for s in settings()}
        if env is not None:
            for var, text in sorted(env.items()):
                if not var.startswith(ENV_PREFIX) or var in OTHER_ENVIRONMENT:
                    continue
                s = by_name.get(var[len(ENV_PREFIX) :].lower())
                if s is None or s.env != var:
                    known = ", ".join(
                        sorted([x.env for x in by_name.values()] + list(OTHER_ENVIRONMENT))
                    )
                    raise ConfigError(
                        f"environment: unknown variable {var}; fedstack reads {known}"
                    )
                if text != "":
                    values[s.name] = s.convert(
                        s.parse_text(text, "environment", var), "environment", var
                    )
        for name, value in (flags or {}).items():
            if value is None or value == []:
                continue
            s = by_name[name]
            if s.is_table:
                value = {**values.get(name, {}), **parse_pairs(value, s.flag)}
            values[name] = s.convert(value, "command line", s.flag)
        return cls(**values)


_TARGET = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_.:-]{0,127})\s*(>=|<=)\s*(\S+)\s*$")


@dataclass(frozen=True)
class TargetMetric:
    """The metric a run stops at (``--target-metric NAME>=VALUE`` or ``NAME<=VALUE``).

    Attributes:
        name: A key of a round's metrics (as ``fedstack db rounds`` shows them).
        op: ``">="`` (reached when the metric is at least ``value``) or ``"<="``.
        value: A finite number.
    """

    name: str
    op: Literal[">=", "<="]
    value: float

    @classmethod
    def parse(cls, text: str) -> TargetMetric:
        """``"eval_accuracy>=0.9"`` -> the target.

        Raises:
            ConfigError: ``text`` is not ``NAME>=VALUE`` or ``NAME<=VALUE`` with a finite
                number.
        """
        m = _TARGET.match(text)
        value = math.nan
        if m is not None:
            with contextlib.suppress(ValueError):
                value = float(m.group(3))
        if m is None or not math.isfinite(value):
            raise ConfigError(
                f"target_metric = {text!r} is refused: write NAME>=VALUE or NAME<=VALUE "
                "with a finite number (e.g. eval_accuracy>=0.9 or mean_train_loss<=0.1)"
            )
        op: Literal[">=", "<="] = ">=" if m.group(2) == ">=" else "<="
        return cls(m.group(1), op, value)

    @property
    def needs_evaluator(self) -> bool:
        """Whether the metric is one the aggregator's evaluator computes (``eval_*``)."""
        return self.name.startswith("eval_")

    def reached(self, metrics: Mapping[str, Any]) -> bool | None:
        """Whether ``metrics`` reach the target; None if they have no numeric
        :attr:`name` (a NaN never reaches it)."""
        v = metrics.get(self.name)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return None
        return v >= self.value if self.op == ">=" else v <= self.value

    def __str__(self) -> str:
        return f"{self.name}{self.op}{self.value:g}"


class Setting:
    """One field of :class:`AggregatorConfig`, as the sources see it.

    Attributes:
        name: The key (``round_timeout``).
        type: Its annotation, with constraints.
        default: Its default value.
        help: One line of help.
        env: Its environment variable (``FEDSTACK_ROUND_TIMEOUT``).
        flag: Its flag (``--round-timeout``).
        book: The book's key for it, if any.
        flag_values: Words its flag takes instead of values, if any.
        cli: Whether it has a flag.
        secret: Kept out of messages.
    """

    def __init__(self, f: dataclasses.Field[Any], tp: Any) -> None:
        meta = f.metadata
        self.name = f.name
        self.type = tp
        self.default: Any = {} if f.default_factory is not dataclasses.MISSING else f.default
        self.help: str = meta["help"]
        self.env = ENV_PREFIX + f.name.upper()
        self.flag: str = meta["flag"] or "--" + f.name.replace("_", "-")
        self.book: str | None = meta["book"]
        self.flag_values: Mapping[str, Any] | None = meta["flag_values"]
        self.cli: bool = meta["cli"]
        self.secret: bool = meta["secret"]
        self.is_table = typing.get_origin(_strip_optional(tp)) is dict
        self.is_list = typing.get_origin(_strip_optional(tp)) is tuple

    def convert(self, value: Any, source: str, key: str) -> Any:
        """``value`` converted to this setting's type.

        Raises:
            ConfigError: naming ``source`` and ``key``, the value and what is accepted.
        """
        if self.is_list and isinstance(value, str):
            value = [value]  # one item
        return _convert(self.type, value, source, key, self.secret)

    def parse_text(self, text: str, source: str, key: str) -> Any:
        """A value written as text (the environment): a table is a JSON object, a list a
        JSON array or one item."""
        if self.is_list and not text.lstrip().startswith("["):
            return [text]
        if not self.is_table and not self.is_list:
            return text
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            raise ConfigError(
                f"{source}: {key} = {text!r} is refused (not JSON); accepted: {accepted(self.type)}"
            ) from None


_BOOL_WORDS = {
    "1": True,
    "true": True,
    "yes": True,
    "on": True,
    "0": False,
    "false": False,
    "no": False,
    "off": False,
}
_SETTINGS: tuple[Setting, ...] = ()


def _convert(tp: Any, value: Any, source: str, key: str, secret: bool = False) -> Any:
    if _strip_optional(tp) is bool and isinstance(value, str):
        value = _BOOL_WORDS.get(value.strip().lower(), value)
    try:
        return msgspec.convert(value, tp, strict=False)
    except msgspec.ValidationError as exc:
        reason = str(exc).split(" - at `$")[0].replace(f"<= {_FLOAT_MAX!r}", "finite")
        shown = "<hidden>" if secret else repr(value)
        raise ConfigError(
            f"{source}: {key} = {shown} is refused ({reason}); accepted: {accepted(tp)}"
        ) from None


def settings() -> tuple[Setting, ...]:
    """Every setting of :class:`AggregatorConfig`, in declaration order."""
    global _SETTINGS
    if not _SETTINGS:
        hints = typing.get_type_hints(AggregatorConfig, include_extras=True)
        _SETTINGS = tuple(Setting(f, hints[f.name]) for f in dataclasses.fields(AggregatorConfig))
    return _SETTINGS


def parse_pairs(items: list[str] | tuple[str, ...], flag: str) -> dict[str, Any]:
    """``KEY=VALUE`` strings -> a dict; values are JSON where they parse, else strings.

    The one convention of every repeatable ``KEY=VALUE`` flag (``--strategy-param``,
    ``--trainer-arg``, ``--federation``): ``3`` is an int, ``0.5`` a float, ``true`` a
    bool, ``[1, 2]`` a list, ``dirichlet:0.5`` a string.

    Raises:
        ConfigError: An item has no ``=`` or an empty key.
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{flag} {item!r} must look like key=value")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def accepted(tp: Any) -> str:
    """What a type accepts, in words (``an integer in 0..65535``)."""
    args = typing.get_args(tp)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return " or ".join(accepted(a) for a in inner) + " (or unset)"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is dict:
        return "a table (key = value)"
    if origin is tuple:
        return "a list of " + accepted(args[0])
    bounds: dict[str, Any] = {}
    if origin is Annotated:
        tp = args[0]
        for m in args[1:]:
            if isinstance(m, msgspec.Meta):
                bounds.update(
                    {
                        k: getattr(m, k)
                        for k in ("gt", "ge", "lt", "le", "min_length", "pattern")
                        if getattr(m, k) is not None
                    }
                )
    if tp is bool:
        return "true or false"
    if tp is str:
        if "pattern" in bounds:
            return "1-64 letters, digits, '.', '_' or '-' (starting with a letter or digit)"
        n = bounds.get("min_length")
        return (
            f"text of at least {n} characters"
            if n and n > 1
            else ("non-empty text" if n else "text")
        )
    kind = "an integer" if tp is int else "a number"
    parts = []
    for key, word in (("gt", ">"), ("ge", ">=")):
        if key in bounds:
            parts.append(f"{word} {bounds[key]:g}")
    for key, word in (("lt", "<"), ("le", "<=")):
        if key in bounds:
            parts.append("finite" if bounds[key] == _FLOAT_MAX else f"{word} {bounds[key]:g}")
    if tp is int and "ge" in bounds and "le" in bounds:
        return f"an integer in {bounds['ge']}..{bounds['le']}"
    return f"{kind} {', '.join(parts)}".strip() if parts else kind


def _is_ws_url(url: str) -> bool:
    """Whether ``url`` is ``ws://HOST[:PORT][/PATH]`` or ``wss://...`` with a host."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        return False
    return parts.scheme in ("ws", "wss") and bool(parts.hostname) and url.isprintable()


def _strip_optional(tp: Any) -> Any:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1:
        tp = args[0]
    if typing.get_origin(tp) is Annotated:
        tp = typing.get_args(tp)[0]
    return tp


def _file_values(data: Mapping[str, Any], source: str) -> dict[str, Any]:
    """A file's table -> converted values by field name (book keys translated)."""
    by_name = {s.name: s for s in settings()}
    by_book = {s.book: s for s in settings() if s.book}
    values: dict[str, Any] = {}
    if isinstance(data.get("secagg"), Mapping):  # a [secagg] table: its keys are secagg_*
        data = dict(data)
        table = data.pop("secagg")
        data.setdefault("secagg", bool(table.get("enabled", True)))
        for k, v in table.items():
            if k != "enabled":
                data[f"secagg_{k}"] = v
    for key, value in data.items():
        if key in IGNORED_BOOK_KEYS:
            continue
        if key == "polling":  # the book's 1 = poll, 0 = push
            poll = _convert(bool, value, source, key)
            values["delivery"] = "poll" if poll else "push"
            continue
        s = by_name.get(key) or by_book.get(key)
        if s is None:
            known = ", ".join(sorted([*by_name, *by_book, "polling"]))
            raise ConfigError(f"{source}: unknown key {key!r}; known: {known}")
        values[s.name] = s.convert(value, source, key)
    return values


def _read_file(p: Path) -> dict[str, Any]:
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {p}: {exc}") from exc
    try:
        data = tomllib.loads(text) if p.suffix == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        kind = p.suffix[1:] or "JSON"
        raise ConfigError(f"config file {p} is not valid {kind}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a table/object at the top")
    if isinstance(data.get("aggregator"), dict):
        data = data["aggregator"]
    return data
