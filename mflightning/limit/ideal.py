"""Ideal-particle coupling of a network to the reduced solver (docs/theory.md §B.4 item 3).

A width-N network is not a subsample of the reduced solver's atoms: each of its neurons keeps its
own initial values ``u`` and gets its own *ideal particle*, the characteristic ODE of the §B.3
system started from ``u`` under the deterministic limit fields. The solver integrates these ODEs
alongside its own state with *tracers*: each tracer field gets the gradient an atom with its
values would get, and the Euler step with the atoms' multipliers is then the tracer's
characteristic ODE. For L = 2 and L >= 4 the tracers take the atoms' backward pass
(``mflightning.limit.endatoms``) with the same ``dLoss/dH_L`` and ``dLoss/dH_2*`` and add
nothing to the forward pass; every coupled network's tracers are views into one tensor per field,
stepped in one pass. For L = 3 they enter the population averages of the reduced forward pass as
``(z - z.detach()) / M`` (see ``couple``): such a term adds exactly zero to every forward value,
so the limit is unchanged, while autograd gives the tracer fields their gradients. Either way the
atoms' features are held fixed, so tracers never feed back into the atoms' gradients.

Tracer fields (``n_i`` the network's widths, ``M_1``/``M_L`` the solver's atoms):

* every depth: ``"w1"`` (n_1, d) and ``"b1"`` (n_1,) — the first-layer rows;
* L = 2: ``"w2"`` (out, n_1) — the readout columns of the same neurons;
* L = 3: ``"w3"`` (out, n_2), ``"b2"`` (n_2,), and three slices of the table ``g(t, u_1, u_3)``:
  ``"g2"`` (n_2, n_1) between the network's own neurons (their ideal ``w_2 - u_2``),
  ``"g2:atoms3"`` (M_3, n_1) from the network's u_1 to the atoms ``U_3`` (drives ``w_1``) and
  ``"g2:atoms1"`` (n_2, M_1) from the atoms ``U_1`` to the network's u_3 (drives ``w_3``);
* L >= 4: ``"g2"`` (n_1,), ``"g<L-1>"`` (n_{L-1},), ``"w<L>"`` (out, n_{L-1}),
  ``"b<L-1>"`` (n_{L-1},).

Each tracer field steps with the multiplier of the solver field before the colon.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from mflightning.mlp import MeanFieldMLP
from mflightning.nn import MeanFieldLinear

if TYPE_CHECKING:
    from mflightning.limit.reduced import ReducedLimitSolver


def ghost(z: Tensor) -> Tensor:
    """``z - z.detach()``: exactly zero, with the gradient of ``z``."""
    return z - z.detach()


def linear_layers(network: MeanFieldMLP) -> list[MeanFieldLinear]:
    """The mean-field linear layers ``layer1 .. layerL`` of an MLP."""
    return [layer for layer in network.layers if isinstance(layer, MeanFieldLinear)]


def tracer_fields(
    network: MeanFieldMLP, atoms: dict[str, Tensor], dtype: torch.dtype, device: torch.device
) -> dict[str, Tensor]:
    """The tracers' initial values (see the module docstring), detached copies in ``dtype``.

    Args:
        network: the coupled network at its initialization.
        atoms: the solver's fields at t = 0 (gives the atom counts ``M_1``, ``M_3`` for L = 3).
        dtype: the solver's dtype.
        device: the solver's device.
    """
    layers = linear_layers(network)
    depth = len(layers)

    def own(tensor: Tensor) -> Tensor:
        return tensor.detach().to(device=device, dtype=dtype).clone()

    first, readout = layers[0], layers[-1]
    n1, n_last = first.weight.shape[0], readout.weight.shape[1]
    fields = {"w1": own(first.weight), f"w{depth}": own(readout.weight)}
    if first.bias is not None:
        fields["b1"] = own(first.bias)
    if depth >= 3 and (bias := layers[-2].bias) is not None:
        fields[f"b{depth - 1}"] = own(bias)

    def zeros(*shape: int) -> Tensor:
        return torch.zeros(shape, dtype=dtype, device=device)

    if depth == 3:
        m3, m1 = atoms["g2"].shape
        fields |= {"g2": zeros(n_last, n1), "g2:atoms3": zeros(m3, n1)}
        fields["g2:atoms1"] = zeros(n_last, m1)
    elif depth >= 4:
        fields |= {"g2": zeros(n1), f"g{depth - 1}": zeros(n_last)}
    return fields


class IdealCoupling:
    """Ideal particles of a network's weights under the reduced limit (§B.4 item 3).

    Made by ``couple``; its tracers advance with every
    solver step, and ``ideal_weights`` reads them at the solver's current time. Same interface
    as ``Coupling`` (``solver``, ``method``, ``ideal_weights``,
    ``ideal_biases``); there are no index sets.

    Ideal particles (u: the network's own initial values; g, w#, b* the solver's fields):

    * ``layer1``: the tracer ``w_1(t, u_1(j))``; ``layerL``: the tracer ``w_L(t, u_L(k))``;
    * L = 3: ``layer2 = u_2(k, j) + g(t, u_1(j), u_3(k))``;
    * L >= 4: ``layer2 = u_2 + g_2(t, u_1(j))`` (per column), ``layer<L-1> = u + g_{L-1}(t,
      u_L(k))`` (per row), and ``layer<i> = u_i + w_i#(t)`` for 3 <= i <= L-2;
    * biases: ``b_1`` and ``b_{L-1}`` are tracers; degenerate and readout biases move by the
      solver's displacement ``b*(t) - b*(0)`` from the network's own initial value (their drift
      does not depend on their value).

    Attributes:
        solver: the reduced solver.
        network: the coupled network (not modified; its initial values were read at coupling).
        method: ``"ideal"``.
    """

    method = "ideal"

    def __init__(
        self, solver: ReducedLimitSolver, network: MeanFieldMLP, tracers: dict[str, Tensor]
    ) -> None:
        self.solver = solver
        self.network = network
        self.tracers = tracers
        # the solver is at t = 0 (checked by couple): the starts of the biases that are not
        # tracers (one value each, or one per output); never a copy of the atoms' fields, which
        # every coupled run of a sweep would hold again (M x d numbers each)
        self._start = {
            name: value.clone()
            for name, value in solver.fields.items()
            if name.startswith("b") and name not in tracers
        }
        layers = linear_layers(network)

        def own(tensor: Tensor) -> Tensor:
            return tensor.detach().to(device=solver.device, dtype=solver.dtype).clone()

        self._weights = [own(layer.weight) for layer in layers]
        self._biases = [None if layer.bias is None else own(layer.bias) for layer in layers]

    @torch.no_grad()
    def ideal_weights(self) -> dict[str, Tensor]:
        """``{"layer1": ..., "layerL": ...}``: ideal particles at the solver's current time.

        Same shapes as the network's weights, in the solver's dtype and device (fresh tensors).
        """
        depth, fields, tracers = len(self._weights), self.solver.fields, self.tracers
        ideal = {"layer1": tracers["w1"].detach().clone()}
        if depth == 3:
            ideal["layer2"] = self._weights[1] + tracers["g2"].detach()
        elif depth >= 4:
            ideal["layer2"] = self._weights[1] + tracers["g2"].detach()[None, :]
            for i in range(3, depth - 1):
                ideal[f"layer{i}"] = self._weights[i - 1] + fields[f"w{i}#"]
            offset = tracers[f"g{depth - 1}"].detach()[:, None]
            ideal[f"layer{depth - 1}"] = self._weights[depth - 2] + offset
        ideal[f"layer{depth}"] = tracers[f"w{depth}"].detach().clone()
        return ideal

    @torch.no_grad()
    def ideal_biases(self) -> dict[str, Tensor]:
        """``{"layer<i>": ...}`` for the layers with biases, at the solver's current time."""
        fields, ideal = self.solver.fields, {}
        for i, bias in enumerate(self._biases, 1):
            if bias is None:
                continue
            name = f"b{i}"
            if name in self.tracers:
                ideal[f"layer{i}"] = self.tracers[name].detach().clone()
            else:  # degenerate (2 <= i <= L-2) and readout biases: one value, or one per output
                ideal[f"layer{i}"] = bias + (fields[name] - self._start[name])
        return ideal
