"""The brute-force particle-limit solver S_M of docs/theory.md §B.4.

For the neuronal embedding with M atoms per hidden layer (uniform law on ``{1..M}``, weights an
iid ``M x M`` array drawn once), the multilayer mean-field limit of §B.2 *is* a width-M network
trained by population gradient flow with the §1.2 multipliers (Nguyen–Pham, Theorems 20–21). The
solver integrates that flow by explicit Euler with step ``h = lr``:

    w_i(k+1) = w_i(k) - h * E_Z[Grad_i(Z, .)],     t_k = k * h,

with ``Grad_i = n_{i-1} n_i dLoss/dw_i`` the normalized gradients of §1.1 and the expectation over
the population (one fixed batch) or over the minibatch fed at step k ("SGD-coupled" solver, §B.4).
One Euler step is therefore literally one full-batch SGD step of the width-M network with the
param groups of ``mflightning.param_groups`` (``rule="sgd"``); frozen layers stay fixed.
Its error against the true limit is O(M^{-1/2}) + O(h) (§B.4).

Other optimizers (§F): the solver takes the module's own optimizer callable, scheduler callable
and rule, and each step is one step of that optimizer on the width-M network's param groups
(momentum buffers and Adam moments per particle, weight decay in physical units), followed by
one scheduler step; the clock sums the scheduled base steps ``eps_k`` (``MeanFieldClock``).
"""

from __future__ import annotations

import contextlib
import copy
import itertools
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from mflightning.guards import DivergenceError, GradientNorms, divergence_message
from mflightning.limit.coupling import Coupling, Method, couple
from mflightning.losses import LossName, check_loss_name, check_loss_outputs, mean_field_loss
from mflightning.nn import check_positive_finite
from mflightning.optim import (
    MeanFieldClock,
    OptimizerCallable,
    ScheduledOptimizer,
    SchedulerCallable,
    UpdateFactories,
    describe_update,
)
from mflightning.scaling import Rule, mean_field_layers, param_groups, readout_outputs, time_step
from mflightning.stack import MeanFieldStack

Batch = tuple[Tensor, Tensor]
SOLVER_DTYPES: dict[str, torch.dtype] = {"float64": torch.float64, "float32": torch.float32}
"""The particle dtypes a limit solver accepts, by name."""


@contextlib.contextmanager
def tf32_allowed(enabled: bool) -> Iterator[None]:
    """Set TF32 for CUDA matmuls and cuDNN to ``enabled`` inside the block (§E.2 item 10).

    The previous flags are restored on exit.
    """
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    previous = (matmul.allow_tf32, cudnn.allow_tf32)
    matmul.allow_tf32 = cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        matmul.allow_tf32, cudnn.allow_tf32 = previous


def _check_network(network: object) -> nn.Module:
    if not isinstance(network, nn.Module) or not mean_field_layers(network):
        raise ValueError(
            "`network` must be a torch module built from mean-field layers (a MeanFieldMLP, or an "
            f"nn.Sequential of MeanFieldLinear/MeanFieldConv layers and activations), got "
            f"{type(network).__name__}."
        )
    mf_params = {id(p) for _, layer in mean_field_layers(network) for p in layer.parameters()}
    foreign = [n for n, p in network.named_parameters() if id(p) not in mf_params]
    if foreign:
        raise ValueError(
            f"`network` has parameters outside mean-field layers {foreign[:5]}: their limit is "
            "undefined (no §1.2 multiplier). Use only MeanField* layers and parameter-free modules."
        )
    return network


def check_float_input(x: object) -> None:
    """Refuse inputs that are not a floating tensor, naming the type or dtype and the fix.

    Raises:
        ValueError: e.g. ``int64`` inputs: convert them with ``x.float()``.
    """
    if not isinstance(x, Tensor):
        raise ValueError(f"`x` must be a floating tensor, got {type(x).__name__}.")
    if not x.is_floating_point():
        raise ValueError(
            f"`x` has dtype {x.dtype}, but the limit takes floating inputs; convert them with "
            "x.float() (in the data module, so the networks get the same)."
        )


def check_solver_dtype(dtype: torch.dtype | str, name: str = "dtype") -> torch.dtype:
    """The solver dtype ``dtype`` (a torch dtype or its name), refusing all but float64/float32.

    Half precisions (float16, bfloat16) round away the O(lr) Euler updates of O(1) particles
    (§E.2); the sweep's ``solver_dtype`` and the solvers' ``dtype`` share this check.

    Raises:
        ValueError: naming ``name``, the value and the accepted dtypes.
    """
    resolved = SOLVER_DTYPES.get(dtype) if isinstance(dtype, str) else dtype
    if resolved is None or resolved not in SOLVER_DTYPES.values():
        raise ValueError(
            f"`{name}` must be float64 (default) or float32, got {dtype!r}: half precisions "
            "round away the O(lr) Euler updates of O(1) particles (§E.2). Use float64."
        )
    return resolved


