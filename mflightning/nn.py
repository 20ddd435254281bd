"""Mean-field layers: ``torch.nn`` signatures plus a role, a width-independent law and ``frozen``.

The forward pass follows docs/theory.md §1.1: a layer whose inputs are neurons (role ``"hidden"`` or
``"readout"``) *averages* over them, ``H = (1/n_in) W a + b``; the ``"input"`` layer *sums* over
the data coordinates, ``H = input_scale * W x + b`` (no ``1/d``, §E.3 item 19). For convolutions
the neurons are the channels: the average is over input channels, kernel positions are summed
(§E.3 item 18).

Learning-rate multipliers (§1.2) are derived from the layer itself: a weight's multiplier is the
number of neurons on each side of it, counting the data input and the output as one,

    lr_multiplier      = (n_in if role != "input" else 1) * (n_out if role != "readout" else 1)
    bias_lr_multiplier = (n_out if role != "readout" else 1).

All scale factors are plain module attributes; nothing is stored on the Parameters.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal, get_args

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.common_types import _size_1_t, _size_2_t

from mflightning.laws import InitLaw, InPlaceInit, Normal, as_law

Role = Literal["input", "hidden", "readout"]
ROLES: tuple[str, ...] = get_args(Role)
ZERO = Normal(0.0, 0.0)
STANDARD_NORMAL = Normal(0.0, 1.0)


def check_positive_int(name: str, value: object) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is an int >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")


def check_positive_finite(name: str, value: object, fix: str = "") -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is a finite real number > 0.

    Args:
        name: the argument's name, quoted in the message.
        value: the value to check (``inf``, ``nan``, 0, negatives and non-numbers are refused).
        fix: a sentence appended to the message, saying what to pass instead.
    """
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (number and math.isfinite(value) and value > 0):  # type: ignore[arg-type, operator]
        hint = f" {fix}" if fix else ""
        raise ValueError(f"`{name}` must be a finite positive number, got {value!r}.{hint}")


def check_layer_input(input: object, weight: Tensor, size: int, dim: int, what: str) -> None:
    """Refuse a layer's ``input`` that torch could not multiply by ``weight``, naming the fix.

    Called when the forward already failed (no cost on the fast path): the input is not a
    tensor, has no axis ``dim`` of ``size`` entries, lives on another device, or has another
    dtype than the weights (under autocast, a floating one is fine). Returns if none of these.

    Args:
        input: the layer's input.
        weight: the layer's weight.
        size: the size ``input`` needs along ``dim`` (``in_features``, ``in_channels``).
        dim: the axis that holds the features (-1) or channels.
        what: ``"in_features"`` or ``"in_channels"``, quoted in the message.

    Raises:
        ValueError: naming ``input``, what is wrong with it and the fix.
    """
    if not isinstance(input, Tensor):
        raise ValueError(
            f"`input` must be a tensor, got {type(input).__name__}; convert it with "
            f"torch.as_tensor(input, dtype={weight.dtype})."
        )
    if input.dim() < -dim or input.shape[dim] != size:
        spatial = -dim - 1
        where = (
            "in the last dimension" if dim == -1 else f"before the spatial dimensions ({spatial})"
        )
        raise ValueError(
            f"`input` has shape {tuple(input.shape)}, but this layer takes {what}={size} {where}; "
            "reshape the input or build the layer for its size."
        )
    if input.device != weight.device:
        raise ValueError(
            f"`input` is on {input.device} but the layer's weights are on {weight.device}; move "
            f"it with input.to({str(weight.device)!r})."
        )
    if input.dtype != weight.dtype and not (
        input.is_floating_point() and torch.is_autocast_enabled(input.device.type)
    ):
        raise ValueError(
            f"`input` has dtype {input.dtype} but the layer's weights are {weight.dtype}; "
            f"convert it with input.to({weight.dtype})."
        )


