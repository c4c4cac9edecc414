"""Aggregator configuration: one TOML or JSON file, CLI flags override.

The book's keys (``setups/config_aggregator.json``) are accepted where they make sense:
``aggr_ip`` -> host, ``reg_socket`` -> port, ``aggregation_threshold`` -> threshold,
``polling`` (1 = poll) -> delivery, ``init_weights_flag`` -> init_weights,
``db_data_path`` -> db. ``round_interval`` and ``recv_socket`` are accepted and ignored
(rounds are event-driven and one port serves everything).
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedstack.errors import ConfigError

BOOK_KEYS = {
    "aggr_ip": "host",
    "reg_socket": "port",
    "aggregation_threshold": "threshold",
    "init_weights_flag": "init_weights",
    "db_data_path": "db",
}
IGNORED_BOOK_KEYS = {"round_interval", "recv_socket", "exch_socket", "db_ip", "db_socket",
                     "model_path", "db_name", "db_model_path"}


@dataclass(frozen=True)
class AggregatorConfig:
    """Everything an aggregator needs; see the README's configuration reference."""

    host: str = "127.0.0.1"
    port: int = 8765
    transport: str = "tcp"
    """``tcp``: WebSockets on host:port; ``inproc``: an in-process endpoint
    ``inproc://RUN_NAME`` for agents in the same process (the simulator)."""
    db: str = "fedstack.db"
    blob_dir: str | None = None
    inline_blob_bytes: int = 256 * 1024
    """Models (and strategy state) up to this size are kept in the database itself, in the
    transaction that records them (no blob file, no extra fsync); larger ones are files
    in ``blob_dir``. 0: always files."""
    run_name: str = "default"
    rounds: int | None = None
    threshold: float = 1.0
    min_agents: int = 1
    round_timeout: float | None = 300.0
    delivery: str = "push"
    staleness: str = "next"
    init_weights: bool | None = None
    strategy: str = "fedavg"
    strategy_params: dict[str, Any] = field(default_factory=dict)
    federation: dict[str, Any] = field(default_factory=dict)
    """Settings sent to every agent when it joins (merged with the strategy's own)."""
    gate: dict[str, Any] = field(default_factory=dict)
    """Update checks before aggregation (see fedstack.aggregator.gate.UpdateGate)."""
    seed: int = 0
    evaluator: str | None = None
    max_message_bytes: int = 1 << 30
    max_num_samples: int = 1 << 31
    heartbeat_interval: float = 5.0
    register_timeout: float = 10.0
    send_timeout: float = 120.0
    finish_grace: float = 30.0
    upload_budget_bytes: int = 128 << 20
    """Bytes of big uploads (>= 1 MiB) being received or processed at once, over all agents:
    connections beyond it stop reading until there is room (TCP holds their senders)."""
    fanout_budget_bytes: int = 256 << 20
    """Bytes of big global-model / welcome messages being sent at once, over all agents."""
    auth: str = "required"
    """``required``: every agent presents its credential (``fedstack credentials add``) or
    enrolls with ``enrollment_token``; ``off``: a name is bound to the first token it shows."""
    enrollment_token: str | None = field(default=None, repr=False)
    """Shared secret that lets a NEW agent name register with its own token (never stored)."""
    tls_cert: str | None = None
    """PEM certificate (chain) of the aggregator: with it the port speaks only TLS (wss://)."""
    tls_key: str | None = None
    """PEM private key of ``tls_cert`` (default: read from the ``tls_cert`` file)."""
    tls_client_ca: str | None = None
    """PEM CA file: agents must present a client certificate it signed (mutual TLS)."""
    require_tls: bool = False
    """Refuse to start without ``tls_cert`` (so a lost setting cannot downgrade to ws://)."""
    operator_api: bool = True
    """Serve the operator REST API (``/healthz``, ``/api/v1/...``) on the agents' port
    (HTTPS with ``tls_cert``); every call but ``/healthz`` needs an operator token
    (``fedstack credentials add NAME --operator``), whatever ``auth`` says."""

    def __post_init__(self) -> None:
        def bad(msg: str) -> ConfigError:
            return ConfigError(f"aggregator config: {msg}")

        if not 0 <= self.port <= 65535:
            raise bad(f"port {self.port} is not in 0..65535")
        if not (0.0 < self.threshold <= 1.0):
            raise bad(f"threshold {self.threshold} must be in (0, 1]")
        if self.min_agents < 1:
            raise bad("min_agents must be at least 1")
        if self.rounds is not None and self.rounds < 1:
            raise bad("rounds must be at least 1 (or unset for continuous operation)")
        if self.round_timeout is not None and not (
            self.round_timeout > 0 and math.isfinite(self.round_timeout)
        ):
            raise bad("round_timeout must be a positive number of seconds")
        if self.transport not in ("tcp", "inproc"):
            raise bad(f"transport {self.transport!r} must be 'tcp' or 'inproc'")
        if self.transport == "inproc" and self.tls_cert:
            raise bad("TLS needs transport 'tcp' (the in-process transport has no sockets)")
        if self.delivery not in ("push", "poll"):
            raise bad(f"delivery {self.delivery!r} must be 'push' or 'poll'")
        if self.auth not in ("required", "off"):
            raise bad(f"auth {self.auth!r} must be 'required' or 'off'")
        if self.enrollment_token is not None and len(self.enrollment_token) < 16:
            raise bad("enrollment_token must have at least 16 characters")
        if self.staleness not in ("drop", "next"):
            raise bad(f"staleness {self.staleness!r} must be 'drop' or 'next'")
        if not 0 <= self.inline_blob_bytes <= 64 << 20:
            raise bad("inline_blob_bytes must be in 0..64 MiB")
        if self.max_message_bytes < 1024:
            raise bad("max_message_bytes is too small")
        if self.upload_budget_bytes < 1 or self.fanout_budget_bytes < 1:
            raise bad("upload_budget_bytes and fanout_budget_bytes must be positive")
        if self.heartbeat_interval <= 0:
            raise bad("heartbeat_interval must be positive")
        if self.require_tls and not self.tls_cert:
            raise bad("require_tls is set but tls_cert (and tls_key) are not: "
                      "refusing to serve without TLS (make test certificates with "
                      "`fedstack certs`)")
        if not self.tls_cert and (self.tls_key or self.tls_client_ca):
            raise bad("tls_key / tls_client_ca need tls_cert")

    @property
    def is_async(self) -> bool:
        return self.threshold < 1.0

    def replace(self, **changes: Any) -> AggregatorConfig:
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    @classmethod
    def from_mapping(cls, data: dict[str, Any]) -> AggregatorConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for key, value in data.items():
            if key in IGNORED_BOOK_KEYS:
                continue
            if key == "polling":
                values["delivery"] = "poll" if _coerce("polling", value) else "push"
                continue
            name = BOOK_KEYS.get(key, key)
            if name not in names:
                known = ", ".join(sorted(names))
                raise ConfigError(f"aggregator config: unknown key {key!r}; known: {known}")
            values[name] = _coerce(name, value)
        try:
            return cls(**values)
        except TypeError as exc:
            raise ConfigError(f"aggregator config: {exc}") from exc

    @classmethod
    def load(cls, path: str | Path) -> AggregatorConfig:
        p = Path(path)
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
        if "aggregator" in data and isinstance(data["aggregator"], dict):
            data = data["aggregator"]
        return cls.from_mapping(data)


_INTS = {"port", "rounds", "min_agents", "max_message_bytes", "max_num_samples", "seed",
         "upload_budget_bytes", "fanout_budget_bytes"}
_FLOATS = {"threshold", "round_timeout", "heartbeat_interval", "register_timeout",
           "send_timeout", "finish_grace"}
_BOOLS = {"init_weights", "polling", "require_tls", "operator_api"}


def _coerce(name: str, value: Any) -> Any:
    """Numbers written as strings (the book's config files do that) become numbers."""
    if value is None:
        return None
    try:
        if name in _INTS and not isinstance(value, bool):
            return int(value)
        if name in _FLOATS and not isinstance(value, bool):
            return float(value)
        if name in _BOOLS:
            if isinstance(value, str):
                low = value.strip().lower()
                if low in ("1", "true", "yes", "on"):
                    return True
                if low in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(int(value))
    except (TypeError, ValueError):
        raise ConfigError(f"aggregator config: {name} = {value!r} is not valid") from None
    return value
