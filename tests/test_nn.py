"""MeanFieldLinear / MeanFieldConv: forward formulas, multipliers, init laws, frozen, bad input."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from mflightning import MeanFieldConv1d, MeanFieldConv2d, MeanFieldLinear, Normal, Uniform

pytestmark = pytest.mark.usefixtures("float64_default")


@pytest.mark.parametrize("role", ["hidden", "readout"])
def test_linear_forward_averages_over_incoming_neurons(role: str) -> None:
    layer = MeanFieldLinear(37, 11, bias=True, role=role, bias_init=Normal(0.3, 1.0))
    x = torch.randn(5, 37)
    expected = F.linear(x, layer.weight) / 37 + layer.bias
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)


def test_linear_forward_without_bias_matches_f_linear_over_n_in() -> None:
    layer = MeanFieldLinear(64, 8, bias=False)
    x = torch.randn(3, 64)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight) / 64, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("input_scale", [1.0, 10**-0.5])
def test_input_layer_sums_over_data_coordinates(input_scale: float) -> None:
    layer = MeanFieldLinear(10, 6, role="input", input_scale=input_scale)
    x = torch.randn(4, 10)
    expected = input_scale * F.linear(x, layer.weight) + layer.bias
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("role", "n_in", "n_out", "weight_multiplier", "bias_multiplier"),
    [
        ("input", 10, 64, 64, 64),
        ("hidden", 64, 32, 64 * 32, 32),
        ("readout", 32, 3, 32, 1),
    ],
)
def test_lr_multipliers_count_neurons_on_each_side(
    role: str, n_in: int, n_out: int, weight_multiplier: int, bias_multiplier: int
) -> None:
    layer = MeanFieldLinear(n_in, n_out, role=role)
    assert layer.lr_multiplier == weight_multiplier
    assert layer.bias_lr_multiplier == bias_multiplier
    assert not hasattr(layer.weight, "lr_multiplier")  # never a tag on the Parameter


def test_conv2d_forward_matches_f_conv2d_over_in_channels() -> None:
    conv = MeanFieldConv2d(6, 5, 3, padding=1, stride=2, bias=True, bias_init=Normal(0.5, 1.0))
    x = torch.randn(2, 6, 9, 9)
    expected = F.conv2d(x, conv.weight, None, stride=2, padding=1) / 6 + conv.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(conv(x), expected, rtol=1e-12, atol=1e-12)
    assert conv.lr_multiplier == 30 and conv.bias_lr_multiplier == 5


@pytest.mark.parametrize(("role", "input_scale"), [("hidden", 1.0), ("input", 0.5), ("input", 1.0)])
def test_conv2d_gradients_match_the_formula(role: str, input_scale: float) -> None:
    """Weight, bias and input gradients of ``s conv(x, W) + b``, s = 1/C_in or input_scale."""
    conv = MeanFieldConv2d(6, 5, 3, padding=1, role=role, input_scale=input_scale).double()
    with torch.no_grad():
        conv.bias.normal_()
    scale = 1 / 6 if role == "hidden" else input_scale
    x = torch.randn(2, 6, 7, 7, dtype=torch.float64, requires_grad=True)
    weight = conv.weight.detach().clone().requires_grad_(True)
    bias = conv.bias.detach().clone().requires_grad_(True)
    expected = scale * F.conv2d(x, weight, None, padding=1) + bias.view(1, -1, 1, 1)
    target = torch.randn_like(expected)
    ours = conv(x)
    torch.testing.assert_close(ours, expected, rtol=1e-13, atol=1e-13)
    got = torch.autograd.grad((ours * target).sum(), [x, conv.weight, conv.bias])
    want = torch.autograd.grad((expected * target).sum(), [x, weight, bias])
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_conv2d_input_role_sums_kernel_and_channels() -> None:
    conv = MeanFieldConv2d(3, 4, (3, 2), role="input", input_scale=0.5)
    x = torch.randn(2, 3, 7, 7)
    expected = 0.5 * F.conv2d(x, conv.weight) + conv.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(conv(x), expected, rtol=1e-12, atol=1e-12)
    assert conv.lr_multiplier == 4


def test_conv1d_readout_matches_f_conv1d() -> None:
    conv = MeanFieldConv1d(8, 2, 3, role="readout", bias=False)
    x = torch.randn(3, 8, 12)
    torch.testing.assert_close(conv(x), F.conv1d(x, conv.weight) / 8, rtol=1e-12, atol=1e-12)
    assert conv.lr_multiplier == 8


def test_conv_unbatched_input_is_supported() -> None:
    conv = MeanFieldConv2d(3, 4, 3, bias=True)
    x = torch.randn(3, 6, 6)
    torch.testing.assert_close(conv(x), conv(x.unsqueeze(0)).squeeze(0))


def test_init_laws_are_width_independent() -> None:
    g = torch.Generator().manual_seed(0)
    for n in (16, 1024):
        layer = MeanFieldLinear(n, n, init=Normal(1.0, 0.5), generator=g)
        assert abs(layer.weight.mean().item() - 1.0) < 5 * 0.5 / n
        assert abs(layer.weight.std().item() - 0.5) < 0.1
    uniform = MeanFieldLinear(512, 512, init=Uniform(-2.0, 2.0))
    assert uniform.weight.min() >= -2 and uniform.weight.max() <= 2
    assert abs(uniform.weight.var().item() - 16 / 12) < 0.05


def test_zero_std_law_is_a_constant_and_callables_are_accepted() -> None:
    constant = MeanFieldLinear(8, 8, init=Normal(0.7, 0.0))
    assert torch.all(constant.weight == 0.7)
    custom = MeanFieldLinear(8, 8, init=functools.partial(torch.nn.init.constant_, val=2.0))
    assert torch.all(custom.weight == 2.0)


def test_generator_makes_the_draw_reproducible() -> None:
    a = MeanFieldLinear(20, 30, generator=torch.Generator().manual_seed(3))
    b = MeanFieldLinear(20, 30, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a.weight, b.weight, rtol=0, atol=0)


def test_frozen_layer_has_no_trainable_parameters() -> None:
    layer = MeanFieldLinear(4, 4, frozen=True)
    assert not any(p.requires_grad for p in layer.parameters())


@pytest.mark.parametrize(
    ("factory", "argument"),
    [
        (lambda: MeanFieldLinear(0, 4), "in_features"),
        (lambda: MeanFieldLinear(4, -1), "out_features"),
        (lambda: MeanFieldLinear(4, 4, role="output"), "role"),
        (lambda: MeanFieldLinear(4, 4, init="normal"), "init"),
        (lambda: MeanFieldLinear(4, 4, role="input", input_scale=0.0), "input_scale"),
        (lambda: MeanFieldLinear(4, 4, role="hidden", input_scale=0.5), "input_scale"),
        (lambda: MeanFieldConv2d(4, 4, 3, groups=2), "groups"),
        (lambda: MeanFieldConv1d(0, 4, 3), "in_channels"),
        (lambda: Normal(0.0, -1.0), "std"),
        (lambda: Normal(float("nan"), 1.0), "mean"),
        (lambda: Uniform(1.0, -1.0), "high"),
    ],
)
def test_bad_layer_arguments_raise_value_error_naming_them(factory, argument: str) -> None:
    with pytest.raises(ValueError, match=f"`{argument}`"):
        factory()
