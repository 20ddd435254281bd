"""Long horizons: 3-layer nets keep the mean-field rate, deep iid nets leave their exact limit.

The sweeps run the recipe ``deep_iid_horizon.yaml`` (L = 4, iid, docs/theory.md §D.3 T-DEGEN) at
CPU-test size, and a 3-layer network on the same data, over a horizon where the networks learn
(docs/theory.md §D.4: the 4-layer iid limit is degenerate, finite networks escape it after a
time ~ log N; the 3-layer limit is not degenerate and describes them to the end).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import mflightning as mfl
from mflightning.cli import sweep
from mflightning.limit.choice import resolve_limit

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
DEEP = str(RECIPES / "deep_iid_horizon.yaml")
SMALL = [
    "--data.init_args.n_train=512",
    "--data.init_args.n_val=128",
    "--probe_size=128",
    "--widths=16,32,64",
    "--seeds=4",
    "--every_n_steps=10",
    "--wandb=disabled",
]
LONG, SHORT = 250, 50
THREE_LAYER = """
model:
  network:
    class_path: mflightning.MeanFieldMLP
    init_args:
      in_features: 10
      widths: [64, 64]
      out_features: 1
      activations: [relu, tanh, identity]
      init:
        - class_path: mflightning.Normal
          init_args: {mean: 0.0, std: 1.0}
        - class_path: mflightning.Normal
          init_args: {mean: 1.0, std: 0.1}
        - class_path: mflightning.Normal
          init_args: {mean: 0.0, std: 1.0}
"""


def _run(out: Path, steps: int, *extra: str) -> dict:
    return sweep(
        ["--config", DEEP, *extra, *SMALL, f"--trainer.max_steps={steps}", "--out", str(out)]
    )


@pytest.fixture(scope="module")
def deep_long(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return _run(tmp_path_factory.mktemp("deep"), LONG, "--particles=4096")


def test_three_layer_sweep_keeps_the_mean_field_rate_over_a_long_horizon(tmp_path: Path) -> None:
    overlay = tmp_path / "three.yaml"
    overlay.write_text(THREE_LAYER)
    report = _run(tmp_path / "out", LONG, "--config", str(overlay))
    assert report["limit"]["solver"] == "particles"
    losses = report["limit"]["train_loss"]
    assert losses[-1] < 0.5 * losses[0]  # the network really learns over this horizon
    assert min(v["accuracy"] for v in report["per_width"].values()) > 0.8
    assert report["validity"]["output_gap"]["step_star"] is None
    assert report["slopes"]["output_gap"]["contains_expected"]


def test_deep_iid_sweep_leaves_the_exact_limit_in_its_middle_layers(deep_long: dict) -> None:
    assert deep_long["limit"]["solver"] == "reduced" and deep_long["limit"]["particles"] == 4096
    validity = deep_long["validity"]
    last = validity["output_gap"]["series"][-1]["step"]
    assert last == LONG
    for metric in ("output_gap", "dev/layer2", "dev/layer3"):
        step_star = validity[metric]["step_star"]
        assert step_star is not None and 0 < step_star < last, metric
        assert validity[metric]["t_star"] == pytest.approx(step_star * deep_long["time_step"])
    # before the horizon the output gap shrank at the mean-field rate
    early = [e for e in validity["output_gap"]["series"] if 0 < e["step"] <= 40]
    assert all(e["ci_low"] <= -0.5 <= e["ci_high"] for e in early)
    assert deep_long["slopes_to_horizon"]["output_gap"]["quantity"].startswith("sup")


def test_the_same_deep_sweep_cut_before_the_escape_has_no_horizon(tmp_path: Path) -> None:
    report = _run(tmp_path, SHORT, "--particles=4096")
    assert {m: v["step_star"] for m, v in report["validity"].items()} == dict.fromkeys(
        report["validity"]
    )


def test_particle_solver_agrees_with_the_exact_limit_then_its_departure_is_flagged(
    tmp_path: Path, deep_long: dict
) -> None:
    report = _run(tmp_path, LONG, "--limit=particles", "--particles=512")
    limit = report["limit"]
    assert limit["solver"] == "particles"
    gaps = {e["step"]: e["relative_gap"] for e in limit["exact_relative_gap"]}
    assert max(gaps[s] for s in gaps if s <= 40) < 0.05  # O(1/M) with shared atoms (§D.3)
    departure = limit["left_exact_limit"]
    assert departure is not None and 40 < departure["step"] <= LONG
    assert departure["relative_gap"] > 0.5
    # the exact limit barely learns: the particle solver, after leaving it, does much better
    assert limit["final_train_loss"] < deep_long["limit"]["final_train_loss"]


@pytest.mark.parametrize(
    ("depth", "bias_std", "expected"),
    [
        (2, None, "particles"),
        (3, None, "particles"),
        (4, None, "reduced"),
        (5, None, "reduced"),
        (4, 0.0, "reduced"),
        (4, 0.5, "particles"),
    ],
)
def test_auto_picks_the_reduced_solver_exactly_for_the_networks_it_supports(
    depth: int, bias_std: float | None, expected: str
) -> None:
    activations = ["relu"] + ["tanh"] * (depth - 2) + ["identity"]
    init = [mfl.Normal(0, 1)] + [mfl.Normal(1, 0.5)] * (depth - 2) + [mfl.Normal(0, 1)]
    net = mfl.MeanFieldMLP(
        in_features=3,
        widths=[8] * (depth - 1),
        out_features=1,
        activations=activations,
        init=init,
        bias=bias_std is not None,
        bias_init=mfl.Normal(0.1, bias_std or 0.0),
    )
    assert resolve_limit("auto", net) == expected
    assert resolve_limit("particles", net) == "particles"
    if expected == "particles" and depth >= 4:
        with pytest.raises(ValueError, match="--limit particles"):
            resolve_limit("reduced", net)


def test_auto_keeps_the_particle_solver_for_conv_nets() -> None:
    net = mfl.MeanFieldConvNet(
        in_channels=1, channels=[4, 4, 4], out_features=2, generator=torch.Generator()
    )
    assert resolve_limit("auto", net) == "particles"
    with pytest.raises(ValueError, match=r"MeanFieldMLP.*--limit particles"):
        resolve_limit("reduced", net)


def test_limit_reduced_on_an_unsupported_network_is_refused_before_training(
    tmp_path: Path,
) -> None:
    overlay = tmp_path / "bias.yaml"
    overlay.write_text(
        "model:\n  network:\n    init_args:\n      bias: true\n      bias_init:\n"
        "        class_path: mflightning.Normal\n        init_args: {mean: 0.0, std: 1.0}\n"
    )
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"non-constant initial biases.*--limit particles"):
        _run(out, SHORT, "--config", str(overlay), "--limit=reduced")
    assert not out.exists()  # refused before any folder, limit pass or training
