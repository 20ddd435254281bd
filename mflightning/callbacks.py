"""``LimitTracker``: advance the mean-field limit in lockstep with training and log the gaps.

The callback owns a limit solver (given, or built with M particles or atoms from the module's
network: ``limit="auto"`` takes the exact ``ReducedLimitSolver`` for deep iid MLPs and the
``ParticleLimitSolver`` otherwise, ``mflightning.limit.choice``), optionally couples the module's
network to it at fit start (§B.4: subsampled particles, or ideal particles of the module's own
initial weights for the reduced solver), takes one solver step per optimizer step with the
module's own optimizer, scheduler and rule (the limit of the training that runs, §F; under
gradient accumulation on the batches of that step together), and every ``every_n_steps`` logs
(docs/theory.md §C)

* ``limit/output_gap``: RMS over the probe inputs of ``yhat_N(x) - yhat_inf(x)`` (§C.1);
* ``limit/relative_output_gap``: the output gap over the output size; the first time it exceeds
  1/2 (``LEFT_LIMIT_THRESHOLD``) the tracker warns once that the network has left the limit;
* ``limit/loss_gap``: ``|L_N - L_inf|`` on the probe targets, or on the population (§C.2);
* ``limit/dev/<layer>``: RMS coupled deviation of each layer's weights (§C.3, coupled runs only);
* ``limit/time``: the solver's physical time, equal to the module's ``mf_time``.

Its ``state_dict`` holds the solver state, the step count and the coupling indices, so a run
resumed from a checkpoint continues the same limit trajectory (the reduced solver's ideal
particles are not saved: a resumed run logs its output and loss gaps only).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal, get_args

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from mflightning.guards import DivergenceError, training_divergence
from mflightning.limit import Coupling, ParticleLimitSolver, ReducedLimitSolver
from mflightning.limit.choice import (
    LEFT_LIMIT_THRESHOLD,
    LIMIT_KINDS,
    AnyCoupling,
    LimitSolver,
    build_solver,
    has_degenerate_exact_limit,
    resolve_limit,
)
from mflightning.limit.snapshot import LimitSnapshot, gaps_to_limit, take_snapshot
from mflightning.mlp import MeanFieldMLP
from mflightning.module import MeanFieldModule
from mflightning.nn import check_positive_int
from mflightning.optim import describe_update
from mflightning.stack import MeanFieldStack

DataMode = Literal["shared_batches", "population"]
DATA_MODES: tuple[str, ...] = get_args(DataMode)
Probe = Tensor | tuple[Tensor, Tensor]


def log_gaps(
    trainer: pl.Trainer, module: MeanFieldModule, compute: Callable[[], dict[str, float]]
) -> dict[str, float]:
    """Compute gaps with the network in eval mode, add ``mf_time``, send them to every logger.

    Returns:
        The logged values, at step ``trainer.global_step``.
    """
    network = module.network
    was_training = network.training
    network.eval()
    try:
        metrics = compute() | {"mf_time": module.mf_time}
    except DivergenceError as error:
        raise training_divergence(trainer, module, str(error)) from error
    finally:
        network.train(was_training)
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step)
    return metrics


def _architecture(network: MeanFieldStack) -> dict[str, Any]:
    """Everything but the widths: what a solver and a network must share.

    The widths are under the network's ``width_argument``: ``widths`` for a ``MeanFieldMLP``,
    ``channels`` for a ``MeanFieldConvNet`` (docs/theory.md §E.3 item 18).
    """
    config = dict(network.to_config()["init_args"])
    config.pop(network.width_argument)
    return config


def check_trainer_settings(trainer: pl.Trainer) -> None:
    """Refuse trainer settings whose training has no mean-field limit to track (§F.6).

    Raises:
        ValueError: gradient clipping (the global norm couples every weight of every width
            differently: no width-independent limit), naming the setting and the fix.
    """
    if trainer.gradient_clip_val:
        raise ValueError(
            f"Trainer(gradient_clip_val={trainer.gradient_clip_val}) clips the raw gradients, "
            "whose norm shrinks like N^-1/2 under the mean-field parametrization, so the same "
            "clip acts on narrow networks and not on wide ones: the training has no limit "
            "common to all widths to track (docs/theory.md §F.6); remove gradient_clip_val "
            "(lower the lr instead)."
        )


class LimitTracker(Callback):
    """Tracks the distance of a ``MeanFieldModule`` to its mean-field limit while it trains.

    Args:
        solver: the limit solver (``ParticleLimitSolver`` or ``ReducedLimitSolver``); its ``lr``
            must equal the module's canonical step (``module.time_step``), its ``loss`` the
            module's loss, and its update (``optimizer``, ``scheduler``, ``rule``) the module's.
            ``None`` builds one at fit start (see ``limit``) in ``dtype``.
        particles: M when ``solver`` is ``None``: neurons per hidden layer of a particle solver
            (use M >= 8 N, §B.4), atoms per end layer of a reduced one.
        limit: which solver to build when ``solver`` is ``None``: ``"auto"`` (the exact reduced
            limit for the deep iid MLPs it supports, particles otherwise), ``"particles"`` or
            ``"reduced"`` (a network the reduced solver cannot integrate is refused at fit
            start, before any step, naming why).
        every_n_steps: log the gaps every this many optimizer steps (and at step 0).
        probe: probe inputs ``x`` for the output gap, or ``(x, y)`` to also get the loss gap.
        data: ``"shared_batches"`` (the solver steps on the module's own batches: the SGD-coupled
            limit) or ``"population"`` (the solver steps on ``population`` every step).
        population: ``(x, y)``, the data set of the population limit (needed for
            ``data="population"``; also used for the loss gap when ``probe`` has no targets).
        couple: couple the module's network at fit start and log coupled deviations: its
            weights are overwritten with a subsample of the particles (particle solver) or kept
            and given ideal particles (reduced solver); ``False`` tracks output and loss gaps.
            A module whose weights were already trained (``module.clock.steps > 0``: an
            earlier fit, a loaded checkpoint) is refused at fit start unless ``couple=False``.
        seed: seed of the coupling index sets (and of the particles when they are built here).
        dtype: dtype of a solver built here (float64 by default, §E.2).

    Example::

        tracker = LimitTracker(particles=2048, every_n_steps=10, probe=x_probe)
        Trainer(callbacks=[tracker], max_steps=100).fit(module, datamodule)
    """

    def __init__(
        self,
        solver: LimitSolver | None = None,
        *,
        particles: int | None = None,
        limit: str = "auto",
        every_n_steps: int = 10,
        probe: Probe | None = None,
        data: DataMode = "shared_batches",
        population: tuple[Tensor, Tensor] | None = None,
        couple: bool = True,
        seed: int = 0,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        super().__init__()
        if solver is None and particles is None:
            raise ValueError("give a `solver`, or `particles` (M) to build one at fit start.")
        if solver is not None and not isinstance(solver, (ParticleLimitSolver, ReducedLimitSolver)):
            raise ValueError(
                "`solver` must be a ParticleLimitSolver or a ReducedLimitSolver, got "
                f"{type(solver).__name__}."
            )
        if limit not in LIMIT_KINDS:
            raise ValueError(f"unknown `limit` {limit!r}; choose one of {', '.join(LIMIT_KINDS)}.")
        if particles is not None:
            check_positive_int("particles", particles)
        check_positive_int("every_n_steps", every_n_steps)
        if data not in DATA_MODES:
            raise ValueError(f"unknown `data` {data!r}; choose one of {DATA_MODES}.")
        if data == "population" and population is None:
            raise ValueError("`population` is required with data='population': pass (x, y).")
        probe_x = probe[0] if isinstance(probe, tuple) else probe
        if probe_x is None or not isinstance(probe_x, Tensor) or probe_x.dim() < 2:
            raise ValueError(
                "`probe` must be inputs x of shape (n, features...) or a tuple (x, y)."
            )
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"`dtype` must be a floating torch dtype, got {dtype!r}.")
        self.solver = solver
        self.particles = particles
        self.limit = limit
        self.every_n_steps = every_n_steps
        self.probe = probe
        self.data = data
        self.population = population
        self.couple = couple
        self.seed = seed
        self.dtype = dtype
        self.coupling: AnyCoupling | None = None
        self.last_gaps: dict[str, float] = {}
        self.left_limit_at: dict[str, float] | None = None  # {"step", "mf_time", "relative_gap"}
        self._restored = False
        self._pending: list[tuple[Tensor, Tensor]] = []  # batches of an accumulating step

    @property
    def state_key(self) -> str:
        """Lets several trackers (e.g. different M) live on one Trainer."""
        return f"LimitTracker[data={self.data}, couple={self.couple}, seed={self.seed}]"

    # --- set-up -------------------------------------------------------------------------------

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Build the solver if needed and check it matches the module (before any restore)."""
        if stage != "fit":
            return
        if not isinstance(pl_module, MeanFieldModule):
            raise ValueError("LimitTracker tracks a MeanFieldModule; wrap the network in one.")
        network = pl_module.network
        if not isinstance(network, MeanFieldStack):
            raise ValueError(
                "LimitTracker needs `module.network` to be a MeanFieldMLP or MeanFieldConvNet."
            )
        check_trainer_settings(trainer)
        if self.solver is None:
            assert self.particles is not None
            self.solver = build_solver(
                network,
                resolve_limit(self.limit, network, pl_module.update_factories),
                self.particles,
                lr=pl_module.time_step,
                loss=pl_module.loss_name,
                dtype=self.dtype,
                device=pl_module.device,
                seed=self.seed,
                **pl_module.update_factories,
            )
        self._check_solver(self.solver, pl_module, network)
        network.check_input(self._probe_inputs().to(next(network.parameters())), "probe")

    @staticmethod
    def _check_solver(
        solver: LimitSolver, module: MeanFieldModule, network: MeanFieldStack
    ) -> None:
        if not isinstance(solver.network, MeanFieldStack):
            raise ValueError("the `solver` must hold a network of the same class as the module's.")
        if _architecture(solver.network) != _architecture(network):
            raise ValueError(
                "the `solver` network's architecture (in/out features, activations, laws, "
                "biases, frozen layers) differs from the module's; build it with "
                "module.network.with_widths([M, ...])."
            )
        if abs(solver.lr - module.time_step) > 1e-12 * module.time_step:
            raise ValueError(
                f"the `solver` steps with lr={solver.lr} but the module's time step is "
                f"{module.time_step} (preset {module.preset}); the two clocks would drift apart."
            )
        if solver.loss != module.loss_name:
            raise ValueError(
                f"the `solver` loss {solver.loss!r} differs from the module's {module.loss_name!r}."
            )
        update = describe_update(module.optimizer_factory, module.scheduler_factory)
        if solver.update != update or solver.update_factories["rule"] != module.rule:
            raise ValueError(
                f"the `solver` steps with {solver.update} (rule "
                f"{solver.update_factories['rule']!r}) but the module trains with {update} (rule "
                f"{module.rule!r}): the limit would not be that of the training (§F); build the "
                "solver with optimizer=module.optimizer_factory, "
                "scheduler=module.scheduler_factory, rule=module.rule."
            )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Couple the module's network to the particles, unless resuming from a checkpoint."""
        if self._restored or not self.couple:
            return
        assert self.solver is not None and isinstance(pl_module, MeanFieldModule)
        if self.solver.steps != trainer.global_step:
            raise ValueError(
                f"the `solver` is at step {self.solver.steps} but training starts at step "
                f"{trainer.global_step}; couple at the start or resume both from one checkpoint."
            )
        self._refuse_trained(pl_module)
        network = pl_module.network
        assert isinstance(network, MeanFieldStack)
        if isinstance(self.solver, ReducedLimitSolver):  # ideal particles of the module's own init
            assert isinstance(network, MeanFieldMLP)
            _, self.coupling = self.solver.couple(network.widths, network=network)
            return
        generator = torch.Generator().manual_seed(self.seed)
        small, self.coupling = self.solver.couple(network.widths, generator=generator)
        with torch.no_grad():
            for target, source in zip(network.parameters(), small.parameters(), strict=True):
                target.copy_(source)

    @staticmethod
    def _refuse_trained(module: MeanFieldModule) -> None:
        """Refuse to couple a module whose weights have already been trained (§B.4).

        Coupling starts the network and the limit together at ``mf_time`` 0 from the initial
        law: the particle solver overwrites the weights with a subsample of its particles, the
        reduced one takes them as initial weights. The module's clock counts the optimizer steps
        its weights have taken (a previous fit, or a loaded checkpoint); this runs before
        ``MeanFieldModule.on_fit_start`` resets it for the new fit.

        Raises:
            ValueError: ``module.clock.steps > 0``, naming ``couple=False`` and a fresh module.
        """
        if module.clock.steps == 0:
            return
        raise ValueError(
            f"LimitTracker(couple=True) would overwrite the weights of a module already trained "
            f"for {module.clock.steps} steps (mf_time {module.mf_time:g}): coupling starts the "
            "network from the limit's initial law (docs/theory.md §B.4); pass couple=False to "
            "keep the trained weights (output and loss gaps to a limit that starts now), or "
            "attach the tracker to a freshly built module."
        )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Log the gaps at the starting step."""
        self._log_gaps(trainer, pl_module)

    # --- lockstep -----------------------------------------------------------------------------

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        """One solver step per optimizer step; log the gaps every ``every_n_steps``.

        Under gradient accumulation the batches are kept until the optimizer steps, and the
        solver steps once on all of them (the mean of equal batches' mean losses is the mean
        loss of their union).
        """
        assert self.solver is not None
        population = self.data == "population"
        if not population:
            self._pending.append(self._global_batch(pl_module, batch))
        if trainer.global_step == self.solver.steps:  # accumulating: no optimizer step yet
            return
        if population:
            assert self.population is not None
            x, y = self.population
        else:
            self._check_window(trainer)
            xs, ys = zip(*self._pending, strict=True)
            x, y = (xs[0], ys[0]) if len(xs) == 1 else (torch.cat(xs), torch.cat(ys))
        self._pending = []
        self.solver.step(x, y)
        if self.solver.steps != trainer.global_step:
            raise RuntimeError(
                f"the solver ({self.solver.steps} steps) fell out of step with training "
                f"({trainer.global_step}); was a batch skipped by an optimizer-step condition?"
            )
        if trainer.global_step % self.every_n_steps == 0:
            self._log_gaps(trainer, pl_module)

    def _check_window(self, trainer: pl.Trainer) -> None:
        """Refuse an accumulation window the limit's step cannot reproduce (§F.6).

        The limit steps on the union of the window's batches; Lightning divides each batch's
        loss by ``accumulate_grad_batches``. The two agree for full windows of equal batches.

        Raises:
            ValueError: a shorter window (an epoch length the count does not divide) or batches
                of different sizes, naming the count and the fix.
        """
        k = trainer.accumulate_grad_batches
        sizes = sorted({len(x) for x, _ in self._pending})
        if k > 1 and (len(self._pending) != k or len(sizes) > 1):
            raise ValueError(
                f"Trainer(accumulate_grad_batches={k}) stepped on {len(self._pending)} batches of "
                f"sizes {sizes}: the limit can follow full windows of equal batches only; choose "
                f"a batch size that divides the training set into a multiple of {k} batches."
            )

    @staticmethod
    def _global_batch(pl_module: pl.LightningModule, batch: Any) -> tuple[Tensor, Tensor]:
        """The batch of this optimizer step across all processes (DDP averages their gradients)."""
        x, y = batch
        if pl_module.trainer.world_size == 1:
            return x, y
        gathered_x, gathered_y = pl_module.all_gather((x, y))
        return gathered_x.flatten(0, 1), gathered_y.flatten(0, 1)

    # --- metrics ------------------------------------------------------------------------------

    def _loss_data(self) -> tuple[Tensor, Tensor] | None:
        """Where the loss gap is measured: the probe's targets, else the population, else none."""
        return self.probe if isinstance(self.probe, tuple) else self.population

    def _probe_inputs(self) -> Tensor:
        probe = self.probe[0] if isinstance(self.probe, tuple) else self.probe
        assert probe is not None
        return probe

    def gaps(self, pl_module: MeanFieldModule) -> dict[str, float]:
        """The current gaps: ``limit/output_gap``, ``limit/loss_gap``, ``limit/dev/<layer>``."""
        assert self.solver is not None
        probe, loss_data = self._probe_inputs(), self._loss_data()
        snapshot = take_snapshot(self.solver, probe, loss_data, self.coupling)
        return gaps_to_limit(pl_module.network, pl_module.loss_name, snapshot, probe, loss_data)

    def _log_gaps(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert isinstance(pl_module, MeanFieldModule)
        self.last_gaps = log_gaps(trainer, pl_module, lambda: self.gaps(pl_module))
        relative = self.last_gaps["limit/relative_output_gap"]
        if self.left_limit_at is None and relative > LEFT_LIMIT_THRESHOLD:
            step, mf_time = trainer.global_step, self.last_gaps["mf_time"]
            self.left_limit_at = {"step": step, "mf_time": mf_time, "relative_gap": relative}
            rank_zero_warn(
                f"the network has left its mean-field limit at step {step} (mf_time {mf_time:g}): "
                f"its output differs from the limit's by {relative:.2f} of the output size "
                f"(threshold {LEFT_LIMIT_THRESHOLD}); from here on the gaps measure finite-width "
                "effects, not the distance to the limit (docs/theory.md §D.4)."
                + self._reference_caveat()
            )

    def _reference_caveat(self) -> str:
        """A note when the reference is a particle solver of a degenerate (deep iid) limit."""
        if isinstance(self.solver, ParticleLimitSolver) and has_degenerate_exact_limit(
            self.solver.network
        ):
            return (
                " The reference is a finite-M particle solver of a deep iid network, which can "
                "itself leave the exact limit: track with limit='reduced' to tell the two apart."
            )
        return ""

    # --- checkpointing ------------------------------------------------------------------------

    @override
    def state_dict(self) -> dict[str, Any]:
        """Solver state and coupling indices (plain tensors: loads with ``weights_only=True``)."""
        assert self.solver is not None
        coupling = self.coupling
        indices = [s.cpu() for s in coupling.indices] if isinstance(coupling, Coupling) else []
        return {"solver": self.solver.state_dict(), "indices": indices}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the solver trajectory and the coupling, so fit resumes the same limit."""
        assert self.solver is not None, "setup() builds the solver before a restore"
        self.solver.load_state_dict(state_dict["solver"])
        if isinstance(self.solver, ReducedLimitSolver) and self.couple:
            rank_zero_warn(
                "LimitTracker resumes the reduced limit without its ideal particles (they are "
                "not saved): the resumed run logs output and loss gaps, not coupled deviations."
            )
        if state_dict["indices"]:
            assert isinstance(self.solver, ParticleLimitSolver)  # only it saves indices
            indices = [s.to(self.solver.device) for s in state_dict["indices"]]
            self.coupling = Coupling(self.solver, indices, "subsample")
        self._restored = True


class RecordedLimitTracker(Callback):
    """Logs the gaps of a run to a limit trajectory recorded beforehand (used by width sweeps).

    One solver pass records ``LimitSnapshot`` s at the logging
    steps; every run of a sweep then replays them instead of stepping its own solver. The network
    must already start on its coupled particles, and train on the same batches as the recording.

    Args:
        snapshots: ``{global step: snapshot}``; the gaps are logged at exactly these steps.
        probe: the probe inputs the snapshots were taken on.
        loss_data: the ``(x, y)`` the snapshots' losses were measured on, if any.

    Attributes:
        history: every logged dict of gaps, in order.
        train_losses: the training loss of every step.
    """

    def __init__(
        self,
        snapshots: Mapping[int, LimitSnapshot],
        probe: Tensor,
        loss_data: tuple[Tensor, Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.snapshots = snapshots
        self.probe = probe
        self.loss_data = loss_data
        self.history: list[dict[str, float]] = []
        self.train_losses: list[float] = []
        self._batch_losses: list[float] = []  # of the optimizer step being accumulated

    def _log_if_recorded(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        snapshot = self.snapshots.get(trainer.global_step)
        if snapshot is None:
            return
        assert isinstance(pl_module, MeanFieldModule)
        loss = pl_module.loss_name

        def compute() -> dict[str, float]:
            return gaps_to_limit(pl_module.network, loss, snapshot, self.probe, self.loss_data)

        self.history.append({"step": trainer.global_step} | log_gaps(trainer, pl_module, compute))

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Log the gaps at step 0."""
        self._log_if_recorded(trainer, pl_module)

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        """Record the step's loss; log the gaps where a snapshot was recorded.

        Under gradient accumulation the loss of an optimizer step is the mean of its batches'
        losses (Lightning hands each divided by their number: their sum), recorded (and the gaps
        logged) once the optimizer has stepped.
        """
        loss = outputs["loss"] if isinstance(outputs, Mapping) else outputs
        self._batch_losses.append(float(loss))
        if trainer.global_step == len(self.train_losses):  # accumulating: no step yet
            return
        self.train_losses.append(sum(self._batch_losses))
        self._batch_losses = []
        self._log_if_recorded(trainer, pl_module)