def check_solver_args(lr: float, loss: str, dtype: torch.dtype) -> None:
    """Validate the ``lr``, ``loss`` and ``dtype`` arguments shared by the limit solvers.

    Raises:
        ValueError: naming the bad argument.
    """
    check_positive_finite("lr", lr, "Pass the Euler step h, e.g. lr=0.1.")
    check_loss_name(loss)
    check_solver_dtype(dtype)


def _saved_tensors(state: Any, prefix: str = "") -> Iterator[tuple[str, Tensor]]:
    """``(dotted key, tensor)`` for every tensor in a nested dict of saved state."""
    if isinstance(state, Tensor):
        yield prefix, state
    elif isinstance(state, dict):
        for key, value in state.items():
            yield from _saved_tensors(value, f"{prefix}.{key}" if prefix else str(key))


def _finite(tensor: Tensor) -> bool:
    """Whether a tensor holds no NaN or infinite value (integer tensors always do)."""
    return not tensor.is_floating_point() or bool(torch.isfinite(tensor).all())


def load_clock(clock: MeanFieldClock, state_dict: dict[str, Any]) -> None:
    """Restore a solver's clock from its state (a state saved before clocks: ``steps`` steps)."""
    if "clock" in state_dict:
        clock.load_state_dict(state_dict["clock"])
    else:
        clock.reset(int(state_dict["steps"]))


