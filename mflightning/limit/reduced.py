"""The reduced iid solver R_M of docs/theory.md §B.4, integrating the systems of §B.3.

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
The solver therefore takes the gradients of ``mean_field_loss`` on the
reduced forward pass and makes the explicit-Euler step ``f <- f - lr * multiplier * dLoss/df``,
the same discretisation as full-batch GD of ``ParticleLimitSolver``.

For L = 2 and L >= 4 the end atoms are processed in chunks (``mflightning.limit.endatoms``):
forward over the first-layer atoms to ``H_2*`` (L >= 4), through the middle scalars, forward over
the last-layer atoms to ``H_L``; then the loss, ``dLoss/dH_L``, and back: each chunk of atoms is
recomputed, its gradients formed by hand and its fields stepped, the middle scalars' by the chain
rule on P-vectors, the loss's by ``mflightning.losses.loss_and_gradient``. No P x M intermediate
exists at once: memory is the state plus a few P x ``chunk_size`` blocks, and a step costs about
two forward passes. L = 3 keeps the plain autograd pass (its M_3 x M_1 table is larger than any
P x M intermediate).

Other optimizers (§F.5): plain SGD at a constant step takes the Euler step above. With the
module's momentum, Adam (per-atom moment states) or an lr scheduler, the passes are run with step
1, which moves every field by its normalized gradient ``G = multiplier * dLoss/df``; the
fields are put back and a torch optimizer built from the module's callables (one group per field,
multiplier 1, ``optim.ScheduledOptimizer``) steps them with ``.grad = G``. The degenerate
layers' scalars then follow the per-weight update exactly (every weight of such a layer has the
same gradient history). Weight decay for L >= 3 is refused: it decays each middle weight's own
initial value, which the reduction has replaced by the law's mean.

Networks are coupled by ideal-particle integration (§B.4 item 3): their end-layer neurons are
tracers that take the atoms' steps with the same ``dLoss/dH_L`` (and ``dLoss/dH_2*``) and add
nothing to the forward pass; for L = 3 they ride along as zero-valued terms of the autograd
pass (``mflightning.limit.ideal``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mflightning.activations import get_activation
from mflightning.guards import DivergenceError, divergence_message
from mflightning.limit.endatoms import KERNELS, EndLayer, Workspace, backward_step, forward_sum
from mflightning.limit.ideal import IdealCoupling, ghost, tracer_fields
from mflightning.limit.solver import (
    EulerSolver,
    check_float_input,
    check_solver_args,
    load_clock,
)
from mflightning.losses import LossName, loss_and_gradient, mean_field_loss
from mflightning.mlp import MeanFieldMLP
from mflightning.nn import MeanFieldLinear
from mflightning.optim import (
    MeanFieldClock,
    OptimizerCallable,
    ScheduledOptimizer,
    SchedulerCallable,
    UpdateFactories,
    check_optimizer_rule,
    describe_update,
    probe_optimizer,
)
from mflightning.scaling import Rule, group_settings

_USE_PARTICLES = "use mflightning.ParticleLimitSolver (brute force) for this network"
# end atoms per chunk times the batch size: a 100 x 2621 float64 chunk is 2 MB, two or three per
# worker thread; fastest of 2^17 .. 2^21 with two workers at M = 10^6 on the 2-core container
# (docs/benchmarks.md, reduced section): larger chunks leave the caches, smaller ones add overhead
CHUNK_ELEMENTS = 2**18


def _law_mean(layer: MeanFieldLinear) -> float:
    """The mean ``mu_i`` of a layer's init law (known: checked by ``_check_reducible``)."""
    mean = layer.init_law.mean
    assert mean is not None
    return float(mean)


def _is_scalar(name: str, depth: int) -> bool:
    """Whether field ``name`` is a degenerate layer's scalar ``w_i#`` or ``b_i*`` (L >= 4)."""
    if name.endswith("#"):
        return True
    return depth >= 4 and name.startswith("b") and 2 <= int(name[1:]) <= depth - 2


