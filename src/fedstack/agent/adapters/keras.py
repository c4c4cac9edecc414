"""Convert between a Keras 3 model and fedstack :data:`~fedstack.types.Weights`.

The weights are the model's ``weights`` (trainable and non-trainable: a
``BatchNormalization``'s moving statistics too; not the optimizer's state, nor the seed
generators'), mapped to numpy copies with the variables' dtypes (bfloat16, which numpy
lacks, becomes float32 and is cast back exactly on loading).

Names are the model's structure, not Keras's process-wide layer counters, so that two
instances of one architecture (in two agents, or built one after the other in one process,
where Keras names the second one's layers ``dense_1``, ...) get the same names, like
Keras's own weights files: ``LAYER/VARIABLE`` where ``LAYER`` is the name you gave the
layer or, for an automatic name, its class in snake case numbered within its model in order
(``dense``, ``dense_1``, ...), and ``VARIABLE`` is the variable's path inside its layer
(``kernel``; ``query/kernel`` in a ``MultiHeadAttention``). A model nested in the model
(e.g. a ``Sequential`` block) adds its own level: ``encoder/dense/kernel``. Sub-layers
that a custom layer makes itself keep their names: name them explicitly.

Works with any Keras backend; fedstack tests it with PyTorch's (``KERAS_BACKEND=torch``,
set before keras is first imported). This module imports keras: import it only where keras
is installed (``pip install 'fedstack[keras]'``).
"""

from __future__ import annotations

import re
from typing import Any

import keras
import numpy as np

from fedstack.agent.adapters.fit import check_fit
from fedstack.errors import InvalidUpdate, RemoteProtocolError
from fedstack.types import Weights
from fedstack.wire.tensors import check_name

__all__ = ["model_to_weights", "variable_names", "weights_to_model"]

_MAX_NAME = 1024


def _snake(name: str) -> str:
    """Keras's ``to_snake_case`` of a class name (``BatchNormalization`` ->
    ``batch_normalization``, ``Conv2D`` -> ``conv2d``)."""
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def _is_auto(layer_name: str, cls: str) -> bool:
    """Whether ``layer_name`` is one Keras made up for a layer of class ``cls``."""
    base = _snake(cls)
    return layer_name == base or re.fullmatch(re.escape(base) + r"_\d+", layer_name) is not None


def _walk(model: Any, prefix: str, out: list[tuple[str, Any]]) -> None:
    """Append ``(name, variable)`` for every weight of ``model``'s layers, in order."""
    seen: dict[str, int] = {}
    for layer in model.layers:
        cls = type(layer).__name__
        if _is_auto(layer.name, cls):
            base = _snake(cls)
            n = seen.get(base, 0)
            seen[base] = n + 1
            key = base if n == 0 else f"{base}_{n}"
        else:
            key = layer.name
        if isinstance(layer, keras.Model):
            _walk(layer, f"{prefix}{key}/", out)
            continue
        layer_path = getattr(layer, "path", None) or layer.name
        for v in layer.weights:
            path = str(v.path)
            rel = path[len(layer_path) + 1 :] if path.startswith(layer_path + "/") else v.name
            out.append((f"{prefix}{key}/{rel}", v))


def _named_variables(model: keras.Model) -> list[tuple[str, Any]]:
    if not isinstance(model, keras.Model):
        raise TypeError(f"expected a keras.Model, got {type(model).__name__}")
    if not model.built or not model.weights:
        raise InvalidUpdate(
            f"{type(model).__name__} {model.name!r} has no weights yet: build it first "
            "(give it an Input, call build(), or call it on a batch)"
        )
    named: list[tuple[str, Any]] = []
    _walk(model, "", named)
    counted = {id(v) for _, v in named}
    # weights the model holds itself, outside its layers
    named.extend((f"model/{v.path}", v) for v in model.weights if id(v) not in counted)
    names = [n for n, _ in named]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise InvalidUpdate(
            f"{model.name!r}: several weights are named {', '.join(dupes)}; give the layers "
            "that hold them distinct names"
        )
    for n in names:
        try:
            check_name(n, _MAX_NAME)
        except RemoteProtocolError as exc:
            raise InvalidUpdate(f"{model.name!r}: weight {n!r} cannot be sent: {exc}") from None
    return named


def _to_numpy(v: Any) -> np.ndarray[Any, Any]:
    """A numpy copy of variable ``v`` (bfloat16 as float32, which holds it exactly)."""
    value = v.value
    if keras.backend.backend() == "torch":  # directly: no copy through __array__
        t = value.detach().cpu()
        if str(t.dtype) == "torch.bfloat16":
            t = t.float()
        return np.array(t.numpy(), copy=True)
    if str(v.dtype) == "bfloat16":
        value = keras.ops.cast(value, "float32")
    array = np.asarray(keras.ops.convert_to_numpy(value))
    if array.dtype.name == "bfloat16":
        array = array.astype(np.float32)
    return np.array(array, copy=True)


def variable_names(model: keras.Model) -> list[str]:
    """The names :func:`model_to_weights` gives ``model``'s weights, in order."""
    return [n for n, _ in _named_variables(model)]


def model_to_weights(model: keras.Model) -> Weights:
    """Copy a built Keras model's weights into named numpy arrays.

    Returns:
        ``{name: numpy copy}`` (names as the module docstring says), dtypes preserved
        (bfloat16 becomes float32). The arrays share no memory with the model.

    Raises:
        InvalidUpdate: the model is not built, or two weights would get one name.
    """
    weights: Weights = {}
    for name, v in _named_variables(model):
        weights[name] = _to_numpy(v)
    return weights


def weights_to_model(model: keras.Model, weights: Weights, strict: bool = True) -> None:
    """Load named arrays into a built Keras model in place (each variable is assigned,
    cast to its dtype: optimizers holding the variables stay valid).

    Args:
        model: The model to update.
        weights: ``{name: array}``, e.g. from :func:`model_to_weights` on a model of the
            same architecture (in this process or another).
        strict: If true, the names must be exactly the model's. If false, missing and
            unexpected names are skipped. Shapes must match either way.

    Raises:
        InvalidUpdate: names (when ``strict``) or shapes do not match, listing every
            missing, unexpected and mismatched name, or an array cannot be converted.
    """
    named = dict(_named_variables(model))
    check_fit({n: tuple(v.shape) for n, v in named.items()}, weights, strict, repr(model.name))
    values = {}
    for n, v in named.items():
        if n not in weights:
            continue
        array = np.asarray(weights[n])
        if array.dtype.kind not in "biuf":
            raise InvalidUpdate(f"weights[{n!r}] of dtype {array.dtype} cannot become {v.dtype}")
        values[n] = array.astype(array.dtype.newbyteorder("="), copy=True)
    for n, array in values.items():  # everything checked first: all or nothing
        named[n].assign(array)
