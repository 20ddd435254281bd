"""The hand-written loss gradients against autograd (mflightning.losses)."""

from __future__ import annotations

import pytest
import torch

from mflightning.losses import loss_and_gradient, mean_field_loss


def targets(loss: str, shape: tuple[int, int], kind: str, gen: torch.Generator) -> torch.Tensor:
    """Class indices, class probabilities, or regression targets (per output or (P,))."""
    rows, outputs = shape
    if kind == "indices":
        return torch.randint(0, outputs, (rows,), generator=gen)
    if kind == "probabilities":
        return torch.softmax(torch.randn(shape, generator=gen, dtype=torch.float64), dim=-1)
    if kind == "flat":
        return torch.randn(rows, generator=gen, dtype=torch.float64)
    return torch.randn(shape, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize(
    ("loss", "outputs", "kind"),
    [
        ("mse", 1, "flat"),
        ("mse", 3, "full"),
        ("half_mse", 1, "flat"),
        ("half_mse", 4, "full"),
        ("cross_entropy", 3, "indices"),
        ("cross_entropy", 5, "probabilities"),
    ],
)
def test_loss_gradient_matches_autograd(loss: str, outputs: int, kind: str) -> None:
    """Value equal to mean_field_loss, gradient equal to autograd's to 1e-15 (float64)."""
    gen = torch.Generator().manual_seed(outputs)
    prediction = torch.randn(37, outputs, generator=gen, dtype=torch.float64)
    target = targets(loss, (37, outputs), kind, gen)
    leaf = prediction.clone().requires_grad_()
    expected = mean_field_loss(loss, leaf, target)
    (expected_grad,) = torch.autograd.grad(expected, leaf)
    value, grad = loss_and_gradient(loss, prediction, target)
    torch.testing.assert_close(value, expected.detach(), rtol=1e-15, atol=0)
    torch.testing.assert_close(grad, expected_grad, rtol=0, atol=1e-15)
    assert grad.abs().max() > 1e-3  # not a zero gradient that matches by accident


def test_loss_gradient_refuses_unknown_loss() -> None:
    with pytest.raises(ValueError, match="unknown `loss`"):
        loss_and_gradient("hinge", torch.zeros(2, 1), torch.zeros(2))  # type: ignore[arg-type]
