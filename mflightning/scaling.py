"""Per-layer learning-rate rules and the seed papers' presets (docs/theory.md §1.2, §1.3).

Every mean-field layer knows its multiplier (``n_in * n_out``, data input and output counted as 1).
``param_groups`` turns a model into optimizer param groups named ``mf/<module path>`` (weights)
and ``mf/<module path>/bias`` (biases):

* rule ``"sgd"``:  ``lr_group = eps * multiplier``, so that every weight moves O(eps) per step and
  time ``t = k * eps`` is the limit's physical time (§1.1);
* rule ``"adam"``: ``lr_group = eps`` (Adam's update is already invariant to the O(1/multiplier)
  gradient scale) and ``eps_adam / multiplier``, so Adam's epsilon stays negligible next to those
  gradients. Adam changes the limit (§E.3 item 12).

The base step ``eps`` comes from the preset:

* ``"nguyen_pham"`` (canonical, also Nguyen 2019): ``eps = lr``.
* ``"sirignano_spiliopoulos"``: ``eps = lr / N_1`` with N_1 the first hidden width; ``lr`` plays
  their learning-rate constant alpha, and their clock ``t_SS = k / N_1`` equals ``mf_time / lr``.
  For L = 3 this gives their raw multipliers alpha*N_2/N_1 (readout), alpha (first layer) and
  alpha*N_2 (middle layer) exactly.
* ``"araujo_oliveira_yukimura"``: ``eps = lr`` with the first and last layers frozen
  (xi_1 = xi_L = 0); internal weights get ``n_{i-1} n_i`` = N^2 for equal widths (their
  ``d theta/dt = -N^2 alpha grad L_N``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, get_args

from torch import nn

from mflightning.nn import MeanFieldLayer, check_positive_finite

Rule = Literal["sgd", "adam"]
RULES: tuple[str, ...] = get_args(Rule)
PresetName = Literal["nguyen_pham", "sirignano_spiliopoulos", "araujo_oliveira_yukimura"]


class NonMeanFieldParameterWarning(UserWarning):
    """Trainable parameters outside mean-field layers were put in a plain group (no multiplier)."""


def mean_field_layers(model: nn.Module) -> list[tuple[str, MeanFieldLayer]]:
    """``(module path, layer)`` for every mean-field layer of ``model``, in registration order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MeanFieldLayer)]


def readout_outputs(model: nn.Module) -> int | None:
    """The number of outputs of the model's readout-role layer (``None`` without one)."""
    readouts = [layer for _, layer in mean_field_layers(model) if layer.role == "readout"]
    return int(readouts[-1].weight.shape[0]) if readouts else None


def first_hidden_width(model: nn.Module) -> int:
    """N_1: the output width of the model's input-role layer.

    Raises:
        ValueError: the model has no mean-field layer with ``role="input"``.
    """
    for _, layer in mean_field_layers(model):
        if layer.role == "input":
            return layer.fan_out_neurons
    raise ValueError(
        "the Sirignano–Spiliopoulos preset needs a mean-field layer with role='input' to read N_1 "
        "from; use preset='nguyen_pham' for this model."
    )


def _require_frozen_ends(model: nn.Module) -> None:
    ends = [(n, m) for n, m in mean_field_layers(model) if m.role in ("input", "readout")]
    trainable = [n or type(model).__name__ for n, m in ends if not m.frozen]
    if not ends or trainable:
        raise ValueError(
            "preset='araujo_oliveira_yukimura' trains only the internal layers: build the network "
            "with frozen ends, e.g. MeanFieldMLP(..., frozen=('input', 'readout')); trainable end "
            f"layers found: {trainable or 'no input/readout layers at all'}."
        )


@dataclass(frozen=True)
class Preset:
    """A seed paper's convention expressed in the canonical parametrization (§1.3).

    Attributes:
        name: preset name.
        formula: the per-layer learning rate, in words.
        time_step: maps ``(model, lr)`` to the canonical step ``eps`` (mf_time advances by it).
        check: raises ``ValueError`` if the model does not fit the preset.
        width_dependent_clock: the step ``eps`` depends on the width, so networks of different
            widths need different step counts to reach the same time (no width sweeps).
    """

    name: str
    formula: str
    time_step: Callable[[nn.Module, float], float]
    check: Callable[[nn.Module], None] = lambda model: None
    width_dependent_clock: bool = False


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "nguyen_pham",
            "lr_i = lr * n_{i-1} * n_i (n_0 = n_L = 1); t = k * lr",
            lambda model, lr: lr,
        ),
        Preset(
            "sirignano_spiliopoulos",
            "lr_i = (lr / N_1) * n_{i-1} * n_i; t = k * lr / N_1 (their clock k / N_1, alpha = lr)",
            lambda model, lr: lr / first_hidden_width(model),
            width_dependent_clock=True,
        ),
        Preset(
            "araujo_oliveira_yukimura",
            "ends frozen; lr_i = lr * n_{i-1} * n_i (= lr * N^2 for equal widths); t = k * lr",
            lambda model, lr: lr,
            _require_frozen_ends,
        ),
    )
}


