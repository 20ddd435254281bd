"""SeedBatch: S networks trained as one vmapped model equal S separate SGD runs (§1.2)."""

from __future__ import annotations

import copy

import pytest
import torch

from mflightning import MeanFieldConvNet, MeanFieldMLP, Normal, param_groups
from mflightning.batched import SeedBatch
from mflightning.losses import mean_field_loss

pytestmark = pytest.mark.usefixtures("float64_default")


def _separate_runs(networks, x, y, loss, steps):
    runs = [copy.deepcopy(n) for n in networks]
    optimizers = [torch.optim.SGD(param_groups(n, lr=0.1)) for n in runs]
    for _ in range(steps):
        for net, opt in zip(runs, optimizers, strict=True):
            opt.zero_grad()
            mean_field_loss(loss, net(x), y).backward()
            opt.step()
    return runs


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_seed_batch_equals_separate_sgd_runs(kind: str) -> None:
    g = torch.Generator().manual_seed(0)
    if kind == "mlp":
        networks = [
            MeanFieldMLP(
                6,
                [24, 16],
                bias=True,
                frozen=("readout",),
                activations=["relu", "tanh", "identity"],
                generator=torch.Generator().manual_seed(s),
            )
            for s in range(3)
        ]
        x = torch.randn(32, 6, generator=g)
    else:
        laws = [Normal(0, 1), Normal(1, 0.5), Normal(0, 1)]
        networks = [
            MeanFieldConvNet(
                1, [6, 6], out_features=1, init=laws, generator=torch.Generator().manual_seed(s)
            )
            for s in range(3)
        ]
        x = torch.randn(16, 1, 5, 5, generator=g)
    y = torch.sign(torch.randn(len(x), generator=g))
    batch = SeedBatch(networks, lr=0.1, loss="half_mse")
    losses = [batch.step(x, y) for _ in range(5)]
    runs = _separate_runs(networks, x, y, "half_mse", 5)
    for s, run in enumerate(runs):
        for name, param in run.named_parameters():
            torch.testing.assert_close(
                batch.params[name][s], param.detach(), rtol=1e-12, atol=1e-12
            )
        torch.testing.assert_close(batch.network(s)(x), run(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(batch.outputs(x)[1], runs[1](x).detach(), rtol=1e-12, atol=1e-12)
    assert losses[0].shape == (3,)
    if kind == "mlp":  # the frozen readout never moves
        assert torch.equal(batch.params["layer3.weight"][0], networks[0].layer3.weight)


def test_seed_batch_refuses_mismatched_networks() -> None:
    with pytest.raises(ValueError, match="`networks`"):
        SeedBatch([MeanFieldMLP(4, [8]), MeanFieldMLP(4, [16])], lr=0.1, loss="mse")
    with pytest.raises(ValueError, match="`networks`"):
        SeedBatch([], lr=0.1, loss="mse")
