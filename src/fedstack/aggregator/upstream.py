"""Tiers of aggregators: an aggregator that is ONE agent of an upper aggregator.

``fedstack aggregator --name edge1 --upstream ws://upper:8765`` (config ``upstream``,
``upstream_ca``, ``upstream_timeout``; the credential from the environment variable
:data:`UPSTREAM_TOKEN_ENV`) runs an aggregator of its own cluster that takes part in the
upper aggregator's federation as the agent called ``name`` (book rows 33 and 71: an
intermediate server close to low-compute devices; an edge aggregator with intermittent
connectivity). Three tiers and more work the same way (top <- middle <- edge <- agents).

:class:`~fedstack.aggregator.uplink.UpstreamLink` is the connection to the upper
aggregator: the agent's asyncio core running as a task of the aggregator's
:class:`~fedstack.aggregator.tasks.TaskScope`, on its event loop (see
:mod:`fedstack.aggregator.uplink`).

:class:`UpstreamSynthesis` is the aggregator's round sink
(:class:`~fedstack.aggregator.federation.RoundSink`). After each cluster round it

1. stores the cluster's result as a semi-global model (``store.commit_semi_global``);
2. uploads it upstream: ``num_samples`` = the cluster's total, ``base_version`` = the
   upper version its current global model came from, the cluster's metrics;
3. waits up to ``upstream_timeout`` s for the upper's global model that includes it (the
   acknowledgement says in which upper round it counts);
4. commits that as its own global model (``store.commit_global``, lineage to the
   semi-global, metrics ``upstream_version``); cut off or timed out, it commits its own
   semi-global model as its global (metrics ``upstream_offline`` = 1) so its cluster keeps
   training. The upload stays queued: when the link comes back the LATEST semi-global
   goes up (a newer one replaces an older one not yet acknowledged) and the upper
   aggregator's staleness policy decides (``accepted-late`` with ``next``,
   ``stale-dropped`` with ``drop``).

The first global model: if the upper aggregator has a federation going when the
aggregator starts a new run, its current global model is the aggregator's version 0
(:meth:`UpstreamSynthesis.start` waits up to ``upstream_timeout``, at most
:data:`INITIAL_WAIT` s, for the welcome);
otherwise the aggregator's first agent's model starts the run as usual, and it is proposed
upstream as the initial model (it starts the upper federation if that has none yet).

Each cluster round's upload has its own id (the member id and the round): after a restart
the aggregator completes a round whose semi-global model it stored before it stopped
(:meth:`UpstreamSynthesis.complete`), and an upload the upper aggregator already has is
answered with what became of it. Only the weights, the sample count and the metrics go up:
the cluster's extra arrays and server state stay with the cluster (its strategy runs per
cluster), and the upper global model's extra arrays are not adopted.

Everything the upper aggregator sends is checked by the agent's protocol session (model
structure, finite values, versions); a model of another structure than this aggregator's
is never adopted. Members of one federation that each have an upstream are not
synthesised together: each commits the global model of its rounds (the first one of a
version wins, the others adopt it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from fedstack.aggregator.events import FederationStarted
from fedstack.aggregator.federation import Adopted, ClusterRound
from fedstack.aggregator.uplink import MAX_BACKOFF, UpperGlobal, UpstreamLink
from fedstack.errors import ConfigError, FedstackError, StoreConflict, StoreError, TLSError
from fedstack.types import Metrics, Weights
from fedstack.wire.tensors import structure as structure_of

if TYPE_CHECKING:
    from fedstack.aggregator.service import Aggregator

__all__ = ["INITIAL_WAIT", "UPSTREAM_TOKEN_ENV", "UpperGlobal", "UpstreamLink", "UpstreamSynthesis"]

log = logging.getLogger("fedstack.aggregator.upstream")

UPSTREAM_TOKEN_ENV = "FEDSTACK_UPSTREAM_TOKEN"
"""The environment variable holding this aggregator's credential at the upper aggregator
(``fedstack credentials add NAME`` on the upper aggregator's store prints it)."""
INITIAL_WAIT = 10.0
"""Longest wait at the start of a new run for the upper aggregator's welcome (its global
model becomes version 0), seconds (and at most ``upstream_timeout``). An upper aggregator
that has no model yet holds the connection without answering: the run then starts from
its first agent's model, which is proposed upstream."""


@dataclass
class _Progress:
    """What one cluster round already did (a retried :meth:`UpstreamSynthesis.publish`
    carries on from there instead of storing or uploading twice)."""

    round: int
    semi_id: str | None = None
    upload_id: str | None = None
    decided: bool = False
    upper: UpperGlobal | None = None


class UpstreamSynthesis:
    """The round sink of an aggregator with an upstream (see the module docstring).

    Args:
        agg: the aggregator (``config.upstream`` and ``config.name`` set).
        token: its credential at the upper aggregator (default: the environment variable
            :data:`UPSTREAM_TOKEN_ENV`).

    Raises:
        ConfigError: ``name`` is not set or is not a valid agent name, or ``upstream_ca``
            cannot be read.
    """

    def __init__(self, agg: Aggregator, *, token: str | None = None) -> None:
        cfg = agg.config
        if not cfg.upstream:
            raise ConfigError("aggregator config: UpstreamSynthesis needs upstream")
        if not cfg.name:
            raise ConfigError(
                "aggregator config: upstream needs name (the agent name of this aggregator "
                "at the upstream aggregator)"
            )
        self.agg = agg
        self.timeout = float(cfg.upstream_timeout)
        if token is None:
            token = os.environ.get(UPSTREAM_TOKEN_ENV) or None
        try:
            self.link = UpstreamLink(
                cfg.upstream,
                cfg.name,
                token=token,
                ca=cfg.upstream_ca,
                max_message_bytes=cfg.max_message_bytes,
                connect_timeout=min(10.0, max(1.0, self.timeout)),
                max_backoff=min(MAX_BACKOFF, max(0.5, self.timeout)),
            )
        except ValueError as exc:
            raise ConfigError(f"aggregator config: name {cfg.name!r}: {exc}") from None
        except TLSError as exc:
            raise ConfigError(f"aggregator config: upstream_ca: {exc}") from None
        self.base_version = -1
        """The upper version this aggregator's current global model came from (-1: none)."""
        self._progress: _Progress | None = None
        self._closing = False
        self._told_down = False
        self._down: str | None = None  # why this aggregator closed the link for good

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Connect upstream. Call in :meth:`Aggregator.start` once the run is open and the
        round owner runs, before the agents' connections are let in: a new run takes the
        upper global model as its version 0 if the upper aggregator answers within
        ``upstream_timeout`` (at most :data:`INITIAL_WAIT` s).

        Raises:
            RegistrationRefused, TLSError: the upper aggregator refused this aggregator's
                credential or name, or its certificate does not verify.
        """
        agg = self.agg
        initialized = agg._initialized.is_set()
        if initialized:
            assert agg.global_weights is not None
            self.base_version = await self._stored_upstream_version()
            await self.link.propose(agg.global_weights)
        self.link.start(agg._scope)
        if not initialized:
            upper = await self.link.wait_welcome(min(self.timeout, INITIAL_WAIT))
            if upper is not None:
                await self._initialize_from(upper)
            else:
                log.info(
                    "upstream %s has no global model for us yet; the first agent's model "
                    "starts this run and is proposed upstream",
                    self.link.url,
                )
        agg._scope.supervise("upstream-watch", self._watch)

    async def close(self) -> None:
        """Say bye upstream and end the link (a round being published is then left to the
        aggregator's stop: it is not committed, and is completed after a restart)."""
        self._closing = True
        await self.link.close()

    async def _watch(self) -> None:
        """While the link runs. Until its first welcome: the aggregator's first global
        model (from its first agent) is proposed upstream, and a welcome while the
        aggregator has none yet starts its run from the upper global model. Then: an
        upper global model of another structure than this aggregator's makes it leave the
        upper aggregator (its uploads could never count there, and as an agent that never
        delivers it would hold the upper rounds until their deadline)."""
        agg, link = self.agg, self.link
        while not link.stopped:
            if agg._initialized.is_set():
                if not link.core.welcomed:
                    assert agg.global_weights is not None
                    await link.propose(agg.global_weights)
                break
            if link.core.welcomed:
                upper = link.refresh()
                if upper is not None:
                    await self._initialize_from(upper)
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(agg._initialized.wait(), 0.1)
        while not link.stopped:
            latest = link.refresh()
            if latest is not None and agg.structure is not None and not self._fits(latest):
                await self._leave("the upstream model has another structure than this one's")
                return
            await link.changed()

    async def _leave(self, why: str) -> None:
        """Close the link for good (``why`` is logged with the next round)."""
        self._down = why
        await self.link.close()

    async def _initialize_from(self, upper: UpperGlobal) -> None:
        """Version 0 of this aggregator's run = the upper global model (unless its first
        agent started the run meanwhile)."""
        agg = self.agg
        store = agg.store
        assert store is not None
        async with agg.connections._init_lock:
            if agg._initialized.is_set():
                return
            weights = {k: np.array(v) for k, v in upper.weights.items()}
            structure = structure_of(weights)
            try:
                gid = await agg._db(
                    store.init_federation,
                    agg.run_id,
                    agent_id=agg.aggregator_id,
                    structure=structure,
                    init_weights=True,
                    initial=weights,
                    global_weights=weights,
                    num_samples=0,
                    metrics={"upstream_version": upper.version},
                    aggregator_id=agg.aggregator_id,
                )
            except StoreConflict:  # another member of this federation started the run
                log.info("another member of the federation recorded the first model")
                return
            started = asyncio.get_running_loop().create_future()
            await agg._post(FederationStarted(structure, weights, gid, started))
            await started
        self.base_version = upper.version
        log.info(
            "run %s starts from the upstream global model version %d of %s",
            agg.run_id[:8],
            upper.version,
            self.link.url,
        )

    async def _stored_upstream_version(self) -> int:
        """The upper version the stored latest global model came from (a restart)."""
        agg = self.agg
        assert agg.store is not None
        try:
            rows = await agg._db(agg.store.rounds, agg.run_id, 1)
        except FedstackError:
            return -1
        if not rows:
            return -1
        metrics = rows[0].get("metrics") or {}
        v = metrics.get("upstream_version") if isinstance(metrics, dict) else None
        return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else -1

    # ------------------------------------------------------------------ the sink
    async def publish(self, cluster: ClusterRound) -> Adopted:
        """Store ``cluster`` as a semi-global model, exchange it upstream, commit the
        global model this aggregator continues from (see the module docstring).

        Raises:
            StoreError: the store failed (the caller retries: what was already stored or
                uploaded for this round is not done again).
        """
        agg = self.agg
        store = agg.store
        assert store is not None
        p = self._progress
        if p is None or p.round != cluster.round:
            p = self._progress = _Progress(cluster.round)
        if p.semi_id is None:
            p.semi_id = await self._commit_semi(cluster)
        if not p.decided:
            p.upper = await self._exchange(cluster, p)
            p.decided = True
        upper = p.upper
        metrics: Metrics = dict(cluster.metrics)
        if upper is not None:
            weights = {k: np.array(v) for k, v in upper.weights.items()}
            metrics["upstream_version"] = upper.version
        else:
            weights = cluster.weights
            metrics["upstream_offline"] = 1
        gid = await agg._db(
            store.commit_global,
            agg.run_id,
            round=cluster.round,
            weights=weights,
            semi_globals=[p.semi_id],
            base_model_id=cluster.base_model_id or None,
            num_samples=cluster.num_samples,
            num_updates=cluster.num_updates,
            metrics=metrics,
            aggregator_id=agg.aggregator_id,
            started=cluster.started,
            finished=time.time(),
            extra=cluster.extra,
        )
        extra = cluster.extra
        if gid is None:  # another member of this aggregator's own federation won round r
            gid, weights, extra, metrics = await self._winner(cluster.round)
        elif upper is not None:
            self.base_version = upper.version
        self._progress = None
        return Adopted(
            version=cluster.round, model_id=gid, weights=weights, extra=extra, metrics=metrics
        )

    async def complete(self, round: int, extra: Weights) -> Adopted:
        """The global model that follows cluster round ``round``, whose semi-global model
        was stored before a restart but not followed by a global model: it is exchanged
        upstream (or adopted offline) like a fresh one. ``extra`` goes to the cluster's
        agents with it.

        Raises:
            StoreError: the store failed, or holds no semi-global model of ``round`` of
                this aggregator.
        """
        agg = self.agg
        store = agg.store
        assert store is not None
        view = await agg._db(
            store.federation_view, agg.run_id, round, liveness=agg.config.liveness_timeout
        )
        mine = [
            g
            for g in view.semi_globals
            if g.aggregator_id == agg.aggregator_id and g.round == round
        ]
        if not mine:
            raise StoreError(f"no semi-global model of round {round} of this aggregator")
        semi = mine[0]
        weights = await agg._db(store.load_weights, semi.model_id)
        self._progress = _Progress(round, semi_id=semi.model_id)
        return await self.publish(
            ClusterRound(
                round=round,
                base_version=round - 1,
                base_model_id=agg.global_model_id,
                weights=weights,
                extra=extra,
                strategy_state={},
                num_samples=semi.num_samples,
                num_updates=semi.num_updates,
                inputs=[],
                metrics=dict(semi.metrics),
                started=semi.finished,
                finished=semi.finished,
            )
        )

    async def _commit_semi(self, cluster: ClusterRound) -> str:
        agg = self.agg
        store = agg.store
        assert store is not None
        try:
            semi_id: str = await agg._db(
                store.commit_semi_global,
                agg.run_id,
                aggregator_id=agg.aggregator_id,
                round=cluster.round,
                weights=cluster.weights,
                inputs=cluster.inputs,
                base_model_id=cluster.base_model_id or None,
                num_samples=cluster.num_samples,
                metrics=cluster.metrics,
                started=cluster.started,
                finished=cluster.finished,
                strategy_state=cluster.strategy_state,
                extra=cluster.extra,
            )
            return semi_id
        except StoreConflict:  # delivered before a failure: carry on with the stored one
            view = await agg._db(
                store.federation_view,
                agg.run_id,
                cluster.round,
                liveness=agg.config.liveness_timeout,
            )
            for sg in view.semi_globals:
                if sg.aggregator_id == agg.aggregator_id and sg.round == cluster.round:
                    return sg.model_id
            raise

    async def _winner(self, round: int) -> tuple[str, Weights, Weights, Metrics]:
        agg = self.agg
        store = agg.store
        assert store is not None
        view = await agg._db(
            store.federation_view, agg.run_id, round, liveness=agg.config.liveness_timeout
        )
        gid = view.global_model_id
        if gid is None:
            raise StoreConflict(f"global model {round} was committed by another, but is not found")
        weights = await agg._db(store.load_weights, gid)
        extra = await agg._db(store.load_extra, gid)
        return gid, weights, extra, {}

    async def _exchange(self, cluster: ClusterRound, p: _Progress) -> UpperGlobal | None:
        """Upload the semi-global model; the upper global model to continue from, or None
        (offline, timed out, or not usable)."""
        link, r = self.link, cluster.round
        if not link.core.welcomed and not link.stopped:
            # just (re)started: give the first connection its chance (returns at once when
            # the upper aggregator is unreachable)
            with contextlib.suppress(FedstackError):
                await link.wait_welcome(min(self.timeout, INITIAL_WAIT))
        if self._closing:  # the aggregator is stopping: nothing is committed
            await asyncio.get_running_loop().create_future()  # until cancelled
        latest = link.refresh()
        if latest is not None and not link.stopped and not self._fits(latest):
            await self._leave("the upstream model has another structure than this one's")
        if link.stopped:
            if not self._told_down:
                self._told_down = True
                log.warning(
                    "round %d: the upstream link is down for good (%s); this aggregator "
                    "continues on its own semi-global models",
                    r,
                    link.error or self._down or "the upper federation finished",
                )
            return None
        base = self.base_version if self.base_version >= 0 else (link.first_version or 0)
        if p.upload_id is None:
            # one id per cluster round of this member: sent again after a restart, the
            # upper aggregator answers with what became of the first
            p.upload_id = link.upload(
                cluster.weights,
                cluster.num_samples,
                base,
                cluster.metrics,
                upload_id=f"{self.agg.aggregator_id[:40]}-{r}"[:64],
            )
        if not link.connected and not link.connecting:
            log.warning(
                "round %d: upstream %s unreachable; continuing from our own semi-global model "
                "(it is sent when the link comes back)",
                r,
                link.url,
            )
            return None
        ack, upper = await link.exchange(p.upload_id, base, self.timeout)
        if self._closing:
            await asyncio.get_running_loop().create_future()  # until cancelled
        if upper is not None and not self._fits(upper):
            upper = None
        if upper is None:
            if ack is not None:
                why = f"upload {ack.status[:32]!r}"
            elif link.core.session.pending is None and link.last_refusal is not None:
                why = f"upload refused: {link.last_refusal[:200]!r}"
            else:
                why = "not acknowledged"
            log.warning(
                "round %d: no upstream global model within %.1f s (%s); continuing from our "
                "own semi-global model",
                r,
                self.timeout,
                why,
            )
        else:
            log.info(
                "round %d: upstream global model version %d adopted (upload %s)",
                r,
                upper.version,
                repr(ack.status[:32]) if ack else "?",
            )
        return upper

    def _fits(self, upper: UpperGlobal) -> bool:
        """Whether ``upper`` has this aggregator's model structure (names, dtypes, shapes)."""
        mine = self.agg.structure
        if mine is None or [tuple(x) for x in structure_of(upper.weights)] == [
            (n, d, tuple(s)) for n, d, s in mine
        ]:
            return True
        log.error(
            "the upstream global model version %d has another structure than this "
            "aggregator's model; not adopted",
            upper.version,
        )
        return False