class EulerSolver(ABC):
    """Shared driver of the explicit-Euler limit solvers: clock, batch checks, ``run``.

    Subclasses set ``lr``, ``loss``, ``dtype``, ``device``, ``update`` (``describe_update``)
    and ``_clock`` (ticked once per step) and implement ``_euler_step`` (one step on a prepared
    batch) and ``__call__``.
    """

    lr: float
    loss: LossName
    dtype: torch.dtype
    device: torch.device
    update: str
    _clock: MeanFieldClock
    _progress_label = "limit solver"

    @property
    def steps(self) -> int:
        """Number of Euler steps taken."""
        return self._clock.steps

    @property
    def time(self) -> float:
        """Physical time ``t = sum_k eps_k`` (``k * lr`` without a scheduler; §1.1, §F.3)."""
        return self._clock.time

    @abstractmethod
    def _euler_step(self, x: Tensor, y: Tensor) -> float:
        """One Euler step on a prepared batch; returns the loss before the update."""

    @abstractmethod
    def __call__(self, x: Tensor) -> Tensor:
        """The limit output ``yhat(t, x)`` at the current time."""

    def _check_device(self, name: str, tensor: Tensor) -> None:
        """Refuse a tensor on another accelerator (CPU tensors are moved to the solver)."""
        if tensor.device != self.device and tensor.device.type != "cpu":
            raise ValueError(
                f"`{name}` is on {tensor.device} but the solver's particles are on "
                f"{self.device}; move it with .to({str(self.device)!r}) (or pass a CPU tensor)."
            )

    def _prepare(self, x: Tensor, y: Tensor) -> Batch:
        """Validate a batch and move it to the solver's device/dtype."""
        check_float_input(x)
        if x.dim() < 2:
            raise ValueError(f"`x` must have shape (batch, features...), got {tuple(x.shape)}.")
        if not isinstance(y, Tensor) or y.dim() < 1 or y.shape[0] != x.shape[0]:
            shape = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
            raise ValueError(
                f"`y` must be a tensor with one target per row of `x` (batch {x.shape[0]}), "
                f"got {shape}."
            )
        self._check_device("x", x)
        self._check_device("y", y)
        if not torch.isfinite(x).all():
            raise ValueError("`x` contains NaN or infinite values; clean the inputs.")
        if y.is_floating_point() and not torch.isfinite(y).all():
            raise ValueError("`y` contains NaN or infinite values; clean the targets.")
        x = x.to(device=self.device, dtype=self.dtype)
        y = y.to(self.device, self.dtype) if y.is_floating_point() else y.to(self.device)
        return x, y

    def step(self, x: Tensor, y: Tensor) -> float:
        """One Euler step of the population gradient flow on the batch ``(x, y)`` (§B.4).

        ``w <- w - lr * mean_z Grad(z)`` for every trainable weight or field; for the particle
        solver one full-batch SGD step with ``param_groups(network, lr, rule="sgd")``.

        Args:
            x: inputs ``(batch, ...)``; converted to the solver's dtype and device.
            y: targets, one per row of ``x``.

        Returns:
            The loss at the particles *before* the update.

        Raises:
            ValueError: mismatched shapes or non-finite values.
        """
        return self._euler_step(*self._prepare(x, y))

    def run(
        self, data: Batch | Iterable[Sequence[Tensor]], steps: int, progress: bool = True
    ) -> list[float]:
        """Take ``steps`` Euler steps.

        Args:
            data: a ``(x, y)`` tuple of tensors — the population, used at every step — or an
                iterable of ``(x, y)`` batches (e.g. a DataLoader), re-iterated when exhausted, so
                that the solver sees the same minibatch sequence as a network (§B.4 option b).
            steps: number of steps (>= 0).
            progress: show a tqdm progress bar.

        Returns:
            The loss before each step.

        Raises:
            ValueError: bad ``steps`` or ``data``.
        """
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"`steps` must be a non-negative integer, got {steps!r}.")
        if isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], Tensor):
            batches: Iterator[Batch] = itertools.repeat(self._prepare(*data))
        elif isinstance(data, Iterable):
            batches = (self._prepare(*batch) for batch in self._cycle(data))
        else:
            raise ValueError(
                "`data` must be an (x, y) tuple of tensors or an iterable of (x, y) batches, got "
                f"{type(data).__name__}."
            )
        losses = []
        for _ in tqdm(range(steps), desc=self._progress_label, disable=not progress):
            losses.append(self._euler_step(*next(batches)))
        return losses

    @staticmethod
    def _cycle(data: Iterable[Sequence[Tensor]]) -> Iterator[Sequence[Tensor]]:
        """Iterate ``data`` forever, calling ``iter`` again per pass (a DataLoader reshuffles)."""
        while True:
            empty = True
            for batch in data:
                empty = False
                yield batch
            if empty:
                raise ValueError("`data` yielded no batches.")

    def _check_saved(self, state_dict: dict[str, Any]) -> None:
        """Refuse a ``state_dict`` that is damaged or saved with another ``lr`` or ``loss``.

        Damaged: a missing key, a step count that is not a non-negative integer (its time would
        be negative), or NaN/infinite values in a saved tensor.
        """
        missing = [key for key in ("lr", "loss", "steps") if key not in state_dict]
        if missing:
            raise ValueError(
                f"`state_dict` lacks {missing}: it is not a solver state; pass what the solver's "
                "state_dict() returned."
            )
        steps = state_dict["steps"]
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(
                f"`state_dict` has steps={steps!r}, but a solver's step count is a non-negative "
                "integer: the saved state is damaged; pass an intact state_dict() or start a "
                "fresh solver."
            )
        bad = [name for name, value in _saved_tensors(state_dict) if not _finite(value)]
        if bad:
            raise ValueError(
                f"`state_dict` holds NaN or infinite values in {bad[:5]}: the saved state is "
                "damaged (or was saved after a divergence); pass an intact state_dict() or start "
                "a fresh solver."
            )
        for key in ("lr", "loss", "update"):
            if key in state_dict and state_dict[key] != getattr(self, key):
                raise ValueError(
                    f"`state_dict` was saved with {key}={state_dict[key]!r} but this solver has "
                    f"{key}={getattr(self, key)!r}; build the solver with the saved value."
                )


