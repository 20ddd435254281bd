"""Reliability: divergence stops cleanly, exact resume mid-epoch, safe loading, atomic writes, W&B.

See docs/reliability.md for the guarantees these tests check.
"""

from __future__ import annotations

import json
import math
import pickle
import signal
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger

import mflightning.io as mio
import mflightning.wandb_logging as wl
from mflightning import MeanFieldMLP, MeanFieldModule, Normal, ParticleLimitSolver
from mflightning.batched import SeedBatch
from mflightning.callbacks import LimitTracker
from mflightning.config import build
from mflightning.data import IsotropicGaussians
from mflightning.guards import DivergenceError
from mflightning.sweep import SweepSettings, WidthSweep

LAWS = [Normal(0.0, 1.0), Normal(1.0, 0.5), Normal(0.5, 1.0)]


def _net(width: int = 16) -> MeanFieldMLP:
    return MeanFieldMLP(10, [width, width], activations=["relu", "tanh", "identity"], init=LAWS)


def _data(batch_size: int | None = None) -> IsotropicGaussians:
    return IsotropicGaussians(n_train=64, n_val=16, batch_size=batch_size, seed=3)


def _trainer(root: Path, max_steps: int, callbacks: list, **kwargs: Any) -> Trainer:
    checkpoints = any(isinstance(c, ModelCheckpoint) for c in callbacks)
    defaults = dict(
        default_root_dir=root,
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        enable_checkpointing=checkpoints,
        callbacks=callbacks,
    )
    return Trainer(**(defaults | kwargs))


def _every_step_checkpoint(root: Path) -> ModelCheckpoint:
    return ModelCheckpoint(dirpath=root, every_n_train_steps=1, save_top_k=-1)


class MemoryLogger(Logger):
    """Keeps every ``log_metrics`` call as ``(step, metrics)``."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.records.append((int(step or 0), dict(metrics)))


# --- divergence -------------------------------------------------------------------------------


def test_huge_lr_stops_training_with_step_time_layer_and_hint(tmp_path: Path) -> None:
    module = MeanFieldModule(_net(), lr=1e4, loss="half_mse")
    trainer = _trainer(tmp_path, 50, [_every_step_checkpoint(tmp_path / "ckpt")])
    with pytest.raises(DivergenceError) as info:
        trainer.fit(module, _data())
    message = str(info.value)
    step = trainer.global_step
    assert 0 < step < 50, "the guard stopped at the first non-finite loss"
    assert f"at step {step} " in message and f"mf_time {module.mf_time:.6g}" in message
    assert "mf/layer" in message and "lower the lr" in message and "preset" in message
    # the last update was measured (from the step before the non-finite loss), not left out
    assert "none yet" not in message
    size = float(message.split("lr * RMS grad = ")[1].split(")")[0])
    assert size > 1.0 or not math.isfinite(size), "a diverging update is large"
    assert all(torch.isfinite(p).all() for p in module.parameters()), "no non-finite step taken"
    saved = sorted(int(p.stem.split("step=")[1]) for p in (tmp_path / "ckpt").glob("*.ckpt"))
    assert saved == list(range(1, step + 1))  # every good step kept, none after the divergence
    last = torch.load(tmp_path / "ckpt" / f"epoch={step - 1}-step={step}.ckpt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values())


class _RecordUpdateSizes(Callback):
    """Independent record of ``lr * RMS(grad)`` per group at every optimizer step (numpy)."""

    def on_before_optimizer_step(self, trainer: Trainer, module: Any, optimizer: Any) -> None:
        self.sizes = {}
        for group in optimizer.param_groups:
            grads = [p.grad.double().numpy().ravel() for p in group["params"] if p.grad is not None]
            if grads:
                rms = np.sqrt(np.mean(np.concatenate(grads) ** 2))
                self.sizes[group["name"]] = group["lr"] * rms


class _ManualModule(MeanFieldModule):
    """The same training with manual optimization (zero_grad, manual_backward, step)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        optimizer = self.optimizers()
        loss, _ = self._shared_step(batch)
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        return loss


