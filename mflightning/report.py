"""The report of a width sweep: per-width gaps, fitted slopes, curves and figures (§C, §C.8).

Per width, over seeds: the RMS of the per-seed output gap at the final time and of its sup over
time (§C.1), the RMS loss gap (§C.2), the median coupled deviation per layer (§C.3), the mean
accuracy, and the median neuron spread per hidden layer (§C.6). Slopes are log-log fits with a
seed bootstrap (``mflightning.widthfit.fit_loglog_slope``); the expected slope is -1/2.

``slopes`` are fitted at the final time; ``validity`` repeats the fit at every logged time and
gives each metric's validity horizon ``t*`` (``mflightning.validity``), and ``slopes_to_horizon``
fits each metric's sup over the times before its horizon. ``limit`` names the solver and M.

A width enters the fits only with at least ``MIN_SEEDS`` finished (not diverged) seeds: the
intervals resample the seeds of each width, and one seed gives a zero-width interval.
``fitted_widths`` lists the widths that qualify; with fewer than two of them there is no slope,
``slopes``, ``slopes_to_horizon`` and ``validity`` are ``null`` and ``notes`` says why. ``notes``
holds every such caveat, and ``mfl sweep`` prints it; a slope whose interval misses -1/2 gets a
note with its known cause (``missed_slope_reason``: the loss gap's N^-1 bias, §C.2; noisy
coupled deviations, §C.3, slower under Adam, §F.4; a floor or a horizon, §B.4, §D.4).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mflightning.limit.choice import departure
from mflightning.plots import plot_gap_scaling, plot_layer_scaling, plot_loss_curves, plot_validity
from mflightning.validity import RunHistory, aggregate_of, earliest_horizon, validity
from mflightning.widthfit import SlopeFit, fit_loglog_slope

EXPECTED_SLOPE = -0.5  # per-seed gaps and coupled deviations scale as N^{-1/2} (§C.1-§C.3)
MIN_SEEDS = 2  # finished seeds a width needs to enter the fits (module docstring)
FIGURES = ("loss_curves", "output_gap", "deviation", "neuron_spread", "validity")


@dataclass
class RunResult:
    """What one (width, seed) run leaves behind.

    Attributes:
        width: hidden width N.
        seed: subsample seed.
        diverged: a training loss was not finite.
        history: the logged gaps (``step``, ``mf_time``, ``limit/...``) at every logging step.
        train_loss: training loss of every step (before its update).
        accuracy: final accuracy on the probe set.
        spread: final neuron spread ``S_i`` per hidden layer (§C.6).
    """

    width: int
    seed: int
    diverged: bool
    history: list[dict[str, float]]
    train_loss: list[float]
    accuracy: float
    spread: dict[str, float]

    def final(self, key: str) -> float:
        """The gap ``key`` at the last logged step."""
        return self.history[-1][key]

    def sup(self, key: str) -> float:
        """Sup over the logged times of a gap (``G^T`` of §C.1)."""
        return max(row[key] for row in self.history)


Results = Mapping[tuple[int, int], RunResult]


def _by_width(results: Results) -> dict[int, list[RunResult]]:
    grouped: dict[int, list[RunResult]] = {}
    for (width, _), result in sorted(results.items()):
        if not result.diverged:
            grouped.setdefault(width, []).append(result)
    return grouped


def _last_row(grouped: dict[int, list[RunResult]]) -> dict[str, float]:
    """The last logged row of the first finished run (``{}`` when every run diverged)."""
    return next((rs[0].history[-1] for rs in grouped.values() if rs[0].history), {})


def _layers(grouped: dict[int, list[RunResult]]) -> list[str]:
    last = _last_row(grouped)
    return sorted(key.removeprefix("limit/dev/") for key in last if key.startswith("limit/dev/"))


def _metrics(grouped: dict[int, list[RunResult]]) -> list[str]:
    """The gap metrics of the runs: ``output_gap``, ``loss_gap`` and ``dev/<layer>``."""
    last = _last_row(grouped)
    gaps = [key for key in ("output_gap", "loss_gap") if f"limit/{key}" in last]
    return gaps + [f"dev/{layer}" for layer in _layers(grouped)]


def _no_slope_reason(results: Results, grouped: dict[int, list[RunResult]]) -> str:
    """Why fewer than two widths can be fitted, and what to do about it."""
    diverged = sum(r.diverged for r in results.values())
    if diverged == len(results):
        return (
            f"no slope: all {diverged} runs diverged (diverged_runs), so no width has a gap to "
            "fit; lower the lr or check the multiplier preset (docs/reliability.md)."
        )
    widths = sorted({width for width, _ in results})
    finished = ", ".join(f"N{w}: {len(grouped.get(w, []))}" for w in widths)
    cause = f" ({diverged} of {len(results)} runs diverged, see diverged_runs)" if diverged else ""
    return (
        f"no slope: a slope needs two widths with at least {MIN_SEEDS} finished seeds each; "
        f"finished seeds per width: {finished}{cause}."
    )


def _slopes_to_horizon(
    grouped: dict[int, list[RunResult]], horizons: dict[str, Any]
) -> dict[str, Any]:
    """Per metric, the slope of its sup over the logged times before its horizon ``t*``.

    Without a horizon the window is the whole run (the ``G^T`` of docs/theory.md §C.1); when no
    fitted time precedes ``t*`` the entry is ``None``.
    """
    fits: dict[str, Any] = {}
    for metric, entry in horizons.items():
        end, key = entry["step_star"], f"limit/{metric}"

        def window(run: RunResult, end: int | None = end, key: str = key) -> list[float]:
            return [r[key] for r in run.history if key in r and (end is None or r["step"] < end)]

        values = {w: [max(window(r), default=0.0) for r in rs] for w, rs in grouped.items()}
        if not all(v > 0 for vs in values.values() for v in vs):
            fits[metric] = None
            continue
        fits[metric] = _slope(values, aggregate_of(metric)) | {
            "quantity": "sup over the run" if end is None else "sup over the times before t*",
            "before_step": end,
        }
    return fits


def _rms(values: list[float]) -> float:
    return float(np.sqrt(np.mean(np.square(values))))


def _fittable(per_width: dict[int, list[float]]) -> bool:
    """Whether every value is positive and finite, as a log-log fit needs."""
    array = np.asarray([v for values in per_width.values() for v in values], dtype=float)
    return bool(np.isfinite(array).all() and (array > 0).all())


def _slope(per_width: dict[int, list[float]], aggregate: str) -> dict[str, Any]:
    fit = fit_loglog_slope(per_width, aggregate=aggregate)  # type: ignore[arg-type]
    return {
        "slope": fit.slope,
        "ci_low": fit.ci_low,
        "ci_high": fit.ci_high,
        "confidence": fit.confidence,
        "aggregate": fit.aggregate,
        "intercept": fit.intercept,
        "expected": EXPECTED_SLOPE,
        "contains_expected": fit.contains(EXPECTED_SLOPE),
    }


def slope_line(metric: str, fit: Mapping[str, Any]) -> str:
    """One line for a fitted slope of ``report["slopes"]``: value, interval, expected inside?"""
    where = "at the final step" if fit.get("at", "final") == "final" else f"({fit['at']})"
    inside = "inside" if fit["contains_expected"] else "OUTSIDE"
    return (
        f"{metric} slope {where} {fit['slope']:.3f}, {fit['confidence']:.0%} interval "
        f"[{fit['ci_low']:.3f}, {fit['ci_high']:.3f}]; expected {fit['expected']} is {inside}"
    )


def missed_slope_reason(
    metric: str, fit: Mapping[str, Any], rule: str | None = None, horizon: int | None = None
) -> str:
    """Why a fitted slope can miss its expected value, for ``notes`` (docs/theory.md §C).

    Args:
        metric: a key of ``report["slopes"]`` (``output_gap``, ``loss_gap``, ``dev/<layer>``...).
        fit: its entry (``slope``, ``ci_low``, ``ci_high``, ``expected``).
        rule: the module's optimizer rule (``"sgd"`` or ``"adam"``, §F).
        horizon: the metric's validity horizon ``step_star`` (``None``: none was found).

    Returns:
        One line: the slope, its interval, the expected value and the known cause.
    """
    return (
        f"{metric} slope {fit['slope']:.3f} [{fit['ci_low']:.3f}, {fit['ci_high']:.3f}] misses "
        f"the expected {fit['expected']}: {_cause(metric, fit, rule, horizon)}."
    )


def _cause(metric: str, fit: Mapping[str, Any], rule: str | None, horizon: int | None) -> str:
    """The known cause of a missed slope (``missed_slope_reason``), by metric and direction."""
    steeper = fit["ci_high"] < fit["expected"]
    if horizon is not None and not steeper:
        return (
            f"the runs went past this metric's validity horizon (step {horizon}): after it the "
            "gap stops shrinking like N^-1/2 (docs/theory.md §D.4); slopes_to_horizon has the "
            "slope before it"
        )
    if metric == "loss_gap" and steeper:
        return (
            "the loss gap mixes an N^-1 bias (the variance of yhat_N adds O(1/N) to the loss) "
            "with the N^-1/2 fluctuation, so over moderate widths its slope lies between -1 and "
            "-1/2 (docs/theory.md §C.2); the output gap is the check of the N^-1/2 rate"
        )
    if metric.startswith("dev/") and rule == "adam":
        return (
            "coupled deviations under Adam shrink more slowly (about N^-1/4: neurons whose "
            "gradient sign differs from their ideal particle's, docs/theory.md §F.4) while the "
            "output gap still shrinks like N^-1/2"
        )
    if metric.startswith("dev/"):
        return (
            "per-layer coupled deviations fluctuate more across seeds than the output gap "
            "(tolerance about +-0.2 with >= 10 seeds) and the any-depth theorem proves only an "
            "exponent below 1/2 (docs/theory.md §C.3); the output gap is the check"
        )
    if steeper:
        return (
            "a steeper slope comes from few seeds or from an N^-1 bias that dominates the "
            "N^-1/2 fluctuation at these widths (docs/theory.md §C.1); add seeds or wider "
            "widths (§C.8)"
        )
    return (
        "a shallower slope means a floor under the gaps: the limit solver's own O(M^-1/2) "
        "error (use M >= 8 N, docs/theory.md §B.4) or runs past the validity horizon (§D.4); "
        "few seeds widen the interval (§C.8)"
    )


def _horizon_step(metric: str, horizons: Mapping[str, Any] | None) -> int | None:
    """The validity horizon ``step_star`` of ``metric`` (``sup_output_gap``: the output gap's)."""
    entry = (horizons or {}).get(metric.removeprefix("sup_"))
    return None if entry is None else entry["step_star"]


def _missed_slope_reasons(
    slopes: Mapping[str, Any] | None, horizons: Mapping[str, Any] | None, rule: str | None
) -> dict[str, str]:
    """``{metric: missed_slope_reason(...)}`` for every slope whose interval misses -1/2."""
    return {
        metric: missed_slope_reason(metric, fit, rule, _horizon_step(metric, horizons))
        for metric, fit in (slopes or {}).items()
        if not fit["contains_expected"]
    }


def build_report(
    results: Results, limit: Mapping[str, Any], meta: dict[str, Any]
) -> dict[str, Any]:
    """The ``report.json`` content (module docstring); ``meta`` is copied in first.

    ``limit`` is the limit's record (``limit.json``: ``train_loss`` and, beside a particle
    solver of a deep iid network, ``exact_relative_gap``).
    """
    grouped = _by_width(results)
    fitted = {w: rs for w, rs in grouped.items() if len(rs) >= MIN_SEEDS}
    layers = _layers(grouped)
    per_width: dict[str, Any] = {}
    for width, runs in grouped.items():
        per_width[str(width)] = {
            "seeds": len(runs),
            "output_gap_rms": _rms([r.final("limit/output_gap") for r in runs]),
            "output_gap_per_seed": [r.final("limit/output_gap") for r in runs],
            "sup_output_gap_rms": _rms([r.sup("limit/output_gap") for r in runs]),
            "loss_gap_rms": _rms([r.final("limit/loss_gap") for r in runs]),
            "dev_median": {
                layer: float(np.median([r.final(f"limit/dev/{layer}") for r in runs]))
                for layer in layers
            },
            "accuracy": float(np.mean([r.accuracy for r in runs])),
            "neuron_spread_median": {
                layer: float(np.median([r.spread[layer] for r in runs])) for layer in runs[0].spread
            },
        }
    diverged = [f"N{w}-seed{s}" for (w, s), r in sorted(results.items()) if r.diverged]
    notes = list(meta.get("notes", []))
    slopes: dict[str, Any] | None = None
    horizons: dict[str, Any] | None = None
    to_horizon: dict[str, Any] | None = None
    if len(fitted) >= 2:
        left_out = sorted(set(grouped) - set(fitted))
        if left_out:
            notes.append(
                f"widths {left_out} are left out of the fits: fewer than {MIN_SEEDS} finished "
                "seeds (the intervals resample seeds; see diverged_runs)."
            )
        slopes = {}
        final = {"at": "final", "at_step": meta.get("steps")}
        for metric in _metrics(fitted):
            values = {w: [r.final(f"limit/{metric}") for r in rs] for w, rs in fitted.items()}
            if not _fittable(values):
                notes.append(
                    f"no slope for {metric}: some of its final values are zero or not finite "
                    "(identical or saturated networks, or inputs that overflow), and a log-log "
                    "fit needs positive gaps."
                )
                continue
            slopes[metric] = _slope(values, aggregate_of(metric)) | final
            if metric == "output_gap":
                sups = {w: [r.sup("limit/output_gap") for r in rs] for w, rs in fitted.items()}
                slopes["sup_output_gap"] = _slope(sups, "rms") | {"at": "sup over the run"}
        histories = [RunHistory(r.width, r.history) for rs in fitted.values() for r in rs]
        horizons = validity(histories, _metrics(fitted))
        to_horizon = _slopes_to_horizon(fitted, horizons)
        notes += _missed_slope_reasons(slopes, horizons, meta.get("rule")).values()
    else:
        notes.append(_no_slope_reason(results, grouped))
    return meta | {
        "per_width": per_width,
        "fitted_widths": sorted(fitted),
        "slopes": slopes,
        "slopes_to_horizon": to_horizon,
        "validity": horizons,
        "diverged_runs": diverged,
        "notes": notes,
        "limit": _limit_section(limit, meta),
    }


def _limit_section(limit: Mapping[str, Any], meta: Mapping[str, Any]) -> dict[str, Any]:
    """``report["limit"]``: the solver, its M, its loss curve, and its exact-limit check.

    Beside a particle solver of a deep iid network: where the particles left the exact limit.
    """
    losses = list(limit["train_loss"])
    section: dict[str, Any] = {
        "solver": meta.get("limit_solver"),
        "particles": meta.get("particles"),
        "train_loss": losses,
        "final_train_loss": losses[-1] if losses else None,
    }
    if "exact_relative_gap" in limit:
        series = limit["exact_relative_gap"]
        section["exact_relative_gap"] = series
        section["left_exact_limit"] = departure(series)
    return section


def curves_rows(results: Results, limit_loss: list[float], times: list[float]) -> list[list[Any]]:
    """``curves.csv`` rows: per run and logged step, the gaps; per step, the training losses.

    ``times[k]`` is ``mf_time`` after k steps (the scheduled steps' sum, §F.3). The training loss
    of step k is the loss before that step; the gaps logged after the last step (the final ones,
    which the report fits) get a row without a training loss.
    """
    logged = dict.fromkeys(key for r in results.values() for row in r.history for key in row)
    gap_keys = [k for k in logged if k.startswith("limit/") and k != "limit/time"]
    rows: list[list[Any]] = [["run", "width", "seed", "step", "mf_time", "train_loss", *gap_keys]]
    for (width, seed), result in sorted(results.items()):
        gaps = {int(row["step"]): row for row in result.history}
        losses: list[float | str] = list(result.train_loss)
        last = max(gaps, default=-1)
        losses += [""] * max(0, min(last, len(times) - 1) + 1 - len(losses))
        for step, loss in enumerate(losses):
            row = gaps.get(step, {})
            rows.append(
                [
                    f"N{width}-seed{seed}",
                    width,
                    seed,
                    step,
                    times[step],
                    loss,
                    *(row.get(k, "") for k in gap_keys),
                ]
            )
    for step, loss in enumerate(limit_loss):
        rows.append(["limit", "", "", step, times[step], loss, *([""] * len(gap_keys))])
    return rows


def write_figures(
    report: dict[str, Any],
    results: Results,
    limit_loss: list[float],
    times: list[float],
    out: Path,
) -> dict[str, Path]:
    """The sweep's PNG figures in ``out``; returns ``{name: path}``.

    ``times[k]`` is ``mf_time`` after k steps (the scheduled steps' sum, §F.3).
    """
    grouped = _by_width(results)
    per_width = report["per_width"]
    times = times[: len(limit_loss)]
    curves = {
        w: (times, np.mean([r.train_loss for r in rs], axis=0).tolist())
        for w, rs in grouped.items()
    }
    star = earliest_horizon(report["validity"] or {})
    marker = None if star is None else (star[1]["t_star"], f"t* ({star[0]})")
    paths = {
        "loss_curves": plot_loss_curves(
            curves,
            (times, limit_loss),
            out / "loss_curves.png",
            limit_label=f"limit ({report['limit']['solver']}, M = {report['limit']['particles']})",
            marker=marker,
        )
    }
    if "output_gap" not in (report["slopes"] or {}):
        return paths
    widths = report["fitted_widths"]
    paths["validity"] = plot_validity(report["validity"], out / "validity.png")
    fitted = report["slopes"]["output_gap"]
    fit = SlopeFit(**{k: fitted[k] for k in SlopeFit.__dataclass_fields__})
    paths["output_gap"] = plot_gap_scaling(
        {w: per_width[str(w)]["output_gap_per_seed"] for w in widths},
        [per_width[str(w)]["output_gap_rms"] for w in widths],
        fit,
        "output gap (final)",
        out / "output_gap.png",
    )
    layers = sorted(per_width[str(widths[0])]["dev_median"])
    paths["deviation"] = plot_layer_scaling(
        {layer: [per_width[str(w)]["dev_median"][layer] for w in widths] for layer in layers},
        widths,
        "coupled deviation (median over seeds)",
        "Coupled deviation per layer (§C.3)",
        out / "deviation.png",
    )
    hidden = sorted(per_width[str(widths[0])]["neuron_spread_median"])
    if len(hidden) >= 3:  # depth >= 4: degenerate middle layers (§B.3, §C.6)
        paths["neuron_spread"] = plot_layer_scaling(
            {
                layer: [per_width[str(w)]["neuron_spread_median"][layer] for w in widths]
                for layer in hidden
            },
            widths,
            "neuron spread S_i (median over seeds)",
            "Neuron spread per hidden layer (§C.6)",
            out / "neuron_spread.png",
        )
    return paths


def report_tables(report: dict[str, Any]) -> dict[str, tuple[list[str], list[list[Any]]]]:
    """The report as W&B tables: per-width values, fitted slopes, validity horizons."""
    per_width = report["per_width"]
    layers = sorted(next((v["dev_median"] for v in per_width.values()), {}))
    columns = ["width", "output_gap_rms", "sup_output_gap_rms", "loss_gap_rms", "accuracy"]
    columns += [f"dev/{layer}" for layer in layers]
    rows = [
        [int(w), v["output_gap_rms"], v["sup_output_gap_rms"], v["loss_gap_rms"], v["accuracy"]]
        + [v["dev_median"][layer] for layer in layers]
        for w, v in per_width.items()
    ]
    slope_columns = ["metric", "slope", "ci_low", "ci_high", "expected", "contains_expected"]
    slopes = [
        [k, s["slope"], s["ci_low"], s["ci_high"], s["expected"], s["contains_expected"]]
        for k, s in (report["slopes"] or {}).items()
    ]
    horizon_columns = ["metric", "step_star", "t_star", "final_slope"]
    horizons = [
        [k, v["step_star"], v["t_star"], (report["slopes"] or {}).get(k, {}).get("slope")]
        for k, v in (report["validity"] or {}).items()
    ]
    return {
        "per_width": (columns, rows),
        "slopes": (slope_columns, slopes),
        "validity": (horizon_columns, horizons),
    }


def summary_lines(report: dict[str, Any]) -> list[str]:
    """What ``mfl sweep`` prints: the limit, the notes, each horizon, every slope.

    Every slope of ``report["slopes"]`` gets one line with its interval; one that misses its
    expected value is followed by the reason (``missed_slope_reason``, also in ``notes``).
    """
    limit = report["limit"]
    kind = {"reduced": "exact reduced limit", "particles": "particle solver"}.get(
        limit["solver"], limit["solver"]
    )
    lines = [f"limit: {kind}, M = {limit['particles']} (docs/theory.md §B.4)"]
    left = limit.get("left_exact_limit")
    if left is not None:
        lines.append(
            f"the particle solver itself left the exact limit at step {left['step']} "
            f"(mf_time {left['mf_time']:g}, relative output gap {left['relative_gap']:.2f}): "
            "later gaps compare the networks with a finite-M solver, not with the limit; "
            "rerun with --limit reduced (docs/theory.md §D.4)."
        )
    rule, horizons = report.get("rule"), report["validity"]
    reasons = _missed_slope_reasons(report["slopes"], horizons, rule)
    lines += [note for note in report["notes"] if note not in reasons.values()]
    for metric, entry in (report["validity"] or {}).items():
        if entry["step_star"] is None:
            continue
        lines.append(
            f"{metric}: the limit describes the networks up to step {entry['step_star']} "
            f"(t* = mf_time {entry['t_star']:g}); after it the gap stops shrinking like N^-1/2 "
            "and measures finite-width effects, not the distance to the limit (§D.4)."
        )
    for metric, fit in (report["slopes"] or {}).items():
        lines.append(slope_line(metric, fit))
        if metric in reasons:
            lines.append(f"  why: {_cause(metric, fit, rule, _horizon_step(metric, horizons))}.")
        before = (report["slopes_to_horizon"] or {}).get(metric)
        star = (horizons or {}).get(metric, {}).get("step_star")
        if star is not None and before is not None:
            lines.append(
                f"{metric} slope before t* (sup over steps < {star}) {before['slope']:.3f}, "
                f"interval [{before['ci_low']:.3f}, {before['ci_high']:.3f}]"
            )
    return lines
