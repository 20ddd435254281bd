"""A ``LimitTracker`` never silently overwrites trained weights (issue 21 item 7).

Coupling (docs/theory.md §B.4) starts the network from the limit's initial law at mf_time 0, so a
module whose weights have already taken optimizer steps (``module.clock.steps > 0``: an earlier
fit, or a loaded checkpoint) is refused with ``couple=True``; ``couple=False`` keeps its weights.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import single_thread
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import Callback

import mflightning as mfl
from mflightning import LimitTracker, MeanFieldModule


def _trainer(
    max_steps: int, callbacks: list | None = None, checkpoints: Path | None = None
) -> Trainer:
    return Trainer(
        max_steps=max_steps, callbacks=callbacks or [], logger=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, enable_checkpointing=bool(checkpoints),
        default_root_dir=checkpoints,
    )  # fmt: skip


def _module() -> MeanFieldModule:
    net = mfl.MeanFieldMLP(10, [16, 16], 1, activations=["relu", "tanh", "identity"])
    return MeanFieldModule(net, lr=0.1, loss="half_mse")


def _weights(module: MeanFieldModule) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.network.parameters()]


class _WeightsAtTrainStart(Callback):
    """Copies the weights at train start: after every callback's ``on_fit_start`` (coupling)."""

    weights: list[torch.Tensor]

    def on_train_start(self, trainer: Trainer, pl_module: MeanFieldModule) -> None:  # type: ignore[override]
        self.weights = _weights(pl_module)


def test_coupling_a_trained_module_is_refused_and_couple_false_keeps_it(tmp_path: Path) -> None:
    data = mfl.data.IsotropicGaussians(n_train=64, n_val=32)
    probe = data.val_set.tensors
    with single_thread():
        module = _module()
        _trainer(3, checkpoints=tmp_path).fit(module, data)
        assert module.clock.steps == 3
        trained = _weights(module)
        with pytest.raises(ValueError, match=r"already trained for 3 steps.*couple=False") as error:
            _trainer(2, [LimitTracker(particles=64, probe=probe)]).fit(module, data)
        assert "\n" not in str(error.value)
        assert all(torch.equal(a, b) for a, b in zip(trained, _weights(module), strict=True))

        # the same weights from their checkpoint: the clock says they were trained
        (checkpoint,) = tmp_path.glob("**/*.ckpt")
        loaded = MeanFieldModule.load_from_checkpoint(checkpoint)
        with pytest.raises(ValueError, match="couple=False"):
            _trainer(2, [LimitTracker(particles=64, probe=probe)]).fit(loaded, data)

        # couple=False tracks the trained weights from where they are
        tracker = LimitTracker(particles=64, every_n_steps=1, probe=probe, couple=False)
        start = _WeightsAtTrainStart()
        _trainer(1, [tracker, start]).fit(module, data)
        assert all(torch.equal(a, b) for a, b in zip(trained, start.weights, strict=True))
        assert "limit/output_gap" in tracker.last_gaps

        # a fresh module still couples (its weights become the particles' subsample)
        fresh = _module()
        _trainer(1, [LimitTracker(particles=64, every_n_steps=1, probe=probe)]).fit(fresh, data)
        assert fresh.clock.steps == 1
