"""Helpers for the dashboard's browser tests and benchmark.

- :func:`find_chromium`: the system's Chromium (Debian's ``chromium`` package), which
  Playwright drives through its executable path (nothing downloads a browser).
- :class:`DashboardProcess`: ``fedstack dashboard --db URL`` as a subprocess on a free port
  of 127.0.0.1.
- :class:`Watched`: a Playwright browser context on one dashboard origin that records what
  its pages ask for and do (requests, dialogs, console errors) and blocks other hosts;
  :func:`shoot` (screenshots) and :func:`injected_markup` (what unescaped agent text would
  leave in a page).
- :func:`populate_store`: a large store written fast with bulk SQL (one run of a horizontal
  federation: rounds, their global models, semi-global models of each member, local models
  of many agents with lineage, and audit events), as a long-running deployment leaves it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import numpy as np
from sqlalchemy import insert, update

from fedstack.store import schema as s
from fedstack.store.repository import Store

if TYPE_CHECKING:
    from playwright.sync_api import (
        Browser,
        BrowserContext,
        ConsoleMessage,
        Dialog,
        Page,
        Route,
        WebSocket,
    )
    from playwright.sync_api import Request as PWRequest

__all__ = [
    "CHROMIUM_ENV",
    "DashboardProcess",
    "PopulatedRun",
    "Watched",
    "find_chromium",
    "injected_markup",
    "populate_store",
    "shoot",
]

CHROMIUM_ENV = "FEDSTACK_CHROMIUM"
"""Environment variable naming the Chromium executable (default: ``/usr/bin/chromium``,
then ``chromium`` or ``chromium-browser`` on PATH)."""


def find_chromium() -> str | None:
    """The path of the system's Chromium, or None if there is none."""
    named = os.environ.get(CHROMIUM_ENV)
    if named:
        return named if os.access(named, os.X_OK) else None
    if os.access("/usr/bin/chromium", os.X_OK):
        return "/usr/bin/chromium"
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None


