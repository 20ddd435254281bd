"""Fused CPU passes over the reduced solver's end atoms, compiled at first use (§B.3, §B.4).

``mflightning.limit.endatoms`` passes an end layer in chunks of P x n blocks with torch ops:
each op is one more trip of the block through the cache, and float64 ``sigmoid`` costs about
3 ns per element on the project's CPU. ``endatoms.c`` does the same passes with a block of
atoms in the lanes of one vector and the samples taken one at a time (glibc's vector ``exp``):
the pre-activation, the core, the sums over the samples and the Euler steps stay in registers,
and a sigmoid costs one vector ``exp`` (docs/benchmarks.md, reduced section). It covers the
cores identity, relu and sigmoid (tanh is ``2 sigmoid(2u) - 1``) in float32 and float64, for
inputs of at most ``MAX_WIDTH`` features (wider inputs are a matrix product, where torch's BLAS
is faster).

A pass over a large layer is split into T parts (T torch threads, ``Workspace.parts``) inside
the C library, in one OpenMP parallel region: the process's OpenMP runtime (torch's own libgomp,
loaded first), whose threads spin for a while after each region, so that the next pass, or a
torch op, finds them awake (a Python thread pool cannot spin without holding the GIL, and
waking a sleeping thread took 65-150 us on the project's 2-vCPU VM, half a pass at M = 4096;
a pool of our own competed for the cores with the threads torch's ops left spinning). In a
child forked after the library was loaded the parts run one after another (the runtime's
threads did not survive the fork).

The library is compiled by the system's C compiler (``$CC``, else ``cc``) with ``FLAGS`` and the
first of ``VARIANTS`` that compiles into
``$MFL_CACHE_DIR`` (default ``~/.cache/mflightning``), under a name that hashes the sources,
the command and the CPU, and is reused from there. Without a working compiler the torch ops
are used, with one warning that says why (also when the cache folder cannot be written: read-only,
full, not accessible); ``MFL_NATIVE=0`` turns the library off (same results up to rounding: the
sums over atoms are added in another order).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

SOURCES = ("endatoms.c", "endatoms_body.h")
FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math")
# tried in turn: OpenMP threads and glibc's vector exp; without OpenMP (clang without libomp)
# the parts one after another; without libmvec (macOS, musl) a scalar exp too
VARIANTS = (
    (("-fopenmp",), ("-lmvec", "-lm")),
    (("-fopenmp-simd",), ("-lmvec", "-lm")),
    (("-fopenmp-simd", "-DMFL_SCALAR_EXP"), ("-lm",)),
)
# widest input X (features q) passed in C: a wider X @ theta.T is a real matrix product
MAX_WIDTH = 16
# widest input of the fixed form (endatoms.c's FIXED_WIDTH), which can keep its core values
FIXED_WIDTH = 12
# most atoms per vector block (float32's 8): the kept values of a part of n atoms take
# (n + KEPT_LANES) x P' elements
KEPT_LANES = 8
# the cores endatoms.c knows (its CORE_* constants)
CORES = {"identity": 0, "relu": 1, "sigmoid": 2}
STEP_FLAGS = {"theta": 1, "bias": 2, "readout": 4}  # its STEP_* constants
# samples per row of the transposed input: whole 64-byte cache lines of float64
ROW_MULTIPLE = 8
# scratch elements per sample the passes need (endatoms.c's SCRATCH_ROWS)
SCRATCH_ROWS = 104
_HERE = Path(__file__).parent


class EndLayerArgs(ctypes.Structure):
    """endatoms.c's ``end_layer``: an end layer (``endatoms.EndLayer``), split by the C."""

    _fields_ = [
        ("rows", ctypes.c_int64),
        ("width", ctypes.c_int64),
        ("outputs", ctypes.c_int64),
        ("atoms", ctypes.c_int64),
        ("x", ctypes.c_void_p),
        ("theta", ctypes.c_void_p),
        ("theta_stride", ctypes.c_int64 * 2),
        ("theta_offset", ctypes.c_double),
        ("bias", ctypes.c_void_p),
        ("bias_stride", ctypes.c_int64),
        ("readout", ctypes.c_void_p),
        ("readout_stride", ctypes.c_int64 * 2),
        ("readout_offset", ctypes.c_double),
        ("inner", ctypes.c_double),
        ("outer", ctypes.c_double),
        ("shift", ctypes.c_double),
        ("count", ctypes.c_double),
        ("core", ctypes.c_int32),
        ("kept", ctypes.c_void_p),
    ]


