"""Divergence guard: stop training at the first non-finite loss, with the step and a hint.

A too-large lr in the mean-field regime (multipliers up to ``n_in * n_out``) blows the weights up
within a few steps; the loss then turns ``inf``/``nan`` and every later step is wasted (or, worse,
checkpointed). ``DivergenceGuard``, which ``MeanFieldModule`` adds to every
Trainer, raises ``DivergenceError`` before the backward pass of the first non-finite loss, so
no non-finite weights are ever stepped to or saved: the last checkpoint written is a good one.
The limit solvers raise the same error when their own loss turns non-finite.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

HINT = (
    "lower the lr, or check the multiplier preset (`preset`, `rule`: the per-layer lrs are "
    "lr times n_in*n_out, see the param-group table at fit start)."
)


class DivergenceError(RuntimeError):
    """Training (or the limit solver) produced a non-finite loss: the run has diverged."""


def update_sizes(
    optimizer: Optimizer, grads: Sequence[Sequence[Tensor]] | None = None
) -> dict[str, Tensor]:
    """Size of the SGD update of each param group, ``lr * RMS(grad)``, as 0-d tensors.

    Args:
        optimizer: whose param groups (names, lrs) are measured.
        grads: the gradients of each group; by default the parameters' current ``.grad``.

    Computed on the gradients' device without synchronising and without copies (one fused read
    of each gradient, like the optimizer's own step); an overflowing norm reads ``inf``, which
    counts as the largest. Groups without gradients are left out; unnamed groups are called
    ``group<i>``.
    """
    if grads is None:
        groups = optimizer.param_groups
        grads = [[p.grad for p in g["params"] if p.grad is not None] for g in groups]
    sizes = {}
    for i, (group, group_grads) in enumerate(zip(optimizer.param_groups, grads, strict=True)):
        if group_grads:
            norm = torch.nn.utils.get_total_norm([g.detach() for g in group_grads])
            count = sum(g.numel() for g in group_grads)
            sizes[str(group.get("name", f"group{i}"))] = group["lr"] * norm / math.sqrt(count)
    return sizes


def largest_update(sizes: Mapping[str, Tensor]) -> str:
    """``"<group> (<size>)"`` for the largest update, a non-finite one counting as the largest."""
    if not sizes:
        return "none yet (the loss was non-finite before any update)"
    values = {name: float(size) for name, size in sizes.items()}
    name = max(values, key=lambda k: values[k] if math.isfinite(values[k]) else math.inf)
    return f"{name} (lr * RMS grad = {values[name]:.3g})"


def divergence_message(
    who: str, what: str, step: int, time: float, sizes: Mapping[str, Tensor]
) -> str:
    """The message of a ``DivergenceError``: what, where, when, which layer, what to do."""
    return (
        f"{who} diverged: {what} at step {step} (mf_time {time:.6g}); largest last update: "
        f"{largest_update(sizes)}. Fix: {HINT}"
    )


def training_divergence(
    trainer: pl.Trainer, pl_module: pl.LightningModule, what: str
) -> DivergenceError:
    """A ``DivergenceError`` at the trainer's step, with the size of the last update.

    The sizes come from the gradients a ``DivergenceGuard`` kept for this step if there is
    one, else from the gradients the optimizer holds now.
    """
    guards = [c for c in trainer.callbacks if isinstance(c, DivergenceGuard)]  # type: ignore[attr-defined]
    kept = guards[0].last_gradients if guards else None
    sizes = update_sizes(trainer.optimizers[0], kept) if trainer.optimizers else {}
    time = float(getattr(pl_module, "mf_time", math.nan))
    return DivergenceError(divergence_message("training", what, trainer.global_step, time, sizes))


def non_finite_inputs(batch: Any) -> bool:
    """Whether a floating tensor of ``batch`` (a tensor or a sequence of them) has NaN or inf."""
    tensors: Iterable[Any] = batch if isinstance(batch, (tuple, list)) else (batch,)
    return any(
        isinstance(t, Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all())
        for t in tensors
    )


class DivergenceGuard(Callback):
    """Raises ``DivergenceError`` at the first non-finite training loss, before its backward.

    A non-finite *batch* raises ``ValueError`` instead (the data, not the lr, is at fault). The
    finiteness check costs one scalar synchronisation per step. The size of the last update in
    the message is measured only when the loss is non-finite, from the gradients of the last
    optimizer step: the guard keeps references to them (no copies) from just before
    ``zero_grad`` until the finiteness check, which runs before the new gradients are allocated,
    so no extra memory is held while they are.

    Attributes:
        last_gradients: per param group, the gradients of the last optimizer step, between
            ``zero_grad`` and the check (``None`` otherwise).
    """

    def __init__(self) -> None:
        super().__init__()
        self.last_gradients: list[list[Tensor]] | None = None
        self._batch: Any = None

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Keep a reference to the batch, to tell bad data from divergence."""
        self._batch = batch

    @override
    def on_before_zero_grad(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        """Keep references to the last step's gradients, which ``zero_grad`` is about to drop."""
        self.last_gradients = [
            [p.grad for p in group["params"] if p.grad is not None]
            for group in optimizer.param_groups
        ]

    @override
    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor
    ) -> None:
        """Stop on a non-finite loss, naming the step, ``mf_time`` and the largest update."""
        try:
            if bool(torch.isfinite(loss.detach()).all()):
                return
            step = trainer.global_step
            if non_finite_inputs(self._batch):
                raise ValueError(
                    f"the training `batch` at step {step} contains NaN or infinite values; clean "
                    "the data (or drop those rows) before training."
                )
            what = f"the loss is {float(loss.detach().sum())}"
            raise training_divergence(trainer, pl_module, what)
        finally:  # free the old gradients before the backward pass allocates the new ones
            self.last_gradients = None

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        """Drop the batch reference."""
        self._batch = None
