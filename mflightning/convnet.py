"""``MeanFieldConvNet``: a mean-field convolutional network (docs/theory.md §E.3 item 18).

Channels are the neurons. With ``C_0`` input channels and hidden channel counts ``C_1 .. C_{L-1}``:

    H_1      = input_scale * conv(x, W_1) (+ b_1)                     layer1, role "input"
    H_i      = (1/C_{i-1}) conv(phi_{i-1}(H_{i-1}), W_i) (+ b_i)      layer2 .. layer{L-1}
    a        = mean over positions of phi_{L-1}(H_{L-1})               global average pooling
    yhat     = phi_L( (1/C_{L-1}) W_L a (+ b_L) )                      layer{L}, role "readout"

Kernel positions are summed inside each convolution (``padding = kernel_size // 2`` keeps the
image size) and the readout sees one feature per channel, so every lr multiplier counts channels:
``C_{i-1} C_i`` (§1.2). The channel mapping itself is unverified against the papers (§E.3 item 18).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
from torch import Tensor

from mflightning.diagnostics import warn_trivial_limits
from mflightning.laws import InitLaw
from mflightning.nn import ZERO, MeanFieldConv2d, MeanFieldLinear, check_positive_int
from mflightning.stack import MeanFieldStack, check_input_dtype, layer_role, naming_layer


class MeanFieldConvNet(MeanFieldStack):
    """Mean-field convolutions ``layer1 .. layer{L-1}``, average pooling, readout ``layerL``.

    Args:
        in_channels: input channels ``C_0`` (3 for CIFAR-10).
        channels: hidden channel counts ``C_1 .. C_{L-1}`` (the widths).
        out_features: outputs (classes).
        kernel_size: square kernel size of every convolution (odd; "same" padding).
        activations: ``phi_1 .. phi_L`` by name (see ``MeanFieldMLP``).
        init: one law per weight layer, or one for all (defaults as for the MLP).
        bias: give every layer a bias drawn from ``bias_init``.
        frozen: layers that never train: ``"input"``, ``"readout"`` or ``"layer<i>"``.
        input_scale: factor in front of the first convolution's sum over inputs.
        bias_init: law of the initial biases.
        generator: random generator for the initial weights.
    """

    width_argument = "channels"

    def __init__(
        self,
        in_channels: int,
        channels: Sequence[int],
        out_features: int = 10,
        kernel_size: int = 3,
        activations: str | Sequence[str] | None = None,
        init: InitLaw | Sequence[InitLaw] | None = None,
        bias: bool = False,
        frozen: Sequence[str] = (),
        input_scale: float = 1.0,
        bias_init: InitLaw = ZERO,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        check_positive_int("in_channels", in_channels)
        check_positive_int("out_features", out_features)
        check_positive_int("kernel_size", kernel_size)
        if kernel_size % 2 == 0:
            raise ValueError(f"`kernel_size` must be odd for 'same' padding, got {kernel_size}.")
        config = {
            "in_channels": in_channels,
            "out_features": out_features,
            "kernel_size": kernel_size,
            "bias": bias,
            "input_scale": input_scale,
            "bias_init": bias_init,
        }
        laws, frozen_layers = self._setup_stack(channels, activations, init, frozen, config)
        sizes = [in_channels, *channels]
        depth = self.depth
        for i in range(1, depth):
            role = layer_role(i, depth)
            with naming_layer(i):
                conv = MeanFieldConv2d(
                    sizes[i - 1],
                    sizes[i],
                    kernel_size,
                    padding=kernel_size // 2,
                    bias=bias,
                    role=role,
                    init=laws[i - 1],
                    bias_init=bias_init,
                    frozen=i in frozen_layers,
                    input_scale=input_scale if role == "input" else 1.0,
                    generator=generator,
                )
            self.add_module(f"layer{i}", conv)
        with naming_layer(depth):
            readout = MeanFieldLinear(
                sizes[-1],
                out_features,
                bias=bias,
                role="readout",
                init=laws[-1],
                bias_init=bias_init,
                frozen=depth in frozen_layers,
                generator=generator,
            )
        self.add_module(f"layer{depth}", readout)
        warn_trivial_limits(self)

    def check_input(self, x: Tensor, name: str = "x") -> None:
        """Raise ``ValueError`` naming ``name`` unless ``x`` is ``([batch,] C_in, H, W)`` floats.

        The dtype must be the weights' (under autocast, any floating dtype).
        """
        first = cast(MeanFieldConv2d, self.layer1)
        if not isinstance(x, Tensor) or x.dim() not in (3, 4) or x.shape[-3] != first.in_channels:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(
                f"`{name}` must have shape (batch, {first.in_channels}, height, width) for this "
                f"network (in_channels={first.in_channels}), got {shape}; images need a channel "
                "dimension, e.g. x.unsqueeze(1) for grey-scale."
            )
        check_input_dtype(x, first.weight, name)

    def forward(self, x: Tensor) -> Tensor:
        """``phi_L(readout(mean over positions of the last hidden activations)))``.

        Raises:
            ValueError: ``x`` has the wrong shape, channel count or dtype.
        """
        self.check_input(x)
        *convs, readout = self.layers
        *hidden, last = self._activations
        for conv, activation in zip(convs, hidden, strict=True):
            x = activation.fn(conv(x))
        return last.fn(readout(x.mean(dim=(-2, -1))))

    def hidden_preactivations(self, x: Tensor) -> list[Tensor]:
        """``[H_1, ..., H_{L-1}, H_L]``; conv ones as ``(batch * positions, C_i)`` matrices.

        Each (input, position) pair is one row and each channel (neuron) one column, so
        ``mflightning.functional.neuron_spread`` measures the spread over channels (§C.6).
        """
        *convs, readout = self.layers
        preactivations = []
        for conv, activation in zip(convs, self._activations, strict=False):
            h = conv(x)
            preactivations.append(h.movedim(1, -1).reshape(-1, h.shape[1]))
            x = activation.fn(h)
        preactivations.append(readout(x.mean(dim=(-2, -1))))
        return preactivations
