"""`mfl`: fit, checkpoints, test/predict, help, one-line errors, Ctrl-C; CLI optimizers refused."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader, TensorDataset

from mflightning import MeanFieldModule
from mflightning.cli import main
from mflightning.data import IsotropicGaussians
from mflightning.sweep import WidthSweep

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
DEMO = str(RECIPES / "demo_gaussians.yaml")


def _fit_args(tmp_path: Path, *extra: str) -> list[str]:
    return [
        "fit",
        "--config",
        DEMO,
        "--trainer.max_steps=3",
        f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        "--trainer.enable_progress_bar=false",
        "--trainer.check_val_every_n_epoch=1",
        *extra,
    ]


def test_mfl_fit_runs_the_demo_recipe_and_its_checkpoint_reloads(tmp_path: Path) -> None:
    main(_fit_args(tmp_path))
    (checkpoint,) = tmp_path.glob("**/checkpoints/*.ckpt")
    module = MeanFieldModule.load_from_checkpoint(checkpoint)
    assert module.network.widths == [256, 256]
    assert module.loss_name == "half_mse"
    state = torch.load(checkpoint, weights_only=True)["state_dict"]
    for key, value in module.state_dict().items():
        assert torch.equal(value, state[key])
    assert list(tmp_path.glob("**/metrics.csv")), "the CSV logger wrote no metrics"


def test_top_level_optimizer_entry_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(SystemExit):
        main(_fit_args(tmp_path, "--optimizer=torch.optim.Adam"))
    assert "without the mean-field lr multipliers" in capsys.readouterr().err


def test_console_script_is_installed() -> None:
    mfl = shutil.which("mfl") or str(Path(sys.executable).parent / "mfl")
    result = subprocess.run([mfl, "fit", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--model.network" in result.stdout and "--model.lr" in result.stdout


# --- one-line errors, Ctrl-C, help, test/predict (issues 13 and 14) ------------------------------


def _recipe(tmp_path: Path, edit: Callable[[dict[str, Any]], None]) -> str:
    """The demo recipe with ``edit`` applied, written to ``tmp_path``."""
    recipe = yaml.safe_load(Path(DEMO).read_text())
    edit(recipe)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def _rename_activations(recipe: dict[str, Any]) -> None:
    args = recipe["model"]["network"]["init_args"]
    args["activation"] = args.pop("activations")


def _mistype_network(recipe: dict[str, Any]) -> None:
    recipe["model"]["network"]["class_path"] = "mflightning.MeanFieldMLPP"


def _negative_std(recipe: dict[str, Any]) -> None:
    recipe["model"]["network"]["init_args"]["init"][1]["init_args"]["std"] = -0.5


def _sweep_as_list(recipe: dict[str, Any]) -> None:
    recipe["sweep"] = [8, 16]


def _exit_code(args: list[str]) -> int:
    try:
        main(args)
    except SystemExit as stop:
        return int(stop.code or 0)
    return 0


USER_ERRORS = [
    ("recipe-key-typo", "fit", _rename_activations, "Did you mean 'activations'"),
    ("class-path-typo", "fit", _mistype_network, "Did you mean 'mflightning.MeanFieldMLP'"),
    ("negative-std", "fit", _negative_std, "`std` must be >= 0, got -0.5"),
    ("sweep-section-list-fit", "fit", _sweep_as_list, "`sweep:` section must be a mapping"),
    ("sweep-section-list-sweep", "sweep", _sweep_as_list, "`sweep:` section must be a mapping"),
]


@pytest.mark.parametrize(
    ("command", "edit", "expected"), [c[1:] for c in USER_ERRORS], ids=[c[0] for c in USER_ERRORS]
)
def test_a_bad_recipe_is_one_error_line_with_exit_code_2(
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    command: str,
    edit: Callable[[dict[str, Any]], None],
    expected: str,
) -> None:
    flags = ["--trainer.max_steps=2", f"--trainer.default_root_dir={tmp_path}"]
    flags += ["--wandb", "disabled", "--out", str(tmp_path / "out")] if command == "sweep" else []
    assert _exit_code([command, "--config", _recipe(tmp_path, edit), *flags]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert expected in lines[0]
    assert not (tmp_path / "out").exists()  # refused before any training


def test_missing_recipe_and_unknown_flag_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert _exit_code(["fit", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert _exit_code(["fit", "--config", DEMO, "--model.lrr=3"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2, lines
    assert "nope.yaml" in lines[0] and "does not exist" in lines[0]
    assert "--model.lrr" in lines[1]


def test_debug_flag_or_environment_shows_the_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bad = _recipe(tmp_path, _rename_activations)
    with pytest.raises(ValueError, match="Did you mean 'activations'"):
        main(["fit", "--config", bad, "--debug"])
    monkeypatch.setenv("MFL_DEBUG", "1")
    with pytest.raises(ValueError, match="Did you mean 'activations'"):
        main(["fit", "--config", bad])


def test_ctrl_c_says_how_to_resume_and_exits_130(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupt(self: WidthSweep) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(WidthSweep, "run", interrupt)
    sweep_args = ["sweep", "--config", DEMO, "--wandb", "disabled", "--out", str(tmp_path / "s")]
    assert _exit_code(sweep_args) == 130
    assert "rerun the same command to resume: finished runs are kept" in capsys.readouterr().err

    training_step = MeanFieldModule.training_step

    def press_ctrl_c(self: MeanFieldModule, batch: Any, batch_idx: int) -> Any:
        if self.global_step == 1:  # Lightning catches the KeyboardInterrupt and calls exit(1)
            os.kill(os.getpid(), signal.SIGINT)
        return training_step(self, batch, batch_idx)

    monkeypatch.setattr(MeanFieldModule, "training_step", press_ctrl_c)
    previous = signal.getsignal(signal.SIGINT)
    assert _exit_code(_fit_args(tmp_path, "--trainer.max_steps=5")) == 130
    assert "--ckpt_path=last" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is previous  # mfl restores the handler


def _help(args: list[str], capsys: pytest.CaptureFixture) -> list[str]:
    assert _exit_code(args) == 0
    return capsys.readouterr().out.splitlines()


def test_help_lists_every_subcommand_sweep_first(capsys: pytest.CaptureFixture) -> None:
    lines = _help(["--help"], capsys)
    names = ["sweep", "fit", "validate", "test", "predict"]
    rows = [line.split()[0] for line in lines if line.startswith("  ") and line.split()]
    assert rows[: len(names)] == names
    sweep_help = _help(["sweep", "--help"], capsys)
    assert len(sweep_help) < 40
    assert all(flag in sweep_help[0] for flag in ("--widths", "--seeds", "--out", "--particles"))
    flags = [line.split()[0] for line in sweep_help if line.startswith("  --")]
    assert flags[:4] == ["--widths", "--seeds", "--particles", "--every_n_steps"]


def test_test_validate_predict_on_a_checkpoint_with_its_mf_time(tmp_path: Path) -> None:
    """`mfl validate/test/predict --ckpt_path` as in any LightningCLI; mf_time is the fit's."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main(_fit_args(tmp_path, "--trainer.max_steps=20"))
    assert not [w for w in caught if "args parameter" in str(w.message)]
    (checkpoint,) = tmp_path.glob("**/checkpoints/*.ckpt")
    for command in ("validate", "test", "predict"):
        main([command, *_fit_args(tmp_path)[1:], f"--ckpt_path={checkpoint}"])
    logged = {}
    for metrics in tmp_path.glob("**/metrics.csv"):
        rows = list(csv.DictReader(metrics.open()))
        logged |= {key: row[key] for row in rows for key in row if row[key] and "/" in key}
        logged |= {f"mf_time:{key}": row["mf_time"] for row in rows for key in row
                   if row[key] and key in ("val/loss", "test/loss")}  # fmt: skip
    fit_time = 20 * yaml.safe_load(Path(DEMO).read_text())["model"]["lr"]  # 20 steps x lr
    assert float(logged["mf_time:val/loss"]) == pytest.approx(fit_time)
    assert float(logged["mf_time:test/loss"]) == pytest.approx(fit_time)
    assert logged["val/loss"] == logged["test/loss"]  # the demo data: test = validation split
    module = MeanFieldModule.load_from_checkpoint(checkpoint)
    assert module.mf_time == pytest.approx(fit_time)
    x = torch.randn(5, 10)
    loader = DataLoader(TensorDataset(x, x[:, 0]), batch_size=5)
    out = Trainer(logger=False, enable_progress_bar=False).predict(module, loader)
    assert out is not None
    torch.testing.assert_close(out[0], module.network(x), rtol=0, atol=0)


