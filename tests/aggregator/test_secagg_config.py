"""`secagg` settings: the `[secagg]` table, what reaches the agents, and everything an
aggregator with secure aggregation refuses to start with (a clear ConfigError)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedstack.aggregator import Aggregator
from fedstack.aggregator.config import AggregatorConfig
from fedstack.aggregator.secagg import SecAggCoordinator
from fedstack.errors import ConfigError
from fedstack.strategies import names
from fedstack.strategies.base import _REGISTRY


def _agg(tmp_path: Path, **kw: object) -> Aggregator:
    return Aggregator(AggregatorConfig(db=str(tmp_path / "c.db"), port=0, secagg=True, **kw))


def test_a_secagg_table_in_a_toml_file(tmp_path: Path) -> None:
    p = tmp_path / "agg.toml"
    p.write_text("[aggregator]\nrounds = 3\n[aggregator.secagg]\nclip = 2.5\nquant_bits = 16\n")
    cfg = AggregatorConfig.load(p)
    assert cfg.secagg is True and cfg.secagg_clip == 2.5 and cfg.secagg_quant_bits == 16
    # settings of a switched-off secure aggregation are refused, not silently ignored (an
    # operator who sees clip = 2.5 in the file would believe the run is private)
    p.write_text("[aggregator.secagg]\nenabled = false\ntimeout = 3\n")
    with pytest.raises(ConfigError, match="secagg_timeout set but secagg is off"):
        AggregatorConfig.load(p)
    p.write_text("[aggregator.secagg]\nenabled = false\n")
    assert AggregatorConfig.load(p).secagg is False
    p.write_text("[aggregator.secagg]\nclipp = 3\n")
    with pytest.raises(ConfigError, match="secagg_clipp"):
        AggregatorConfig.load(p)


def test_the_agents_learn_the_parameters(tmp_path: Path) -> None:
    agg = _agg(tmp_path, secagg_clip=4.0, secagg_neighbours=4)
    cfg = agg.federation_config
    assert cfg["secagg"] is True and cfg["secagg_clip"] == 4.0 and cfg["secagg_neighbours"] == 4
    assert _agg(tmp_path).federation_config["secagg_neighbours"] == 0  # auto


def test_only_mean_strategies_run_under_secagg(tmp_path: Path) -> None:
    allowed = {n for n in names() if _REGISTRY[n].secure_aggregation}
    assert allowed == {
        "fedavg",
        "fedprox",
        "fedopt",
        "fedavgm",
        "fedsgd",
        "fedadagrad",
        "fedadam",
        "fedyogi",
    }
    for name in ("median", "trimmed_mean", "krum", "bulyan", "scaffold", "fednova"):
        if name in names():
            with pytest.raises(ConfigError, match=f"cannot run with strategy '{name}'"):
                _agg(tmp_path, strategy=name)
    for name in ("fedasync", "fedbuff"):
        with pytest.raises(ConfigError, match="asynchronous"):
            _agg(tmp_path, strategy=name)
    _agg(tmp_path, strategy="fedadam")  # a server optimiser only needs the mean


@pytest.mark.parametrize(
    ("settings", "why"),
    [
        ({"gate": {"max_norm": 10}}, "update gate"),
        ({"name": "m1"}, "horizontal or hierarchical"),
        ({"secagg_neighbours": 3}, "even"),
        ({"min_agents": 2000}, "at most 1024 agents"),
        ({"strategy_params": {"weighted": False}}, "secagg_max_weight = 1"),
        ({"secagg_threshold": 0.3}, "threshold"),
        ({"secagg_min_survivors": 1}, "secagg_min_survivors"),
    ],
)
def test_refused_at_start(tmp_path: Path, settings: dict[str, object], why: str) -> None:
    with pytest.raises(ConfigError, match=why):
        _agg(tmp_path, **settings)
    assert not (tmp_path / "c.db").exists()


# ------------------------------------------------- the coordinator's retry policy (no I/O)
class _Sess:
    def __init__(self, agent_id: str) -> None:
        self.agent_id = self.name = agent_id
        self.welcomed = True
        self.sent: list[object] = []

    def write(self, msg: object) -> None:
        self.sent.append(msg)


class _Owner:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, object]]] = []

    def _audit(self, kind: str, detail: dict[str, object], agent_id: str | None) -> None:
        self.events.append((kind, detail))

    def _void(self, ids: list[str]) -> None:
        pass

    def _secagg_restart(self, server: object) -> None:
        pass


def _coordinator(
    max_attempts: int,
) -> tuple[SecAggCoordinator, Any, dict[str, Any], list[float]]:
    from types import SimpleNamespace

    from fedstack.aggregator.rounds import RoundState
    from fedstack.privacy.secagg import SecAggParams

    now = [100.0]
    sessions: dict[str, Any] = {a: _Sess(a) for a in ("a1", "a2", "a3")}
    state = RoundState(
        threshold=1.0, min_agents=3, round_timeout=None, max_rounds=9, staleness_policy="next"
    )
    state.start(0, now[0])
    agg = SimpleNamespace(
        run_id="run",
        sessions=sessions,
        state=state,
        clock=lambda: now[0],
        owner=_Owner(),
        metrics=SimpleNamespace(count_refusal=lambda code: None),
        _stopped=SimpleNamespace(is_set=lambda: False),
    )
    params = SecAggParams(timeout=2.0)
    coord = SecAggCoordinator(agg, params, max_attempts)  # type: ignore[arg-type]
    coord.begin_round(1, {"w": np.zeros(4, np.float32)})
    return coord, agg, sessions, now


def test_failed_attempts_back_off_and_only_a_new_agent_unpauses() -> None:
    from fedstack.privacy.secagg import SecAggError
    from fedstack.wire import SecAggKeys, SecAggStart

    coord, agg, sessions, now = _coordinator(max_attempts=3)
    from fedstack.privacy.secagg import AgentSession

    def advertise_all() -> None:
        sid = coord.session
        assert sid is not None
        for a, s in sessions.items():
            k = AgentSession(coord.params, sid, a).advertise()
            coord.on_message(
                s,
                SecAggKeys(session=sid, c_pk=k.c_pk, s_pk=k.s_pk, b_commit=k.b_commit),
            )

    fail = SecAggError("secagg-too-few", "test")
    advertise_all()
    coord.fail(fail)
    assert coord.start_at is None  # the first retry: at once
    advertise_all()
    coord.fail(fail)
    assert coord.start_at == now[0] + 2.0  # then timeout x 2^0
    assert coord.deadline() == now[0] + 2.0
    before = len(sessions["a1"].sent)
    coord.tick(now[0] + 1.0)
    assert len(sessions["a1"].sent) == before  # not yet announced
    now[0] += 2.0
    coord.tick(now[0])
    assert isinstance(sessions["a1"].sent[-1], SecAggStart)
    advertise_all()
    coord.fail(fail)
    assert coord.paused  # 3 failures: paused
    # an agent of the failed attempts rejoining does not un-pause the round
    again: Any = _Sess("a2")
    sessions["a2"] = again
    coord.joined(again)
    assert coord.paused and not again.sent
    new: Any = _Sess("a4")
    sessions["a4"] = new
    coord.joined(new)
    assert not coord.paused
    assert isinstance(new.sent[-1], SecAggStart)
    # each later failure waits twice as long (capped)
    advertise_all()
    coord.fail(fail)
    assert coord.start_at == now[0] + 2.0 * 4
