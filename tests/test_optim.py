"""Plain-PyTorch optimizers: mflightning.optim.SGD/Adam, and param groups that carry their rule."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mflightning as mfl
from mflightning import MeanFieldMLP, param_groups
from mflightning.optim import LimitChangingOptimizerWarning


def _net_with_grads() -> tuple[MeanFieldMLP, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """A 4 -> 8 -> 8 -> 1 network with gradients, and float64 copies of weights and gradients."""
    net = MeanFieldMLP(4, [8, 8], generator=torch.Generator().manual_seed(0))
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
    (net(x) ** 2).mean().backward()
    weights = {n: p.detach().double().numpy().copy() for n, p in net.named_parameters()}
    grads = {n: p.grad.double().numpy().copy() for n, p in net.named_parameters()}  # type: ignore[union-attr]
    return net, weights, grads


def test_sgd_moves_every_weight_by_lr_times_n_in_n_out() -> None:
    net, weights, grads = _net_with_grads()
    optimizer = mfl.optim.SGD(net, lr=0.05)
    assert isinstance(optimizer, torch.optim.SGD)
    assert {g["rule"] for g in optimizer.param_groups} == {"sgd"}
    optimizer.step()
    multipliers = {"layer1.weight": 1 * 8, "layer2.weight": 8 * 8, "layer3.weight": 8 * 1}
    for name, param in net.named_parameters():
        expected = weights[name] - 0.05 * multipliers[name] * grads[name]  # docs/theory.md §1.2
        np.testing.assert_allclose(param.detach().double().numpy(), expected, rtol=1e-6, atol=1e-7)


def test_adam_keeps_the_lr_divides_eps_and_warns_that_the_limit_changes() -> None:
    net, _, _ = _net_with_grads()
    with pytest.warns(LimitChangingOptimizerWarning, match="Adam"):
        optimizer = mfl.optim.Adam(net, lr=0.01, eps=1e-6)
    assert isinstance(optimizer, torch.optim.Adam)
    lrs = {g["name"]: (g["lr"], g["eps"], g["rule"]) for g in optimizer.param_groups}
    assert lrs == {
        "mf/layer1": (0.01, 1e-6 / 8, "adam"),
        "mf/layer2": (0.01, 1e-6 / 64, "adam"),
        "mf/layer3": (0.01, 1e-6 / 8, "adam"),
    }
    optimizer.step()


def test_a_torch_optimizer_of_the_other_rule_is_refused_at_its_first_step() -> None:
    net, weights, _ = _net_with_grads()
    adam = torch.optim.Adam(param_groups(net, lr=0.01))  # SGD rule: hidden lr 0.01 * 64
    with pytest.raises(ValueError, match=r"`optimizer` Adam .*rule='sgd'.*mf/layer2 has lr=0\.64"):
        adam.step()
    for name, param in net.named_parameters():  # refused before any update
        np.testing.assert_array_equal(param.detach().double().numpy(), weights[name])
    sgd = torch.optim.SGD(param_groups(net, lr=0.01, rule="adam"))
    with pytest.raises(ValueError, match=r"`optimizer` SGD .*rule='adam'.*mflightning.optim.SGD"):
        sgd.step()
    torch.optim.SGD(param_groups(net, lr=0.01)).step()  # the matching rule steps
    torch.optim.Adam(net.parameters(), lr=0.01).step()  # groups without a rule are not checked
