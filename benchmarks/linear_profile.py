"""Where MeanFieldLinear's eager fp32 step differs from nn.Linear's: a torch.profiler op table.

Usage: ``python -m benchmarks.linear_profile [--shape B N_IN N_OUT] [--threads T]``

One step is ``zero_grad``, forward with an input that requires grad, ``out.sum().backward()``
(as in ``benchmarks/layers.py``). Prints the best-of-5 time per step of each layer, measured
side by side in one process, their ratio, and the ops with the most self CPU time per step for
each (200 profiled steps), so that the ops only ours runs stand out.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn
from torch.profiler import profile

import mflightning as mfl

STEPS = 200


def _step(layer: nn.Module, x: torch.Tensor) -> None:
    layer.zero_grad(set_to_none=False)
    x.grad = None
    layer(x).sum().backward()


def main() -> None:
    """Print both layers' time per step, their ratio and their op tables."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", type=int, nargs=3, default=[256, 256, 256])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    batch, n_in, n_out = args.shape
    layers = {
        "MeanFieldLinear": mfl.MeanFieldLinear(n_in, n_out),
        "nn.Linear": nn.Linear(n_in, n_out),
    }
    x = torch.randn(batch, n_in, requires_grad=True)
    for layer in layers.values():
        for _ in range(50):
            _step(layer, x)
    best = {}
    for name, layer in layers.items():
        samples = []
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(STEPS):
                _step(layer, x)
            samples.append((time.perf_counter() - start) / STEPS)
        best[name] = min(samples)
        with profile() as prof:
            for _ in range(STEPS):
                _step(layer, x)
        print(f"== {name} {batch}x{n_in}x{n_out}: {best[name] * 1e6:.1f} us/step")
        events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
        for event in events[:9]:
            calls, self_us = event.count / STEPS, event.self_cpu_time_total / STEPS
            print(f"   {event.key:36s} calls/step {calls:4.1f}  self us/step {self_us:7.1f}")
    print(f"ratio MeanFieldLinear / nn.Linear: {best['MeanFieldLinear'] / best['nn.Linear']:.3f}")


if __name__ == "__main__":
    main()
