"""Bad cross-entropy labels and bad network inputs are named with the fix, never a raw error.

Issue 21, item 5 ("faults are one line, never a traceback"). Labels are checked by the losses
(``mflightning.losses.check_class_labels``), so training, both limit solvers and sweeps refuse
them alike; inputs by ``MeanFieldMLP.check_input`` and, once torch has failed, by the layers.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from lightning import Trainer
from test_sweep import DEMO, TINY
from torch.utils.data import DataLoader, TensorDataset

from mflightning import (
    MeanFieldConv2d,
    MeanFieldLinear,
    MeanFieldMLP,
    MeanFieldModule,
    Normal,
    ParticleLimitSolver,
    ReducedLimitSolver,
)
from mflightning.cli import main
from mflightning.losses import correct_predictions, loss_and_gradient, mean_field_loss

LABELS = re.escape("the labels `y` of loss='cross_entropy'")


def _logits(rows: int = 6, classes: int = 3) -> torch.Tensor:
    return torch.randn(rows, classes, generator=torch.Generator().manual_seed(0))


# --- cross-entropy labels ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (
            torch.tensor([0, 1, 2, 3, 0, 4]),
            r"must be class indices 0 to 2 \(3 outputs, one per class\), but they range from 0 "
            r"to 4: build the network with out_features=5 .*or relabel the classes as 0 to 2\.",
        ),
        (
            torch.tensor([0, 1, 2, -1, 0, 1]),
            r"must be class indices 0 to 2 \(3 outputs, one per class\), but they range from -1 "
            r"to 2: relabel the classes as 0 to 2 \(negative labels",
        ),
        (
            torch.tensor([0, 1, 2, -100, 0, 1]),  # F.cross_entropy's ignored index
            r"must be .* range from -100 to 2: relabel the classes as 0 to 2 .*ignored index -100",
        ),
        (
            torch.tensor([0.0, 1.0, 2.0, 1.0, 0.0, 1.0]),
            r"have dtype torch\.float32: they must be integer class indices 0 to 2 \(3 outputs, "
            r"one per class\); convert them with y\.long\(\)\.",
        ),
        (
            torch.tensor([-1.0, 1.0, 1.0, -1.0, 1.0, -1.0]),
            r"have dtype torch\.float32: .*but they range from -1 to 1: relabel them \(±1 "
            r"targets: \(y > 0\)\.long\(\)\), or keep them with loss='mse' or 'half_mse'\.",
        ),
        (
            torch.tensor([True, False, True, False, True, False]),
            r"have dtype torch\.bool: they must be integer class indices 0 to 2 .*y\.long\(\)",
        ),
        (
            torch.tensor([[0], [1], [2], [1], [0], [1]]),
            r"have shape \(6, 1\), but the outputs \(6, 3\) need one class index per row, shape "
            r"\(6,\); squeeze them with y\.squeeze\(-1\)\.",
        ),
        (
            torch.full((6, 5), 0.2),
            r"have dtype torch\.float32 and shape \(6, 5\): give integer class indices 0 to 2 .* "
            r"of shape \(6,\), or class probabilities of the outputs' shape \(6, 3\)\.",
        ),
    ],
    ids=[
        "too-large",
        "negative",
        "ignore-index",
        "float-indices",
        "float-pm1",
        "bool",
        "column",
        "probabilities-shape",
    ],
)
def test_bad_cross_entropy_labels_name_the_labels_the_outputs_and_the_fix(
    labels: torch.Tensor, message: str
) -> None:
    """Both the loss and the reduced solver's hand-written gradient refuse them, in one line."""
    for compute in (mean_field_loss, loss_and_gradient):
        with pytest.raises(ValueError, match=f"^{LABELS} {message}") as refused:
            compute("cross_entropy", _logits(), labels)
        assert "\n" not in str(refused.value)


def test_integer_labels_of_any_width_give_the_int64_loss_and_gradient() -> None:
    """int32, int16 and uint8 class indices are the int64 ones (torch refuses int32 itself)."""
    logits, labels = _logits(), torch.tensor([0, 1, 2, 2, 0, 1])
    value, grad = loss_and_gradient("cross_entropy", logits, labels)
    for dtype in (torch.int32, torch.int16, torch.uint8):
        other = labels.to(dtype)
        torch.testing.assert_close(mean_field_loss("cross_entropy", logits, other), value)
        other_value, other_grad = loss_and_gradient("cross_entropy", logits, other)
        torch.testing.assert_close(other_value, value, rtol=0, atol=0)
        torch.testing.assert_close(other_grad, grad, rtol=0, atol=0)


def test_probability_targets_count_accuracy_by_their_most_likely_class() -> None:
    """Class probabilities (one-hot or soft) train and score like their argmax class."""
    logits, labels = _logits(), torch.tensor([0, 1, 2, 2, 0, 1])
    soft = torch.nn.functional.one_hot(labels, 3).double() * 0.7 + 0.1
    expected = correct_predictions("cross_entropy", logits, labels)
    torch.testing.assert_close(correct_predictions("cross_entropy", logits, soft), expected)


def _classifier(outputs: int = 3, width: int = 8) -> MeanFieldMLP:
    return MeanFieldMLP(
        4,
        [width],
        out_features=outputs,
        activations=["tanh", "identity"],
        init=[Normal(0, 1), Normal(0, 1)],
        generator=torch.Generator().manual_seed(0),
    )


