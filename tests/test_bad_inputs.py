"""One table of bad inputs: each raises a specific exception naming the argument and the fix.

Layers, MLP, module, solver, coupling, tracker, sweep, datasets, configs and the CLI. Nothing runs
on silently and nothing is left half-written (the sweep cases write no report files).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import Trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mflightning import (
    MeanFieldConv1d,
    MeanFieldConv2d,
    MeanFieldConvNet,
    MeanFieldLinear,
    MeanFieldMLP,
    MeanFieldModule,
    Normal,
    ParticleLimitSolver,
    param_groups,
)
from mflightning.callbacks import LimitTracker
from mflightning.cli import sweep
from mflightning.config import build
from mflightning.data import MNIST, DatasetNotFoundError, IsotropicGaussians
from mflightning.limit.solver import check_solver_dtype
from mflightning.sweep import SweepSettings, WidthSweep
from mflightning.wandb_logging import check_project

RECIPE = str(Path(__file__).resolve().parents[1] / "recipes" / "demo_gaussians.yaml")
FIX_WORDS = ("use", "give", "pass", "choose", "set", "must", "move", "convert", "clean", "reshape",
             "build", "fetch", "wrap", "increase", "needs", "only", "one of", "valid",
             "accepts")  # fmt: skip
Case = Callable[[Path], Any]


def _net(width: int = 8) -> MeanFieldMLP:
    return MeanFieldMLP(10, [width, width], activations=["relu", "tanh", "identity"])


def _convnet() -> MeanFieldConvNet:
    return MeanFieldConvNet(3, [4, 4])


def _module(**kwargs: Any) -> MeanFieldModule:
    return MeanFieldModule(**({"network": _net(), "lr": 0.1, "loss": "half_mse"} | kwargs))


def _solver(**kwargs: Any) -> ParticleLimitSolver:
    return ParticleLimitSolver(**({"network": _net(32), "lr": 0.1, "loss": "half_mse"} | kwargs))


def _batch(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(n, 10), torch.randn(n)


def _fit(tmp_path: Path, module: MeanFieldModule, callbacks: list, data: Any = None, **kw: Any):
    trainer = Trainer(
        default_root_dir=tmp_path, accelerator="cpu", max_steps=2, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, callbacks=callbacks, **kw,
    )  # fmt: skip
    trainer.fit(module, data or IsotropicGaussians(n_train=16, n_val=8))


def _nan_data() -> IsotropicGaussians:
    data = IsotropicGaussians(n_train=16, n_val=8)
    data.train_set.tensors[0][3, 1] = math.inf
    return data


def _tracker(**kwargs: Any) -> LimitTracker:
    return LimitTracker(**({"particles": 32, "probe": torch.randn(4, 10)} | kwargs))


def _settings(**kwargs: Any) -> SweepSettings:
    return SweepSettings(**({"widths": [8, 16], "seeds": 2, "wandb": "disabled"} | kwargs))


def _sweep(tmp_path: Path, steps: int = 2, **kwargs: Any) -> WidthSweep:
    settings = _settings(out=str(tmp_path / "sweep"))
    data = IsotropicGaussians(n_train=16, n_val=8)
    return WidthSweep(_module(), data, steps, settings, **kwargs)


def _sweep_cli(tmp_path: Path, *flags: str) -> Any:
    tiny = ["--trainer.max_steps=2", "--widths", "8,16", "--seeds", "2", "--wandb", "disabled"]
    return sweep(["--config", RECIPE, *tiny, "--out", str(tmp_path / "cli"), *flags])


def _mismatched_state() -> None:
    state = _solver(lr=0.2).state_dict()
    _solver().load_state_dict(state)


def _damaged_state(steps: int = 3, value: float = 0.0) -> None:
    """Load a solver state whose step count or one particle was overwritten."""
    state = _solver().state_dict()
    state["steps"] = steps
    state["particles"]["layer2.weight"][3, 5] += value
    _solver().load_state_dict(state)


def _nan_weight_fit(tmp_path: Path) -> None:
    net = _net()
    with torch.no_grad():
        net.layer2.weight[0, 0] = math.nan
    _fit(tmp_path, _module(network=net), [])


def _empty_batch_fit(tmp_path: Path) -> None:
    """A loader whose collate function drops every row (a filter gone wrong)."""
    dataset = TensorDataset(*_batch())
    empty = DataLoader(dataset, batch_size=8, collate_fn=lambda rows: _batch(0))
    _fit(tmp_path, _module(), [], empty)


def _adam_on_sgd_groups() -> None:
    net = _net()
    optimizer = torch.optim.Adam(param_groups(net, lr=0.01))
    net(torch.randn(4, 10)).sum().backward()
    optimizer.step()


CASES: list[tuple[str, Case, type[Exception], str]] = [
    # layers
    ("layer-role", lambda _: MeanFieldLinear(10, 8, role="middle"), ValueError, "`role`"),
    ("layer-input-scale", lambda _: MeanFieldLinear(10, 8, role="hidden", input_scale=2.0),
     ValueError, "`input_scale`"),
    ("layer-in-features", lambda _: MeanFieldLinear(0, 8), ValueError, "`in_features`"),
    ("layer-input-scale-inf", lambda _: MeanFieldLinear(10, 8, role="input", input_scale=math.inf),
     ValueError, "`input_scale`"),
    ("layer-input-scale-nan", lambda _: MeanFieldLinear(10, 8, role="input", input_scale=math.nan),
     ValueError, "`input_scale`"),
    ("layer-init-overflows-float32", lambda _: MeanFieldLinear(10, 8, init=Normal(0, 1e300)),
     ValueError, "`init`"),
    ("layer-nan-init", lambda _: MeanFieldLinear(10, 8, init=lambda w: w.fill_(math.nan)),
     ValueError, "`init`"),
    ("conv1d-kernel-zero", lambda _: MeanFieldConv1d(3, 4, kernel_size=0), ValueError,
     "`kernel_size`"),
    ("conv2d-kernel-entry-zero", lambda _: MeanFieldConv2d(3, 4, kernel_size=(3, 0)), ValueError,
     "`kernel_size`"),
    ("conv-stride-zero", lambda _: MeanFieldConv1d(3, 4, 3, stride=0), ValueError, "`stride`"),
    ("conv-dilation-zero", lambda _: MeanFieldConv2d(3, 4, 3, dilation=0), ValueError,
     "`dilation`"),
    ("conv-padding-negative", lambda _: MeanFieldConv1d(3, 4, 3, padding=-1), ValueError,
     "`padding`"),
    # MLP
    ("mlp-no-widths", lambda _: MeanFieldMLP(10, []), ValueError, "`widths`"),
    ("mlp-zero-width", lambda _: MeanFieldMLP(10, [0, 8]), ValueError, "`widths[0]`"),
    ("mlp-activation", lambda _: MeanFieldMLP(10, [8], activations="nope"), ValueError,
     "`activations"),
    ("mlp-frozen", lambda _: MeanFieldMLP(10, [8], frozen=("layer9",)), ValueError, "`frozen`"),
    ("mlp-init-count", lambda _: MeanFieldMLP(10, [8], init=[Normal(0, 1)] * 3), ValueError,
     "`init`"),
    ("mlp-init-overflow-names-the-layer",
     lambda _: MeanFieldMLP(10, [8, 8], init=[Normal(0, 1), Normal(1, 1e300), Normal(0, 1)]),
     ValueError, "layer2: `init`"),
    ("mlp-input-scale-inf", lambda _: MeanFieldMLP(10, [8], input_scale=math.inf), ValueError,
     "`input_scale`"),
    ("law-negative-std", lambda _: Normal(0.0, -1.0), ValueError, "`std`"),
    ("mlp-feature-size", lambda _: _net()(torch.randn(4, 7)), ValueError, "`x`"),
    ("mlp-dtype", lambda _: _net()(torch.randn(4, 10, dtype=torch.float64)), ValueError, "`x`"),
    ("mlp-integer-input", lambda _: _net()(torch.ones(4, 10, dtype=torch.long)), ValueError,
     "`x`"),
    ("convnet-channels", lambda _: _convnet()(torch.randn(2, 5, 8, 8)), ValueError, "`x`"),
    ("convnet-no-channel-dim", lambda _: _convnet()(torch.randn(2, 8, 8)), ValueError, "`x`"),
    ("convnet-dtype", lambda _: _convnet()(torch.randn(2, 3, 8, 8, dtype=torch.float64)),
     ValueError, "`x`"),
    # module
    ("module-lr", lambda _: _module(lr=0.0), ValueError, "`lr`"),
    ("module-lr-inf", lambda _: _module(lr=math.inf), ValueError, "`lr`"),
    ("module-lr-nan", lambda _: _module(lr=math.nan), ValueError, "`lr`"),
    ("module-cross-entropy-one-output", lambda _: _module(loss="cross_entropy"), ValueError,
     "`loss`"),
    ("module-loss", lambda _: _module(loss="l1"), ValueError, "`loss`"),
    ("module-preset", lambda _: _module(preset="np"), ValueError, "`preset`"),
    ("module-rule", lambda _: _module(rule="sgdm"), ValueError, "`rule`"),
    ("module-network", lambda _: _module(network="mlp"), ValueError, "`network`"),
    ("module-adam-with-sgd-rule",
     lambda _: _module(optimizer=torch.optim.Adam).configure_optimizers(), ValueError,
     "`optimizer`"),
    ("module-non-finite-batch", lambda p: _fit(p, _module(), [], _nan_data()), ValueError,
     "`batch`"),
    ("module-empty-batch-is-not-a-divergence", _empty_batch_fit, ValueError, "`batch`"),
    ("module-nan-initial-weight-is-not-a-divergence", _nan_weight_fit, ValueError, "`network`"),
    ("optimizer-adam-on-sgd-groups", lambda _: _adam_on_sgd_groups(), ValueError, "`optimizer`"),
    # solver
    ("solver-lr", lambda _: _solver(lr=-1.0), ValueError, "`lr`"),
    ("solver-dtype", lambda _: _solver(dtype=torch.int32), ValueError, "`dtype`"),
    ("solver-dtype-float16", lambda _: _solver(dtype=torch.float16), ValueError, "`dtype`"),
    ("solver-dtype-bfloat16", lambda _: _solver(dtype=torch.bfloat16), ValueError, "`dtype`"),
    ("solver-dtype-name", lambda _: check_solver_dtype("float16", "solver_dtype"), ValueError,
     "`solver_dtype`"),
    ("solver-lr-inf", lambda _: _solver(lr=math.inf), ValueError, "`lr`"),
    ("solver-cross-entropy-one-output", lambda _: _solver(loss="cross_entropy"), ValueError,
     "`loss`"),
    ("solver-network", lambda _: _solver(network=nn.Linear(3, 3)), ValueError, "`network`"),
    ("solver-device", lambda _: _solver().step(torch.randn(4, 10, device="meta"), torch.randn(4)),
     ValueError, "`x`"),
    ("solver-nan-x", lambda _: _solver().step(torch.full((4, 10), math.nan), torch.randn(4)),
     ValueError, "`x`"),
    ("solver-y-length", lambda _: _solver().step(torch.randn(4, 10), torch.randn(3)), ValueError,
     "`y`"),
    ("solver-steps", lambda _: _solver().run(_batch(), steps=-1), ValueError, "`steps`"),
    ("solver-data", lambda _: _solver().run(5, steps=1), ValueError, "`data`"),  # type: ignore[arg-type]
    ("solver-saved-lr", lambda _: _mismatched_state(), ValueError, "`state_dict`"),
    ("solver-saved-negative-steps", lambda _: _damaged_state(steps=-5), ValueError,
     "`state_dict`"),
    ("solver-saved-nan-particle", lambda _: _damaged_state(value=math.nan), ValueError,
     "`state_dict`"),
    ("solver-saved-inf-particle", lambda _: _damaged_state(value=math.inf), ValueError,
     "`state_dict`"),
    # coupling
    ("coupling-width-above-m", lambda _: _solver().couple([64, 64]), ValueError, "`widths[0]`"),
    ("coupling-method", lambda _: _solver().couple([8, 8], method="bogus"), ValueError,
     "`method`"),
    ("coupling-widths-count", lambda _: _solver().couple([8]), ValueError, "`widths`"),
    # tracker
    ("tracker-particles", lambda _: _tracker(particles=0), ValueError, "`particles`"),
    ("tracker-probe", lambda _: _tracker(probe=None), ValueError, "`probe`"),
    ("tracker-probe-features", lambda p: _fit(p, _module(), [_tracker(probe=torch.randn(4, 7))]),
     ValueError, "`probe`"),
    ("tracker-solver-clock", lambda p: _fit(p, _module(), [_tracker(solver=_solver(lr=0.2))]),
     ValueError, "`solver`"),
    ("tracker-clipping", lambda p: _fit(p, _module(), [_tracker()], gradient_clip_val=1.0),
     ValueError, "gradient_clip_val"),
    ("tracker-solver-update", lambda p: _fit(
        p, _module(optimizer=functools.partial(torch.optim.SGD, momentum=0.9)),
        [_tracker(solver=_solver())]), ValueError, "momentum=0.9"),
    ("module-optimizer-lr", lambda _: _module(optimizer=functools.partial(torch.optim.SGD, lr=0.5)),
     ValueError, "lr=0.5"),
    ("sweep-trainer-clipping", lambda p: _sweep(p, trainer_kwargs={"gradient_clip_val": 1.0}),
     ValueError, "accumulate_grad_batches"),
    # sweep
    ("sweep-width", lambda _: _settings(widths=[0, 8]).validate(), ValueError, "`widths[0]`"),
    ("sweep-seeds", lambda _: _settings(seeds=0).validate(), ValueError, "`seeds`"),
    ("sweep-particles", lambda _: _settings(particles=8).validate(), ValueError, "`particles`"),
    ("sweep-wandb", lambda _: _settings(wandb="cloud").validate(), ValueError, "`wandb`"),
    ("sweep-solver-dtype", lambda _: _settings(solver_dtype="float16").validate(), ValueError,
     "`solver_dtype`"),
    ("sweep-steps", lambda p: _sweep(p, steps=0), ValueError, "`steps`"),
    ("wandb-project-path", lambda _: check_project("../x"), ValueError, "`project`"),
    ("wandb-project-empty", lambda _: check_project(""), ValueError, "`project`"),
    ("wandb-project-too-long", lambda _: check_project("p" * 129), ValueError, "`project`"),
    ("sweep-trainer-kwargs", lambda p: _sweep(p, trainer_kwargs={"devices": 2}), ValueError,
     "`trainer_kwargs`"),
    # datasets
    ("data-delta", lambda _: IsotropicGaussians(delta=1.5), ValueError, "`delta`"),
    ("data-batch-size", lambda _: IsotropicGaussians(batch_size=0), ValueError, "`batch_size`"),
    ("data-target", lambda _: IsotropicGaussians(target="onehot"), ValueError, "`target`"),
    ("data-num-workers", lambda _: MNIST(num_workers=-1), ValueError, "`num_workers`"),
    ("data-missing-files", lambda p: MNIST(root=p).setup(), DatasetNotFoundError,
     "download=True"),
    # configs and CLI
    ("config-foreign-class", lambda _: build({"class_path": "os.system"}), ValueError,
     "`class_path`"),
    ("config-class-path-typo", lambda _: build({"class_path": "mflightning.MeanFieldMLPP"}),
     ValueError, "Did you mean 'mflightning.MeanFieldMLP'"),
    ("config-init-args-typo",
     lambda _: build({"class_path": "mflightning.MeanFieldMLP",
                      "init_args": {"in_features": 3, "widths": [4], "activation": "tanh"}}),
     ValueError, "Did you mean 'activations'"),
    ("cli-sweep-particles", lambda p: _sweep_cli(p, "--particles", "4"), ValueError,
     "`particles`"),
]  # fmt: skip


def test_the_catalogue_is_large_and_unique() -> None:
    assert len(CASES) >= 30
    assert len({name for name, *_ in CASES}) == len(CASES)


@pytest.mark.parametrize(("case", "error", "argument"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])  # fmt: skip
def test_bad_input_is_refused_with_argument_and_fix(
    tmp_path: Path, case: Case, error: type[Exception], argument: str
) -> None:
    with pytest.raises(error) as info:
        case(tmp_path)
    assert type(info.value) is error  # the specific type, not a subclass or a generic error
    message = str(info.value)
    assert argument in message, message
    assert any(word in message.lower() for word in FIX_WORDS), f"no fix in: {message}"
    leftovers = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert not leftovers, f"partial files left behind: {leftovers}"
