"""Seed-batched training: S networks of one architecture and width as one vmapped model.

A width sweep trains S independent seeds of every width on the same batches. Stacking their
parameters along a new leading dimension and applying ``torch.func.vmap`` to the network's own
forward (through ``torch.func.functional_call``) runs the S forward/backward passes as batched
matrix products. The stacked parameters are then stepped by the module's own optimizer and
scheduler callables over the mean-field groups (``optim.ScheduledOptimizer``): for plain SGD
(docs/theory.md §1.2)

    w_s <- w_s - lr_group * dLoss_s/dw_s        for every seed s and trainable parameter w,

and for momentum, weight decay and Adam the same per-element update with per-seed states (torch's
optimizers act element by element, so the seeds do not mix), exactly as S separate runs would do
(same float operations up to summation order).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, vmap

from mflightning.losses import LossName, mean_field_loss
from mflightning.optim import (
    MeanFieldClock,
    OptimizerCallable,
    ScheduledOptimizer,
    SchedulerCallable,
)
from mflightning.scaling import PresetName, Rule, param_groups, time_step


class SeedBatch:
    """S copies of one network trained as one: stacked parameters, vmapped steps.

    Args:
        networks: S networks of the same class, architecture and widths (their current weights
            are the starting points; they are not modified).
        lr: base learning rate (the module's ``lr``).
        loss: loss convention of ``mflightning.losses.mean_field_loss``.
        preset: multiplier preset (see ``mflightning.param_groups``).
        optimizer: the module's optimizer callable.
        scheduler: the module's scheduler callable, or ``None``.
        rule: the module's rule.

    Raises:
        ValueError: no networks, or networks whose parameter shapes differ.
    """

    def __init__(
        self,
        networks: Sequence[nn.Module],
        lr: float,
        loss: LossName,
        preset: PresetName = "nguyen_pham",
        *,
        optimizer: OptimizerCallable = torch.optim.SGD,
        scheduler: SchedulerCallable | None = None,
        rule: Rule = "sgd",
    ) -> None:
        if not networks:
            raise ValueError("`networks` must hold at least one network.")
        shapes = [[(n, p.shape) for n, p in net.named_parameters()] for net in networks]
        if any(s != shapes[0] for s in shapes):
            raise ValueError("`networks` must share one architecture and one set of widths.")
        self.template = copy.deepcopy(networks[0])
        self.loss = loss
        with torch.no_grad():
            self.params = {
                name: torch.stack([dict(net.named_parameters())[name].detach() for net in networks])
                for name, _ in self.template.named_parameters()
            }
        names = {id(p): name for name, p in self.template.named_parameters()}
        groups = param_groups(self.template, lr, rule=rule, preset=preset)
        self.trainable = [names[id(p)] for group in groups for p in group["params"]]
        for group in groups:  # the same groups over the stacked parameters
            group["params"] = [self.params[names[id(p)]] for p in group["params"]]
        self.update = ScheduledOptimizer(optimizer, scheduler, groups)
        self.clock = MeanFieldClock(time_step(self.template, lr, preset))
        self.size = len(networks)

    def _loss(
        self, trainable: dict[str, Tensor], frozen: dict[str, Tensor], x: Tensor, y: Tensor
    ) -> Tensor:
        prediction = functional_call(self.template, trainable | frozen, (x,))
        return mean_field_loss(self.loss, prediction, y)

    def step(self, x: Tensor, y: Tensor) -> Tensor:
        """One optimizer step of every seed on the batch ``(x, y)``; the S losses before it.

        ``clock.time`` is then the seeds' ``mf_time``.
        """
        trainable = {name: self.params[name] for name in self.trainable}
        frozen = {name: p for name, p in self.params.items() if name not in trainable}
        grads, losses = vmap(grad_and_value(self._loss), in_dims=(0, 0, None, None))(
            trainable, frozen, x, y
        )
        for name, gradient in grads.items():
            self.params[name].grad = gradient
        self.clock.tick(self.update.optimizer)
        self.update.step()
        return losses.detach()

    @torch.no_grad()
    def outputs(self, x: Tensor) -> Tensor:
        """The S networks' outputs on ``x``, stacked: ``(S, batch, ...)``."""
        return vmap(lambda p: functional_call(self.template, p, (x,)))(self.params)

    @torch.no_grad()
    def network(self, seed: int) -> nn.Module:
        """A standalone copy of network ``seed`` (index into the batch) with its current weights."""
        network = copy.deepcopy(self.template)
        for name, param in network.named_parameters():
            param.copy_(self.params[name][seed])
        return network
