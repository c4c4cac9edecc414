"""The ClientApp: a NumPyClient returning the node's fixed synthetic update, wrapped in
Flower's ``secaggplus_mod`` (and, outside it, :func:`drop_mod`).

``drop_mod`` makes the configured nodes fail in the configured SecAgg+ stage (default:
``collect_masked_vectors``, i.e. after they shared their keys and before they send a
masked vector: the costly drop, whose pairwise masks the server must rebuild). The node
raises, Flower's simulation engine replies with an error message, and the workflow counts
the node as dropped, as it would a node that went away.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import Context, Message
from flwr.app.message_type import MessageType
from flwr.client import NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from secagg_task import num_samples, synthetic_update

from fssecagg_flower.task import config, dropping


class SyntheticClient(NumPyClient):  # type: ignore[misc]
    """``fit`` returns the received parameters plus the node's fixed update."""

    def __init__(self, index: int, params: int, seed: int) -> None:
        self.index, self.params, self.seed = index, params, seed

    def fit(
        self, parameters: list[np.ndarray[Any, Any]], config: dict[str, Any]
    ) -> tuple[list[np.ndarray[Any, Any]], int, dict[str, Any]]:
        w = np.asarray(parameters[0], dtype=np.float32)
        new = np.add(w, synthetic_update(self.index, self.params, self.seed), dtype=np.float32)
        return [new], num_samples(self.index), {}


def client_fn(context: Context) -> Any:
    cfg = config()
    index = int(context.node_config["partition-id"])
    return SyntheticClient(index, int(cfg["params"]), int(cfg["seed"])).to_client()


class SimulatedDrop(RuntimeError):
    """Raised by a node that is configured to drop out in this stage."""


def drop_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Fail (as a dropped node) in the configured SecAgg+ stage, if this node drops."""
    if msg.metadata.message_type == MessageType.TRAIN:
        cfg = config()
        if int(ctxt.node_config["partition-id"]) in dropping(cfg):
            configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
            if configs is not None and configs.get(Key.STAGE) == cfg["drop-stage"]:
                raise SimulatedDrop(f"node drops out in stage {cfg['drop-stage']}")
    return call_next(msg, ctxt)


app = ClientApp(client_fn=client_fn, mods=[drop_mod, secaggplus_mod])
"""SecAgg+: the ClientApp of the measured runs."""

plain_app = ClientApp(client_fn=client_fn)
"""Plain FedAvg (no mods): the ClientApp of Flower's own baseline."""
