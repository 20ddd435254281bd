"""MeanFieldMLP: structure, width-independent statistics at init, configs, warnings, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import loglog_slope

from mflightning import MeanFieldMLP, Normal, TrivialLimitWarning, Uniform, trivial_limit_reasons
from mflightning.config import build

pytestmark = pytest.mark.usefixtures("float64_default")

LAWS = [Normal(0.0, 1.0), Normal(1.0, 0.5), Normal(0.5, 1.0)]


def test_layers_roles_and_multipliers_follow_the_widths() -> None:
    net = MeanFieldMLP(10, [64, 32, 16], out_features=3, bias=True)
    assert [layer.role for layer in net.layers] == ["input", "hidden", "hidden", "readout"]
    assert [layer.lr_multiplier for layer in net.layers] == [64, 64 * 32, 32 * 16, 16]
    assert net.depth == 4 and net.widths == [64, 32, 16]
    assert net(torch.randn(5, 10)).shape == (5, 3)


def test_forward_composes_the_layers_with_the_activations() -> None:
    net = MeanFieldMLP(4, [8, 6], activations=["relu", "tanh", "identity"], init=LAWS)
    x = torch.randn(3, 4)
    h1 = x @ net.layer1.weight.T
    h2 = torch.relu(h1) @ net.layer2.weight.T / 8
    h3 = torch.tanh(h2) @ net.layer3.weight.T / 6
    torch.testing.assert_close(net(x), h3, rtol=1e-12, atol=1e-12)
    for got, want in zip(net.hidden_preactivations(x), [h1, h2, h3], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_with_widths_keeps_the_architecture() -> None:
    net = MeanFieldMLP(
        5,
        [16, 16],
        activations=["relu", "tanh", "identity"],
        init=LAWS,
        bias=True,
        frozen=("input",),
    )
    wide = net.with_widths([128, 64])
    assert wide.widths == [128, 64]
    assert wide.activation_names == net.activation_names
    assert [layer.init_law for layer in wide.layers] == LAWS
    assert wide.layer1.frozen and not wide.layer2.frozen and wide.layer1.bias is not None


def test_config_round_trip_rebuilds_the_same_architecture() -> None:
    net = MeanFieldMLP(
        5,
        [12, 7],
        out_features=2,
        activations="tanh",
        init=[Uniform(-1, 1), Normal(1, 0.5), Normal(0, 2)],
        frozen=("readout",),
    )
    rebuilt = build(net.to_config())
    assert rebuilt.to_config() == net.to_config()
    assert [m.lr_multiplier for m in rebuilt.layers] == [m.lr_multiplier for m in net.layers]


def test_build_refuses_classes_outside_the_package() -> None:
    with pytest.raises(ValueError, match="class_path"):
        build({"class_path": "os.system", "init_args": {"command": "echo hacked"}})


def test_preactivation_statistics_are_width_independent_at_init() -> None:
    """Mean and per-neuron std over a fixed batch agree across widths 64..1024 (§1.1).

    Tolerance: 1/sqrt(N), the size of the finite-width fluctuation; the spread of the middle
    layer's neurons (the fluctuation itself) must shrink like N^{-1/2}.
    """
    x = torch.randn(128, 10, generator=torch.Generator().manual_seed(0))
    widths = [64, 256, 1024]
    stats, spread = {}, {}
    for n in widths:
        per_seed, spreads = [], []
        for seed in range(8):
            net = MeanFieldMLP(
                10,
                [n, n],
                activations=["relu", "tanh", "identity"],
                init=LAWS,
                generator=torch.Generator().manual_seed(seed),
            )
            h = net.hidden_preactivations(x)
            per_seed.append([[hi.mean().item(), hi.std(dim=0).mean().item()] for hi in h])
            spreads.append(h[1].std(dim=1).mean().item())
        stats[n] = np.mean(per_seed, axis=0)  # (layer, [mean, std])
        spread[n] = float(np.mean(spreads))
    for n in widths[:-1]:
        np.testing.assert_array_less(np.abs(stats[n] - stats[1024]), 1 / np.sqrt(n))
    slope = loglog_slope(widths, [spread[n] for n in widths])
    assert -0.6 < slope < -0.4, slope


def test_default_pytorch_init_with_mean_field_forward_loses_the_signal() -> None:
    """Negative control (§E.1 item 3): Kaiming init under 1/N averaging shrinks H_2 with width."""
    x = torch.randn(64, 10, generator=torch.Generator().manual_seed(0))
    scales = []
    for n in (64, 1024):
        net = MeanFieldMLP(10, [n, n], init=LAWS)
        torch.manual_seed(0)
        for layer in net.layers:
            torch.nn.Linear.reset_parameters(layer)
        scales.append(net.hidden_preactivations(x)[1].abs().mean().item())
    assert scales[1] < scales[0] / 3


def test_trivial_limit_reasons() -> None:
    ok = MeanFieldMLP(10, [8, 8, 8], activations=["relu", "tanh", "tanh", "identity"])
    assert trivial_limit_reasons(ok) == []
    with pytest.warns(TrivialLimitWarning, match="zero-mean"):  # said at construction too
        zero_mean = MeanFieldMLP(10, [8, 8], init=[Normal(0, 1), Normal(0, 1), Normal(0, 1)])
    assert any("zero-mean" in r for r in trivial_limit_reasons(zero_mean))
    with pytest.warns(TrivialLimitWarning, match="odd first activation"):
        odd = MeanFieldMLP(10, [8, 8, 8], activations="tanh")
    assert any("odd first activation" in r for r in trivial_limit_reasons(odd))
    shallow_odd = MeanFieldMLP(10, [8, 8], activations="tanh")  # L = 3 still learns (§B.3)
    assert trivial_limit_reasons(shallow_odd) == []
    with_bias = MeanFieldMLP(10, [8, 8, 8], activations="tanh", bias=True, bias_init=Normal(1, 0))
    assert trivial_limit_reasons(with_bias) == []


def test_trivial_limit_warning_category_is_public() -> None:
    assert issubclass(TrivialLimitWarning, UserWarning)


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"widths": []}, "widths"),
        ({"widths": [16, 0]}, r"widths\[1\]"),
        ({"widths": [16, -4]}, r"widths\[1\]"),
        ({"activations": ["relu", "identity"]}, "activations"),
        ({"activations": ["relu", "swish", "identity"]}, r"activations\[1\]"),
        ({"init": [Normal(0, 1), Normal(1, 1)]}, "init"),
        ({"frozen": ("layer7",)}, "frozen"),
        ({"frozen": ("output",)}, "frozen"),
        ({"in_features": 0}, "in_features"),
    ],
)
def test_bad_mlp_arguments_raise_value_error_naming_them(kwargs: dict, argument: str) -> None:
    args = {"in_features": 10, "widths": [16, 16]} | kwargs
    with pytest.raises(ValueError, match=argument):
        MeanFieldMLP(**args)
