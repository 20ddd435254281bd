"""TF32 emulation on any device: the accuracy half of "is a TF32 solver worth offering?".

A TF32 tensor-core GEMM reads its float32 operands with 10 mantissa bits instead of 23 and
accumulates in float32. ``EmulatedTF32`` reproduces that on a CPU by rounding the float32
operands of every matrix product (``mm``, ``addmm``, ``bmm``, ``baddbmm``, forward and backward)
to 10 mantissa bits before the product, so the output error of a TF32 solver relative to float64
can be measured, and set beside the O(M^-1/2) particle error, without a GPU. The speed of TF32
needs a real GPU. Two roundings bracket what hardware may do: round-to-nearest-even (cuBLAS
converts operands this way) and truncation (dropping the 13 low bits, the cheap conversion
some kernels use).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

Rounding = Literal["nearest", "truncate"]
DROPPED_BITS = 13  # float32 has 23 mantissa bits, TF32 keeps 10
_LOW_MASK = (1 << DROPPED_BITS) - 1
_HALF = 1 << (DROPPED_BITS - 1)
_aten = torch.ops.aten
# op -> positions of its matrix operands
MATRIX_OPERANDS = {
    _aten.mm.default: (0, 1),
    _aten.bmm.default: (0, 1),
    _aten.addmm.default: (1, 2),
    _aten.baddbmm.default: (1, 2),
}


def round_to_tf32(x: Tensor, rounding: Rounding = "nearest") -> Tensor:
    """``x`` (float32) with its mantissa rounded to TF32's 10 bits; other dtypes unchanged.

    Works on the bit pattern: ``nearest`` adds half of the dropped range (plus the kept last bit,
    for ties to even) before clearing the 13 low bits; ``truncate`` only clears them. Infinities
    and NaNs pass through unchanged, and a finite value may round up to infinity, as in hardware.
    """
    if x.dtype != torch.float32:
        return x
    bits = x.contiguous().view(torch.int32)
    if rounding == "nearest":
        kept_lsb = (bits >> DROPPED_BITS) & 1
        bits = bits + (_HALF - 1) + kept_lsb
    elif rounding != "truncate":
        raise ValueError(f"`rounding` must be 'nearest' or 'truncate', got {rounding!r}.")
    rounded = (bits & ~_LOW_MASK).view(torch.float32).view(x.shape)
    return torch.where(torch.isfinite(x), rounded, x)  # inf and NaN (any payload) pass through


class EmulatedTF32(TorchDispatchMode):
    """Inside this mode every float32 matrix product reads TF32-rounded operands.

    Args:
        rounding: ``"nearest"`` (ties to even) or ``"truncate"``.

    Example::

        with EmulatedTF32():
            solver.step(x, y)  # forward and backward GEMMs with 10-bit mantissas
    """

    def __init__(self, rounding: Rounding = "nearest") -> None:
        super().__init__()
        if rounding not in ("nearest", "truncate"):
            raise ValueError(f"`rounding` must be 'nearest' or 'truncate', got {rounding!r}.")
        self.rounding: Rounding = rounding

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        """Round the matrix operands of the products listed in ``MATRIX_OPERANDS``, then run."""
        positions = MATRIX_OPERANDS.get(func)
        if positions is not None:
            args = tuple(
                round_to_tf32(a, self.rounding) if i in positions else a for i, a in enumerate(args)
            )
        return func(*args, **(kwargs or {}))