class ParticleLimitSolver(EulerSolver):
    """Brute-force particle solver of the mean-field limit (docs/theory.md §B.4, equations §B.2).

    The given width-M network is deep-copied into ``dtype``/``device``: its neurons are the M
    particles (atoms) of the neuronal embedding. Each ``step`` is one explicit-Euler step
    ``w <- w - lr * Grad`` of the population gradient flow, i.e. one full-batch SGD step with the
    §1.2 multipliers; physical time advances by ``lr`` (§1.1).

    Supported networks: any module whose parameters all live in mean-field layers — a
    ``MeanFieldMLP`` or ``MeanFieldConvNet`` (stepping and
    coupling, ``couple``) or an
    ``nn.Sequential`` of mean-field linear/conv layers and parameter-free activations (stepping
    only; coupling needs ``with_widths``).

    Args:
        network: the width-M mean-field network holding the initial particles (not modified).
        lr: Euler step ``h = eps`` (> 0); the solver time after k steps is ``k * lr``.
        loss: loss convention of ``mflightning.losses.mean_field_loss``
            (``"mse"``, ``"half_mse"`` or ``"cross_entropy"``).
        dtype: floating dtype of the particles (float64 by default, §E.2).
        device: device of the particles (default: that of ``network``).
        allow_tf32: allow TF32 matmuls during steps and evaluations (off by default, §E.2 item 10).
        optimizer: the optimizer callable of the networks (``MeanFieldModule.optimizer_factory``),
            applied to ``param_groups(network, lr, rule=rule)`` (§F).
        scheduler: their lr scheduler callable (``None``: constant steps), stepped after every
            step.
        rule: ``"sgd"`` or ``"adam"``, as the module's.

    Raises:
        ValueError: a bad ``network``, ``lr``, ``loss``, ``dtype``, an optimizer of the other
            rule, or a scheduler without a limit (``optim.schedule_factor``).
    """

    _progress_label = "particle limit"

    def __init__(
        self,
        network: nn.Module,
        lr: float,
        loss: LossName = "mse",
        dtype: torch.dtype = torch.float64,
        device: torch.device | str | None = None,
        allow_tf32: bool = False,
        *,
        optimizer: OptimizerCallable = torch.optim.SGD,
        scheduler: SchedulerCallable | None = None,
        rule: Rule = "sgd",
    ) -> None:
        _check_network(network)
        check_solver_args(lr, loss, dtype)
        check_loss_outputs(loss, readout_outputs(network))
        self.lr = float(lr)
        self.loss: LossName = loss
        self.dtype = dtype
        self.allow_tf32 = bool(allow_tf32)
        self._network = copy.deepcopy(network).to(device=device, dtype=dtype)
        self.device = next(self._network.parameters()).device
        groups = param_groups(self._network, self.lr, rule=rule)
        self.update_factories = UpdateFactories(optimizer=optimizer, scheduler=scheduler, rule=rule)
        self._update = ScheduledOptimizer(optimizer, scheduler, groups)
        self._optimizer = self._update.optimizer
        self.update = describe_update(optimizer, scheduler)
        self._clock = MeanFieldClock(time_step(self._network, self.lr))

    @property
    def network(self) -> nn.Module:
        """The particles: the width-M network at the current solver time."""
        return self._network

    def _euler_step(self, x: Tensor, y: Tensor) -> float:
        """One optimizer step on a prepared batch; returns the loss before the update.

        Raises:
            DivergenceError: the loss is not finite (the particles are left as they were).
        """
        with tf32_allowed(self.allow_tf32):
            loss = mean_field_loss(self.loss, self._network(x), y)
            if not torch.isfinite(loss):
                what = f"the loss is {loss.item()}"
                sizes = GradientNorms.measure(self._optimizer).update_sizes()  # last step's
                message = divergence_message("limit solver", what, self.steps, self.time, sizes)
                raise DivergenceError(message)
            self._optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self._clock.tick(self._optimizer)  # with this step's scheduled lrs
            self._update.step()
        return loss.item()

    @torch.no_grad()
    def __call__(self, x: Tensor) -> Tensor:
        """The limit output ``yhat(t, x)`` at the current time, in the solver's dtype."""
        check_float_input(x)
        self._check_device("x", x)
        with tf32_allowed(self.allow_tf32):
            return self._network(x.to(device=self.device, dtype=self.dtype))

    def couple(
        self,
        widths: Sequence[int],
        generator: torch.Generator | None = None,
        method: Method = "subsample",
        dtype: torch.dtype | None = None,
    ) -> tuple[MeanFieldStack, Coupling]:
        """A width-``widths`` network whose neurons are sampled particles (§B.4).

        See ``mflightning.limit.coupling.couple`` for the arguments; couple at any time
        (typically t = 0, before ``step``), then train the small network alongside.
        """
        return couple(self, widths, generator=generator, method=method, dtype=dtype)

    def state_dict(self) -> dict[str, Any]:
        """Particles, clock, optimizer and scheduler states, ``lr``, ``loss`` and the update.

        Plain tensors/ints/floats/strings: loadable with ``torch.load(..., weights_only=True)``.
        """
        return {
            "particles": self._network.state_dict(),
            "steps": self.steps,
            "clock": self._clock.state_dict(),
            "optimizer": self._update.state_dict(),
            "lr": self.lr,
            "loss": self.loss,
            "update": self.update,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume exactly from ``state_dict`` (same architecture, ``lr``, ``loss`` and update).

        Raises:
            ValueError: the state was saved with another ``lr``, ``loss`` or optimizer, or is
                damaged (NaN/infinite particles, a negative step count).
        """
        self._check_saved(state_dict)
        self._network.load_state_dict(state_dict["particles"])
        load_clock(self._clock, state_dict)
        if "optimizer" in state_dict:
            self._update.load_state_dict(state_dict["optimizer"])
