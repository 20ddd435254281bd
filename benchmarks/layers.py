"""``layers``: forward+backward of MeanFieldLinear / MeanFieldConv2d vs nn.Linear / nn.Conv2d.

Same shapes, same parameters (bias on), the input requires grad as a hidden layer's does; one
step is ``zero_grad``, forward, ``out.sum().backward()``. Precisions: fp32 and bf16-mixed
(``torch.autocast(device, dtype=torch.bfloat16)``), each eager and under ``torch.compile`` where
the device supports it (not with ``--tiny``). The ``linear-folded`` rows time the candidate of
``benchmarks.folded_linear`` (the 1/n_in folded into the backward GEMMs too) against the same
``nn.Linear``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import shutil
from collections.abc import Callable

import torch
from torch import Tensor, nn

from benchmarks.common import COMPARISON_COLUMNS, Case, Settings, Table, measure, ratio_row
from benchmarks.folded_linear import FoldedMeanFieldLinear
from mflightning import MeanFieldConv2d, MeanFieldLinear

TARGET = 1.03
LinearShape = tuple[int, int, int]  # batch, n_in, n_out
ConvShape = tuple[int, int, int, int, int]  # batch, C_in, C_out, height = width, kernel
PRECISIONS = ("fp32", "bf16-mixed")


def compile_unavailable(device: str) -> str | None:
    """Why ``torch.compile`` cannot run on ``device`` here, or ``None`` when it can."""
    if torch.device(device).type == "cuda":
        return None if importlib.util.find_spec("triton") else "triton is not installed"
    if not any(shutil.which(cc) for cc in ("c++", "g++", "clang++")):
        return "no C++ compiler for inductor's CPU backend"
    return None


def _layers(
    kind: str, shape: tuple[int, ...], device: str
) -> tuple[MeanFieldLinear | MeanFieldConv2d, nn.Linear | nn.Conv2d, Tensor]:
    """(ours, baseline, input) for one shape: fp32, equal parameters, input requiring grad."""
    ours: MeanFieldLinear | MeanFieldConv2d
    base: nn.Linear | nn.Conv2d
    if kind in ("linear", "linear-folded"):
        batch, n_in, n_out = shape
        layer = MeanFieldLinear if kind == "linear" else FoldedMeanFieldLinear
        ours = layer(n_in, n_out, device=device)
        base = nn.Linear(n_in, n_out, device=device)
        x = torch.randn(batch, n_in, device=device)
    else:
        batch, c_in, c_out, side, kernel = shape
        ours = MeanFieldConv2d(c_in, c_out, kernel, padding=kernel // 2, device=device)
        base = nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, device=device)
        x = torch.randn(batch, c_in, side, side, device=device)
    with torch.no_grad():  # identical parameters, so both do the same arithmetic
        base.weight.copy_(ours.weight)
        assert base.bias is not None and ours.bias is not None
        base.bias.copy_(ours.bias)
    return ours, base, x.requires_grad_(True)


def _step(
    layer: nn.Module, forward: Callable[[Tensor], Tensor], x: Tensor, precision: str, device: str
) -> Callable[[], None]:
    """One forward+backward of ``layer`` through ``forward`` (the layer, or it compiled)."""
    device_type = torch.device(device).type

    def run() -> None:
        layer.zero_grad(set_to_none=True)
        x.grad = None
        autocast = (
            torch.autocast(device_type, dtype=torch.bfloat16)
            if precision == "bf16-mixed"
            else contextlib.nullcontext()
        )
        with autocast:
            out = forward(x)
        out.sum().backward()

    return run


def run(settings: Settings) -> Table:
    """Measure every (layer, shape, precision, compile) combination of this profile."""
    table = Table(
        "layers",
        "MeanField layer vs torch layer, forward+backward",
        f"ratio <= {TARGET}",
        ["layer", "shape", "precision", "compile", *COMPARISON_COLUMNS],
    )
    linear: list[LinearShape] = settings.pick(
        [(32, 64, 64)],
        [(256, 256, 256), (256, 1024, 1024), (1024, 1024, 1024)],
        [(4096, 1024, 1024), (4096, 4096, 4096), (16384, 8192, 8192)],
    )
    conv: list[ConvShape] = settings.pick(
        [(2, 4, 4, 8, 3)],
        [(16, 32, 32, 16, 3), (8, 64, 64, 32, 3)],
        [(64, 64, 64, 32, 3), (128, 128, 128, 32, 3), (64, 256, 256, 16, 3)],
    )
    no_compile = "skipped with --tiny" if settings.profile == "tiny" else None
    no_compile = no_compile or compile_unavailable(settings.device)
    compile_modes = [False] if no_compile else [False, True]
    if no_compile:
        table.notes.append(f"torch.compile rows skipped: {no_compile}.")
    kinds = ["linear", "linear-folded"]  # the folded candidate: benchmarks/folded_linear.py
    jobs = [(k, s) for s in linear for k in kinds] + [("conv2d", s) for s in conv]
    for kind, shape in jobs:
        for compiled in compile_modes:
            for precision in PRECISIONS:
                _measure_one(table, settings, kind, shape, precision, compiled)
    return table


def _measure_one(
    table: Table,
    settings: Settings,
    kind: str,
    shape: tuple[int, ...],
    precision: str,
    compiled: bool,
) -> None:
    ours, base, x = _layers(kind, shape, settings.device)
    names = {"layer": f"{kind} ({type(ours).__name__})", "shape": "x".join(map(str, shape))}
    names |= {"precision": precision, "compile": "yes" if compiled else "no"}
    forward_ours: Callable[[Tensor], Tensor] = ours
    forward_base: Callable[[Tensor], Tensor] = base
    if compiled:
        torch._dynamo.reset()
        forward_ours, forward_base = torch.compile(ours), torch.compile(base)
    warmup = 4 if compiled else 0
    cases = {
        "ours": Case(_step(ours, forward_ours, x, precision, settings.device), warmup=warmup),
        "base": Case(_step(base, forward_base, x, precision, settings.device), warmup=warmup),
    }
    try:
        times = measure(cases, settings)
    except Exception as error:  # a compiler failure must not lose the other rows
        if not compiled:
            raise
        table.add(**names, ok=f"compile failed: {type(error).__name__}")
        return
    table.add(**names, **ratio_row(times["ours"], times["base"], TARGET))
