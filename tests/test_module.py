"""MeanFieldModule: training with MF groups, logging against mf_time, guards, checkpoints."""

from __future__ import annotations

import csv
import functools
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from mflightning import (
    MeanFieldLinear,
    MeanFieldMLP,
    MeanFieldModule,
    Normal,
    TrivialLimitWarning,
)
from mflightning.data import IsotropicGaussians
from mflightning.optim import LimitChangingOptimizerWarning


def _trainer(tmp_path: Path, **kwargs) -> Trainer:
    defaults = dict(
        default_root_dir=tmp_path,
        accelerator="cpu",
        devices=1,
        max_steps=6,
        logger=CSVLogger(tmp_path),
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        check_val_every_n_epoch=3,
    )
    return Trainer(**(defaults | kwargs))


def _net(**kwargs) -> MeanFieldMLP:
    return MeanFieldMLP(10, [32, 32], activations=["relu", "tanh", "identity"], **kwargs)


def _read_metrics(tmp_path: Path) -> list[dict[str, str]]:
    (path,) = tmp_path.glob("**/metrics.csv")
    with path.open() as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("every", [1, 2])
def test_fit_logs_loss_accuracy_and_mf_time(tmp_path: Path, every: int) -> None:
    module = MeanFieldModule(_net(), lr=0.05, loss="half_mse")
    trainer = _trainer(tmp_path, check_val_every_n_epoch=1, log_every_n_steps=every)
    trainer.fit(module, IsotropicGaussians(n_train=64, n_val=32, batch_size=16))
    rows = _read_metrics(tmp_path)
    train = [r for r in rows if r.get("train/loss")]
    assert len(train) == 6 // every
    for row in train:  # mf_time is written with every logged step, never a stale value
        assert float(row["mf_time"]) == pytest.approx(int(row["step"]) * 0.05)
    assert any(r.get("val/loss") for r in rows) and any(r.get("val/accuracy") for r in rows)
    assert any(r.get("train/accuracy") for r in rows)
    assert module.mf_time == pytest.approx(6 * 0.05)


class _StopAfter(Callback):
    """Stops training in ``on_train_batch_end`` of the given batch (as Timer or a user would)."""

    def __init__(self, batch_idx: int) -> None:
        self.batch_idx = batch_idx

    def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
        if args[-1] == self.batch_idx:
            trainer.should_stop = True


@pytest.mark.parametrize(
    "every",
    [
        2,
        pytest.param(  # an interval longer than the epoch is the point: Lightning says so
            50, marks=pytest.mark.filterwarnings("ignore:The number of training batches")
        ),
    ],
)
def test_mf_time_is_current_when_a_callback_stops_mid_interval(tmp_path: Path, every: int) -> None:
    """A stop between two logging steps makes Lightning write that step: mf_time must be in it."""
    module = MeanFieldModule(_net(), lr=0.05, loss="half_mse")
    trainer = _trainer(tmp_path, log_every_n_steps=every, callbacks=[_StopAfter(2)])
    trainer.fit(module, IsotropicGaussians(n_train=64, n_val=32, batch_size=8))
    train = [r for r in _read_metrics(tmp_path) if r.get("train/loss")]
    assert train and int(train[-1]["step"]) == 2
    for row in train:
        assert float(row["mf_time"]) == pytest.approx(int(row["step"]) * 0.05)


def test_training_applies_the_multiplied_learning_rates(tmp_path: Path) -> None:
    module = MeanFieldModule(_net(bias=True), lr=0.1)
    trainer = _trainer(tmp_path, max_steps=1)
    trainer.fit(module, IsotropicGaussians(n_train=32, n_val=8))
    groups = trainer.optimizers[0].param_groups
    lrs = {g["name"]: g["lr"] for g in groups}
    assert lrs["mf/layer2"] == pytest.approx(0.1 * 32 * 32)
    assert lrs["mf/layer2/bias"] == pytest.approx(0.1 * 32)
    assert lrs["mf/layer3/bias"] == pytest.approx(0.1)


def test_frozen_layers_never_change(tmp_path: Path) -> None:
    net = _net(frozen=("input", "readout"))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    module = MeanFieldModule(net, lr=0.5, preset="araujo_oliveira_yukimura")
    _trainer(tmp_path).fit(module, IsotropicGaussians(n_train=64, n_val=16))
    after = net.state_dict()
    assert torch.equal(after["layer1.weight"], before["layer1.weight"])
    assert torch.equal(after["layer3.weight"], before["layer3.weight"])
    assert not torch.equal(after["layer2.weight"], before["layer2.weight"])


def test_cross_entropy_with_several_classes(tmp_path: Path) -> None:
    net = MeanFieldMLP(10, [16, 16], out_features=2)
    module = MeanFieldModule(net, lr=0.1, loss="cross_entropy")
    _trainer(tmp_path, max_steps=2).fit(
        module, IsotropicGaussians(n_train=32, n_val=8, target="class")
    )
    assert any(r.get("train/accuracy") for r in _read_metrics(tmp_path))


