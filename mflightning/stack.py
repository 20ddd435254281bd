"""``MeanFieldStack``: what every MF network of L weight layers shares (docs/theory.md §1.1).

Layers are registered as ``layer1 .. layerL`` (NP indexing w_1 .. w_L): ``layer1`` has role
``"input"``, ``layerL`` role ``"readout"``, the others ``"hidden"``. Per layer: an activation
``phi_i`` by name, a width-independent init law, and an optional ``frozen`` flag (by name:
``"input"``, ``"readout"`` or ``"layer<i>"``). The constructor arguments are kept as plain data
(``to_config``), so ``with_widths`` rebuilds the same architecture at other widths and
checkpoints rebuild it without pickles.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from typing_extensions import Self

from mflightning.activations import Activation, get_activation
from mflightning.laws import InitLaw, Normal, as_law, law_config
from mflightning.nn import MeanFieldLayer, Role, check_positive_int

DEFAULT_INPUT_LAW = Normal(0.0, 1.0)
# non-zero mean: zero-mean middle layers give a trivial limit (§B.3)
DEFAULT_HIDDEN_LAW = Normal(1.0, 0.5)
DEFAULT_READOUT_LAW = Normal(0.0, 1.0)


def per_layer(value: Any, depth: int, name: str) -> list[Any]:
    """Broadcast one value to ``depth`` layers, or check that a sequence has ``depth`` entries."""
    if isinstance(value, (str, InitLaw)) or callable(value):
        return [value] * depth
    values = list(value)
    if len(values) != depth:
        raise ValueError(
            f"`{name}` has {len(values)} entries but the network has {depth} weight layers "
            f"(hidden widths + 1); give one entry per layer or a single value for all."
        )
    return values


def check_input_dtype(x: Tensor, weight: Tensor, name: str) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``x`` has the weights' dtype (or autocast)."""
    if x.dtype != weight.dtype and not (
        x.is_floating_point() and torch.is_autocast_enabled(x.device.type)
    ):
        raise ValueError(
            f"`{name}` has dtype {x.dtype} but the network's weights are {weight.dtype}; "
            f"convert it with {name}.to({weight.dtype})."
        )


def layer_role(index: int, depth: int) -> Role:
    """Role of weight layer ``index`` (1-based) in a stack of ``depth`` layers."""
    return "input" if index == 1 else "readout" if index == depth else "hidden"


@contextlib.contextmanager
def naming_layer(index: int) -> Iterator[None]:
    """Prefix the ``ValueError`` of a layer's constructor with the layer's name ``layer<i>``."""
    try:
        yield
    except ValueError as error:
        raise ValueError(f"layer{index}: {error}") from error


class MeanFieldStack(nn.Module):
    """Base class of ``MeanFieldMLP`` and ``MeanFieldConvNet``.

    Subclasses call ``_setup_stack`` first, then register ``layer1 .. layerL``.
    """

    width_argument = "widths"  # the constructor argument that holds the hidden widths
    _activations: list[Activation]
    _config: dict[str, Any]

    def _setup_stack(
        self,
        widths: Sequence[int],
        activations: str | Sequence[str] | None,
        init: InitLaw | Sequence[InitLaw] | None,
        frozen: str | Sequence[str],
        config: dict[str, Any],
    ) -> tuple[list[InitLaw], set[int]]:
        """Validate the per-layer arguments; returns the laws and the frozen layer indices."""
        name = self.width_argument
        if isinstance(widths, (int, str)) or len(widths) == 0:
            raise ValueError(
                f"`{name}` must be a non-empty list of hidden widths such as [256, 256], "
                f"got {widths!r}."
            )
        for i, width in enumerate(widths):
            check_positive_int(f"{name}[{i}]", width)
        depth = len(widths) + 1
        if activations is None:
            activations = ["relu"] * (depth - 1) + ["identity"]
        elif isinstance(activations, str):
            activations = [activations] * (depth - 1) + ["identity"]
        names = per_layer(activations, depth, "activations")
        self._activations = [get_activation(a, f"activations[{i}]") for i, a in enumerate(names)]
        if init is None:
            init = [DEFAULT_INPUT_LAW] + [DEFAULT_HIDDEN_LAW] * (depth - 2) + [DEFAULT_READOUT_LAW]
        laws = [as_law(law, f"init[{i}]") for i, law in enumerate(per_layer(init, depth, "init"))]
        frozen = (frozen,) if isinstance(frozen, str) else tuple(frozen)
        frozen_layers = {self._resolve_layer_name(layer, depth) for layer in frozen}
        self._config = config | {
            name: list(widths),
            "activations": names,
            "init": laws,
            "frozen": list(frozen),
        }
        return laws, frozen_layers

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
    def layers(self) -> list[MeanFieldLayer]:
        """The weight layers ``layer1 .. layerL`` in order."""
        return [module for module in self.children() if isinstance(module, MeanFieldLayer)]

    @property
    def depth(self) -> int:
        """L, the number of weight layers."""
        return len(self.widths) + 1

    @property
    def widths(self) -> list[int]:
        """Hidden widths ``n_1 .. n_{L-1}`` (channels for a conv net)."""
        return list(self._config[self.width_argument])

    @property
    def activation_names(self) -> list[str]:
        """Names of ``phi_1 .. phi_L``."""
        return [a.name for a in self._activations]

    @property
    def activation_is_odd(self) -> list[bool]:
        """Parity of ``phi_1 .. phi_L`` (used by the trivial-limit check, §B.3)."""
        return [a.odd for a in self._activations]

    def check_input(self, x: Tensor, name: str = "x") -> None:
        """Raise ``ValueError`` naming ``name`` unless ``x`` fits the network (defined by each)."""
        raise NotImplementedError

    def hidden_preactivations(self, x: Tensor) -> list[Tensor]:
        """``[H_1(x), ..., H_L(x)]`` as ``(rows, neurons)`` matrices (defined by each network)."""
        raise NotImplementedError

    def with_widths(self, widths: Sequence[int], generator: torch.Generator | None = None) -> Self:
        """The same architecture (laws, activations, frozen layers, biases) at other widths.

        The weights are freshly drawn (with ``generator`` if given).
        """
        return type(self)(
            **{**self._config, self.width_argument: list(widths)}, generator=generator
        )

    def to_config(self) -> dict[str, Any]:
        """Plain-data ``{"class_path", "init_args"}`` description of this architecture.

        ``mflightning.config.build`` turns it back into a (freshly drawn) network.
        """
        args = dict(self._config)
        args["init"] = [law_config(law) for law in args["init"]]
        args["bias_init"] = law_config(args["bias_init"])
        return {"class_path": f"{type(self).__module__}.{type(self).__name__}", "init_args": args}