class MeanFieldLayer(nn.Module):
    """Mixin holding the mean-field attributes shared by the linear and conv layers.

    Attributes:
        role: ``"input"`` (data -> neurons), ``"hidden"`` (neurons -> neurons) or ``"readout"``
            (neurons -> output).
        fan_in_neurons: ``n_in`` if the input side is neurons, else 1.
        fan_out_neurons: ``n_out`` if the output side is neurons, else 1.
        forward_scale: ``1/n_in`` for hidden/readout layers, ``input_scale`` for the input layer.
        init_law: law of the initial weights; ``bias_init_law``: law of the initial biases.
        frozen: a frozen layer is a fixed random feature map (Araújo et al., §1.3) and never trains.
    """

    role: Role
    fan_in_neurons: int
    fan_out_neurons: int
    forward_scale: float
    init_law: InitLaw
    bias_init_law: InitLaw
    frozen: bool
    weight: Tensor
    bias: Tensor | None

    def _configure_mean_field(
        self,
        n_in: int,
        n_out: int,
        role: Role,
        init: InitLaw | InPlaceInit,
        bias_init: InitLaw | InPlaceInit,
        frozen: bool,
        input_scale: float,
        generator: torch.Generator | None,
    ) -> None:
        """Validate and set the MF attributes, *before* the torch constructor samples weights."""
        if role not in ROLES:
            raise ValueError(f"`role` must be one of {ROLES}, got {role!r}.")
        check_positive_finite(
            "input_scale",
            input_scale,
            "Use 1.0, or 1/sqrt(d) for the tau/sqrt(d) convention of §E.3 item 19.",
        )
        if role != "input" and input_scale != 1.0:
            raise ValueError(
                f"`input_scale` only applies to role='input'; got input_scale={input_scale} "
                f"with role={role!r}. Hidden and readout layers always average (1/n_in)."
            )
        self.role = role
        self.fan_in_neurons = 1 if role == "input" else n_in
        self.fan_out_neurons = 1 if role == "readout" else n_out
        # §1.1: 1/n over incoming neurons; the input layer sums over data coordinates.
        self.forward_scale = float(input_scale) if role == "input" else 1.0 / n_in
        self.init_law = as_law(init, "init")
        self.bias_init_law = as_law(bias_init, "bias_init")
        self.frozen = bool(frozen)
        # torch's constructor calls reset_parameters() once; it draws with this generator.
        self._construction_generator = generator

    def _finish_mean_field(self) -> None:
        """Drop the construction-time generator and freeze the parameters if asked."""
        del self._construction_generator
        if self.frozen:
            self.requires_grad_(False)

    @property
    def lr_multiplier(self) -> float:
        """Weight lr multiplier ``n_in * n_out`` with data input / output counted as 1 (§1.2)."""
        return float(self.fan_in_neurons * self.fan_out_neurons)

    @property
    def bias_lr_multiplier(self) -> float:
        """Bias lr multiplier ``n_out`` (1 for the readout), §1.2 and §E.3 item 17."""
        return float(self.fan_out_neurons)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Redraw the weights from ``init_law`` and the biases from ``bias_init_law``.

        Raises:
            ValueError: a law drew NaN or infinite values in the parameters' dtype (e.g.
                ``Normal(0, 1e300)`` in float32); the message names the law and the layer.
        """
        if generator is None:
            generator = self.__dict__.get("_construction_generator")
        self.init_law.sample_(self.weight, generator)
        self._check_finite_draw("init", self.init_law, self.weight)
        if self.bias is not None:
            self.bias_init_law.sample_(self.bias, generator)
            self._check_finite_draw("bias_init", self.bias_init_law, self.bias)

    def _check_finite_draw(self, name: str, law: InitLaw, tensor: Tensor) -> None:
        """Refuse NaN or infinite initial values: training from them can only be garbage."""
        if tensor.is_meta or bool(torch.isfinite(tensor).all()):
            return
        largest = torch.finfo(tensor.dtype).max
        raise ValueError(
            f"`{name}` {law} drew NaN or infinite initial values in {tensor.dtype} for "
            f"{type(self).__name__}({super().extra_repr()}, role={self.role!r}); use a law whose "
            f"draws are finite in {tensor.dtype} (|w| < {largest:.3g}), e.g. a smaller std, "
            "or a wider dtype."
        )

    def extra_repr(self) -> str:
        """Torch's description plus role, init law, frozen flag and lr multiplier."""
        return (
            f"{super().extra_repr()}, role={self.role!r}, init={self.init_law}, "
            f"frozen={self.frozen}, lr_multiplier={self.lr_multiplier:g}"
        )


