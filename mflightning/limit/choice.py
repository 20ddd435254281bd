"""Which limit a width-N network is compared with: the particle solver or the exact reduced one.

* ``"particles"``: ``ParticleLimitSolver`` with M neurons per hidden layer (docs/theory.md §B.4);
  networks are coupled by subsampling its particles. Works for every ``MeanFieldStack``.
* ``"reduced"``: ``ReducedLimitSolver`` with M atoms per end layer (§B.3, §B.4), the exact limit
  of an iid-initialised ``MeanFieldMLP``; networks are coupled by ideal-particle integration.
* ``"auto"``: the reduced solver for every ``MeanFieldMLP`` of depth L >= 4 it supports (iid laws
  with known means, constant initial biases in the degenerate layers), the particles otherwise.

Why the choice matters: for L >= 4 the iid limit is degenerate (§B.3) and unstable; a particle
solver at finite M carries middle-layer fluctuations of size ~ 1/sqrt(M) that grow until it
escapes the degenerate state after a time ~ log M (§D.4), so after that time it is no longer the
limit. The reduced solver has no middle-layer noise and stays on the exact limit.
"""

from __future__ import annotations

import warnings
from typing import Literal, get_args

import torch

from mflightning.limit.coupling import Coupling
from mflightning.limit.ideal import IdealCoupling
from mflightning.limit.reduced import ReducedLimitSolver, _check_reducible, update_support
from mflightning.limit.solver import ParticleLimitSolver
from mflightning.losses import LossName
from mflightning.mlp import MeanFieldMLP
from mflightning.optim import OptimizerCallable, SchedulerCallable, UpdateFactories
from mflightning.scaling import Rule
from mflightning.stack import MeanFieldStack

LimitKind = Literal["auto", "particles", "reduced"]
LIMIT_KINDS: tuple[str, ...] = get_args(LimitKind)
LimitSolver = ParticleLimitSolver | ReducedLimitSolver
AnyCoupling = Coupling | IdealCoupling
MIN_REDUCED_DEPTH = 4  # below it the limit is not degenerate and the particle solver is exact
LEFT_LIMIT_THRESHOLD = 0.5  # relative output gap beyond which a model has left the limit


def reduced_support(network: object) -> str | None:
    """Why the reduced solver cannot integrate ``network``'s limit, or ``None`` if it can."""
    try:
        _check_reducible(network)
    except ValueError as error:
        return str(error)
    return None


def has_degenerate_exact_limit(network: object) -> bool:
    """Whether ``network`` is a deep (L >= 4) iid MLP whose exact limit the reduced solver covers.

    Its limit is degenerate (§B.3): the networks ``auto`` couples to ``ReducedLimitSolver`` and
    whose particle solvers can leave the exact limit (§D.4).
    """
    return (
        isinstance(network, MeanFieldMLP)
        and len(network.widths) + 1 >= MIN_REDUCED_DEPTH
        and reduced_support(network) is None
    )


def resolve_limit(
    kind: str, network: MeanFieldStack, update: UpdateFactories | None = None
) -> Literal["particles", "reduced"]:
    """The solver kind ``kind`` selects for ``network`` trained with ``update`` (module docstring).

    ``"auto"`` takes the particles, with a warning, for a deep iid MLP whose update the reduced
    solver does not follow (weight decay, docs/theory.md §F.5).

    Raises:
        ValueError: an unknown ``kind``, or ``"reduced"`` for a network or an update it does not
            cover (the message says why and names ``particles`` as the alternative).
    """
    if kind not in LIMIT_KINDS:
        raise ValueError(f"unknown `limit` {kind!r}; choose one of {', '.join(LIMIT_KINDS)}.")
    reason = reduced_support(network)
    if reason is None and update is not None:
        reason = update_support(update["optimizer"], update["rule"], len(network.widths) + 1)
    if kind == "reduced":
        if reason is not None:
            raise ValueError(
                f"`limit` = 'reduced' cannot integrate this network's limit: {reason.rstrip('.')}. "
                "Use --limit particles (LimitTracker: limit='particles'): the particle solver "
                "covers every network."
            )
        return "reduced"
    if kind == "auto" and has_degenerate_exact_limit(network):
        if reason is None:
            return "reduced"
        warnings.warn(
            f"limit 'auto' takes the particle solver: {reason}. Its finite M can leave the "
            "degenerate limit of this deep iid network after a time ~ log M (§D.4).",
            stacklevel=2,
        )
    return "particles"


