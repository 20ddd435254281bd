"""``solver``: ``ParticleLimitSolver.step`` vs a plain-PyTorch brute-force loop.

The network is the L = 3 perceptron d -> M -> M -> 1 (ReLU, no biases, d = 10), trained by
full-batch GD on P points with the ``"mse"`` loss, the 1/M averages of §1.1 and the §1.2
multipliers (M for the two outer layers, M^2 for the middle one). Two baselines start from the
same particles:

* ``plain autograd``: the forward written with ``@`` and ``/ M``, ``torch.autograd.grad``, then
  ``w -= lr * multiplier * grad``;
* ``plain matmul``: the backward written out by hand, each update one in-place ``addmm_`` whose
  ``alpha`` folds in ``lr``, the multiplier and the 1/M — the fastest loop we know of (the three
  M x M x P GEMMs and nothing else of size M^2 but one read and write of each weight).

Rows: fp32 (TF32 off) and float64 at every M, plus on CUDA an opt-in TF32 row
(``ParticleLimitSolver(allow_tf32=True)`` vs the baselines with TF32 on). On a CPU, where TF32
does not exist, two untimed ``tf32 (emulated, ...)`` rows give its error instead: the fp32
solver with every GEMM operand rounded to TF32's 10 mantissa bits (``benchmarks.tf32``).
The ``err vs f64`` column is the RMS gap, after a few steps, between the outputs of that
precision and of the float64 solver started from the same particles; ``particle err`` estimates
the O(M^{-1/2}) error of the particle solver itself as
RMS(float64 run - float64 run on an independent draw) / sqrt(2).
"""

from __future__ import annotations

import contextlib
import gc
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from benchmarks.common import COMPARISON_COLUMNS, Case, Settings, Table, measure, ratio_row
from benchmarks.fitting import FEATURES, regression_data
from benchmarks.tf32 import EmulatedTF32, Rounding
from mflightning import MeanFieldMLP, ParticleLimitSolver
from mflightning.limit.solver import tf32_allowed

TARGET = 1.0
LR = 0.05
KEYS = ["M", "P", "dtype", "baseline"]
DTYPES = {"fp32": torch.float32, "float64": torch.float64, "tf32": torch.float32}
# precision -> TF32 rounding emulated on every GEMM operand (error-only rows on a CPU)
EMULATED: dict[str, Rounding] = {
    "tf32 (emulated, nearest)": "nearest",
    "tf32 (emulated, truncate)": "truncate",
}


def build_network(width: int, device: str, dtype: torch.dtype, seed: int) -> MeanFieldMLP:
    """The d -> M -> M -> 1 network with the default laws, drawn on ``device`` from ``seed``."""
    generator = torch.Generator(device).manual_seed(seed)
    with torch.device(device):
        network = MeanFieldMLP(FEATURES, [width, width], generator=generator)
    return network.to(dtype)


class PlainLoop:
    """The brute-force loop a user writes: three weight tensors and full-batch GD by hand.

    Args:
        network: the particles to start from (copied).
        lr: the step ``h``.
        autograd: take the gradients with ``torch.autograd.grad`` (else the explicit backward).
        tf32: allow TF32 matmuls during the step.
    """

    def __init__(self, network: MeanFieldMLP, lr: float, autograd: bool, tf32: bool) -> None:
        self.w1, self.w2, self.w3 = (layer.weight.detach().clone() for layer in network.layers)
        self.width = self.w2.shape[0]
        self.lr = lr
        self.autograd = autograd
        self.tf32 = tf32

    def step(self, x: Tensor, y: Tensor) -> None:
        """One full-batch GD step on ``(x, y)``."""
        with tf32_allowed(self.tf32):
            if self.autograd:
                self._autograd_step(x, y)
            else:
                self._matmul_step(x, y)

    def _autograd_step(self, x: Tensor, y: Tensor) -> None:
        m = self.width
        weights = [w.requires_grad_(True) for w in (self.w1, self.w2, self.w3)]
        a1 = torch.relu(x @ self.w1.T)
        a2 = torch.relu(a1 @ self.w2.T / m)
        loss = (a2 @ self.w3.T / m - y).pow(2).sum(-1).mean()
        grads = torch.autograd.grad(loss, weights)
        with torch.no_grad():
            for w, g, multiplier in zip(weights, grads, (m, m * m, m), strict=True):
                w.requires_grad_(False).sub_(g, alpha=self.lr * multiplier)

    @torch.no_grad()
    def _matmul_step(self, x: Tensor, y: Tensor) -> None:
        m, points = self.width, x.shape[0]
        h1 = x @ self.w1.T
        a1 = torch.relu(h1)
        h2 = torch.mm(a1, self.w2.T).div_(m)
        a2 = torch.relu(h2)
        e = (torch.mm(a2, self.w3.T).div_(m) - y).mul_(2.0 / points)  # dLoss/dyhat, (P, 1)
        g2 = torch.mm(e, self.w3).mul_((h2 > 0).to(h2.dtype)).div_(m)  # dLoss/dH2
        g1 = torch.mm(g2, self.w2).mul_((h1 > 0).to(h1.dtype)).div_(m)  # dLoss/dH1
        # w -= lr * multiplier * grad: grad_3 = e^T a2 / M, grad_2 = g2^T a1 / M, grad_1 = g1^T x
        self.w3.addmm_(e.T, a2, alpha=-self.lr)
        self.w2.addmm_(g2.T, a1, alpha=-self.lr * m)
        self.w1.addmm_(g1.T, x, alpha=-self.lr * m)

    def weights(self) -> list[Tensor]:
        """The current ``[W1, W2, W3]``."""
        return [self.w1, self.w2, self.w3]


