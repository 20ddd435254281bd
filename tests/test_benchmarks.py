"""The benchmark package runs end to end (CI smoke) and its baselines compute the same step."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mflightning import ParticleLimitSolver

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `benchmarks` is a repo-root package, not an installed one
    sys.path.insert(0, str(ROOT))

from benchmarks.fitting import regression_data  # noqa: E402
from benchmarks.solver import LR, PlainLoop, build_network  # noqa: E402

HEADERS = [
    "### layers: ",
    "### module: ",
    "### solver: ",
    "### tracker: ",
    "### reduced: ",
    "### sweep: ",
]


def test_all_tiny_runs_and_prints_every_table(tmp_path: Path) -> None:
    dump = tmp_path / "rows.json"
    command = [sys.executable, "-m", "benchmarks", "all", "--device", "cpu", "--tiny"]
    done = subprocess.run(
        [*command, "--json", str(dump)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    for header in HEADERS:
        assert header in out, f"missing table {header!r}:\n{out}"
    tables = out.split("\n### ")[1:]
    assert len(tables) == len(HEADERS)
    for table in tables:
        header_row = next(line for line in table.splitlines() if line.startswith("| "))
        assert "| ratio |" in header_row, header_row
    assert dump.stat().st_size > 0


@pytest.mark.parametrize("autograd", [True, False])
def test_plain_loops_take_the_solver_step(autograd: bool) -> None:
    """The baselines are the same Euler step as ParticleLimitSolver (float64, M = 32)."""
    x, y = regression_data(16, "cpu", torch.float64)
    network = build_network(32, "cpu", torch.float64, seed=0)
    solver = ParticleLimitSolver(network, LR, loss="mse", dtype=torch.float64)
    plain = PlainLoop(network, LR, autograd=autograd, tf32=False)
    for _ in range(3):
        solver.step(x, y)
        plain.step(x, y)
    for layer, weight in zip(solver.network.layers, plain.weights(), strict=True):
        torch.testing.assert_close(weight, layer.weight, rtol=1e-10, atol=1e-12)
