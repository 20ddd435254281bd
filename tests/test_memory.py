"""Solver memory: one step holds the particles, their gradients and a P x M workspace, nothing more.

The peak is measured with torch's MemTracker (CPU) and compared with the documented bound
``b (2 n_params + (L+1) P max M_i)`` of :func:`mflightning.limit.memory.solver_step_bytes`.
"""

from __future__ import annotations

import pytest
import torch
from torch.distributed._tools.mem_tracker import MemTracker

from mflightning import MeanFieldMLP, ParticleLimitSolver
from mflightning.limit.memory import largest_width, solver_step_bytes


def _peak_step_bytes(solver: ParticleLimitSolver, x: torch.Tensor, y: torch.Tensor) -> int:
    solver.step(x, y)  # gradients exist from now on, as in every later step
    tracker = MemTracker()
    tracker.track_external(solver.network)
    with tracker:
        solver.step(x, y)
    return int(tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"])


@pytest.mark.filterwarnings("ignore::mflightning.TrivialLimitWarning")  # memory ignores the laws
@pytest.mark.parametrize("depth", [2, 3, 4, 5])
@pytest.mark.parametrize(("width", "points"), [(512, 64), (256, 1024)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("activation", ["relu", "tanh", "gelu", "sin"])
def test_solver_step_peak_is_within_the_documented_bound(
    depth: int, width: int, points: int, dtype: torch.dtype, activation: str
) -> None:
    network = MeanFieldMLP(
        10,
        [width] * (depth - 1),
        activations=[activation] * (depth - 1) + ["identity"],
        generator=torch.Generator().manual_seed(0),
    )
    x = torch.randn(points, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.randn(points, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    solver = ParticleLimitSolver(network, 0.05, dtype=dtype)
    peak = _peak_step_bytes(solver, x, y)
    bound = solver_step_bytes(network, points, dtype)
    state = 2 * sum(p.numel() for p in solver.network.parameters()) * dtype.itemsize
    # the bound allows weights + gradients + O(P M): where that workspace is smaller than one
    # M x M matrix (P = 64, M = 512, L >= 3), peak <= bound rules out any extra M x M buffer
    assert peak <= bound, f"peak {peak} B above the bound {bound} B"
    assert peak >= 0.6 * bound, f"the bound {bound} B is loose (peak {peak} B)"
    assert peak > state


@pytest.mark.parametrize(
    ("depth", "dtype", "activation"),
    [(3, torch.float32, "relu"), (4, torch.float64, "relu"), (2, torch.float32, "relu"),
     (3, torch.float32, "gelu"), (5, torch.float64, "silu")],
)  # fmt: skip
def test_largest_width_inverts_the_bound(depth: int, dtype: torch.dtype, activation: str) -> None:
    budget = 2.0**30
    m = largest_width(budget, 4096, 10, depth=depth, dtype=dtype, activation=activation)
    activations = [activation] * (depth - 1) + ["identity"]
    with torch.device("meta"):  # sizes only: no memory
        fits = MeanFieldMLP(10, [m] * (depth - 1), activations=activations, bias=False)
        too_big = MeanFieldMLP(10, [m + 1] * (depth - 1), activations=activations, bias=False)
    assert solver_step_bytes(fits, 4096, dtype) <= budget
    assert solver_step_bytes(too_big, 4096, dtype) > budget


def test_memory_helpers_reject_bad_arguments() -> None:
    with pytest.raises(TypeError, match="`network` must be a MeanFieldMLP"):
        solver_step_bytes(torch.nn.Linear(2, 2), 8, torch.float32)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`points`"):
        solver_step_bytes(MeanFieldMLP(2, [4]), 0, torch.float32)
    with pytest.raises(ValueError, match="depth >= 2"):
        largest_width(1e9, points=10, in_features=2, depth=1)
    with pytest.raises(ValueError, match=r"`memory_bytes`.*fewer points"):
        largest_width(1e3, points=4096, in_features=10)
