"""Forward+backward time of MeanFieldLinear vs nn.Linear, measured side by side in one run.

Usage: python benchmarks/layer_overhead.py [--device cpu|cuda] [--dtype float32|float64]
Prints one row per (batch, width): median ms of each and the ratio ours / nn.Linear.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from mflightning import MeanFieldLinear


def _median_ms(layer: nn.Module, x: torch.Tensor, repeats: int) -> float:
    def run() -> None:
        layer.zero_grad(set_to_none=True)
        layer(x).sum().backward()

    for _ in range(3):
        run()
    times = []
    for _ in range(repeats):
        if x.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        if x.is_cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    """Print the comparison table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    print(f"device={args.device} dtype={args.dtype} torch={torch.__version__}")
    print(f"{'batch':>6} {'width':>6} {'nn.Linear ms':>13} {'MF ms':>9} {'ratio':>6}")
    for batch, width in [(256, 256), (256, 1024), (1024, 1024), (1024, 2048)]:
        x = torch.randn(batch, width, device=args.device, dtype=dtype)
        ours = MeanFieldLinear(width, width, device=args.device, dtype=dtype)
        plain = nn.Linear(width, width, device=args.device, dtype=dtype)
        # interleave the two measurements so machine noise hits both alike
        t_plain, t_ours = [], []
        for _ in range(3):
            t_plain.append(_median_ms(plain, x, args.repeats))
            t_ours.append(_median_ms(ours, x, args.repeats))
        p, o = statistics.median(t_plain), statistics.median(t_ours)
        print(f"{batch:>6} {width:>6} {p:>13.3f} {o:>9.3f} {o / p:>6.2f}")


if __name__ == "__main__":
    main()
