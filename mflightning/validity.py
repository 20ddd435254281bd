"""The validity horizon of a width sweep: up to when does the limit describe the networks?

At every logged step ``t_k`` the gaps of the runs are fitted against the width, as the final gaps
are (``fit_loglog_slope``: log-log slope over widths, seed bootstrap, 90% interval), giving a
series ``s(t_k)`` with interval ``[lo(t_k), hi(t_k)]`` per metric (docs/theory.md §C.8, §D.4).
While the networks follow the mean-field limit the gaps shrink like ``N^{-1/2}`` and ``s ≈ -1/2``.

**Off rate.** A logged step is *off rate* when the fitted slope is above ``-1/2 +
RATE_TOLERANCE`` = ``-1/4`` (the gap shrinks at most half as fast as the mean-field rate: a 4x
wider network closes less than a third of it instead of half) **and** the interval excludes the
mean-field rate (``lo > -1/2``), so seed noise alone cannot explain it. A step whose interval is
wide (few seeds) and still contains -1/2 is never off rate.

**Horizon.** ``t*`` is the first logged step from which every later logged step is off rate: a
single noisy step in the middle of a run does not set it, and a gap that keeps its slope to the
end has none (``null``). Steps without a fit (a zero gap, e.g. the coupled deviation at t = 0, or
diverged seeds) are skipped.

**Enough evidence.** A horizon needs at least ``MIN_HORIZON_SEEDS`` seeds per width and
``MIN_HORIZON_STEPS`` fitted logged steps: with fewer, a run of off-rate steps is as likely to be
seed noise as a departure, and no ``t*`` is given (the entry's ``note`` says why).

After ``t*`` the gaps no longer measure how far a network is from its limit: each network has
left the limit, narrow ones first (docs/theory.md §D.4: deep iid networks escape their degenerate
limit after a time that grows like ``log N``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mflightning.widthfit import Aggregate, fit_loglog_slope

EXPECTED_SLOPE = -0.5
RATE_TOLERANCE = 0.25
MIN_HORIZON_SEEDS = 4  # seeds per width before a horizon is stated
MIN_HORIZON_STEPS = 5  # fitted logged steps before a horizon is stated
GAP_METRICS = {"output_gap": "rms", "loss_gap": "rms"}  # the §C.1/§C.2 aggregates; dev: median


@dataclass(frozen=True)
class RunHistory:
    """The logged gaps of one (width, seed) run: ``rows[k]`` has ``step``, ``mf_time``, gaps."""

    width: int
    rows: list[dict[str, float]]


def aggregate_of(metric: str) -> Aggregate:
    """How seeds are aggregated for ``metric``: RMS for gaps (§C.1, §C.2), median for deviations."""
    return "rms" if metric in GAP_METRICS else "median"


def off_rate(slope: float, ci_low: float) -> bool:
    """Whether a fitted slope is off the mean-field rate (module docstring)."""
    return slope > EXPECTED_SLOPE + RATE_TOLERANCE and ci_low > EXPECTED_SLOPE


def slope_series(histories: list[RunHistory], metric: str) -> list[dict[str, Any]]:
    """Per logged step: ``{"step", "mf_time", "slope", "ci_low", "ci_high"}`` of ``metric``.

    ``metric`` is a gap name without the ``limit/`` prefix (``output_gap``, ``dev/layer2``).
    Steps logged by every run are fitted; where a value is not positive and finite the slope and
    its interval are ``None``.
    """
    key = f"limit/{metric}"
    by_step: dict[int, dict[float, list[float]]] = {}
    times: dict[int, float] = {}
    for history in histories:
        for row in history.rows:
            if key in row:
                step = int(row["step"])
                times[step] = float(row["mf_time"])
                by_step.setdefault(step, {}).setdefault(history.width, []).append(row[key])
    count: dict[float, int] = {h.width: 0 for h in histories}
    for history in histories:
        count[history.width] += 1
    series = []
    for step in sorted(by_step):
        per_width = by_step[step]
        entry: dict[str, Any] = {"step": step, "mf_time": times[step]}
        complete = len(per_width) >= 2 and all(
            len(values) == count[width] for width, values in per_width.items()
        )
        positive = all(v > 0 and v < float("inf") for vs in per_width.values() for v in vs)
        if complete and positive:
            fit = fit_loglog_slope(per_width, aggregate=aggregate_of(metric))
            entry |= {"slope": fit.slope, "ci_low": fit.ci_low, "ci_high": fit.ci_high}
        else:
            entry |= {"slope": None, "ci_low": None, "ci_high": None}
        series.append(entry)
    return series


def horizon(series: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The first entry of ``series`` from which every fitted entry is off rate, or ``None``."""
    fitted = [entry for entry in series if entry["ci_low"] is not None]
    start = None
    for entry in reversed(fitted):
        if not off_rate(entry["slope"], entry["ci_low"]):
            break
        start = entry
    return start


def _too_little_evidence(histories: list[RunHistory], series: list[dict[str, Any]]) -> str | None:
    """Why ``series`` cannot support a horizon (too few seeds or fitted steps), or ``None``."""
    seeds: dict[float, int] = {}
    for history in histories:
        seeds[history.width] = seeds.get(history.width, 0) + 1
    fewest = min(seeds.values(), default=0)
    fitted = sum(entry["ci_low"] is not None for entry in series)
    if fewest < MIN_HORIZON_SEEDS:
        return (
            f"no horizon: {fewest} seeds per width, fewer than the {MIN_HORIZON_SEEDS} needed to "
            "tell a departure from seed noise (--seeds 8)"
        )
    if fitted < MIN_HORIZON_STEPS:
        return (
            f"no horizon: {fitted} fitted logged steps, fewer than the {MIN_HORIZON_STEPS} "
            "needed (log more often with --every_n_steps)"
        )
    return None


def validity(histories: list[RunHistory], metrics: list[str]) -> dict[str, Any]:
    """``{metric: {"step_star", "t_star", "series"}}`` for ``metrics`` (module docstring).

    With too few seeds or fitted steps the entry has no horizon and a ``note`` saying why.
    """
    report: dict[str, Any] = {}
    for metric in metrics:
        series = slope_series(histories, metric)
        note = _too_little_evidence(histories, series)
        star = horizon(series) if note is None else None
        report[metric] = {
            "step_star": None if star is None else star["step"],
            "t_star": None if star is None else star["mf_time"],
            "series": series,
        }
        if note is not None:
            report[metric]["note"] = note
    return report


def earliest_horizon(report: Mapping[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """``(metric, entry)`` of the earliest ``t*`` over the metrics of a validity report."""
    flagged = [(name, v) for name, v in report.items() if v["step_star"] is not None]
    return min(flagged, key=lambda item: item[1]["step_star"]) if flagged else None
