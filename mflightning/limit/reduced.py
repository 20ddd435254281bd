"""The reduced iid solver R_M of mf-theory.md §B.4, integrating the systems of §B.3.

Under iid initialization of a fully connected MF network a middle weight's drift does not depend on
its own value, and its initial value ``u_i`` enters the limit only through the law's mean ``mu_i``
(§B.3 "key structural fact"). The limit then lives on the atoms of the two end layers only:
``U_1`` (first-layer rows, M_1 of them) and ``U_L`` (readout columns, M_L = n_{L-1} of them):

* L = 2: ``w_1(t, u_1)``, ``w_2(t, u_2)`` — the two-layer limit itself (R_M = S_M);
* L = 3: ``w_1(t, u_1)``, ``w_3(t, u_3)`` and an M_3 x M_1 table ``g_2(t, u_1, u_3)``,
  ``w_2 = u_2 + g_2``, ``H_2(x, u_3) = E_{U_1}[(mu_2 + g_2(U_1, u_3)) phi_1(H_1(x, U_1))]``;
* L = 4: the middle hidden layer is degenerate and the last hidden layer is rank one,
  ``H_2*(x) = E_{U_1}[(mu_2 + g_2(U_1)) phi_1(H_1(x, U_1))]``,
  ``H_3(x, u_4) = (mu_3 + g_3(u_4)) phi_2(H_2*(x))``,
  ``H_4(x) = E_{U_4}[w_4(U_4) phi_3(H_3(x, U_4))]``;
* L >= 5: as L = 4 plus one scalar translation per middle layer 3 <= i <= L-2,
  ``H_i*(x) = (mu_i + w_i#(t)) phi_{i-1}(H_{i-1}*(x))``, ``w_i = u_i + w_i#(t)``.

Biases (§B.2; §B.3 "constant initial biases"): ``b_1(u_1)`` and ``b_{L-1}(u_L)`` belong to the
end atoms (any initial values); each degenerate layer 2 <= i <= L-2 (L >= 4) needs a constant
initial bias and carries one scalar ``b_i*(t)``; the readout bias is one value per output. Each is
added to its layer's pre-activation above.

The §B.3 evolution equations are exactly the gradient flow of this reduced forward pass with the
multipliers ``M_1`` (``w_1``, and ``g_2(u_1)`` for L >= 4), ``M_L`` (``w_L``, ``g_{L-1}(u_L)``),
``M_1 M_3`` (the L = 3 table) and 1 (the scalars ``w_i#``, ``b_i*`` and the readout bias): each
multiplier is the number of
atoms a field's gradient is averaged over, as the §1.2 multipliers are for the brute-force solver.
The solver therefore takes autograd gradients of :func:`~mflightning.losses.mean_field_loss` on the
reduced forward pass and makes the explicit-Euler step ``f <- f - lr * multiplier * dLoss/df``,
the same discretisation as full-batch GD of :class:`~mflightning.ParticleLimitSolver`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import torch
from torch import Tensor, nn

from mflightning.activations import get_activation
from mflightning.guards import DivergenceError, divergence_message
from mflightning.limit.solver import EulerSolver, check_solver_args
from mflightning.losses import LossName, mean_field_loss
from mflightning.mlp import MeanFieldMLP
from mflightning.nn import MeanFieldLinear

_USE_PARTICLES = "use mflightning.ParticleLimitSolver (brute force) for this network"


def _law_mean(layer: MeanFieldLinear) -> float:
    """The mean ``mu_i`` of a layer's init law (known: checked by :func:`_check_reducible`)."""
    mean = layer.init_law.mean
    assert mean is not None
    return float(mean)


