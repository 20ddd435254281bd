"""Coordinate check: is every layer of a network scaled so that its coordinates stay O(1) in width?

The mean-field parametrization (docs/theory.md §1.1, §1.2) makes two sizes independent of the
widths, layer by layer:

* the **pre-activations** ``H_i`` (a layer's output), RMS over the batch and the neurons, since
  every sum over neurons carries ``1/n_{i-1}`` and every weight is O(1);
* the **weight update per step**, RMS over the layer's entries, ``eps * Grad_i`` with the
  normalized gradient ``Grad_i = n_{i-1} n_i dL/dw_i`` of §1.1, since the learning-rate multiplier
  of §1.2 is exactly ``n_{i-1} n_i``.

``get_coord_data`` builds the network at several widths and seeds, takes a few full-batch SGD
steps on one batch with the mean-field param groups, and records both sizes for every layer.
``coord_slopes`` fits ``log size`` against ``log N`` per layer (``fit_loglog_slope``, RMS over the
seeds, seed-bootstrap interval); a correctly scaled layer has a slope near 0. A layer whose
slope is beyond ``tolerance`` (default 0.25: a 4x wider network changes the size by more than a
factor 1.41) breaks one of the rules of §E.1: a sum over neurons without the ``1/n`` (activations
grow like ``N``), a ``1/sqrt(fan-in)`` layer such as a plain ``nn.Linear`` (no multiplier: its
updates shrink like ``1/N``, the layer is lazy), or a wrong multiplier. ``check_coord_data``
returns those layers, ``plot_coord_data`` draws the sizes against the width.

The sizes are judged after the last step (``steps >= 2``): at ``t = 0`` a zero-mean readout law
makes the output an average of zero-mean terms, an O(N^-1/2) fluctuation (§C.1), and the first
step of the input layer inherits it; in the limit both start at zero and become O(1) once the
readout has moved (after one step).

This is the coordinate check of Yang et al.'s muP (``mup.coord_check``) for the mean-field
parametrization, with the update sizes measured directly and without pandas or seaborn.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.figure import Figure
from numpy.typing import NDArray
from torch import Tensor, nn

from mflightning.losses import LossName, check_loss_name, mean_field_loss
from mflightning.plots import FIGSIZE, log_axes, save_figure
from mflightning.scaling import param_groups
from mflightning.stack import MeanFieldStack
from mflightning.widthfit import fit_loglog_slope

Quantity = Literal["activation", "update"]
QUANTITIES: tuple[Quantity, ...] = ("activation", "update")
DEFAULT_WIDTHS = (64, 128, 256, 512, 1024, 2048)
DEFAULT_TOLERANCE = 0.25
OptimizerFactory = Callable[[nn.Module], torch.optim.Optimizer]


@dataclass(frozen=True)
class CoordData:
    """Per-layer sizes recorded by ``get_coord_data``.

    Attributes:
        widths: the widths N, increasing.
        seeds: the seeds, one network per (width, seed).
        steps: the number of SGD steps taken.
        activation: ``activation[layer][w, s, t]``, the RMS of the layer's output (its
            pre-activation) at width ``widths[w]``, seed ``seeds[s]``, before step ``t + 1``
            (``t = 0 .. steps``; ``t = steps`` is after the last step).
        update: ``update[layer][w, s, t]``, the RMS over the layer's trainable entries of their
            change during step ``t + 1`` (``t = 0 .. steps - 1``); layers without trainable
            parameters have none.
    """

    widths: tuple[int, ...]
    seeds: tuple[int, ...]
    steps: int
    activation: dict[str, NDArray[np.float64]]
    update: dict[str, NDArray[np.float64]]


@dataclass(frozen=True)
class CoordSlope:
    """Log-log slope over widths of one layer's size at one step (``coord_slopes``).

    Attributes:
        layer: the module path of the layer (``"root"`` for the network itself).
        quantity: ``"activation"`` (pre-activation RMS) or ``"update"`` (weight update RMS).
        step: the step the sizes are taken at (activations after it, updates during it).
        slope: least-squares slope of ``log RMS_seeds(size)`` against ``log N`` over the widths
            where the size is finite and positive (``nan`` if fewer than two are).
        ci_low: lower end of the 90% seed-bootstrap interval of the slope.
        ci_high: upper end.
        degenerate_widths: widths where some seed's size is 0 or not finite (a layer that stops
            moving, a saturated activation or a divergence).
        flagged: ``|slope| > tolerance`` or a degenerate width: the size depends on the width.
    """

    layer: str
    quantity: Quantity
    step: int
    slope: float
    ci_low: float
    ci_high: float
    degenerate_widths: tuple[int, ...]
    flagged: bool

    @property
    def message(self) -> str:
        """One line naming the layer, the slope and the scaling rule it points to (§E.1)."""
        what = "pre-activations" if self.quantity == "activation" else "weight updates"
        if self.degenerate_widths:
            return (
                f"layer {self.layer!r}: {what} are 0 or not finite at widths "
                f"{list(self.degenerate_widths)} at step {self.step}: the layer stops moving "
                "(a saturated activation fed by growing pre-activations) or diverges."
            )
        grows = self.slope > 0
        causes = {
            ("activation", True): "a sum over neurons without the 1/n average "
            "(docs/theory.md §1.1, §E.1 item 1)",
            ("activation", False): "weights scaled like 1/sqrt(fan-in), e.g. torch's default "
            "init (docs/theory.md §E.1 item 3), zero-mean middle weights or an odd first "
            "activation with a symmetric first-layer law (§E.1 item 4)",
            ("update", True): "a learning-rate multiplier too large for the layer's forward "
            "scaling (docs/theory.md §1.2, §E.1 item 2)",
            ("update", False): "a missing learning-rate multiplier n_in * n_out, e.g. a layer "
            "that is not a mean-field layer (docs/theory.md §1.2, §E.1 item 2)",
        }
        transient = (
            " A slope near -1/2 that fades with more steps is instead the N^-1/2 fluctuation of "
            "a quantity whose limit starts at 0 (docs/theory.md §C.1): rerun with more `steps`."
            if -0.75 < self.slope < 0
            else ""
        )
        return (
            f"layer {self.layer!r}: {what} {'grow' if grows else 'shrink'} like "
            f"N^{self.slope:+.2f} (90% interval [{self.ci_low:+.2f}, {self.ci_high:+.2f}]) at "
            f"step {self.step}; likely {causes[(self.quantity, grows)]}.{transient}"
        )


def _check_widths(widths: Sequence[int]) -> tuple[int, ...]:
    values = tuple(widths)
    if (
        len(values) < 2
        or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in values)
        or any(a >= b for a, b in pairwise(values))
    ):
        raise ValueError(
            f"`widths` must be at least two positive integers in increasing order, "
            f"e.g. {DEFAULT_WIDTHS}, got {widths!r}."
        )
    return values


def _constructor(make: Callable[[int], nn.Module] | MeanFieldStack) -> Callable[[int], nn.Module]:
    """``make`` itself, or for a mean-field network: its architecture with every width ``N``."""
    if isinstance(make, MeanFieldStack):
        template = make
        return lambda width: template.with_widths([width] * len(template.widths))
    if not callable(make):
        raise ValueError(
            f"`make` must be a function width -> nn.Module or a MeanFieldMLP/MeanFieldConvNet, "
            f"got {type(make).__name__}."
        )
    return make


def _recorded_layers(model: nn.Module, layers: Sequence[str] | None) -> dict[str, nn.Module]:
    """The modules to record by name: those given, or every module holding parameters itself."""
    modules = {name or "root": module for name, module in model.named_modules()}
    if layers is None:
        return {
            name: module
            for name, module in modules.items()
            if next(module.parameters(recurse=False), None) is not None
        }
    unknown = [name for name in layers if name not in modules]
    if unknown or not layers:
        raise ValueError(
            f"`layers` must name modules of the network, got {list(layers)!r}; unknown: "
            f"{unknown}. Available: {list(modules)}."
        )
    return {name: modules[name] for name in layers}


def _rms(tensors: Iterable[Tensor]) -> float:
    """Root mean square over every entry of ``tensors``."""
    flat = torch.cat([t.detach().reshape(-1).double() for t in tensors])
    return float(flat.square().mean().sqrt())


def _run_one(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    steps: int,
    loss: LossName,
    optimizer: OptimizerFactory,
    layers: Sequence[str] | None,
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Train ``model`` for ``steps`` steps on ``(x, y)``; activation and update sizes per layer."""
    recorded = _recorded_layers(model, layers)
    activation: dict[str, list[float]] = {name: [] for name in recorded}
    trained = {
        name: [p for p in module.parameters(recurse=False) if p.requires_grad]
        for name, module in recorded.items()
    }
    trained = {name: params for name, params in trained.items() if params}
    update: dict[str, list[float]] = {name: [] for name in trained}

    def hook(name: str) -> Callable[[nn.Module, object, object], None]:
        def record(module: nn.Module, inputs: object, output: object) -> None:
            if not isinstance(output, Tensor):
                raise ValueError(
                    f"layer {name!r} returns a {type(output).__name__}, not a tensor; pass "
                    f"`layers=` with the names of the modules whose outputs are tensors."
                )
            activation[name].append(_rms([output]))

        return record

    handles = [module.register_forward_hook(hook(name)) for name, module in recorded.items()]
    try:
        opt = optimizer(model)
        for _ in range(steps):
            before = {name: [p.detach().clone() for p in ps] for name, ps in trained.items()}
            opt.zero_grad()
            mean_field_loss(loss, model(x), y).backward()
            opt.step()
            for name, params in trained.items():
                update[name].append(
                    _rms(p.detach() - b for p, b in zip(params, before[name], strict=True))
                )
        with torch.no_grad():
            model(x)  # the sizes after the last step
    finally:
        for handle in handles:
            handle.remove()
    return activation, update


