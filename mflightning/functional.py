"""Functional limit-tracking metrics: how far a finite-width network is from its MF limit.

Every metric of docs/theory.md §C has a functional form here and a class form in
``mflightning.metrics``. The class ``update``/``compute`` reuse the private ``_*_update`` /
``_*_compute`` helpers below, so each formula is written once. All arithmetic is done in float64
whatever the input dtype, and every function returns a float64 tensor (or a dict of them).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "coupled_deviation",
    "loss_gap",
    "neuron_spread",
    "output_gap",
    "relative_output_gap",
    "sliced_directions",
    "sliced_wasserstein",
]


def _as_float64(name: str, value: Tensor | float) -> Tensor:
    """``value`` as a float64 tensor, after checking that it is non-empty and finite."""
    if not isinstance(value, (Tensor, float, int)):
        raise ValueError(f"`{name}` must be a tensor or a number, got {type(value).__name__}")
    tensor = torch.as_tensor(value, dtype=torch.float64)
    if tensor.numel() == 0:
        raise ValueError(f"`{name}` is empty")
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"`{name}` contains non-finite values (nan or inf)")
    return tensor


def _count(count: int, like: Tensor) -> Tensor:
    """``count`` as a float64 0-d tensor on the device of ``like``."""
    return torch.tensor(count, dtype=torch.float64, device=like.device)


def _check_same_shape(name: str, value: Tensor, ref_name: str, ref: Tensor) -> None:
    """Raise a ValueError naming ``name`` when ``value`` and ``ref`` differ in shape."""
    if value.shape != ref.shape:
        raise ValueError(
            f"`{name}` has shape {tuple(value.shape)} but `{ref_name}` has shape {tuple(ref.shape)}"
        )


def _sum_of_squares(name: str, value: Tensor, ref_name: str, ref: Tensor) -> tuple[Tensor, Tensor]:
    """Sum of ``|value - ref|²`` over all entries and the number of entries, in float64."""
    value64, ref64 = _as_float64(name, value), _as_float64(ref_name, ref)
    _check_same_shape(name, value64, ref_name, ref64)
    return (value64 - ref64).square().sum(), _count(value64.numel(), value64)


def _rms_compute(sum_sq: Tensor, count: Tensor) -> Tensor:
    """Root mean square from a sum of squares and a count."""
    return torch.sqrt(sum_sq / count)


# --- §C.1 output gap --------------------------------------------------------------------------


def _output_gap_update(finite: Tensor, limit: Tensor) -> tuple[Tensor, Tensor]:
    """Sum of squared gaps and number of entries (probe inputs × output dims)."""
    return _sum_of_squares("finite", finite, "limit", limit)


def output_gap(finite: Tensor, limit: Tensor) -> Tensor:
    r"""Output gap on probe inputs (docs/theory.md §C.1).

    .. math::
        G_\text{out} = \Big(\frac{1}{|P|\,d_\text{out}} \sum_{x \in P}
        \|\hat y_N(x) - \hat y_\infty(x)\|^2\Big)^{1/2},

    the root mean square of ``finite - limit`` over all probe inputs and output dimensions.
    Expected to scale as N^{-1/2} per seed (N^{-1} for seed-averaged outputs).

    Args:
        finite: outputs of the finite-width network on the probe inputs, any shape.
        limit: outputs of the limit (e.g. the particle solver) on the same inputs, same shape.

    Returns:
        A float64 scalar tensor.

    Raises:
        ValueError: if an argument is empty or non-finite, or the shapes differ.

    Example:
        >>> import torch
        >>> output_gap(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 0.0]))
        tensor(1.4142, dtype=torch.float64)
    """
    return _rms_compute(*_output_gap_update(finite, limit))


def relative_output_gap(finite: Tensor, limit: Tensor) -> Tensor:
    r"""Output gap relative to the size of the outputs (docs/theory.md §C.1, §D.4).

    .. math::
        r = G_\text{out} / \max\big(1, \mathrm{RMS}(\hat y_N), \mathrm{RMS}(\hat y_\infty)\big).

    Mean-field outputs are O(1) by construction, so the unit floor keeps ``r`` meaningful at
    t = 0, where a zero-mean readout law makes the limit output vanish. ``r`` is
    O(N^{-1/2}) while a network follows its limit; ``r > 1/2`` means the two outputs differ by more
    than half the size of the larger (or of the unit scale): the limit no longer describes it.

    Args:
        finite: outputs of the network (or of a finite-M solver) on the probe inputs.
        limit: outputs of the reference limit on the same inputs, same shape.

    Returns:
        A float64 scalar tensor.
    """
    finite64, limit64 = finite.detach().double(), limit.detach().double()
    scale = max(1.0, float(finite64.square().mean().sqrt()), float(limit64.square().mean().sqrt()))
    return output_gap(finite64, limit64) / scale


# --- §C.2 loss gap ----------------------------------------------------------------------------


def _scalar(name: str, value: Tensor | float) -> Tensor:
    """``value`` as a finite float64 0-d tensor; a ValueError naming ``name`` otherwise."""
    tensor = _as_float64(name, value)
    if tensor.numel() != 1:
        raise ValueError(f"`{name}` must be a scalar, got shape {tuple(tensor.shape)}")
    return tensor.reshape(())


def _loss_gap_update(
    finite_loss: Tensor | float, limit_loss: Tensor | float, weight: Tensor | float
) -> tuple[Tensor, Tensor, Tensor]:
    """Weighted losses ``weight·ℒ_N``, ``weight·ℒ∞`` and the weight itself (must be > 0)."""
    weight64 = _scalar("weight", weight)
    if weight64 <= 0:
        raise ValueError(f"`weight` must be positive, got {weight64.item()}")
    finite64 = _scalar("finite_loss", finite_loss)
    limit64 = _scalar("limit_loss", limit_loss)
    return weight64 * finite64, weight64 * limit64, weight64


def _loss_gap_compute(finite_sum: Tensor, limit_sum: Tensor, weight_sum: Tensor) -> Tensor:
    """Absolute difference of the two weighted mean losses."""
    return torch.abs(finite_sum / weight_sum - limit_sum / weight_sum)


def loss_gap(finite_loss: Tensor | float, limit_loss: Tensor | float) -> Tensor:
    r"""Loss gap (docs/theory.md §C.2): ``G_\text{loss} = |\mathcal L_N - \mathcal L_\infty|``.

    Both losses must be evaluated on the same fixed evaluation set. Expected to scale as N^{-1/2}
    per seed (N^{-1} for the difference of seed-averaged loss curves).

    Args:
        finite_loss: loss of the finite-width network, a scalar (tensor or number).
        limit_loss: loss of the limit on the same data, a scalar.

    Returns:
        A float64 scalar tensor.

    Raises:
        ValueError: if an argument is not a finite scalar.

    Example:
        >>> import torch
        >>> loss_gap(torch.tensor(0.25), 0.5)
        tensor(0.2500, dtype=torch.float64)
    """
    return _loss_gap_compute(*_loss_gap_update(finite_loss, limit_loss, 1.0))


# --- §C.3 coupled per-neuron weight deviation ---------------------------------------------------


def _coupled_deviation_update(
    weights: dict[str, Tensor], ideal_weights: dict[str, Tensor]
) -> dict[str, tuple[Tensor, Tensor]]:
    """Per layer: sum of squared deviations ``w - w̄`` and number of weights."""
    if not isinstance(weights, dict) or not isinstance(ideal_weights, dict):
        raise ValueError("`weights` and `ideal_weights` must be dicts {layer name: tensor}")
    if set(weights) != set(ideal_weights):
        raise ValueError(
            f"`weights` has layers {sorted(weights)} "
            f"but `ideal_weights` has {sorted(ideal_weights)}"
        )
    if not weights:
        raise ValueError("`weights` is empty")
    return {
        layer: _sum_of_squares(
            f"weights[{layer!r}]", weights[layer], f"ideal_weights[{layer!r}]", ideal_weights[layer]
        )
        for layer in weights
    }


def coupled_deviation(
    weights: dict[str, Tensor], ideal_weights: dict[str, Tensor]
) -> dict[str, Tensor]:
    r"""Coupled per-neuron weight deviation, per layer (docs/theory.md §C.3).

    .. math::
        \text{dev}_i = \Big(\operatorname{mean}_{\text{weights of layer } i}
        |w_i(j\ldots) - \bar w_i(C(j)\ldots)|^2\Big)^{1/2},

    with ``\bar w`` the coupled ideal particles (§B.4), entry for entry. The RMS (not the max)
    is used: it scales as N^{-1/2} without the √(log N) factor of the max.

    Args:
        weights: ``{layer name: weight tensor}`` of the finite-width network.
        ideal_weights: ``{layer name: tensor}`` of the coupled ideal particles (same keys and
            shapes).

    Returns:
        ``{layer name: float64 scalar tensor}``, in the key order of ``weights``.

    Raises:
        ValueError: if the keys differ, a pair of shapes differs, or a tensor is empty or
            non-finite.

    Example:
        >>> import torch
        >>> coupled_deviation({"w1": torch.tensor([3.0, 4.0])}, {"w1": torch.zeros(2)})
        {'w1': tensor(3.5355, dtype=torch.float64)}
    """
    sums = _coupled_deviation_update(weights, ideal_weights)
    return {layer: _rms_compute(sum_sq, count) for layer, (sum_sq, count) in sums.items()}


# --- §C.4 sliced Wasserstein ------------------------------------------------------------------


def sliced_directions(dim: int, n_projections: int = 64, seed: int = 0) -> Tensor:
    """Directions uniform on the unit sphere of R^dim, deterministic given ``seed``.

    Args:
        dim: dimension D of the particles.
        n_projections: number of directions.
        seed: seed of the private CPU generator (the global RNG is left untouched).

    Returns:
        A float64 tensor of shape ``(n_projections, dim)`` with unit rows.

    Example:
        >>> sliced_directions(3, n_projections=5).norm(dim=1)
        tensor([1., 1., 1., 1., 1.], dtype=torch.float64)
    """
    if dim < 1:
        raise ValueError(f"`dim` must be >= 1, got {dim}")
    if n_projections < 1:
        raise ValueError(f"`n_projections` must be >= 1, got {n_projections}")
    generator = torch.Generator().manual_seed(seed)
    gaussian = torch.randn(n_projections, dim, generator=generator, dtype=torch.float64)
    return gaussian / gaussian.norm(dim=1, keepdim=True)


def _particles(name: str, value: Tensor) -> Tensor:
    """Particles as a float64 ``(count, D)`` matrix; 1-D input is read as ``D = 1``."""
    tensor = _as_float64(name, value)
    if tensor.ndim == 1:
        tensor = tensor.unsqueeze(1)
    if tensor.ndim != 2:
        raise ValueError(f"`{name}` must have shape (particles, D), got {tuple(tensor.shape)}")
    return tensor


def _sliced_wasserstein_update(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Both particle sets as float64 ``(count, D)`` matrices with the same D."""
    x64, y64 = _particles("x", x), _particles("y", y)
    if x64.shape[1] != y64.shape[1]:
        raise ValueError(
            f"`x` has particles in R^{x64.shape[1]} but `y` has particles in R^{y64.shape[1]}"
        )
    return x64, y64


