"""Coupling a width-N network to the particle-limit solver by index sampling (docs/theory.md §B.4).

Per hidden layer i an index set ``S_i`` of size ``n_i`` is drawn from the solver's ``M_i``
particles, and the small network starts from the particles' sub-array

    W_1[S_1, :],   W_i[S_i, S_{i-1}]  (2 <= i <= L-1),   W_L[:, S_{L-1}],   b_i[S_i]  (b_L whole)

(torch stores a weight as ``(out, in)``, so rows are the layer's own neurons). The *ideal particle*
of small weight ``(j, k)`` of layer i at time t is the solver entry ``(S_i(j), S_{i-1}(k))`` at
time t; the coupled deviation of §C.3 compares the two.

* ``method="subsample"`` (recommended for tests): ``S_i`` without replacement. A sub-array of an
  iid array is iid, so the small network's initial law is exactly the init law. Needs
  ``n_i << M_i`` (M >= 8N; error ~ sqrt(c/N + c/M)).
* ``method="bootstrap"``: ``S_i`` iid uniform with replacement — exactly Nguyen–Pham's coupling
  for the M-atom embedding, at the price of a bootstrap initial law (duplicated neurons possible).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal, get_args

import torch
from torch import Tensor

from mflightning.nn import check_positive_int
from mflightning.scaling import mean_field_layers
from mflightning.stack import MeanFieldStack

if TYPE_CHECKING:
    from mflightning.limit.solver import ParticleLimitSolver

Method = Literal["subsample", "bootstrap"]
METHODS: tuple[str, ...] = get_args(Method)


def _restrict(tensor: Tensor, rows: Tensor | None, cols: Tensor | None) -> Tensor:
    """``tensor[rows][:, cols]`` (a copy); ``None`` keeps that dimension whole."""
    if rows is not None:
        tensor = tensor.index_select(0, rows)
    if cols is not None:
        tensor = tensor.index_select(1, cols)
    return tensor if rows is not None or cols is not None else tensor.clone()


class Coupling:
    """Index sets tying a small network's neurons to the solver's particles (§B.4).

    Attributes:
        solver: the solver whose particles are the ideal particles.
        indices: ``[S_1, ..., S_{L-1}]``, one long tensor of particle indices per hidden layer
            (``indices[i - 1]`` gives the rows of ``layer{i}``).
        method: ``"subsample"`` or ``"bootstrap"``.
    """

    def __init__(self, solver: ParticleLimitSolver, indices: Sequence[Tensor], method: Method):
        self.solver = solver
        self.indices = list(indices)
        self.method = method

    def _slices(self) -> dict[str, tuple[Tensor | None, Tensor | None]]:
        """``{layer name: (rows S_i or None, columns S_{i-1} or None)}`` for layers 1..L."""
        names = [name for name, _ in mean_field_layers(self.solver.network)]
        rows: list[Tensor | None] = [*self.indices, None]
        cols: list[Tensor | None] = [None, *self.indices]
        return dict(zip(names, zip(rows, cols, strict=True), strict=True))

    @torch.no_grad()
    def ideal_weights(self) -> dict[str, Tensor]:
        """``{"layer1": W_1[S_1, :], ..., "layerL": W_L[:, S_{L-1}]}`` of the *current* particles.

        Same shapes as the small network's weights, in the solver's dtype and device.
        """
        layers = dict(mean_field_layers(self.solver.network))
        return {
            name: _restrict(layers[name].weight, rows, cols)
            for name, (rows, cols) in self._slices().items()
        }

    @torch.no_grad()
    def ideal_biases(self) -> dict[str, Tensor]:
        """``{"layer<i>": b_i[S_i]}`` (readout bias whole) for the layers that have biases."""
        layers = dict(mean_field_layers(self.solver.network))
        return {
            name: _restrict(bias, rows, None)
            for name, (rows, _) in self._slices().items()
            if (bias := layers[name].bias) is not None
        }


def _draw_indices(
    widths: Sequence[int], particles: Sequence[int], method: str, generator: torch.Generator | None
) -> list[Tensor]:
    """One index set per hidden layer: without (subsample) or with (bootstrap) replacement."""
    if method not in METHODS:
        raise ValueError(f"unknown `method` {method!r}; choose one of {METHODS}.")
    if isinstance(widths, (int, str)) or len(widths) != len(particles):
        raise ValueError(
            f"`widths` must list one width per hidden layer ({len(particles)} for particle widths "
            f"{list(particles)}), got {widths!r}."
        )
    indices = []
    for i, (n, m) in enumerate(zip(widths, particles, strict=True)):
        check_positive_int(f"widths[{i}]", n)
        if method == "subsample":
            if n > m:
                raise ValueError(
                    f"`widths[{i}]` = {n} exceeds the solver's {m} particles: a subsample without "
                    "replacement needs n <= M (use M >= 8N, or method='bootstrap')."
                )
            indices.append(torch.randperm(m, generator=generator)[:n])
        else:
            indices.append(torch.randint(0, m, (n,), generator=generator))
    return indices


def couple(
    solver: ParticleLimitSolver,
    widths: Sequence[int],
    generator: torch.Generator | None = None,
    method: Method = "subsample",
    dtype: torch.dtype | None = None,
) -> tuple[MeanFieldStack, Coupling]:
    """A width-``widths`` copy of the solver's architecture initialized from its particles (§B.4).

    Args:
        solver: a solver whose network is a ``MeanFieldMLP`` or
            ``MeanFieldConvNet`` (conv weights are indexed by channel).
        widths: hidden widths ``n_1 .. n_{L-1}`` of the small network.
        generator: CPU random generator for the index sets (``None``: torch's global one).
        method: ``"subsample"`` (without replacement, ``n_i <= M_i``) or ``"bootstrap"``.
        dtype: dtype of the small network (default: the solver's); it lives on the solver's device.

    Returns:
        ``(small_network, coupling)``; the small network's weights equal
        ``coupling.ideal_weights()`` (and biases ``coupling.ideal_biases()``) at the current time.

    Raises:
        ValueError: the solver's network is not a mean-field stack, or bad ``widths``, ``method``,
            ``generator`` or ``dtype``.
    """
    network = solver.network
    if not isinstance(network, MeanFieldStack):
        raise ValueError(
            "coupling needs the solver's `network` to be a MeanFieldMLP or MeanFieldConvNet (it "
            "builds the small "
            f"network with `with_widths`), got {type(network).__name__}."
        )
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(
            f"`generator` must be a torch.Generator or None, got {type(generator).__name__}."
        )
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise ValueError(f"`dtype` must be a floating torch dtype or None, got {dtype!r}.")
    indices = _draw_indices(widths, network.widths, method, generator)
    coupling = Coupling(solver, [s.to(solver.device) for s in indices], method)
    # with_widths draws throw-away weights; a private generator keeps torch's global RNG untouched
    small = network.with_widths(widths, generator=torch.Generator())
    small.to(device=solver.device, dtype=dtype or solver.dtype)
    small_layers = dict(mean_field_layers(small))
    with torch.no_grad():
        for name, weight in coupling.ideal_weights().items():
            small_layers[name].weight.copy_(weight)
        for name, bias in coupling.ideal_biases().items():
            small_layers[name].bias.copy_(bias)  # type: ignore[union-attr]
    return small, coupling