def _check_reducible(network: object) -> list[MeanFieldLinear]:
    """The layers of a network whose limit the §B.3 systems describe.

    Raises:
        ValueError: not a :class:`MeanFieldMLP`, non-constant initial biases in a degenerate
            layer, or a middle law with an unknown mean.
    """
    if not isinstance(network, MeanFieldMLP):
        raise ValueError(
            "`network` must be a MeanFieldMLP (fully connected, iid init) for the reduced solver "
            f"of §B.3, got {type(network).__name__}; {_USE_PARTICLES}."
        )
    layers = [layer for layer in network.layers if isinstance(layer, MeanFieldLinear)]
    degenerate = range(2, len(layers) - 1) if len(layers) >= 4 else range(0)
    for i in degenerate:
        bias = layers[i - 1].bias
        if bias is not None and not bool((bias == bias[0]).all()):
            raise ValueError(
                f"`network` layer{i} has non-constant initial biases: its neurons degenerate only "
                "with constant initial biases (§B.3); use bias_init=mflightning.Normal(c, 0.0), "
                f"bias=False, or {_USE_PARTICLES}."
            )
    for i, layer in enumerate(layers[1:-1], 2):
        if layer.init_law.mean is None:
            raise ValueError(
                f"`network` layer{i} has an init law with unknown mean ({layer.init_law}): the "
                "reduced solver needs the middle laws' means mu_i (§B.3); use mflightning.Normal "
                f"or mflightning.Uniform, or {_USE_PARTICLES}."
            )
    return layers


