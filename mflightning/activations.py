"""Activation functions by name, with the parity used by the trivial-limit check (§B.3)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


def identity(x: Tensor) -> Tensor:
    """``phi(x) = x``."""
    return x


@dataclass(frozen=True)
class Activation:
    """A named activation ``phi``.

    Attributes:
        name: the name used in configs.
        fn: the function.
        odd: whether ``phi(-x) = -phi(x)``; an odd first activation with a symmetric first-layer law
            makes the deep mean-field limit stationary (§B.3).
    """

    name: str
    fn: Callable[[Tensor], Tensor]
    odd: bool


ACTIVATIONS: dict[str, Activation] = {
    a.name: a
    for a in (
        Activation("identity", identity, odd=True),
        Activation("relu", F.relu, odd=False),
        Activation("tanh", torch.tanh, odd=True),
        Activation("sigmoid", torch.sigmoid, odd=False),
        Activation("gelu", F.gelu, odd=False),
        Activation("silu", F.silu, odd=False),
        Activation("softplus", F.softplus, odd=False),
        Activation("sin", torch.sin, odd=True),
    )
}


def get_activation(name: str, argument: str = "activations") -> Activation:
    """Look an activation up by name.

    Raises:
        ValueError: unknown name; the message names ``argument`` and the allowed names.
    """
    try:
        return ACTIVATIONS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown activation {name!r} in `{argument}`; choose one of {sorted(ACTIVATIONS)}."
        ) from None
