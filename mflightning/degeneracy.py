"""Degeneracy diagnostics of iid deep mean-field networks (docs/theory.md §C.6, §B.3, §E.1 item 5).

Under iid initialization with L >= 4 the middle hidden layers collapse to one neuron-independent
function (measured by ``mflightning.functional.neuron_spread``), the last hidden layer of an
L = 4 network becomes rank one, ``H_3(x, j) = a_j h(x)`` (``effective_rank`` -> 1), and for
L >= 5 the middle weights only translate, ``w_i(t) - w_i(0) = w_i#(t)``
(``middle_displacement_variance`` -> 0).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _check_finite_matrix(name: str, value: object) -> Tensor:
    if not isinstance(value, Tensor) or value.dim() != 2 or value.numel() == 0:
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"`{name}` must be a non-empty 2-D tensor, got {shape}.")
    if not torch.isfinite(value).all():
        raise ValueError(f"`{name}` contains NaN or infinite values.")
    return value


def effective_rank(features: Tensor) -> Tensor:
    r"""Entropy effective rank of a feature matrix (Roy & Vetterli 2007; docs/theory.md §C.6).

    .. math::
        \operatorname{erank}(F) = \exp\Big(-\sum_k p_k \log p_k\Big),
        \qquad p_k = \sigma_k / \textstyle\sum_l \sigma_l,

    with ``sigma_k`` the singular values of ``F`` (not centred; ``0 log 0 = 0``). It lies in
    ``[1, min(P, n)]``: 1 for a rank-one matrix, ``r`` for ``r`` equal non-zero singular values.
    For L = 4 under iid init the last hidden layer ``[H_3(x_p, j)]_{p, j}`` tends to rank one.

    Args:
        features: ``(inputs, neurons)`` matrix, e.g. ``MeanFieldMLP.hidden_preactivations(x)[2]``.

    Returns:
        A float64 scalar tensor.

    Raises:
        ValueError: ``features`` is not a non-empty finite 2-D tensor, or is all zeros.
    """
    singular = torch.linalg.svdvals(_check_finite_matrix("features", features).double())
    total = singular.sum()
    if total == 0:
        raise ValueError("`features` is the zero matrix: its effective rank is undefined.")
    p = singular[singular > 0] / total
    return torch.exp(-(p * p.log()).sum())


def middle_displacement_variance(w_now: Tensor, w_init: Tensor) -> Tensor:
    r"""Variance over entries of a middle layer's displacement (docs/theory.md §C.6, L >= 5).

    .. math::
        V_i(t) = \operatorname{var}_{j, k}\big(w_i(t, j, k) - w_i(0, j, k)\big),

    the population variance (divide by the number of entries). For iid init and 3 <= i <= L-2 the
    limit displacement is one scalar translation ``w_i#(t)``, so ``V_i -> 0`` with the width.

    Args:
        w_now: the layer's weights at time t.
        w_init: the same layer's weights at t = 0 (same shape).

    Returns:
        A float64 scalar tensor.

    Raises:
        ValueError: mismatched shapes, empty or non-finite tensors.
    """
    if not isinstance(w_now, Tensor) or not isinstance(w_init, Tensor):
        raise ValueError("`w_now` and `w_init` must be tensors.")
    if w_now.shape != w_init.shape or w_now.numel() == 0:
        raise ValueError(
            f"`w_now` {tuple(w_now.shape)} and `w_init` {tuple(w_init.shape)} must be non-empty "
            "tensors of the same shape (one layer's weights at two times)."
        )
    displacement = w_now.detach().double() - w_init.detach().double()
    if not torch.isfinite(displacement).all():
        raise ValueError("`w_now` or `w_init` contains NaN or infinite values.")
    return displacement.var(correction=0)
