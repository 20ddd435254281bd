"""A measured cost model of ``ReducedLimitSolver.step``, and the default number of end atoms.

One Euler step of the reduced solver (docs/theory.md §B.3, §B.4) on a batch of P samples with d
input features costs, in seconds,

    ``t = fixed + layer * (L - 2)                            (Python and small torch ops)``
    ``    + P * (M_1 * (first + feature * d) + M_L * last)              (L = 2, L >= 4)``
    ``    + P * M_1 * M_3 * table                                        (L = 3 instead)``
    ``    + S * coupled + P * tracer * sum_s (n_1 (first + feature * d) + n_{L-1} last)``

for S coupled networks with end widths ``n_1``, ``n_{L-1}`` (their neurons take only the
backward pass: ``tracer`` = 1/2). ``first`` and ``feature`` are the first layer's cost per atom and
sample (plus per input feature); ``last`` the last hidden layer's (``w_L`` included; for L = 2
``last`` is 0: the readout rides in the first layer's pass). Coefficients in ``CPU_COST`` (torch
ops; ``COMPILED_COST`` for the compiled passes of ``mflightning.limit.native``, see there),
measured on the 2-core container of docs/benchmarks.md (reduced section) with
``torch.set_num_threads(1)`` and ``time.process_time`` (so that other jobs on the machine count
less), T-REDUCED networks (relu first layer, tanh middle layers, identity readout, float64, no
biases, layers too large to keep their forward values):

* ``first + 5 feature``: 2.9 ns (L = 2, M = 65 536, P = 100, d = 5); ``feature``: 0.31 ns
  (d = 1, 20, 50 at M = 65 536); ``last``: 6.7-7.8 ns (L = 5 minus L = 2, M = 2^16 .. 2^18);
* ``fixed``: 0.5 ms (L = 2) to 1.0 ms (L = 5), ``layer``: 0.05 ms (L = 8); ``coupled``: 0.1 ms
  per coupled network (8 networks of width 64 at M = 64; all coupled networks take one pass);
  ``table``: 0.3 ns (L = 3, M = 256 .. 2048);
* two threads divide the per-atom terms by ``speedup`` = 1.8 (M = 10^6, L = 5, quiet machine).

Other activations change ``first`` and ``last`` (a tanh layer evaluates two sigmoids per atom and
sample, a relu layer none; gelu is about twice tanh), other CPUs all of them: measure with
``benchmarks/reduced_vs_bruteforce.py`` (its ``model ms`` column) and pass a ``ReducedCost``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from mflightning.nn import check_positive_int


@dataclass(frozen=True)
class ReducedCost:
    """Coefficients of the cost model (seconds; see the module docstring).

    Attributes:
        fixed: per step.
        layer: per step and middle layer.
        coupled: per step and coupled network.
        first: per first-layer atom and sample.
        feature: per first-layer atom, sample and input feature.
        last: per last-hidden-layer atom and sample (L >= 4).
        table: per sample and entry of the L = 3 table ``g_2`` (M_1 M_3 entries).
        tracer: a coupled network's neuron as a fraction of an atom (backward pass only).
        speedup: the per-atom terms are divided by this (threads).
    """

    fixed: float = 1.0e-3
    layer: float = 5.0e-5
    coupled: float = 1.0e-4
    first: float = 1.36e-9
    feature: float = 0.31e-9
    last: float = 7.3e-9
    table: float = 0.3e-9
    tracer: float = 0.5
    speedup: float = 1.8


CPU_COST = ReducedCost()
# with the compiled passes (mflightning.limit.native), same machine, one thread, best of 60
# passes of 10^5 atoms (P = 100): relu first layer (d = 5) forward 0.5-0.6 ns and backward
# 1.7-1.8 ns per atom and sample, tanh last layer 1.8-2.1 ns and 2.5-2.6 ns; fixed: the median
# process time of a step at M = 64 (one thread) 0.28 ms (L = 2), 0.51 (L = 4), 0.60 (L = 5),
# less the atoms' 0.04 ms; two threads: 580 -> 295-320 ms at M = 10^6 (L = 5), 1.8-2.0x
COMPILED_COST = ReducedCost(fixed=0.25e-3, layer=1.0e-4, first=0.8e-9, last=4.5e-9, speedup=1.9)


def cpu_cost() -> ReducedCost:
    """This CPU's coefficients: ``COMPILED_COST`` with the compiled passes, else ``CPU_COST``."""
    from mflightning.limit import native  # compiles at first use

    return COMPILED_COST if native.library() is not None else CPU_COST