def _check_reducible(network: object) -> list[MeanFieldLinear]:
    """The layers of a network whose limit the §B.3 systems describe.

    Raises:
        ValueError: not a ``MeanFieldMLP``, non-constant initial biases in a degenerate
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


def update_support(optimizer: OptimizerCallable, rule: Rule, depth: int) -> str | None:
    """Why the reduced solver cannot follow ``optimizer`` at this depth, or ``None`` (§F.5).

    Weight decay with L >= 3 decays each middle weight's own initial value, which the reduction
    replaces by its law's mean.
    """
    probe = probe_optimizer(optimizer, group_settings(1.0, 1.0, rule))
    decay = probe.param_groups[0].get("weight_decay", 0)
    if decay and depth >= 3:
        return (
            f"`optimizer` {type(probe).__name__} has weight_decay={decay}: it decays each middle "
            "weight's own initial value, which the reduced solver replaces by its law's mean, so "
            "the reduced limit does not cover it (docs/theory.md §F.5)"
        )
    return None


class ReducedLimitSolver(EulerSolver):
    """Reduced iid solver R_M of the mean-field limit (docs/theory.md §B.4; equations §B.3).

    The atoms are the network's first-layer rows ``U_1`` and readout columns ``U_L``; the middle
    layers enter only through the means ``mu_i = layer.init_law.mean`` (their drawn weights are
    ignored: the network must have iid init). Each ``step`` is one explicit-Euler step with
    step ``lr`` of the §B.3 system (see the module docstring), so that physical time advances by
    ``lr`` as for ``ParticleLimitSolver``. Frozen layers do not move
    (``xi_i = 0``); frozen first and last layers give the Araújo–Oliveira–Yukimura limit.

    Cost per step: O(M_1 P d) + O(M_L P) + O(P) per middle layer for L >= 4 — independent of
    M^2 — against O(M^2 P) per middle layer for the brute-force solver; L = 3 keeps the M_3 x M_1
    table ``g_2``, O(M_1 M_3 P). Memory for L = 2 and L >= 4: the state plus two P x
    ``chunk_size`` blocks (``mflightning.limit.cost`` models the time). Same O(M^{-1/2})
    Monte-Carlo error as S_M in the end-layer atoms, but no middle-layer noise; with shared
    atoms ``|S_M - R_M| = O(1/M)`` (§D.3 T-REDUCED).

    Build the solver from the network at initialization (t = 0): only its end layers and its
    laws are read, and iid draws are assumed, not checked. The means are used exactly as the laws
    state them; in a float32 network constant middle weights are rounded (``0.8`` becomes
    ``0.800000011920929``), so compare with the brute force on a float64 network. Networks are
    coupled by ideal-particle integration (§B.4 item 3, ``couple``), at t = 0.

    State (``fields``): ``"w1"`` (M_1, d); L = 2: ``"w2"`` (out, M_1); L = 3: ``"g2"``
    (M_3, M_1) and ``"w3"`` (out, M_3); L >= 4: ``"g2"`` (M_1,), ``"w<i>#"`` (scalars,
    3 <= i <= L-2), ``"g<L-1>"`` (M_L,) and ``"w<L>"`` (out, M_L); biases ``"b<i>"``: (M_1,) for
    i = 1, (M_L,) for i = L-1, () for the degenerate layers, (out,) for the readout.

    Args:
        network: a ``MeanFieldMLP`` with iid init whose middle laws have known
            means and whose degenerate layers have constant initial biases; it holds the atoms
            and is not modified. Widths may differ.
        lr: Euler step ``h = eps`` (> 0); the solver time after k steps is ``k * lr``.
        loss: loss convention of ``mflightning.losses.mean_field_loss``.
        dtype: floating dtype of the state (float64 by default, §E.2).
        device: device of the state (default: that of ``network``).
        chunk_size: end atoms per chunk of the forward and backward passes (L = 2 and L >= 4);
            ``None``: ``CHUNK_ELEMENTS // batch`` (2 MB float64 blocks). Results do not depend
            on it beyond rounding.
        optimizer: the networks' optimizer callable (``MeanFieldModule.optimizer_factory``);
            see the module docstring (§F.5).
        scheduler: their lr scheduler callable, or ``None``.
        rule: ``"sgd"`` or ``"adam"``, as the module's.

    Raises:
        ValueError: a network the reduction does not cover (not a MeanFieldMLP, non-constant
            biases in a degenerate layer, a middle init law with unknown mean, every layer
            frozen), weight decay with L >= 3, or a bad ``lr``, ``loss``, ``dtype``,
            ``chunk_size``, ``optimizer`` (of the other rule) or ``scheduler``.
    """

    _progress_label = "reduced limit"

    def __init__(
        self,
        network: nn.Module,
        lr: float,
        loss: LossName = "mse",
        dtype: torch.dtype = torch.float64,
        device: torch.device | str | None = None,
        *,
        chunk_size: int | None = None,
        optimizer: OptimizerCallable = torch.optim.SGD,
        scheduler: SchedulerCallable | None = None,
        rule: Rule = "sgd",
    ) -> None:
        layers = _check_reducible(network)
        if chunk_size is not None and (
            isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
        ):
            raise ValueError(
                f"`chunk_size` must be a positive number of end atoms or None, got {chunk_size!r}."
            )
        self.chunk_size = chunk_size
        assert isinstance(network, MeanFieldMLP)  # checked by _check_reducible
        check_solver_args(lr, loss, dtype)
        self.lr = float(lr)
        self._clock = MeanFieldClock(self.lr)
        self._scale = self.lr  # the step of the raw passes (1 when an optimizer takes over)
        self._plain = self._check_update(optimizer, scheduler, rule, len(layers))
        self.update_factories = UpdateFactories(optimizer=optimizer, scheduler=scheduler, rule=rule)
        self.update = describe_update(optimizer, scheduler)
        # built at the first step, once the couplings are known: the fields' and the tracers'
        self._updates: tuple[ScheduledOptimizer, ScheduledOptimizer | None] | None = None
        self.loss: LossName = loss
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else layers[0].weight.device
        self.depth = len(layers)
        self._activations: list[Callable[[Tensor], Tensor]] = [
            get_activation(name).fn for name in network.activation_names
        ]
        names = network.activation_names
        self._kernels = (KERNELS[names[0]], KERNELS[names[-2]])  # phi_1 and phi_{L-1}
        self._middle_kernels = [KERNELS[name] for name in names[1:-2]]  # phi_2 .. phi_{L-2}
        self._readout_kernel = KERNELS[names[-1]]  # phi_L
        self.in_features = layers[0].weight.shape[1]
        self._atoms = (layers[0].weight.shape[0], layers[-1].weight.shape[1])  # M_1, M_L
        self._workspace = Workspace()
        self._input_scale = layers[0].forward_scale
        self._means = {i: _law_mean(layers[i - 1]) for i in range(2, self.depth)}
        self._fields: dict[str, Tensor] = {}
        self._multipliers: dict[str, float] = {}
        for name, value, multiplier, layer in self._initial_fields(layers):
            value = value.detach().to(device=self.device, dtype=dtype).clone()
            self._fields[name] = value
            if not layer.frozen:
                self._multipliers[name] = multiplier
        if not self._multipliers:
            raise ValueError("`network` has no trainable layer: every layer is frozen.")
        self._squares: dict[str, Tensor] = {}  # sum of squared gradients, last step
        self._network = network  # the architecture of coupled networks (with_widths)
        # the degenerate layers' scalars (L >= 4): w_i# and b_i* for 2 <= i <= L-2
        self._scalars = [name for name in self._fields if _is_scalar(name, self.depth)]
        self._tracers: list[tuple[dict[str, Tensor], list[str]]] = []  # (fields, trainable names)
        # L = 2 and L >= 4: every tracer set's fields are views into one tensor per name, so
        # that all coupled networks take their steps in one pass (see couple)
        self._merged: dict[str, Tensor] = {}

    @staticmethod
    def _check_update(
        optimizer: OptimizerCallable, scheduler: SchedulerCallable | None, rule: Rule, depth: int
    ) -> bool:
        """Whether the update is plain SGD at a constant step (the passes step the fields).

        Raises:
            ValueError: an optimizer of the other rule, or weight decay with L >= 3.
        """
        probe = probe_optimizer(optimizer, group_settings(1.0, 1.0, rule))
        check_optimizer_rule(probe)
        reason = update_support(optimizer, rule, depth)
        if reason is not None:
            raise ValueError(f"{reason}; use --limit particles (limit='particles').")
        settings = probe.param_groups[0]
        plain = type(probe) is torch.optim.SGD and scheduler is None
        return plain and not any(settings.get(k) for k in ("momentum", "weight_decay", "maximize"))

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
    def network(self) -> MeanFieldMLP:
        """The network the solver was built from (its architecture; its middle weights unused)."""
        return self._network

    @property
    def fields(self) -> dict[str, Tensor]:
        """The reduced state at the current time (detached views; see the class docstring)."""
        return {name: value.detach() for name, value in self._fields.items()}

    def _chunk_atoms(self, rows: int) -> int:
        """End atoms per chunk for a batch of ``rows`` samples (see ``chunk_size``)."""
        if self.chunk_size is not None:
            return self.chunk_size
        return max(1, CHUNK_ELEMENTS // rows)

    def _end_layer(self, fields: dict[str, Tensor], first: bool) -> EndLayer:
        """The first-layer atoms (``first``) or the last hidden layer's of a field set.

        ``fields`` is the solver's state or a tracer set (same names); see ``endatoms``.
        """
        depth, mu = self.depth, self._means
        if first:
            names = {"theta": "w1", "bias": "b1", "readout": "w2" if depth == 2 else "g2"}
            theta, theta_offset, count = fields["w1"], 0.0, self._atoms[0]
            readout = fields["w2"] if depth == 2 else fields["g2"][None, :]
            readout_offset = 0.0 if depth == 2 else mu[2]
        else:  # H_{L-1}(x, u_L) = (mu_{L-1} + g_{L-1}(u_L)) feature(x) + b_{L-1}(u_L)
            names = {"theta": f"g{depth - 1}", "bias": f"b{depth - 1}", "readout": f"w{depth}"}
            theta, theta_offset = fields[names["theta"]][:, None], mu[depth - 1]
            readout, readout_offset, count = fields[names["readout"]], 0.0, self._atoms[1]
        steps = {
            role: self._scale * self._multipliers[name]
            for role, name in names.items()
            if name in fields and name in self._multipliers
        }
        bias = fields.get(names["bias"])
        return EndLayer(theta, theta_offset, bias, readout, readout_offset, count, steps, names)

    def _middle(self, h2: Tensor) -> list[tuple[Tensor, Tensor]]:
        """``(phi_{i-1}(H_{i-1}*), phi_{i-1}'(H_{i-1}*))`` (P x 1 each) for i = 3 .. L-1.

        From ``h2 = H_2*(x) - b_2`` (P x 1) through the middle scalars,
        ``H_i*(x) = (mu_i + w_i#) phi_{i-1}(H_{i-1}*(x)) + b_i*`` for 3 <= i <= L-2 (§B.3);
        the last value is the last layer's input ``phi_{L-2}(H_{L-2}*)``, the others are what
        ``_middle_backward`` needs.
        """
        f, mu = self._fields, self._means
        h = h2 + f["b2"] if "b2" in f else h2
        slopes = []
        for i, kernel in enumerate(self._middle_kernels, 3):
            value, slope = kernel.value_and_slope(h)
            slopes.append((value, slope))
            if i < self.depth - 1:
                h = (mu[i] + f[f"w{i}#"]) * value + f.get(f"b{i}", 0.0)
        return slopes

    def _middle_backward(
        self, feature_grad: Tensor, slopes: list[tuple[Tensor, Tensor]]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """``dLoss/dH_2*`` (P x 1) and the trainable middle scalars' gradients (chain rule).

        From ``g = dLoss/dfeature * phi_{L-2}'``, down the layers i = L-2 .. 3:
        ``dLoss/db_i* = sum_p g``, ``dLoss/dw_i# = sum_p g phi_{i-1}(H_{i-1}*)``,
        ``g <- g (mu_i + w_i#) phi_{i-1}'(H_{i-1}*)``; then ``dLoss/db_2* = sum_p g``.
        """
        f, mu, trainable = self._fields, self._means, self._multipliers
        grad = feature_grad * slopes[-1][1]
        grads: dict[str, Tensor] = {}
        for i in range(self.depth - 2, 2, -1):
            value, slope = slopes[i - 3]
            if f"b{i}" in trainable:
                grads[f"b{i}"] = grad.sum()
            if f"w{i}#" in trainable:
                grads[f"w{i}#"] = torch.vdot(grad[:, 0], value[:, 0])
            grad = grad * (mu[i] + f[f"w{i}#"]) * slope
        if "b2" in trainable:
            grads["b2"] = grad.sum()
        return grad, grads

    def _readout(self, out: Tensor, bias: Tensor | float) -> Tensor:
        """``yhat = phi_L(H_L)`` from ``H_L - b_L`` (P, out)."""
        return self._activations[self.depth - 1](out + bias)

    def _chunked_forward(
        self, inputs: Tensor, keep: bool = False
    ) -> tuple[Tensor, list[tuple[Tensor, Tensor]], tuple[Tensor | None, Tensor | None]]:
        """``(H_L - b_L, slopes, kept)`` for L = 2 or L >= 4, the end atoms in chunks.

        ``inputs`` is ``s x``. ``slopes``: ``_middle``'s (empty for L = 2), its last value the
        last layer's input ``phi_{L-2}(H_{L-2}*)``. ``kept``: the first and last layers' core
        values kept for the backward pass (``keep``; see ``endatoms.forward_sum``), or ``None``.
        """
        chunk, kernels, space = self._chunk_atoms(inputs.shape[0]), self._kernels, self._workspace
        first_layer = self._end_layer(self._fields, True)
        first, kept = forward_sum(
            first_layer, inputs, kernels[0], chunk, space, "first" if keep else None
        )
        if self.depth == 2:
            return first, [], (kept, None)
        slopes = self._middle(first)
        last = self._end_layer(self._fields, False)
        out, kept_last = forward_sum(
            last, slopes[-1][0], kernels[1], chunk, space, "last" if keep else None
        )
        return out, slopes, (kept, kept_last)

    def _chunked_step(self, x: Tensor, y: Tensor) -> float:
        """One Euler step for L = 2 or L >= 4 (see ``endatoms``); returns the loss before it.

        Forward over the first-layer atoms (to ``H_2*``), the middle scalars, the last-layer
        atoms (to ``H_L``); the loss and ``G = dLoss/dH_L`` (``losses.loss_and_gradient``);
        then back over the last-layer atoms (stepping them, and giving ``dLoss/dfeature``), the
        middle scalars (``_middle_backward``) and the first-layer atoms. Tracer sets take
        their steps with the same ``G`` (and ``dLoss/dH_2*``) and add nothing to the forward
        pass (§B.4 item 3).
        """
        f, depth, kernels, trainable = self._fields, self.depth, self._kernels, self._multipliers
        inputs = self._input_scale * x
        out, slopes, (kept_first, kept_last) = self._chunked_forward(inputs, keep=True)
        bias_name = f"b{depth}"
        prediction, readout_slope = self._readout_kernel.value_and_slope(
            out + f[bias_name] if bias_name in f else out
        )
        loss, prediction_grad = loss_and_gradient(self.loss, prediction, y)
        value = loss.item()
        self._check_loss(value)
        out_grad = prediction_grad.mul_(readout_slope)  # dLoss/dH_L
        chunk, space = self._chunk_atoms(x.shape[0]), self._workspace
        squares: dict[str, Tensor] = {}
        tracers = self._merged  # every coupled network's neurons at once
        first_grad: Tensor | None = out_grad
        if depth >= 4:
            last = self._end_layer(f, False)
            upstream = [name for name in ("w1", "b1", "g2", *self._scalars) if name in trainable]
            features = slopes[-1][0]
            feature_grad = backward_step(
                last,
                features,
                kernels[1],
                out_grad,
                chunk,
                space,
                bool(upstream),
                squares,
                kept_last,
            )
            if tracers:
                tracer_last = self._end_layer(tracers, False)
                backward_step(tracer_last, features, kernels[1], out_grad, chunk, space)
            first_grad = None
            if feature_grad is not None:
                first_grad, scalar_grads = self._middle_backward(feature_grad, slopes)
                self._step_fields(scalar_grads, squares)
        if first_grad is not None:
            first = self._end_layer(f, True)
            backward_step(
                first, inputs, kernels[0], first_grad, chunk, space, False, squares, kept_first
            )
            if tracers:
                tracer_first = self._end_layer(tracers, True)
                backward_step(tracer_first, inputs, kernels[0], first_grad, chunk, space)
        if bias_name in trainable:
            self._step_fields({bias_name: out_grad.sum(0)}, squares)
        self._squares = squares
        return value

    def _step_fields(self, grads: dict[str, Tensor], squares: dict[str, Tensor]) -> None:
        """``f <- f - scale * multiplier * grad`` for solver fields; records the squared grads."""
        with torch.no_grad():
            for name, grad in grads.items():
                squares[name] = grad.square().sum()
                self._fields[name].sub_(grad, alpha=self._scale * self._multipliers[name])

    def _update_sizes(self) -> dict[str, float]:
        """``lr * multiplier * RMS(dLoss/df)`` of each field's last update (for messages)."""
        return {
            name: self.lr
            * self._multipliers[name]
            * (total.item() / self._fields[name].numel()) ** 0.5
            for name, total in self._squares.items()
        }

    def _check_loss(self, loss: float) -> None:
        """Raise ``DivergenceError`` (before any update) unless the loss is finite."""
        if not math.isfinite(loss):
            what = f"the loss is {loss}"
            message = divergence_message(
                "reduced limit solver", what, self.steps, self.time, self._update_sizes()
            )
            raise DivergenceError(message)

    def _table_forward(
        self,
        x: Tensor,
        fields: dict[str, Tensor],
        tracers: Sequence[dict[str, Tensor]] = (),
    ) -> Tensor:
        """``yhat(x)`` of the L = 3 system (autograd-tracked; the table is not chunked).

        ``H_2(x, u_3) = E_{U_1}[(mu_2 + g_2(U_1, u_3)) phi_1(H_1(x, U_1))] + b_2(u_3)``; the
        M_3 x M_1 table dominates the memory, so the P x M intermediates are kept. Each tracer
        set (``mflightning.limit.ideal``) adds ``ghost(z) / M`` terms to the population
        averages: zero in value, with the gradient its tracers' ODEs need. Inside a tracer term
        the atoms' features are detached, so the atoms' gradients are unchanged.
        """
        phi, mu = self._activations, self._means

        def first(values: dict[str, Tensor]) -> Tensor:  # phi_1(H_1(x, u_1)), (P, n)
            return phi[0](self._input_scale * (x @ values["w1"].T) + values.get("b1", 0.0))

        a1, tracer_a1 = first(fields), [first(t) for t in tracers]
        m1, m3 = self._atoms
        h2 = a1 @ (mu[2] + fields["g2"]).T / m1 + fields.get("b2", 0.0)
        for t, a in zip(tracers, tracer_a1, strict=True):  # the tracers u_1 x atoms U_3
            h2 = h2 + ghost(a @ (mu[2] + t["g2:atoms3"]).T) / m1
        out = phi[1](h2) @ fields["w3"].T / m3
        for t, a in zip(tracers, tracer_a1, strict=True):  # atoms U_1 (and tracers) x u_3
            h2_own = a1.detach() @ (mu[2] + t["g2:atoms1"]).T / m1 + t.get("b2", 0.0)
            h2_own = h2_own + ghost(a.detach() @ t["g2"].T) / m1
            out = out + ghost(phi[1](h2_own) @ t["w3"].T) / m3
        return self._readout(out, fields.get("b3", 0.0))

    def _table_step(self, x: Tensor, y: Tensor) -> float:
        """One Euler step for L = 3 by autograd through ``_table_forward``."""
        trainable = self._multipliers
        leaves = {
            name: value.detach().requires_grad_(name in trainable)
            for name, value in self._fields.items()
        }
        tracers = [
            {name: value.detach().requires_grad_(name in moving) for name, value in t.items()}
            for t, moving in self._tracers
        ]
        loss = mean_field_loss(self.loss, self._table_forward(x, leaves, tracers), y)
        value = loss.item()
        self._check_loss(value)
        names = list(trainable)
        moving = [
            (t[name], tracer[name], trainable[name.split(":")[0]])
            for (t, names_t), tracer in zip(self._tracers, tracers, strict=True)
            for name in names_t
        ]
        grads = torch.autograd.grad(
            loss, [leaves[name] for name in names] + [leaf for _, leaf, _ in moving]
        )
        squares: dict[str, Tensor] = {}
        self._step_fields(dict(zip(names, grads, strict=False)), squares)
        self._squares = squares
        with torch.no_grad():
            for (field, _, multiplier), grad in zip(moving, grads[len(names) :], strict=True):
                field.sub_(grad, alpha=self._scale * multiplier)
        return value

    def _raw_step(self, x: Tensor, y: Tensor) -> float:
        """The passes' step ``f <- f - scale * multiplier * dLoss/df``; the loss before it."""
        if self.depth == 3:
            return self._table_step(x, y)
        with self._workspace.split_threads(self.device):
            return self._chunked_step(x, y)

    def _euler_step(self, x: Tensor, y: Tensor) -> float:
        """One step of the networks' update on the reduced state; returns the loss before it.

        Plain SGD: the Euler step ``f <- f - lr * multiplier * dLoss/df``. Otherwise the
        normalized gradients ``G`` come from a raw step of size 1 and the optimizer steps the
        restored fields and tracers with them (module docstring).

        Raises:
            DivergenceError: the loss is not finite (the state is left as it was).
        """
        if self._plain:
            value = self._raw_step(x, y)
            self._clock.tick(None)
            return value
        if self._updates is None:
            self._updates = self._build_updates()
        own, tracers = self._updates
        moving = self._moving()
        before = [tensor.clone() for _, tensor in moving]
        self._scale = 1.0
        value = self._raw_step(x, y)  # a divergence is raised before any field moves
        with torch.no_grad():
            for (_, tensor), old in zip(moving, before, strict=True):
                tensor.grad = old - tensor  # G = multiplier * dLoss/df
                tensor.copy_(old)
        self._clock.tick(own.optimizer)
        own.step()
        if tracers is not None:
            tracers.step()
        return value

    def _moving(self) -> list[tuple[str, Tensor]]:
        """``(name, tensor)`` of the trainable fields, then of the coupled networks' tracers."""
        moving = [(name, self._fields[name]) for name in self._multipliers]
        if self.depth != 3:
            moving += [
                (f"tracers/{name}", tensor)
                for name, tensor in self._merged.items()
                if name.split(":")[0] in self._multipliers
            ]
        else:
            moving += [
                (f"tracers{k}/{name}", fields[name])
                for k, (fields, names) in enumerate(self._tracers)
                for name in names
            ]
        return moving

    def _build_updates(self) -> tuple[ScheduledOptimizer, ScheduledOptimizer | None]:
        """The networks' optimizer over the fields, and a second one over the tracers.

        One group per tensor with multiplier 1 (the gradients handed to it are already
        normalized, §F.5). The tracers' optimizer is not saved (``state_dict``), as the tracers.
        """
        factories = self.update_factories
        optimizer, scheduler = factories["optimizer"], factories["scheduler"]
        groups = [
            {"params": [tensor], "name": name} | group_settings(self.lr, 1.0, factories["rule"])
            for name, tensor in self._moving()
        ]
        own = len(self._multipliers)
        tracers = groups[own:]
        return (
            ScheduledOptimizer(optimizer, scheduler, groups[:own]),
            ScheduledOptimizer(optimizer, scheduler, tracers) if tracers else None,
        )

    def _prepare(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Check the feature count of ``x``, then validate and move the batch."""
        self._check_features(x)
        return super()._prepare(x, y)

    def _check_features(self, x: Tensor) -> None:
        """Refuse an ``x`` that is not ``(batch, d)`` floats, naming the expected ``d``."""
        check_float_input(x)
        if x.dim() != 2 or x.shape[1] != self.in_features:
            raise ValueError(
                f"`x` must have shape (batch, {self.in_features}): the solver's network has "
                f"in_features={self.in_features}, got {tuple(x.shape)}; reshape or select features."
            )

    @torch.no_grad()
    def __call__(self, x: Tensor) -> Tensor:
        """The limit output ``yhat(t, x)`` at the current time, in the solver's dtype.

        Raises:
            ValueError: ``x`` is not a floating ``(batch, d)`` tensor on the solver's device.
        """
        self._check_features(x)
        self._check_device("x", x)
        x = x.to(device=self.device, dtype=self.dtype)
        if self.depth == 3:
            return self._table_forward(x, self._fields)
        with self._workspace.split_threads(self.device):
            out, _, _ = self._chunked_forward(self._input_scale * x)
        return self._readout(out, self._fields.get(f"b{self.depth}", 0.0))

    def couple(
        self,
        widths: Sequence[int],
        generator: torch.Generator | None = None,
        method: str = "ideal",
        dtype: torch.dtype | None = None,
        network: MeanFieldMLP | None = None,
    ) -> tuple[MeanFieldMLP, IdealCoupling]:
        """Couple a width-``widths`` network by ideal-particle integration (§B.4 item 3).

        The network keeps its own iid initial values ``u`` (it is *not* a subsample of the
        atoms); each of its neurons gets the ideal particle integrated from ``u`` under the
        deterministic limit fields (see ``IdealCoupling``). Its
        first-layer rows and readout columns become *tracers* of the solver
        (``mflightning.limit.ideal``) that advance with every later ``step``/``run``.

        Couple at t = 0, before any step: the ideal particles start from the network's
        initial values at the solver's initial time. Couplings are not part of
        ``state_dict``, so a coupled run cannot be resumed (``load_state_dict`` refuses).

        Cost: each coupling adds, per step, O(n_1 P d) for its first-layer tracers and
        O(n_{L-1} P) for its readout tracers (O(n_{L-1} M_1 P + n_1 M_3 P + n_1 n_2 P) for
        L = 3, whose tracers need the table g against the atoms); memory O(n_1 d + n_{L-1})
        (L = 3: O(n_1 M_3 + n_2 M_1 + n_1 n_2)). The solver's own state and outputs are
        unchanged (the tracer terms are exactly zero).

        Args:
            widths: hidden widths ``n_1 .. n_{L-1}`` of the coupled network.
            generator: CPU generator for the fresh network's initial weights (``None``: torch's
                global one); unused when ``network`` is given.
            method: ``"ideal"`` (the only coupling of the reduced solver).
            dtype: dtype of the fresh network (default: the solver's); the ideal particles are in
                the solver's dtype.
            network: couple this network (at its initialization) instead of drawing a fresh one:
                same architecture as the solver's network, with widths ``widths``; it is not
                modified (its current weights are read as ``u``) and is returned.

        Returns:
            ``(network, coupling)``; at t = 0 ``coupling.ideal_weights()`` equals the network's
            weights (in the solver's dtype).

        Raises:
            ValueError: the solver has already stepped, or a bad ``widths``, ``method``,
                ``generator``, ``dtype`` or ``network``.
        """
        if self.steps != 0:
            raise ValueError(
                f"couple the network at t = 0: the solver has taken {self.steps} steps, and the "
                "ideal particles start from the network's initial values at the solver's start; "
                "build a fresh ReducedLimitSolver and couple before stepping it."
            )
        if method != "ideal":
            raise ValueError(
                f"unknown `method` {method!r}: the reduced solver couples by ideal-particle "
                "integration only ('ideal', §B.4 item 3); subsampling needs a ParticleLimitSolver."
            )
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(
                f"`generator` must be a torch.Generator or None, got {type(generator).__name__}."
            )
        if dtype is not None and (
            not isinstance(dtype, torch.dtype) or not dtype.is_floating_point
        ):
            raise ValueError(f"`dtype` must be a floating torch dtype or None, got {dtype!r}.")
        template = self._network
        if isinstance(widths, (int, str)) or len(widths) != self.depth - 1:
            raise ValueError(
                f"`widths` must list {self.depth - 1} hidden widths (one per hidden layer of the "
                f"solver's network), got {widths!r}."
            )
        if network is None:
            small = template.with_widths(widths, generator=generator)
            small.to(device=self.device, dtype=dtype or self.dtype)
        else:
            expected = template.with_widths(widths, generator=torch.Generator()).to_config()
            if not isinstance(network, MeanFieldMLP) or network.to_config() != expected:
                raise ValueError(
                    "`network` must be a MeanFieldMLP of the solver's architecture with widths "
                    f"{list(widths)} (same laws, activations, biases and frozen layers)."
                )
            _check_reducible(network)
            small = network
        tracers = tracer_fields(small, self.fields, self.dtype, self.device)
        trainable = [name for name in tracers if name.split(":")[0] in self._multipliers]
        self._tracers.append((tracers, trainable))
        if self.depth != 3:
            self._merge_tracers()
        return small, IdealCoupling(self, small, tracers)

    def _merge_tracers(self) -> None:
        """Concatenate the tracer sets' fields along their neurons, each set keeping views.

        The sets' dictionaries (held by their ``IdealCoupling``) get views into the merged
        tensors, so the chunked step moves every coupled network in one pass per end layer.
        """
        readout = f"w{self.depth}"  # (out, n): neurons along dim 1
        for name in self._tracers[0][0]:
            dim = 1 if name == readout else 0
            merged = torch.cat([t[name] for t, _ in self._tracers], dim=dim)
            start = 0
            for t, _ in self._tracers:
                size = t[name].shape[dim]
                t[name] = merged.narrow(dim, start, size)
                start += size
            self._merged[name] = merged

    def state_dict(self) -> dict[str, Any]:
        """Fields, clock, optimizer state, ``lr``, ``loss`` and the update description.

        Plain tensors/ints/floats/strings: loadable with ``torch.load(..., weights_only=True)``.
        The coupled networks' tracers and their optimizer are not part of it.
        """
        state: dict[str, Any] = {
            "fields": {name: value.detach().clone() for name, value in self._fields.items()},
            "steps": self.steps,
            "clock": self._clock.state_dict(),
            "lr": self.lr,
            "loss": self.loss,
            "update": self.update,
        }
        if self._updates is not None:
            state["optimizer"] = self._updates[0].state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume exactly from ``state_dict`` (same architecture, ``lr`` and ``loss``).

        Raises:
            ValueError: another ``lr`` or ``loss``, fields of another architecture, NaN or
                infinite fields, a negative or non-integer step count, or a solver with
                couplings (their tracers are not saved).
        """
        if self._tracers:
            raise ValueError(
                "this solver has coupled networks (couple): their tracers are not part of the "
                "state, so it cannot jump to a saved time; load into a solver without couplings."
            )
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
        load_clock(self._clock, state_dict)
        if "optimizer" in state_dict:
            self._updates = self._build_updates()
            self._updates[0].load_state_dict(state_dict["optimizer"])
