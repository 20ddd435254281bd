"""Figures of a width sweep (matplotlib's object API, no GUI backend; 600 x 450 px PNGs).

* ``plot_loss_curves``: training loss against ``mf_time`` for every width, limit overlaid
  (Nguyen's width-invariance figure, docs/theory.md §C.2);
* ``plot_gap_scaling``: a gap against N on log-log axes, per-seed points, the aggregate, the
  fitted line and a ``N^{-1/2}`` reference (§C.1, §C.8);
* ``plot_layer_scaling``: one curve per layer against N (coupled deviations §C.3, neuron
  spread §C.6);
* ``plot_validity``: the fitted slope of every gap against ``mf_time`` with its interval, the
  -1/2 line and each metric's validity horizon ``t*`` (``mflightning.validity``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import NullLocator

from mflightning.io import atomic_target
from mflightning.widthfit import SlopeFit

FIGSIZE = (6.0, 4.5)
DPI = 100


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` to ``path`` atomically (a crash leaves the previous figure intact)."""
    path = Path(path)
    fig.tight_layout()
    with atomic_target(path) as tmp:
        fig.savefig(tmp, dpi=DPI, format=path.suffix.lstrip(".") or "png")
    return path


def log_axes(ax: Any, widths: Sequence[float]) -> None:
    """Log-log axes with the sweep's widths as plain x tick labels."""
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(list(widths), [f"{w:g}" for w in widths])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("width N")


def plot_loss_curves(
    curves: Mapping[int, tuple[Sequence[float], Sequence[float]]],
    limit: tuple[Sequence[float], Sequence[float]],
    path: Path,
    limit_label: str = "limit",
    marker: tuple[float, str] | None = None,
) -> Path:
    """Loss vs ``mf_time``; ``curves[width]`` and ``limit`` are ``(times, losses)`` pairs.

    ``marker`` = ``(t, label)`` draws a vertical line at ``t`` (the validity horizon ``t*``).
    """
    fig = Figure(figsize=FIGSIZE)
    ax = fig.subplots()
    colors = colormaps["viridis"](np.linspace(0.1, 0.9, len(curves)))
    for color, (width, (times, losses)) in zip(colors, sorted(curves.items()), strict=True):
        ax.plot(times, losses, color=color, label=f"N = {width}")
    ax.plot(*limit, "k--", linewidth=2, label=limit_label)
    if marker is not None:
        ax.axvline(marker[0], color="tab:red", linestyle=":", label=f"{marker[1]} = {marker[0]:g}")
    ax.set_xlabel("mf_time t = sum of the scheduled steps eps_k")
    ax.set_ylabel("training loss (mean over seeds)")
    ax.set_title("Width invariance: loss curves approach the limit")
    ax.legend()
    return save_figure(fig, path)


def plot_gap_scaling(
    per_seed: Mapping[int, Sequence[float]],
    aggregate: Sequence[float],
    fit: SlopeFit,
    label: str,
    path: Path,
) -> Path:
    """Log-log gap vs N: seeds (dots), aggregate (line), fitted slope and the -1/2 reference."""
    widths = np.array(sorted(per_seed), dtype=float)
    fig = Figure(figsize=FIGSIZE)
    ax = fig.subplots()
    for width in widths:
        values = per_seed[int(width)]
        ax.scatter([width] * len(values), values, s=12, color="tab:blue", alpha=0.4)
    ax.plot(
        widths, aggregate, "o-", color="tab:blue", label=f"{label} ({fit.aggregate} over seeds)"
    )
    fitted = np.exp(fit.intercept) * widths**fit.slope
    ax.plot(
        widths,
        fitted,
        "k-",
        label=f"fit: slope {fit.slope:.2f} [{fit.ci_low:.2f}, {fit.ci_high:.2f}]",
    )
    reference = aggregate[0] * (widths / widths[0]) ** -0.5
    ax.plot(widths, reference, ":", color="gray", label="N^-1/2 reference")
    log_axes(ax, widths.tolist())
    ax.set_ylabel(label)
    ax.set_title(f"{label} vs width")
    ax.legend()
    return save_figure(fig, path)


def plot_layer_scaling(
    per_layer: Mapping[str, Sequence[float]],
    widths: Sequence[int],
    ylabel: str,
    title: str,
    path: Path,
) -> Path:
    """One log-log curve per layer: ``per_layer[name][i]`` at ``widths[i]``, with a -1/2 guide."""
    fig = Figure(figsize=FIGSIZE)
    ax = fig.subplots()
    for name, values in per_layer.items():
        ax.plot(widths, values, "o-", label=name)
    first = np.array([v[0] for v in per_layer.values()])
    guide = np.exp(np.log(first).mean()) * (np.asarray(widths) / widths[0]) ** -0.5
    ax.plot(widths, guide, ":", color="gray", label="N^-1/2 guide")
    log_axes(ax, widths)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    return save_figure(fig, path)


def plot_validity(validity: Mapping[str, Any], path: Path) -> Path:
    """Slope of each gap vs ``mf_time`` with its interval band, the -1/2 line and ``t*`` marks.

    ``validity`` is ``report["validity"]``: per metric a ``series`` of ``{"mf_time", "slope",
    "ci_low", "ci_high"}`` (``None`` where nothing was fitted) and ``t_star``.
    """
    fig = Figure(figsize=FIGSIZE)
    ax = fig.subplots()
    colors = colormaps["tab10"](np.arange(len(validity)) % 10)
    for color, (metric, entry) in zip(colors, validity.items(), strict=True):
        fitted = [row for row in entry["series"] if row["slope"] is not None]
        if not fitted:
            continue
        times = [row["mf_time"] for row in fitted]
        star = entry["t_star"]
        label = metric if star is None else f"{metric} (t* = {star:g})"
        ax.plot(times, [row["slope"] for row in fitted], "-", color=color, label=label)
        low, high = [row["ci_low"] for row in fitted], [row["ci_high"] for row in fitted]
        ax.fill_between(times, low, high, color=color, alpha=0.15)
        if star is not None:
            ax.axvline(star, color=color, linestyle=":")
    ax.axhline(-0.5, color="black", linewidth=1, label="mean-field rate -1/2")
    ax.axhline(-0.25, color="gray", linestyle="--", linewidth=1, label="off rate above -1/4")
    ax.set_xlabel("mf_time t = sum of the scheduled steps eps_k")
    ax.set_ylabel("log-log slope over widths (90% interval)")
    ax.set_title("Validity: do the gaps still shrink like N^-1/2?")
    ax.legend(fontsize="small")
    return save_figure(fig, path)
