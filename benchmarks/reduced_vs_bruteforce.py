"""One Euler step of ReducedLimitSolver (R_M) vs ParticleLimitSolver (S_M), side by side in one run.

Usage: ``python -m benchmarks reduced [--device cpu|cuda] [--quick|--tiny] [--repeats K]``
(or ``python -m benchmarks.reduced_vs_bruteforce`` with the same options).

Data and laws of docs/theory.md §D.3 T-REDUCED (P = 100, d = 5, float64, tau_i = 0.5, loss
"half_mse"), L = 4 and 5. One row per (L, M):

* ``brute ms`` / ``reduced ms``: median ms per step, timed with interleaved repeats, each
  sample after one untimed step of the same solver (``best ms``: the fastest reduced sample),
  their ratio R_M / S_M and the speed-up S_M / R_M (median over median); the brute force is
  left out ("-") where its O(M^2) middle layers are too slow (CPU, M > 4096) or too big (GPU,
  M > 16384);
* ``peak MB``: the memory that building the network and the reduced solver and taking one step
  add at their peak above what the process held before (CPU: resident set, ``VmHWM`` reset
  through ``/proc/self/clear_refs``; CUDA: ``max_memory_allocated``); ``state MB``: the
  solver's fields;
* ``model ms``: ``mflightning.limit.cost.step_seconds`` (CPU only), to check the cost model;
* ``f32 ms``, ``f32 err``: the float32 solver's step and its output error against float64 after
  ``ERROR_STEPS`` steps, ``||y_32 - y_64|| / ||y_64||`` on the batch, next to ``particle err``,
  the Monte-Carlo error of R_M itself: the same quantity between two float64 solvers on
  independent atom draws, divided by sqrt(2).

The reduced solver ignores the middle widths (§B.3), so it is built from a network of widths
``[M, 1, ..., 1, M]`` (O(M) memory); the brute force needs the full ``[M] * (L - 1)`` network.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import math
import re
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from benchmarks.common import (
    Case,
    Settings,
    Table,
    environment,
    format_table,
    measure,
    synchronize,
)
from mflightning import MeanFieldMLP, Normal, ParticleLimitSolver, ReducedLimitSolver
from mflightning.limit.cost import cpu_cost, step_seconds
from mflightning.limit.solver import EulerSolver

MEANS = (1.0, 0.8, 0.9)  # mu_2, mu_3, mu_4 (§D.3)
LR = 0.1
ERROR_STEPS = 10
_STATUS = Path("/proc/self/status")


def make_network(
    depth: int, widths: list[int], device: str, seed: int | None = None
) -> MeanFieldMLP:
    """ReLU / tanh / identity network with the §D.3 laws (tau_i = 0.5), float64.

    ``seed`` None: torch's default generator seed (the same draw at every call).
    """
    init = [Normal(0.0, 1.0), *(Normal(MEANS[i], 0.5) for i in range(depth - 2)), Normal(0.5, 1.0)]
    acts = ["relu"] + ["tanh"] * (depth - 2) + ["identity"]
    generator = torch.Generator() if seed is None else torch.Generator().manual_seed(seed)
    net = MeanFieldMLP(5, widths, activations=acts, init=init, generator=generator)
    return net.to(device=device, dtype=torch.float64)


def thin_widths(depth: int, atoms: int) -> list[int]:
    """``[M, 1, ..., 1, M]``: the reduced solver reads only the end widths (L >= 4)."""
    return [atoms] + [1] * (depth - 3) + [atoms]


def _step_case(solver: EulerSolver, x: Tensor, y: Tensor) -> Case:
    """Time one Euler step of `solver` on the population `(x, y)`, after one untimed step.

    The untimed step (``prepare``) lets no case pay for the one timed before it: after a
    brute-force step torch's OpenMP threads keep spinning and its M x M matrices have evicted
    the caches, which made the next reduced step at M = 4096 take 5.8 ms instead of 3.5 ms
    (docs/benchmarks.md, reduced section).
    """

    def step() -> None:
        solver.step(x, y)

    return Case(step, prepare=step)


def _resident_kb(field: str) -> int:
    match = re.search(rf"{field}:\s+(\d+) kB", _STATUS.read_text())
    assert match is not None  # Linux /proc/self/status has VmRSS and VmHWM
    return int(match.group(1))


def peak_megabytes(run: Callable[[], object], device: str) -> float | None:
    """Memory ``run`` adds at its peak above what the process held before it (MB).

    CPU: the resident set (``VmHWM`` after resetting it through ``/proc/self/clear_refs``;
    ``None`` where /proc is missing); CUDA: ``torch.cuda.max_memory_allocated``.
    """
    gc.collect()
    if torch.device(device).type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        run()
        synchronize(device)
        return (torch.cuda.max_memory_allocated() - before) / 1e6
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        before = _resident_kb("VmRSS")
        run()
        return max(0.0, (_resident_kb("VmHWM") - before) / 1e3)  # RSS moves by pages
    except OSError:
        return None


def fresh_step(depth: int, atoms: int, x: Tensor, y: Tensor, device: str) -> None:
    """Build the thin network and a reduced solver, and take one step."""
    net = make_network(depth, thin_widths(depth, atoms), device)
    ReducedLimitSolver(net, LR, "half_mse").step(x, y)


def _relative(a: Tensor, b: Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def float32_errors(
    depth: int, atoms: int, x: Tensor, y: Tensor, device: str
) -> tuple[float, float]:
    """``(float32 error, particle error)`` after ``ERROR_STEPS`` steps (see the module doc)."""
    outputs = []
    for seed, dtype in ((None, torch.float64), (None, torch.float32), (1, torch.float64)):
        net = make_network(depth, thin_widths(depth, atoms), device, seed)
        solver = ReducedLimitSolver(net, LR, "half_mse", dtype=dtype)
        solver.run((x, y), ERROR_STEPS, progress=False)
        outputs.append(solver(x))
        del net, solver
    reference, single, other = outputs
    return _relative(single, reference), _relative(other, reference) / math.sqrt(2)


def model_ms(depth: int, atoms: int, settings: Settings) -> float | None:
    """The cost model's prediction (CPU; one thread: no speed-up)."""
    if settings.cuda:
        return None
    threads = torch.get_num_threads()
    cost = cpu_cost()
    if threads < 2:
        cost = dataclasses.replace(cost, speedup=1.0)
    return 1e3 * step_seconds(atoms, 5, 100, depth, cost=cost)