def pointer(tensor: Tensor | None) -> int | None:
    """The address of a tensor's first element (``None`` for no tensor)."""
    return None if tensor is None else tensor.data_ptr()


@dataclass(frozen=True)
class Library:
    """The compiled passes (``mfl_forward_*``, ``mfl_backward_*``; see endatoms.c).

    A layer's ``parts`` parts (atoms ``n i / parts`` to ``n (i + 1) / parts``) run side by
    side on OpenMP threads, the GIL released meanwhile (see the module docstring). Each part
    writes into its own slice of the output buffers; the caller adds them.
    """

    handle: ctypes.CDLL

    def forward(self, layer: EndLayerArgs, parts: int, scratch: Tensor, out: Tensor) -> None:
        """``out[i, c, p] = sum_{k in part i} R'[c, k] phi(u[p, k]) / M``, added to.

        ``scratch``: ``parts x SCRATCH_ROWS x P`` elements; ``out``: (parts, C', P),
        contiguous, the layer's dtype.
        """
        function = getattr(self.handle, f"mfl_forward_{_suffix(out)}")
        function(ctypes.byref(layer), parts, pointer(scratch), pointer(out))

    def backward(
        self,
        layer: EndLayerArgs,
        parts: int,
        grad: Tensor,
        grad_sum: Tensor,
        steps: dict[str, float],
        scratch: Tensor,
        x_grad: Tensor | None,
        squares: Tensor,
    ) -> None:
        """The gradients of every atom's fields and the Euler steps of those in ``steps``.

        Args:
            layer: the layer (its fields are stepped in place).
            parts: how many parts run side by side.
            grad: ``G.T`` (C', P), contiguous.
            grad_sum: ``sum_p G[p, c]`` (C',).
            steps: ``h m`` of each stepped role (``"theta"``, ``"bias"``, ``"readout"``).
            scratch: ``parts x SCRATCH_ROWS x P`` elements.
            x_grad: ``(dLoss/dX).T`` of each part (parts, q, P), accumulated into, or ``None``.
            squares: (parts, 3) sums of squared gradients of theta, bias, readout, added to.
        """
        flags = sum(STEP_FLAGS[role] for role in steps)
        sizes = (ctypes.c_double * 3)(*(steps.get(role, 0.0) for role in STEP_FLAGS))
        function = getattr(self.handle, f"mfl_backward_{_suffix(grad)}")
        function(
            ctypes.byref(layer),
            parts,
            pointer(grad),
            pointer(grad_sum),
            flags,
            sizes,
            pointer(scratch),
            pointer(x_grad),
            pointer(squares),
        )


def _suffix(tensor: Tensor) -> str:
    return {torch.float64: "f64", torch.float32: "f32"}[tensor.dtype]


def padded(x: Tensor) -> Tensor:
    """``x.T`` (P x q -> q x P'), contiguous, zero in the columns P..P' - 1.

    P' is the next multiple of ``ROW_MULTIPLE``: rows of whole cache lines for the vector loops
    of endatoms.c. A zero sample adds nothing to any gradient, and its outputs are dropped.
    """
    rows = -(-x.shape[0] // ROW_MULTIPLE) * ROW_MULTIPLE
    return torch.constant_pad_nd(x.T, (0, rows - x.shape[0])).contiguous()


def keeps(outputs: int, width: int) -> bool:
    """Whether a layer of ``outputs`` outputs and ``width`` features keeps its core values.

    Only the fixed form (one output, at most ``FIXED_WIDTH`` features) keeps them from the
    forward pass for the backward pass.
    """
    return outputs == 1 and width <= FIXED_WIDTH


def supports(core: str | None, x: Tensor) -> bool:
    """Whether the compiled passes can take a layer of this core and input ``x`` (P x q)."""
    return (
        core in CORES
        and x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.float64)
        and x.shape[1] <= MAX_WIDTH
    )


def library() -> Library | None:
    """The compiled passes, or ``None`` (``MFL_NATIVE=0``, or no working C compiler)."""
    if os.environ.get("MFL_NATIVE", "1") == "0":
        return None
    return _load()


def cache_dir() -> Path:
    """Where the compiled library is kept (``$MFL_CACHE_DIR`` or ``~/.cache/mflightning``)."""
    configured = os.environ.get("MFL_CACHE_DIR")
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mflightning"


