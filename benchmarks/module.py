"""``module``: ``Trainer.fit`` of a MeanFieldModule vs the equivalent plain LightningModule.

Both train a d -> N -> N -> 1 ReLU network without biases by plain SGD on the same in-memory
batches for K steps (no logger, progress bar, checkpointing or validation) and log their loss.
Ours adds what ``MeanFieldModule`` always does: the §1.2 param groups, the
``train/accuracy`` metric, ``mf_time`` and its divergence guard. A fresh ``Trainer`` (and a fresh
copy of the initial network) is built, untimed, before every timed ``fit``.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from lightning.pytorch import LightningModule
from torch import Tensor, nn

from benchmarks.common import COMPARISON_COLUMNS, Case, Settings, Table, measure, ratio_row
from benchmarks.fitting import FEATURES, loader, make_trainer, quiet_lightning, regression_data
from mflightning import MeanFieldMLP, MeanFieldModule

TARGET = 1.05
LR = 0.05


class PlainModule(LightningModule):
    """What a user writes without mflightning: ``nn.Linear`` layers, plain SGD, MSE loss."""

    def __init__(self, width: int, lr: float) -> None:
        super().__init__()
        self.network = nn.Sequential(
            nn.Linear(FEATURES, width, bias=False),
            nn.ReLU(),
            nn.Linear(width, width, bias=False),
            nn.ReLU(),
            nn.Linear(width, 1, bias=False),
        )
        self.lr = lr

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """MSE on the batch, logged as ``train/loss``."""
        x, y = batch
        loss = (self.network(x) - y).pow(2).sum(-1).mean()
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        """Plain SGD on all parameters."""
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def fit_case(device: str, build: Any, data: Any, steps: int) -> Case:
    """Time ``Trainer.fit(build(), data)`` for ``steps`` steps; module and Trainer built untimed."""
    state: dict[str, Any] = {}

    def prepare() -> None:
        state["module"] = build()
        state["trainer"] = make_trainer(device, steps)

    def run() -> None:
        state["trainer"].fit(state["module"], data)

    return Case(run, prepare, inner=1)


def run(settings: Settings) -> Table:
    """One row: the fit time of K steps of each module and the ratio."""
    quiet_lightning()
    width, batch, steps = settings.pick((16, 32, 3), (512, 256, 40), (4096, 1024, 100))
    table = Table(
        "module",
        "MeanFieldModule vs plain LightningModule, Trainer.fit for K steps",
        f"ratio <= {TARGET}",
        ["width N", "batch", "K steps", "ours ms/step", "baseline ms/step", *COMPARISON_COLUMNS],
    )
    x, y = regression_data(batch * steps, settings.device)
    data = loader(x, y, batch)
    network = MeanFieldMLP(FEATURES, [width, width]).to(settings.device)
    plain = PlainModule(width, LR).to(settings.device)
    cases = {
        "ours": fit_case(
            settings.device,
            lambda: MeanFieldModule(copy.deepcopy(network), lr=LR, loss="mse"),
            data,
            steps,
        ),
        "base": fit_case(settings.device, lambda: copy.deepcopy(plain), data, steps),
    }
    times = measure(cases, settings)
    table.add(
        **{"width N": width, "batch": batch, "K steps": steps},
        **{"ours ms/step": times["ours"] / steps, "baseline ms/step": times["base"] / steps},
        **ratio_row(times["ours"], times["base"], TARGET),
    )
    table.notes.append("ours/baseline ms: the whole Trainer.fit call (K steps plus fit set-up).")
    return table
