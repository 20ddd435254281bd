"""Optimizers that follow the mean-field rules in plain PyTorch (docs/theory.md §1.2).

``SGD(net, lr)`` and ``Adam(net, lr)`` build torch optimizers over
``mflightning.param_groups(net, lr, rule=...)``, in the style of mup's ``MuSGD``/``MuAdam``:

* rule ``"sgd"``: every group's lr is ``eps * n_in * n_out`` (data input and output counted as
  1), so every weight moves O(eps) per step and ``t = k * eps`` is the limit's time (§1.1);
* rule ``"adam"``: every group's lr is ``eps`` and Adam's epsilon is divided by the multiplier.

``weight_decay`` is in physical units (every weight decays at rate λ per unit of ``mf_time``,
``apply_physical_weight_decay``); lr schedulers must be multiplicative (``schedule_factor``), and
``MeanFieldClock`` sums their steps into ``mf_time`` (docs/theory.md §F).

The groups carry their rule (the ``"rule"`` key). Importing mflightning registers a global
optimizer step pre-hook that checks, at the first step of every optimizer holding such groups,
that the optimizer fits the rule: ``torch.optim.Adam(mflightning.param_groups(net, lr=0.01))``
(SGD-rule lrs of ``0.01 * n_in * n_out`` on hidden layers) is refused with a ``ValueError``
instead of silently taking steps thousands of times too large.
"""

from __future__ import annotations

import inspect
import math
import warnings
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypedDict

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from torch.optim.optimizer import register_optimizer_step_pre_hook

from mflightning.scaling import PresetName, Rule, group_settings, param_groups

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
"""Optimizers that normalize the gradient by its own size: they need rule ``"adam"``."""

WIDTH_DEPENDENT = {
    torch.optim.Adadelta: (
        "its step is sqrt(accumulated updates + eps) / sqrt(accumulated gradients + eps), with "
        "an eps of the gradients' O(1/multiplier) size, so it shrinks like the width^-1/2"
    ),
    torch.optim.ASGD: (
        "its decay lambd * lr uses the lr multiplied by n_in * n_out, so it grows with the width"
    ),
    torch.optim.LBFGS: "its line search mixes every weight of every layer in one step",
}
"""Optimizers whose update has no width-independent mean-field limit, and why (§F.4)."""


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


def check_optimizer_has_limit(optimizer: Optimizer) -> None:
    """Refuse an optimizer whose update depends on the width under the mean-field rules (§F.4).

    Raises:
        ValueError: ``WIDTH_DEPENDENT`` optimizers, and Adagrad with an
            ``initial_accumulator_value`` (an absolute value next to O(1/multiplier^2)
            squared gradients), naming the optimizer, why and what to use instead.
    """
    name = type(optimizer).__name__
    why = WIDTH_DEPENDENT.get(type(optimizer))
    if why is None and isinstance(optimizer, torch.optim.Adagrad):
        value = optimizer.defaults.get("initial_accumulator_value", 0)
        if value:
            why = (
                f"its initial_accumulator_value={value} is an absolute value next to squared "
                "gradients of size 1/multiplier^2, so its step depends on the width"
            )
    if why is not None:
        raise ValueError(
            f"`optimizer` {name} has no mean-field limit: {why} (docs/theory.md §F.4); use SGD "
            "(with momentum), Adam, AdamW, NAdam, RAdam, Adamax, RMSprop or Adagrad without an "
            "initial accumulator."
        )


def warn_limit_change(optimizer: Optimizer, stacklevel: int = 3) -> None:
    """Warn when Adam-like updates, momentum or weight decay leave the plain-SGD theory (§F).

    The limit solvers follow such an optimizer (§F derives their limits), but the rigorous
    convergence results cover plain SGD only (§E.3 item 12).
    """
    group = optimizer.param_groups[0]
    changes = [k for k in ("momentum", "weight_decay") if group.get(k, 0)]
    if optimizer_rule(optimizer) == "adam" or changes:
        warnings.warn(
            f"{type(optimizer).__name__}{' with ' + ', '.join(changes) if changes else ''} "
            "trains towards another limit than plain SGD: the limit solvers, LimitTracker and "
            "sweeps follow it (docs/theory.md §F), but the rigorous convergence theory covers "
            "plain SGD only (§E.3 item 12).",
            LimitChangingOptimizerWarning,
            stacklevel=stacklevel,
        )


def decays_gradient(optimizer: Optimizer, group: dict[str, Any]) -> bool:
    """Whether ``weight_decay`` of ``group`` is added to the gradient (L2) rather than decoupled.

    AdamW (and ``decoupled_weight_decay=True`` in Adam, NAdam, RAdam) shrinks the weights by
    ``lr * weight_decay`` directly: width-independent under the adam rule (§F.2).
    """
    return not (isinstance(optimizer, torch.optim.AdamW) or group.get("decoupled_weight_decay"))