@pytest.mark.parametrize("loop", ["validation every step", "manual optimization"])
def test_divergence_reports_the_last_update_in_every_loop(tmp_path: Path, loop: str) -> None:
    record = _RecordUpdateSizes()
    if loop == "manual optimization":
        module = _ManualModule(_net(), lr=1e4, loss="half_mse")
        trainer = _trainer(tmp_path, 50, [record])
    else:
        module = MeanFieldModule(_net(), lr=1e4, loss="half_mse")
        trainer = _trainer(tmp_path, 50, [record], limit_val_batches=1, val_check_interval=1)
    with pytest.raises(DivergenceError) as info:
        trainer.fit(module, _data())
    message = str(info.value)
    assert "none yet" not in message
    name, size = message.split("largest last update: ")[1].split(" (lr * RMS grad = ")
    expected = max(record.sizes.values(), key=lambda v: v if math.isfinite(v) else math.inf)
    assert record.sizes[name] == expected
    assert float(size.split(")")[0]) == pytest.approx(expected, rel=1e-2)


def test_limit_solver_stops_on_a_non_finite_loss() -> None:
    x, y = _data().train_set.tensors
    solver = ParticleLimitSolver(_net(64), lr=1e4, loss="half_mse")
    with pytest.raises(DivergenceError, match=r"limit solver diverged.*step \d+.*lower the lr"):
        solver.run((x, y), steps=50, progress=False)
    assert 0 < solver.steps < 50
    assert all(torch.isfinite(p).all() for p in solver.network.parameters())


def test_non_finite_batch_in_training_names_the_batch(tmp_path: Path) -> None:
    data = _data()
    data.train_set.tensors[0][5, 2] = math.nan
    module = MeanFieldModule(_net(), lr=0.1, loss="half_mse")
    with pytest.raises(ValueError, match=r"training `batch` at step 0 contains NaN.*clean"):
        _trainer(tmp_path, 3, []).fit(module, data)


def _sweep_with_one_diverged_run(tmp_path: Path, every_n_steps: int, batch_seeds: bool) -> None:
    """Run a 2 x 2 sweep in which N16-seed1 diverges; check it is recorded and the rest finish."""
    settings = SweepSettings(
        widths=[16, 32],
        seeds=2,
        particles=64,
        every_n_steps=every_n_steps,
        probe_size=16,
        out=str(tmp_path),
        wandb="disabled",
        batch_seeds=batch_seeds,
    )
    module = MeanFieldModule(_net(), lr=0.1, loss="half_mse")
    sweep = WidthSweep(module, _data(16), steps=8, settings=settings, name="diverge")
    with pytest.warns(UserWarning, match="N16-seed1 is recorded as diverged"):
        report = sweep.run()
    assert report["diverged_runs"] == ["N16-seed1"]
    assert report["per_width"]["16"]["seeds"] == 1 and report["per_width"]["32"]["seeds"] == 2
    saved = json.loads((tmp_path / "runs" / "N16-seed1.json").read_text())
    assert saved["result"]["diverged"] is True
    assert json.loads((tmp_path / "report.json").read_text())["diverged_runs"] == ["N16-seed1"]


def test_sweep_records_a_diverged_run_and_finishes_the_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = MeanFieldModule.with_network

    def one_run_with_a_huge_lr(self: MeanFieldModule, network: MeanFieldMLP) -> MeanFieldModule:
        module = original(self, network)
        if network.widths == [16, 16] and torch.initial_seed() == 1:  # run N16-seed1
            module.lr = 1e4
        return module

    monkeypatch.setattr(MeanFieldModule, "with_network", one_run_with_a_huge_lr)
    _sweep_with_one_diverged_run(tmp_path, every_n_steps=2, batch_seeds=False)


def test_batched_sweep_records_a_diverged_seed_and_keeps_the_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = SeedBatch.step

    def blow_up_seed_1_of_width_16(self: SeedBatch, x: torch.Tensor, y: torch.Tensor):
        losses = original(self, x, y)
        if self.params["layer1.weight"].shape[1] == 16:  # width-16 batch: overflow seed 1
            with torch.no_grad():
                for param in self.params.values():
                    param[1].fill_(float("inf"))
        return losses

    monkeypatch.setattr(SeedBatch, "step", blow_up_seed_1_of_width_16)
    _sweep_with_one_diverged_run(tmp_path, every_n_steps=1, batch_seeds=True)


# --- exact resume, minibatch SGD on shuffled data ---------------------------------------------