class DashboardProcess:
    """``python -m fedstack dashboard --db DB`` on 127.0.0.1 (a free port) in a subprocess."""

    def __init__(self, workdir: Path, db: str, *args: str) -> None:
        self.workdir = Path(workdir)
        self.db = db
        self.args = list(args)
        self.port: int | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT`` once started."""
        assert self.port is not None, "not started"
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> None:
        """Start it and wait for its ready file (``{"port": N}``).

        Raises:
            RuntimeError: it exited before it was ready (its output in the message).
            TimeoutError: not ready within ``timeout`` seconds.
        """
        ready = self.workdir / "dashboard.ready"
        ready.unlink(missing_ok=True)
        log = open(self.workdir / "dashboard.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fedstack",
                "dashboard",
                "--db",
                self.db,
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--ready-file",
                str(ready),
                *self.args,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            if ready.exists():
                try:
                    self.port = int(json.loads(ready.read_text())["port"])
                    return
                except (ValueError, KeyError):
                    pass  # still being written
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"fedstack dashboard exited with {self.proc.returncode}: "
                    f"{self.log_text()[-2000:]}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError("fedstack dashboard did not start")
            time.sleep(0.02)

    def log_text(self) -> str:
        path = self.workdir / "dashboard.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@dataclass(frozen=True)
class PopulatedRun:
    """What :func:`populate_store` wrote: ids to open views with."""

    run_id: str
    rounds: int
    agents: list[str]  # agent names, in id order
    global_model_ids: list[str]  # by round (index 0: round 1)
    members: list[str]  # aggregator names of the federation
    other_run_ids: list[str]  # further (small, finished) runs to list and compare


def _hex() -> str:
    return uuid.uuid4().hex


def populate_store(
    db: str,
    *,
    rounds: int,
    agents: int,
    uploads_per_round: int = 10,
    members: int = 2,
    other_runs: int = 3,
    seed: int = 0,
    extra_agent_names: Sequence[str] = (),
    chunk: int = 20_000,
) -> PopulatedRun:
    """Write one long run of a horizontal federation into the store at ``db`` (created if
    needed), with bulk inserts (one transaction per table chunk; no per-round commit).

    Round r has ``uploads_per_round`` local models of agents taken in turn (every agent
    contributes to ``rounds * uploads_per_round / agents`` rounds), split between the
    ``members`` aggregators, whose semi-global models are the inputs of the round's
    global model (lineage ``input``; ``base``: the previous global model). Accuracy rises
    and loss falls round by round; each agent joined once and a few were refused (audit
    events). ``other_runs`` small finished runs (20 rounds each, no lineage) are added for
    the runs list. ``extra_agent_names`` are agents recorded as they are, whatever their
    characters (a store written by anything: the dashboard must show them as text); they
    contribute local models like the others.

    All models share one small weights blob (content-addressed). Returns the ids.
    """
    if rounds < 1 or agents < 1 or members < 1 or uploads_per_round < members:
        raise ValueError("need rounds, agents and members >= 1, uploads_per_round >= members")
    rng = random.Random(seed)
    store = Store(db, durable=False)
    try:
        digest, size = store.put_blob({"w": np.zeros(16, np.float32)}) or _inline(store)
        now = time.time()
        t0 = now - rounds * 2.0 - 3600.0
        run_id = _hex()
        agent_ids = [_hex() for _ in range(agents)]
        names = [f"site-{i:04d}" for i in range(agents)]
        member_ids = [_hex() for _ in range(members)]
        member_names = [f"agg-{chr(ord('a') + i)}" for i in range(members)]
        config = {"strategy": "fedavg", "threshold": 0.8, "rounds": None}
        engine = store.engine

        def bulk(table: Any, rows: list[dict[str, Any]]) -> None:
            for i in range(0, len(rows), chunk):
                with engine.begin() as c:
                    c.execute(insert(table), rows[i : i + chunk])

        bulk(
            s.runs,
            [
                dict(
                    id=run_id,
                    name="long-run",
                    created=t0,
                    status="running",
                    config=config,
                    structure=[["w", "float32", [16]]],
                    init_weights=True,
                    version=rounds,
                    aggregator_id=member_ids[0],
                )
            ],
        )
        agent_rows = [
            dict(
                id=aid,
                name=name,
                token_hash=None,
                created=t0,
                last_seen=now - rng.uniform(0, 600),
                last_address=f"10.{i // 250}.{i % 250}.{1 + i % 200}:{40000 + i}",
                credential_source="issued",
                credential_created=t0,
                revoked_at=None,
                role="agent",
            )
            for i, (aid, name) in enumerate(zip(agent_ids, names, strict=True))
        ]
        extra_ids = [_hex() for _ in extra_agent_names]
        agent_rows += [
            dict(
                id=aid,
                name=name,
                token_hash=None,
                created=t0,
                last_seen=now,
                last_address=name[:128],
                credential_source="first-use",
                credential_created=t0,
                revoked_at=None,
                role="agent",
            )
            for aid, name in zip(extra_ids, extra_agent_names, strict=True)
        ]
        bulk(s.agents, agent_rows)
        bulk(
            s.aggregators,
            [
                dict(
                    id=mid,
                    run_id=run_id,
                    name=mname,
                    url=f"wss://{mname}.example:8765",
                    upstream=None,
                    started=t0,
                    heartbeat=now - i,
                    status="live",
                    active_agents=agents // members,
                    version=rounds,
                    ready_round=rounds,
                )
                for i, (mid, mname) in enumerate(zip(member_ids, member_names, strict=True))
            ],
        )
        models: list[dict[str, Any]] = []
        lineage: list[dict[str, Any]] = []
        round_rows: list[dict[str, Any]] = []
        cluster_rows: list[dict[str, Any]] = []
        globals_: list[str] = []
        contributors = [*agent_ids, *extra_ids]  # in turn, the extra names last
        next_agent = 0
        prev: str | None = None

        def model(kind: str, producer: str, r: int, metrics: dict[str, Any], **kw: Any) -> str:
            mid = _hex()
            models.append(
                dict(
                    id=mid,
                    run_id=run_id,
                    kind=kind,
                    producer=producer,
                    round=r,
                    base_version=r - 1,
                    num_samples=kw.pop("num_samples", 100),
                    metrics=metrics,
                    blob=digest,
                    nbytes=size,
                    created=kw.pop("created"),
                    status=kw.pop("status"),
                    upload_id=kw.pop("upload_id", None),
                    extra_blob=None,
                    cluster=kw.pop("cluster", None),
                )
            )
            return mid

        for r in range(1, rounds + 1):
            started = t0 + (r - 1) * 2.0
            finished = started + 1.0 + rng.random()
            acc = 0.97 - 0.87 * np.exp(-r / max(rounds / 10, 1.0)) + rng.gauss(0, 0.005)
            loss = 2.3 * np.exp(-r / max(rounds / 8, 1.0)) + 0.05 + abs(rng.gauss(0, 0.01))
            semis = []
            for m in range(members):
                share = uploads_per_round // members + (1 if m < uploads_per_round % members else 0)
                inputs = []
                for _ in range(share):
                    a = next_agent % len(contributors)
                    next_agent += 1
                    inputs.append(
                        model(
                            "local",
                            contributors[a],
                            r,
                            {
                                "local_accuracy": round(acc + rng.gauss(0, 0.02), 4),
                                "train_loss": round(loss + abs(rng.gauss(0, 0.05)), 4),
                            },
                            created=started + rng.random(),
                            status="aggregated",
                            upload_id=_hex(),
                            cluster=member_ids[m],
                        )
                    )
                semi = model(
                    "semi-global",
                    member_ids[m],
                    r,
                    {"mean_local_accuracy": round(acc, 4)},
                    created=finished - 0.1,
                    status="synthesized",
                    num_samples=100 * share,
                    cluster=member_ids[m],
                )
                lineage += [dict(child_id=semi, parent_id=i, relation="input") for i in inputs]
                cluster_rows.append(
                    dict(
                        run_id=run_id,
                        aggregator_id=member_ids[m],
                        round=r,
                        model_id=semi,
                        num_updates=share,
                        num_samples=100 * share,
                        started=started,
                        finished=finished - 0.1,
                        metrics={"mean_local_accuracy": round(acc, 4)},
                        strategy_state=None,
                        state_blob=None,
                        status="synthesized",
                    )
                )
                semis.append(semi)
            metrics = {
                "mean_local_accuracy": round(float(acc), 4),
                "mean_train_loss": round(float(loss), 4),
                "eval_accuracy": round(float(acc) - 0.01, 4),
                "eval_loss": round(float(loss) + 0.02, 4),
            }
            g = model(
                "cluster",
                member_ids[0],
                r,
                metrics,
                created=finished,
                status="global",
                num_samples=100 * uploads_per_round,
            )
            lineage += [dict(child_id=g, parent_id=p, relation="input") for p in semis]
            if prev is not None:
                lineage.append(dict(child_id=g, parent_id=prev, relation="base"))
            prev = g
            globals_.append(g)
            round_rows.append(
                dict(
                    run_id=run_id,
                    round=r,
                    started=started,
                    finished=finished,
                    seconds=finished - started,
                    model_id=g,
                    num_updates=uploads_per_round,
                    num_samples=100 * uploads_per_round,
                    metrics=metrics,
                    strategy_state=None,
                    state_blob=None,
                )
            )
        bulk(s.models, models)
        bulk(s.lineage, lineage)
        bulk(s.rounds, round_rows)
        bulk(s.cluster_rounds, cluster_rows)
        events: list[dict[str, Any]] = []
        for i, aid in enumerate(agent_ids):
            events.append(
                dict(
                    time=t0 + i * 0.01,
                    run_id=run_id,
                    agent_id=aid,
                    kind="joined",
                    detail={"name": names[i], "address": agent_rows[i]["last_address"]},
                )
            )
        for k in range(max(agents // 10, 1)):
            a = rng.randrange(agents)
            events.append(
                dict(
                    time=t0 + 100 + k,
                    run_id=run_id,
                    agent_id=agent_ids[a],
                    kind="refused",
                    detail={
                        "code": "model-mismatch",
                        "message": "layer 'w' has shape (8,), the federation's (16,)",
                        "address": agent_rows[a]["last_address"],
                    },
                )
            )
        for aid, name in zip(extra_ids, extra_agent_names, strict=True):
            events.append(
                dict(
                    time=now,
                    run_id=run_id,
                    agent_id=aid,
                    kind="refused",
                    detail={"code": "bad-name", "message": name, "address": name},
                )
            )
        bulk(s.events, events)
        others = []
        for o in range(other_runs):
            oid = _hex()
            others.append(oid)
            bulk(
                s.runs,
                [
                    dict(
                        id=oid,
                        name=f"trial-{o + 1}",
                        created=t0 - 86400 * (o + 1),
                        status="finished",
                        config={"strategy": ["fedavg", "fedprox", "fedadam"][o % 3]},
                        structure=[["w", "float32", [16]]],
                        init_weights=True,
                        version=0,
                        aggregator_id=member_ids[0],
                    )
                ],
            )
            o_models, o_rounds = [], []
            for r in range(1, 21):
                mid = _hex()
                acc = 0.9 - 0.6 * np.exp(-r / (3.0 + o)) + rng.gauss(0, 0.005)
                met = {
                    "mean_local_accuracy": round(float(acc), 4),
                    "mean_train_loss": round(float(1.5 * np.exp(-r / (3.0 + o))), 4),
                }
                ts = t0 - 86400 * (o + 1) + r * 3.0
                o_models.append(
                    dict(
                        id=mid,
                        run_id=oid,
                        kind="cluster",
                        producer=member_ids[0],
                        round=r,
                        base_version=r - 1,
                        num_samples=1000,
                        metrics=met,
                        blob=digest,
                        nbytes=size,
                        created=ts,
                        status="global",
                        upload_id=None,
                        extra_blob=None,
                        cluster=None,
                    )
                )
                o_rounds.append(
                    dict(
                        run_id=oid,
                        round=r,
                        started=ts - 2.0,
                        finished=ts,
                        seconds=2.0,
                        model_id=mid,
                        num_updates=10,
                        num_samples=1000,
                        metrics=met,
                        strategy_state=None,
                        state_blob=None,
                    )
                )
            bulk(s.models, o_models)
            bulk(s.rounds, o_rounds)
            with engine.begin() as c:
                c.execute(update(s.runs).where(s.runs.c.id == oid).values(version=20))
    finally:
        store.close()
    return PopulatedRun(
        run_id=run_id,
        rounds=rounds,
        agents=[*names, *extra_agent_names],
        global_model_ids=globals_,
        members=member_names,
        other_run_ids=others,
    )


def _inline(store: Store) -> tuple[str, int]:
    """(digest, size) of the shared weights when the store keeps them inline: written in
    the database's blob table by a transaction of its own."""
    staged = store._stage({"w": np.zeros(16, np.float32)})
    with store._begin() as c:
        store._write_inline(c, staged)
    return staged.digest, staged.size


