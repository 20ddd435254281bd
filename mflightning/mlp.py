"""``MeanFieldMLP``: the L-layer perceptron of mf-theory.md §1.1 built from mean-field layers.

    H_1(x)  = input_scale * W_1 x (+ b_1)                       layer1, role "input"
    H_i(x)  = (1/n_{i-1}) W_i phi_{i-1}(H_{i-1}(x)) (+ b_i)     layer2 .. layer{L-1}, role "hidden"
    yhat(x) = phi_L( (1/n_{L-1}) W_L phi_{L-1}(H_{L-1}(x)) )    layer{L}, role "readout"

``widths`` are the hidden sizes n_1 .. n_{L-1}, so ``L = len(widths) + 1`` weight layers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mflightning.activations import get_activation
from mflightning.laws import InitLaw, Normal, as_law, law_config
from mflightning.nn import ZERO, MeanFieldLinear, Role, check_positive_int

DEFAULT_INPUT_LAW = Normal(0.0, 1.0)
# non-zero mean: zero-mean middle layers give a trivial limit (§B.3)
DEFAULT_HIDDEN_LAW = Normal(1.0, 0.5)
DEFAULT_READOUT_LAW = Normal(0.0, 1.0)


def _per_layer(value: Any, depth: int, name: str) -> list[Any]:
    """Broadcast one value to ``depth`` layers, or check that a sequence has ``depth`` entries."""
    if isinstance(value, (str, InitLaw)) or callable(value):
        return [value] * depth
    values = list(value)
    if len(values) != depth:
        raise ValueError(
            f"`{name}` has {len(values)} entries but the network has {depth} weight layers "
            f"(len(widths) + 1); give one entry per layer or a single value for all."
        )
    return values


class MeanFieldMLP(nn.Module):
    """A mean-field multilayer perceptron (mf-theory.md §1.1) with layers ``layer1 .. layerL``.

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
        if isinstance(widths, (int, str)) or len(widths) == 0:
            raise ValueError(
                "`widths` must be a non-empty list of hidden widths such as [256, 256], "
                f"got {widths!r}."
            )
        for i, width in enumerate(widths):
            check_positive_int(f"widths[{i}]", width)
        depth = len(widths) + 1
        if activations is None:
            activations = ["relu"] * (depth - 1) + ["identity"]
        elif isinstance(activations, str):
            activations = [activations] * (depth - 1) + ["identity"]
        activation_names = _per_layer(activations, depth, "activations")
        self._activations = [
            get_activation(a, f"activations[{i}]") for i, a in enumerate(activation_names)
        ]
        if init is None:
            init = [DEFAULT_INPUT_LAW] + [DEFAULT_HIDDEN_LAW] * (depth - 2) + [DEFAULT_READOUT_LAW]
        laws = [as_law(law, f"init[{i}]") for i, law in enumerate(_per_layer(init, depth, "init"))]
        if isinstance(frozen, str):
            frozen = (frozen,)
        frozen_layers = {self._resolve_layer_name(name, depth) for name in frozen}

        self._config: dict[str, Any] = {
            "in_features": in_features,
            "widths": list(widths),
            "out_features": out_features,
            "activations": activation_names,
            "init": laws,
            "bias": bias,
            "frozen": list(frozen),
            "input_scale": input_scale,
            "bias_init": bias_init,
        }
        sizes = [in_features, *widths, out_features]
        for i in range(1, depth + 1):
            role: Role = "input" if i == 1 else "readout" if i == depth else "hidden"
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

    @staticmethod
    def _resolve_layer_name(name: str, depth: int) -> int:
        """Map ``"input"``, ``"readout"`` or ``"layer<i>"`` to the layer index i (1-based)."""
        aliases = {"input": 1, "readout": depth} | {f"layer{i}": i for i in range(1, depth + 1)}
        if name not in aliases:
            raise ValueError(
                f"`frozen` names a missing layer {name!r}; valid names: {list(aliases)}."
            )
        return aliases[name]

    @property
    def layers(self) -> list[MeanFieldLinear]:
        """The weight layers ``layer1 .. layerL`` in order."""
        return [module for module in self.children() if isinstance(module, MeanFieldLinear)]

    @property
    def depth(self) -> int:
        """L, the number of weight layers."""
        return len(self._config["widths"]) + 1

    @property
    def widths(self) -> list[int]:
        """Hidden widths ``n_1 .. n_{L-1}``."""
        return list(self._config["widths"])

    @property
    def activation_names(self) -> list[str]:
        """Names of ``phi_1 .. phi_L``."""
        return [a.name for a in self._activations]

    @property
    def activation_is_odd(self) -> list[bool]:
        """Parity of ``phi_1 .. phi_L`` (used by the trivial-limit check, §B.3)."""
        return [a.odd for a in self._activations]

    def forward(self, x: Tensor) -> Tensor:
        """``phi_L(H_L(x))`` with ``H_i`` of §1.1."""
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

    def with_widths(
        self, widths: Sequence[int], generator: torch.Generator | None = None
    ) -> MeanFieldMLP:
        """The same architecture (laws, activations, frozen layers, biases) at other widths.

        The weights are freshly drawn (with ``generator`` if given).
        """
        return MeanFieldMLP(**{**self._config, "widths": list(widths)}, generator=generator)

    def to_config(self) -> dict[str, Any]:
        """Plain-data ``{"class_path", "init_args"}`` description of this architecture.

        :func:`mflightning.config.build` turns it back into a (freshly drawn) network.
        """
        args = dict(self._config)
        args["init"] = [law_config(law) for law in args["init"]]
        args["bias_init"] = law_config(args["bias_init"])
        return {"class_path": f"{type(self).__module__}.{type(self).__name__}", "init_args": args}
