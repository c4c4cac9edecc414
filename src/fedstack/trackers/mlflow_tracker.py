"""MLflow: one MLflow run per fedstack run, one nested run per agent.

The target is a tracking URI (``http://host:5000``, ``sqlite:///mlflow.db``,
``file:///path``, ``databricks``...) or a directory (MLflow's file store there). MLflow 3
keeps its file store in maintenance mode and refuses it unless ``MLFLOW_ALLOW_FILE_STORE`` is
set; asking for a file URI or a directory is taken as that opt-in (set in this process
unless the environment already says otherwise); MLflow's "View run at URL" lines on
stdout are turned off likewise (``MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT``). The
experiment is ``$MLFLOW_EXPERIMENT_NAME``, else ``fedstack``; a server's credentials
come from MLflow's own environment variables (``MLFLOW_TRACKING_TOKEN``,
``MLFLOW_TRACKING_USERNAME``/``PASSWORD``).

Layout: the fedstack run is an MLflow run named after it (tags ``fedstack.run_id``,
``fedstack.run_name``; params: the run's configuration, tables as JSON), whose metrics
at step N are round N's figures and metrics (``seconds``, ``num_updates``,
``num_samples``, ``eval_accuracy``, ``mean_train_loss``...). Each agent is a nested run
(``mlflow.parentRunId``; named after the agent, tag ``fedstack.agent_id``) holding its
uploads' ``num_samples`` and training metrics at the rounds it contributed to. The tag
``fedstack.last_round`` records the last round entirely logged, so that a resumed
aggregator or a second export carries on after it. A finished fedstack run ends its
MLflow runs as FINISHED.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedstack.trackers.base import Tracker, redacted, safe_key, safe_scalars
from fedstack.trackers.records import AgentRecord, RunMeta

__all__ = ["MlflowTracker", "tracking_uri"]

EXPERIMENT = "fedstack"
BATCH = 1000  # MLflow's limit of metrics per log_batch call
MAX_PARAM = 500
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]+:")


def tracking_uri(target: str) -> str:
    """``target`` as a tracking URI: a URI as is, a directory as a ``file://`` URI."""
    if _SCHEME.match(target):
        return target
    return Path(target).expanduser().resolve().as_uri()


class MlflowTracker(Tracker):
    """The run's rounds to MLflow (see the module docstring)."""

    kind = "mlflow"

    def __init__(self, target: str) -> None:
        super().__init__(target)
        self.uri = tracking_uri(target)
        self._client: Any = None
        self._run_id = ""
        self._experiment_id = ""
        self._children: dict[str, str] = {}  # agent id -> nested run id

    @property
    def location(self) -> str:
        return f"{redacted(self.uri)} (experiment {self._experiment_id}, run {self._run_id})"

    @property
    def run_id(self) -> str:
        """The MLflow run of the fedstack run (once opened)."""
        return self._run_id

    def open(self, run: RunMeta) -> None:
        if self.uri.startswith("file:"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        # MLflow prints "View run ... at URL" to stdout when a run ends: not into the
        # output of `fedstack db export --json` (the location is in fedstack's own output)
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        from mlflow.entities import Param, RunStatus
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=self.uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or EXPERIMENT
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            try:
                self._experiment_id = client.create_experiment(name)
            except MlflowException:  # created meanwhile by another aggregator
                experiment = client.get_experiment_by_name(name)
                if experiment is None:
                    raise
                self._experiment_id = experiment.experiment_id
        else:
            self._experiment_id = experiment.experiment_id
        self._client = client
        found = self._search(f"tags.`fedstack.run_id` = '{_quoted(run.id)}'")
        found = [r for r in found if "mlflow.parentRunId" not in r.data.tags]
        if found:
            mlrun = found[0]
            self._run_id = mlrun.info.run_id
            for child in self._search(f"tags.`mlflow.parentRunId` = '{_quoted(self._run_id)}'"):
                agent = child.data.tags.get("fedstack.agent_id")
                if agent:
                    self._children[agent] = child.info.run_id
            if run.status != "finished" and mlrun.info.status != RunStatus.to_string(
                RunStatus.RUNNING
            ):
                client.update_run(self._run_id, status="RUNNING")
            self.last = int(mlrun.data.tags.get("fedstack.last_round", "0") or 0)
            for key in mlrun.data.metrics:
                for m in client.get_metric_history(self._run_id, key):
                    self.held.setdefault(int(m.step), set()).add(key)
            return
        mlrun = client.create_run(
            self._experiment_id,
            start_time=int(run.created * 1000),
            run_name=run.name,
            tags={"fedstack.run_id": run.id, "fedstack.run_name": run.name},
        )
        self._run_id = mlrun.info.run_id
        params = [
            Param(safe_key(k), _param(v)) for k, v in sorted(run.config.items()) if v is not None
        ]
        for i in range(0, len(params), 100):
            client.log_batch(self._run_id, params=params[i : i + 100])

    def _search(self, filter_string: str) -> list[Any]:
        runs: list[Any] = []
        token: str | None = None
        while True:
            page = self._client.search_runs(
                [self._experiment_id], filter_string, max_results=1000, page_token=token
            )
            runs.extend(page)
            token = page.token
            if not token:
                return runs

    def _child(self, agent: AgentRecord) -> str:
        run_id = self._children.get(agent.agent_id)
        if run_id is None:
            child = self._client.create_run(
                self._experiment_id,
                run_name=agent.name[:200],
                tags={
                    "mlflow.parentRunId": self._run_id,
                    "fedstack.agent_id": agent.agent_id,
                    "fedstack.agent_name": agent.name[:MAX_PARAM],
                },
            )
            run_id = self._children[agent.agent_id] = child.info.run_id
        return run_id

    def _log(self, run_id: str, step: int, ms: int, scalars: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        metrics = [Metric(k, v, ms, step) for k, v in scalars.items()]
        for i in range(0, len(metrics), BATCH):
            self._client.log_batch(run_id, metrics=metrics[i : i + BATCH])

    def names(self, scalars: Mapping[str, float]) -> dict[str, float]:
        return safe_scalars(scalars)

    def write(
        self,
        round: int,
        wall_time: float,
        scalars: Mapping[str, float],
        agents: Sequence[AgentRecord],
        *,
        complete: bool,
    ) -> None:
        from mlflow.entities import RunTag

        ms = int(wall_time * 1000)
        for agent in agents:
            self._log(self._child(agent), round, ms, safe_scalars(agent.scalars()))
        self._log(self._run_id, round, ms, scalars)
        if complete:
            self._client.log_batch(self._run_id, tags=[RunTag("fedstack.last_round", str(round))])

    def close(self, *, finished: bool) -> None:
        if self._client is None or not finished:
            return
        end = int(time.time() * 1000)
        for run_id in [*self._children.values(), self._run_id]:
            self._client.set_terminated(run_id, "FINISHED", end_time=end)


def _param(value: Any) -> str:
    """A configuration value as an MLflow param: text as is, anything else as JSON (at
    most :data:`MAX_PARAM` characters)."""
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text[:MAX_PARAM]


def _quoted(text: str) -> str:
    """``text`` inside a single-quoted MLflow filter string."""
    return text.replace("\\", "\\\\").replace("'", "\\'")
