"""`mfl fit` runs the demo recipe end to end, its checkpoint reloads; CLI optimizers are refused."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mflightning import MeanFieldModule
from mflightning.cli import main

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
