"""MeanFieldConvNet: forward formula, channel multipliers, and its coupled limit (§E.3 item 18)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import coupled_output_gaps, loglog_slope

from mflightning import MeanFieldConvNet, MeanFieldModule, Normal, ParticleLimitSolver
from mflightning.config import build

LAWS = [Normal(0.0, 1.0), Normal(1.0, 0.5), Normal(0.0, 1.0)]


def _net(channels: int, **kwargs) -> MeanFieldConvNet:
    return MeanFieldConvNet(
        1,
        [channels, channels],
        out_features=1,
        kernel_size=3,
        activations=["relu", "tanh", "identity"],
        init=LAWS,
        **kwargs,
    )


@pytest.mark.usefixtures("float64_default")
def test_forward_matches_the_formula() -> None:
    net = _net(5, bias=True, bias_init=Normal(0.2, 0.1))
    x = torch.randn(2, 1, 6, 6)
    l1, l2, l3 = net.layers
    h1 = F.conv2d(x, l1.weight, padding=1) + l1.bias.view(1, -1, 1, 1)
    h2 = F.conv2d(torch.relu(h1), l2.weight, padding=1) / 5 + l2.bias.view(1, -1, 1, 1)
    pooled = torch.tanh(h2).mean(dim=(-2, -1))
    expected = pooled @ l3.weight.T / 5 + l3.bias
    torch.testing.assert_close(net(x), expected, rtol=1e-12, atol=1e-12)
    assert [layer.lr_multiplier for layer in net.layers] == [5, 25, 5]
    rows = net.hidden_preactivations(x)
    assert rows[0].shape == (2 * 36, 5) and rows[-1].shape == (2, 1)


def test_with_widths_config_and_module() -> None:
    net = _net(4, frozen=("readout",))
    wide = net.with_widths([16, 8])
    assert wide.widths == [16, 8] and wide.layer3.frozen
    assert build(net.to_config()).to_config() == net.to_config()
    MeanFieldModule(net, lr=0.1)  # builds, with a plain-data config for checkpoints


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [({"kernel_size": 2}, "kernel_size"), ({"in_channels": 0}, "in_channels")],
)
def test_bad_convnet_arguments(kwargs: dict, argument: str) -> None:
    args = {"in_channels": 1, "channels": [4, 4]} | kwargs
    with pytest.raises(ValueError, match=f"`{argument}`"):
        MeanFieldConvNet(**args)


def test_coupled_output_gap_shrinks_with_the_channel_count() -> None:
    """Coupling by channel subsampling (§B.4): per-seed RMS output gap ~ C^{-1/2}.

    24 seeds: the slope's seed noise is about 0.1 (-0.41 to -0.68 over five data seeds).
    """
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 1, 6, 6, generator=g, dtype=torch.float64)
    y = torch.sign(
        x[:, 0, 2:4, 2:4].mean(dim=(-2, -1))
        + 0.1 * torch.randn(48, generator=g, dtype=torch.float64)
    )
    probe = torch.randn(64, 1, 6, 6, generator=g, dtype=torch.float64)
    channels, seeds, steps, lr = [4, 8, 16, 32], 24, 10, 0.2
    solver = ParticleLimitSolver(
        _net(128, generator=torch.Generator().manual_seed(1)), lr=lr, loss="half_mse"
    )
    rms = coupled_output_gaps(solver, channels, seeds, (x, y), probe, steps)
    slope = loglog_slope(channels, rms)
    assert -0.8 <= slope <= -0.3, (rms, slope)
