"""One Euler step of ReducedLimitSolver (R_M) vs ParticleLimitSolver (S_M), side by side in one run.

Usage: ``python -m benchmarks.reduced_vs_bruteforce [--device cpu|cuda] [--quick|--tiny]
[--repeats K]`` (or register ``run`` in ``benchmarks/__main__.py``).

Data and laws of docs/theory.md §D.3 T-REDUCED (P = 100, d = 5, float64, tau_i = 0.5, loss
"half_mse"), L = 4 and 5. One row per (L, M): median ms per step of each solver, timed with
interleaved repeats, and the speed-up S_M / R_M; the brute force is left out ("-") where its
O(M^2) middle layers are too slow (CPU, M = 16384) or too big (GPU, M > 16384). The reduced solver
ignores the middle widths (§B.3), so it is built from a network of widths ``[M, 1, ..., 1, M]``
(O(M) memory); the brute force needs the full ``[M] * (L - 1)`` network.
"""

from __future__ import annotations

import argparse

import torch
from torch import Tensor

from benchmarks.common import Case, Settings, Table, environment, format_table, measure
from mflightning import MeanFieldMLP, Normal, ParticleLimitSolver, ReducedLimitSolver
from mflightning.limit.solver import EulerSolver

MEANS = (1.0, 0.8, 0.9)  # mu_2, mu_3, mu_4 (§D.3)
LR = 0.1


def make_network(depth: int, widths: list[int], device: str) -> MeanFieldMLP:
    """ReLU / tanh / identity network with the §D.3 laws (tau_i = 0.5), float64."""
    init = [Normal(0.0, 1.0), *(Normal(MEANS[i], 0.5) for i in range(depth - 2)), Normal(0.5, 1.0)]
    acts = ["relu"] + ["tanh"] * (depth - 2) + ["identity"]
    net = MeanFieldMLP(5, widths, activations=acts, init=init, generator=torch.Generator())
    return net.to(device=device, dtype=torch.float64)


def _step_case(solver: EulerSolver, x: Tensor, y: Tensor) -> Case:
    """Time one Euler step of `solver` on the population `(x, y)`."""
    return Case(lambda: solver.step(x, y))


def run(settings: Settings) -> Table:
    """Rows for L in {4, 5} and every M of this profile."""
    brute_sizes: list[int] = settings.pick([256], [1024, 4096], [1024, 4096, 16384])
    extra: list[int] = settings.pick([1024], [16384], [65536, 262144, 1_000_000])
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(100, 5, generator=gen, dtype=torch.float64)
    y = torch.tanh(torch.randn(100, generator=gen, dtype=torch.float64) + x[:, 0])
    x, y = x.to(settings.device), y.to(settings.device)
    table = Table(
        "reduced",
        "ReducedLimitSolver.step vs ParticleLimitSolver.step (§D.3 T-REDUCED, P=100, d=5, f64)",
        "ratio reduced/brute < 1 at M >= 1024 (issue: >= 100x faster at M = 16384)",
        ["L", "M", "brute ms", "reduced ms", "ratio", "speed-up"],
    )
    for depth in (4, 5):
        for m in [*brute_sizes, *extra]:
            thin = make_network(depth, [m] + [1] * (depth - 3) + [m], settings.device)
            cases = {"reduced": _step_case(ReducedLimitSolver(thin, LR, "half_mse"), x, y)}
            if m in brute_sizes:
                full = make_network(depth, [m] * (depth - 1), settings.device)
                cases["brute"] = _step_case(ParticleLimitSolver(full, LR, "half_mse"), x, y)
                del full
            times = measure(cases, settings)
            brute = times.get("brute")
            ratio = None if brute is None else times["reduced"] / brute
            table.add(
                **{"L": depth, "M": m, "brute ms": brute, "reduced ms": times["reduced"]},
                **{"ratio": ratio, "speed-up": None if ratio is None else 1 / ratio},
            )
            del cases
    skipped = sorted(set(extra) - set(brute_sizes))
    table.notes.append(f"No brute-force time at M = {skipped} (O(M^2) per middle layer).")
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
