"""Loss conventions shared by training and the limit solver (docs/theory.md §1.3, §E.3 item 15).

* ``"mse"``:       mean over the batch of ``sum_k (yhat_k - y_k)^2``;
* ``"half_mse"``:  half of it, ``1/2 |yhat - y|^2`` (Sirignano–Spiliopoulos, Araújo et al. and the
  theory checks); the factor 1/2 halves the speed of the limit's clock relative to ``"mse"``;
* ``"cross_entropy"``: softmax cross-entropy on logits with integer class targets.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

LossName = Literal["mse", "half_mse", "cross_entropy"]
LOSSES: tuple[str, ...] = get_args(LossName)


def check_loss_name(loss: str) -> None:
    """Raise ``ValueError`` naming ``loss`` unless it is a known convention."""
    if loss not in LOSSES:
        raise ValueError(f"unknown `loss` {loss!r}; choose one of {LOSSES}.")


def check_loss_outputs(loss: str, outputs: int | None) -> None:
    """Refuse ``loss="cross_entropy"`` on a network with a single output (no classes to pick).

    Args:
        loss: the loss convention.
        outputs: the network's number of outputs (``None`` when unknown: nothing is checked).

    Raises:
        ValueError: naming ``loss``, the output count and the fix.
    """
    if loss == "cross_entropy" and outputs == 1:
        raise ValueError(
            "`loss`='cross_entropy' needs one output per class, but the network's readout has "
            "1 output; build it with out_features=<number of classes> (>= 2), or use "
            "loss='mse' or 'half_mse' with ±1 targets for a binary task."
        )


def _integer(tensor: Tensor) -> bool:
    """Whether ``tensor`` holds integers (not floats, complex numbers or booleans)."""
    return not (tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool)


def _float_label_fix(target: Tensor, classes: int) -> str:
    """What to do with non-integer labels, one per row (read only on the way to an error)."""
    indices = f"integer class indices 0 to {classes - 1} ({classes} outputs, one per class)"
    if target.is_floating_point() and target.numel():
        bounds = torch.aminmax(target)
        low, high = float(bounds.min), float(bounds.max)
        if not (bool(torch.equal(target, target.round())) and low >= 0 and high < classes):
            return (
                f"they must be {indices}, but they range from {low:g} to {high:g}: relabel them "
                "(±1 targets: (y > 0).long()), or keep them with loss='mse' or 'half_mse'."
            )
    return f"they must be {indices}; convert them with y.long()."


def check_class_labels(prediction: Tensor, target: Tensor) -> Tensor:
    """Refuse targets ``loss="cross_entropy"`` cannot use; return them as ``F.cross_entropy`` takes.

    The targets are class indices, integers in ``[0, C)`` for a prediction of ``C`` outputs
    (classes on dim 1, as ``F.cross_entropy`` reads them), one per row; any integer dtype
    (``int32`` becomes ``int64``). Or class probabilities, floats of the prediction's shape.
    F.cross_entropy's ignored index -100 is refused like any negative label: ``loss_and_gradient``
    would have no gradient for it. Costs one min/max pass over the labels.

    Args:
        prediction: the logits, ``(batch, C)``.
        target: the labels ``y``.

    Returns:
        ``target``, integer labels as ``int64`` (or ``uint8``).

    Raises:
        ValueError: float, boolean, misshaped or out-of-range labels, naming the labels, the
            number of outputs and the fix.
    """
    classes = prediction.shape[1] if prediction.dim() > 1 else prediction.shape[0]
    rows = (*prediction.shape[:1], *prediction.shape[2:]) if prediction.dim() > 1 else ()
    what = "the labels `y` of loss='cross_entropy'"
    indices = f"class indices 0 to {classes - 1} ({classes} outputs, one per class)"
    if target.is_floating_point() and target.shape == prediction.shape:
        return target  # class probabilities
    shape, expected = tuple(target.shape), tuple(rows)
    if not _integer(target):
        if target.shape == rows:
            raise ValueError(
                f"{what} have dtype {target.dtype}: {_float_label_fix(target, classes)}"
            )
        raise ValueError(
            f"{what} have dtype {target.dtype} and shape {shape}: give integer {indices} of "
            f"shape {expected}, or class probabilities of the outputs' shape "
            f"{tuple(prediction.shape)}."
        )
    if target.shape != rows:
        fix = "; squeeze them with y.squeeze(-1)" if shape == (*expected, 1) else ""
        raise ValueError(
            f"{what} have shape {shape}, but the outputs {tuple(prediction.shape)} need one class "
            f"index per row, shape {expected}{fix}."
        )
    if target.numel():
        bounds = torch.aminmax(target)
        low, high = int(bounds.min), int(bounds.max)
        if low < 0 or high >= classes:
            if low >= 0:
                fix = (
                    f"build the network with out_features={high + 1} (one output per class), or "
                    f"relabel the classes as 0 to {classes - 1}"
                )
            else:
                fix = (
                    f"relabel the classes as 0 to {classes - 1} (negative labels, such as "
                    "F.cross_entropy's ignored index -100, are not supported)"
                )
            raise ValueError(
                f"{what} must be {indices}, but they range from {low} to {high}: {fix}."
            )
    return target if target.dtype in (torch.int64, torch.uint8) else target.long()


def _regression_target(prediction: Tensor, target: Tensor) -> Tensor:
    """Give a ``(batch,)`` target the ``(batch, 1)`` shape of a scalar-output prediction."""
    if target.dim() == prediction.dim() - 1 and prediction.shape[-1] == 1:
        target = target.unsqueeze(-1)
    if target.shape != prediction.shape:
        raise ValueError(
            f"target shape {tuple(target.shape)} does not match prediction shape "
            f"{tuple(prediction.shape)}; squared losses need one target per output "
            "(one-hot targets for several outputs, or loss='cross_entropy' with class indices)."
        )
    return target.to(prediction.dtype)


def mean_field_loss(loss: LossName, prediction: Tensor, target: Tensor) -> Tensor:
    """The batch-mean loss under the convention ``loss`` (see the module docstring).

    Raises:
        ValueError: an unknown ``loss``; targets that do not fit the prediction (for
            ``"cross_entropy"``: ``check_class_labels``).
    """
    check_loss_name(loss)
    if loss == "cross_entropy":
        return F.cross_entropy(prediction, check_class_labels(prediction, target))
    squared = (prediction - _regression_target(prediction, target)).pow(2).sum(-1).mean()
    return 0.5 * squared if loss == "half_mse" else squared


def loss_and_gradient(loss: LossName, prediction: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """``mean_field_loss`` and its gradient with respect to ``prediction`` (P rows), by hand.

    With ``r = prediction - target``: ``"mse"`` ``2 r / P``; ``"half_mse"`` ``r / P``;
    ``"cross_entropy"`` ``(softmax(prediction) - onehot(target)) / P`` for class indices in
    ``[0, C)`` (``F.cross_entropy``'s ignored index -100 is not one), or
    ``(softmax(prediction) - target) / P`` for class probabilities. The reduced solver's step
    uses it instead of an autograd pass.

    Raises:
        ValueError: as ``mean_field_loss``.
    """
    value = mean_field_loss(loss, prediction, target)
    rows = prediction.shape[0]
    if loss == "cross_entropy":
        grad = torch.softmax(prediction, dim=-1)
        if target.is_floating_point():
            grad -= target
        else:
            grad -= F.one_hot(target.long(), prediction.shape[-1]).to(grad.dtype)
        return value, grad.div_(rows)
    residual = prediction - _regression_target(prediction, target)
    return value, residual.mul_((1.0 if loss == "half_mse" else 2.0) / rows)


def correct_predictions(loss: LossName, prediction: Tensor, target: Tensor) -> Tensor:
    """Per-sample 0/1 correctness: argmax for classes, sign agreement for a scalar ±1 regression."""
    if loss == "cross_entropy":
        if target.is_floating_point() and target.shape == prediction.shape:
            target = target.argmax(-1)  # class probabilities: the most likely class
        return (prediction.argmax(-1) == target).float()
    target = _regression_target(prediction, target)
    if prediction.shape[-1] == 1:
        return ((prediction > 0) == (target > 0)).float().squeeze(-1)
    return (prediction.argmax(-1) == target.argmax(-1)).float()