def apply_physical_weight_decay(optimizer: Optimizer) -> None:
    """Give each mean-field group ``weight_decay / lr_multiplier`` where decay enters the gradient.

    An optimizer's ``weight_decay`` λ means "every weight decays at rate λ per unit of
    ``mf_time``" (docs/theory.md §1.2, §F.2): ``dw/dt = -Grad - λ w``. SGD adds ``wd * w`` to a
    gradient that the group's lr multiplies by ``n_in * n_out``; so do Adam's L2 decay and the
    other adaptive optimizers, whose gradients are O(1/multiplier). Such groups therefore carry
    ``λ / multiplier``. Decoupled decay (AdamW) is already width-independent and is left as is.

    Idempotent: the physical value is kept in the group (``"physical_weight_decay"``), so a
    reloaded optimizer state or a second call does not divide twice. Groups without a
    ``"lr_multiplier"`` (not built by ``param_groups``) are left alone.
    """
    for group in optimizer.param_groups:
        if "lr_multiplier" not in group or "weight_decay" not in group:
            continue
        physical = float(group.setdefault("physical_weight_decay", group["weight_decay"]))
        divisor = float(group["lr_multiplier"]) if decays_gradient(optimizer, group) else 1.0
        group["weight_decay"] = physical / divisor


def schedule_factor(optimizer: Optimizer) -> float:
    """The factor ``lr_k / lr_0`` an lr scheduler has put on every mean-field group (§F.3).

    ``param_groups`` records each group's unscheduled lr (``"mf_base_lr"``); a multiplicative
    scheduler (StepLR, MultiStepLR, ExponentialLR, LambdaLR, CosineAnnealingLR with
    ``eta_min=0``, LinearLR, their chains) scales them all by one factor, and the base step of
    this optimizer step is ``eps_k = eps * factor``.

    Raises:
        ValueError: the groups were scaled by different factors (a scheduler that sets absolute
            lrs, such as OneCycleLR, CyclicLR or CosineAnnealingLR with ``eta_min > 0``): the
            mean-field multipliers are lost.
    """
    factors = [
        (group.get("name", "?"), float(group["lr"]) / float(group["mf_base_lr"]))
        for group in optimizer.param_groups
        if group.get("mf_base_lr")
    ]
    if not factors:
        return 1.0
    first = factors[0][1]
    for name, factor in factors[1:]:
        if not math.isclose(factor, first, rel_tol=1e-9, abs_tol=1e-15):
            raise ValueError(
                f"the lr scheduler scaled the mean-field groups by different factors "
                f"({factors[0][0]}: {first:.6g}, {name}: {factor:.6g}), which loses the "
                "n_in*n_out multipliers and has no mean-field limit; use a multiplicative "
                "`scheduler` (StepLR, MultiStepLR, ExponentialLR, LambdaLR, LinearLR, "
                "CosineAnnealingLR with eta_min=0, or a SequentialLR of them), not one that "
                "sets absolute lrs (OneCycleLR, CyclicLR, eta_min > 0) (docs/theory.md §F.3)."
            )
    return first


ABSOLUTE_SCHEDULERS = (torch.optim.lr_scheduler.OneCycleLR, torch.optim.lr_scheduler.CyclicLR)
"""Schedulers that set absolute lrs: the groups' multipliers are lost (§F.3)."""


def check_scheduler(scheduler: object) -> None:
    """Refuse a scheduler without a mean-field limit (§F.3).

    ``schedule_factor`` catches absolute lrs on groups with different multipliers at every step;
    this check also refuses them by type, for networks whose groups all share one multiplier
    (a two-layer network: n_in * n_out = N for both layers), where no step would tell.

    Raises:
        ValueError: ``OneCycleLR``, ``CyclicLR``, ``CosineAnnealingLR`` or
            ``CosineAnnealingWarmRestarts`` with ``eta_min`` > 0 (absolute lrs), and
            ``ReduceLROnPlateau`` (its factor depends on a monitored metric of one network).
    """
    cosine = (
        torch.optim.lr_scheduler.CosineAnnealingLR,
        torch.optim.lr_scheduler.CosineAnnealingWarmRestarts,
    )
    absolute = isinstance(scheduler, ABSOLUTE_SCHEDULERS) or (
        isinstance(scheduler, cosine) and float(getattr(scheduler, "eta_min", 0.0)) != 0.0
    )
    if absolute:
        raise ValueError(
            f"`scheduler` {type(scheduler).__name__} sets absolute lrs (max_lr, base_lr or "
            "eta_min), which loses the n_in*n_out multipliers and has no mean-field limit; use "
            "a multiplicative scheduler (StepLR, MultiStepLR, ExponentialLR, LambdaLR, LinearLR, "
            "CosineAnnealingLR with eta_min=0, or a SequentialLR of them) (docs/theory.md §F.3)."
        )
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        raise ValueError(
            "`scheduler` ReduceLROnPlateau lowers the lr when a monitored metric of one network "
            "stalls, so networks of different widths (and their limit) follow different "
            "schedules; use a schedule of the step (StepLR, MultiStepLR, CosineAnnealingLR, "
            "LambdaLR, ...) (docs/theory.md §F.3)."
        )