def test_predict_saves_the_outputs_under_the_log_dir_and_says_where(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """`mfl predict` wrote nothing and printed nothing; now `predictions.pt`, and one line."""
    small = "--model.network.init_args.widths=[8,8]"
    main(_fit_args(tmp_path, small))
    (checkpoint,) = tmp_path.glob("**/checkpoints/*.ckpt")
    capsys.readouterr()
    main(["predict", *_fit_args(tmp_path, small)[1:], f"--ckpt_path={checkpoint}"])
    lines = [line for line in capsys.readouterr().out.splitlines() if "predictions" in line]
    assert len(lines) == 1 and lines[0].startswith("predictions: "), lines
    (written,) = tmp_path.glob("**/predictions.pt")
    assert str(written) in lines[0] and "shape (512, 1)" in lines[0]
    assert written.parent.name.startswith("version_")  # the logger's folder of this command
    module = MeanFieldModule.load_from_checkpoint(checkpoint).eval()
    data = yaml.safe_load(Path(DEMO).read_text())["data"]["init_args"]
    x_val, _ = IsotropicGaussians(**data).val_set.tensors  # the predict split: validation inputs
    with torch.no_grad():
        expected = module.network(x_val)
    torch.testing.assert_close(torch.load(written, weights_only=True), expected)


def _write_module(folder: Path, name: str, source: str) -> None:
    (folder / f"{name}.py").write_text(source)


UNIMPORTABLE_DATA = [  # (id, data class_path, what the error line must name)
    (
        "class-typo",
        "mflightning.data.IsotropicGausians",
        "mean 'mflightning.data.IsotropicGaussians'",
    ),
    ("module-typo", "mflightning.dat.IsotropicGaussians", "'mflightning' has no attribute 'dat'"),
    ("missing-module", "mfl_stand_in_missing.Data", "No module named 'mfl_stand_in_missing'"),
    ("module-import-error", "mfl_stand_in_broken.Data", "named 'mfl_stand_in_absent_dependency'"),
]


@pytest.mark.parametrize("command", ["fit", "sweep"])
@pytest.mark.parametrize(
    ("class_path", "expected"),
    [c[1:] for c in UNIMPORTABLE_DATA],
    ids=[c[0] for c in UNIMPORTABLE_DATA],
)
def test_an_unimportable_data_class_path_names_the_cause_in_one_line(
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    command: str,
    class_path: str,
    expected: str,
) -> None:
    """Not jsonargparse's "Does not validate against any of the Union subtypes": the cause."""
    _write_module(tmp_path, "mfl_stand_in_broken", "import mfl_stand_in_absent_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    def edit(recipe: dict[str, Any]) -> None:
        recipe["data"]["class_path"] = class_path

    flags = ["--trainer.max_steps=2", f"--trainer.default_root_dir={tmp_path}"]
    flags += ["--wandb", "disabled", "--out", str(tmp_path / "out")] if command == "sweep" else []
    assert _exit_code([command, "--config", _recipe(tmp_path, edit), *flags]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: data: "), lines
    assert class_path in lines[0] and expected in lines[0], lines[0]
    assert "Union subtypes" not in lines[0]


def test_a_bad_sweep_from_the_shell_is_one_line_without_traceback(tmp_path: Path) -> None:
    env = os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    bad = _recipe(tmp_path, _sweep_as_list)
    command = [sys.executable, "-m", "mflightning.cli", "sweep", "--config", bad]
    result = subprocess.run(command, capture_output=True, text=True, timeout=180, env=env)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "args parameter" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [result.stderr.strip().splitlines()[-1]], result.stderr
    assert "`sweep:` section must be a mapping" in errors[0]


@pytest.mark.parametrize("command", ["fit", "sweep"])
@pytest.mark.parametrize(
    ("flag", "expected"),
    [
        (
            "--model.network.class_path=mflightning.MeanFieldMLPP",
            "Did you mean 'mflightning.MeanFieldMLP'?",
        ),
        ("--data.class_path=mflightning.nodata.IsotropicGaussians", "No module named"),
    ],
)
def test_a_class_path_override_that_cannot_be_imported_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture, command: str, flag: str, expected: str
) -> None:
    """jsonargparse crashed with an AttributeError traceback on such a command-line override."""
    flags = ["--trainer.max_steps=2", f"--trainer.default_root_dir={tmp_path}"]
    flags += ["--wandb", "disabled", "--out", str(tmp_path / "out")] if command == "sweep" else []
    assert _exit_code([command, "--config", DEMO, flag, *flags]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "`class_path`" in lines[0] and expected in lines[0], lines


def test_a_json_class_path_override_that_cannot_be_imported_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    flag = '--model.network={"class_path": "mflightning.MeanFieldMLPP"}'
    args = ["sweep", "--config", DEMO, flag, "--wandb", "disabled", "--out", str(tmp_path)]
    assert _exit_code(args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "Did you mean 'mflightning.MeanFieldMLP'?" in lines[0], lines
