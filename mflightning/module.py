"""``MeanFieldModule``: a LightningModule that trains any mean-field network with the §1.2 rules.

Physical time (docs/theory.md §1.1, §F.3): after k optimizer steps the network is compared with its
limit at ``mf_time = sum_{j<k} eps_j``, with ``eps_j`` the canonical step of the preset (``lr`` for
Nguyen–Pham) times the lr scheduler's factor at step j; ``k * eps`` without a scheduler. Every
logged curve carries ``mf_time`` so runs at different widths, lrs and batch sizes line up.
"""

from __future__ import annotations

import inspect
import warnings
from pathlib import Path
from typing import IO, Any

import torch
from lightning.pytorch import Callback, LightningModule
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torch.optim import Optimizer
from torchmetrics import MeanMetric
from typing_extensions import Self

from mflightning.config import build
from mflightning.diagnostics import warn_trivial_limits
from mflightning.guards import DivergenceGuard
from mflightning.io import VerifiedCheckpointIO, verify_checkpoint
from mflightning.losses import (
    LossName,
    check_loss_name,
    check_loss_outputs,
    correct_predictions,
    mean_field_loss,
)
from mflightning.optim import (
    MeanFieldClock,
    OptimizerCallable,
    SchedulerCallable,
    UpdateFactories,
    build_optimizer,
    build_scheduler,
    probe_optimizer,
    warn_limit_change,
)
from mflightning.scaling import PresetName, Rule, get_preset, param_groups, readout_outputs
from mflightning.stack import MeanFieldStack

REFUSED_PRECISIONS = ("bf16-true", "16-true")


def _loggers_written_this_step(trainer: Any) -> bool:
    """Whether Lightning sends this training step's logged values to the loggers.

    Lightning writes step values every ``log_every_n_steps`` steps; a value logged in between is
    dropped, yet each ``self.log`` call costs a fixed ~0.3 ms. ``mf_time``, a function of the
    step, is therefore only logged when it will be written. Lightning's own callbacks
    (``LearningRateMonitor``, ``DeviceStatsMonitor``) ask the same private property.
    """
    if trainer is None or getattr(trainer, "fast_dev_run", False):
        return True
    connector = getattr(trainer, "_logger_connector", None)
    return bool(getattr(connector, "should_update_logs", True))


def _network_hparams(network: nn.Module) -> dict[str, Any]:
    """``{"network": plain-data config}`` when the network has one, so checkpoints rebuild it.

    A network without one (a custom module, or callable init laws) is not saved in the
    hyperparameters: pass it again, ``MeanFieldModule.load_from_checkpoint(path, network=net)``.
    """
    to_config = getattr(network, "to_config", None)
    if not callable(to_config):
        return {}
    try:
        return {"network": to_config()}
    except ValueError as error:
        warnings.warn(
            f"the network has no plain-data config ({error}); checkpoints will need "
            "load_from_checkpoint(path, network=...).",
            stacklevel=3,
        )
        return {}


def _check_own_lr(optimizer: OptimizerCallable, lr: float) -> None:
    """Refuse an optimizer callable carrying its own ``lr`` that differs from the module's.

    The param groups take their lrs from the module's ``lr`` and the multipliers, so the
    callable's (``--model.optimizer.init_args.lr``) would be silently ignored. The class's
    default lr is not a choice and passes.

    Raises:
        ValueError: naming both values and the fix.
    """
    probe = probe_optimizer(optimizer)
    own = probe.defaults.get("lr")
    try:
        default = inspect.signature(type(probe)).parameters["lr"].default
    except (KeyError, ValueError):
        return
    if own is None or own == default or own == lr:
        return
    raise ValueError(
        f"the optimizer's own lr={own} (model.optimizer.init_args.lr) differs from the module's "
        f"lr={lr}, and the mean-field param groups take their lrs from the module's lr and the "
        "multipliers; set model.lr (--model.lr) and drop the optimizer's lr."
    )