def probe_optimizer(
    factory: Callable[[Any], Optimizer], settings: dict[str, Any] | None = None
) -> Optimizer:
    """The optimizer ``factory`` builds over one dummy parameter: its class and defaults.

    Used to read the settings of an optimizer callable (momentum, weight decay, its own lr)
    without a network; ``settings`` are added to the dummy group (e.g. ``group_settings``).
    """
    return factory([{"params": [nn.Parameter(torch.zeros(1))]} | (settings or {})])


OptimizerCallable = Callable[[Iterable[Any]], Optimizer]
SchedulerCallable = Callable[[Optimizer], LRScheduler]


class UpdateFactories(TypedDict):
    """The networks' update as a limit solver takes it: ``Solver(..., **factories)``."""

    optimizer: OptimizerCallable
    scheduler: SchedulerCallable | None
    rule: Rule


def build_optimizer(factory: OptimizerCallable, groups: Iterable[Any]) -> Optimizer:
    """``factory(groups)``, checked against the groups' rule, with decay in physical units.

    Raises:
        ValueError: ``factory`` is not callable, or builds an optimizer of the other rule
            (``check_optimizer_rule``).
    """
    if not callable(factory):
        raise ValueError(
            f"`optimizer` must be a callable such as torch.optim.SGD, got {factory!r}."
        )
    optimizer = factory(groups)
    check_optimizer_rule(optimizer)
    check_optimizer_has_limit(optimizer)
    apply_physical_weight_decay(optimizer)
    return optimizer


def build_scheduler(factory: SchedulerCallable | None, optimizer: Optimizer) -> LRScheduler | None:
    """``factory(optimizer)`` (``None`` without a factory), refused if it follows a metric.

    Raises:
        ValueError: see ``check_scheduler`` and ``schedule_factor`` (checked on the scheduler's
            first lrs), and a factory that is not callable.
    """
    if factory is None:
        return None
    if not callable(factory):
        raise ValueError(
            f"`scheduler` must be a callable optimizer -> LRScheduler or None, got {factory!r}."
        )
    scheduler = factory(optimizer)
    check_scheduler(scheduler)
    schedule_factor(optimizer)  # its first lrs already show a scheduler that sets absolute ones
    return scheduler


