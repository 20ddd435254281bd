"""LimitTracker: lockstep with training, coupling at fit start, logged gaps, resume, validation."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from mflightning import MeanFieldMLP, MeanFieldModule, Normal, ParticleLimitSolver
from mflightning.callbacks import LimitTracker
from mflightning.data import IsotropicGaussians

LAWS = [Normal(0.0, 1.0), Normal(1.0, 0.5), Normal(0.5, 1.0)]


def _net(width: int) -> MeanFieldMLP:
    return MeanFieldMLP(10, [width, width], activations=["relu", "tanh", "identity"], init=LAWS)


def _data(batch_size: int | None = None) -> IsotropicGaussians:
    return IsotropicGaussians(n_train=64, n_val=16, batch_size=batch_size, seed=3)


def _trainer(tmp_path: Path, max_steps: int, callbacks: list, **kwargs) -> Trainer:
    defaults = dict(
        default_root_dir=tmp_path, accelerator="cpu", devices=1, max_steps=max_steps,
        logger=CSVLogger(tmp_path), log_every_n_steps=1, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, enable_checkpointing=False,
        callbacks=callbacks,
    )  # fmt: skip
    return Trainer(**(defaults | kwargs))


def _probe() -> tuple[torch.Tensor, torch.Tensor]:
    return _data().val_set.tensors


@pytest.mark.parametrize("batch_size", [None, 16])
def test_full_width_coupling_tracks_the_solver_exactly(
    tmp_path: Path, batch_size: int | None
) -> None:
    """With N = M the coupled network is a permutation of the particles: gaps stay at rounding.

    Any off-by-one between the solver's steps and the optimizer's, or a different batch, breaks it.
    """
    module = MeanFieldModule(_net(32), lr=0.1, loss="half_mse")
    tracker = LimitTracker(particles=32, every_n_steps=4, probe=_probe())
    trainer = _trainer(tmp_path, 12, [tracker], precision="64-true")
    trainer.fit(module, _data(batch_size))
    assert tracker.solver is not None and tracker.solver.steps == 12
    assert tracker.solver.time == pytest.approx(module.mf_time)
    gaps = tracker.last_gaps
    assert gaps["limit/output_gap"] < 1e-10 and gaps["limit/loss_gap"] < 1e-10
    assert all(gaps[f"limit/dev/layer{i}"] < 1e-10 for i in (1, 2, 3))
    assert gaps["limit/time"] == pytest.approx(1.2) and gaps["mf_time"] == pytest.approx(1.2)


def test_population_limit_differs_from_minibatch_training(tmp_path: Path) -> None:
    """Negative control: the solver on the full population is not the minibatch trajectory."""
    data = _data(16)
    module = MeanFieldModule(_net(32), lr=0.1, loss="half_mse")
    tracker = LimitTracker(particles=32, every_n_steps=4, probe=_probe(), data="population",
                           population=data.train_set.tensors)  # fmt: skip
    _trainer(tmp_path, 12, [tracker], precision="64-true").fit(module, data)
    assert tracker.last_gaps["limit/output_gap"] > 1e-4


def test_coupled_small_network_starts_on_its_ideal_particles(tmp_path: Path) -> None:
    module = MeanFieldModule(_net(16), lr=0.1, loss="half_mse")
    tracker = LimitTracker(particles=128, every_n_steps=5, probe=_probe()[0], seed=7)
    _trainer(tmp_path, 10, [tracker]).fit(module, _data())
    (metrics_file,) = tmp_path.glob("**/metrics.csv")
    with metrics_file.open() as f:
        rows = [r for r in csv.DictReader(f) if r.get("limit/output_gap")]
    assert [int(r["step"]) for r in rows] == [0, 5, 10]
    start = rows[0]
    for i in (1, 2, 3):
        assert float(start[f"limit/dev/layer{i}"]) < 1e-6  # float32 copy of float64 particles
        assert float(rows[-1][f"limit/dev/layer{i}"]) > 1e-6  # then the width-16 net drifts away
    assert float(start["limit/output_gap"]) > 1e-3  # a width-16 average is not the M-average
    assert "limit/loss_gap" not in start or not start["limit/loss_gap"]  # no targets given
    for row in rows:
        assert float(row["limit/time"]) == pytest.approx(float(row["mf_time"]))


def test_given_solver_is_used_and_uncoupled_tracking_leaves_the_weights(tmp_path: Path) -> None:
    net = _net(16)
    before = [p.clone() for p in net.parameters()]
    solver = ParticleLimitSolver(net.with_widths([64, 64]), lr=0.1, loss="half_mse")
    tracker = LimitTracker(solver, probe=_probe(), couple=False, every_n_steps=1)
    module = MeanFieldModule(net, lr=0.1, loss="half_mse")
    trainer = _trainer(tmp_path, 1, [tracker])
    trainer.fit(module, _data())
    assert solver.steps == 1 and tracker.coupling is None
    assert "limit/dev/layer1" not in tracker.last_gaps and "limit/loss_gap" in tracker.last_gaps
    moved = [not torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True)]
    assert all(moved)  # trained from its own init, not overwritten by particles


def test_resume_continues_the_same_limit_trajectory(tmp_path: Path) -> None:
    def run(root: Path, max_steps: int, ckpt_path: Path | None = None) -> tuple:
        torch.manual_seed(0)
        module = MeanFieldModule(_net(16), lr=0.1, loss="half_mse")
        tracker = LimitTracker(particles=64, every_n_steps=2, probe=_probe())
        checkpoint = ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=3, save_top_k=-1)
        trainer = _trainer(root, max_steps, [tracker, checkpoint], enable_checkpointing=True)
        trainer.fit(module, _data(), ckpt_path=ckpt_path)
        return module, tracker

    full_module, full_tracker = run(tmp_path / "full", 6)
    run(tmp_path / "part", 3)
    (saved,) = (tmp_path / "part" / "ckpt").glob("*.ckpt")
    ckpt = saved.rename(tmp_path / saved.name)  # resumed in place, into an empty ckpt folder
    torch.load(ckpt, weights_only=True)  # the tracker state is plain data
    resumed_module, resumed_tracker = run(tmp_path / "part", 6, ckpt_path=ckpt)
    for a, b in zip(full_module.parameters(), resumed_module.parameters(), strict=True):
        assert torch.equal(a, b)
    full_state = full_tracker.solver.state_dict()["particles"]
    resumed_state = resumed_tracker.solver.state_dict()["particles"]
    assert all(torch.equal(full_state[k], resumed_state[k]) for k in full_state)
    assert resumed_tracker.last_gaps == full_tracker.last_gaps


@pytest.mark.parametrize(
    ("solver_kwargs", "module_kwargs", "message"),
    [
        ({"lr": 0.2}, {}, "time step"),
        ({"loss": "mse"}, {}, "loss"),
        ({}, {"network": MeanFieldMLP(10, [8, 8], activations="tanh", init=LAWS)}, "architecture"),
    ],
)
def test_mismatched_solver_is_refused(
    tmp_path: Path, solver_kwargs: dict, module_kwargs: dict, message: str
) -> None:
    solver = ParticleLimitSolver(_net(32), **({"lr": 0.1, "loss": "half_mse"} | solver_kwargs))
    module = MeanFieldModule(
        **({"network": _net(8), "lr": 0.1, "loss": "half_mse"} | module_kwargs)
    )
    with pytest.raises(ValueError, match=message):
        _trainer(tmp_path, 1, [LimitTracker(solver, probe=_probe())]).fit(module, _data())


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"particles": None}, "solver"),
        ({"particles": 0}, "particles"),
        ({"every_n_steps": 0}, "every_n_steps"),
        ({"data": "online"}, "data"),
        ({"data": "population"}, "population"),
        ({"probe": None}, "probe"),
        ({"dtype": torch.int64}, "dtype"),
    ],
)
def test_bad_tracker_arguments(kwargs: dict, argument: str) -> None:
    args = {"particles": 32, "probe": torch.randn(4, 10)} | kwargs
    with pytest.raises(ValueError, match=f"`{argument}`"):
        LimitTracker(**args)


DEEP_LAWS = [Normal(0.0, 1.0), Normal(1.0, 0.5), Normal(1.0, 0.5), Normal(0.0, 2.0)]


def _deep_module(width: int) -> MeanFieldModule:
    net = MeanFieldMLP(
        10, [width] * 3, activations=["relu", "tanh", "tanh", "identity"], init=DEEP_LAWS,
        generator=torch.Generator().manual_seed(1),
    )  # fmt: skip
    return MeanFieldModule(net, lr=0.2, loss="half_mse")


@pytest.mark.parametrize(("steps", "leaves"), [(20, False), (200, True)])
def test_tracker_on_a_deep_iid_network_warns_once_when_it_leaves_the_exact_limit(
    tmp_path: Path, steps: int, leaves: bool
) -> None:
    """docs/theory.md §D.4: a width-16 iid 4-layer net escapes its degenerate limit; r > 1/2."""
    from mflightning import ReducedLimitSolver

    module = _deep_module(16)
    data = IsotropicGaussians(n_train=256, n_val=128, seed=0)
    tracker = LimitTracker(particles=2048, every_n_steps=10, probe=data.val_set.tensors)
    with pytest.warns() as record:
        _trainer(tmp_path, steps, [tracker]).fit(module, data)
    assert isinstance(tracker.solver, ReducedLimitSolver)  # limit="auto" on a deep iid MLP
    left = [w for w in record if "left its mean-field limit" in str(w.message)]
    rows = list(csv.DictReader(open(next(Path(tmp_path).rglob("metrics.csv")))))
    key = "limit/relative_output_gap"
    relative = [float(r[key]) for r in rows if r[key]]
    assert len(relative) == steps // 10 + 1 and relative[0] < 0.5
    if leaves:
        assert len(left) == 1 and tracker.left_limit_at is not None
        step = tracker.left_limit_at["step"]
        assert f"at step {step} " in str(left[0].message) and 0 < step <= steps
        assert tracker.left_limit_at["mf_time"] == pytest.approx(0.2 * step)
        assert max(relative) > 0.5
    else:
        assert not left and tracker.left_limit_at is None and max(relative) <= 0.5


def test_tracker_limit_reduced_refuses_a_network_it_cannot_integrate(tmp_path: Path) -> None:
    module = MeanFieldModule(
        MeanFieldMLP(10, [8, 8, 8], init=DEEP_LAWS, bias=True, bias_init=Normal(0.0, 1.0)),
        lr=0.1,
        loss="half_mse",
    )
    tracker = LimitTracker(particles=64, limit="reduced", probe=_probe())
    with pytest.raises(ValueError, match=r"non-constant initial biases.*--limit particles"):
        _trainer(tmp_path, 2, [tracker]).fit(module, _data())
    assert module.mf_time == 0.0
