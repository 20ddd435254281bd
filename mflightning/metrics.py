"""Limit-tracking metrics as torchmetrics ``Metric`` classes (docs/theory.md §C).

Each class accumulates float64 states through the ``_*_update`` helpers of
``mflightning.functional`` and finishes with its ``_*_compute`` helper, so the class and the
functional twin share one formula. Sum states use ``dist_reduce_fx="sum"`` and therefore reduce
exactly across DDP processes and through ``merge_state``; only
``SlicedWasserstein`` keeps ``"cat"`` states (all particles, see its memory note). States are
not persistent: they are not in ``state_dict``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from mflightning.functional import (
    _check_exponent,
    _coupled_deviation_update,
    _loss_gap_compute,
    _loss_gap_update,
    _mean_compute,
    _neuron_spread_update,
    _output_gap_update,
    _rms_compute,
    _sliced_wasserstein_compute,
    _sliced_wasserstein_update,
    sliced_directions,
)

__all__ = ["CoupledDeviation", "LossGap", "NeuronSpread", "OutputGap", "SlicedWasserstein"]


def _zero() -> Tensor:
    """Default value of a float64 sum state."""
    return torch.tensor(0.0, dtype=torch.float64)


class _LimitMetric(Metric):
    """Shared metadata: a distance to the limit, not differentiable, cheap per-batch updates."""

    is_differentiable: bool = False
    higher_is_better: bool = False
    full_state_update: bool = False

    def merge_state(self, incoming_state: dict[str, Any] | Metric) -> None:
        """Merge another process's states (see ``torchmetrics.Metric.merge_state``).

        Also drops the cached ``compute`` result, which torchmetrics 1.9 keeps after a merge.
        """
        super().merge_state(incoming_state)
        self._computed = None

    def _add_sum_state(self, name: str) -> None:
        """Declare a float64 scalar state reduced by summation across processes."""
        self.add_state(name, default=_zero(), dist_reduce_fx="sum")


class OutputGap(_LimitMetric):
    r"""Output gap on probe inputs (docs/theory.md §C.1), accumulated over batches of probes.

    .. math::
        G_\text{out} = \Big(\frac{1}{|P|\,d_\text{out}} \sum_{x \in P}
        \|\hat y_N(x) - \hat y_\infty(x)\|^2\Big)^{1/2}

    As input to ``update``: ``finite`` and ``limit``, outputs of the finite network and of the
    limit on the same probe inputs (same shape, any shape). As output of ``compute``: the float64
    RMS of ``finite - limit`` over every entry seen since the last ``reset``. States: the sum of
    squares and the number of entries (both summed across processes).

    Args:
        kwargs: forwarded to ``torchmetrics.Metric``.

    Example:
        >>> import torch
        >>> metric = OutputGap()
        >>> metric.update(torch.tensor([1.0]), torch.tensor([1.0]))
        >>> metric.update(torch.tensor([2.0]), torch.tensor([0.0]))
        >>> metric.compute()
        tensor(1.4142, dtype=torch.float64)
    """

    sum_sq: Tensor
    count: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._add_sum_state("sum_sq")
        self._add_sum_state("count")

    def update(self, finite: Tensor, limit: Tensor) -> None:
        """Add the squared gaps of one batch of probe inputs."""
        sum_sq, count = _output_gap_update(finite, limit)
        self.sum_sq += sum_sq
        self.count += count

    def compute(self) -> Tensor:
        """RMS gap over all entries seen."""
        return _rms_compute(self.sum_sq, self.count)


class LossGap(_LimitMetric):
    r"""Loss gap (docs/theory.md §C.2) between weighted mean losses accumulated over batches.

    .. math::
        G_\text{loss} = \Big|\frac{\sum_b w_b \mathcal L_N^{(b)}}{\sum_b w_b}
        - \frac{\sum_b w_b \mathcal L_\infty^{(b)}}{\sum_b w_b}\Big|

    As input to ``update``: ``finite_loss`` and ``limit_loss``, the mean losses of the finite
    network and of the limit on one batch (scalars), and ``weight`` (> 0, usually the batch size)
    so that the means over the evaluation set are exact. As output of ``compute``: the float64
    absolute difference of the two weighted means. States: the two weighted sums and the total
    weight (summed across processes).

    Args:
        kwargs: forwarded to ``torchmetrics.Metric``.

    Example:
        >>> metric = LossGap()
        >>> metric.update(1.0, 0.5, weight=1)
        >>> metric.update(0.0, 0.5, weight=3)
        >>> metric.compute()
        tensor(0.2500, dtype=torch.float64)
    """

    finite_sum: Tensor
    limit_sum: Tensor
    weight_sum: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._add_sum_state("finite_sum")
        self._add_sum_state("limit_sum")
        self._add_sum_state("weight_sum")

    def update(
        self, finite_loss: Tensor | float, limit_loss: Tensor | float, weight: Tensor | float = 1.0
    ) -> None:
        """Add one batch's mean losses, weighted by ``weight`` (e.g. the batch size)."""
        finite_sum, limit_sum, weight_sum = _loss_gap_update(finite_loss, limit_loss, weight)
        self.finite_sum += finite_sum
        self.limit_sum += limit_sum
        self.weight_sum += weight_sum

    def compute(self) -> Tensor:
        """Absolute difference of the weighted mean losses."""
        return _loss_gap_compute(self.finite_sum, self.limit_sum, self.weight_sum)