class MeanFieldLinear(MeanFieldLayer, nn.Linear):  # type: ignore[misc]  # torch infers bias: Parameter
    """Applies a **mean-field** linear map: ``(1/n_in) x W^T + b``, or ``input_scale x W^T + b``.

    Args:
        in_features: size of each input sample.
        out_features: size of each output sample.
        bias: learn an additive bias (drawn from ``bias_init``).
        device: torch device of the parameters.
        dtype: torch dtype of the parameters.
        role: ``"input"`` | ``"hidden"`` | ``"readout"`` (see ``MeanFieldLayer``).
        init: width-independent law of the weights, e.g. ``Normal(1.0, 0.5)``.
        bias_init: law of the biases (default: the constant 0, as NP's degeneracy results assume).
        frozen: never train this layer (a random-feature layer).
        input_scale: factor in front of the input layer's sum over data coordinates.
        generator: random generator for the initial draw.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        role: Role = "hidden",
        init: InitLaw | InPlaceInit = STANDARD_NORMAL,
        bias_init: InitLaw | InPlaceInit = ZERO,
        frozen: bool = False,
        input_scale: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> None:
        check_positive_int("in_features", in_features)
        check_positive_int("out_features", out_features)
        self._configure_mean_field(
            in_features, out_features, role, init, bias_init, frozen, input_scale, generator
        )
        super().__init__(in_features, out_features, bias, device, dtype)
        self._finish_mean_field()

    def forward(self, input: Tensor) -> Tensor:
        """``forward_scale * (input @ W^T) + b`` as one GEMM whose ``alpha`` is the scale.

        The product accumulates inside the GEMM and is scaled once, as ``(1/n) sum`` should be
        (§E.2 item 11); no extra pass over the output is needed for the bias.

        Raises:
            ValueError: ``input`` is not a tensor, has not ``in_features`` features in its last
                dimension, or has another device or dtype than the weights (checked only once
                torch has failed: nothing is added to the fast path).
        """
        try:
            if self.forward_scale == 1.0:  # an input layer with input_scale 1: torch's own linear
                return F.linear(input, self.weight, self.bias)
            if input.dim() != 2:  # a GEMM takes matrices: fold the leading dims into rows
                rows = input.reshape(-1, self.in_features)
                return self.forward(rows).view(*input.shape[:-1], self.out_features)
            if self.bias is None:
                return torch.mm(input, self.weight.t()).mul_(self.forward_scale)
            return torch.addmm(self.bias, input, self.weight.t(), alpha=self.forward_scale)
        except (RuntimeError, TypeError, AttributeError):
            check_layer_input(input, self.weight, self.in_features, -1, "in_features")
            raise


class _MeanFieldConvNd(MeanFieldLayer):
    """Shared forward of the mean-field convolutions: channels are the neurons (§E.3 item 18)."""

    _spatial_dims: int

    if TYPE_CHECKING:  # provided by the torch conv class that follows in the MRO
        in_channels: int

        def _conv_forward(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor: ...

    def forward(self, input: Tensor) -> Tensor:
        """``forward_scale * conv(input, W) + b``: kernel positions summed, channels averaged.

        Computed as ``s * conv(input, W, b / s)`` with ``s = forward_scale``: the bias rides in
        the convolution (as in ``nn.Conv2d``) and the sum is scaled once after it accumulates
        (§E.2 item 11), one pass over the output instead of two.

        Raises:
            ValueError: ``input`` is not a tensor, has not ``in_channels`` channels, or has
                another device or dtype than the weights (checked only once torch has failed).
        """
        scale = self.forward_scale
        try:
            if scale == 1.0:  # an input layer with input_scale 1: torch's own convolution
                return self._conv_forward(input, self.weight, self.bias)
            bias = None if self.bias is None else self.bias / scale
            # in place: the convolution's backward does not need its output
            return self._conv_forward(input, self.weight, bias).mul_(scale)
        except (RuntimeError, TypeError, AttributeError):
            channels = -(self._spatial_dims + 1)  # (batch,) channels, spatial dims
            check_layer_input(input, self.weight, self.in_channels, channels, "in_channels")
            raise


def _check_conv_sizes(name: str, value: object, minimum: int) -> None:
    """Refuse a conv size (an int or a tuple of ints) with an entry below ``minimum``."""
    entries = value if isinstance(value, Sequence) else (value,)
    valid = all(isinstance(v, int) and not isinstance(v, bool) and v >= minimum for v in entries)
    if not entries or not valid:
        kind = "a positive" if minimum > 0 else "a non-negative"
        raise ValueError(
            f"`{name}` must be {kind} integer (or one per spatial dimension), got {value!r}; "
            f"use e.g. {name}={max(minimum, 1)}."
        )


def _check_conv_args(
    in_channels: int,
    out_channels: int,
    groups: int,
    kernel_size: object,
    stride: object,
    padding: object,
    dilation: object,
) -> None:
    check_positive_int("in_channels", in_channels)
    check_positive_int("out_channels", out_channels)
    _check_conv_sizes("kernel_size", kernel_size, 1)
    _check_conv_sizes("stride", stride, 1)
    _check_conv_sizes("dilation", dilation, 1)
    if not isinstance(padding, str):  # torch checks 'same' / 'valid' itself
        _check_conv_sizes("padding", padding, 0)
    if groups != 1:
        raise ValueError(
            f"`groups` must be 1 for a mean-field convolution, got {groups}: the 1/C_in average "
            "and the C_in*C_out lr multiplier of §E.3 item 18 are defined for dense channel mixing."
        )


class MeanFieldConv1d(_MeanFieldConvNd, nn.Conv1d):
    """Applies a **mean-field** 1-D convolution: ``(1/C_in) conv(x, W) + b``.

    Takes the arguments of ``torch.nn.Conv1d`` (``groups`` must be 1) plus the keyword-only
    ``role``, ``init``, ``bias_init``, ``frozen``, ``input_scale`` and ``generator`` of
    ``MeanFieldLinear``. The lr multiplier is ``C_in * C_out`` with data/output counted as 1.
    """

    _spatial_dims = 1

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: _size_1_t,
        stride: _size_1_t = 1,
        padding: _size_1_t | str = 0,
        dilation: _size_1_t = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: Literal["zeros", "reflect", "replicate", "circular"] = "zeros",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        role: Role = "hidden",
        init: InitLaw | InPlaceInit = STANDARD_NORMAL,
        bias_init: InitLaw | InPlaceInit = ZERO,
        frozen: bool = False,
        input_scale: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> None:
        _check_conv_args(in_channels, out_channels, groups, kernel_size, stride, padding, dilation)
        self._configure_mean_field(
            in_channels, out_channels, role, init, bias_init, frozen, input_scale, generator
        )
        nn.Conv1d.__init__(
            self,
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            dilation,
            groups,
            bias,
            padding_mode,
            device,
            dtype,
        )
        self._finish_mean_field()


class MeanFieldConv2d(_MeanFieldConvNd, nn.Conv2d):
    """Applies a **mean-field** 2-D convolution: ``(1/C_in) conv(x, W) + b``.

    Takes the arguments of ``torch.nn.Conv2d`` (``groups`` must be 1) plus the keyword-only
    ``role``, ``init``, ``bias_init``, ``frozen``, ``input_scale`` and ``generator`` of
    ``MeanFieldLinear``. The lr multiplier is ``C_in * C_out`` with data/output counted as 1.
    """

    _spatial_dims = 2

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: _size_2_t,
        stride: _size_2_t = 1,
        padding: _size_2_t | str = 0,
        dilation: _size_2_t = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: Literal["zeros", "reflect", "replicate", "circular"] = "zeros",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        role: Role = "hidden",
        init: InitLaw | InPlaceInit = STANDARD_NORMAL,
        bias_init: InitLaw | InPlaceInit = ZERO,
        frozen: bool = False,
        input_scale: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> None:
        _check_conv_args(in_channels, out_channels, groups, kernel_size, stride, padding, dilation)
        self._configure_mean_field(
            in_channels, out_channels, role, init, bias_init, frozen, input_scale, generator
        )
        nn.Conv2d.__init__(
            self,
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            dilation,
            groups,
            bias,
            padding_mode,
            device,
            dtype,
        )
        self._finish_mean_field()
