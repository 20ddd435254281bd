"""``sweep``: seed-batched sweep training (vmap) vs one Lightning fit per (width, seed).

Both train the same coupled runs on the same batches and log their gaps to the same recorded
limit (the limit pass, shared and untimed, runs once before). Target (issue 6): >= 2x faster on
CPU, >= 5x on a GPU for 5 widths x 8 seeds x 2000 steps.
"""

from __future__ import annotations

import copy
import tempfile
from typing import Any

import torch

from benchmarks.common import Case, Settings, Table, measure
from benchmarks.fitting import quiet_lightning
from mflightning import MeanFieldMLP, MeanFieldModule, Normal
from mflightning.data import IsotropicGaussians
from mflightning.sweep import SweepSettings, WidthSweep

LAWS = [Normal(0.0, 1.0), Normal(1.0, 0.5), Normal(0.0, 1.0)]


def _prepared_sweep(
    widths: list[int], seeds: int, steps: int, particles: int, device: str, out: str
) -> tuple[WidthSweep, dict[str, Any]]:
    """A sweep with its limit recorded (the untimed part both engines share)."""
    network = MeanFieldMLP(10, [widths[-1]] * 2, activations="tanh", init=LAWS)
    module = MeanFieldModule(network, lr=0.1, loss="half_mse")
    settings = SweepSettings(
        widths=widths,
        seeds=seeds,
        particles=particles,
        wandb="disabled",
        out=out,
        every_n_steps=max(1, steps // 10),
    )
    accelerator = "gpu" if torch.device(device).type == "cuda" else "cpu"
    sweep = WidthSweep(
        module,
        IsotropicGaussians(n_train=256, n_val=256),
        steps,
        settings,
        {"accelerator": accelerator},
    )
    sweep.datamodule.setup("fit")
    probe = sweep.datamodule.val_set.tensors
    solver = sweep._solver()
    networks, couplings = {}, {}
    for key in sweep._runs():
        widths_ = [key[0]] * 2
        networks[key], couplings[key] = solver.couple(
            widths_, generator=torch.Generator().manual_seed(key[1]), dtype=torch.float32
        )
    snapshots, _ = sweep._record_limit(solver, couplings, probe, None)
    return sweep, {"networks": networks, "snapshots": snapshots, "probe": probe}


def run(settings: Settings) -> Table:
    """One row: training time of every run of the sweep, batched vs run by run."""
    quiet_lightning()
    widths, seeds, steps, particles = settings.pick(
        ([8, 16], 2, 3, 64), ([32, 64], 8, 100, 512), ([50, 100, 200, 400, 800], 8, 2000, 6400)
    )
    table = Table(
        "sweep",
        "seed-batched sweep training (vmap) vs one Lightning fit per run, limit pass excluded",
        "ratio <= 0.5 on CPU (>= 2x), <= 0.2 on GPU (>= 5x)",
        ["widths", "seeds", "steps", "batched ms", "per-run ms", "ratio", "speed-up"],
    )
    with tempfile.TemporaryDirectory() as out:
        sweep, state = _prepared_sweep(widths, seeds, steps, particles, settings.device, out)
        fresh: dict[str, Any] = {}

        def prepare() -> None:
            fresh["networks"] = copy.deepcopy(state["networks"])

        def batched() -> None:
            for width in widths:
                sweep._train_seeds(
                    width, list(range(seeds)), fresh["networks"], state["snapshots"], state["probe"]
                )

        def per_run() -> None:
            for width, seed in sweep._runs():
                sweep._train(
                    width,
                    seed,
                    fresh["networks"][width, seed],
                    state["snapshots"][width, seed],
                    state["probe"],
                )

        times = measure(
            {
                "batched": Case(batched, prepare, inner=1),
                "per-run": Case(per_run, prepare, inner=1),
            },
            settings,
        )
    ratio = times["batched"] / times["per-run"]
    table.add(
        widths=",".join(map(str, widths)),
        seeds=seeds,
        steps=steps,
        **{
            "batched ms": times["batched"],
            "per-run ms": times["per-run"],
            "ratio": ratio,
            "speed-up": 1 / ratio,
        },
    )
    table.notes.append("Both engines log the same gaps; tests/test_sweep.py checks they agree.")
    return table