class ScheduledOptimizer:
    """An optimizer and its lr scheduler, stepped together once per optimizer step (§F).

    The limit solvers and seed-batched training build one from the module's own optimizer and
    scheduler callables over their tensors, so that their update is the networks' update: the
    scheduler steps right after every optimizer step, as Lightning's ``interval="step"`` does.

    Args:
        factory: optimizer callable, e.g. ``torch.optim.SGD`` or ``functools.partial(Adam, ...)``.
        scheduler: scheduler callable, or ``None``.
        groups: param groups carrying ``group_settings`` (``lr_multiplier``, ``mf_base_lr``...).
    """

    def __init__(
        self,
        factory: OptimizerCallable,
        scheduler: SchedulerCallable | None,
        groups: Iterable[Any],
    ) -> None:
        self.optimizer = build_optimizer(factory, groups)
        self.scheduler = build_scheduler(scheduler, self.optimizer)

    def step(self) -> None:
        """One optimizer step on the tensors' ``.grad``, then one scheduler step."""
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()

    def state_dict(self) -> dict[str, Any]:
        """``{"optimizer", "scheduler"}`` state dicts (plain data: loads with weights_only)."""
        scheduler = self.scheduler.state_dict() if self.scheduler is not None else None
        return {"optimizer": self.optimizer.state_dict(), "scheduler": scheduler}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume the moment estimates, velocities and schedule from ``state_dict``."""
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])


def describe_update(factory: OptimizerCallable, scheduler: SchedulerCallable | None) -> str:
    """A one-line description of an optimizer callable and a scheduler callable.

    E.g. ``"SGD(momentum=0.9, nesterov=True) + CosineAnnealingLR"``: the settings that differ
    from the optimizer class's defaults, read from ``probe_optimizer``. Solvers save it and refuse
    a state saved with another update.
    """
    probe = probe_optimizer(factory)
    reference = type(probe).__init__.__kwdefaults__ or {}
    signature = inspect.signature(type(probe))
    defaults = {
        name: p.default for name, p in signature.parameters.items() if p.default is not p.empty
    } | reference
    changed = ", ".join(
        f"{key}={value!r}"
        for key, value in sorted(probe.defaults.items())
        if key != "lr" and key in defaults and defaults[key] != value
    )
    text = f"{type(probe).__name__}({changed})"
    if scheduler is not None:
        try:
            name = type(scheduler(probe)).__name__
        except (TypeError, ValueError):  # e.g. one lr_lambda per group: not for one group
            name = getattr(getattr(scheduler, "func", scheduler), "__name__", repr(scheduler))
        text += f" + {name}"
    return text


def state_tensors_per_parameter(factory: OptimizerCallable, rule: Rule = "sgd") -> int:
    """How many tensors of a parameter's size the optimizer keeps per parameter (memory).

    0 for plain SGD, 1 with momentum, 2 for Adam (3 with amsgrad): counted on one step of
    ``probe_optimizer`` with a unit gradient.
    """
    optimizer = probe_optimizer(factory, group_settings(1.0, 1.0, rule))
    (param,) = optimizer.param_groups[0]["params"]
    param.grad = torch.ones_like(param)
    optimizer.step()
    state = optimizer.state[param]
    return sum(isinstance(v, torch.Tensor) and v.shape == param.shape for v in state.values())


@dataclass
class MeanFieldClock:
    """Physical time ``t_k = sum_{j<k} eps_j`` of a run after ``k`` optimizer steps (§F.3).

    ``eps_j = time_step * factor_j`` with ``factor_j`` the scheduler's factor at step ``j``
    (``schedule_factor``); without a scheduler ``t_k = k * time_step`` exactly (the factors sum
    to the integer ``k``). The module, the limit solvers, the tracker and the sweeps keep one each,
    so ``mf_time`` is the same number everywhere.

    Attributes:
        time_step: the unscheduled base step ``eps`` of the preset.
        steps: optimizer steps taken.
        factors: sum of the scheduler's factors over those steps.
    """

    time_step: float
    steps: int = 0
    factors: float = 0.0

    @property
    def time(self) -> float:
        """``mf_time`` after ``steps`` steps."""
        return self.factors * self.time_step

    def tick(self, optimizer: Optimizer | None) -> float:
        """Count one step taken with ``optimizer``'s current lrs; returns its ``eps_k``."""
        factor = schedule_factor(optimizer) if optimizer is not None else 1.0
        self.steps += 1
        self.factors += factor
        return factor * self.time_step

    def reset(self, steps: int = 0) -> None:
        """Set the clock to ``steps`` unscheduled steps (a start, or a checkpoint without clock)."""
        self.steps, self.factors = steps, float(steps)

    def state_dict(self) -> dict[str, Any]:
        """``{"steps", "factors"}``: plain numbers."""
        return {"steps": self.steps, "factors": self.factors}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from ``state_dict``."""
        self.steps, self.factors = int(state["steps"]), float(state["factors"])


_CHECKED: weakref.WeakSet[Optimizer] = weakref.WeakSet()


def _check_first_step(optimizer: Optimizer, args: Any, kwargs: Any) -> None:
    """Global step pre-hook, before an optimizer's first step: check the rule, rescale decay."""
    if optimizer in _CHECKED:
        return
    check_optimizer_rule(optimizer)
    apply_physical_weight_decay(optimizer)
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
            (§F) and warn (``LimitChangingOptimizerWarning``). ``weight_decay`` is in physical
            units (``apply_physical_weight_decay``).
    """
    optimizer = torch.optim.SGD(param_groups(network, lr, rule="sgd", preset=preset), **kwargs)
    apply_physical_weight_decay(optimizer)
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
    divided by the group's multiplier. Adam trains towards another limit than SGD (§F.4): a
    ``LimitChangingOptimizerWarning`` says so. Its L2 ``weight_decay`` is in physical units
    (``apply_physical_weight_decay``).

    Args:
        network: any module containing mean-field layers.
        lr: base learning rate.
        preset: see ``mflightning.param_groups``.
        eps: Adam's epsilon before division by the multiplier.
        **kwargs: other ``torch.optim.Adam`` arguments (betas, weight_decay, ...).
    """
    groups = param_groups(network, lr, rule="adam", preset=preset, eps=eps)
    optimizer = torch.optim.Adam(groups, **kwargs)
    apply_physical_weight_decay(optimizer)
    warn_limit_change(optimizer)
    return optimizer