def run(settings: Settings) -> Table:
    """Rows for L in {4, 5} and every M of this profile."""
    brute_sizes: list[int] = settings.pick([256], [1024, 4096], [1024, 4096, 16384])
    extra: list[int] = settings.pick([1024], [16384, 1_000_000], [262144, 1_000_000, 10_000_000])
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(100, 5, generator=gen, dtype=torch.float64)
    y = torch.tanh(torch.randn(100, generator=gen, dtype=torch.float64) + x[:, 0])
    x, y = x.to(settings.device), y.to(settings.device)
    table = Table(
        "reduced",
        "ReducedLimitSolver.step vs ParticleLimitSolver.step (§D.3 T-REDUCED, P=100, d=5, f64)",
        ">= 300x faster at M = 4096 (CPU) / 16384 (GPU); M = 10^6: <= 0.5 s, <= 1 GB (CPU)",
        [
            "L",
            "M",
            "brute ms",
            "reduced ms",
            "best ms",
            "ratio",
            "speed-up",
            "peak MB",
            "state MB",
            "model ms",
            "f32 ms",
            "f32 err",
            "particle err",
        ],
    )
    for depth in (4, 5):
        for m in [*brute_sizes, *extra]:
            thin = make_network(depth, thin_widths(depth, m), settings.device)
            reduced = ReducedLimitSolver(thin, LR, "half_mse")
            single = ReducedLimitSolver(thin, LR, "half_mse", dtype=torch.float32)
            del thin
            cases = {
                "reduced": _step_case(reduced, x, y),
                "f32": _step_case(single, x, y),
            }
            if m in brute_sizes:
                full = make_network(depth, [m] * (depth - 1), settings.device)
                cases["brute"] = _step_case(ParticleLimitSolver(full, LR, "half_mse"), x, y)
                del full
            times = measure(cases, settings)
            state = sum(v.numel() * v.element_size() for v in reduced.fields.values()) / 1e6
            del cases, reduced, single
            fresh = functools.partial(fresh_step, depth, m, x, y, settings.device)
            peak = peak_megabytes(fresh, settings.device)
            f32_err, particle_err = float32_errors(depth, m, x, y, settings.device)
            brute = times.get("brute")
            table.add(
                **{"L": depth, "M": m, "brute ms": brute, "reduced ms": times["reduced"]},
                **{"best ms": min(times.samples["reduced"]), "peak MB": peak},
                **{"ratio": None if brute is None else times["reduced"] / brute},
                **{"speed-up": None if brute is None else brute / times["reduced"]},
                **{"state MB": state, "model ms": model_ms(depth, m, settings)},
                **{"f32 ms": times["f32"], "f32 err": f32_err, "particle err": particle_err},
            )
    skipped = sorted(set(extra) - set(brute_sizes))
    table.notes.append(f"No brute-force time at M = {skipped} (O(M^2) per middle layer).")
    table.notes.append(
        f"peak MB: memory that building a reduced solver and one step add above the process's "
        f"before them; errors after "
        f"{ERROR_STEPS} steps (module docstring of benchmarks/reduced_vs_bruteforce.py)."
    )
    return table


def main() -> None:
    """Print the comparison table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="fewer repeats")
    size.add_argument("--tiny", action="store_true", help="smoke test: minimal sizes")
    parser.add_argument("--repeats", type=int, help="timed samples per case (overrides profile)")
    args = parser.parse_args()
    settings = Settings.make(
        args.device, "tiny" if args.tiny else "quick" if args.quick else "full"
    )
    if args.repeats:
        settings = Settings(
            settings.device, settings.profile, args.repeats, settings.warmup, settings.min_sample_ms
        )
    print(" ".join(f"{k}={v}" for k, v in environment(settings).items()))
    print(format_table(run(settings)))


if __name__ == "__main__":
    main()
