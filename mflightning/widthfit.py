"""Log-log width-scaling fits with a seed bootstrap (docs/theory.md §C, §C.8).

A limit-tracking metric ``m(N)`` is expected to scale as ``c * N^slope`` (slope -1/2 for the RMS
over seeds of the output gap, §C.1; -1 for seed-averaged biases). Given per-(width, seed) values,
the fit aggregates the seeds at each width,

    "rms":    A(N) = sqrt(mean_seeds m(N, seed)^2)       (default; the §C.1 quantity)
    "median": A(N) = median_seeds m(N, seed)              (robust; the §C.3 recommendation)
    "mean":   A(N) = mean_seeds m(N, seed),

and returns the least-squares slope of ``log A(N)`` against ``log N``. The confidence interval is a
percentile bootstrap: the seeds are resampled with replacement independently within each width and
the fit is repeated ``n_boot`` times.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

Array = NDArray[np.float64]
Aggregate = Literal["rms", "median", "mean"]
AGGREGATES: dict[str, Callable[[Array], Array]] = {
    "rms": lambda v: np.sqrt(np.mean(v**2, axis=-1)),
    "median": lambda v: np.median(v, axis=-1),
    "mean": lambda v: np.mean(v, axis=-1),
}


@dataclass(frozen=True)
class SlopeFit:
    """Result of ``fit_loglog_slope``: ``A(N) ~ exp(intercept) * N^slope``.

    Attributes:
        slope: least-squares slope of log A(N) vs log N.
        intercept: its intercept (log scale).
        ci_low: lower end of the bootstrap confidence interval of the slope.
        ci_high: upper end.
        confidence: the interval's coverage level.
        aggregate: how the seeds were aggregated per width.
    """

    slope: float
    intercept: float
    ci_low: float
    ci_high: float
    confidence: float
    aggregate: str

    def contains(self, expected: float) -> bool:
        """Whether ``expected`` lies in the confidence interval ``[ci_low, ci_high]``."""
        return self.ci_low <= expected <= self.ci_high


def _slopes(log_widths: Array, log_values: Array) -> Array:
    """Least-squares slopes of ``log_values[..., j]`` against ``log_widths[j]`` (last axis)."""
    centered = log_widths - log_widths.mean()
    return (log_values * centered).sum(-1) / (centered**2).sum()


def _as_groups(
    widths: ArrayLike | Mapping[float, ArrayLike], values: Iterable[ArrayLike] | None
) -> tuple[Array, list[Array]]:
    """Normalize the inputs to (widths, [values over seeds per width]) and validate them."""
    if isinstance(widths, Mapping):
        if values is not None:
            raise ValueError("give `values` only when `widths` is a sequence, not a dict.")
        mapping: Mapping[float, ArrayLike] = widths
        widths, values = list(mapping.keys()), list(mapping.values())
    elif values is None:
        raise ValueError("`values` is required: one value or a sequence of seeds per width.")
    n = np.asarray(widths, dtype=np.float64)
    if n.ndim != 1 or len(n) < 2 or len(np.unique(n)) < 2 or not np.all(n > 0):
        raise ValueError(f"`widths` must hold at least two distinct positive widths, got {widths}.")
    groups = [np.atleast_1d(np.asarray(v, dtype=np.float64)) for v in values]
    if len(groups) != len(n):
        raise ValueError(f"`values` has {len(groups)} entries for {len(n)} widths; give one each.")
    for width, group in zip(n, groups, strict=True):
        if group.ndim != 1 or group.size == 0 or not np.all(np.isfinite(group) & (group > 0)):
            raise ValueError(
                f"`values` at width {width:g} must be a non-empty 1-D set of finite positive "
                f"numbers (a log-log fit), got {group}."
            )
    return n, groups


def fit_loglog_slope(
    widths: ArrayLike | Mapping[float, ArrayLike],
    values: Iterable[ArrayLike] | None = None,
    n_boot: int = 1000,
    confidence: float = 0.9,
    seed: int = 0,
    aggregate: Aggregate = "rms",
) -> SlopeFit:
    """Fit ``aggregate_seeds(value) ~ c * width^slope`` with a seed-bootstrap interval (§C.8).

    Args:
        widths: the widths N, or a dict ``{N: [values over seeds]}`` (then leave ``values`` out).
        values: per width, the metric over seeds (a 2-D array ``(widths, seeds)``, ragged lists,
            or one value per width — the interval is then degenerate).
        n_boot: bootstrap resamples (>= 1).
        confidence: coverage of the percentile interval, in (0, 1).
        seed: seed of the bootstrap's random generator.
        aggregate: ``"rms"`` (default), ``"median"`` or ``"mean"`` over seeds (module docstring).

    Returns:
        The fit; ``fit.contains(-0.5)`` tests the mean-field rate.

    Raises:
        ValueError: fewer than two distinct widths, non-positive or non-finite values, or bad
            ``n_boot``, ``confidence`` or ``aggregate``.
    """
    if aggregate not in AGGREGATES:
        raise ValueError(f"unknown `aggregate` {aggregate!r}; choose one of {list(AGGREGATES)}.")
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 1:
        raise ValueError(f"`n_boot` must be a positive integer, got {n_boot!r}.")
    if not 0 < confidence < 1:
        raise ValueError(f"`confidence` must lie in (0, 1), e.g. 0.9, got {confidence!r}.")
    n, groups = _as_groups(widths, values)
    reduce = AGGREGATES[aggregate]
    log_n = np.log(n)
    log_a = np.log([reduce(g) for g in groups])
    slope = float(_slopes(log_n, log_a))
    intercept = float(log_a.mean() - slope * log_n.mean())

    rng = np.random.default_rng(seed)
    boot = np.stack(
        [reduce(g[rng.integers(0, g.size, size=(n_boot, g.size))]) for g in groups], axis=-1
    )
    low, high = np.quantile(
        _slopes(log_n, np.log(boot)), [(1 - confidence) / 2, (1 + confidence) / 2]
    )
    return SlopeFit(slope, intercept, float(low), float(high), float(confidence), aggregate)