def get_coord_data(
    make: Callable[[int], nn.Module] | MeanFieldStack,
    x: Tensor,
    y: Tensor,
    widths: Sequence[int] = DEFAULT_WIDTHS,
    seeds: Sequence[int] = (0, 1, 2),
    steps: int = 5,
    lr: float = 0.1,
    loss: LossName = "half_mse",
    optimizer: OptimizerFactory | None = None,
    layers: Sequence[str] | None = None,
) -> CoordData:
    """Train the network at every width and seed for a few steps; record per-layer sizes.

    For each width ``N`` and seed, the network ``make(N)`` is drawn under ``torch.manual_seed
    (seed)`` (the caller's random state is restored afterwards), moved to ``x``'s device and
    trained for ``steps`` full-batch steps on ``(x, y)`` with ``optimizer``: by default
    ``torch.optim.SGD(param_groups(model, lr))``, the multipliers ``n_{i-1} n_i`` of §1.2. Every
    forward pass records the RMS of each layer's output; every step the RMS of each layer's
    parameter change.

    Args:
        make: a function ``width -> nn.Module`` (every width that should scale takes the value
            ``width``), or a ``MeanFieldMLP`` / ``MeanFieldConvNet`` whose architecture is rebuilt
            with every hidden width equal to ``N`` (``with_widths``).
        x: one batch of inputs, used at every step.
        y: its targets, in the convention of ``loss``.
        widths: increasing widths, at least two (the slopes need a range: 64 to 2048 by default).
        seeds: one network per seed and width; the sizes are aggregated over seeds (RMS).
        steps: SGD steps (>= 2: the check judges the last one, see the module docstring).
        lr: the base learning rate ``eps`` of the default optimizer.
        loss: ``"half_mse"``, ``"mse"`` or ``"cross_entropy"`` (§1.3).
        optimizer: ``model -> optimizer`` to use instead of SGD on the mean-field groups, e.g.
            ``lambda m: torch.optim.Adam(mfl.param_groups(m, 1e-3, rule="adam"))``.
        layers: module paths to record (``"root"`` for the network itself); default: every
            module that holds parameters itself (its output is the pre-activation ``H_i``).

    Returns:
        The sizes, as numpy arrays per layer (``CoordData``).

    Raises:
        ValueError: bad ``widths``, ``seeds``, ``steps``, ``lr``, ``loss``, ``make``, ``layers``,
            networks whose layers differ between widths, or a layer output that is not a tensor.
    """
    widths = _check_widths(widths)
    if not seeds or any(isinstance(s, bool) or not isinstance(s, int) for s in seeds):
        raise ValueError(f"`seeds` must be a non-empty sequence of integers, got {seeds!r}.")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise ValueError(
            f"`steps` must be an integer >= 2 (the check judges sizes after the first step), "
            f"got {steps!r}."
        )
    check_loss_name(loss)
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise ValueError(
            f"`x` and `y` must be tensors (one batch), got {type(x).__name__} and "
            f"{type(y).__name__}."
        )
    build = _constructor(make)
    make_optimizer = optimizer or (lambda model: torch.optim.SGD(param_groups(model, lr)))
    runs: list[list[tuple[dict[str, list[float]], dict[str, list[float]]]]] = []
    for width in widths:
        runs.append([])
        for seed in seeds:
            with torch.random.fork_rng():
                torch.manual_seed(seed)
                model = build(width).to(x.device)
            runs[-1].append(_run_one(model, x, y, steps, loss, make_optimizer, layers))
    return CoordData(
        widths=widths,
        seeds=tuple(seeds),
        steps=steps,
        activation=_stack(runs, 0, widths),
        update=_stack(runs, 1, widths),
    )


