"""How much memory a ``ParticleLimitSolver`` step needs, and the largest M.

One full-batch Euler step of an L-layer perceptron holds, at its peak (measured with
``torch.distributed._tools.mem_tracker.MemTracker`` on CPU and ``torch.cuda.max_memory_allocated``
on a GPU, tests/test_memory.py and tests/gpu):

* the particles: every weight and bias, ``n_params = d M_1 + sum_i M_i M_{i+1} + M_{L-1} out``
  numbers (about ``(L-2) M^2`` for hidden widths M);
* their gradients: as many again (``zero_grad(set_to_none=True)`` frees the old ones first);
* the optimizer's states, ``s`` tensors of every parameter's size (``s = 0`` for plain SGD, 1
  with momentum, 2 for Adam: ``optim.state_tensors_per_parameter``; docs/theory.md §F);
* the workspace: the P x M_i tensors autograd saves for the backward pass, ``k_i`` per hidden
  layer (``k = 1`` for relu, tanh, sigmoid and identity, whose derivative is read from the
  layer's output, the same tensor the next layer saves; ``k = 2`` for gelu, silu, softplus and
  sin, which also keep their input), plus two P x M gradients in flight, and the batch itself in
  the solver's dtype, ``P (d + out)`` numbers.

No other M x M buffer exists: the GEMM results become the gradients in place and SGD updates the
weights in place. So, with ``b`` bytes per number (4 for float32, 8 for float64),

    peak bytes <= b * ((2 + s) n_params + (sum_i k_i + 2) P max_i M_i + P (d + out)),

i.e. ``(L + 1) P M`` workspace numbers for relu networks and ``2 L P M`` for gelu ones. For
L = 3 relu, d = 10, P = 4096 this is about ``8 M^2 + 65536 M`` bytes in float32: M = 32768
needs 10.7 GB (21.5 GB in float64), and 95% of an 80 GiB card fits M = 96 979 (table in
docs/guide/limit.md).
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from mflightning.mlp import MeanFieldMLP
from mflightning.nn import MeanFieldLinear

# activations whose backward reads their input, kept beside the output the next layer saves
SAVES_INPUT = frozenset({"gelu", "silu", "softplus", "sin"})


def saved_per_hidden_layer(activation: str) -> int:
    """``k``: the P x M tensors a hidden layer with this activation keeps for the backward."""
    return 2 if activation in SAVES_INPUT else 1


def mlp_parameter_count(network: MeanFieldMLP, widths: Sequence[int] | None = None) -> int:
    """Weights and biases of ``network.with_widths(widths)``, counted without building it.

    ``n_params = sum_i n_{i-1} n_i`` (plus ``sum_i n_i`` with biases), with ``n_0 = d``, the
    hidden widths ``n_1 .. n_{L-1}`` and ``n_L = out``. Python integers: no overflow, however
    wide.

    Args:
        network: the architecture.
        widths: its hidden widths (default: the network's own).
    """
    first, last = network.layers[0], network.layers[-1]
    assert isinstance(first, MeanFieldLinear) and isinstance(last, MeanFieldLinear)
    sizes = [first.in_features, *(network.widths if widths is None else widths), last.out_features]
    weights = sum(a * b for a, b in itertools.pairwise(sizes))
    return weights + (sum(sizes[1:]) if first.bias is not None else 0)


def solver_step_bytes(
    network: MeanFieldMLP,
    points: int,
    dtype: torch.dtype,
    widths: Sequence[int] | None = None,
    states: int = 0,
) -> int:
    """Upper bound on one solver step's peak memory (see the module docstring for the terms).

    ``bytes = b ((2 + s) n_params + (sum_i k_i + 2) P max_i M_i + P (d + out))``.

    Args:
        network: the width-M network whose neurons are the particles.
        points: P, the number of training points in the full batch.
        dtype: the solver's dtype (its ``itemsize`` is ``b``).
        widths: the particle network's hidden widths M_i when they differ from ``network``'s:
            the bound of ``network.with_widths(widths)``, computed without building it.
        states: ``s``, the optimizer's state tensors per parameter (0 for plain SGD).

    Raises:
        TypeError: ``network`` is not a ``MeanFieldMLP``.
        ValueError: ``points`` is not a positive integer.
    """
    if not isinstance(network, MeanFieldMLP):
        raise TypeError(
            f"`network` must be a MeanFieldMLP (the bound counts its layers), got "
            f"{type(network).__name__}."
        )
    if isinstance(points, bool) or not isinstance(points, int) or points < 1:
        raise ValueError(f"`points` must be a positive integer (P), got {points!r}.")
    widths = network.widths if widths is None else list(widths)
    n_params = mlp_parameter_count(network, widths)
    hidden = network.activation_names[:-1]
    saved = sum(saved_per_hidden_layer(name) for name in hidden) + 2
    first, last = network.layers[0], network.layers[-1]
    assert isinstance(first, MeanFieldLinear) and isinstance(last, MeanFieldLinear)
    batch = points * (first.in_features + last.out_features)
    return dtype.itemsize * ((2 + states) * n_params + saved * points * max(widths) + batch)


CGROUP_ROOT = Path("/sys/fs/cgroup")
MEMORY_HEADROOM = 0.9  # of the limit a process may plan to use: the allocator and Python need room


def _read_int(path: Path) -> int | None:
    """An integer file such as ``memory.max``; ``None`` when absent, unreadable or ``max``."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _meminfo_available() -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` in bytes, else the physical memory."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, OSError, ValueError):
        return None


