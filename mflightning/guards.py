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
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
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


@dataclass(frozen=True)
class GradientNorms:
    """The gradient norms of an optimizer's param groups at one step, read lazily.

    ``measure`` costs one fused read of every gradient (``torch._foreach_norm``, as
    ``clip_grad_norm_`` does) and never synchronises with the device; the sizes are combined
    only when ``update_sizes`` is asked for (a divergence message).

    Attributes:
        groups: per param group, its name (``group<i>`` when unnamed), lr and number of
            gradient entries; groups without gradients are left out.
        norms: per kept group, the 2-norms of its gradients as 0-d tensors.
    """

    groups: list[tuple[str, float, int]]
    norms: list[list[Tensor]]

    @classmethod
    def measure(cls, optimizer: Optimizer) -> GradientNorms:
        """Norms of the gradients the parameters hold now, group by group."""
        groups, grads = [], []
        for i, group in enumerate(optimizer.param_groups):
            group_grads = [p.grad.detach() for p in group["params"] if p.grad is not None]
            if group_grads:
                count = sum(g.numel() for g in group_grads)
                groups.append((str(group.get("name", f"group{i}")), float(group["lr"]), count))
                grads.append(group_grads)
        flat = list(torch._foreach_norm([g for gs in grads for g in gs])) if grads else []
        norms, start = [], 0
        for group_grads in grads:
            norms.append(flat[start : start + len(group_grads)])
            start += len(group_grads)
        return cls(groups, norms)

    def update_sizes(self) -> dict[str, float]:
        """``lr * RMS(grad)`` per group; an overflowing norm reads ``inf`` (the largest)."""
        sizes = {}
        for (name, lr, count), norms in zip(self.groups, self.norms, strict=True):
            total = math.sqrt(sum(float(n) ** 2 for n in norms))
            sizes[name] = lr * total / math.sqrt(count)
        return sizes


def largest_update(sizes: Mapping[str, float | Tensor]) -> str:
    """``"<group> (<size>)"`` for the largest update, a non-finite one counting as the largest."""
    if not sizes:
        return "none yet (the loss was non-finite before any update)"
    values = {name: float(size) for name, size in sizes.items()}
    name = max(values, key=lambda k: values[k] if math.isfinite(values[k]) else math.inf)
    return f"{name} (lr * RMS grad = {values[name]:.3g})"


def divergence_message(
    who: str, what: str, step: int, time: float, sizes: Mapping[str, float | Tensor]
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

    The sizes come from the norms a ``DivergenceGuard`` measured at the last optimizer step, or
    (without a guard) from the gradients the optimizer holds now.
    """
    guards = [c for c in trainer.callbacks if isinstance(c, DivergenceGuard)]  # type: ignore[attr-defined]
    if guards:
        norms = guards[0].last_step
    else:
        norms = GradientNorms.measure(trainer.optimizers[0]) if trainer.optimizers else None
    sizes = norms.update_sizes() if norms is not None else {}
    time = float(getattr(pl_module, "mf_time", math.nan))
    return DivergenceError(divergence_message("training", what, trainer.global_step, time, sizes))


def _batch_tensors(batch: Any) -> list[Tensor]:
    """The tensors of ``batch``: a tensor or a sequence of them."""
    items: Iterable[Any] = batch if isinstance(batch, (tuple, list)) else (batch,)
    return [t for t in items if isinstance(t, Tensor)]


def non_finite_inputs(batch: Any) -> bool:
    """Whether a floating tensor of ``batch`` (a tensor or a sequence of them) has NaN or inf."""
    return any(
        t.is_floating_point() and not bool(torch.isfinite(t).all()) for t in _batch_tensors(batch)
    )


def empty_batch(batch: Any) -> bool:
    """Whether a tensor of ``batch`` has no rows (the mean loss over 0 examples is NaN)."""
    return any(t.dim() > 0 and t.shape[0] == 0 for t in _batch_tensors(batch))


def non_finite_parameters(module: torch.nn.Module) -> list[str]:
    """Names of the parameters of ``module`` that hold NaN or infinite values."""
    return [
        name
        for name, p in module.named_parameters()
        if p.is_floating_point() and not bool(torch.isfinite(p).all())
    ]


class DivergenceGuard(Callback):
    """Raises ``DivergenceError`` at the first non-finite training loss, before its backward.

    A non-finite or empty *batch*, or weights that were already non-finite before the fit's first
    update (a bad initialization or checkpoint), raise ``ValueError`` instead: the lr is not at
    fault then, and the message says what is. The
    finiteness check costs one scalar synchronisation per step. Just before every optimizer step
    the guard records the gradient norms (``GradientNorms.measure``: one fused read, no
    synchronisation); the update sizes of the message are computed from them only on divergence.
    This covers automatic and manual optimization, accumulation and validation loops alike.

    Attributes:
        last_step: the gradient norms of the last optimizer step (``None`` before the first).
    """

    def __init__(self) -> None:
        super().__init__()
        self.last_step: GradientNorms | None = None
        self._batch: Any = None

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Keep a reference to the batch, to tell bad data from divergence."""
        self._batch = batch

    @override
    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor
    ) -> None:
        """Stop on a non-finite loss, naming the step, ``mf_time`` and the largest update."""
        if bool(torch.isfinite(loss.detach()).all()):
            return
        step = trainer.global_step
        if empty_batch(self._batch):
            raise ValueError(
                f"the training `batch` at step {step} is empty (0 examples), and the mean loss "
                "over no examples is NaN; every batch must hold an example: check the "
                "train_dataloader (a filter, split or collate function that drops every row)."
            )
        if non_finite_inputs(self._batch):
            raise ValueError(
                f"the training `batch` at step {step} contains NaN or infinite values; clean the "
                "data (or drop those rows) before training."
            )
        bad = non_finite_parameters(pl_module) if self.last_step is None else []
        if bad:
            raise ValueError(
                f"the `network` weights {bad[:5]} held NaN or infinite values before the first "
                f"update of this fit (step {step}): the initialization or the loaded checkpoint "
                "is bad, not the lr; use a finite init law, or load a good checkpoint."
            )
        raise training_divergence(trainer, pl_module, f"the loss is {float(loss.detach().sum())}")

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        """Record the gradient norms of the coming update."""
        self.last_step = GradientNorms.measure(optimizer)

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