class InterruptAt(Callback):
    """Emulates a Ctrl+C after optimizer step ``step`` (after that step's checkpoint)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            raise KeyboardInterrupt


def _tracked_fit(root: Path, callbacks: list, ckpt_path: Path | None = None) -> tuple:
    torch.manual_seed(0)
    module = MeanFieldModule(_net(), lr=0.1, loss="half_mse")
    probe = _data().val_set.tensors
    tracker = LimitTracker(particles=64, every_n_steps=2, probe=probe)
    logger = MemoryLogger()
    trainer = _trainer(root, 11, [tracker, *callbacks], logger=logger, enable_checkpointing=True)
    trainer.fit(module, _data(batch_size=16), ckpt_path=ckpt_path)  # 4 batches per epoch
    return module, tracker, logger


# on purpose: the resumed fit has no checkpoint callback, and 11 steps log only the tracker's rows
@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`, callbacks used to")
@pytest.mark.filterwarnings("ignore:The number of training batches")
def test_interrupted_minibatch_fit_resumes_bit_identically(tmp_path: Path) -> None:
    full_module, full_tracker, full_logger = _tracked_fit(tmp_path / "full", [])
    ckpt = tmp_path / "ckpt"
    handler = signal.getsignal(signal.SIGINT)  # Lightning ignores SIGINT during its shutdown
    try:
        with pytest.raises(SystemExit):  # Lightning's graceful shutdown after a KeyboardInterrupt
            _tracked_fit(tmp_path / "cut", [_every_step_checkpoint(ckpt), InterruptAt(6)])
    finally:
        signal.signal(signal.SIGINT, handler)
    assert not (ckpt / "epoch=1-step=6.ckpt").exists()  # interrupted before its checkpoint
    mid_epoch = ckpt / "epoch=1-step=5.ckpt"  # step 5 is the 1st of the 4 batches of epoch 1
    state = torch.load(mid_epoch, weights_only=True)
    loader_states = state["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert loader_states == [{"epoch": 1, "batches": 1}]  # the data position is saved
    module, tracker, logger = _tracked_fit(tmp_path / "resumed", [], ckpt_path=mid_epoch)
    for a, b in zip(full_module.parameters(), module.parameters(), strict=True):
        assert torch.equal(a, b)
    full_particles = full_tracker.solver.state_dict()["particles"]
    particles = tracker.solver.state_dict()["particles"]
    assert all(torch.equal(full_particles[k], particles[k]) for k in full_particles)
    assert tracker.solver.steps == full_tracker.solver.steps == 11
    full = {step: m for step, m in full_logger.records if "limit/output_gap" in m}
    resumed = {step: m for step, m in logger.records if "limit/output_gap" in m}
    assert sorted(resumed) == [5, 6, 8, 10]  # the resumed fit also logs at its first step
    assert all(resumed[s] == full[s] for s in (6, 8, 10))


def test_sweep_limit_sees_the_trainer_data_order_over_several_epochs() -> None:
    """The limit is recorded on the batches the runs' Trainer feeds (epoch orders differ)."""
    data = _data(batch_size=16)
    loader = data.train_dataloader()
    epochs = [[x for x, _ in loader] for _ in range(2)]  # re-iterating: the next epoch
    assert not all(torch.equal(a, b) for a, b in zip(*epochs, strict=True))
    seen: list[torch.Tensor] = []

    class Record(Callback):
        def on_train_batch_start(self, trainer: Trainer, module: Any, batch: Any, i: int) -> None:
            seen.append(batch[0])

    module = MeanFieldModule(_net(), lr=0.1, loss="half_mse")
    _trainer(Path("."), 8, [Record()], default_root_dir=None).fit(module, data)
    assert all(torch.equal(a, b) for a, b in zip(seen, epochs[0] + epochs[1], strict=True))


# --- safe loading -------------------------------------------------------------------------------


