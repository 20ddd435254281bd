"""Candidate for ``MeanFieldLinear``: the 1/n_in folded into the backward GEMMs as well.

``MeanFieldLinear`` runs its forward as one ``addmm(b, x, W^T, alpha=1/n_in)``; torch's backward
of ``addmm`` then multiplies both gradients by ``alpha`` in separate elementwise passes. This
``autograd.Function`` computes them as ``addmm(·, beta=0, alpha=1/n_in)`` instead, with no extra
pass, at the price of a Python-level backward (about 80 us per forward+backward on the CPU
container, docs/benchmarks.md). The ``layers`` benchmark times it as the ``folded`` rows so a
GPU run can tell whether it should replace the plain ``addmm``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mflightning import MeanFieldLinear


class ScaledLinearFunction(torch.autograd.Function):
    """``scale * rows @ weight^T + bias`` with ``scale`` inside all three GEMMs."""

    generate_vmap_rule = True

    @staticmethod
    def forward(rows: Tensor, weight: Tensor, bias: Tensor | None, scale: float) -> Tensor:  # type: ignore[override]
        """The forward GEMM, ``alpha = scale``."""
        if bias is None:
            return torch.addmm(rows.new_empty(()), rows, weight.t(), beta=0, alpha=scale)
        return torch.addmm(bias, rows, weight.t(), alpha=scale)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        """Save the operands for the backward GEMMs."""
        rows, weight, bias, scale = inputs
        ctx.save_for_backward(rows, weight)
        ctx.scale = scale
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        """``grad_rows = scale grad W``, ``grad_W = scale grad^T rows``, ``grad_b = sum grad``."""
        rows, weight = ctx.saved_tensors
        unused = grad.new_empty(())  # beta = 0: the addmm input is never read
        grad_rows = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_rows = torch.addmm(unused, grad, weight, beta=0, alpha=ctx.scale)
        if ctx.needs_input_grad[1]:
            grad_weight = torch.addmm(unused, grad.t(), rows, beta=0, alpha=ctx.scale)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad.sum(0)
        return grad_rows, grad_weight, grad_bias, None


class FoldedMeanFieldLinear(MeanFieldLinear):
    """``MeanFieldLinear`` whose forward and backward both fold the scale into the GEMMs.

    Under autocast the operands are cast to the autocast dtype first (recorded by autograd, as
    autocast's own casts are), so the saved tensors and the gradient share a dtype.
    """

    def forward(self, input: Tensor) -> Tensor:
        """``forward_scale * input @ W^T + b`` through ``ScaledLinearFunction``."""
        rows, weight, bias = input.reshape(-1, self.in_features), self.weight, self.bias
        device_type = rows.device.type
        if torch.is_autocast_enabled(device_type) and rows.dtype != torch.float64:
            dtype = torch.get_autocast_dtype(device_type)  # autocast leaves float64 alone too
            rows, weight = rows.to(dtype), weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        output = ScaledLinearFunction.apply(rows, weight, bias, self.forward_scale)
        return output.view(*input.shape[:-1], self.out_features)
