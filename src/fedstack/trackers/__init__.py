"""Experiment trackers: a run's rounds in MLflow and TensorBoard.

Optional extras: ``pip install 'fedstack[mlflow]'`` (MLflow's tracking client, the
``mlflow-skinny`` package) and ``pip install 'fedstack[tensorboard]'``. Two ways in:

- live: ``fedstack aggregator --track mlflow:URI --track tensorboard:DIR`` (repeatable;
  the setting ``track``) logs each round after it is committed, and its central
  evaluation once stored, from a thread of its own (:class:`TrackerSink`): a tracker never
  slows or fails a round; one that fails is logged once and disabled;
- past runs: ``fedstack db export --to mlflow|tensorboard --run RUN [--uri URI]``
  (:func:`export_run`): the rounds the tracker does not hold yet.

What is logged per round (step = round number): the round's ``seconds``, ``num_updates``
and ``num_samples``, its numeric metrics (``mean_train_loss``, ``eval_accuracy``, ...), and
per contributing agent its upload's ``num_samples`` and training metrics (an MLflow nested
run, a TensorBoard run under ``agents/``). See :mod:`.mlflow_tracker` and
:mod:`.tensorboard_tracker` for the layouts.
"""

from fedstack.trackers.base import KINDS, Tracker, make_tracker, parse_spec
from fedstack.trackers.records import AgentRecord, RoundRecord, RunMeta, round_record
from fedstack.trackers.sink import ExportResult, Follower, TrackerSink, export_run

__all__ = [
    "KINDS",
    "AgentRecord",
    "ExportResult",
    "Follower",
    "RoundRecord",
    "RunMeta",
    "Tracker",
    "TrackerSink",
    "export_run",
    "make_tracker",
    "parse_spec",
    "round_record",
]