class Watched:
    """A browser context on ``origin`` (``http://127.0.0.1:PORT``) that records what its
    pages do: ``requests`` (every URL asked for), ``foreign`` (requests for another origin,
    aborted), ``websockets``, ``dialogs`` (alert/confirm/prompt, dismissed) and
    ``console_errors`` (CSP violations among them). ``accept_confirm``: accept
    ``confirm()`` dialogs (an action's "are you sure?") instead of dismissing them."""

    def __init__(self, browser: Browser, origin: str, *, accept_confirm: bool = False) -> None:
        self.origin = origin
        self.accept_confirm = accept_confirm
        self.requests: list[str] = []
        self.foreign: list[str] = []
        self.websockets: list[str] = []
        self.dialogs: list[str] = []
        self.console_errors: list[str] = []
        self.context: BrowserContext = browser.new_context(
            base_url=origin, viewport={"width": 1280, "height": 860}
        )
        self.context.set_default_timeout(15_000)
        self.context.on("request", self._on_request)
        self.context.on("page", self._watch)
        self.context.route(lambda url: not self.same_origin(url), self._abort)

    def same_origin(self, url: str) -> bool:
        u, o = urlsplit(url), urlsplit(self.origin)
        return (u.scheme, u.netloc) == (o.scheme, o.netloc)

    def _on_request(self, request: PWRequest) -> None:
        self.requests.append(request.url)

    def _abort(self, route: Route) -> None:
        self.foreign.append(route.request.url)
        route.abort()

    def _watch(self, page: Page) -> None:
        page.on("dialog", self._on_dialog)
        page.on("console", self._on_console)
        page.on("websocket", self._on_websocket)

    def _on_dialog(self, dialog: Dialog) -> None:
        self.dialogs.append(f"{dialog.type}: {dialog.message}")
        if dialog.type == "confirm" and self.accept_confirm:
            dialog.accept()
        else:
            dialog.dismiss()

    def _on_console(self, msg: ConsoleMessage) -> None:
        if msg.type == "error":
            self.console_errors.append(msg.text)

    def _on_websocket(self, ws: WebSocket) -> None:
        self.websockets.append(ws.url)

    def new_page(self) -> Page:
        return self.context.new_page()

    def outside_origin(self) -> list[str]:
        """Every URL asked for that is not on the dashboard's origin (data: URLs are not
        requests to a host)."""
        return [
            u
            for u in [*self.requests, *self.foreign, *self.websockets]
            if not u.startswith("data:") and not self.same_origin(u)
        ]

    def close(self) -> None:
        self.context.close()


def shoot(page: Page, folder: Path, name: str) -> Path:
    """A full-page screenshot of ``page`` as ``folder/name.png``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def injected_markup(page: Page) -> dict[str, Any]:
    """What agent-supplied markup would have left in ``page`` had it not been escaped:
    images pointing at ``x``, elements with inline event handlers, scripts not loaded
    from the dashboard's own files."""
    result: dict[str, Any] = page.evaluate(
        """() => ({
            images: document.querySelectorAll('img[src="x"]').length,
            handlers: [...document.querySelectorAll('*')].filter(
                e => [...e.attributes].some(a => a.name.startsWith('on'))).length,
            inline_scripts: [...document.querySelectorAll('script')].filter(
                s => !s.src).length,
            foreign_scripts: [...document.querySelectorAll('script[src]')].filter(
                s => new URL(s.src).origin !== location.origin).length,
        })"""
    )
    return result
