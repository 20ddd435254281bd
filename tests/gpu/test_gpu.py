"""GPU correctness (skipped without CUDA): run on a GPU machine with `make test-gpu`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import coupled_output_gaps
from lightning.pytorch import Trainer

from mflightning import (
    MeanFieldConv2d,
    MeanFieldLinear,
    MeanFieldMLP,
    MeanFieldModule,
    Normal,
    ParticleLimitSolver,
)
from mflightning.cli import sweep
from mflightning.data import IsotropicGaussians, isotropic_gaussians
from mflightning.limit.memory import solver_step_bytes

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
LAWS = [Normal(0.0, 1.0), Normal(1.0, 0.5), Normal(0.0, 1.0)]
DEMO = str(Path(__file__).resolve().parents[2] / "recipes" / "demo_gaussians.yaml")


@pytest.fixture(autouse=True)
def _no_tf32() -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_layers_match_cpu(dtype: torch.dtype) -> None:
    for layer, shape in (
        (MeanFieldLinear(64, 32, role="hidden"), (8, 64)),
        (MeanFieldConv2d(8, 16, 3, bias=True), (4, 8, 10, 10)),
    ):
        layer = layer.to(dtype)
        x = torch.randn(*shape, dtype=dtype)
        expected = layer(x)
        got = layer.cuda()(x.cuda()).cpu()
        tol = 1e-5 if dtype == torch.float32 else 1e-12
        torch.testing.assert_close(got, expected, rtol=tol, atol=tol)


def test_module_trains_on_gpu(tmp_path: Path) -> None:
    module = MeanFieldModule(MeanFieldMLP(10, [256, 256], init=LAWS), lr=0.1, loss="half_mse")
    trainer = Trainer(
        accelerator="gpu",
        devices=1,
        max_steps=20,
        default_root_dir=tmp_path,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    trainer.fit(module, IsotropicGaussians(n_train=256, n_val=64))
    assert next(module.parameters()).is_cuda and module.mf_time == pytest.approx(2.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_solver_matches_cpu(dtype: torch.dtype) -> None:
    net = MeanFieldMLP(10, [512, 512], activations="tanh", init=LAWS)
    g = torch.Generator().manual_seed(0)
    x, y = isotropic_gaussians(256, 10, 0.4, g)
    cpu = ParticleLimitSolver(net, lr=0.1, loss="half_mse", dtype=dtype)
    gpu = ParticleLimitSolver(net, lr=0.1, loss="half_mse", dtype=dtype, device="cuda")
    for _ in range(20):
        cpu.step(x, y)
        gpu.step(x, y)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(gpu(x).cpu(), cpu(x), rtol=tol, atol=tol)


def test_solver_at_m_32768_fits_the_memory_bound() -> None:
    """Deliverable 4: L = 3, M = 32768, P = 4096 in fp32 within b (2 n_params + 4 P M + P (d+1))."""
    width, points = 32768, 4096
    with torch.device("cuda"):
        network = MeanFieldMLP(10, [width, width], bias=False)
        x, y = torch.randn(points, 10), torch.randn(points, 1)
    solver = ParticleLimitSolver(network, 0.05, dtype=torch.float32)
    del network  # the solver holds its own copy of the particles
    solver.step(x, y)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()  # particles, gradients, batch
    solver.step(x, y)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    bound = solver_step_bytes(solver.network, points, torch.float32)
    assert peak <= bound * 1.02, f"peak {peak / 2**30:.2f} GiB above {bound / 2**30:.2f} GiB"
    assert peak - before < width * width * 4, "an extra M x M buffer during the step"


def test_coupling_slope_at_larger_widths() -> None:
    """T-COUPLE on a GPU: N up to 1024, M = 16384, float32 without TF32, 6 seeds."""
    g = torch.Generator().manual_seed(0)
    x, y = isotropic_gaussians(256, 10, 0.4, g)
    probe, _ = isotropic_gaussians(512, 10, 0.4, g)
    x, y, probe = x.cuda(), y.cuda(), probe.cuda()
    net = MeanFieldMLP(
        10,
        [16384, 16384],
        activations="tanh",
        init=LAWS,
        generator=torch.Generator().manual_seed(1),
    )
    solver = ParticleLimitSolver(net, lr=0.1, loss="half_mse", dtype=torch.float32, device="cuda")
    widths = [128, 256, 512, 1024]
    rms = coupled_output_gaps(solver, widths, 6, (x, y), probe, steps=100)
    slope = np.polyfit(np.log(widths), np.log(rms), 1)[0]
    assert -0.75 <= slope <= -0.3, (rms, slope)


def test_demo_sweep_on_gpu(tmp_path: Path) -> None:
    report = sweep(
        [
            "--config",
            DEMO,
            "--trainer.accelerator=gpu",
            "--trainer.max_steps=20",
            "--widths",
            "32,64",
            "--seeds",
            "2",
            "--particles",
            "512",
            "--out",
            str(tmp_path),
            "--wandb",
            "disabled",
        ]
    )
    assert set(report["per_width"]) == {"32", "64"}