def _stack(
    runs: list[list[tuple[dict[str, list[float]], dict[str, list[float]]]]],
    index: int,
    widths: tuple[int, ...],
) -> dict[str, NDArray[np.float64]]:
    """``{layer: array (widths, seeds, times)}`` from the per-run records ``runs[w][s][index]``."""
    names = list(runs[0][0][index])
    for width, per_seed in zip(widths, runs, strict=True):
        for record in per_seed:
            if list(record[index]) != names:
                raise ValueError(
                    f"`make` builds networks with different layers: {names} at width "
                    f"{widths[0]}, {list(record[index])} at width {width}; the check compares "
                    "each layer across widths."
                )
    return {
        name: np.array([[record[index][name] for record in per_seed] for per_seed in runs])
        for name in names
    }


def coord_slopes(
    data: CoordData, tolerance: float = DEFAULT_TOLERANCE, step: int | None = None
) -> list[CoordSlope]:
    """The log-log slope over widths of every layer's activation and update size at ``step``.

    ``size(N) = RMS_seeds size(N, seed)`` is fitted as ``c N^slope`` (``fit_loglog_slope``, 90%
    seed-bootstrap interval) over the widths where every seed's size is finite and positive; the
    others are reported as ``degenerate_widths`` and flag the layer.

    Args:
        data: the output of ``get_coord_data``.
        tolerance: a slope with ``|slope| > tolerance`` is flagged (default 0.25).
        step: the step to judge, ``1 .. data.steps``: activations after it, updates during it
            (default: the last step).

    Returns:
        One ``CoordSlope`` per layer and quantity, activations first.

    Raises:
        ValueError: ``tolerance`` not positive or ``step`` out of range.
    """
    if not isinstance(tolerance, (int, float)) or not tolerance > 0:
        raise ValueError(f"`tolerance` must be a positive number, e.g. 0.25, got {tolerance!r}.")
    step = data.steps if step is None else step
    if isinstance(step, bool) or not isinstance(step, int) or not 1 <= step <= data.steps:
        raise ValueError(f"`step` must be an integer in 1 .. {data.steps}, got {step!r}.")
    judged: tuple[tuple[Quantity, dict[str, NDArray[np.float64]], int], ...] = (
        ("activation", data.activation, step),  # after step `step`
        ("update", data.update, step - 1),  # during step `step`
    )
    slopes = []
    for quantity, sizes, t in judged:
        for layer, values in sizes.items():
            at_t = values[:, :, t]
            fine = np.all(np.isfinite(at_t) & (at_t > 0), axis=1)
            degenerate = tuple(w for w, ok in zip(data.widths, fine, strict=True) if not ok)
            slope = low = high = float("nan")
            if fine.sum() >= 2:
                fit = fit_loglog_slope(np.array(data.widths)[fine], at_t[fine], n_boot=500)
                slope, low, high = fit.slope, fit.ci_low, fit.ci_high
            flagged = bool(degenerate) or abs(slope) > tolerance
            slopes.append(CoordSlope(layer, quantity, step, slope, low, high, degenerate, flagged))
    return slopes


