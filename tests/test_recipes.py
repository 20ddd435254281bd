"""Every recipe trains a few steps under `mfl fit` and `mfl sweep` (tiny widths, stand-in data)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from test_data import _write_cifar, _write_mnist

from mflightning.cli import main, sweep

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


def _small_widths(recipe: Path) -> list[str]:
    """Overrides that shrink every hidden width (or channel count) of the recipe to 8."""
    args = yaml.safe_load(recipe.read_text())["model"]["network"]["init_args"]
    key = "channels" if "channels" in args else "widths"
    return [f"--model.network.init_args.{key}={json.dumps([8] * len(args[key]))}"]


def _stand_in_data(recipe: Path, root: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Tiny real-format MNIST/CIFAR-10 files, or a small Gaussian data set."""
    data_class = yaml.safe_load(recipe.read_text())["data"]["class_path"]
    if data_class.endswith("MNIST"):
        _write_mnist(root)
    elif data_class.endswith("CIFAR10"):
        _write_cifar(root, monkeypatch)
    else:
        return ["--data.init_args.n_train=64", "--data.init_args.n_val=32"]
    return [
        f"--data.init_args.root={root}",
        "--data.init_args.n_train=20",
        "--data.init_args.n_val=10",
        "--data.init_args.batch_size=10",
    ]


# The Sirignano-Spiliopoulos preset ties the time step to the width, so `mfl sweep` refuses it
# (test_width_dependent_clock_is_refused_by_sweeps); docs/recipes.md sweeps the same limit so:
SWEEP_OVERRIDES = {"sirignano_2layer": ["--model.preset=nguyen_pham", "--model.lr=0.005"]}


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_runs_a_few_steps_under_fit_and_sweep(
    recipe: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`mfl fit` with the recipe's own trainer section, then `mfl sweep` at widths 8 and 16.

    Only the steps, the widths and the data size change; the working directory is ``tmp_path``,
    so the recipe's relative ``default_root_dir`` and log folders land there. The stand-in data
    sets are far smaller than the real ones: a validation interval longer than an epoch must
    count steps across epochs (``check_val_every_n_epoch: null``), as it must with the real data.
    """
    monkeypatch.chdir(tmp_path)
    data = _stand_in_data(recipe, tmp_path / "data", monkeypatch)
    main(
        [
            "fit",
            "--config",
            str(recipe),
            "--trainer.max_steps=2",
            "--trainer.enable_progress_bar=false",
            *_small_widths(recipe),
            *data,
        ]
    )
    report = sweep(
        [
            "--config",
            str(recipe),
            "--trainer.max_steps=2",
            "--widths",
            "8,16",
            "--seeds",
            "2",
            "--particles",
            "128",
            "--every_n_steps",
            "1",
            "--probe_size",
            "16",
            "--out",
            str(tmp_path / "sweep"),
            "--wandb",
            "disabled",
            *_small_widths(recipe),
            *data,
            *SWEEP_OVERRIDES.get(recipe.stem, []),
        ]
    )
    assert report["fitted_widths"] == [8, 16] and not report["diverged_runs"]
    assert math.isfinite(report["slopes"]["output_gap"]["slope"])
    assert (tmp_path / "sweep" / "report.json").is_file()


def test_frozen_ends_recipe_sweeps_and_skips_frozen_deviations(tmp_path: Path) -> None:
    recipe = next(r for r in RECIPES if r.stem == "araujo_frozen_ends")
    report = sweep(
        [
            "--config",
            str(recipe),
            "--trainer.max_steps=4",
            "--data.init_args.n_train=64",
            "--widths",
            "8,16",
            "--seeds",
            "2",
            "--particles",
            "64",
            "--every_n_steps",
            "2",
            "--probe_size",
            "32",
            "--out",
            str(tmp_path),
            "--wandb",
            "disabled",
        ]
    )
    assert set(report["per_width"]["8"]["dev_median"]) == {"layer2", "layer3"}
    assert "dev/layer2" in report["slopes"] and "dev/layer1" not in report["slopes"]


def test_width_dependent_clock_is_refused_by_sweeps(tmp_path: Path) -> None:
    recipe = next(r for r in RECIPES if r.stem == "sirignano_2layer")
    with pytest.raises(ValueError, match="nguyen_pham"):
        sweep(
            [
                "--config",
                str(recipe),
                "--trainer.max_steps=2",
                "--widths",
                "8,16",
                "--out",
                str(tmp_path),
                "--wandb",
                "disabled",
            ]
        )
