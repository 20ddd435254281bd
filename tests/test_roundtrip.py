"""Pickle, deepcopy, torch.compile and state_dict round trips keep outputs and multipliers."""

from __future__ import annotations

import copy
import io
import pickle
from collections.abc import Callable

import pytest
import torch
from torch import nn

from mflightning import MeanFieldConv2d, MeanFieldLinear, MeanFieldMLP, Normal, param_groups


def _mlp() -> nn.Module:
    return MeanFieldMLP(
        6,
        [16, 8],
        bias=True,
        frozen=("input",),
        init=[Normal(0, 1), Normal(1, 0.5), Normal(0.5, 1)],
    )


def _conv_net() -> nn.Module:
    return nn.Sequential(
        MeanFieldConv2d(3, 8, 3, role="input"),
        nn.ReLU(),
        MeanFieldConv2d(8, 8, 3),
        nn.Tanh(),
        nn.Flatten(),
        MeanFieldLinear(8 * 4 * 4, 1, role="readout"),
    )


CASES: list[tuple[Callable[[], nn.Module], tuple[int, ...]]] = [
    (_mlp, (5, 6)),
    (_conv_net, (2, 3, 8, 8)),
]


def _multipliers(model: nn.Module) -> list[tuple[str, float]]:
    return [(g["name"], g["lr_multiplier"]) for g in param_groups(model, lr=1.0)]


def _pickle(model: nn.Module) -> nn.Module:
    return pickle.loads(pickle.dumps(model))


def _state_dict_round_trip(model: nn.Module) -> nn.Module:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    fresh = copy.deepcopy(model)
    for p in fresh.parameters():
        p.data.zero_()
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    return fresh


@pytest.mark.parametrize(("factory", "shape"), CASES)
@pytest.mark.parametrize("round_trip", [_pickle, copy.deepcopy, _state_dict_round_trip])
def test_round_trips_preserve_outputs_and_multipliers(factory, shape, round_trip) -> None:
    model = factory()
    x = torch.randn(*shape)
    copied = round_trip(model)
    torch.testing.assert_close(copied(x), model(x), rtol=0, atol=0)
    assert _multipliers(copied) == _multipliers(model)
    frozen = [p.requires_grad for p in model.parameters()]
    assert [p.requires_grad for p in copied.parameters()] == frozen


@pytest.mark.parametrize(("factory", "shape"), CASES)
def test_torch_compile_fullgraph_matches_eager(factory, shape) -> None:
    model = factory()
    x = torch.randn(*shape)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-6, atol=1e-6)
    compiled(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_torch_compile_inductor_cpu_matches_eager() -> None:
    model = MeanFieldLinear(32, 16, role="hidden")
    x = torch.randn(4, 32)
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