class Exploit:
    """A pickle that creates ``marker`` when unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


def _plant(path: Path, marker: Path) -> Path:
    torch.save({"state_dict": {}, "payload": Exploit(marker)}, path)
    return path


def test_malicious_checkpoint_and_solver_state_are_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    bad = _plant(tmp_path / "bad.ckpt", marker)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        MeanFieldModule.load_from_checkpoint(bad)  # Lightning 2.6 + torch: weights_only default
    module = MeanFieldModule(_net(), lr=0.1, loss="half_mse")
    with pytest.raises(pickle.UnpicklingError):
        _trainer(tmp_path, 2, []).fit(module, _data(), ckpt_path=bad)
    solver = ParticleLimitSolver(_net(32), lr=0.1, loss="half_mse")
    torch.save(solver.state_dict(), tmp_path / "solver.pt")
    solver.load_state_dict(torch.load(tmp_path / "solver.pt", weights_only=True))  # plain data
    with pytest.raises(pickle.UnpicklingError):
        torch.load(_plant(tmp_path / "solver-bad.pt", marker), weights_only=True)
    assert not marker.exists()


@pytest.mark.parametrize(
    "class_path", ["os.system", "mflightning.io.atomic_write_text", "mflightning.module.Callback"]
)
def test_checkpoint_hparams_never_build_foreign_classes_or_call_functions(
    tmp_path: Path, class_path: str
) -> None:
    marker = tmp_path / "pwned"
    spec = {"class_path": class_path, "init_args": {"path": str(marker), "text": "x"}}
    with pytest.raises(ValueError, match=r"refusing to build `class_path`.*pass the network"):
        build(spec)
    module = MeanFieldModule(_net(), lr=0.1, loss="half_mse")
    _trainer(tmp_path, 1, [_every_step_checkpoint(tmp_path)]).fit(module, _data())
    (path,) = tmp_path.glob("*.ckpt")
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["hyper_parameters"]["network"] = spec
    torch.save(checkpoint, path)
    with pytest.raises(ValueError, match="refusing to build"):
        MeanFieldModule.load_from_checkpoint(path)
    assert not marker.exists()


# --- atomic outputs -----------------------------------------------------------------------------


def _half_written_then_disk_full(path: Path, data: bytes) -> None:
    Path(path).write_bytes(data[: len(data) // 2])
    raise OSError(28, "No space left on device")


def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "report.json"
    mio.atomic_write_json(path, {"version": 1})
    real_write_text = Path.write_text

    def crashing_write_text(self: Path, text: str, *args: Any, **kwargs: Any) -> int:
        _half_written_then_disk_full(self, text.encode())
        return real_write_text(self, text)  # never reached

    monkeypatch.setattr(Path, "write_text", crashing_write_text)
    with pytest.raises(OSError, match="No space"):
        mio.atomic_write_json(path, {"version": 2, "padding": "x" * 1000})
    monkeypatch.undo()
    assert mio.read_json(path) == {"version": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_a_failed_figure_keeps_the_previous_png_and_leaves_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from matplotlib.figure import Figure

    from mflightning import plots

    path = tmp_path / "output_gap.png"
    plots.save_figure(Figure(), path)
    before = path.read_bytes()
    assert before.startswith(b"\x89PNG")

    def crashing_savefig(self: Figure, target: Path, **kwargs: Any) -> None:
        _half_written_then_disk_full(target, before)

    monkeypatch.setattr(Figure, "savefig", crashing_savefig)
    with pytest.raises(OSError, match="No space"):
        plots.save_figure(Figure(figsize=(2, 2)), path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["output_gap.png"]


# --- W&B without network ------------------------------------------------------------------------


def test_online_without_login_falls_back_to_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", "/nonexistent")  # no ~/.netrc
    with pytest.warns(wl.WandbOfflineFallback, match=r"no API key.*wandb login.*offline"):
        assert wl.resolve_mode("online") == "offline"
    assert wl.resolve_mode("offline") == "offline"  # the default never probes


@pytest.mark.parametrize("hang", [False, True])
def test_online_without_network_falls_back_quickly(
    monkeypatch: pytest.MonkeyPatch, hang: bool
) -> None:
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_BASE_URL", "https://api.wandb.invalid")
    released = threading.Event()

    def hanging_connect(*args, **kwargs):  # a DNS lookup or connect that hangs, then times out
        released.wait(30)
        raise TimeoutError("timed out")

    if hang:
        monkeypatch.setattr(wl, "PROBE_TIMEOUT_S", 0.5)
        monkeypatch.setattr(wl.socket, "create_connection", hanging_connect)
    start = time.monotonic()
    with pytest.warns(wl.WandbOfflineFallback, match=r"unreachable.*offline"):
        assert wl.resolve_mode("auto") == "offline"
    assert time.monotonic() - start < 10
    released.set()  # the probe's thread times out now instead of outliving the test


def test_offline_fallback_run_logs_without_network(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens there
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", wl.WandbOfflineFallback)
        mode = wl.resolve_mode("online")
    start = time.monotonic()
    logger = wl.run_logger(mode, tmp_path, "p", "g", "run", {"a": 1})
    logger.log_metrics({"mf_time": 0.1, "limit/output_gap": 0.5}, step=1)
    logger.experiment.finish()
    assert mode == "offline" and time.monotonic() - start < 60
    assert list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))


# --- corrupt files ------------------------------------------------------------------------------


def test_read_json_names_a_truncated_edited_or_incomplete_file(tmp_path: Path) -> None:
    path = tmp_path / "N8-seed0.json"
    payload = {"steps": 3, "pairs": (1, 2), "by_width": {8: math.nan}}
    mio.atomic_write_json(path, payload)
    back = mio.read_json(path, required=("steps",))  # tuples, int keys and NaN round-trip
    assert back["steps"] == 3 and back["pairs"] == [1, 2] and math.isnan(back["by_width"]["8"])
    text = path.read_text()
    path.write_text(text[: len(text) // 2])
    with pytest.raises(mio.CorruptFileError, match=rf"{path} is not valid JSON.*overwrite true"):
        mio.read_json(path)
    edited = json.loads(text)
    edited["extra"] = 1  # e.g. an edited run file (today: TypeError RunResult.__init__())
    path.write_text(json.dumps(edited))
    with pytest.raises(mio.CorruptFileError, match=rf"{path} does not match its sha256"):
        mio.read_json(path)
    path.write_text(json.dumps({"steps": 3}))
    with pytest.raises(mio.CorruptFileError, match=rf"{path} has no sha256 checksum"):
        mio.read_json(path)
    mio.atomic_write_json(path, {"steps": 3})
    with pytest.raises(mio.CorruptFileError, match=rf"{path} lacks the keys \['result'\]"):
        mio.read_json(path, required=("steps", "result"))


def test_a_truncated_run_file_is_named_when_the_sweep_resumes(tmp_path: Path) -> None:
    settings = SweepSettings(widths=[8, 16], seeds=2, wandb="disabled", out=str(tmp_path))
    module = MeanFieldModule(_net(), lr=0.1, loss="half_mse")
    WidthSweep(module, _data(), 2, settings).run()
    run_file = tmp_path / "runs" / "N8-seed1.json"
    run_file.write_text(run_file.read_text()[:100])  # as after a full disk or a bad copy
    with pytest.raises(mio.CorruptFileError, match=rf"{run_file} is not valid JSON"):
        WidthSweep(module, _data(), 2, settings).run()


def _damaged_copies(path: Path) -> tuple[Path, Path]:
    """``path`` with 64 bytes flipped in the middle, and ``path`` cut in half."""
    data = path.read_bytes()
    middle = len(data) // 2
    flipped = bytearray(data)
    flipped[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
    (flipped_path := path.with_name("flipped.ckpt")).write_bytes(bytes(flipped))
    (truncated_path := path.with_name("truncated.ckpt")).write_bytes(data[:middle])
    return flipped_path, truncated_path


def test_a_damaged_or_truncated_checkpoint_is_refused_with_its_path(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from mflightning.cli import main

    module = MeanFieldModule(_net(), lr=0.1, loss="half_mse")
    _trainer(tmp_path, 2, [_every_step_checkpoint(tmp_path)]).fit(module, _data())
    good = max(tmp_path.glob("*.ckpt"), key=lambda p: int(p.stem.rpartition("step=")[2]))
    mio.verify_checkpoint(good)
    assert MeanFieldModule.load_from_checkpoint(good).mf_time == pytest.approx(0.2)
    for bad in _damaged_copies(good):  # today: loads silently (flipped), OSError 22 (truncated)
        with pytest.raises(mio.CorruptFileError, match=rf"checkpoint {bad} .*delete it"):
            MeanFieldModule.load_from_checkpoint(bad)
        resumed = MeanFieldModule(_net(), lr=0.1, loss="half_mse")
        with pytest.raises(mio.CorruptFileError, match=rf"checkpoint {bad} "):
            _trainer(tmp_path / "resume", 4, []).fit(resumed, _data(), ckpt_path=bad)
        recipe = str(Path(__file__).resolve().parents[1] / "recipes" / "demo_gaussians.yaml")
        with pytest.raises(SystemExit) as stop:
            main(["validate", "--config", recipe, f"--ckpt_path={bad}"])
        assert stop.value.code == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line.startswith(f"error: checkpoint {bad} ")
