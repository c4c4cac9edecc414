"""Ingress checks of a model against the federation's structure."""

from __future__ import annotations

from fedstack.errors import InvalidUpdate
from fedstack.types import Weights
from fedstack.wire.tensors import all_finite, dtype_name

Structure = list[tuple[str, str, tuple[int, ...]]]


def validate_model(
    weights: Weights,
    structure: Structure | None,
    *,
    agent_id: str | None = None,
    round: int | None = None,
) -> None:
    """Refuse a model whose names, shapes or dtypes differ from ``structure`` or that holds
    NaN or infinity.

    Raises:
        InvalidUpdate: with a message naming the first problem found.
    """

    def bad(msg: str) -> InvalidUpdate:
        return InvalidUpdate(msg, agent_id=agent_id, round=round)

    if not weights:
        raise bad("the model has no tensors")
    if structure is not None:
        expected = {n: (d, s) for n, d, s in structure}
        missing = [n for n in expected if n not in weights]
        extra = [n for n in weights if n not in expected]
        if missing or extra:
            raise bad(
                f"tensor names differ from the federation's model: missing {missing[:5]}, "
                f"unexpected {extra[:5]}"
            )
        for name, arr in weights.items():
            dtype, shape = expected[name]
            if dtype_name(arr.dtype) != dtype:
                raise bad(f"tensor {name!r} has dtype {arr.dtype.name}, the model has {dtype}")
            if tuple(arr.shape) != tuple(shape):
                raise bad(
                    f"tensor {name!r} has shape {tuple(arr.shape)}, the model has {tuple(shape)}"
                )
    for name, arr in weights.items():
        if not all_finite(arr):
            raise bad(f"tensor {name!r} holds NaN or infinite values")


def structure_difference(weights: Weights, structure: Structure, most: int = 8) -> str | None:
    """What differs between model ``weights`` and the federation's ``structure``: every
    missing and unexpected tensor name, every shape and dtype that differs (``most`` of
    each kind, then a count), or None when they match. Names are shown escaped (an
    agent's names are attacker-controlled)."""

    def listed(items: list[str]) -> str:
        more = f" (+{len(items) - most} more)" if len(items) > most else ""
        return ", ".join(items[:most]) + more

    def q(name: str) -> str:
        return repr(name[:64])

    expected = {n: (d, tuple(s)) for n, d, s in structure}
    missing = [n for n in expected if n not in weights]
    extra = [n for n in weights if n not in expected]
    shapes: list[str] = []
    dtypes: list[str] = []
    for name, arr in weights.items():
        if name not in expected:
            continue
        dtype, shape = expected[name]
        got_shape = tuple(int(d) for d in arr.shape)
        if got_shape != shape:
            shapes.append(f"{q(name)} {list(got_shape)} (the model's: {list(shape)})")
        got_dtype = dtype_name(arr.dtype)
        if got_dtype != dtype:
            dtypes.append(f"{q(name)} {got_dtype} (the model's: {dtype})")
    problems = []
    if missing:
        problems.append(f"missing tensors: {listed([q(n) for n in missing])}")
    if extra:
        problems.append(f"unexpected tensors: {listed([q(n) for n in extra])}")
    if shapes:
        problems.append(f"other shapes: {listed(shapes)}")
    if dtypes:
        problems.append(f"other dtypes: {listed(dtypes)}")
    return "; ".join(problems) if problems else None


def validate_extra(
    extra: Weights,
    *,
    agent_id: str | None = None,
    round: int | None = None,
    max_tensors: int = 16384,
) -> None:
    """Extra arrays are free-form but must be finite and few enough."""
    if len(extra) > max_tensors:
        raise InvalidUpdate(
            f"{len(extra)} extra arrays exceed the limit of {max_tensors}",
            agent_id=agent_id,
            round=round,
        )
    for name, arr in extra.items():
        if not all_finite(arr):
            raise InvalidUpdate(
                f"extra array {name!r} holds NaN or infinite values", agent_id=agent_id, round=round
            )
