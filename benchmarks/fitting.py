"""Data and ``Trainer`` helpers shared by the ``module``, ``solver`` and ``tracker`` benchmarks."""

from __future__ import annotations

import logging
import warnings

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler, TensorDataset

FEATURES = 10  # d, the input dimension of the solver benchmark


def regression_data(
    points: int, device: str, dtype: torch.dtype = torch.float32, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """``points`` Gaussian inputs in ``R^d`` and the targets ``tanh(<x, beta>)``, shape (P, 1)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(points, FEATURES, generator=generator, dtype=torch.float64)
    beta = torch.randn(FEATURES, 1, generator=generator, dtype=torch.float64) / FEATURES**0.5
    return x.to(device, dtype), torch.tanh(x @ beta).to(device, dtype)


def loader(x: Tensor, y: Tensor, batch_size: int) -> DataLoader[tuple[Tensor, ...]]:
    """The in-memory data in fixed order (same batches for every case), no workers.

    Each batch is one gather per tensor (a batch sampler over the ``TensorDataset``), not
    ``batch_size`` single-row reads and a collate, so loading stays negligible on a GPU.
    """
    batches = BatchSampler(SequentialSampler(range(len(x))), batch_size, drop_last=False)
    return DataLoader(TensorDataset(x, y), batch_size=None, sampler=batches)


def quiet_lightning() -> None:
    """Silence Lightning's per-``Trainer`` banners and the data-loader worker hint."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*GPU available but not used.*")
    warnings.filterwarnings("ignore", message=".*have no `val_dataloader`.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")


def make_trainer(device: str, steps: int, callbacks: list[pl.Callback] | None = None) -> pl.Trainer:
    """A bare ``Trainer`` for ``steps`` optimizer steps: no logger, progress bar or checkpoints."""
    return pl.Trainer(
        accelerator="gpu" if torch.device(device).type == "cuda" else "cpu",
        devices=1,
        max_steps=steps,
        precision="32-true",
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=callbacks or [],
    )