def _cpu_signature() -> str:
    """The CPU's model and feature flags (``-march=native`` compiles for exactly these)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        import platform

        return platform.processor() or platform.machine()
    wanted = ("model name", "flags", "Features", "CPU part")
    return "\n".join(sorted({line for line in lines if line.startswith(wanted)}))


@functools.cache
def _load() -> Library | None:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        _warn("no C compiler found (set CC or install cc)")
        return None
    sources = b"".join((_HERE / name).read_bytes() for name in SOURCES)
    key = hashlib.sha256(
        sources + repr((compiler, FLAGS, VARIANTS)).encode() + _cpu_signature().encode()
    ).hexdigest()[:16]
    target = cache_dir() / f"endatoms-{key}.so"
    try:
        if not target.exists():
            with _compiling(target):  # one process compiles, the others wait for its library
                failure = None if target.exists() else _compile(compiler, target)
            if failure is not None:
                _warn(failure)
                return None
    except OSError as error:  # a read-only, full or inaccessible cache folder
        _warn(
            f"the cache folder {target.parent} cannot be written ({error.strerror or error}); "
            "set MFL_CACHE_DIR to a writable folder"
        )
        return None
    try:
        handle = ctypes.CDLL(str(target))
    except OSError as error:
        _warn(f"{target} could not be loaded: {error}")
        return None
    layer, address, parts = ctypes.POINTER(EndLayerArgs), ctypes.c_void_p, ctypes.c_int32
    for suffix in ("f64", "f32"):
        forward = getattr(handle, f"mfl_forward_{suffix}")
        forward.argtypes = [layer, parts, address, address]
        backward = getattr(handle, f"mfl_backward_{suffix}")
        backward.argtypes = [
            *(layer, parts, address, address, ctypes.c_int32),
            *(ctypes.POINTER(ctypes.c_double), address, address, address),
        ]
        forward.restype = backward.restype = None
    return Library(handle)


@contextlib.contextmanager
def _compiling(target: Path) -> Iterator[None]:
    """Hold an exclusive OS lock on ``target``'s lock file (blocking; POSIX, else no lock)."""
    try:
        import fcntl

        target.parent.mkdir(parents=True, exist_ok=True)
        handle = open(target.with_suffix(".lock"), "a")  # closed below
    except (ImportError, OSError):
        yield
        return
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        handle.close()  # releases the lock


def _compile(compiler: str, target: Path) -> str | None:
    """Compile endatoms.c into ``target`` (atomically); the reason it failed, or ``None``.

    The two precisions are compiled side by side (20-45 s in all on the project's 2 cores), then
    linked; with OpenMP threads and glibc's vector exp, else without what is missing
    (``VARIANTS``).
    """
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as failure:
        return f"the cache folder {target.parent} cannot be created ({failure}); set MFL_CACHE_DIR"
    rank_zero_info(
        f"mflightning: compiling the reduced solver's CPU passes into {target} "
        "(once per machine, about 20-45 s on 2 cores)"
    )
    error = "(not run)"
    for variant, libraries in VARIANTS:
        with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
            objects = [Path(scratch, f"endatoms{bits}.o") for bits in (64, 32)]
            base = [compiler, *FLAGS, *variant, "-fPIC", "-c", str(_HERE / "endatoms.c")]
            compiles = [
                [*base, f"-DMFL_REAL_BITS={bits}", "-o", str(obj)]
                for bits, obj in zip((64, 32), objects, strict=True)
            ]
            linked = Path(scratch, "endatoms.so")
            link = [compiler, "-shared", *variant, *map(str, objects), "-o", str(linked)]
            link += libraries
            error = _run_all(compiles) or _run_all([link])
            if not error:
                os.replace(linked, target)  # atomic: concurrent processes race harmlessly
                return None
    return f"`{compiler}` could not compile {_HERE / 'endatoms.c'}: {error}"


def _run_all(commands: list[list[str]]) -> str:
    """Run the commands side by side; the last line of the first failure's output, or ''."""
    try:
        running = [
            subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for command in commands
        ]
    except OSError as failure:
        return str(failure)
    errors = []
    for process in running:
        try:
            output, _ = process.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            process.kill()
            output = "timed out after 300 s"
        if process.returncode:
            errors.append((output.strip().splitlines() or ["(no message)"])[-1])
    return errors[0] if errors else ""


def _warn(reason: str) -> None:
    warnings.warn(
        f"The reduced solver's compiled CPU passes are unavailable: {reason}. It uses torch ops "
        "instead (same results, about 2x slower at large M); set MFL_NATIVE=0 to silence this.",
        RuntimeWarning,
        stacklevel=3,
    )
