"""Tests for fedstack.agent.adapters.torch: state_dict <-> Weights."""

from __future__ import annotations

import warnings
from typing import cast

import numpy as np
import pytest
import torch
from torch import nn

from fedstack.agent.adapters.torch import module_to_weights, weights_to_module
from fedstack.errors import InvalidUpdate


def make_net(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def linear(net: nn.Sequential, index: int) -> nn.Linear:
    """Layer ``index`` of a :func:`make_net` network (a linear layer)."""
    return cast(nn.Linear, net[index])


def trained_net(seed: int = 0) -> nn.Sequential:
    net = make_net(seed)
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(16, 4))  # updates running stats and num_batches_tracked
    return net


def test_weights_are_the_state_dict_with_dtypes() -> None:
    net = trained_net()
    weights = module_to_weights(net)
    state = net.state_dict()
    assert list(weights) == list(state)
    for name, tensor in state.items():
        assert isinstance(weights[name], np.ndarray)
        assert weights[name].dtype == tensor.numpy().dtype
        assert np.array_equal(weights[name], tensor.numpy())
    assert weights["1.num_batches_tracked"].dtype == np.int64
    assert int(weights["1.num_batches_tracked"]) == 3
    assert weights["0.weight"].dtype == np.float32


def test_weights_share_no_memory_with_the_module() -> None:
    net = trained_net()
    weights = module_to_weights(net)
    before = weights["0.weight"].copy()
    with torch.no_grad():
        linear(net, 0).weight.add_(1.0)
    assert np.array_equal(weights["0.weight"], before)
    weights["0.bias"][:] = 42.0
    assert not torch.any(linear(net, 0).bias == 42.0)


def test_round_trip_into_a_differently_initialised_module() -> None:
    source = trained_net(seed=0)
    target = make_net(seed=1)
    assert not torch.equal(linear(source, 0).weight, linear(target, 0).weight)
    weights_to_module(target, module_to_weights(source))
    for (name, a), (_, b) in zip(
        source.state_dict().items(), target.state_dict().items(), strict=True
    ):
        assert a.dtype == b.dtype, name
        assert torch.equal(a, b), name
    tracked = cast(nn.BatchNorm1d, target[1]).num_batches_tracked
    assert tracked is not None and int(tracked) == 3
    source.eval()
    target.eval()
    x = torch.randn(5, 4)
    assert torch.equal(source(x), target(x))


def test_loads_in_place_keeping_parameter_objects() -> None:
    net = make_net(seed=0)
    param = linear(net, 0).weight
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    weights = module_to_weights(trained_net(seed=3))
    weights_to_module(net, weights)
    assert linear(net, 0).weight is param
    assert optimizer.param_groups[0]["params"][0] is param
    assert np.array_equal(param.detach().numpy(), weights["0.weight"])


def test_accepts_read_only_and_float64_arrays() -> None:
    net = make_net(seed=0)
    weights = {
        k: v.astype(np.float64) if v.dtype == np.float32 else v
        for k, v in module_to_weights(trained_net(seed=2)).items()
    }
    for array in weights.values():
        array.setflags(write=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        weights_to_module(net, weights)
    assert linear(net, 0).weight.dtype == torch.float32
    assert np.allclose(linear(net, 0).weight.detach().numpy(), weights["0.weight"])


def test_strict_lists_missing_unexpected_and_mismatched_names() -> None:
    net = make_net(seed=0)
    before = module_to_weights(net)
    weights = module_to_weights(trained_net(seed=1))
    del weights["3.bias"]
    weights["extra.weight"] = np.zeros(2, dtype=np.float32)
    weights["0.weight"] = np.zeros((8, 5), dtype=np.float32)
    with pytest.raises(InvalidUpdate) as info:
        weights_to_module(net, weights)
    message = str(info.value)
    assert "missing: 3.bias" in message
    assert "unexpected: extra.weight" in message
    assert "0.weight (model (8, 4), got (8, 5))" in message
    # Nothing was loaded.
    after = module_to_weights(net)
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_strict_rejects_a_single_missing_buffer() -> None:
    weights = module_to_weights(trained_net())
    del weights["1.num_batches_tracked"]
    with pytest.raises(InvalidUpdate, match="missing: 1.num_batches_tracked"):
        weights_to_module(make_net(seed=0), weights)


def test_non_strict_skips_missing_and_unexpected_names() -> None:
    net = make_net(seed=0)
    original_bias = linear(net, 3).bias.detach().clone()
    weights = module_to_weights(trained_net(seed=1))
    del weights["3.bias"]
    weights["extra.weight"] = np.zeros(2, dtype=np.float32)
    weights_to_module(net, weights, strict=False)
    assert np.array_equal(linear(net, 0).weight.detach().numpy(), weights["0.weight"])
    assert torch.equal(linear(net, 3).bias, original_bias)


def test_non_strict_still_rejects_shape_mismatch() -> None:
    weights = module_to_weights(trained_net())
    weights["3.weight"] = np.zeros((3, 9), dtype=np.float32)
    with pytest.raises(InvalidUpdate, match="shape mismatch: 3.weight"):
        weights_to_module(make_net(seed=0), weights, strict=False)
