"""Sweep integrity: a rerun never mixes configurations, every failure has a clear cause.

Each test is a case of docs/reliability.md ("Width sweeps: resume, refusals and honest reports").
The sweeps are tiny (2 widths x 2 seeds, 6 steps, 64 points): a few seconds each on CPU.
"""

from __future__ import annotations

import functools
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from test_sweep import DEMO, TINY
from wandb_records import summarize

import mflightning.lock as lock_module
import mflightning.sweep as sweep_module
from mflightning import MeanFieldMLP, MeanFieldModule, Normal
from mflightning.batched import SeedBatch
from mflightning.cli import main, sweep
from mflightning.data import IsotropicGaussians
from mflightning.fingerprint import differences, fingerprint, plain
from mflightning.limit.memory import mlp_parameter_count, solver_step_bytes
from mflightning.lock import LOCK_NAME, folder_lock
from mflightning.sweep import SweepSettings, WidthSweep
from mflightning.wandb_logging import SET_ASIDE


def _sweep(out: Path, *extra: str, wandb: str = "disabled") -> dict[str, Any]:
    return sweep(["--config", DEMO, *TINY, "--out", str(out), "--wandb", wandb, *extra])


def _run_files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "runs").glob("*.json"))}


def _gaps(report: dict[str, Any]) -> dict[str, list[float]]:
    return {w: v["output_gap_per_seed"] for w, v in report["per_width"].items()}


# --- 1. a run is reused only under the same recipe ---------------------------------------------


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """A finished tiny sweep (lr 0.2, the demo's), shared by the rerun tests that only read it."""
    out = tmp_path_factory.mktemp("finished")
    return out, _sweep(out)


@pytest.mark.parametrize(
    ("change", "key"),
    [
        (["--model.lr=5.0"], "model.lr: 0.2 -> 5.0"),
        (["--model.loss=mse"], "model.loss"),
        (["--model.network.init_args.activations=[tanh,tanh,identity]"], "activations"),
        (["--model.optimizer.init_args.momentum=0.9"], "model.optimizer.init_args.momentum"),
        (["--data.init_args.delta=0.3"], "data.init_args.delta"),
        (["--data.init_args.n_train=32"], "data_digest.train"),
        (["--seed_everything=1"], "seed_everything"),
        (["--trainer.max_steps=5"], "sweep.steps"),
        (["--trainer.precision=64-true"], "trainer.precision"),
        (["--particles", "256"], "sweep.particles"),
        (["--every_n_steps", "2"], "sweep.every_n_steps"),
        (["--probe_size", "32"], "sweep.probe_size"),
        (["--sweep.solver_dtype=float32"], "sweep.solver_dtype"),
        (["--sweep.batch_seeds=false"], "sweep.engine"),
    ],
    ids=lambda v: v[0] if isinstance(v, list) else None,
)
def test_a_rerun_with_another_recipe_is_refused_before_training(
    finished: tuple[Path, dict[str, Any]], change: list[str], key: str
) -> None:
    out, _ = finished
    before = _run_files(out) | {"limit.json": (out / "limit.json").read_bytes()}
    with pytest.raises(ValueError, match="another configuration") as error:
        _sweep(out, *change)
    message = str(error.value)
    assert key in message
    assert "--sweep.overwrite true" in message and "--out" in message
    after = _run_files(out) | {"limit.json": (out / "limit.json").read_bytes()}
    assert after == before  # nothing trained, nothing rewritten


