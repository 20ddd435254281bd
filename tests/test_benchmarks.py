"""The benchmark package runs end to end (CI smoke) and its baselines compute the same step."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mflightning import MeanFieldLinear, Normal, ParticleLimitSolver

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `benchmarks` is a repo-root package, not an installed one
    sys.path.insert(0, str(ROOT))

from benchmarks.fitting import regression_data  # noqa: E402
from benchmarks.folded_linear import FoldedMeanFieldLinear  # noqa: E402
from benchmarks.solver import LR, PlainLoop, build_network  # noqa: E402
from benchmarks.tf32 import EmulatedTF32, round_to_tf32  # noqa: E402

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


@pytest.mark.parametrize("rounding", ["nearest", "truncate"])
def test_tf32_rounding_keeps_eleven_significant_bits(rounding: str) -> None:
    """Bit-level TF32 rounding == float64 rounding of the significand to 11 bits (numpy)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(20000, generator=generator) * torch.logspace(-20, 20, 20000)
    x = torch.cat([x, torch.tensor([1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11, -(1.0 + 2.0**-11)])])
    mantissa, exponent = np.frexp(x.double().numpy())  # x = m 2^e with 0.5 <= |m| < 1
    scaled = mantissa * 2.0**11  # 11 significant bits: the implicit one plus 10 stored
    kept = np.round(scaled) if rounding == "nearest" else np.trunc(scaled)  # round: ties to even
    expected = torch.from_numpy(np.ldexp(kept / 2.0**11, exponent))
    rounded = round_to_tf32(x, rounding)  # type: ignore[arg-type]
    assert rounded.dtype == torch.float32
    torch.testing.assert_close(rounded.double(), expected, rtol=0, atol=0)
    ties = rounded[-3:].tolist()  # halfway cases go to the even neighbour when rounding
    if rounding == "nearest":
        assert ties == [1.0, 1.0 + 4 * 2.0**-11, -1.0]
    special = torch.tensor([float("inf"), -float("inf"), 0.0])
    assert round_to_tf32(special, rounding).tolist() == special.tolist()
    low_payload_nan = torch.tensor([0x7F800001], dtype=torch.int32).view(torch.float32)
    assert torch.isnan(round_to_tf32(low_payload_nan, rounding)).all()


def test_emulated_tf32_rounds_every_gemm_operand_forward_and_backward() -> None:
    generator = torch.Generator().manual_seed(1)
    a = torch.randn(64, 128, generator=generator, requires_grad=True)
    b = torch.randn(128, 32, generator=generator, requires_grad=True)
    with EmulatedTF32():
        out = a @ b
        out.backward(torch.ones_like(out))
    rounded = round_to_tf32(a.detach()) @ round_to_tf32(b.detach())
    torch.testing.assert_close(out.detach(), rounded, rtol=0, atol=0)
    exact = a.detach().double() @ b.detach().double()
    relative = ((out.double() - exact).norm() / exact.norm()).item()
    assert 2.0**-14 < relative < 2.0**-9, "TF32 error: ~2^-11 per operand, far above fp32's"
    ones = torch.ones(64, 32)
    torch.testing.assert_close(b.grad, round_to_tf32(a.detach()).T @ ones, rtol=0, atol=0)
    with pytest.raises(ValueError, match="rounding"):
        EmulatedTF32("stochastic")  # type: ignore[arg-type]


@pytest.mark.parametrize("bias", [True, False])
def test_folded_linear_candidate_equals_mean_field_linear(bias: bool) -> None:
    """Forward, input/weight/bias gradients, double backward and autocast match (float64)."""
    ours = MeanFieldLinear(24, 12, bias=bias, bias_init=Normal(0.0, 1.0)).double()
    folded = FoldedMeanFieldLinear(24, 12, bias=bias).double()
    folded.load_state_dict(ours.state_dict())
    x = torch.randn(3, 5, 24, dtype=torch.float64, requires_grad=True)
    for layer in (ours, folded):
        x.grad = None
        (layer(x) ** 2).sum().backward()
    torch.testing.assert_close(folded(x), ours(x), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(folded.weight.grad, ours.weight.grad, rtol=1e-12, atol=1e-12)
    if bias:
        torch.testing.assert_close(folded.bias.grad, ours.bias.grad, rtol=1e-12, atol=1e-12)
    grads = [torch.autograd.grad((m(x) ** 2).sum(), x)[0] for m in (ours, folded)]
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradgradcheck(lambda v: folded(v), (x[:1, :2].detach().requires_grad_(),))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = folded.float()(x.float())
    assert low.dtype == torch.bfloat16
    low.float().sum().backward()
    assert folded.weight.grad is not None and folded.weight.grad.dtype == torch.float32