def get_preset(name: str) -> Preset:
    """Look a preset up by name.

    Raises:
        ValueError: unknown name; the message lists the presets.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown `preset` {name!r}; choose one of {sorted(PRESETS)}.")
    return PRESETS[name]


def time_step(model: nn.Module, lr: float, preset: str = "nguyen_pham") -> float:
    """The canonical step ``eps`` of one optimizer step: physical time advances by it (§1.1)."""
    return get_preset(preset).time_step(model, lr)


def group_settings(base: float, multiplier: float, rule: Rule, eps: float = 1e-8) -> dict[str, Any]:
    """The optimizer settings of one mean-field group with ``multiplier`` (§1.2).

    Rule ``"sgd"``: ``lr = base * multiplier``; rule ``"adam"``: ``lr = base`` and Adam's
    ``eps / multiplier``. ``mf_base_lr`` keeps the unscheduled lr (``optim.schedule_factor``),
    ``lr_multiplier`` the multiplier (``optim.apply_physical_weight_decay``) and ``rule`` the
    rule (``optim.check_optimizer_rule``).
    """
    settings: dict[str, Any] = {"rule": rule, "lr_multiplier": multiplier}
    if rule == "sgd":
        settings["lr"] = base * multiplier  # §1.2: eps * n_{i-1} * n_i
    else:
        settings["lr"] = base
        settings["eps"] = eps / multiplier  # Adam's eps next to O(1/multiplier) gradients
    settings["mf_base_lr"] = settings["lr"]
    return settings


def param_groups(
    model: nn.Module,
    lr: float,
    rule: Rule = "sgd",
    preset: PresetName = "nguyen_pham",
    eps: float = 1e-8,
) -> list[dict[str, Any]]:
    """Optimizer param groups carrying the mean-field multipliers of §1.2.

    Args:
        model: any module containing mean-field layers.
        lr: base learning rate (alpha for the Sirignano–Spiliopoulos preset).
        rule: ``"sgd"`` (lr x multiplier) or ``"adam"`` (lr unchanged, ``eps / multiplier``).
        preset: ``"nguyen_pham"``, ``"sirignano_spiliopoulos"`` or ``"araujo_oliveira_yukimura"``.
        eps: Adam's epsilon before division by the multiplier (rule ``"adam"`` only).

    Returns:
        One group per trainable mean-field weight or bias, named ``mf/<path>`` and
        ``mf/<path>/bias``, each with the settings of ``group_settings`` (``lr``,
        ``lr_multiplier``, ``mf_base_lr``, ``rule``, checked against the optimizer at its first
        step by ``mflightning.optim``, and ``eps`` for Adam); trainable
        parameters outside mean-field layers go to a group ``"other"`` at the base lr, with a
        ``NonMeanFieldParameterWarning``. Frozen parameters are left out.

    Raises:
        ValueError: bad ``lr``, ``rule``, ``preset`` or ``eps``, or a model the preset cannot use.
    """
    check_positive_finite("lr", lr, "Pass the base step eps, e.g. lr=0.1.")
    if rule not in RULES:
        raise ValueError(f"unknown `rule` {rule!r}; choose one of {RULES}.")
    if not eps > 0:
        raise ValueError(f"`eps` must be positive, got {eps!r}.")
    chosen = get_preset(preset)
    chosen.check(model)
    base = chosen.time_step(model, lr)

    groups: list[dict[str, Any]] = []
    claimed: set[int] = set()
    for path, layer in mean_field_layers(model):
        name = f"mf/{path or 'root'}"
        entries = [(name, layer.weight, layer.lr_multiplier)]
        if layer.bias is not None:
            entries.append((f"{name}/bias", layer.bias, layer.bias_lr_multiplier))
        for group_name, param, multiplier in entries:
            claimed.add(id(param))
            if not param.requires_grad:
                continue
            group = {"params": [param], "name": group_name}
            group |= group_settings(base, multiplier, rule, eps)
            groups.append(group)

    others = [
        (n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) not in claimed
    ]
    if others:
        warnings.warn(
            f"{len(others)} trainable parameters are outside mean-field layers and get the plain "
            f"base lr without multipliers (group 'other'): {[n for n, _ in others][:5]}",
            NonMeanFieldParameterWarning,
            stacklevel=2,
        )
        other = {"params": [p for _, p in others], "name": "other"}
        groups.append(other | group_settings(base, 1.0, rule, eps))
    if not groups:
        raise ValueError("`model` has no trainable parameters: every layer is frozen.")
    return groups
