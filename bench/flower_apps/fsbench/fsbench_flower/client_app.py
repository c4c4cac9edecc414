"""The ClientApp: one fedstack trainer per SuperNode, state kept in ``context.state``.

``digits``: :class:`fedstack.trainers.torch_digits.DigitsMLPTrainer` with the node's
``partition-id`` / ``num-partitions``; the minibatch generator's state is saved in the
node's Context between rounds, so each node draws exactly the minibatch orders a
long-lived fedstack agent draws (a ClientApp process may not outlive a round).
``probe``: :class:`fedstack.testing.probe.ProbeTrainer` (adds ``probe-delta``).
"""

from __future__ import annotations

from typing import Any

from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fsbench_flower.task import run_config, to_record, to_weights

app = ClientApp()

_TRAINERS: dict[tuple[Any, ...], Any] = {}


def _trainer(cfg: dict[str, Any], index: int, num: int) -> Any:
    key = (
        cfg["task"],
        index,
        num,
        cfg["partition"],
        cfg["seed"],
        cfg["epochs"],
        cfg["lr"],
        cfg["batch-size"],
        cfg["probe-params"],
        cfg["probe-delta"],
    )
    if key not in _TRAINERS:
        if cfg["task"] == "probe":
            from fedstack.testing.probe import ProbeTrainer

            _TRAINERS[key] = ProbeTrainer(
                params=cfg["probe-params"], delta=cfg["probe-delta"], index=index, num_agents=num
            )
        else:
            from fedstack.trainers.torch_digits import DigitsMLPTrainer

            _TRAINERS[key] = DigitsMLPTrainer(
                index=index,
                num_agents=num,
                partition=cfg["partition"],
                seed=cfg["seed"],
                epochs=cfg["epochs"],
                lr=cfg["lr"],
                batch_size=cfg["batch-size"],
            )
    return _TRAINERS[key]


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global model on this node's share; reply with weights + count."""
    cfg = run_config(context)
    index = int(context.node_config["partition-id"])
    num = int(context.node_config["num-partitions"])
    trainer = _trainer(cfg, index, num)
    generator = getattr(trainer, "_generator", None)
    if generator is not None:
        import torch

        saved = context.state.array_records.get("fsbench")
        if saved is not None:
            generator.set_state(torch.from_numpy(saved["generator"].numpy().copy()))
        else:  # first round on this node: the trainer's fresh generator, as in fedstack
            generator.manual_seed(int(cfg["seed"]) * 1000 + index)
    weights = to_weights(msg.content["arrays"])
    new, n, metrics = trainer.fit(weights, {"version": msg.content["config"]["server-round"]})
    if generator is not None:
        context.state["fsbench"] = ArrayRecord({"generator": Array(generator.get_state().numpy())})
    reply = RecordDict(
        {
            "arrays": to_record(new),
            "metrics": MetricRecord(
                {"num-examples": int(n), **{k: float(v) for k, v in metrics.items()}}
            ),
        }
    )
    return Message(content=reply, reply_to=msg)
