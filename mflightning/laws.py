"""Width-independent initialization laws for mean-field weights (docs/theory.md §1.1, §E.1 item 3).

In the mean-field parametrization every weight is O(1): it is drawn from a law that does not depend
on the width (unlike PyTorch's default Kaiming init, whose scale is ``1/sqrt(fan_in)``). A law is an
``InitLaw``; ``Normal`` and ``Uniform`` cover the seed papers, and any in-place
callable (for example ``functools.partial(torch.nn.init.uniform_, a=-1, b=1)``) is accepted through
``as_law``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

InPlaceInit = Callable[..., Any]
"""A function that fills a tensor in place, like ``torch.nn.init.normal_``."""


class InitLaw(ABC):
    """A width-independent law: every entry of a weight tensor is drawn iid from it."""

    @abstractmethod
    def sample_(self, tensor: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Fill ``tensor`` in place with iid draws and return it."""

    @property
    @abstractmethod
    def mean(self) -> float | None:
        """The law's mean (``None`` when unknown)."""

    @property
    @abstractmethod
    def is_symmetric(self) -> bool:
        """Whether the law is symmetric about 0 (``False`` when unknown)."""


def _check_finite(name: str, value: float) -> None:
    if not math.isfinite(value):
        raise ValueError(f"`{name}` must be a finite number, got {value!r}.")


@dataclass(frozen=True)
class Normal(InitLaw):
    """Gaussian law ``N(mean, std**2)``; ``std=0`` gives the constant ``mean``.

    Nguyen (2019) writes the middle-layer laws as ``N(mu_i, tau_i**2)`` (docs/theory.md §D.1).

    Args:
        mean: the mean ``mu``.
        std: the standard deviation ``tau >= 0``.
    """

    mean: float = 0.0  # type: ignore[misc]  # a dataclass field implements the abstract property
    std: float = 1.0

    def __post_init__(self) -> None:
        _check_finite("mean", self.mean)
        _check_finite("std", self.std)
        if self.std < 0:
            raise ValueError(f"`std` must be >= 0, got {self.std}; use Normal(mean, abs(std)).")

    def sample_(self, tensor: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Fill ``tensor`` with ``N(mean, std**2)`` draws (constant ``mean`` if ``std == 0``)."""
        with torch.no_grad():
            if self.std == 0:
                return tensor.fill_(self.mean)
            return tensor.normal_(self.mean, self.std, generator=generator)

    @property
    def is_symmetric(self) -> bool:
        """``True`` when ``mean == 0``."""
        return self.mean == 0


@dataclass(frozen=True)
class Uniform(InitLaw):
    """Uniform law on ``[low, high]`` (Araújo et al. use ``Uniform(-c, c)``, docs/theory.md §D.2).

    Args:
        low: lower end.
        high: upper end, ``high >= low``; ``high == low`` gives a constant.
    """

    low: float = -1.0
    high: float = 1.0

    def __post_init__(self) -> None:
        _check_finite("low", self.low)
        _check_finite("high", self.high)
        if self.high < self.low:
            raise ValueError(
                f"`high` must be >= `low`, got low={self.low}, high={self.high}; swap them."
            )

    def sample_(self, tensor: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Fill ``tensor`` with ``Uniform(low, high)`` draws."""
        with torch.no_grad():
            if self.high == self.low:
                return tensor.fill_(self.low)
            return tensor.uniform_(self.low, self.high, generator=generator)

    @property
    def mean(self) -> float:
        """``(low + high) / 2``."""
        return (self.low + self.high) / 2

    @property
    def is_symmetric(self) -> bool:
        """``True`` when ``low == -high``."""
        return self.low == -self.high


@dataclass(frozen=True)
class CallableLaw(InitLaw):
    """Wraps an in-place init function; its mean and symmetry are unknown to the library.

    Args:
        fn: called as ``fn(tensor)`` or, when a generator is given, ``fn(tensor, generator=g)``
            (the signature of ``torch.nn.init`` functions).
    """

    fn: InPlaceInit

    def sample_(self, tensor: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Call ``fn`` on ``tensor`` under ``torch.no_grad()``."""
        with torch.no_grad():
            if generator is None:
                self.fn(tensor)
            else:
                self.fn(tensor, generator=generator)
        return tensor

    @property
    def mean(self) -> None:
        """Unknown."""
        return None

    @property
    def is_symmetric(self) -> bool:
        """Unknown, reported as ``False``."""
        return False


def as_law(init: InitLaw | InPlaceInit, name: str = "init") -> InitLaw:
    """Return ``init`` as an ``InitLaw``, wrapping plain callables in ``CallableLaw``.

    Raises:
        ValueError: ``init`` is neither a law nor callable; the message names ``name``.
    """
    if isinstance(init, InitLaw):
        return init
    if callable(init):
        return CallableLaw(init)
    raise ValueError(
        f"`{name}` must be a width-independent law such as mflightning.Normal(0.0, 1.0), "
        f"mflightning.Uniform(-1.0, 1.0), or an in-place init function; got {init!r}."
    )


def law_config(law: InitLaw) -> dict[str, Any]:
    """A plain-data description ``{"class_path": ..., "init_args": ...}`` of a Normal/Uniform law.

    Raises:
        ValueError: the law wraps a callable, which has no safe plain-data form.
    """
    if isinstance(law, (Normal, Uniform)):
        return {"class_path": f"{__name__}.{type(law).__name__}", "init_args": asdict(law)}
    raise ValueError(
        f"cannot describe {law!r} as plain data; use mflightning.Normal or mflightning.Uniform "
        "so that checkpoints can rebuild the network."
    )
