"""Construction-time checks for trivial deep mean-field limits (docs/theory.md §B.3, §E.1 item 4).

* A zero-mean middle layer (2 <= i <= L-1) makes its limit pre-activation ``H_i`` start at 0: the
  layer's neurons only carry O(N^-1/2) fluctuations at t = 0.
* For L >= 4 an odd ``phi_1`` with a law of the first layer symmetric about 0 (and no bias, or a
  symmetric bias law) gives ``E[phi_1(<U_1, x>)] = 0``: the degenerate middle feature ``H_2*``
  vanishes and, with a zero-mean readout, every drift vanishes: the limit never moves.
"""

from __future__ import annotations

import warnings

from torch import nn

from mflightning.scaling import mean_field_layers
from mflightning.stack import MeanFieldStack


class TrivialLimitWarning(UserWarning):
    """The network's mean-field limit is degenerate at initialization (§B.3)."""


def trivial_limit_reasons(network: nn.Module) -> list[str]:
    """Human-readable reasons why ``network``'s deep MF limit is trivial (empty when fine)."""
    reasons = []
    for path, layer in mean_field_layers(network):
        if layer.role == "hidden" and layer.init_law.mean == 0:
            reasons.append(
                f"middle layer '{path}' has a zero-mean init law ({layer.init_law}): its limit "
                "pre-activation H_i starts at 0 (§B.3); use a non-zero mean, e.g. Normal(1.0, 0.5)."
            )
    if isinstance(network, MeanFieldStack) and network.depth >= 4:
        first = network.layers[0]
        symmetric_bias = first.bias is None or first.bias_init_law.is_symmetric
        if network.activation_is_odd[0] and first.init_law.is_symmetric and symmetric_bias:
            reasons.append(
                f"odd first activation '{network.activation_names[0]}' with a symmetric "
                f"first-layer law ({first.init_law}) gives E[phi_1(<U_1, x>)] = 0: the degenerate "
                "middle feature H_2* vanishes and the deep limit can be stationary (§B.3); "
                "use 'relu' in layer 1, a non-symmetric law, or a bias."
            )
    return reasons


def warn_trivial_limits(network: nn.Module) -> None:
    """Emit one ``TrivialLimitWarning`` per reason found by ``trivial_limit_reasons``."""
    for reason in trivial_limit_reasons(network):
        warnings.warn(reason, TrivialLimitWarning, stacklevel=3)