def test_training_with_out_of_range_labels_is_refused_naming_them(tmp_path: Path) -> None:
    """MeanFieldModule: a ValueError at the first step, not torch's IndexError."""
    x = torch.randn(16, 4)
    y = torch.arange(16) % 5  # 5 classes for a network with 3 outputs
    module = MeanFieldModule(_classifier(), lr=0.1, loss="cross_entropy")
    trainer = Trainer(
        default_root_dir=tmp_path, accelerator="cpu", max_steps=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    with pytest.raises(ValueError, match=f"{LABELS} .*3 outputs.*range from 0 to 4"):
        trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=16))


@pytest.mark.parametrize("solver", [ParticleLimitSolver, ReducedLimitSolver])
def test_limit_solvers_refuse_out_of_range_labels(
    solver: type[ParticleLimitSolver] | type[ReducedLimitSolver],
) -> None:
    """Both solvers' steps go through the losses' check (the reduced one: loss_and_gradient)."""
    limit = solver(_classifier(width=64), 0.1, loss="cross_entropy")
    x = torch.randn(16, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=f"{LABELS} .*3 outputs.*range from -1 to 2"):
        limit.step(x, torch.arange(16) % 4 - 1)
    with pytest.raises(ValueError, match=f"{LABELS} .*3 outputs.*range from 0 to 3"):
        limit.step(x, torch.arange(16) % 4)
    assert limit.step(x, torch.arange(16, dtype=torch.int32) % 3) > 0  # int32 labels are fine


def test_mfl_sweep_with_pm1_labels_and_cross_entropy_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The demo's ±1 float targets with loss=cross_entropy: exit 2, one line, no traceback."""
    args = [
        "sweep",
        "--config",
        DEMO,
        *TINY,
        "--out",
        str(tmp_path / "out"),
        "--wandb",
        "disabled",
        "--model.loss=cross_entropy",
        "--model.network.init_args.out_features=2",
    ]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert "Traceback" not in err
    assert len(lines) == 1
    assert "the labels `y` of loss='cross_entropy' have dtype torch.float" in lines[0]
    assert "range from -1 to 1" in lines[0] and "(y > 0).long()" in lines[0]
    assert not list((tmp_path / "out" / "runs").glob("*.json"))  # nothing was trained


# --- network inputs ---------------------------------------------------------------------------


def _mlp(in_features: int) -> MeanFieldMLP:
    return MeanFieldMLP(in_features, [8], out_features=2)


@pytest.mark.parametrize(
    ("in_features", "x", "fix"),
    [
        (10, torch.randn(8, 3, 10), r"fold the extra dimensions into the batch with "
         r"x\.reshape\(-1, 10\) \(and the targets alike\)\."),
        (30, torch.randn(8, 3, 10), r"flatten each example with x\.flatten\(1\)\."),
        (784, torch.randn(8, 1, 28, 28), r"flatten each example with x\.flatten\(1\)\."),
        (10, torch.randn(10), r"add the batch dimension with x\.unsqueeze\(0\)\."),
    ],
    ids=["3d-rows", "3d-example", "image", "one-example"],
)  # fmt: skip
def test_an_mlp_refuses_inputs_that_are_not_batch_by_features(
    in_features: int, x: torch.Tensor, fix: str
) -> None:
    """Only (batch, in_features): the message names the shape and the reshaping that fits."""
    shape = re.escape(str(tuple(x.shape)))
    expected = (
        rf"^`x` must have shape \(batch, {in_features}\) for this network "
        rf"\(in_features={in_features}\), got {shape}: MeanFieldMLP takes \(batch, in_features\) "
        rf"inputs; {fix}$"
    )
    with pytest.raises(ValueError, match=expected):
        _mlp(in_features)(x)


def test_an_mlp_names_an_integer_input_and_the_conversion() -> None:
    with pytest.raises(
        ValueError, match=r"^`x` has dtype torch\.int64 .*x\.to\(torch\.float32\)\.$"
    ):
        _mlp(10)(torch.ones(8, 10, dtype=torch.int64))


@pytest.mark.parametrize("role", ["input", "hidden"])
def test_a_linear_layer_names_a_bad_input_instead_of_torchs_error(role: str) -> None:
    """int64, wrong feature count, not a tensor: a ValueError naming `input` (torch's own
    linear for an input layer, the scaled GEMM otherwise); leading dimensions still work."""
    layer = MeanFieldLinear(10, 4, role=role)
    x = torch.randn(8, 3, 10)
    torch.testing.assert_close(layer(x), layer(x.reshape(-1, 10)).view(8, 3, 4))
    with pytest.raises(
        ValueError,
        match=r"^`input` has dtype torch\.int64 but the layer's weights are torch\.float32; "
        r"convert it with input\.to\(torch\.float32\)\.$",
    ):
        layer(torch.ones(8, 10, dtype=torch.int64))
    with pytest.raises(
        ValueError, match=r"^`input` has shape \(8, 7\), but this layer takes in_features=10 "
    ):
        layer(torch.randn(8, 7))
    with pytest.raises(ValueError, match=r"^`input` must be a tensor, got list"):
        layer([[0.0] * 10])


def test_a_conv_layer_names_a_bad_input_instead_of_torchs_error() -> None:
    conv = MeanFieldConv2d(3, 4, 3, role="hidden")
    with pytest.raises(ValueError, match=r"^`input` has dtype torch\.int64 .*input\.to\("):
        conv(torch.ones(2, 3, 8, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"^`input` has shape \(2, 5, 8, 8\), .*in_channels=3"):
        conv(torch.randn(2, 5, 8, 8))