def _wasserstein_1d_pow(u: Tensor, v: Tensor, p: float) -> Tensor:
    """Exact ``W_p^p`` between the uniform empirical laws of the rows of ``u`` and of ``v``.

    The quantile functions of both laws are step functions with jumps at ``i/n`` and ``j/m``:
    on each piece of the merged grid (integers over the common denominator ``n·m``) both are
    constant, so ``W_p^p = ∫_0^1 |F_u^{-1}(s) - F_v^{-1}(s)|^p ds`` is a finite sum. Equal counts
    reduce to ``mean_i |u_(i) - v_(i)|^p`` of the sorted samples.

    Args:
        u: ``(projections, n)`` projected samples of the first law.
        v: ``(projections, m)`` projected samples of the second law.
        p: exponent, ``p >= 1``.

    Returns:
        ``(projections,)`` tensor of ``W_p^p``.
    """
    n, m = u.shape[1], v.shape[1]
    grid = torch.cat([torch.arange(1, n + 1) * m, torch.arange(1, m + 1) * n]).unique().to(u.device)
    lengths = torch.diff(grid, prepend=grid.new_zeros(1)).to(torch.float64) / (n * m)
    u_index = (grid + m - 1) // m - 1  # on (previous, grid]/(n m), F_u^{-1}(s) = u_(ceil(s n))
    v_index = (grid + n - 1) // n - 1
    gaps = u.sort(dim=1).values[:, u_index] - v.sort(dim=1).values[:, v_index]
    return (gaps.abs().pow(p) * lengths).sum(dim=1)


