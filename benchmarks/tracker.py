"""``tracker``: the cost of ``LimitTracker`` beyond its solver's own steps.

Three cases on the same K batches, each with a fresh module (and a fresh copy of the particles):

* ``train``: ``Trainer.fit`` of a MeanFieldModule, no callback;
* ``tracked``: the same fit with a ``LimitTracker`` (coupled at fit start, gaps on a probe every
  ``every`` steps, a float64 solver of width M stepping on the module's batches);
* ``solver``: the K ``ParticleLimitSolver.step`` calls alone, on the same batches.

The overhead is ``tracked - (train + solver)`` per step: coupling, gap evaluations and the
lockstep bookkeeping. It is reported as a fraction of the tracked training step (what a user
waits for) and, for reference, of the untracked one.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from lightning.pytorch import Callback

from benchmarks.common import Case, Settings, Table, measure
from benchmarks.fitting import FEATURES, loader, make_trainer, quiet_lightning, regression_data
from mflightning import LimitTracker, MeanFieldMLP, MeanFieldModule, ParticleLimitSolver

TARGET = 0.05
SIZES = ["N", "M", "batch", "K steps", "every"]
FRACTIONS = ["overhead / tracked", "overhead / train", "ok"]
LR = 0.05


def run(settings: Settings) -> Table:
    """One row: per-step times of the three cases and the tracker's overhead."""
    quiet_lightning()
    width, particles, batch, steps, every = settings.pick(
        (16, 64, 32, 3, 2), (128, 1024, 256, 40, 10), (1024, 8192, 1024, 100, 10)
    )
    device = settings.device
    x, y = regression_data(batch * steps, device)
    probe = regression_data(256, device, seed=1)
    data = loader(x, y, batch)
    network = MeanFieldMLP(FEATURES, [width, width]).to(device)
    wide = network.with_widths([particles, particles], generator=torch.Generator().manual_seed(0))
    solver = ParticleLimitSolver(wide, lr=LR, loss="mse", device=device)
    state: dict[str, Any] = {}

    def prepare_fit(tracked: bool) -> None:
        callbacks: list[Callback] = [
            LimitTracker(copy.deepcopy(solver), every_n_steps=every, probe=probe)
        ]
        state["module"] = MeanFieldModule(copy.deepcopy(network), lr=LR, loss="mse")
        state["trainer"] = make_trainer(device, steps, callbacks if tracked else None)

    def fit() -> None:
        state["trainer"].fit(state["module"], data)

    def prepare_solver() -> None:
        state["solver"] = copy.deepcopy(solver)

    def solver_steps() -> None:
        for xb, yb in data:
            state["solver"].step(xb, yb)

    cases = {
        "train": Case(fit, lambda: prepare_fit(False), inner=1),
        "tracked": Case(fit, lambda: prepare_fit(True), inner=1),
        "solver": Case(solver_steps, prepare_solver, inner=1),
    }
    ms = {name: value / steps for name, value in measure(cases, settings).items()}
    overhead = ms["tracked"] - ms["train"] - ms["solver"]
    fraction = overhead / ms["tracked"]
    table = Table(
        "tracker",
        "LimitTracker overhead beyond the solver step, per training step",
        f"overhead <= {TARGET:.0%} of the tracked step",
        [*SIZES, "train ms", "tracked ms", "solver ms", "overhead ms", "ratio", *FRACTIONS],
    )
    table.add(
        **{"N": width, "M": particles, "batch": batch, "K steps": steps, "every": every},
        **{"train ms": ms["train"], "tracked ms": ms["tracked"], "solver ms": ms["solver"]},
        **{"overhead ms": overhead, "ratio": ms["tracked"] / (ms["train"] + ms["solver"])},
        **{"overhead / tracked": fraction, "overhead / train": overhead / ms["train"]},
        ok="yes" if fraction <= TARGET else "no",
    )
    table.notes.append(
        "ms are per training step (fit time / K, fit set-up included); ratio = tracked / "
        "(train + solver). The solver is float64, the tracker's default."
    )
    return table