@pytest.mark.parametrize("precision", ["bf16-true", "16-true"])
def test_half_precision_weights_are_refused(tmp_path: Path, precision: str) -> None:
    module = MeanFieldModule(_net(), lr=0.1)
    with pytest.raises(ValueError, match="precision='32-true'"):
        _trainer(tmp_path, precision=precision).fit(module, IsotropicGaussians(n_train=16, n_val=8))


def test_optimizer_override_that_bypasses_the_groups_is_refused(tmp_path: Path) -> None:
    module = MeanFieldModule(_net(), lr=0.1)
    # what LightningCLI's automatic optimizer does with a top-level `optimizer:` entry
    module.configure_optimizers = lambda: torch.optim.SGD(module.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"model: \{optimizer: \{class_path"):
        _trainer(tmp_path).fit(module, IsotropicGaussians(n_train=16, n_val=8))


def test_adaptive_optimizer_needs_the_adam_rule(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="rule='adam'"):  # refused when the module is built
        MeanFieldModule(_net(), lr=1e-3, optimizer=torch.optim.Adam)
    adam = MeanFieldModule(_net(), lr=1e-3, optimizer=torch.optim.Adam, rule="adam")
    with pytest.warns(LimitChangingOptimizerWarning):
        _trainer(tmp_path, max_steps=1).fit(adam, IsotropicGaussians(n_train=16, n_val=8))


def test_construction_warns_about_trivial_deep_limits_once() -> None:
    """The network warns when it is built (plain PyTorch too); the module does not repeat it."""
    with pytest.warns(TrivialLimitWarning, match="zero-mean"):
        zero_mean = _net(init=[Normal(0, 1), Normal(0, 1), Normal(0, 1)])
    with pytest.warns(TrivialLimitWarning, match="odd first activation"):
        odd = MeanFieldMLP(10, [8, 8, 8], activations="tanh")
    with warnings.catch_warnings():
        warnings.simplefilter("error", TrivialLimitWarning)
        MeanFieldModule(zero_mean)
        MeanFieldModule(odd)
        MeanFieldModule(_net())
    layers = nn.Sequential(  # no MeanFieldStack to warn: the module checks the layers
        MeanFieldLinear(10, 8, role="input"),
        MeanFieldLinear(8, 8, role="hidden", init=Normal(0, 1)),
        MeanFieldLinear(8, 1, role="readout"),
    )
    with pytest.warns(TrivialLimitWarning, match="zero-mean"):
        MeanFieldModule(layers)


def test_checkpoint_rebuilds_the_model_without_rescaling(tmp_path: Path) -> None:
    module = MeanFieldModule(_net(bias=True), lr=0.1, loss="half_mse")
    trainer = _trainer(tmp_path, max_steps=3)
    trainer.fit(module, IsotropicGaussians(n_train=32, n_val=8))
    path = tmp_path / "final.ckpt"
    trainer.save_checkpoint(path)
    raw = torch.load(path, weights_only=True)  # plain data only: safe to load
    assert raw["hyper_parameters"]["network"]["class_path"] == "mflightning.mlp.MeanFieldMLP"
    loaded = MeanFieldModule.load_from_checkpoint(path)
    for key, value in module.network.state_dict().items():
        assert torch.equal(loaded.network.state_dict()[key], value), key  # never rescaled
    x = torch.randn(7, 10)
    torch.testing.assert_close(loaded(x), module(x), rtol=0, atol=0)
    assert [m.lr_multiplier for m in loaded.network.layers] == [
        m.lr_multiplier for m in module.network.layers
    ]
    assert loaded.loss_name == "half_mse" and loaded.time_step == 0.1


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"loss": "l1"}, "loss"),
        ({"lr": 0}, "lr"),
        ({"rule": "lion"}, "rule"),
        ({"preset": "ntk"}, "preset"),
        ({"network": "mlp"}, "network"),
        ({"optimizer": 3}, "optimizer"),
    ],
)
def test_bad_module_arguments(kwargs: dict, argument: str) -> None:
    args = {"network": _net()} | kwargs
    with pytest.raises(ValueError, match=f"`{argument}`"):
        MeanFieldModule(**args)


def test_callable_init_law_needs_the_network_on_reload(tmp_path: Path) -> None:
    law = functools.partial(torch.nn.init.uniform_, a=-1.0, b=1.0)
    net = MeanFieldMLP(10, [16, 16], init=[law, Normal(1, 0.5), Normal(0, 1)])
    with pytest.warns(UserWarning, match="plain-data config"):
        module = MeanFieldModule(net, lr=0.1)
    trainer = _trainer(tmp_path, max_steps=1)
    trainer.fit(module, IsotropicGaussians(n_train=16, n_val=8))
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    with pytest.warns(UserWarning, match="plain-data config"):  # the reload says it again
        loaded = MeanFieldModule.load_from_checkpoint(
            tmp_path / "m.ckpt", network=net.with_widths([16, 16])
        )
    x = torch.randn(3, 10)
    torch.testing.assert_close(loaded(x), module(x), rtol=0, atol=0)