def _state_suffix(layer: str) -> str:
    """``layer`` with every character that is not a letter, digit or ``_`` replaced by ``_``."""
    return re.sub(r"\W", "_", layer)


class CoupledDeviation(_LimitMetric):
    r"""Coupled per-neuron weight deviation, per layer (docs/theory.md §C.3).

    .. math::
        \text{dev}_i = \Big(\operatorname{mean}_{\text{weights of layer } i}
        |w_i - \bar w_i|^2\Big)^{1/2}

    As input to ``update``: ``weights`` and ``ideal_weights``, dicts ``{layer name: tensor}`` with
    exactly the keys given at construction and matching shapes (a layer may be fed in chunks over
    several updates). As output of ``compute``: ``{layer name: float64 RMS deviation}``. States per
    layer (summed across processes): ``sq_<layer>`` (sum of squares) and ``n_<layer>`` (count),
    where ``<layer>`` is the name with non-word characters replaced by ``_``.

    Args:
        layers: names of the layers to track, e.g. ``["layers.0.weight", "layers.1.weight"]``.
        kwargs: forwarded to ``torchmetrics.Metric``.

    Raises:
        ValueError: if ``layers`` is empty or two names give the same state name.

    Example:
        >>> import torch
        >>> metric = CoupledDeviation(["w1"])
        >>> metric.update({"w1": torch.tensor([3.0, 4.0])}, {"w1": torch.zeros(2)})
        >>> metric.compute()
        {'w1': tensor(3.5355, dtype=torch.float64)}
    """

    def __init__(self, layers: Sequence[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.layers = list(layers)
        suffixes = [_state_suffix(layer) for layer in self.layers]
        if not self.layers:
            raise ValueError("`layers` is empty")
        if len(set(suffixes)) != len(suffixes):
            raise ValueError(f"`layers` {self.layers} has duplicate (sanitized) names {suffixes}")
        self._suffixes = dict(zip(self.layers, suffixes, strict=True))
        for suffix in suffixes:
            self._add_sum_state(f"sq_{suffix}")
            self._add_sum_state(f"n_{suffix}")

    def update(self, weights: dict[str, Tensor], ideal_weights: dict[str, Tensor]) -> None:
        """Add the squared deviations of every tracked layer."""
        sums = _coupled_deviation_update(weights, ideal_weights)
        if set(sums) != set(self.layers):
            raise ValueError(f"`weights` has layers {sorted(sums)}, expected {sorted(self.layers)}")
        for layer, (sum_sq, count) in sums.items():
            suffix = self._suffixes[layer]
            setattr(self, f"sq_{suffix}", getattr(self, f"sq_{suffix}") + sum_sq)
            setattr(self, f"n_{suffix}", getattr(self, f"n_{suffix}") + count)

    def compute(self) -> dict[str, Tensor]:
        """RMS deviation per layer, in the order of ``layers``."""
        return {
            layer: _rms_compute(getattr(self, f"sq_{suffix}"), getattr(self, f"n_{suffix}"))
            for layer, suffix in self._suffixes.items()
        }


def _particle_dim(state: list[Tensor] | Tensor) -> int | None:
    """Dimension D of the particles already in a ``"cat"`` state (None when empty)."""
    if isinstance(state, Tensor):
        return state.shape[-1]
    return state[0].shape[-1] if state else None


class SlicedWasserstein(_LimitMetric):
    r"""Sliced Wasserstein distance between two empirical laws of particles (docs/theory.md §C.4).

    .. math::
        SW_p(\mu, \nu) = \Big(\frac{1}{K}\sum_{k=1}^K W_p^p(\theta_k{}_\# \mu,\,
        \theta_k{}_\# \nu)\Big)^{1/p}

    with the K directions of ``sliced_directions`` (fixed ``seed``:
    deterministic) and exact 1-D W_p for any numbers of particles, as in
    ``sliced_wasserstein``.

    As input to ``update``: ``x`` ``(n_b, D)`` particles of the first law and ``y`` ``(m_b, D)``
    particles of the second (rows are particles, ``(n_b,)`` means D = 1; counts may differ). As
    output of ``compute``: the float64 SW_p between the laws of all particles seen.

    Memory: the states are ``"cat"`` lists holding **every particle** of both laws in float64,
    ``8·(n + m)·D`` bytes, and under DDP every process gathers all of them at ``compute``.
    ``compute`` then needs about ``8·K·(2n + 2m)`` more bytes for projections and quantiles.

    Args:
        n_projections: number K of random directions.
        p: exponent, ``p >= 1`` (1 and 2 are the usual choices).
        seed: seed of the directions.
        kwargs: forwarded to ``torchmetrics.Metric``.

    Raises:
        ValueError: if ``n_projections < 1`` or ``p < 1``.

    Example:
        >>> import torch
        >>> metric = SlicedWasserstein(n_projections=16, p=1)
        >>> metric.update(torch.zeros(3, 2), torch.ones(5, 2))
        >>> metric.compute() > 0
        tensor(True)
    """

    x: list[Tensor]  # torchmetrics concatenates "cat" states only inside compute/sync
    y: list[Tensor]

    def __init__(self, n_projections: int = 64, p: float = 2, seed: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if n_projections < 1:
            raise ValueError(f"`n_projections` must be >= 1, got {n_projections}")
        _check_exponent(p)
        self.n_projections = n_projections
        self.p = p
        self.seed = seed
        self.add_state("x", default=[], dist_reduce_fx="cat")
        self.add_state("y", default=[], dist_reduce_fx="cat")

    def update(self, x: Tensor, y: Tensor) -> None:
        """Append one batch of particles of each law."""
        x64, y64 = _sliced_wasserstein_update(x, y)
        dim = _particle_dim(self.x)
        if dim is not None and dim != x64.shape[1]:
            raise ValueError(f"`x` has particles in R^{x64.shape[1]}, earlier updates in R^{dim}")
        self.x.append(x64)
        self.y.append(y64)

    def compute(self) -> Tensor:
        """SW_p between the empirical laws of all particles seen."""
        x, y = dim_zero_cat(self.x), dim_zero_cat(self.y)
        directions = sliced_directions(x.shape[1], self.n_projections, self.seed)
        return _sliced_wasserstein_compute(x, y, directions, self.p)


class NeuronSpread(_LimitMetric):
    r"""Spread of a layer's neurons (docs/theory.md §C.6), accumulated over batches of inputs.

    .. math::
        S_i = \mathbb E_x\big[\operatorname{std}_j H_i(x, j)\big]

    with the **population** std over neurons (``correction=0``, i.e. ``unbiased=False``).

    As input to ``update``: ``h`` ``(batch, neurons)``, one layer's pre-activations on a batch of
    inputs. As output of ``compute``: the float64 mean over all inputs seen of the std over
    neurons. States: the sum over inputs of the std and the number of inputs (summed across
    processes).

    Args:
        kwargs: forwarded to ``torchmetrics.Metric``.

    Example:
        >>> import torch
        >>> metric = NeuronSpread()
        >>> metric.update(torch.tensor([[0.0, 2.0]]))
        >>> metric.update(torch.tensor([[1.0, 1.0]]))
        >>> metric.compute()
        tensor(0.5000, dtype=torch.float64)
    """

    spread_sum: Tensor
    count: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._add_sum_state("spread_sum")
        self._add_sum_state("count")

    def update(self, h: Tensor) -> None:
        """Add the per-input spreads of one batch."""
        spread_sum, count = _neuron_spread_update(h)
        self.spread_sum += spread_sum
        self.count += count

    def compute(self) -> Tensor:
        """Mean spread over all inputs seen."""
        return _mean_compute(self.spread_sum, self.count)