class MeanFieldModule(LightningModule):
    """Trains a mean-field network with per-layer lr multipliers and logs against ``mf_time``.

    Args:
        network: a module built from mean-field layers, or the plain-data config that
            ``network.to_config()`` returns (used when a checkpoint rebuilds the module).
        lr: base learning rate ``eps`` (alpha for the Sirignano–Spiliopoulos preset).
        loss: ``"mse"``, ``"half_mse"`` (the 1/2 convention) or ``"cross_entropy"``.
        optimizer: callable that takes the param groups, e.g. ``torch.optim.SGD`` or, from a
            LightningCLI recipe, ``model.optimizer``. Every param group sets its lr from ``lr``
            and the multipliers, so an own ``lr`` that differs from ``lr`` is refused.
            ``weight_decay`` is in physical units (decay rate per unit of ``mf_time``, §F.2).
            The limit solvers follow this optimizer (§F).
        scheduler: optional callable ``optimizer -> LRScheduler``, stepped every optimizer step;
            it must be multiplicative (StepLR, LambdaLR, CosineAnnealingLR with eta_min=0...) so
            the group multipliers survive (checked at every step, §F.3).
        rule: ``"sgd"`` or ``"adam"`` (see ``mflightning.param_groups``).
        preset: ``"nguyen_pham"``, ``"sirignano_spiliopoulos"`` or ``"araujo_oliveira_yukimura"``.

    Example::

        net = MeanFieldMLP(in_features=10, widths=[256, 256])
        module = MeanFieldModule(net, lr=0.1, loss="half_mse")
        Trainer(max_steps=100).fit(module, datamodule)
    """

    def __init__(
        self,
        network: nn.Module | dict[str, Any],
        lr: float = 0.1,
        loss: LossName = "mse",
        optimizer: OptimizerCallable = torch.optim.SGD,
        scheduler: SchedulerCallable | None = None,
        rule: Rule = "sgd",
        preset: PresetName = "nguyen_pham",
    ) -> None:
        super().__init__()
        if isinstance(network, dict):
            network = build(network)
        if not isinstance(network, nn.Module):
            raise ValueError(f"`network` must be a torch.nn.Module, got {type(network).__name__}.")
        check_loss_name(loss)
        check_loss_outputs(loss, readout_outputs(network))
        if not callable(optimizer):
            raise ValueError(
                f"`optimizer` must be a callable such as torch.optim.SGD, got {optimizer!r}."
            )
        _check_own_lr(optimizer, lr)
        self.network = network
        self.lr = lr
        self.loss_name: LossName = loss
        self.rule: Rule = rule
        self.preset: PresetName = preset
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        # validates lr, rule, preset, optimizer and scheduler now rather than at fit time
        build_scheduler(
            scheduler, build_optimizer(optimizer, param_groups(network, lr, rule, preset))
        )
        self.time_step = get_preset(preset).time_step(network, lr)
        if not any(isinstance(m, MeanFieldStack) for m in network.modules()):
            warn_trivial_limits(network)  # a MeanFieldStack warned when it was built
        hparams: dict[str, Any] = {"lr": lr, "loss": loss, "rule": rule, "preset": preset}
        hparams |= _network_hparams(network)
        self.save_hyperparameters(hparams)
        self.train_accuracy = MeanMetric()
        self._batch_mf_time: float | None = None  # mf_time of the batch being trained on
        self.clock = MeanFieldClock(self.time_step)  # the weights' steps and mf_time
        self.val_loss = MeanMetric()
        self.val_accuracy = MeanMetric()
        self.test_loss = MeanMetric()
        self.test_accuracy = MeanMetric()

    def with_network(self, network: nn.Module) -> MeanFieldModule:
        """A new module with the same lr, loss, optimizer, scheduler, rule and preset."""
        return MeanFieldModule(
            network,
            lr=self.lr,
            loss=self.loss_name,
            optimizer=self.optimizer_factory,
            scheduler=self.scheduler_factory,
            rule=self.rule,
            preset=self.preset,
        )

    @property
    def update_factories(self) -> UpdateFactories:
        """The optimizer and scheduler callables and the rule, as a limit solver takes them (§F)."""
        return UpdateFactories(
            optimizer=self.optimizer_factory, scheduler=self.scheduler_factory, rule=self.rule
        )

    @property
    def mf_time(self) -> float:
        """Physical time ``t_k = sum_{j<k} eps_j`` of the weights after ``k`` optimizer steps.

        ``eps_j`` is the base step times the scheduler's factor at step ``j`` (§1.1, §F.3):
        ``k * eps`` without a scheduler. The clock counts the weights' steps: those of the
        current fit, of the last one (validate, test, predict), or of a loaded checkpoint.
        """
        return self.clock.time

    @classmethod
    def load_from_checkpoint(  # type: ignore[override]
        cls, checkpoint_path: str | Path | IO[Any], *args: Any, **kwargs: Any
    ) -> Self:
        """Lightning's ``load_from_checkpoint``, after a CRC check of the checkpoint archive.

        Raises:
            CorruptFileError: the file is truncated or damaged (``mflightning.io``).
        """
        if isinstance(checkpoint_path, (str, Path)):
            verify_checkpoint(checkpoint_path)
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Save the clock (steps and summed schedule factors), so ``mf_time`` resumes exactly."""
        checkpoint["mf_clock"] = self.clock.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Take the weights' clock from the checkpoint, so ``mf_time`` is theirs.

        A checkpoint saved before clocks were saved gives ``global_step`` unscheduled steps.
        """
        if "mf_clock" in checkpoint:
            self.clock.load_state_dict(checkpoint["mf_clock"])
        else:
            self.clock.reset(int(checkpoint.get("global_step", 0)))

    def on_fit_start(self) -> None:
        """Start the clock at zero for a fresh fit (a resumed one has it from its checkpoint)."""
        if self.trainer.ckpt_path is None:
            self.clock.reset()

    def on_before_optimizer_step(self, optimizer: Optimizer) -> None:
        """Advance the clock by this step's scheduled base step ``eps_k`` (§F.3)."""
        self.clock.tick(optimizer)

    def forward(self, x: Tensor) -> Tensor:
        """The network's output."""
        return self.network(x)

    def setup(self, stage: str) -> None:
        """Refuse precisions and CLI optimizer overrides that break mean-field training.

        Also makes the trainer check a checkpoint archive's CRCs before loading it
        (``VerifiedCheckpointIO``): a truncated or damaged ``ckpt_path`` is refused, named.
        """
        strategy = self.trainer.strategy
        if not isinstance(strategy.checkpoint_io, VerifiedCheckpointIO):
            strategy.checkpoint_io = VerifiedCheckpointIO(strategy.checkpoint_io)
        precision = str(self.trainer.precision)
        if precision in REFUSED_PRECISIONS:
            raise ValueError(
                f"Trainer(precision={precision!r}) stores the weights in 16 bits, which rounds "
                "away O(lr) mean-field updates of O(1) weights and underflows O(1/n^2) gradients "
                "(§E.2); use precision='32-true' (or '64-true'), or 'bf16-mixed' for speed."
            )
        if "configure_optimizers" in vars(self):
            raise ValueError(
                "a LightningCLI `optimizer:`/`lr_scheduler:` entry replaced configure_optimizers "
                "and would train model.parameters() without the mean-field lr multipliers. Move it "
                "under the model: `model: {optimizer: {class_path: torch.optim.SGD}}` "
                "(and `scheduler:` likewise), or use `mfl`, which refuses it up front."
            )

    def configure_optimizers(self) -> Any:
        """Build the optimizer from ``mflightning.param_groups`` and log the group table."""
        groups = param_groups(self.network, self.lr, rule=self.rule, preset=self.preset)
        optimizer = build_optimizer(self.optimizer_factory, groups)
        warn_limit_change(optimizer)
        table = "\n".join(
            f"  {g['name']:<32} lr={g['lr']:<12.6g} multiplier={g['lr_multiplier']:g}"
            for g in optimizer.param_groups
        )
        rank_zero_info(
            f"mean-field param groups (preset {self.preset}, rule {self.rule}):\n{table}"
        )
        scheduler = build_scheduler(self.scheduler_factory, optimizer)
        if scheduler is None:
            return optimizer
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def configure_callbacks(self) -> list[Callback]:
        """A ``DivergenceGuard``: stop at the first non-finite loss."""
        return [DivergenceGuard()]

    def _shared_step(self, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        x, y = batch
        prediction = self.network(x)
        loss = mean_field_loss(self.loss_name, prediction, y)
        return loss, correct_predictions(self.loss_name, prediction.detach(), y)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """One step on ``(x, y)``; logs ``train/loss`` and ``mf_time``, accumulates the accuracy.

        The accuracy metric is only updated here and logged once per epoch (see
        ``on_train_epoch_end``): logging a metric object every step costs Lightning about as
        much as a small network's whole step (docs/benchmarks.md, module).
        """
        loss, correct = self._shared_step(batch)
        self.train_accuracy.update(correct)
        self.log("train/loss", loss, prog_bar=True)
        self._batch_mf_time = self.mf_time  # logged in on_train_batch_end if it will be written
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Log the ``mf_time`` of the step just taken, on the steps the loggers are written.

        Decided here, after every callback's ``on_train_batch_end`` (one may stop training, which
        makes Lightning write this step), right before Lightning writes the step's values.
        """
        time, self._batch_mf_time = self._batch_mf_time, None
        if time is not None and _loggers_written_this_step(self._trainer):
            self.log("mf_time", time)

    def on_train_epoch_end(self) -> None:
        """Log ``train/accuracy`` over the epoch (synchronised across processes by torchmetrics)."""
        if self.train_accuracy.update_count:  # none when resuming at the epoch's last batch
            self.log("train/accuracy", self.train_accuracy)

    def _evaluate(
        self, batch: tuple[Tensor, Tensor], stage: str, loss_sum: MeanMetric, accuracy: MeanMetric
    ) -> None:
        """Accumulate ``<stage>/loss`` and ``<stage>/accuracy``; log them with ``mf_time``."""
        loss, correct = self._shared_step(batch)
        loss_sum(loss, weight=len(correct))
        accuracy(correct)
        self.log(f"{stage}/loss", loss_sum, prog_bar=True)
        self.log(f"{stage}/accuracy", accuracy)
        self.log("mf_time", self.mf_time)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """Accumulates ``val/loss`` and ``val/accuracy`` over the validation set."""
        self._evaluate(batch, "val", self.val_loss, self.val_accuracy)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """Accumulates ``test/loss`` and ``test/accuracy`` over the test set (as validation)."""
        self._evaluate(batch, "test", self.test_loss, self.test_accuracy)

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        """The network's output on the inputs of ``batch`` (an ``(x, y)`` pair or ``x``)."""
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self.network(x)