def _sliced_wasserstein_compute(x: Tensor, y: Tensor, directions: Tensor, p: float) -> Tensor:
    """``(mean over directions θ of W_p^p(θ·x, θ·y))^{1/p}``."""
    if directions.ndim != 2 or directions.shape[1] != x.shape[1]:
        raise ValueError(
            f"`directions` must have shape (projections, {x.shape[1]}), "
            f"got {tuple(directions.shape)}"
        )
    theta = directions.to(device=x.device, dtype=torch.float64)
    return _wasserstein_1d_pow(theta @ x.T, theta @ y.T, p).mean().pow(1 / p)


def _check_exponent(p: float) -> None:
    """Raise a ValueError unless ``p >= 1`` is finite."""
    if not (isinstance(p, (int, float)) and math.isfinite(p) and p >= 1):
        raise ValueError(f"`p` must be a finite number >= 1, got {p!r}")


def sliced_wasserstein(
    x: Tensor,
    y: Tensor,
    n_projections: int = 64,
    p: float = 2,
    seed: int = 0,
    directions: Tensor | None = None,
) -> Tensor:
    r"""Sliced Wasserstein distance between two empirical laws of particles (docs/theory.md §C.4).

    .. math::
        SW_p(\mu, \nu) = \Big(\frac{1}{K}\sum_{k=1}^K W_p^p(\theta_k{}_\# \mu,\,
        \theta_k{}_\# \nu)\Big)^{1/p},

    with ``\mu = \frac1n\sum_i \delta_{x_i}``, ``\nu = \frac1m\sum_j \delta_{y_j}`` and K
    directions ``\theta_k`` uniform on the sphere (``sliced_directions``, fixed seed, so the
    value is deterministic). Each 1-D ``W_p`` is exact for any counts ``n`` and ``m`` (merge of
    the two quantile functions; sorting when ``n == m``). For scalar or projected marginals the
    distance between a width-N network's neurons and the limit law scales as N^{-1/2}; uncoupled
    W_p in R^D would only scale as N^{-1/D} (§C.4).

    Args:
        x: ``(n, D)`` particles of the first law (rows are particles); ``(n,)`` means D = 1.
        y: ``(m, D)`` particles of the second law.
        n_projections: number K of random directions (ignored when ``directions`` is given).
        p: exponent, ``p >= 1`` (1 and 2 are the usual choices).
        seed: seed of the directions (ignored when ``directions`` is given).
        directions: optional ``(K, D)`` unit directions to use instead of random ones.

    Returns:
        A float64 scalar tensor.

    Raises:
        ValueError: if an argument is empty or non-finite, the dimensions differ, or ``p < 1``.

    Example:
        >>> import torch
        >>> x = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
        >>> sliced_wasserstein(x, x + torch.tensor([3.0, 0.0]), p=1, directions=torch.eye(2))
        tensor(1.5000, dtype=torch.float64)
    """
    _check_exponent(p)
    x64, y64 = _sliced_wasserstein_update(x, y)
    if directions is None:
        directions = sliced_directions(x64.shape[1], n_projections, seed)
    return _sliced_wasserstein_compute(x64, y64, _as_float64("directions", directions), p)


