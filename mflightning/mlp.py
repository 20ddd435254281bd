"""``MeanFieldMLP``: the L-layer perceptron of docs/theory.md §1.1 built from mean-field layers.

    H_1(x)  = input_scale * W_1 x (+ b_1)                       layer1, role "input"
    H_i(x)  = (1/n_{i-1}) W_i phi_{i-1}(H_{i-1}(x)) (+ b_i)     layer2 .. layer{L-1}, role "hidden"
    yhat(x) = phi_L( (1/n_{L-1}) W_L phi_{L-1}(H_{L-1}(x)) )    layer{L}, role "readout"

``widths`` are the hidden sizes n_1 .. n_{L-1}, so ``L = len(widths) + 1`` weight layers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import cast

import torch
from torch import Tensor

from mflightning.diagnostics import warn_trivial_limits
from mflightning.laws import InitLaw
from mflightning.nn import ZERO, MeanFieldLinear, check_positive_int
from mflightning.stack import MeanFieldStack, check_input_dtype, layer_role, naming_layer


def _shape_message(x: object, features: int, name: str) -> str:
    """Why ``x`` is not a ``(batch, features)`` input of a ``MeanFieldMLP``, and the fix."""
    if not isinstance(x, Tensor):
        return (
            f"`{name}` must be a tensor of shape (batch, {features}), got {type(x).__name__}; "
            f"convert it with torch.as_tensor({name}, dtype=torch.float32)."
        )
    shape = tuple(x.shape)
    if x.dim() > 2 and math.prod(shape[1:]) == features:
        fix = f"flatten each example with {name}.flatten(1)"
    elif x.dim() > 2 and shape[-1] == features:
        fix = (
            f"fold the extra dimensions into the batch with {name}.reshape(-1, {features}) "
            "(and the targets alike)"
        )
    elif x.dim() == 1 and shape[0] == features:
        fix = f"add the batch dimension with {name}.unsqueeze(0)"
    else:
        fix = "reshape or select features"
    return (
        f"`{name}` must have shape (batch, {features}) for this network (in_features={features}), "
        f"got {shape}: MeanFieldMLP takes (batch, in_features) inputs; {fix}."
    )


class MeanFieldMLP(MeanFieldStack):
    """A mean-field multilayer perceptron (docs/theory.md §1.1) with layers ``layer1 .. layerL``.

    Args:
        in_features: input dimension d.
        widths: hidden widths ``n_1 .. n_{L-1}`` (at least one).
        out_features: output dimension (1 in the theory; C for C-class readouts, §E.3 item 16).
        activations: ``phi_1 .. phi_L`` by name (one per weight layer, or one name for all hidden
            layers when a single string is given, the output then being ``"identity"``). Default:
            ``"relu"`` for hidden layers and ``"identity"`` at the output.
        init: one law per weight layer, or one law for all. Default: ``Normal(0, 1)`` for the input
            layer, ``Normal(1, 0.5)`` for hidden layers, ``Normal(0, 1)`` for the readout.
        bias: give every layer a bias (drawn from ``bias_init``, default constant 0).
        frozen: layers that never train, by name: ``"input"``, ``"readout"`` or ``"layer<i>"``
            (``("input", "readout")`` is the Araújo–Oliveira–Yukimura setting).
        input_scale: factor in front of the first layer's sum over input coordinates (§E.3 item 19).
        bias_init: law of the initial biases.
        generator: random generator for the initial weights.
    """

    def __init__(
        self,
        in_features: int,
        widths: Sequence[int],
        out_features: int = 1,
        activations: str | Sequence[str] | None = None,
        init: InitLaw | Sequence[InitLaw] | None = None,
        bias: bool = False,
        frozen: Sequence[str] = (),
        input_scale: float = 1.0,
        bias_init: InitLaw = ZERO,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        check_positive_int("in_features", in_features)
        check_positive_int("out_features", out_features)
        config = {
            "in_features": in_features,
            "out_features": out_features,
            "bias": bias,
            "input_scale": input_scale,
            "bias_init": bias_init,
        }
        laws, frozen_layers = self._setup_stack(widths, activations, init, frozen, config)
        sizes = [in_features, *widths, out_features]
        for i in range(1, self.depth + 1):
            role = layer_role(i, self.depth)
            with naming_layer(i):
                layer = MeanFieldLinear(
                    sizes[i - 1],
                    sizes[i],
                    bias=bias,
                    role=role,
                    init=laws[i - 1],
                    bias_init=bias_init,
                    frozen=i in frozen_layers,
                    input_scale=input_scale if role == "input" else 1.0,
                    generator=generator,
                )
            self.add_module(f"layer{i}", layer)
        warn_trivial_limits(self)

    def check_input(self, x: Tensor, name: str = "x") -> None:
        """Raise ``ValueError`` naming ``name`` unless ``x`` is ``(batch, in_features)`` floats.

        The dtype must be the weights' (under autocast, any floating dtype). The message of a
        refused shape says how to fix it: ``flatten(1)`` for images, ``unsqueeze(0)`` for one
        example, ``reshape(-1, in_features)`` for extra leading dimensions.
        """
        first = cast(MeanFieldLinear, self.layer1)
        if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[1] != first.in_features:
            raise ValueError(_shape_message(x, first.in_features, name))
        check_input_dtype(x, first.weight, name)

    def forward(self, x: Tensor) -> Tensor:
        """``phi_L(H_L(x))`` with ``H_i`` of §1.1.

        Raises:
            ValueError: ``x`` has the wrong feature size or dtype.
        """
        self.check_input(x)
        for layer, activation in zip(self.layers, self._activations, strict=True):
            x = activation.fn(layer(x))
        return x

    def hidden_preactivations(self, x: Tensor) -> list[Tensor]:
        """``[H_1(x), ..., H_L(x)]``, each ``(batch, n_i)``; the readout's is ``(batch, out)``."""
        preactivations = []
        for layer, activation in zip(self.layers, self._activations, strict=True):
            h = layer(x)
            preactivations.append(h)
            x = activation.fn(h)
        return preactivations
