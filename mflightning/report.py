"""The report of a width sweep: per-width gaps, fitted slopes, curves and figures (§C, §C.8).

Per width, over seeds: the RMS of the per-seed output gap at the final time and of its sup over
time (§C.1), the RMS loss gap (§C.2), the median coupled deviation per layer (§C.3), the mean
accuracy, and the median neuron spread per hidden layer (§C.6). Slopes are log-log fits with a
seed bootstrap (``mflightning.widthfit.fit_loglog_slope``); the expected slope is -1/2.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mflightning.plots import plot_gap_scaling, plot_layer_scaling, plot_loss_curves
from mflightning.widthfit import SlopeFit, fit_loglog_slope

EXPECTED_SLOPE = -0.5  # per-seed gaps and coupled deviations scale as N^{-1/2} (§C.1-§C.3)
FIGURES = ("loss_curves", "output_gap", "deviation", "neuron_spread")


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


def _layers(results: Results) -> list[str]:
    first = next(iter(results.values())).history[-1]
    return sorted(key.removeprefix("limit/dev/") for key in first if key.startswith("limit/dev/"))


def _rms(values: list[float]) -> float:
    return float(np.sqrt(np.mean(np.square(values))))


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


def build_report(results: Results, limit_loss: list[float], meta: dict[str, Any]) -> dict[str, Any]:
    """The ``report.json`` content (see the module docstring); ``meta`` is copied in first."""
    grouped = _by_width(results)
    layers = _layers(results)
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
    slopes: dict[str, Any] = {}
    if len(grouped) >= 2:
        slopes["output_gap"] = _slope(
            {w: [r.final("limit/output_gap") for r in rs] for w, rs in grouped.items()}, "rms"
        )
        slopes["sup_output_gap"] = _slope(
            {w: [r.sup("limit/output_gap") for r in rs] for w, rs in grouped.items()}, "rms"
        )
        slopes["loss_gap"] = _slope(
            {w: [r.final("limit/loss_gap") for r in rs] for w, rs in grouped.items()}, "rms"
        )
        for layer in layers:
            deviations = {
                w: [r.final(f"limit/dev/{layer}") for r in rs] for w, rs in grouped.items()
            }
            slopes[f"dev/{layer}"] = _slope(
                deviations,
                "median",
            )
    return meta | {
        "per_width": per_width,
        "slopes": slopes,
        "diverged_runs": diverged,
        "limit": {"final_train_loss": limit_loss[-1] if limit_loss else None},
    }


def curves_rows(results: Results, limit_loss: list[float], time_step: float) -> list[list[Any]]:
    """``curves.csv`` rows: per run and logged step, the gaps; per step, the training losses."""
    first = next(iter(results.values()))
    gap_keys = [k for k in first.history[0] if k.startswith("limit/") and k != "limit/time"]
    rows: list[list[Any]] = [["run", "width", "seed", "step", "mf_time", "train_loss", *gap_keys]]
    for (width, seed), result in sorted(results.items()):
        gaps = {int(row["step"]): row for row in result.history}
        for step, loss in enumerate(result.train_loss):
            row = gaps.get(step, {})
            rows.append(
                [
                    f"N{width}-seed{seed}",
                    width,
                    seed,
                    step,
                    step * time_step,
                    loss,
                    *(row.get(k, "") for k in gap_keys),
                ]
            )
    for step, loss in enumerate(limit_loss):
        rows.append(["limit", "", "", step, step * time_step, loss, *([""] * len(gap_keys))])
    return rows


def write_figures(
    report: dict[str, Any], results: Results, limit_loss: list[float], time_step: float, out: Path
) -> dict[str, Path]:
    """The sweep's PNG figures in ``out``; returns ``{name: path}``."""
    grouped = _by_width(results)
    widths = sorted(grouped)
    per_width = report["per_width"]
    times = (np.arange(len(limit_loss)) * time_step).tolist()
    curves = {
        w: (times, np.mean([r.train_loss for r in rs], axis=0).tolist())
        for w, rs in grouped.items()
    }
    paths = {"loss_curves": plot_loss_curves(curves, (times, limit_loss), out / "loss_curves.png")}
    if "output_gap" not in report["slopes"]:
        return paths
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
    """The report as two W&B tables: per-width values and fitted slopes."""
    per_width = report["per_width"]
    layers = sorted(next(iter(per_width.values()))["dev_median"])
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
        for k, s in report["slopes"].items()
    ]
    return {"per_width": (columns, rows), "slopes": (slope_columns, slopes)}
