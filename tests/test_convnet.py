"""MeanFieldConvNet: formula, multipliers, coupled limit, tracker and sweeps (§E.3 item 18)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import coupled_output_gaps, loglog_slope, single_thread
from lightning.pytorch import LightningDataModule, Trainer
from torch.utils.data import DataLoader, TensorDataset

from mflightning import (
    LimitTracker,
    MeanFieldConvNet,
    MeanFieldModule,
    Normal,
    ParticleLimitSolver,
)
from mflightning.config import build
from mflightning.io import read_json
from mflightning.sweep import SweepSettings, WidthSweep

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


# --- LimitTracker and width sweeps on a conv net, end to end (issue 21 item 7) -------------------


class SmallImages(LightningDataModule):
    """48 one-channel 6x6 images: the sign of the mean of their central 2x2 pixels.

    32 training images in two minibatches of 16, 16 validation images (the probe).
    """

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        x = torch.randn(48, 1, 6, 6, generator=g)
        y = torch.sign(x[:, 0, 2:4, 2:4].mean(dim=(-2, -1)))[:, None]
        self.train_set = TensorDataset(x[:32], y[:32])
        self.val_set = TensorDataset(x[32:], y[32:])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=16)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=16)


def _conv_module(channels: int) -> MeanFieldModule:
    activations = ["relu", "tanh", "identity"]
    net = MeanFieldConvNet(1, [channels, channels], out_features=1, activations=activations)
    return MeanFieldModule(net, lr=0.2, loss="half_mse")


def test_tracker_and_sweep_follow_a_conv_net_to_the_same_limit(tmp_path: Path) -> None:
    """A conv sweep (widths 8 and 16, 2 seeds, M = 128 channels) and a ``LimitTracker``.

    The tracker builds the sweep's solver (same M, seed 0) and couples with the seed-0 index
    sets, so on the same batches it must log the gaps of the sweep's run N8-seed0
    (docs/theory.md §B.4, §C.1-§C.3).
    """
    steps, settings = 4, SweepSettings(
        widths=[8, 16], seeds=2, particles=128, every_n_steps=1, probe_size=16,
        out=str(tmp_path / "sweep"), wandb="disabled",
    )  # fmt: skip
    with single_thread():
        report = WidthSweep(_conv_module(8), SmallImages(), steps, settings, name="conv").run()
        assert report["fitted_widths"] == [8, 16] and not report["diverged_runs"]
        layers = {"layer1", "layer2", "layer3"}
        assert set(report["per_width"]["8"]["dev_median"]) == layers
        assert {f"dev/{layer}" for layer in layers} < set(report["slopes"])
        swept = read_json(tmp_path / "sweep" / "runs" / "N8-seed0.json")["result"]["history"]

        probe = SmallImages().val_set.tensors
        tracker = LimitTracker(particles=128, every_n_steps=1, probe=probe, seed=0)
        module = _conv_module(8)
        Trainer(
            max_steps=steps, callbacks=[tracker], logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        ).fit(module, SmallImages())  # fmt: skip
    final = swept[-1]
    assert final["step"] == steps
    for key in ("limit/output_gap", "limit/loss_gap", *(f"limit/dev/{la}" for la in layers)):
        assert tracker.last_gaps[key] == pytest.approx(final[key], rel=1e-5), key
    assert tracker.last_gaps["limit/time"] == pytest.approx(module.mf_time)