def solver_widths(network: MeanFieldStack, kind: str, atoms: int) -> list[int]:
    """The hidden widths of the network holding the solver's particles (or atoms).

    The particle solver needs M neurons in every hidden layer. The reduced solver reads only
    the end layers (M atoms each) and the middle laws' means; for L >= 4 its middle widths are 1,
    so memory stays O(M) (for L <= 3 every hidden layer is an end layer).
    """
    depth = len(network.widths) + 1
    if kind == "reduced" and depth >= MIN_REDUCED_DEPTH:
        return [atoms] + [1] * (depth - 3) + [atoms]
    return [atoms] * (depth - 1)


def solver_network(network: MeanFieldStack, kind: str, atoms: int, seed: int = 0) -> MeanFieldStack:
    """The network holding the solver's initial particles (or atoms, ``solver_widths``)."""
    widths = solver_widths(network, kind, atoms)
    return network.with_widths(widths, generator=torch.Generator().manual_seed(seed))


def build_solver(
    network: MeanFieldStack,
    kind: Literal["particles", "reduced"],
    atoms: int,
    lr: float,
    loss: LossName,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
    seed: int = 0,
    *,
    optimizer: OptimizerCallable = torch.optim.SGD,
    scheduler: SchedulerCallable | None = None,
    rule: Rule = "sgd",
) -> LimitSolver:
    """The limit solver of ``kind`` for ``network``'s architecture with ``atoms`` (= M).

    ``optimizer``, ``scheduler`` and ``rule`` are the networks' (the module's callables): the
    solver's step follows them (docs/theory.md §F).
    """
    wide = solver_network(network, kind, atoms, seed)
    update = UpdateFactories(optimizer=optimizer, scheduler=scheduler, rule=rule)
    if kind == "reduced":
        return ReducedLimitSolver(wide, lr=lr, loss=loss, dtype=dtype, device=device, **update)
    return ParticleLimitSolver(wide, lr=lr, loss=loss, dtype=dtype, device=device, **update)


def exact_beside(solver: LimitSolver) -> ReducedLimitSolver | None:
    """The reduced solver on the particle solver's own end atoms, when the network allows it.

    Run beside a ``ParticleLimitSolver`` of a network with a degenerate iid limit, it tells when
    the particles themselves leave the exact limit (``particle_departure``); with shared atoms
    the two agree to O(1/M) before that (§D.3 T-REDUCED).
    """
    if not isinstance(solver, ParticleLimitSolver):
        return None
    network = solver.network
    if not has_degenerate_exact_limit(network):
        return None
    try:
        return ReducedLimitSolver(
            network,
            lr=solver.lr,
            loss=solver.loss,
            dtype=solver.dtype,
            device=solver.device,
            **solver.update_factories,
        )
    except ValueError:  # an update the reduced solver does not cover (weight decay, §F.5)
        return None


def departure(series: list[dict[str, float]]) -> dict[str, float] | None:
    """The first entry of a ``{"step", "mf_time", "relative_gap"}`` series past the threshold."""
    for entry in series:
        if entry["relative_gap"] > LEFT_LIMIT_THRESHOLD:
            return entry
    return None


__all__ = [
    "LEFT_LIMIT_THRESHOLD",
    "LIMIT_KINDS",
    "AnyCoupling",
    "LimitKind",
    "LimitSolver",
    "build_solver",
    "departure",
    "exact_beside",
    "has_degenerate_exact_limit",
    "reduced_support",
    "resolve_limit",
    "solver_network",
    "solver_widths",
]
