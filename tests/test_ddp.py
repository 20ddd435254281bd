"""DDP on CPU (gloo, 2 processes) gives the single-process run on the same global batches."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import Callback, Trainer

from mflightning import MeanFieldMLP, MeanFieldModule, Normal
from mflightning.callbacks import LimitTracker
from mflightning.data import IsotropicGaussians

LAWS = [Normal(0.0, 1.0), Normal(1.0, 0.5), Normal(0.5, 1.0)]
STEPS = 4


class SaveRankState(Callback):
    """Writes each rank's weights, solver particles, gaps and param groups to ``folder``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def on_train_end(self, trainer: Trainer, pl_module: Any) -> None:
        tracker = next(c for c in trainer.callbacks if isinstance(c, LimitTracker))
        groups = [
            (g["name"], g["lr"], g["lr_multiplier"]) for g in trainer.optimizers[0].param_groups
        ]
        state = {
            "weights": {k: v.clone() for k, v in pl_module.network.state_dict().items()},
            "particles": tracker.solver.state_dict()["particles"],
            "solver_steps": tracker.solver.steps,
            "gaps": tracker.last_gaps,
            "groups": groups,
        }
        torch.save(state, self.folder / f"rank{trainer.global_rank}.pt")


def _fit(folder: Path, **trainer_kwargs: Any) -> None:
    torch.manual_seed(0)
    net = MeanFieldMLP(10, [16, 16], activations=["relu", "tanh", "identity"], init=LAWS)
    module = MeanFieldModule(net, lr=0.1, loss="half_mse")
    data = IsotropicGaussians(n_train=64, n_val=16, seed=3)  # full batch: 32 rows per rank
    tracker = LimitTracker(particles=64, every_n_steps=2, probe=data.val_set.tensors)
    trainer = Trainer(
        accelerator="cpu", max_steps=STEPS, precision="64-true", logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, callbacks=[tracker, SaveRankState(folder)], **trainer_kwargs,
    )  # fmt: skip
    trainer.fit(module, data)


def test_ddp_matches_one_process_on_the_same_global_batches(tmp_path: Path) -> None:
    _fit(tmp_path, devices=1)
    single = torch.load(tmp_path / "rank0.pt", weights_only=True)
    (tmp_path / "ddp").mkdir()
    _fit(tmp_path / "ddp", devices=2, strategy="ddp_fork")  # spawned ranks re-import lightning
    ranks = [torch.load(tmp_path / "ddp" / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for rank in ranks:
        assert rank["solver_steps"] == STEPS  # one solver step per global step
        assert rank["groups"] == single["groups"]  # same multipliers and lrs on every rank
        for key in ("weights", "particles"):
            for name, value in single[key].items():
                torch.testing.assert_close(rank[key][name], value, rtol=0, atol=1e-6)
        assert rank["gaps"].keys() == single["gaps"].keys()
        for name, value in single["gaps"].items():
            assert rank["gaps"][name] == pytest.approx(value, abs=1e-6)
    assert single["gaps"]["limit/output_gap"] > 1e-3  # a width-16 network: the gaps are not 0
