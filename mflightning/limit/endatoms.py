"""Chunked passes over the end atoms of the reduced solver (docs/theory.md §B.3, §B.4).

The reduced forward pass of ``ReducedLimitSolver`` touches its M end atoms (first-layer rows
``U_1``, readout columns ``U_L``) through sums of one shape. For an *end layer* with atoms
``k = 1..n`` and a shared input ``X`` (P x q), the pre-activation, the activation and the
contribution to the layer above are

    ``u[p, k] = X[p] . theta[k] + b[k]``,    ``A = phi(u)``,    ``S = A @ R.T``  (P x C'),

with ``R`` (C' x n) the atoms' weights towards the layer above, already divided by the atom
count ``M`` (§B.3):

* first layer: ``X = s x`` (s the input scale), ``theta = w_1``, ``b = b_1``, and
  ``R = w_2 / M_1`` (L = 2) or ``R = (mu_2 + g_2) / M_1`` (L >= 4, C' = 1, ``S = H_2* - b_2``);
* last hidden layer (L >= 4): ``X = phi_{L-2}(H_{L-2}*(x))`` (P x 1), ``theta = mu_{L-1} +
  g_{L-1}`` (n x 1), ``b = b_{L-1}``, ``R = w_L / M_L`` (``S = H_L - b_L``).

``forward_sum`` accumulates ``S`` over chunks of atoms, so that no P x n intermediate exists at
once. Given ``G = dLoss/dS`` (P x C'), ``backward_step`` recomputes each chunk and applies the
chain rule by hand, with ``D = phi'(u)``:

    ``dL/dR[c, k] = sum_p G[p, c] A[p, k]``,
    ``dL/du[p, k] = D[p, k] sum_c G[p, c] R[c, k]``,
    ``dL/dtheta[k] = sum_p dL/du[p, k] X[p]``,  ``dL/db[k] = sum_p dL/du[p, k]``,
    ``dL/dX[p] = sum_k dL/du[p, k] theta[k]``,

contracting ``D`` with ``Q[p, (j, c)] = [X, 1][p, j] G[p, c]`` in one matrix product instead of
forming ``dL/du``. It then takes the Euler step of the chunk's fields (``f <- f - h m dL/df``)
before moving on: a chunk's fields are read only by its own recomputation.

Each activation is evaluated as ``phi(u) = a core(c u) + e`` (``Kernel``): tanh is
``2 sigmoid(2u) - 1``, three times cheaper than ``torch.tanh`` in float64 on a CPU; the inner
scale is folded into ``X`` and ``b`` and the outer affine map into ``R``. For relu and identity
(``phi(u) = u phi'(u)``) the backward pass needs only ``D``: ``dL/dR`` comes out of the same
contraction.

On a CPU, layers whose core is identity, relu or sigmoid (tanh) with at most
``native.MAX_WIDTH`` input features are passed by compiled C instead (``mflightning.limit.native``:
blocks of atoms in the lanes of a vector, one sample at a time, no chunk buffers; the same
formulas, results equal to rounding; a large layer's parts run side by side on OpenMP
threads); the torch ops below cover every other case (GPUs, other activations, wide
inputs, no C compiler, ``MFL_NATIVE=0``).

A layer whose P x n core values fit ``CACHE_ELEMENTS`` keeps them from the forward pass for the
backward pass (small M); a larger one is recomputed chunk by chunk. In the torch ops a large
layer is split over Python worker threads (``Workspace``). At M = 10^6, P = 100 a step with
the torch ops is about two evaluations of the last layer's activation per atom and sample (4.4
of its 10 ns per atom-sample on one core of the 2-core container) plus five skinny matrix
products (``torch.mm`` with K = d or 100); with the compiled passes about 6 ns, 3-4 of them the
last layer's two vector ``exp``.

``torch.compile`` was measured on this CPU and is not used: inductor's float64 tanh is not faster
than eager's (8.5 vs 7.8 ns per element), its fused first-layer forward halved that pass (1.0 vs
1.7 ns per atom-sample) but its fused backward was slower than eager's (11.7 vs 7.9 ns), and each
new shape compiles for 3-25 s.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import math
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

from mflightning.limit import native

# core(z, slope) -> core(z): may overwrite z; writes core'(z) into `slope` when it is given
Core = Callable[[Tensor, Tensor | None], Tensor]

_SQRT1_2 = math.sqrt(0.5)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_SOFTPLUS_THRESHOLD = 20.0  # torch.nn.functional.softplus's default (beta = 1)
R = TypeVar("R")


def _identity(z: Tensor, slope: Tensor | None) -> Tensor:
    if slope is not None:
        slope.fill_(1.0)
    return z


def _identity_slope(value: Tensor, out: Tensor) -> Tensor:
    return out.fill_(1.0)


def _relu_slope(value: Tensor, out: Tensor) -> Tensor:  # 1 where relu(z) > 0, as torch's
    return torch.gt(value, 0.0, out=out)


def _sigmoid_slope(value: Tensor, out: Tensor) -> Tensor:  # s (1 - s)
    return torch.addcmul(value, value, value, value=-1.0, out=out)


def _relu(z: Tensor, slope: Tensor | None) -> Tensor:
    value = z.relu_()
    if slope is not None:
        _relu_slope(value, slope)
    return value


def _sigmoid(z: Tensor, slope: Tensor | None) -> Tensor:
    value = z.sigmoid_()
    if slope is not None:
        _sigmoid_slope(value, slope)
    return value


def _gelu(z: Tensor, slope: Tensor | None) -> Tensor:
    if slope is not None:  # Phi(z) + z phi(z), torch's GeluBackward (approximate="none")
        cdf = torch.erf(z * _SQRT1_2).add_(1.0).mul_(0.5)
        torch.mul(z, z, out=slope).mul_(-0.5).exp_().mul_(_INV_SQRT_2PI).mul_(z).add_(cdf)
    return F.gelu(z)


def _silu(z: Tensor, slope: Tensor | None) -> Tensor:
    if slope is not None:  # s (1 + z (1 - s)), torch's silu_backward
        s = torch.sigmoid(z)
        torch.mul(z, 1.0 - s, out=slope).add_(1.0).mul_(s)
    return F.silu(z)


def _softplus(z: Tensor, slope: Tensor | None) -> Tensor:
    if slope is not None:  # e^z / (e^z + 1), or 1 above the threshold (torch's backward)
        e = torch.exp(z)
        torch.div(e, e + 1.0, out=slope).masked_fill_(z > _SOFTPLUS_THRESHOLD, 1.0)
    return F.softplus(z)


def _sin(z: Tensor, slope: Tensor | None) -> Tensor:
    if slope is not None:
        torch.cos(z, out=slope)
    return z.sin_()


@dataclass(frozen=True)
class Kernel:
    """An activation as ``phi(u) = outer * core(inner * u) + shift``.

    Attributes:
        core: evaluates the core in place where it can, and its derivative on request.
        inner: the scale ``c`` of the argument.
        outer: the scale ``a`` of the value.
        shift: the offset ``e`` of the value.
        homogeneous_slope: for a positively homogeneous ``phi`` (``phi(u) = u phi'(u)``: relu,
            identity; ``c = a = 1``, ``e = 0``), writes ``phi'(u)`` over ``u``: the backward
            pass then needs only the slope, ``dL/dR`` coming from the same contraction as
            ``dL/dtheta`` (``A[p, k] = D[p, k] (X[p] . theta[k] + b[k])``).
        value_slope: ``(core(z), out) -> core'(z)`` written into ``out`` (which may be the
            values themselves), where the core's derivative is a function of its value
            (identity, relu, sigmoid); such layers keep their forward values for the backward
            pass when they fit ``CACHE_ELEMENTS``, and need no second chunk buffer.
        native: the core's name in the compiled passes (``mflightning.limit.native.CORES``),
            or ``None`` where only the torch ops cover it.
    """

    core: Core
    inner: float = 1.0
    outer: float = 1.0
    shift: float = 0.0
    homogeneous_slope: Callable[[Tensor], Tensor] | None = None
    value_slope: Callable[[Tensor, Tensor], Tensor] | None = None
    native: str | None = None

    def value_and_slope(self, u: Tensor) -> tuple[Tensor, Tensor]:
        """``(phi(u), phi'(u))``, fresh tensors: ``phi'(u) = outer * inner * core'(inner * u)``.

        The reduced solver's middle layers (P-vectors) take both in one evaluation.
        """
        slope = torch.empty_like(u)
        value = self.core(self.inner * u, slope)  # inner * u is fresh: the core may overwrite it
        return self.outer * value + self.shift, slope.mul_(self.outer * self.inner)


KERNELS: dict[str, Kernel] = {
    "identity": Kernel(
        _identity,
        homogeneous_slope=lambda u: u.fill_(1.0),
        value_slope=_identity_slope,
        native="identity",
    ),
    "relu": Kernel(
        _relu, homogeneous_slope=lambda u: u.gt_(0.0), value_slope=_relu_slope, native="relu"
    ),
    # tanh u = 2 sigmoid(2u) - 1
    "tanh": Kernel(
        _sigmoid,
        inner=2.0,
        outer=2.0,
        shift=-1.0,
        value_slope=_sigmoid_slope,
        native="sigmoid",
    ),
    "sigmoid": Kernel(_sigmoid, value_slope=_sigmoid_slope, native="sigmoid"),
    "gelu": Kernel(_gelu),
    "silu": Kernel(_silu),
    "softplus": Kernel(_softplus),
    "sin": Kernel(_sin),
}


@dataclass
class EndLayer:
    """The atoms of one end layer (a solver's or a tracer set's) and their Euler steps.

    Attributes:
        theta: ``(n, q)`` weights from the input ``X``, updated in place (a view of a field).
        theta_offset: added to ``theta`` in the forward pass (``mu_{L-1}`` for the gains
            ``g_{L-1}``, else 0).
        bias: ``(n,)`` biases or ``None``.
        readout: ``(C', n)`` weights towards the layer above, updated in place.
        readout_offset: added to ``readout`` (``mu_2`` for the gains ``g_2``, else 0).
        count: the atom count ``M`` the readout is divided by (the solver's, for tracers too).
        steps: Euler step ``h m`` of ``"theta"``, ``"bias"`` and ``"readout"``; a missing key
            means a frozen field (its gradient is not computed).
        names: the field name of each of the three roles (keys of ``backward_step``'s squares).
    """

    theta: Tensor
    theta_offset: float
    bias: Tensor | None
    readout: Tensor
    readout_offset: float
    count: int
    steps: dict[str, float]
    names: dict[str, str]

    @property
    def size(self) -> int:
        """The number of atoms ``n``."""
        return self.theta.shape[0]

    def part(self, start: int, stop: int) -> EndLayer:
        """The atoms ``start:stop`` (views: their steps update this layer's fields)."""
        atoms = slice(start, stop)
        bias = None if self.bias is None else self.bias[atoms]
        return EndLayer(
            self.theta[atoms],
            self.theta_offset,
            bias,
            self.readout[:, atoms],
            self.readout_offset,
            self.count,
            self.steps,
            self.names,
        )

    def values(self) -> tuple[Tensor, Tensor]:
        """``(theta + theta_offset, readout + readout_offset)`` (``M R``), fresh when offset."""
        theta = self.theta + self.theta_offset if self.theta_offset else self.theta
        readout = self.readout + self.readout_offset if self.readout_offset else self.readout
        return theta, readout


class Workspace:
    """Scratch memory and worker threads of one solver's passes.

    * Buffers: a fresh multi-megabyte CPU allocation is mapped page by page on its first write;
      reusing the chunk buffers across chunks and steps avoids that cost (it tripled the time of
      the first write to each chunk at M = 4096).
    * Threads: inside ``split_threads`` on a CPU with T > 1 torch threads, the calling thread's
      ops run on one thread and a layer of at least ``T * MIN_PART`` atoms is split into T
      contiguous parts (``parts``), passed side by side on OpenMP threads by the compiled passes
      (``native``) or, with the torch ops, each by a Python worker thread with single-threaded
      ops (``map``), instead of splitting every op over T threads. Same arithmetic and
      a fixed order of the partial sums, but one synchronisation per pass instead of one per
      op (and per MKL call, even on 100 numbers): on the shared 2-core container with other
      jobs running, a step at M = 10^6 went from 8-27 s to 1.4-1.9 s, as fast when it is quiet.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, Tensor] = {}
        self._workers: list[Workspace] = []
        self._pool: ThreadPoolExecutor | None = None
        self._pid = 0  # the process that started the pool (a forked child starts its own)
        self._threads = 1  # torch's thread count when split_threads was entered
        self._padded: list[tuple[Tensor, tuple[object, ...], Tensor]] = []  # see padded

    @contextlib.contextmanager
    def split_threads(self, device: torch.device) -> Iterator[None]:
        """Inside: this thread's torch ops on one thread, large layers split over the threads."""
        threads = torch.get_num_threads() if device.type == "cpu" else 1
        if threads < 2:
            yield
            return
        torch.set_num_threads(1)
        self._threads = threads
        try:
            yield
        finally:
            self._threads = 1
            torch.set_num_threads(threads)

    def flat(self, key: str, like: Tensor, numel: int) -> Tensor:
        """A flat buffer of ``numel`` elements with ``like``'s dtype and device."""
        buffer = self._buffers.get(key)
        if (
            buffer is None
            or buffer.numel() < numel
            or buffer.dtype != like.dtype
            or buffer.device != like.device
        ):
            buffer = like.new_empty(numel)
            self._buffers[key] = buffer
        return buffer[:numel]

    def padded(self, x: Tensor) -> Tensor:
        """``native.padded(x)``, reused while ``x``'s memory is unchanged.

        The passes of one step pad the same inputs and gradients up to three times (forward,
        backward, the tracers' backward). The last few are kept with a reference to their
        source, so no other tensor can occupy its memory meanwhile; an in-place torch op on it
        moves its version counter (the solver's own inputs are fresh tensors: writes torch does
        not see, through numpy or ``.data``, are not detected). Inference tensors have no
        version counter and are padded every time.
        """
        if x.is_inference():
            return native.padded(x)
        key = (x.data_ptr(), x.shape, x.stride(), x.dtype, x.device, x._version)
        for _, known, result in self._padded:
            if known == key:
                return result
        result = native.padded(x)
        self._padded = [(x, key, result), *self._padded[:3]]
        return result

    def parts(self, size: int, like: Tensor) -> list[tuple[int, int]]:
        """The ``(start, stop)`` ranges of a layer of ``size`` atoms, one per worker."""
        threads = self._threads if like.device.type == "cpu" else 1
        if threads < 2 or size < threads * MIN_PART:
            return [(0, size)]
        bounds = [size * i // threads for i in range(threads + 1)]
        return list(itertools.pairwise(bounds))

    def map(self, work: Callable[[int, Workspace], R], count: int) -> list[R]:
        """``[work(i, buffers_i) for i < count]``, part 0 by the calling thread.

        The other parts go to ``count - 1`` worker threads: one hand-over fewer per pass than
        ``count`` workers (at M = 4096 the hand-overs cost as much as the second core gave).
        """
        if count == 1:
            return [work(0, self)]
        if self._pool is None or len(self._workers) != count or self._pid != os.getpid():
            self._start(count)
        assert self._pool is not None  # started above
        futures = [self._pool.submit(work, i, self._workers[i]) for i in range(1, count)]
        first = work(0, self._workers[0])
        return [first, *(future.result() for future in futures)]

    def _start(self, count: int) -> None:
        """Buffers for ``count`` parts, and ``count - 1`` single-threaded worker threads."""
        if self._pool is not None and self._pid == os.getpid():
            self._pool.shutdown()
        previous = torch.get_num_threads()
        threads = count - 1
        started = threading.Barrier(threads + 1)

        def single_threaded() -> None:
            torch.get_num_threads()  # this thread's lazy thread-count set-up first, then ours
            torch.set_num_threads(1)  # thread-local for OpenMP and MKL (and the default below)

        pool = ThreadPoolExecutor(threads, "mflightning-atoms", initializer=single_threaded)
        for _ in range(threads):  # every worker starts (and runs the initializer) now
            pool.submit(started.wait)
        started.wait()
        torch.set_num_threads(previous)  # restore the default the workers changed
        self._pool, self._workers = pool, [Workspace() for _ in range(count)]
        self._pid = os.getpid()


# atoms per worker below which a layer is passed by the calling thread alone
MIN_PART = 1024
# largest P x n block of core values kept from the forward pass for the backward pass (32 MB in
# float64): small layers skip their recomputation, large ones are recomputed chunk by chunk
CACHE_ELEMENTS = 2**22


def _chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def _buffer(storage: Tensor, rows: int, columns: int) -> Tensor:
    """A contiguous ``(rows, columns)`` view of the front of a flat workspace."""
    return storage[: rows * columns].view(rows, columns)


def _preactivation(x: Tensor, theta: Tensor, bias: Tensor | None, out: Tensor) -> Tensor:
    """``X theta.T + b`` into ``out`` (the kernel's inner scale already in ``x`` and ``b``)."""
    if theta.shape[1] == 1:  # rank one: the last hidden layer
        if bias is None:
            torch.outer(x[:, 0], theta[:, 0], out=out)
        else:
            torch.addr(bias, x[:, 0], theta[:, 0], out=out)
    elif bias is None:
        torch.mm(x, theta.T, out=out)
    else:
        torch.addmm(bias, x, theta.T, out=out)
    return out


def _forward_part(
    layer: EndLayer,
    x: Tensor,
    kernel: Kernel,
    chunk: int,
    workspace: Workspace,
    kept: Tensor | None,
) -> Tensor:
    """``forward_sum`` on one part of a layer, by the calling thread (``kept``: its slice)."""
    rows, outputs = x.shape[0], layer.readout.shape[0]
    scaled = kernel.inner * x if kernel.inner != 1.0 else x
    theta_all, readout_all = layer.values()
    weights = readout_all * (kernel.outer / layer.count)
    bias_all = (
        layer.bias if layer.bias is None or kernel.inner == 1.0 else kernel.inner * layer.bias
    )
    total = x.new_zeros(rows, outputs)
    values_space = workspace.flat("values", x, rows * min(chunk, layer.size))
    for atoms in _chunks(layer.size, chunk):
        n = atoms.stop - atoms.start
        if kept is None:
            out = _buffer(values_space, rows, n)
        else:
            out = kept[rows * atoms.start : rows * atoms.stop].view(rows, n)
        bias = None if bias_all is None else bias_all[atoms]
        values = kernel.core(_preactivation(scaled, theta_all[atoms], bias, out), None)
        if outputs == 1:  # a matrix-vector product: faster than a one-column product on CPUs
            total[:, 0].addmv_(values, weights[0, atoms])
        else:
            total.addmm_(values, weights[:, atoms].T)
    if kernel.shift:  # sum_k e R[c, k], the same for every sample
        total += kernel.shift * readout_all.sum(1) / layer.count
    return total


def _fused(kernel: Kernel, x: Tensor) -> native.Library | None:
    """The compiled passes when they cover this kernel and input (``native``), else ``None``."""
    return native.library() if native.supports(kernel.native, x) else None


def _native_args(
    layer: EndLayer, xt: Tensor, kernel: Kernel, kept: Tensor | None
) -> native.EndLayerArgs:
    """``layer`` as the compiled passes' ``end_layer`` (``xt``: ``native.padded(X)``)."""
    assert kernel.native is not None  # checked by _fused
    bias = layer.bias
    for field in (layer.theta, layer.readout, bias):  # the C reads raw memory of xt's dtype
        if field is not None and (field.dtype != xt.dtype or field.device != xt.device):
            raise TypeError(f"end-layer field of {field.dtype} on {field.device}, input {xt.dtype}")
    return native.EndLayerArgs(
        rows=xt.shape[1],
        width=xt.shape[0],
        outputs=layer.readout.shape[0],
        atoms=layer.size,
        x=native.pointer(xt),
        theta=native.pointer(layer.theta),
        theta_stride=(ctypes.c_int64 * 2)(*layer.theta.stride()),
        theta_offset=layer.theta_offset,
        bias=native.pointer(bias),
        bias_stride=0 if bias is None else bias.stride(0),
        readout=native.pointer(layer.readout),
        readout_stride=(ctypes.c_int64 * 2)(*layer.readout.stride()),
        readout_offset=layer.readout_offset,
        inner=kernel.inner,
        outer=kernel.outer,
        shift=kernel.shift,
        count=layer.count,
        core=native.CORES[kernel.native],
        kept=native.pointer(kept),
    )


def _fused_forward(
    library: native.Library,
    layer: EndLayer,
    parts: int,
    xt: Tensor,
    kernel: Kernel,
    workspace: Workspace,
    kept: Tensor | None,
) -> Tensor:
    """``forward_sum`` by the compiled passes, the layer's ``parts`` parts side by side.

    ``xt`` is ``native.padded(x)``, ``kept`` the buffer for the kept values (or ``None``);
    returns ``S.T`` padded likewise.
    """
    out = xt.new_zeros(parts, layer.readout.shape[0], xt.shape[1])
    scratch = workspace.flat("fused", xt, parts * native.SCRATCH_ROWS * xt.shape[1])
    library.forward(_native_args(layer, xt, kernel, kept), parts, scratch, out)
    return out.sum(0) if parts > 1 else out[0]


def _fused_backward(
    library: native.Library,
    layer: EndLayer,
    parts: int,
    xt: Tensor,
    kernel: Kernel,
    grad: tuple[Tensor, Tensor],
    workspace: Workspace,
    input_grad: bool,
    kept: Tensor | None,
) -> tuple[Tensor | None, dict[str, Tensor]]:
    """``backward_step`` by the compiled passes, the layer's ``parts`` parts side by side.

    ``grad`` is ``(native.padded(G), sum_p G)``. Returns ``(dLoss/dX).T`` padded as ``xt``
    (or ``None``) and the sums of squared gradients of the stepped fields.
    """
    x_grad = xt.new_zeros(parts, *xt.shape) if input_grad else None
    squares = xt.new_zeros(parts, 3)
    scratch = workspace.flat("fused", xt, parts * native.SCRATCH_ROWS * xt.shape[1])
    args = _native_args(layer, xt, kernel, kept)
    library.backward(args, parts, grad[0], grad[1], layer.steps, scratch, x_grad, squares)
    totals = dict(zip(native.STEP_FLAGS, squares.sum(0), strict=True))
    squared = {layer.names[role]: totals[role] for role in layer.steps}
    return None if x_grad is None else x_grad.sum(0), squared


def _added(tensors: list[Tensor]) -> Tensor:
    """The sum of the parts' tensors, in order, into the first."""
    total = tensors[0]
    for other in tensors[1:]:
        total += other
    return total


def forward_sum(
    layer: EndLayer,
    x: Tensor,
    kernel: Kernel,
    chunk: int,
    workspace: Workspace,
    keep: str | None = None,
) -> tuple[Tensor, Tensor | None]:
    """``S = phi(X theta.T + b) @ R.T`` (P x C'), accumulated over chunks of ``chunk`` atoms.

    The layer's parts (``Workspace.parts``) are passed side by side, by the compiled passes on
    OpenMP threads or by the workspace's Python workers (torch ops), and their sums added in
    order.

    Args:
        layer: the atoms.
        x: the shared input ``X`` (P x q).
        kernel: the activation ``phi``.
        chunk: atoms per chunk.
        workspace: scratch memory and workers.
        keep: keep the core values ``core(c u)`` under this workspace key for ``backward_step``
            when the kernel allows it (``value_slope``; with the compiled passes, layers of
            their fixed form, ``native.keeps``) and they fit ``CACHE_ELEMENTS``.

    Returns:
        ``S`` and the kept values (flat, part after part and chunk after chunk; the compiled
        passes' in vector blocks, part i at P' (start + ``native.KEPT_LANES`` i)), or ``None``.
    """
    parts = workspace.parts(layer.size, x)
    library = _fused(kernel, x)
    if library is not None:
        xt = workspace.padded(x)
        kept = None
        size = xt.shape[1] * (layer.size + native.KEPT_LANES * len(parts))
        if keep is not None and native.keeps(layer.readout.shape[0], x.shape[1]):
            kept = workspace.flat(keep, x, size) if size <= CACHE_ELEMENTS else None
        out = _fused_forward(library, layer, len(parts), xt, kernel, workspace, kept)
        return out[:, : x.shape[0]].T, kept
    rows = x.shape[0]
    kept = None
    if keep is not None and kernel.value_slope is not None and rows * layer.size <= CACHE_ELEMENTS:
        kept = workspace.flat(keep, x, rows * layer.size)

    def work(i: int, buffers: Workspace) -> Tensor:
        start, stop = parts[i]
        part_kept = None if kept is None else kept[rows * start : rows * stop]
        return _forward_part(layer.part(start, stop), x, kernel, chunk, buffers, part_kept)

    return _added(workspace.map(work, len(parts))), kept


def _backward_part(
    layer: EndLayer,
    x: Tensor,
    kernel: Kernel,
    grad: Tensor,
    chunk: int,
    workspace: Workspace,
    input_grad: bool,
    kept: Tensor | None,
) -> tuple[Tensor | None, dict[str, Tensor]]:
    """``backward_step`` on one part of a layer, by the calling thread.

    Returns:
        ``dLoss/dX`` (or ``None``) and the sums of squared gradients of the stepped fields.
    """
    rows, width = x.shape
    outputs = grad.shape[1]
    scaled = kernel.inner * x if kernel.inner != 1.0 else x
    homogeneous = kernel.homogeneous_slope is not None
    steps = layer.steps
    contract = bool({"theta", "bias"} & set(steps)) or (homogeneous and "readout" in steps)
    slope_scale = kernel.outer * kernel.inner
    theta_all, readout_all = layer.values()
    bias_all = (
        layer.bias if layer.bias is None or kernel.inner == 1.0 else kernel.inner * layer.bias
    )
    # Q[p, (j, c)] = [X, 1][p, j] G[p, c] / M: Q.T @ D gives dL/dtheta and dL/db (and dL/dR if
    # homogeneous) in one product; 1/M is folded in here, a c into the readout weights
    augmented = torch.cat([x, x.new_ones(rows, 1)], dim=1) / layer.count
    mixed = (augmented[:, :, None] * grad[:, None, :]).reshape(rows, (width + 1) * outputs)
    mixed = mixed.T.contiguous()
    weights = readout_all * slope_scale  # (C', n)
    x_grad = paired = None
    if input_grad:  # dL/dX[p, j] = sum_c G[p, c] sum_k D[p, k] (a c R[c, k] / M) theta[k, j]
        x_grad = x.new_zeros(rows, outputs * width)
        paired = (weights[:, :, None] * theta_all[None, :, :] / layer.count).permute(1, 0, 2)
        paired = paired.reshape(layer.size, outputs * width)
    size = min(chunk, layer.size)
    values_space = workspace.flat("values", x, rows * size)
    separate = kernel.homogeneous_slope is None and kernel.value_slope is None
    slope_space = workspace.flat("slope", x, rows * size) if separate else None
    contracted_space = workspace.flat("contracted", x, mixed.shape[0] * size)
    # dL/d(readout field) = (a G.T @ core + e sum_p G) / M
    readout_shift = kernel.shift * grad.sum(0)[:, None] / layer.count
    readout_weight = kernel.outer / layer.count
    sums = {role: x.new_zeros(()) for role in steps}  # sums of squared gradients
    for atoms in _chunks(layer.size, chunk):
        n = atoms.stop - atoms.start
        theta = theta_all[atoms]
        bias = None if bias_all is None else bias_all[atoms]
        readout_grad: Tensor | None = None
        if kept is not None:  # core values from the forward pass
            values = kept[rows * atoms.start : rows * atoms.stop].view(rows, n)
        else:
            u = _preactivation(scaled, theta, bias, _buffer(values_space, rows, n))
        slope: Tensor | None = None
        if kernel.homogeneous_slope is not None:  # written over u, or over relu(u) > 0 <=> u > 0
            slope = kernel.homogeneous_slope(u if kept is None else values)
        else:
            if kept is None:
                if kernel.value_slope is None and (contract or input_grad):
                    assert slope_space is not None  # allocated for these kernels
                    slope = _buffer(slope_space, rows, n)
                values = kernel.core(u, slope)
            if "readout" in steps:
                if outputs == 1:
                    readout_grad = torch.addmv(
                        readout_shift[0], values.T, grad[:, 0], alpha=readout_weight
                    )[None, :]
                else:
                    readout_grad = torch.addmm(readout_shift, grad.T, values, alpha=readout_weight)
            if kernel.value_slope is not None and (contract or input_grad):
                slope = kernel.value_slope(values, values)  # in place: the values are used up
        if contract:
            assert slope is not None  # computed whenever contract
            contracted = _buffer(contracted_space, mixed.shape[0], n)
            torch.mm(mixed, slope, out=contracted)
            contracted = contracted.view(width + 1, outputs, n)
            if homogeneous and "readout" in steps:  # sum_p G D (X . theta + b) / M (c = 1)
                readout_grad = (contracted[:width] * theta.T[:, None, :]).sum(0)
                if bias is not None:
                    readout_grad.addcmul_(contracted[width], bias)
            if outputs == 1:
                summed = contracted[:, 0].mul(weights[0, atoms])  # (q + 1, n)
            else:
                summed = (contracted * weights[:, atoms]).sum(1)
            if "theta" in steps:
                sums["theta"] += torch.linalg.vecdot(summed[:width], summed[:width]).sum()
                layer.theta[atoms].sub_(summed[:width].T, alpha=steps["theta"])
            if "bias" in steps:
                assert layer.bias is not None  # "bias" is stepped only when there are biases
                sums["bias"] += torch.dot(summed[width], summed[width])
                layer.bias[atoms].sub_(summed[width], alpha=steps["bias"])
        if x_grad is not None:
            assert slope is not None and paired is not None  # computed whenever input_grad
            if paired.shape[1] == 1:
                x_grad[:, 0].addmv_(slope, paired[atoms, 0])
            else:
                x_grad.addmm_(slope, paired[atoms])
        if readout_grad is not None:
            sums["readout"] += torch.linalg.vecdot(readout_grad, readout_grad).sum()
            layer.readout[:, atoms].sub_(readout_grad, alpha=steps["readout"])
    squares = {layer.names[role]: total for role, total in sums.items()}
    if x_grad is None:
        return None, squares
    return (x_grad.view(rows, outputs, width) * grad[:, :, None]).sum(1), squares


def backward_step(
    layer: EndLayer,
    x: Tensor,
    kernel: Kernel,
    grad: Tensor,
    chunk: int,
    workspace: Workspace,
    input_grad: bool = False,
    squares: dict[str, Tensor] | None = None,
    kept: Tensor | None = None,
) -> Tensor | None:
    """Gradients of the loss with respect to the atoms' fields, and their Euler steps.

    Recomputes each chunk of atoms (or reads the kept values) with the fields as they were in
    ``forward_sum`` (the same parts), then steps ``f <- f - steps[f] * dLoss/df`` for every field
    named in ``layer.steps``.

    Args:
        layer: the atoms (stepped in place).
        x: the shared input ``X`` (P x q) of the forward pass.
        kernel: the activation ``phi``.
        grad: ``G = dLoss/dS`` (P x C').
        chunk: atoms per chunk.
        workspace: scratch memory and workers.
        input_grad: also return ``dLoss/dX`` (P x q), with the fields before the step.
        squares: if given, ``squares[name]`` accumulates the sum of squared gradients of each
            stepped field, by its name in ``layer.names``.
        kept: the core values kept by ``forward_sum`` for these fields (used up), or ``None``
            to recompute them.

    Returns:
        ``dLoss/dX`` if ``input_grad``, else ``None``.
    """
    rows = x.shape[0]
    parts = workspace.parts(layer.size, x)
    library = _fused(kernel, x)
    if library is not None:
        xt, fused_grad = workspace.padded(x), (workspace.padded(grad), grad.sum(0))
        x_grad, part_squares = _fused_backward(
            library, layer, len(parts), xt, kernel, fused_grad, workspace, input_grad, kept
        )
        results = [(None if x_grad is None else x_grad[:, :rows].T, part_squares)]
    else:

        def work(i: int, buffers: Workspace) -> tuple[Tensor | None, dict[str, Tensor]]:
            start, stop = parts[i]
            part_kept = None if kept is None else kept[rows * start : rows * stop]
            part = layer.part(start, stop)
            return _backward_part(part, x, kernel, grad, chunk, buffers, input_grad, part_kept)

        results = workspace.map(work, len(parts))
    if squares is not None:
        for _, part_squares in results:
            for name, total in part_squares.items():
                squares[name] = squares.get(name, 0.0) + total
    x_grads = [x_grad for x_grad, _ in results if x_grad is not None]
    return _added(x_grads) if x_grads else None