def _ends(widths: Sequence[int]) -> tuple[int, int]:
    """``(n_1, n_{L-1})`` of a list of hidden widths."""
    return widths[0], widths[-1]


def step_seconds(
    atoms: int,
    in_features: int,
    batch: int,
    depth: int,
    coupled: Sequence[Sequence[int]] = (),
    cost: ReducedCost | None = None,
) -> float:
    """Predicted seconds of one ``ReducedLimitSolver.step`` with ``atoms`` = M_1 = M_L.

    Args:
        atoms: end atoms M (first-layer rows and readout columns, M each).
        in_features: input dimension d.
        batch: samples per step P.
        depth: number of layers L >= 2.
        coupled: the hidden widths of each coupled network (``couple``).
        cost: the coefficients (default: ``cpu_cost()``).

    Raises:
        ValueError: a bad argument (named).
    """
    for name, value in (
        ("atoms", atoms),
        ("in_features", in_features),
        ("batch", batch),
        ("depth", depth),
    ):
        check_positive_int(name, value)
    if depth < 2:
        raise ValueError(f"`depth` must be at least 2 (input and readout layers), got {depth}.")
    widths = [list(w) for w in coupled]
    for w in widths:
        if len(w) != depth - 1:
            raise ValueError(
                f"`coupled` must list {depth - 1} hidden widths per network (depth {depth}), "
                f"got {w}."
            )
        for n in w:
            check_positive_int("coupled widths", n)
    cost = cost or cpu_cost()
    first = cost.first + cost.feature * in_features
    last = 0.0 if depth == 2 else cost.last
    overhead = cost.fixed + cost.layer * (depth - 2) + cost.coupled * len(widths)
    tracers = sum(n1 * first + n_last * last for n1, n_last in map(_ends, widths))
    if depth == 3:  # the M_3 x M_1 table, and the tracers' rows and columns of it
        work = atoms * atoms * cost.table + atoms * first + atoms * cost.last
        tracers += sum((n1 + n_last) * atoms * cost.table for n1, n_last in map(_ends, widths))
    else:
        work = atoms * (first + last)
    return overhead + batch * (work + cost.tracer * tracers) / cost.speedup


def default_atoms(
    in_features: int,
    batch: int,
    depth: int,
    steps: int,
    coupled: Sequence[Sequence[int]] = (),
    budget_s: float = 60.0,
    cost: ReducedCost | None = None,
    floor: int = 16,
) -> int:
    """End atoms M for a reduced reference whose ``steps`` steps take about ``budget_s``.

    The largest M with ``steps * step_seconds(M) <= budget_s``, and never fewer than ``floor``
    times the largest coupled width (nor fewer than ``floor``).

    Args:
        in_features: input dimension d.
        batch: samples per step P.
        depth: number of layers L.
        steps: steps of the limit pass.
        coupled: the hidden widths of each network coupled to the solver.
        budget_s: the target time of the limit pass.
        cost: the coefficients (default: ``cpu_cost()``).
        floor: M >= floor * max(coupled widths, 1).

    Returns:
        M, a multiple of 64 (or the floor).

    Raises:
        ValueError: a bad argument (named).
    """
    check_positive_int("steps", steps)
    check_positive_int("floor", floor)
    if isinstance(budget_s, bool) or not isinstance(budget_s, (int, float)) or not budget_s > 0:
        raise ValueError(f"`budget_s` must be a positive number of seconds, got {budget_s!r}.")
    smallest = floor * max([1, *(n for w in coupled for n in w)])
    per_step = budget_s / steps
    cost = cost or cpu_cost()
    if step_seconds(smallest, in_features, batch, depth, coupled, cost) >= per_step:
        return smallest

    def fits(units: int) -> bool:  # M = 64 units
        return step_seconds(64 * units, in_features, batch, depth, coupled, cost) < per_step

    low, high = math.ceil(smallest / 64), math.ceil(smallest / 64) + 1  # step_seconds grows
    while fits(high):  # bracket: fits(low), not fits(high)
        low, high = high, 2 * high
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return max(smallest, 64 * low)
