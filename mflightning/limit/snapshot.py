"""What a finite network is compared with: the limit at one time, and the gaps to it (§C).

A ``LimitSnapshot`` holds the limit's output on the probe inputs, its loss on the loss data
and (for coupled runs) the ideal particles of the finite network's weights. ``take_snapshot``
reads one off a live solver; ``gaps_to_limit`` measures a finite network against one:

* ``limit/output_gap``: RMS over the probe of ``yhat_N(x) - yhat_inf(x)`` (§C.1);
* ``limit/relative_output_gap``: the same over the output size
  (``mflightning.functional.relative_output_gap``; above 1/2 the network has left the limit);
* ``limit/loss_gap``:   ``|L_N - L_inf|`` on the loss data (§C.2);
* ``limit/dev/<layer>``: RMS over the layer's weights of ``w - w_ideal`` (§C.3), trained layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mflightning.functional import (
    coupled_deviation,
    loss_gap,
    output_gap,
    relative_output_gap,
)
from mflightning.guards import DivergenceError
from mflightning.limit.coupling import Coupling
from mflightning.limit.ideal import IdealCoupling
from mflightning.limit.solver import EulerSolver
from mflightning.losses import LossName, mean_field_loss
from mflightning.scaling import mean_field_layers

LabelledData = tuple[Tensor, Tensor]


@dataclass(frozen=True)
class LimitSnapshot:
    """The mean-field limit at one physical time.

    Attributes:
        time: the limit's physical time ``t``.
        output: limit output on the probe inputs.
        loss: limit loss on the loss data (``None`` when there is none).
        ideal_weights: ``{layer name: ideal particles}`` of a coupled network (``None`` if
            uncoupled).
    """

    time: float
    output: Tensor
    loss: Tensor | None
    ideal_weights: dict[str, Tensor] | None


@torch.no_grad()
def take_snapshot(
    solver: EulerSolver,
    probe: Tensor,
    loss_data: LabelledData | None = None,
    coupling: Coupling | IdealCoupling | None = None,
) -> LimitSnapshot:
    """Read the solver's current output, loss and (coupled) ideal weights."""
    output = solver(probe)
    loss = None
    if loss_data is not None:
        x, y = loss_data
        prediction = output if x is probe else solver(x)  # the probe's targets: one evaluation
        loss = mean_field_loss(solver.loss, prediction, y.to(solver.device))
    ideal = None if coupling is None else coupling.ideal_weights()
    return LimitSnapshot(solver.time, output, loss, ideal)


def _finite(what: str, value: Tensor) -> Tensor:
    """``value``, or a ``DivergenceError`` naming ``what`` if it has NaN or inf."""
    if not torch.isfinite(value).all():
        raise DivergenceError(f"the network's {what} is not finite")
    return value


@torch.no_grad()
def gaps_to_limit(
    network: nn.Module,
    loss: LossName,
    snapshot: LimitSnapshot,
    probe: Tensor,
    loss_data: LabelledData | None = None,
) -> dict[str, float]:
    """The §C gaps of ``network`` to ``snapshot`` (keys in the module docstring), plus its time.

    ``probe`` and ``loss_data`` must be the inputs the snapshot was taken on.

    Raises:
        DivergenceError: the network's output or loss is not finite.
    """
    weight = next(network.parameters())

    def finite(x: Tensor) -> Tensor:
        return network(x.to(device=weight.device, dtype=weight.dtype))

    output = _finite("output on the probe", finite(probe))
    values = {
        "limit/output_gap": output_gap(output, snapshot.output),
        "limit/relative_output_gap": relative_output_gap(output, snapshot.output),
    }
    if loss_data is not None and snapshot.loss is not None:
        x, y = loss_data
        prediction = output if x is probe else finite(x)
        network_loss = mean_field_loss(loss, prediction, y.to(weight.device))
        values["limit/loss_gap"] = loss_gap(_finite("loss", network_loss), snapshot.loss)
    if snapshot.ideal_weights is not None:
        # frozen layers never leave their ideal particles: their deviation is only rounding
        trained = {
            name: layer.weight for name, layer in mean_field_layers(network) if not layer.frozen
        }
        ideal = {name: snapshot.ideal_weights[name] for name in trained}
        for name, dev in coupled_deviation(trained, ideal).items():
            values[f"limit/dev/{name}"] = dev
    return {key: float(value) for key, value in values.items()} | {"limit/time": snapshot.time}
