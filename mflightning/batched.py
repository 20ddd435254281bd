"""Seed-batched training: S networks of one architecture and width as one vmapped model.

A width sweep trains S independent seeds of every width on the same batches. Stacking their
parameters along a new leading dimension and applying ``torch.func.vmap`` to the network's own
forward (through ``torch.func.functional_call``) runs the S forward/backward passes as batched
matrix products, with the per-layer SGD rule of docs/theory.md §1.2,

    w_s <- w_s - lr_group * dLoss_s/dw_s        for every seed s and trainable parameter w,

exactly as S separate ``torch.optim.SGD(param_groups(net, lr))`` runs would do (same float
operations up to summation order). Only plain SGD (no momentum, weight decay or scheduler) is
batched; anything else trains run by run with Lightning.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, vmap

from mflightning.losses import LossName, mean_field_loss
from mflightning.scaling import PresetName, param_groups


def parameter_lrs(network: nn.Module, lr: float, preset: PresetName) -> dict[str, float]:
    """``{parameter name: lr of its SGD group}`` for the trainable parameters (§1.2)."""
    names = {id(p): name for name, p in network.named_parameters()}
    return {
        names[id(p)]: group["lr"]
        for group in param_groups(network, lr, rule="sgd", preset=preset)
        for p in group["params"]
    }


class SeedBatch:
    """S copies of one network trained as one: stacked parameters, vmapped steps.

    Args:
        networks: S networks of the same class, architecture and widths (their current weights
            are the starting points; they are not modified).
        lr: base learning rate (the module's ``lr``).
        loss: loss convention of ``mflightning.losses.mean_field_loss``.
        preset: multiplier preset (see ``mflightning.param_groups``).

    Raises:
        ValueError: no networks, or networks whose parameter shapes differ.
    """

    def __init__(
        self,
        networks: Sequence[nn.Module],
        lr: float,
        loss: LossName,
        preset: PresetName = "nguyen_pham",
    ) -> None:
        if not networks:
            raise ValueError("`networks` must hold at least one network.")
        shapes = [[(n, p.shape) for n, p in net.named_parameters()] for net in networks]
        if any(s != shapes[0] for s in shapes):
            raise ValueError("`networks` must share one architecture and one set of widths.")
        self.template = copy.deepcopy(networks[0])
        self.loss = loss
        self.lrs = parameter_lrs(self.template, lr, preset)
        with torch.no_grad():
            self.params = {
                name: torch.stack([dict(net.named_parameters())[name].detach() for net in networks])
                for name, _ in self.template.named_parameters()
            }
        self.size = len(networks)

    def _loss(
        self, trainable: dict[str, Tensor], frozen: dict[str, Tensor], x: Tensor, y: Tensor
    ) -> Tensor:
        prediction = functional_call(self.template, trainable | frozen, (x,))
        return mean_field_loss(self.loss, prediction, y)

    def step(self, x: Tensor, y: Tensor) -> Tensor:
        """One SGD step of every seed on the batch ``(x, y)``; returns the S losses before it."""
        trainable = {name: self.params[name] for name in self.lrs}
        frozen = {name: p for name, p in self.params.items() if name not in self.lrs}
        grads, losses = vmap(grad_and_value(self._loss), in_dims=(0, 0, None, None))(
            trainable, frozen, x, y
        )
        with torch.no_grad():
            for name, gradient in grads.items():
                self.params[name].sub_(gradient, alpha=self.lrs[name])
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
