"""Shared test helpers."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from mflightning import ParticleLimitSolver, param_groups
from mflightning.functional import output_gap
from mflightning.losses import mean_field_loss


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Small matmuls run far faster on one thread on a loaded 2-core machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (`make test`) the workers share the cores: split torch's threads.

    Two workers with two threads each on a 2-core machine spend their time waiting on each other.
    The processes a test starts (the CLI, the benchmarks, DDP ranks) get the same share.
    """
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        threads = max(1, torch.get_num_threads() // workers)
        torch.set_num_threads(threads)
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))


def loglog_slope(widths: list[int] | np.ndarray, values: list[float] | np.ndarray) -> float:
    """Least-squares slope of log(value) against log(width)."""
    return float(np.polyfit(np.log(widths), np.log(values), 1)[0])


@pytest.fixture(autouse=True, scope="session")
def _wandb_offline() -> Iterator[None]:
    """Keep W&B quiet and offline in every test, module-scoped fixtures included.

    Session-wide: a module-scoped fixture is set up before any function-scoped one, and the
    first W&B call of the process fixes the mode of W&B's process-wide settings.
    """
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("WANDB_MODE", "offline")
        monkeypatch.setenv("WANDB_SILENT", "true")
        yield


@pytest.fixture
def float64_default() -> Iterator[None]:
    """Run a test with float64 as torch's default dtype, then restore the previous default."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def coupled_output_gaps(
    solver: ParticleLimitSolver,
    widths: list[int],
    seeds: int,
    data: tuple[torch.Tensor, torch.Tensor],
    probe: torch.Tensor,
    steps: int,
) -> list[float]:
    """RMS over seeds of the output gap after ``steps`` lockstep full-batch steps (§C.1).

    Every (width, seed) network is an independent subsample of the particles (§B.4), trained
    by SGD with the §1.2 groups at the solver's lr, on loss 1/2 (yhat - y)^2 like the solver.
    """
    x, y = data
    runs = {}
    for width in widths:
        for seed in range(seeds):
            layers = [width] * len(solver.network.widths)
            small, _ = solver.couple(layers, generator=torch.Generator().manual_seed(seed))
            runs[width, seed] = (small, torch.optim.SGD(param_groups(small, lr=solver.lr)))
    for _ in range(steps):
        for small, optimizer in runs.values():
            optimizer.zero_grad()
            mean_field_loss("half_mse", small(x), y).backward()
            optimizer.step()
        solver.step(x, y)
    with torch.no_grad():
        limit = solver(probe)
        gaps = {key: float(output_gap(small(probe), limit)) for key, (small, _) in runs.items()}
    return [float(np.sqrt(np.mean([gaps[w, s] ** 2 for s in range(seeds)]))) for w in widths]