# --- §C.6 neuron spread -----------------------------------------------------------------------


def _neuron_spread_update(h: Tensor) -> tuple[Tensor, Tensor]:
    """Sum over inputs x of the population std over neurons of ``h[x, :]``, and the input count."""
    h64 = _as_float64("h", h)
    if h64.ndim != 2:
        raise ValueError(f"`h` must have shape (batch, neurons), got {tuple(h64.shape)}")
    spread = h64.std(dim=1, correction=0)
    return spread.sum(), _count(h64.shape[0], h64)


def _mean_compute(total: Tensor, count: Tensor) -> Tensor:
    """Mean from a sum and a count."""
    return total / count


def neuron_spread(h: Tensor) -> Tensor:
    r"""Spread of a layer's neurons (docs/theory.md §C.6 degeneracy metric).

    .. math::
        S_i = \mathbb E_x\big[\operatorname{std}_j H_i(x, j)\big],

    the mean over inputs x of the **population** standard deviation (``correction=0``, i.e.
    ``unbiased=False``: divide by the number of neurons) over the neurons j. For iid init and
    L >= 4 the middle layers 2 <= i <= L-2 degenerate: S_i ~ N^{-1/2}; S_1 and S_{L-1} stay O(1).

    Args:
        h: ``(batch, neurons)`` pre-activations (or activations) of one layer.

    Returns:
        A float64 scalar tensor.

    Raises:
        ValueError: if ``h`` is empty, non-finite or not 2-D.

    Example:
        >>> import torch
        >>> neuron_spread(torch.tensor([[0.0, 2.0], [1.0, 1.0]]))
        tensor(0.5000, dtype=torch.float64)
    """
    return _mean_compute(*_neuron_spread_update(h))