def check_coord_data(
    data: CoordData, tolerance: float = DEFAULT_TOLERANCE, step: int | None = None
) -> list[CoordSlope]:
    """The flagged entries of ``coord_slopes``: layers whose sizes grow or shrink with the width.

    An empty list means every layer is scaled as §1.1–§1.2 require; each entry's ``message``
    names the layer, its slope and the likely cause.
    """
    return [s for s in coord_slopes(data, tolerance, step) if s.flagged]


def plot_coord_data(
    data: CoordData,
    path: str | Path,
    tolerance: float = DEFAULT_TOLERANCE,
    title: str | None = None,
) -> Path:
    """Two log-log panels against the width: pre-activation and update RMS of every layer.

    One colour per layer; thin lines are the earlier steps, the thick line the last one (the
    step ``coord_slopes`` judges), labelled with its slope; flagged layers are dashed. The PNG is
    written atomically.

    Args:
        data: the output of ``get_coord_data``.
        path: where to write the figure (the suffix picks the format).
        tolerance: as in ``coord_slopes``.
        title: figure title (default: the number of steps and seeds).

    Returns:
        ``path``.
    """
    slopes = {(s.layer, s.quantity): s for s in coord_slopes(data, tolerance)}
    fig = Figure(figsize=(2 * FIGSIZE[0], FIGSIZE[1]))
    axes = fig.subplots(1, 2)
    names = list(data.activation)
    colors = dict(zip(names, colormaps["tab10"](np.arange(len(names)) % 10), strict=True))
    widths = list(data.widths)
    panels: tuple[tuple[dict[str, NDArray[np.float64]], Quantity, str], ...] = (
        (data.activation, "activation", "RMS pre-activation (layer output)"),
        (data.update, "update", "RMS weight update per step"),
    )
    for ax, (sizes, quantity, ylabel) in zip(axes, panels, strict=True):
        for layer, values in sizes.items():
            aggregate = np.sqrt(np.mean(values**2, axis=1))  # RMS over seeds: (widths, times)
            for t in range(aggregate.shape[1] - 1):
                ax.plot(widths, aggregate[:, t], "-", color=colors[layer], alpha=0.3, lw=1)
            fit = slopes.get((layer, quantity))
            label = layer if fit is None else f"{layer}: slope {fit.slope:+.2f}"
            flagged = fit is not None and fit.flagged
            ax.plot(
                widths,
                aggregate[:, -1],
                "o--" if flagged else "o-",
                color=colors[layer],
                lw=2,
                label=f"{label} (flagged)" if flagged else label,
            )
        log_axes(ax, widths)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize="small")
    axes[0].set_title(f"pre-activations, step 0 to {data.steps}")
    axes[1].set_title(f"updates, step 1 to {data.steps}")
    fig.suptitle(
        title
        or f"Coordinate check: {data.steps} SGD steps, {len(data.seeds)} seeds "
        f"(flat = mean-field scaled; flagged: |slope| > {tolerance:g})"
    )
    return save_figure(fig, path)