def _own_cgroups(membership: Path = Path("/proc/self/cgroup")) -> tuple[str, str]:
    """The process's cgroup paths ``(v2, v1 memory)`` from ``/proc/self/cgroup`` (``/`` if none)."""
    v2 = v1 = "/"
    try:
        for line in membership.read_text().splitlines():
            number, controllers, path = line.split(":", 2)
            if number == "0" and controllers == "":
                v2 = path
            elif "memory" in controllers.split(","):
                v1 = path
    except (OSError, ValueError):
        pass
    return v2, v1


def _cgroup_available(
    root: Path = CGROUP_ROOT, membership: Path = Path("/proc/self/cgroup")
) -> int | None:
    """What the process's cgroups still allow: the tightest ``limit - usage`` on their path.

    Every level from the process's own cgroup up to the root counts (a job's limit may sit on a
    parent): v2's ``memory.max - memory.current`` and v1's ``memory.limit_in_bytes -
    memory.usage_in_bytes``. ``None`` without a limit (``max``, or v1's huge "no limit") or where
    the files cannot be read.
    """
    v2, v1 = _own_cgroups(membership)
    candidates = []
    for base, own, limit, usage in (
        (root, v2, "memory.max", "memory.current"),
        (root / "memory", v1, "memory.limit_in_bytes", "memory.usage_in_bytes"),
    ):
        parts = [part for part in own.split("/") if part]
        for depth in range(len(parts), -1, -1):
            folder = base.joinpath(*parts[:depth])
            cap, used = _read_int(folder / limit), _read_int(folder / usage)
            if cap is not None and cap < 2**60:
                candidates.append(max(0, cap - (used or 0)))
    return min(candidates) if candidates else None


def _address_space_available() -> int | None:
    """``RLIMIT_AS`` (``ulimit -v``, ``prlimit --as``) less the address space already mapped."""
    try:
        import resource
    except ImportError:  # not on Windows
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    mapped = 0
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmSize:"):
                mapped = int(line.split()[1]) * 1024
    except OSError:
        pass
    return max(0, soft - mapped)


def memory_limits(device: torch.device) -> dict[str, int]:
    """Every limit on the memory this process may still use on ``device``, in bytes, by source.

    A CUDA device: its free memory (``torch.cuda.mem_get_info``). The CPU: ``MemAvailable`` of
    ``/proc/meminfo`` (else the physical memory), the cgroup's ``memory.max`` less
    ``memory.current`` (containers, SLURM jobs) and ``RLIMIT_AS`` less the mapped address space
    (``ulimit -v``). Sources that cannot be read, or set no limit, are left out.
    """
    if device.type == "cuda":
        return {"cuda free": int(torch.cuda.mem_get_info(device)[0])}
    if device.type != "cpu":
        return {}
    limits = {
        "available RAM": _meminfo_available(),
        "cgroup memory.max": _cgroup_available(),
        "RLIMIT_AS": _address_space_available(),
    }
    return {name: value for name, value in limits.items() if value is not None}


def available_memory(device: torch.device) -> int | None:
    """Bytes the process may plan to fill on ``device``: ``MEMORY_HEADROOM`` of the tightest limit.

    ``None`` where no limit can be read (``memory_limits``).
    """
    limits = memory_limits(device)
    return int(MEMORY_HEADROOM * min(limits.values())) if limits else None


def tightest_limit(device: torch.device) -> str:
    """The name of the tightest limit of ``memory_limits`` (for messages), or ``"unknown"``."""
    limits = memory_limits(device)
    return min(limits, key=lambda name: limits[name]) if limits else "unknown"


def largest_width(
    memory_bytes: float,
    points: int,
    in_features: int,
    depth: int = 3,
    dtype: torch.dtype = torch.float32,
    out_features: int = 1,
    activation: str = "relu",
) -> int:
    """The largest hidden width M (all hidden layers M wide, no biases) whose step fits.

    Solves ``b (2 n_params(M) + ((L-1) k + 2) P M + P (d + out)) <= memory_bytes`` with
    ``n_params(M) = (L-2) M^2 + (d + out) M`` and ``k = saved_per_hidden_layer(activation)``.

    Args:
        memory_bytes: memory available to the solver (leave room for the CUDA context, about
            0.5-1 GB, and anything else on the card).
        points: P.
        in_features: d.
        depth: L >= 2.
        dtype: the solver's dtype.
        out_features: the output size.
        activation: the hidden layers' activation.

    Raises:
        ValueError: ``depth`` < 2, a non-positive size, or a budget that does not fit M = 1.
    """
    if depth < 2 or points < 1 or in_features < 1 or out_features < 1 or memory_bytes <= 0:
        raise ValueError(
            f"need depth >= 2 and positive sizes, got depth={depth}, points={points}, "
            f"in_features={in_features}, out_features={out_features}, memory_bytes={memory_bytes}."
        )
    numbers = memory_bytes / dtype.itemsize - points * (in_features + out_features)
    quadratic = 2 * (depth - 2)  # quadratic M^2 + linear M <= numbers
    saved = (depth - 1) * saved_per_hidden_layer(activation) + 2
    linear = 2 * (in_features + out_features) + saved * points
    if quadratic == 0:
        width = int(numbers // linear)
    else:
        width = int((-linear + math.sqrt(linear**2 + 4 * quadratic * numbers)) / (2 * quadratic))
    if width < 1:
        raise ValueError(
            f"`memory_bytes`={memory_bytes:.3g} does not hold even M = 1 with P={points} "
            "points; give more memory or use fewer points (minibatches)."
        )
    return width
