"""Secure aggregation (SecAgg+) on the agent: the phases after training.

When the welcome's config has ``secagg`` the agent never sends its trained model: the
:class:`SecAggAgent` keeps the trained update (the delta to the global model it trained
from, and its weight) and runs the phases of each session the aggregator starts for that
round (:class:`fedstack.privacy.secagg.AgentSession` does the cryptography):

* ``secagg_start`` for the round it trained for: advertise fresh keys (``secagg_keys``);
* ``secagg_roster``: send its encrypted key shares (``secagg_shares``);
* ``secagg_forward``: its neighbours' shares arrive; it uploads its masked input (a
  :class:`~fedstack.wire.ModelUpload` of ``{"secagg/masked": uint32[P+1]}``);
* ``secagg_unmask``: the shares that remove the survivors' self-masks and the dropped
  agents' pairwise masks (refused, once, if the request could unmask it);
* ``secagg_abort``: the session failed; the next ``secagg_start`` of the round re-runs
  the phases with the same trained update (fresh keys).

A newer global model makes the trained update obsolete. What a (possibly hostile)
aggregator sends is checked by the library; a refusal is logged and the session dropped
(the aggregator times it out), never a crash of the agent.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedstack.privacy.secagg import (
    AgentSession,
    PublicKeys,
    Roster,
    SecAggError,
    SecAggParams,
    flatten_update,
)
from fedstack.types import Metrics, Weights
from fedstack.wire import (
    Message,
    ModelUpload,
    SecAggAbort,
    SecAggForward,
    SecAggKeys,
    SecAggRoster,
    SecAggShares,
    SecAggStart,
    SecAggUnmask,
    SecAggUnmaskShares,
)
from fedstack.wire.messages import SECAGG_MASKED, SECAGG_SESSION

log = logging.getLogger("fedstack.agent")

KEY = 32


def params_from_config(config: Metrics) -> SecAggParams:
    """The session parameters the aggregator sent in the welcome (validated).

    Raises:
        SecAggError: missing or out of range (code ``secagg-params``).
    """
    raw: dict[str, Any] = {
        k[len("secagg_") :]: v for k, v in config.items() if k.startswith("secagg_")
    }
    if raw.get("neighbours") == 0:
        raw["neighbours"] = None
    params: SecAggParams = SecAggParams.from_config(raw)
    return params


@dataclass
class Trained:
    """A trained update waiting to be securely aggregated."""

    round: int
    base_version: int
    vector: np.ndarray[Any, Any]
    weight: float
    """The sample count (the session scales it: ``min(n, max_weight) / max_weight``)."""


class SecAggAgent:
    """One agent's secure aggregation (see the module docstring). Not thread-safe: the
    agent core's loop calls it."""

    def __init__(self, params: SecAggParams, name: str) -> None:
        self.params = params
        self.name = name
        self.agent_id: str | None = None
        self.trained: Trained | None = None
        self.announced: tuple[str, int] | None = None  # the latest secagg_start
        self.session: AgentSession | None = None
        self.session_id: str | None = None
        self.done: set[str] = set()  # sessions this agent ran (never re-run one)
        self.unmasked = False
        self.attempts = 0

    # ------------------------------------------------------------------ the trainer's side
    def set_update(
        self, model: Weights, base: Weights, base_version: int, num_samples: int
    ) -> list[Message]:
        """The trainer's result on global model ``base_version`` (``base``): kept as the
        update to aggregate; advertises at once if its session is announced."""
        vector = flatten_update(model, base)
        # the library pre-scales: w = min(num_samples, max_weight) / max_weight
        self.trained = Trained(base_version + 1, base_version, vector, float(max(num_samples, 0)))
        return self._maybe_advertise()

    def new_global(self, version: int) -> None:
        """A global model ``version`` arrived: an update for an earlier round is over."""
        if self.trained is not None and self.trained.round <= version:
            self.trained = None
            self._drop()

    def _drop(self) -> None:
        self.session = None
        self.session_id = None
        self.unmasked = False

    # ------------------------------------------------------------------ the aggregator's side
    def on_message(self, msg: Message, agent_id: str | None) -> list[Message]:
        """What to send after ``msg`` (a refusal is logged; nothing is sent then)."""
        self.agent_id = agent_id
        try:
            return self._handle(msg)
        except SecAggError as exc:
            log.error(
                "%s: secure aggregation: refused %s from the aggregator: %s (%s)",
                self.name,
                msg.TYPE,
                exc,
                exc.code,
            )
            self._drop()
            return []

    def _handle(self, msg: Message) -> list[Message]:
        if isinstance(msg, SecAggStart):
            self.announced = (msg.session, msg.round)
            return self._maybe_advertise()
        if isinstance(msg, SecAggAbort):
            if msg.session == self.session_id:
                log.warning(
                    "%s: secure aggregation session %s aborted (%s): %s",
                    self.name,
                    msg.session[:80],
                    msg.code[:40],
                    msg.reason[:200],
                )
                self._drop()
            return []
        session = self._current(getattr(msg, "session", ""))
        if isinstance(msg, SecAggRoster):
            keys: dict[str, PublicKeys] = {}
            for j, blob in msg.keys.items():
                if len(blob) != 3 * KEY:
                    raise SecAggError(
                        "secagg-bad-key", f"the key entry of {j[:32]} is {len(blob)} bytes"
                    )
                keys[j] = PublicKeys(blob[:KEY], blob[KEY : 2 * KEY], blob[2 * KEY :])
            roster = Roster(
                session=msg.session, threshold=msg.threshold, neighbours=keys, index=dict(msg.index)
            )
            shares = session.share_keys(roster)
            return [SecAggShares(session=msg.session, shares=shares)]
        if isinstance(msg, SecAggForward):
            session.receive_shares(dict(msg.shares))
            trained = self.trained
            assert trained is not None
            masked = session.mask(trained.vector, trained.weight)
            digest = hashlib.sha256(f"{msg.session}|{self.agent_id}".encode()).hexdigest()[:32]
            return [
                ModelUpload(
                    upload_id=f"sa-{digest}",
                    base_version=trained.base_version,
                    num_samples=0,
                    metrics={SECAGG_SESSION: msg.session},
                    model={SECAGG_MASKED: masked},
                )
            ]
        if isinstance(msg, SecAggUnmask):
            if self.unmasked:
                raise SecAggError(
                    "secagg-replay", "a second unmask request in one session is refused"
                )
            self.unmasked = True
            b_shares, sk_shares = session.unmask(list(msg.survivors), list(msg.dropped))
            return [SecAggUnmaskShares(session=msg.session, b_shares=b_shares, sk_shares=sk_shares)]
        raise SecAggError("secagg-phase", f"an aggregator may not send {msg.TYPE}")

    def _current(self, session: str) -> AgentSession:
        if self.session is None or session != self.session_id:
            raise SecAggError(
                "secagg-replay",
                f"session {session[:80]!r} is not the one this agent runs "
                f"({self.session_id or 'none'})",
            )
        return self.session

    def _maybe_advertise(self) -> list[Message]:
        trained, announced = self.trained, self.announced
        if trained is None or announced is None or self.agent_id is None:
            return []
        session_id, rnd = announced
        if rnd != trained.round or session_id in self.done:
            return []
        session = AgentSession(self.params, session_id, self.agent_id)
        keys = session.advertise()
        self.session, self.session_id, self.unmasked = session, session_id, False
        self.done.add(session_id)
        if len(self.done) > 256:  # sessions of long-finished rounds
            self.done = {session_id}
        self.attempts += 1
        return [
            SecAggKeys(session=session_id, c_pk=keys.c_pk, s_pk=keys.s_pk, b_commit=keys.b_commit)
        ]


def copy_weights(weights: Mapping[str, Any]) -> Weights:
    """The agent's own copy of a global model (the trainer may change its arrays)."""
    return {k: np.array(v, copy=True) for k, v in weights.items()}
