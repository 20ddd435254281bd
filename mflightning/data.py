"""Synthetic data modules.

``IsotropicGaussians`` is the classification task of mf-theory.md §D.1/§D.3 (Mei–Montanari–Nguyen):
``y = +1`` or ``-1`` with probability 1/2 each, and ``x ~ N(0, (1 + y * delta)^2 I_d)``.
"""

from __future__ import annotations

from typing import Literal

import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from mflightning.nn import check_positive_int

Target = Literal["pm1", "class"]


def isotropic_gaussians(
    n: int, dim: int, delta: float, generator: torch.Generator, target: Target = "pm1"
) -> tuple[Tensor, Tensor]:
    """Draw ``n`` points ``(x, y)``: ``y = ±1``, ``x ~ N(0, (1 + y*delta)^2 I_dim)``.

    Returns ``y`` as float ±1 (``target="pm1"``, for squared losses) or as long 0/1 class indices
    (``target="class"``, for cross-entropy).
    """
    sign = torch.randint(0, 2, (n,), generator=generator) * 2 - 1
    x = torch.randn(n, dim, generator=generator) * (1 + delta * sign).unsqueeze(1)
    y = sign.float() if target == "pm1" else (sign > 0).long()
    return x, y


class IsotropicGaussians(LightningDataModule):
    """The isotropic-Gaussians task as a LightningDataModule (fixed train/val sets).

    Args:
        dim: input dimension d.
        delta: variance contrast, ``0 <= delta < 1``.
        n_train: training set size P (the population of the full-batch limit).
        n_val: validation set size.
        batch_size: minibatch size; ``None`` is full batch (gradient descent on the P points).
        target: ``"pm1"`` (±1 labels for squared losses) or ``"class"`` (0/1 for cross-entropy).
        seed: seed of the data draw and of the shuffling order.
    """

    def __init__(
        self,
        dim: int = 10,
        delta: float = 0.4,
        n_train: int = 256,
        n_val: int = 512,
        batch_size: int | None = None,
        target: Target = "pm1",
        seed: int = 0,
    ) -> None:
        super().__init__()
        for name, value in (("dim", dim), ("n_train", n_train), ("n_val", n_val)):
            check_positive_int(name, value)
        if batch_size is not None:
            check_positive_int("batch_size", batch_size)
        if not 0 <= delta < 1:
            raise ValueError(f"`delta` must satisfy 0 <= delta < 1, got {delta}.")
        if target not in ("pm1", "class"):
            raise ValueError(f"`target` must be 'pm1' or 'class', got {target!r}.")
        self.save_hyperparameters()
        generator = torch.Generator().manual_seed(seed)
        self.train_set = TensorDataset(*isotropic_gaussians(n_train, dim, delta, generator, target))
        self.val_set = TensorDataset(*isotropic_gaussians(n_val, dim, delta, generator, target))
        self.batch_size = batch_size or n_train
        self.seed = seed

    def train_dataloader(self) -> DataLoader[tuple[Tensor, ...]]:
        """Full batch in a fixed order, or seeded shuffled minibatches."""
        full_batch = self.batch_size >= len(self.train_set)
        return DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            shuffle=not full_batch,
            generator=torch.Generator().manual_seed(self.seed),
        )

    def val_dataloader(self) -> DataLoader[tuple[Tensor, ...]]:
        """The validation set in one batch."""
        return DataLoader(self.val_set, batch_size=len(self.val_set))
