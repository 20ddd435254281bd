"""`mfl sweep`: report files, figures, offline W&B runs, resume after interruption, bad input."""

from __future__ import annotations

import csv
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from wandb_records import summarize

from mflightning.cli import main, sweep
from mflightning.io import read_json
from mflightning.sweep import SweepSettings, WidthSweep

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
DEMO = str(RECIPES / "demo_gaussians.yaml")
TINY = [
    "--trainer.max_steps=6",
    "--data.init_args.n_train=64",
    "--data.init_args.n_val=64",
    "--widths",
    "16,32",
    "--seeds",
    "2",
    "--particles",
    "128",
    "--every_n_steps",
    "3",
    "--probe_size",
    "64",
]


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("sweep")
    report = sweep(["--config", DEMO, *TINY, "--out", str(out), "--wandb", "offline"])
    return out, report


def test_sweep_writes_report_curves_and_figures(tiny_sweep: tuple[Path, dict]) -> None:
    out, report = tiny_sweep
    on_disk = read_json(out / "report.json")  # checksum verified and removed
    assert on_disk == json.loads(json.dumps(report))
    assert on_disk["widths"] == [16, 32] and on_disk["seeds"] == 2 and on_disk["particles"] == 128
    assert on_disk["horizon"] == pytest.approx(6 * 0.2)  # max_steps x the recipe's lr
    for width in ("16", "32"):
        values = on_disk["per_width"][width]
        assert len(values["output_gap_per_seed"]) == 2 and values["output_gap_rms"] > 0
        assert set(values["dev_median"]) == {"layer1", "layer2", "layer3"}
        assert 0 <= values["accuracy"] <= 1
    for key in ("output_gap", "sup_output_gap", "loss_gap", "dev/layer1"):
        fit = on_disk["slopes"][key]
        assert fit["ci_low"] <= fit["slope"] <= fit["ci_high"] and fit["expected"] == -0.5
    with (out / "curves.csv").open() as f:
        rows = list(csv.DictReader(f))
    runs = {r["run"] for r in rows}
    assert runs == {"N16-seed0", "N16-seed1", "N32-seed0", "N32-seed1", "limit"}
    assert len([r for r in rows if r["run"] == "limit"]) == 6
    logged = [r for r in rows if r["run"] == "N16-seed0" and r["limit/output_gap"]]
    assert [int(r["step"]) for r in logged] == [0, 3, 6]  # the final gaps: a row of their own
    for name in ("loss_curves", "output_gap", "deviation"):
        path = out / f"{name}.png"
        assert path.stat().st_size > 10_000
        assert _png_size(path) == (600, 450)


def test_sweep_writes_one_offline_wandb_run_per_width_and_seed(
    tiny_sweep: tuple[Path, dict],
) -> None:
    out, _ = tiny_sweep
    runs = [summarize(p) for p in sorted((out / "wandb").glob("offline-run-*/run-*.wandb"))]
    by_name = {run["name"]: run for run in runs}
    assert set(by_name) == {
        "N16-seed0",
        "N16-seed1",
        "N32-seed0",
        "N32-seed1",
        "demo_gaussians-summary",
    }
    assert {run["group"] for run in runs} == {"demo_gaussians"}
    one = by_name["N32-seed1"]
    config = json.loads(one["config"]["sweep"])
    assert config["width"] == 32 and config["seed"] == 1 and config["particles"] == 128
    assert config["multipliers"]["layer2"] == 32 * 32 and config["lr"] == 0.2
    assert {"limit/output_gap", "limit/loss_gap", "limit/dev/layer2", "mf_time"} <= one["history"]
    assert one["metrics"]["limit/*"] == "mf_time"  # mf_time is the x-axis of limit metrics
    summary = by_name["demo_gaussians-summary"]
    assert summary["job_type"] == "summary"
    assert {"per_width/_type", "slopes/_type", "figures/output_gap/_type"} <= summary["history"]


def test_interrupted_sweep_keeps_finished_runs_and_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[int, int]] = []
    original = WidthSweep._train

    def failing_train(self, width, seed, *args):
        calls.append((width, seed))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(self, width, seed, *args)

    monkeypatch.setattr(WidthSweep, "_train", failing_train)
    args = [
        "--config",
        DEMO,
        *TINY,
        "--out",
        str(tmp_path),
        "--wandb",
        "disabled",
        "--sweep.batch_seeds=false",
    ]
    with pytest.raises(KeyboardInterrupt):
        sweep(args)
    finished = sorted(p.name for p in (tmp_path / "runs").glob("*.json"))
    assert finished == ["N16-seed0.json", "N16-seed1.json"]
    assert not list((tmp_path / "runs").glob(".*.tmp"))  # no partial files left
    calls.clear()
    report = sweep(args)
    assert calls == [(32, 0), (32, 1)]  # only the unfinished runs are redone
    assert report["per_width"]["16"]["seeds"] == 2


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--widths", "0,64"], "widths"),
        (["--seeds", "0"], "seeds"),
        (["--widths", "32"], "widths"),
        (["--particles", "8"], "particles"),
    ],
)
def test_bad_sweep_settings(tmp_path: Path, extra: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=f"`{message}"):
        sweep(["--config", DEMO, *TINY, "--out", str(tmp_path), *extra])


def test_unwritable_report_folder_is_refused(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ValueError, match="not writable"):
        sweep(["--config", DEMO, *TINY, "--out", str(blocker / "sub")])


def test_unknown_recipe_key_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(
            [
                "sweep",
                "--config",
                DEMO,
                *TINY,
                "--out",
                str(tmp_path),
                "--model.init_args.momentum=0.9",
            ]
        )
    assert "momentum" in capsys.readouterr().err


def test_sweep_settings_validate_directly() -> None:
    with pytest.raises(ValueError, match="`wandb`"):
        SweepSettings(wandb="cloud").validate()  # type: ignore[arg-type]


@pytest.mark.parametrize("recipe", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_recipe_parses(recipe: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(recipe), "--print_config"])
    assert exit_info.value.code in (0, None)
    assert "model:" in capsys.readouterr().out


def test_interrupted_batched_sweep_keeps_finished_widths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    original = WidthSweep._train_seeds

    def failing_train_seeds(self, width, seeds, *args):
        calls.append(width)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, width, seeds, *args)

    monkeypatch.setattr(WidthSweep, "_train_seeds", failing_train_seeds)
    args = ["--config", DEMO, *TINY, "--out", str(tmp_path), "--wandb", "disabled"]
    with pytest.raises(KeyboardInterrupt):
        sweep(args)
    finished = sorted(p.name for p in (tmp_path / "runs").glob("*.json"))
    assert finished == ["N16-seed0.json", "N16-seed1.json"]
    calls.clear()
    sweep(args)
    assert calls == [32]


def test_batched_and_lightning_sweeps_agree(tmp_path: Path) -> None:
    """Seed-batched training (vmap) reproduces the run-by-run Lightning fits (float32)."""
    common = ["--config", DEMO, *TINY, "--wandb", "disabled"]
    batched = sweep([*common, "--out", str(tmp_path / "b")])
    lightning = sweep([*common, "--out", str(tmp_path / "l"), "--sweep.batch_seeds=false"])
    for width in ("16", "32"):
        np.testing.assert_allclose(
            batched["per_width"][width]["output_gap_per_seed"],
            lightning["per_width"][width]["output_gap_per_seed"],
            rtol=1e-4,
        )
        for layer, value in lightning["per_width"][width]["dev_median"].items():
            assert batched["per_width"][width]["dev_median"][layer] == pytest.approx(
                value, rel=1e-4
            )
