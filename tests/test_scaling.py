"""param_groups, presets, and the mean-field coord check (one SGD step moves weights by O(1))."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from mflightning import MeanFieldLinear, MeanFieldMLP, Normal, param_groups, time_step
from mflightning.scaling import NonMeanFieldParameterWarning

LAWS = [Normal(0.0, 1.0), Normal(1.0, 0.5), Normal(1.0, 1.0)]  # non-zero-mean readout, see below


def test_sgd_groups_are_named_and_multiply_the_lr() -> None:
    net = MeanFieldMLP(10, [64, 32], bias=True)
    groups = param_groups(net, lr=0.1)
    names = [g["name"] for g in groups]
    assert names == [
        "mf/layer1",
        "mf/layer1/bias",
        "mf/layer2",
        "mf/layer2/bias",
        "mf/layer3",
        "mf/layer3/bias",
    ]
    expected = [64, 64, 64 * 32, 32, 32, 1]
    assert [g["lr_multiplier"] for g in groups] == expected
    np.testing.assert_allclose([g["lr"] for g in groups], [0.1 * m for m in expected])


def test_adam_rule_keeps_lr_and_divides_eps() -> None:
    net = MeanFieldMLP(10, [64, 32])
    groups = param_groups(net, lr=1e-3, rule="adam", eps=1e-8)
    assert all(g["lr"] == 1e-3 for g in groups)
    np.testing.assert_allclose([g["eps"] for g in groups], [1e-8 / 64, 1e-8 / 2048, 1e-8 / 32])


def test_frozen_parameters_are_left_out() -> None:
    net = MeanFieldMLP(10, [16, 16], frozen=("input", "readout"))
    assert [g["name"] for g in param_groups(net, lr=0.1)] == ["mf/layer2"]


def test_non_mean_field_parameters_get_their_own_group_with_a_warning() -> None:
    model = nn.Sequential(
        MeanFieldLinear(4, 8, role="input"), nn.LayerNorm(8), MeanFieldLinear(8, 1, role="readout")
    )
    with pytest.warns(NonMeanFieldParameterWarning, match="1.weight"):
        groups = param_groups(model, lr=0.5)
    other = groups[-1]
    assert other["name"] == "other" and other["lr"] == 0.5 and len(other["params"]) == 2
    assert [g["name"] for g in groups[:-1]] == ["mf/0", "mf/0/bias", "mf/2", "mf/2/bias"]


def test_pure_mean_field_model_does_not_warn() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        param_groups(MeanFieldMLP(3, [4]), lr=0.1)


def test_groups_work_with_learning_rate_monitor_names() -> None:
    net = MeanFieldMLP(10, [8, 8], bias=True)
    names = [g["name"] for g in param_groups(net, lr=0.1)]
    assert len(set(names)) == len(names)


def test_araujo_preset_internal_multiplier_is_n_squared() -> None:
    n = 128
    net = MeanFieldMLP(10, [n, n, n], frozen=("input", "readout"))
    groups = param_groups(net, lr=0.01, preset="araujo_oliveira_yukimura")
    assert [g["name"] for g in groups] == ["mf/layer2", "mf/layer3"]
    assert all(g["lr_multiplier"] == n**2 for g in groups)
    np.testing.assert_allclose([g["lr"] for g in groups], 0.01 * n**2)


def test_araujo_preset_refuses_trainable_ends() -> None:
    with pytest.raises(ValueError, match="frozen"):
        param_groups(MeanFieldMLP(10, [8, 8]), lr=0.1, preset="araujo_oliveira_yukimura")


def test_sirignano_spiliopoulos_preset_reproduces_their_raw_multipliers() -> None:
    """SS-DNN (§1.3): alpha_C = N2/N1, alpha_W1 = 1, alpha_W2 = N2 times their alpha."""
    n1, n2, alpha = 64, 32, 0.5
    net = MeanFieldMLP(10, [n1, n2])
    lrs = {g["name"]: g["lr"] for g in param_groups(net, lr=alpha, preset="sirignano_spiliopoulos")}
    np.testing.assert_allclose(
        [lrs["mf/layer1"], lrs["mf/layer2"], lrs["mf/layer3"]],
        [alpha * 1, alpha * n2, alpha * n2 / n1],
    )
    assert time_step(net, alpha, "sirignano_spiliopoulos") == alpha / n1


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"rule": "lamb"}, "rule"),
        ({"preset": "mup"}, "preset"),
        ({"lr": 0.0}, "lr"),
        ({"lr": -1.0}, "lr"),
        ({"rule": "adam", "eps": 0.0}, "eps"),
    ],
)
def test_bad_param_group_arguments(kwargs: dict, argument: str) -> None:
    args = {"lr": 0.1} | kwargs
    with pytest.raises(ValueError, match=f"`{argument}`"):
        param_groups(MeanFieldMLP(3, [4, 4]), **args)


def _one_step_rms_updates(net: nn.Module, groups: list[dict], seed: int) -> list[float]:
    g = torch.Generator().manual_seed(1000 + seed)
    x = torch.randn(64, 10, generator=g)
    y = torch.randint(0, 2, (64, 1), generator=g).double() * 2 - 1
    before = [p.detach().clone() for p in net.parameters()]
    optimizer = torch.optim.SGD(groups)
    loss = 0.5 * (net(x) - y).pow(2).sum(-1).mean()
    loss.backward()
    optimizer.step()
    return [
        (p.detach() - b).pow(2).mean().sqrt().item()
        for p, b in zip(net.parameters(), before, strict=True)
    ]


def _standard_mlp(n: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(10, n, bias=False),
        nn.ReLU(),
        nn.Linear(n, n, bias=False),
        nn.Tanh(),
        nn.Linear(n, 1, bias=False),
    )


WIDTHS = (64, 256, 1024)


@pytest.mark.usefixtures("float64_default")
def test_mean_field_coord_check_one_sgd_step_is_width_independent() -> None:
    """MF coord check (§1.2): RMS update of every layer is O(1) and flat in the width.

    The readout law has a non-zero mean: with a zero-mean readout the first layer's initial drift
    is itself an O(N^{-1/2}) fluctuation.
    """
    rms = {}
    for n in WIDTHS:
        runs = []
        for seed in range(4):
            net = MeanFieldMLP(
                10,
                [n, n],
                activations=["relu", "tanh", "identity"],
                init=LAWS,
                generator=torch.Generator().manual_seed(seed),
            )
            runs.append(_one_step_rms_updates(net, param_groups(net, lr=0.1), seed))
        rms[n] = np.mean(runs, axis=0)
    table = np.array([rms[n] for n in WIDTHS])  # (width, layer)
    assert np.all(table > 1e-3)  # every layer moves
    ratio = table.max(axis=0) / table.min(axis=0)
    assert np.all(ratio < 1.3), ratio


@pytest.mark.usefixtures("float64_default")
def test_standard_parametrization_fails_the_coord_check() -> None:
    """nn.Linear + default init + one lr: updates depend on the width (so the check can fail)."""
    rms = {}
    for n in WIDTHS:
        runs = []
        for seed in range(4):
            torch.manual_seed(seed)
            net = _standard_mlp(n)
            runs.append(
                _one_step_rms_updates(net, [{"params": list(net.parameters()), "lr": 0.1}], seed)
            )
        rms[n] = np.mean(runs, axis=0)
    table = np.array([rms[n] for n in WIDTHS])
    ratio = table.max(axis=0) / table.min(axis=0)
    assert ratio.max() > 2.0, ratio