def _free(device: str) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def _rms(a: Tensor, b: Tensor) -> float:
    return (a.double() - b.double()).pow(2).mean().sqrt().item()


def output_errors(
    width: int, x: Tensor, y: Tensor, steps: int, precisions: list[str], device: str
) -> dict[str, float]:
    """RMS output gap to float64 after ``steps`` steps per precision, and the particle error.

    Returns:
        ``{precision: err vs f64, ..., "particle": RMS(f64 - f64 other draw) / sqrt(2)}``.
    """
    probe = x[:1024]
    outputs: dict[str, Tensor] = {}
    runs = [("float64", 0, False), ("particle", 1, False)]
    runs += [(p, 0, p == "tf32") for p in precisions if p != "float64"]
    for name, seed, tf32 in runs:
        dtype = torch.float32 if name in EMULATED else DTYPES.get(name, torch.float64)
        solver = ParticleLimitSolver(
            build_network(width, device, torch.float64, seed), LR, dtype=dtype, allow_tf32=tf32
        )
        emulation = EmulatedTF32(EMULATED[name]) if name in EMULATED else contextlib.nullcontext()
        with emulation:
            for _ in range(steps):
                solver.step(x, y)
            outputs[name] = solver(probe)
        del solver
        _free(device)
    errors = {p: _rms(outputs[p], outputs["float64"]) for p in precisions if p != "float64"}
    errors["particle"] = _rms(outputs["particle"], outputs["float64"]) / math.sqrt(2)
    return errors


def _time_group(
    width: int, x: Tensor, y: Tensor, precision: str, settings: Settings
) -> dict[str, float]:
    """Median ms of one step of ours and both baselines at one (M, precision)."""
    tf32 = precision == "tf32"
    network = build_network(width, settings.device, DTYPES[precision], seed=0)
    ours = ParticleLimitSolver(network, LR, dtype=DTYPES[precision], allow_tf32=tf32)
    autograd = PlainLoop(network, LR, autograd=True, tf32=tf32)
    matmul = PlainLoop(network, LR, autograd=False, tf32=tf32)
    del network
    xd, yd = x.to(DTYPES[precision]), y.to(DTYPES[precision])

    def step(solver: Any) -> Callable[[], None]:
        return lambda: solver.step(xd, yd)

    cases = {
        "ours": Case(step(ours), inner=1),
        "plain autograd": Case(step(autograd), inner=1),
        "plain matmul": Case(step(matmul), inner=1),
    }
    return measure(cases, settings)


def run(settings: Settings) -> Table:
    """Rows for every M, precision and baseline of this profile."""
    widths: list[int] = settings.pick([128], [512, 1024, 2048], [4096, 16384, 32768])
    points, error_steps = settings.pick((64, 2), (1024, 5), (4096, 10))
    precisions = ["fp32", "float64"] + (["tf32"] if settings.cuda else [])
    emulated = [] if settings.cuda else list(EMULATED)
    table = Table(
        "solver",
        "ParticleLimitSolver.step vs plain-PyTorch full-batch GD (L=3, d=10)",
        f"ratio <= {TARGET} in fp32",
        [*KEYS, *COMPARISON_COLUMNS, "ours TFLOP/s", "err vs f64", "particle err"],
    )
    x, y = regression_data(points, settings.device, torch.float64)
    for width in widths:
        errors = output_errors(width, x, y, error_steps, precisions + emulated, settings.device)
        for precision in precisions:
            times = _time_group(width, x, y, precision, settings)
            _free(settings.device)
            flops = 6 * points * width**2  # the three P x M x M GEMMs
            for baseline in ("plain autograd", "plain matmul"):
                row = ratio_row(times["ours"], times[baseline], TARGET)
                if precision == "float64":
                    row["ok"] = "(fp32 target)"
                table.add(
                    **{"M": width, "P": points, "dtype": precision, "baseline": baseline},
                    **row,
                    **{"ours TFLOP/s": flops / times["ours"] / 1e9},
                    **{"err vs f64": errors.get(precision), "particle err": errors["particle"]},
                )
        for precision in emulated:  # error only: the speed of TF32 needs a GPU
            table.add(
                **{"M": width, "P": points, "dtype": precision, "baseline": "-"},
                **{"err vs f64": errors[precision], "particle err": errors["particle"]},
            )
    table.notes.append(
        f"err vs f64 / particle err: RMS output gaps on up to 1024 of the P points after "
        f"{error_steps} steps (lr {LR}); particle err is the O(M^-1/2) error of the solver itself."
    )
    if not settings.cuda:
        table.notes.append(
            "TF32 exists on CUDA only: the tf32 (emulated) rows give its error (fp32 solver, every "
            "GEMM operand rounded to 10 mantissa bits), not its speed."
        )
    return table
