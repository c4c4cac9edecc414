"""Convert between a ``torch.nn.Module`` and fedstack :data:`~fedstack.types.Weights`.

The weights are the module's ``state_dict``: parameter *and* buffer names (e.g.
``bn.running_mean`` and the int64 ``bn.num_batches_tracked``) mapped to numpy copies
with the tensors' dtypes. This module imports torch; import it only where torch is
installed.
"""

from __future__ import annotations

import numpy as np
import torch

from fedstack.agent.adapters.fit import check_fit
from fedstack.errors import InvalidUpdate
from fedstack.types import Weights

__all__ = ["module_to_weights", "weights_to_module"]


def module_to_weights(module: torch.nn.Module) -> Weights:
    """Copy a module's state into named numpy arrays.

    Args:
        module: Any ``torch.nn.Module`` (on any device).

    Returns:
        ``{state_dict name: numpy copy}``, dtypes preserved (bfloat16, which numpy lacks,
        becomes float32). The arrays share no memory with the module.
    """
    weights: Weights = {}
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu()
        if t.dtype == torch.bfloat16:
            t = t.to(torch.float32)
        weights[name] = t.numpy().copy()
    return weights


def weights_to_module(module: torch.nn.Module, weights: Weights, strict: bool = True) -> None:
    """Load named arrays into a module in place.

    Values are copied into the existing parameters and buffers (cast to their dtype and
    device), so optimizers holding the parameters stay valid.

    Args:
        module: The module to update.
        weights: ``{state_dict name: array}``, e.g. from :func:`module_to_weights`.
        strict: If true, the names must be exactly the module's ``state_dict`` names.
            If false, missing and unexpected names are skipped. Shapes must match
            either way.

    Raises:
        InvalidUpdate: If names (when ``strict``) or shapes do not match, listing every
            missing, unexpected and mismatched name, or an array cannot be converted.
    """
    state = module.state_dict()
    check_fit({n: tuple(v.shape) for n, v in state.items()}, weights, strict, type(module).__name__)

    new_state: dict[str, torch.Tensor] = {}
    for name in state:
        if name not in weights:
            continue
        array = np.asarray(weights[name])
        try:
            # Copy into native byte order: the source may be read-only or big-endian.
            native = array.astype(array.dtype.newbyteorder("="), copy=True)
            new_state[name] = torch.from_numpy(native)
        except (TypeError, ValueError) as exc:
            raise InvalidUpdate(
                f"weights[{name!r}] of dtype {array.dtype} cannot become a tensor: {exc}"
            ) from exc
    try:
        module.load_state_dict(new_state, strict=strict)
    except RuntimeError as exc:  # e.g. a dtype torch refuses to cast
        raise InvalidUpdate(f"weights do not fit {type(module).__name__}: {exc}") from exc
