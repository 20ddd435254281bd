"""Optimizers that follow the mean-field rules in plain PyTorch (docs/theory.md §1.2).

``SGD(net, lr)`` and ``Adam(net, lr)`` build torch optimizers over
``mflightning.param_groups(net, lr, rule=...)``, in the style of mup's ``MuSGD``/``MuAdam``:

* rule ``"sgd"``: every group's lr is ``eps * n_in * n_out`` (data input and output counted as
  1), so every weight moves O(eps) per step and ``t = k * eps`` is the limit's time (§1.1);
* rule ``"adam"``: every group's lr is ``eps`` and Adam's epsilon is divided by the multiplier.

The groups carry their rule (the ``"rule"`` key). Importing mflightning registers a global
optimizer step pre-hook that checks, at the first step of every optimizer holding such groups,
that the optimizer fits the rule: ``torch.optim.Adam(mflightning.param_groups(net, lr=0.01))``
(SGD-rule lrs of ``0.01 * n_in * n_out`` on hidden layers) is refused with a ``ValueError``
instead of silently taking steps thousands of times too large.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.optimizer import register_optimizer_step_pre_hook

from mflightning.scaling import PresetName, Rule, param_groups

ADAPTIVE_OPTIMIZERS = (
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.Adamax,
    torch.optim.NAdam,
    torch.optim.RAdam,
    torch.optim.RMSprop,
    torch.optim.Adagrad,
    torch.optim.Adadelta,
)
"""Optimizers whose update is invariant to the gradient scale: they need rule ``"adam"``."""


class LimitChangingOptimizerWarning(UserWarning):
    """The optimizer settings leave the theory of plain SGD (§E.3 item 12): the limit changes."""


def optimizer_rule(optimizer: Optimizer) -> Rule:
    """The rule an optimizer's groups need: ``"adam"`` for adaptive optimizers, else ``"sgd"``."""
    return "adam" if isinstance(optimizer, ADAPTIVE_OPTIMIZERS) else "sgd"


def check_optimizer_rule(optimizer: Optimizer) -> None:
    """Refuse an optimizer holding mean-field groups built for the other rule.

    Groups without a ``"rule"`` key (not built by ``param_groups``) are not checked.

    Raises:
        ValueError: naming the optimizer, the groups' rule and the fix.
    """
    needed = optimizer_rule(optimizer)
    wrong = [g for g in optimizer.param_groups if g.get("rule", needed) != needed]
    if not wrong:
        return
    name = type(optimizer).__name__
    largest = max(wrong, key=lambda group: float(group["lr"]))
    example = f"{largest.get('name', 'a group')} has lr={largest['lr']:.6g}"
    if needed == "adam":
        raise ValueError(
            f"`optimizer` {name} is adaptive but its param groups follow rule='sgd', whose lrs "
            f"are multiplied by n_in*n_out ({example}); build them with rule='adam' "
            "(param_groups(net, lr, rule='adam'), MeanFieldModule(..., rule='adam')) or use "
            "mflightning.optim.Adam(net, lr)."
        )
    raise ValueError(
        f"`optimizer` {name} is not adaptive but its param groups follow rule='adam', whose lrs "
        f"lack the n_in*n_out multipliers ({example}); use rule='sgd' (the default) or "
        "mflightning.optim.SGD(net, lr)."
    )


def warn_limit_change(optimizer: Optimizer, stacklevel: int = 3) -> None:
    """Warn when Adam-like updates, momentum or weight decay change the limit (§E.3 item 12)."""
    group = optimizer.param_groups[0]
    changes = [k for k in ("momentum", "weight_decay") if group.get(k, 0)]
    if optimizer_rule(optimizer) == "adam" or changes:
        warnings.warn(
            f"{type(optimizer).__name__}{' with ' + ', '.join(changes) if changes else ''} "
            "trains towards a different limit than the plain-SGD mean-field limit of the theory "
            "(§E.3 item 12).",
            LimitChangingOptimizerWarning,
            stacklevel=stacklevel,
        )


_CHECKED: weakref.WeakSet[Optimizer] = weakref.WeakSet()


def _check_first_step(optimizer: Optimizer, args: Any, kwargs: Any) -> None:
    """Global step pre-hook: ``check_optimizer_rule`` once, before an optimizer's first step."""
    if optimizer in _CHECKED:
        return
    check_optimizer_rule(optimizer)
    _CHECKED.add(optimizer)


register_optimizer_step_pre_hook(_check_first_step)


def SGD(  # named like the torch class it returns, as mup's MuSGD
    network: nn.Module, lr: float, *, preset: PresetName = "nguyen_pham", **kwargs: Any
) -> torch.optim.SGD:
    """``torch.optim.SGD`` over the mean-field groups of ``network`` (rule ``"sgd"``, §1.2).

    Group lrs are ``eps * n_in * n_out``, ``eps`` the preset's step (``lr`` for Nguyen–Pham).

    Args:
        network: any module containing mean-field layers.
        lr: base learning rate ``eps`` (alpha for the Sirignano–Spiliopoulos preset).
        preset: see ``mflightning.param_groups``.
        **kwargs: other ``torch.optim.SGD`` arguments; momentum or weight decay change the limit
            and warn (``LimitChangingOptimizerWarning``).
    """
    optimizer = torch.optim.SGD(param_groups(network, lr, rule="sgd", preset=preset), **kwargs)
    warn_limit_change(optimizer)
    return optimizer


def Adam(  # named like the torch class it returns, as mup's MuAdam
    network: nn.Module,
    lr: float,
    *,
    preset: PresetName = "nguyen_pham",
    eps: float = 1e-8,
    **kwargs: Any,
) -> torch.optim.Adam:
    """``torch.optim.Adam`` over the mean-field groups of ``network`` (rule ``"adam"``, §1.2).

    Group lrs are ``eps_t`` (the preset's step, unmultiplied) and Adam's epsilon is ``eps``
    divided by the group's multiplier. Adam trains towards another limit than SGD
    (§E.3 item 12): a ``LimitChangingOptimizerWarning`` says so.

    Args:
        network: any module containing mean-field layers.
        lr: base learning rate.
        preset: see ``mflightning.param_groups``.
        eps: Adam's epsilon before division by the multiplier.
        **kwargs: other ``torch.optim.Adam`` arguments (betas, weight_decay, ...).
    """
    groups = param_groups(network, lr, rule="adam", preset=preset, eps=eps)
    optimizer = torch.optim.Adam(groups, **kwargs)
    warn_limit_change(optimizer)
    return optimizer