def test_a_rerun_of_the_same_resolved_recipe_reuses_every_run(
    finished: tuple[Path, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    out, report = finished
    monkeypatch.setattr(WidthSweep, "_solver", lambda self: pytest.fail("the limit was redone"))
    again = _sweep(out, "--limit", "particles")  # "auto" resolves to it for this network
    assert _gaps(again) == _gaps(report)
    assert again["fingerprint"] == report["fingerprint"]
    stored = json.loads((out / "runs" / "N16-seed0.json").read_text())
    assert stored["recipe"] == report["recipe"] and stored["run"] == {"width": 16, "seed": 0}
    assert stored["recipe"]["model"]["lr"] == 0.2 == report["lr"]


def test_lr_and_seeds_changed_together_are_refused(tmp_path: Path) -> None:
    """lr 0.1 x 2 seeds, then lr 0.5 x 3 seeds: the old runs must not enter the new report."""
    _sweep(tmp_path, "--model.lr=0.1")
    with pytest.raises(ValueError, match=r"model\.lr: 0\.1 -> 0\.5"):
        _sweep(tmp_path, "--model.lr=0.5", "--seeds", "3")


def test_more_seeds_of_the_same_recipe_train_only_the_new_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _sweep(tmp_path)
    trained: list[tuple[int, list[int]]] = []
    original = WidthSweep._train_seeds

    def record(self: WidthSweep, width: int, seeds: list[int], *args: Any) -> Any:
        trained.append((width, list(seeds)))
        return original(self, width, seeds, *args)

    monkeypatch.setattr(WidthSweep, "_train_seeds", record)
    resumed = _sweep(tmp_path, "--seeds", "3")
    assert trained == [(16, [2]), (32, [2])]
    fresh = _sweep(tmp_path / "fresh", "--seeds", "3")
    for width, gaps in _gaps(fresh).items():  # seed 2 trained alone: another vmap batch size
        np.testing.assert_allclose(_gaps(resumed)[width], gaps, rtol=1e-6)


def test_overwrite_starts_afresh_and_matches_a_new_folder(tmp_path: Path) -> None:
    _sweep(tmp_path / "a", "--model.lr=0.1")
    old_wandb_run = tmp_path / "a" / "wandb" / "offline-run-20240101_000000-N16-seed0-0ld"
    old_wandb_run.mkdir(parents=True)
    report = _sweep(tmp_path / "a", "--model.lr=0.5", "--sweep.overwrite=true")
    fresh = _sweep(tmp_path / "b", "--model.lr=0.5")
    assert report["lr"] == 0.5 and _gaps(report) == _gaps(fresh)
    assert report["slopes"]["output_gap"] == fresh["slopes"]["output_gap"]
    stored = json.loads((tmp_path / "a" / "runs" / "N32-seed1.json").read_text())
    assert stored["recipe"]["model"]["lr"] == 0.5
    assert not old_wandb_run.exists()  # the old recipe's W&B runs are not offered to sync


def _python_sweep(out: Path, lr: float) -> dict[str, Any]:
    network = MeanFieldMLP(10, [16, 16], activations="tanh", init=Normal(0.0, 1.0))
    module = MeanFieldModule(network, lr=lr, loss="half_mse")
    settings = SweepSettings(
        widths=[8, 16], seeds=2, particles=64, probe_size=16, out=str(out), wandb="disabled"
    )
    return WidthSweep(module, IsotropicGaussians(n_train=32, n_val=16), 4, settings).run()


def test_python_sweeps_describe_their_recipe_from_the_objects(tmp_path: Path) -> None:
    first = _python_sweep(tmp_path, 0.1)
    assert first["recipe"]["model"]["optimizer"] == "torch.optim.sgd.SGD"
    assert first["recipe"]["data"]["class_path"] == "mflightning.data.IsotropicGaussians"
    assert _python_sweep(tmp_path, 0.1)["fingerprint"] == first["fingerprint"]
    with pytest.raises(ValueError, match=r"model\.lr: 0\.1 -> 0\.2"):
        _python_sweep(tmp_path, 0.2)


def test_run_files_without_a_recipe_are_refused(
    finished: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    out, _ = finished
    old = tmp_path / "old-format"
    (old / "runs").mkdir(parents=True)
    stored = json.loads((out / "runs" / "N16-seed0.json").read_text())
    legacy = {"steps": 6, "particles": 128, "result": stored["result"]}
    (old / "runs" / "N16-seed0.json").write_text(json.dumps(legacy))
    with pytest.raises(ValueError, match=r"older mflightning|not written by this version"):
        _sweep(old)


# --- 2. NaN in the data: named, before training ------------------------------------------------


def _data_sweep(out: Path, data: IsotropicGaussians) -> WidthSweep:
    module = MeanFieldModule(MeanFieldMLP(10, [16, 16], activations="tanh"), lr=0.1)
    settings = SweepSettings(widths=[8, 16], seeds=2, particles=64, out=str(out), wandb="disabled")
    return WidthSweep(module, data, 4, settings)


def test_nan_in_the_training_data_is_named_not_blamed_on_the_data_order(tmp_path: Path) -> None:
    data = IsotropicGaussians(n_train=32, n_val=16)
    data.train_set.tensors[0][3, 1] = math.nan
    with pytest.raises(ValueError, match=r"training data is not finite: batch 0 .* 1 NaN"):
        _data_sweep(tmp_path, data).run()
    assert not list((tmp_path / "runs").glob("*.json"))


def test_nan_in_the_probe_is_named_and_no_run_is_recorded_as_diverged(tmp_path: Path) -> None:
    data = IsotropicGaussians(n_train=32, n_val=16)
    data.val_set.tensors[0][2, 0] = math.nan
    with pytest.raises(ValueError, match=r"probe is not finite.*val_dataloader"):
        _data_sweep(tmp_path, data).run()
    assert not list((tmp_path / "runs").glob("*.json"))


# --- 3. all runs diverged, one width left: an honest report ------------------------------------


def test_all_diverged_runs_give_a_null_slope_report_and_are_never_reused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An lr 30 sweep diverges everywhere; a later lr 0.1 sweep refuses its runs."""
    steps = "--trainer.max_steps=40"
    with pytest.warns(UserWarning, match="diverged"):
        report = _sweep(tmp_path, "--model.lr=30", steps, wandb="offline")
    on_disk = json.loads((tmp_path / "report.json").read_text())
    for key in ("slopes", "slopes_to_horizon", "validity"):
        assert on_disk[key] is None and report[key] is None
    assert on_disk["per_width"] == {} and on_disk["fitted_widths"] == []
    note = next(n for n in on_disk["notes"] if "diverged" in n)
    assert "all 4 runs diverged" in note and "lower the lr" in note
    assert "all 4 runs diverged" in capsys.readouterr().out
    assert (tmp_path / "loss_curves.png").is_file() and not (tmp_path / "output_gap.png").exists()
    summaries = [summarize(p) for p in (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")]
    assert [s["job_type"] for s in summaries].count("summary") == 1
    with pytest.raises(ValueError, match=r"model\.lr: 30(\.0)? -> 0\.1"):
        _sweep(tmp_path, "--model.lr=0.1", steps)


def _blow_up(widths: set[int], seeds: set[int]) -> Any:
    """A ``SeedBatch.step`` that overflows the given seeds of the given widths."""
    original = SeedBatch.step

    def step(self: SeedBatch, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        losses = original(self, x, y)
        if self.params["layer1.weight"].shape[1] in widths:
            with torch.no_grad():
                for param in self.params.values():
                    for seed in seeds:
                        param[seed].fill_(math.inf)
        return losses

    return step


def test_one_surviving_width_is_said_to_give_no_slope(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(SeedBatch, "step", _blow_up({16}, {0, 1}))
    with pytest.warns(UserWarning, match="diverged"):
        report = _sweep(tmp_path)
    assert report["diverged_runs"] == ["N16-seed0", "N16-seed1"]
    assert report["slopes"] is None and report["fitted_widths"] == [32]
    assert list(report["per_width"]) == ["32"]
    note = report["notes"][-1]
    assert note.startswith("no slope") and "N16: 0, N32: 2" in note
    assert note in capsys.readouterr().out


def test_a_width_with_one_finished_seed_is_left_out_of_the_fits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(SeedBatch, "step", _blow_up({16}, {1}))
    with pytest.warns(UserWarning, match="diverged"):
        report = _sweep(tmp_path, "--widths", "16,32,64")
    assert report["fitted_widths"] == [32, 64] and report["per_width"]["16"]["seeds"] == 1
    assert any("widths [16] are left out of the fits" in note for note in report["notes"])
    fit = report["slopes"]["output_gap"]
    rms = [report["per_width"][w]["output_gap_rms"] for w in ("32", "64")]
    expected = np.diff(np.log(rms))[0] / np.diff(np.log([32.0, 64.0]))[0]
    assert fit["slope"] == pytest.approx(expected, rel=1e-12)  # two widths: the exact secant


# --- 4. bad sweep settings: refused before training --------------------------------------------


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--widths", "8,8,16"], r"`widths` = \[8, 8, 16\] lists \[8\] more than once"),
        (["--seeds", "1"], r"`seeds` = 1: .*at least 2"),
    ],
)
def test_duplicate_widths_and_a_single_seed_are_refused(
    tmp_path: Path, extra: list[str], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        _sweep(tmp_path, *extra)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("flags", [[], TINY], ids=["recipe-only", "with-sweep-flags"])
def test_a_sweep_section_that_is_not_a_mapping_is_refused(
    tmp_path: Path, flags: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = Path(DEMO).read_text().split("\nsweep:")[0] + "\nsweep: [8, 16]\n"
    path = tmp_path / "bad.yaml"
    path.write_text(recipe)
    with pytest.raises(SystemExit) as exit_info:
        main(["sweep", "--config", str(path), *flags, "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "`sweep:` section must be a mapping" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# --- 5. a probe larger than the validation set -------------------------------------------------


def test_a_probe_larger_than_the_validation_set_is_reported_at_its_real_size(
    finished: tuple[Path, dict[str, Any]],
) -> None:
    out, exact = finished  # probe_size 64, the whole validation set
    with pytest.warns(UserWarning, match="probe_size 100000 was asked for"):
        report = _sweep(out, "--probe_size", "100000")  # the same runs: reused
    assert report["probe_size"] == 64 and report["recipe"]["sweep"]["probe_size"] == 64
    assert any("measured on those 64" in note for note in report["notes"])
    assert report["fingerprint"] == exact["fingerprint"] and _gaps(report) == _gaps(exact)


# --- 6. memory: refused up front ---------------------------------------------------------------


def test_widths_beyond_memory_are_refused_before_anything_is_built(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_allocation(*args: Any, **kwargs: Any) -> None:
        pytest.fail("a network was built")

    monkeypatch.setattr(MeanFieldMLP, "with_widths", no_allocation)
    with pytest.raises(ValueError, match=r"needs about .* GiB .*lower --widths"):
        _sweep(tmp_path, "--widths", "1000000000,2000000000", "--particles", "16000000000")


@pytest.mark.parametrize("bias", [False, True])
def test_the_memory_count_matches_the_built_networks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bias: bool
) -> None:
    """The refusal threshold is the solver step bound plus every run's network and snapshots."""
    network = MeanFieldMLP(10, [16, 16], activations="tanh", bias=bias)
    for widths in ([3, 5], [64, 7], [1, 1]):
        built = sum(p.numel() for p in network.with_widths(widths).parameters())
        assert mlp_parameter_count(network, widths) == built
    module = MeanFieldModule(network, lr=0.1)
    settings = SweepSettings(
        widths=[8, 16], seeds=2, particles=64, every_n_steps=2, out=str(tmp_path), wandb="disabled"
    )
    points, steps = 32, 4  # logging steps 0, 2, 4
    wide = network.with_widths([64, 64])
    runs = sum(
        sum(p.numel() for p in network.with_widths([w, w]).parameters()) * (4 + 3 * 8)
        + sweep_module.RUN_OVERHEAD_BYTES  # objects and headers beyond the numbers
        for w in (8, 8, 16, 16)
    )
    need = solver_step_bytes(wide, points, torch.float64) + runs
    for available, refused in ((need - 1, True), (need, False)):
        monkeypatch.setattr(sweep_module, "available_memory", lambda device, a=available: a)
        data = IsotropicGaussians(n_train=points, n_val=16)
        runner = WidthSweep(module, data, steps, settings)
        if refused:
            with pytest.raises(ValueError, match="needs about"):
                runner.run()
        else:
            runner.run()


# --- 7. one sweep per folder -------------------------------------------------------------------


def test_a_second_sweep_into_a_locked_folder_is_refused_naming_the_holder(tmp_path: Path) -> None:
    with folder_lock(tmp_path), pytest.raises(ValueError, match=f"pid {os.getpid()} on host"):
        _sweep(tmp_path)
    assert not list((tmp_path / "runs").glob("*.json"))


def test_a_lock_left_by_a_killed_sweep_is_taken_over(tmp_path: Path) -> None:
    holder = (  # the lock module alone: no torch import, a quick subprocess
        "import importlib.util, os, signal, sys; from pathlib import Path\n"
        "spec = importlib.util.spec_from_file_location('lock', sys.argv[2])\n"
        "lock = importlib.util.module_from_spec(spec); spec.loader.exec_module(lock)\n"
        "with lock.folder_lock(Path(sys.argv[1])): os.kill(os.getpid(), signal.SIGKILL)"
    )
    args = [sys.executable, "-c", holder, str(tmp_path), str(lock_module.__file__)]
    killed = subprocess.run(args, check=False)
    assert killed.returncode == -signal.SIGKILL
    dead = json.loads((tmp_path / LOCK_NAME).read_text())["pid"]
    assert dead != os.getpid()
    report = _sweep(tmp_path)
    assert report["per_width"]["32"]["seeds"] == 2
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()


def test_the_write_probe_does_not_depend_on_a_fixed_file_name(tmp_path: Path) -> None:
    """Another process's probe (here a leftover directory of that name) is no failure."""
    (tmp_path / ".write-test").mkdir()
    assert _sweep(tmp_path)["per_width"]["16"]["seeds"] == 2
    assert [p.name for p in tmp_path.glob(".write-test*")] == [".write-test"]


# --- 8. W&B: what `wandb sync` is offered ------------------------------------------------------


def _offered(out: Path) -> list[dict[str, Any]]:
    """The runs the printed `wandb sync <out>/wandb/offline-run-*` hint uploads."""
    return [summarize(p) for p in sorted((out / "wandb").glob("offline-run-*/run-*.wandb"))]


def test_partial_wandb_runs_are_set_aside_and_the_summary_run_is_resumed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    saves = []
    original = WidthSweep._save

    def interrupted_save(self: WidthSweep, *args: Any) -> Any:
        saves.append(args)
        if len(saves) == 3:  # width 32 is logged to W&B, then the process dies
            raise KeyboardInterrupt
        return original(self, *args)

    monkeypatch.setattr(WidthSweep, "_save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        _sweep(tmp_path, wandb="offline")
    partial = tmp_path / "wandb" / "offline-run-20240101_000000-N16-seed9-0badc0de"
    partial.mkdir()  # what kill -9 leaves mid-run: a run directory with a truncated log
    (partial / "run-N16-seed9-0badc0de.wandb").write_bytes(b":W&B\xe1\xbe\x00")
    first = _sweep(tmp_path, wandb="offline")
    time.sleep(1.1)  # offline run directories are named to the second
    second = _sweep(tmp_path, wandb="offline")
    assert _gaps(first) == _gaps(second)
    names = sorted(run["name"] for run in _offered(tmp_path))
    expected = ["N16-seed0", "N16-seed1", "N32-seed0", "N32-seed1", "demo_gaussians-summary"]
    assert names == expected  # each finished run once, one summary
    set_aside = sorted(p.name for p in (tmp_path / "wandb" / SET_ASIDE).iterdir())
    assert partial.name in set_aside
    assert sum("-N32-seed" in name for name in set_aside) == 2  # logged, never saved
    summaries = [name for name in set_aside if "summary" in name]
    kept = [p.name for p in (tmp_path / "wandb").glob("offline-run-*summary*")]
    assert len(summaries) == 1 and len(kept) == 1
    assert summaries[0].split("-", 3)[-1] == kept[0].split("-", 3)[-1]  # the same W&B run id
    recorded = json.loads((tmp_path / "runs" / "N32-seed1.json").read_text())["wandb_id"]
    assert any(p.name.endswith(recorded) for p in (tmp_path / "wandb").glob("offline-run-*"))


# --- the fingerprint itself --------------------------------------------------------------------


def test_plain_and_differences() -> None:
    config = {
        "optimizer": functools.partial(torch.optim.SGD, momentum=0.9),
        "law": Normal(0.0, 1.0),
        "dtype": torch.float64,
        "values": (1, math.nan, math.inf),
        "obj": object(),
    }
    data = plain(config)
    json.dumps(data, allow_nan=False)
    assert data["optimizer"] == {
        "callable": "torch.optim.sgd.SGD",
        "args": [],
        "kwargs": {"momentum": 0.9},
    }
    assert data["values"] == [1, "nan", "inf"] and data["dtype"] == "torch.float64"
    assert " at 0x" not in data["obj"] and fingerprint(config) == fingerprint(plain(config))
    old = {"model": {"lr": 0.1, "init": [{"std": 1.0}, {"std": 0.1}]}, "seed": 0}
    new = {"model": {"lr": 5.0, "init": [{"std": 1.0}, {"std": 0.2}]}, "extra": True}
    assert differences(old, new) == [
        "extra: (absent) -> true",
        "model.init[1].std: 0.1 -> 0.2",
        "model.lr: 0.1 -> 5.0",
        "seed: 0 -> (absent)",
    ]
    assert differences(old, old) == [] and fingerprint(old) != fingerprint(new)
    assert fingerprint({"a": 1, "b": 2}) == fingerprint({"b": 2, "a": 1})