class ReducedLimitSolver(EulerSolver):
    """Reduced iid solver R_M of the mean-field limit (mf-theory.md §B.4; equations §B.3).

    The atoms are the network's first-layer rows ``U_1`` and readout columns ``U_L``; the middle
    layers enter only through the means ``mu_i = layer.init_law.mean`` (their drawn weights are
    ignored: the network must have iid init). Each :meth:`step` is one explicit-Euler step with
    step ``lr`` of the §B.3 system (see the module docstring), so that physical time advances by
    ``lr`` as for :class:`~mflightning.ParticleLimitSolver`. Frozen layers do not move
    (``xi_i = 0``); frozen first and last layers give the Araújo–Oliveira–Yukimura limit.

    Cost per step: O(M_1 P d) + O(M_L P) + O(P) per middle layer for L >= 4 — independent of
    M^2 — against O(M^2 P) per middle layer for the brute-force solver; L = 3 keeps the M_3 x M_1
    table ``g_2``, O(M_1 M_3 P). Same O(M^{-1/2}) Monte-Carlo error as S_M in the end-layer atoms,
    but no middle-layer noise; with shared atoms ``|S_M - R_M| = O(1/M)`` (§D.3 T-REDUCED).

    Build the solver from the network at initialization (t = 0): only its end layers and its
    laws are read, and iid draws are assumed, not checked. The means are used exactly as the laws
    state them; in a float32 network constant middle weights are rounded (``0.8`` becomes
    ``0.800000011920929``), so compare with the brute force on a float64 network. Coupling by
    ideal-particle integration (§B.4 item 3) is not implemented (:meth:`couple` raises).

    State (:attr:`fields`): ``"w1"`` (M_1, d); L = 2: ``"w2"`` (out, M_1); L = 3: ``"g2"``
    (M_3, M_1) and ``"w3"`` (out, M_3); L >= 4: ``"g2"`` (M_1,), ``"w<i>#"`` (scalars,
    3 <= i <= L-2), ``"g<L-1>"`` (M_L,) and ``"w<L>"`` (out, M_L); biases ``"b<i>"``: (M_1,) for
    i = 1, (M_L,) for i = L-1, () for the degenerate layers, (out,) for the readout.

    Args:
        network: a :class:`~mflightning.MeanFieldMLP` with iid init whose middle laws have known
            means and whose degenerate layers have constant initial biases; it holds the atoms
            and is not modified. Widths may differ.
        lr: Euler step ``h = eps`` (> 0); the solver time after k steps is ``k * lr``.
        loss: loss convention of :func:`mflightning.losses.mean_field_loss`.
        dtype: floating dtype of the state (float64 by default, §E.2).
        device: device of the state (default: that of ``network``).

    Raises:
        ValueError: a network the reduction does not cover (not a MeanFieldMLP, non-constant
            biases in a degenerate layer, a middle init law with unknown mean, every layer
            frozen), or a bad ``lr``, ``loss`` or ``dtype``.
    """

    _progress_label = "reduced limit"

    def __init__(
        self,
        network: nn.Module,
        lr: float,
        loss: LossName = "mse",
        dtype: torch.dtype = torch.float64,
        device: torch.device | str | None = None,
    ) -> None:
        layers = _check_reducible(network)
        assert isinstance(network, MeanFieldMLP)  # checked by _check_reducible
        check_solver_args(lr, loss, dtype)
        self.lr = float(lr)
        self._time_step = self.lr
        self.loss: LossName = loss
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else layers[0].weight.device
        self.depth = len(layers)
        self._activations: list[Callable[[Tensor], Tensor]] = [
            get_activation(name).fn for name in network.activation_names
        ]
        self._input_scale = layers[0].forward_scale
        self._means = {i: _law_mean(layers[i - 1]) for i in range(2, self.depth)}
        self._fields: dict[str, Tensor] = {}
        self._multipliers: dict[str, float] = {}
        for name, value, multiplier, layer in self._initial_fields(layers):
            value = value.detach().to(device=self.device, dtype=dtype).clone()
            self._fields[name] = value.requires_grad_(not layer.frozen)
            if not layer.frozen:
                self._multipliers[name] = multiplier
        if not self._multipliers:
            raise ValueError("`network` has no trainable layer: every layer is frozen.")
        self._update_sizes: dict[str, Tensor] = {}  # lr * multiplier * RMS grad, last step
        self._steps = 0

    def _initial_fields(
        self, layers: Sequence[MeanFieldLinear]
    ) -> list[tuple[str, Tensor, float, MeanFieldLinear]]:
        """``(name, initial value, Euler multiplier, owning layer)`` of every state field."""
        depth = self.depth
        first, readout = layers[0].weight, layers[-1].weight
        m1, m_last = first.shape[0], readout.shape[1]
        fields = [("w1", first, float(m1), layers[0])]
        if depth == 3:
            fields.append(("g2", first.new_zeros(m_last, m1), float(m1 * m_last), layers[1]))
        elif depth >= 4:
            fields.append(("g2", first.new_zeros(m1), float(m1), layers[1]))
            fields += [
                (f"w{i}#", first.new_zeros(()), 1.0, layers[i - 1]) for i in range(3, depth - 1)
            ]
            fields.append((f"g{depth - 1}", first.new_zeros(m_last), float(m_last), layers[-2]))
        fields.append((f"w{depth}", readout, float(m_last), layers[-1]))
        for i, layer in enumerate(layers, 1):
            if layer.bias is None:
                continue
            if i == 1 or i == depth - 1 or i == depth:  # per atom (u_1 or u_L), or per output
                multiplier = float(m1 if i == 1 else m_last if i < depth else 1)
                fields.append((f"b{i}", layer.bias, multiplier, layer))
            else:  # degenerate layer: one constant, checked by _check_reducible
                fields.append((f"b{i}", layer.bias[0], 1.0, layer))
        return fields

    @property
    def fields(self) -> dict[str, Tensor]:
        """The reduced state at the current time (detached views; see the class docstring)."""
        return {name: value.detach() for name, value in self._fields.items()}

    def _forward(self, x: Tensor) -> Tensor:
        """``yhat(x)`` of the §B.3 system for the current state (autograd-tracked)."""
        f, phi, mu, depth = self._fields, self._activations, self._means, self.depth

        def bias(i: int) -> Tensor | float:
            return f.get(f"b{i}", 0.0)

        # phi_1(H_1(x, u_1)), (P, M_1)
        a1 = phi[0](self._input_scale * (x @ f["w1"].T) + bias(1))
        m1 = a1.shape[1]
        if depth == 2:
            last = a1
        elif depth == 3:  # H_2(x, u_3) = E_{U_1}[(mu_2 + g_2(U_1, u_3)) phi_1(H_1(x, U_1))]
            last = phi[1](a1 @ (mu[2] + f["g2"]).T / m1 + bias(2))
        else:
            h = a1 @ (mu[2] + f["g2"]) / m1 + bias(2)  # H_2*(x)
            for i in range(3, depth - 1):  # H_i*(x) = (mu_i + w_i#) phi_{i-1}(H_{i-1}*(x))
                h = (mu[i] + f[f"w{i}#"]) * phi[i - 2](h) + bias(i)
            # H_{L-1}(x, u_L) = (mu_{L-1} + g_{L-1}(u_L)) phi_{L-2}(H_{L-2}*(x)): rank one
            gain = mu[depth - 1] + f[f"g{depth - 1}"]
            last = phi[depth - 2](phi[depth - 3](h)[:, None] * gain + bias(depth - 1))
        readout = f[f"w{depth}"]
        return phi[depth - 1](last @ readout.T / readout.shape[1] + bias(depth))

    def _euler_step(self, x: Tensor, y: Tensor) -> float:
        """One Euler step ``f <- f - lr * multiplier * dLoss/df``; returns the loss before it.

        Raises:
            DivergenceError: the loss is not finite (the state is left as it was).
        """
        names = list(self._multipliers)
        loss = mean_field_loss(self.loss, self._forward(x), y)
        if not torch.isfinite(loss):
            what = f"the loss is {loss.item()}"
            message = divergence_message(
                "reduced limit solver", what, self._steps, self.time, self._update_sizes
            )
            raise DivergenceError(message)
        grads = torch.autograd.grad(loss, [self._fields[name] for name in names])
        with torch.no_grad():
            for name, grad in zip(names, grads, strict=True):
                step = self.lr * self._multipliers[name]
                self._update_sizes[name] = step * grad.double().square().mean().sqrt()
                self._fields[name].sub_(grad, alpha=step)
        self._steps += 1
        return loss.item()

    @torch.no_grad()
    def __call__(self, x: Tensor) -> Tensor:
        """The limit output ``yhat(t, x)`` at the current time, in the solver's dtype."""
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise ValueError(f"`x` must be a floating tensor, got {type(x).__name__}.")
        self._check_device("x", x)
        return self._forward(x.to(device=self.device, dtype=self.dtype))

    def couple(self, widths: Sequence[int], generator: torch.Generator | None = None) -> NoReturn:
        """Not implemented: ideal-particle coupling (§B.4 item 3) of a network to R_M.

        Raises:
            NotImplementedError: always; couple networks to a ParticleLimitSolver instead.
        """
        raise NotImplementedError(
            "ReducedLimitSolver.couple is not implemented: coupling by ideal-particle integration "
            "(mf-theory.md §B.4 item 3) is future work; couple the network to a "
            "mflightning.ParticleLimitSolver (subsampling) instead."
        )

    def state_dict(self) -> dict[str, Any]:
        """Fields, step count, ``lr`` and ``loss``: plain tensors/ints/floats/strings.

        Loadable with ``torch.load(..., weights_only=True)``.
        """
        return {
            "fields": {name: value.detach().clone() for name, value in self._fields.items()},
            "steps": self._steps,
            "lr": self.lr,
            "loss": self.loss,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume exactly from :meth:`state_dict` (same architecture, ``lr`` and ``loss``).

        Raises:
            ValueError: another ``lr`` or ``loss``, or fields of another architecture.
        """
        self._check_saved(state_dict)
        saved = state_dict["fields"]
        shapes = {name: tuple(value.shape) for name, value in self._fields.items()}
        if {name: tuple(value.shape) for name, value in saved.items()} != shapes:
            raise ValueError(
                f"`state_dict` holds fields {sorted(saved)} of other shapes than this solver's "
                f"{shapes}; build the solver from the same architecture and widths."
            )
        with torch.no_grad():
            for name, value in saved.items():
                self._fields[name].copy_(value)
        self._steps = int(state_dict["steps"])
