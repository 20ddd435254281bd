import copy

import numpy as np
import pytest
import torch
from numpy_mf import NumpyMF
from torch import nn

from mflightning import MeanFieldConv1d, MeanFieldMLP, Normal, ParticleLimitSolver, param_groups
from mflightning.losses import mean_field_loss

CASES = {
    "L3-bias-mse": dict(
        widths=[40, 30],
        activations=["relu", "tanh", "identity"],
        init=[Normal(0.2, 1.0), Normal(1.0, 0.5), Normal(0.5, 1.0)],
        bias=True,
        bias_init=Normal(0.1, 0.3),
        loss="mse",
    ),
    "L4-half_mse": dict(
        widths=[40, 30, 20],
        activations=["tanh", "relu", "tanh", "identity"],  # odd first: a non-symmetric law (§B.3)
        init=[Normal(0.2, 1.0), Normal(1.0, 0.5), Normal(0.8, 0.5), Normal(0.3, 1.0)],
        loss="half_mse",
    ),
    "L4-frozen-ends": dict(
        widths=[40, 30, 20],
        activations=["relu", "tanh", "identity", "tanh"],
        init=[Normal(0.0, 1.0), Normal(1.0, 0.5), Normal(0.8, 0.5), Normal(0.3, 1.0)],
        bias=True,
        bias_init=Normal(0.0, 0.2),
        frozen=("input", "readout"),
        loss="mse",
    ),
}


def assert_same_particles(a: nn.Module, b: nn.Module) -> None:
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)


def make_data(n: int = 64, dim: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g, dtype=torch.float64)
    return x, torch.sin(x[:, 0] + x[:, 1] ** 2)


def make_solver(case: str, lr: float = 0.05, seed: int = 0) -> ParticleLimitSolver:
    spec = dict(CASES[case])
    loss = spec.pop("loss")
    net = MeanFieldMLP(5, generator=torch.Generator().manual_seed(seed), **spec)
    return ParticleLimitSolver(net, lr=lr, loss=loss)


def to_numpy(solver: ParticleLimitSolver, case: str) -> NumpyMF:
    """NP index order: w_1 as (n1, d), later layers transposed to (n_{i-1}, n_i)."""
    layers = solver.network.layers
    tensors = [layer.weight.detach().numpy().copy() for layer in layers]
    weights = [tensors[0]] + [w.T.copy() for w in tensors[1:]]
    with_bias = CASES[case].get("bias")
    biases = [layer.bias.detach().numpy().copy() for layer in layers] if with_bias else None
    frozen = {i for i, layer in enumerate(layers, 1) if layer.frozen}
    return NumpyMF(weights, CASES[case]["activations"], biases, frozen)


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_numpy_reference_for_20_steps(case: str) -> None:
    solver = make_solver(case)
    ref = to_numpy(solver, case)
    x, y = make_data()
    for _ in range(20):
        solver.step(x, y)
        ref.step(x.numpy(), y.numpy(), lr=0.05, loss=CASES[case]["loss"])
    np.testing.assert_allclose(solver(x)[:, 0].numpy(), ref.output(x.numpy()), rtol=0, atol=1e-9)
    for i, layer in enumerate(solver.network.layers):
        expected = ref.weights[i] if i == 0 else ref.weights[i].T
        np.testing.assert_allclose(layer.weight.detach().numpy(), expected, rtol=0, atol=1e-9)
        if ref.biases is not None:
            np.testing.assert_allclose(layer.bias.detach().numpy(), ref.biases[i], atol=1e-9)
    assert solver.steps == 20
    assert solver.time == pytest.approx(20 * 0.05)


def test_particles_moved_and_frozen_layers_stay_fixed() -> None:
    solver = make_solver("L4-frozen-ends")
    start = copy.deepcopy(solver.network)
    solver.run(make_data(), steps=3, progress=False)
    for before, after in zip(start.layers, solver.network.layers, strict=True):
        unchanged = torch.equal(before.weight, after.weight)
        assert unchanged == after.frozen


def test_step_is_one_sgd_step_with_param_groups() -> None:
    solver = make_solver("L3-bias-mse", lr=0.1)
    net = copy.deepcopy(solver.network)
    optimizer = torch.optim.SGD(param_groups(net, 0.1, rule="sgd"))
    x, y = make_data()
    for _ in range(3):
        solver.step(x, y)
        optimizer.zero_grad()
        mean_field_loss("mse", net(x), y).backward()
        optimizer.step()
    assert_same_particles(solver.network, net)


def test_network_is_copied_in_solver_dtype() -> None:
    net = MeanFieldMLP(5, [8, 6])
    original = copy.deepcopy(net.state_dict())
    solver = ParticleLimitSolver(net, lr=0.1)
    solver.run(make_data(), steps=2, progress=False)
    assert all(torch.equal(original[k], v) for k, v in net.state_dict().items())
    assert all(p.dtype == torch.float64 for p in solver.network.parameters())
    out = solver(torch.randn(3, 5))
    assert out.dtype == torch.float64 and not out.requires_grad and out.shape == (3, 1)


def test_run_population_and_cycled_batches() -> None:
    x, y = make_data()
    batches = [(x[:32], y[:32]), (x[32:], y[32:])]
    a, b, c = (make_solver("L4-half_mse") for _ in range(3))
    losses = a.run((x, y), steps=3, progress=False)
    assert len(losses) == 3 and losses[-1] < losses[0]
    for _ in range(3):
        b.step(x, y)
    c.run(batches, steps=5, progress=False)
    d = make_solver("L4-half_mse")
    for k in range(5):
        d.step(*batches[k % 2])
    assert_same_particles(a.network, b.network)
    assert_same_particles(c.network, d.network)


def test_state_dict_round_trip_is_bit_identical(tmp_path) -> None:
    data = make_data()
    uninterrupted = make_solver("L3-bias-mse")
    uninterrupted.run(data, steps=10, progress=False)

    first = make_solver("L3-bias-mse")
    first.run(data, steps=5, progress=False)
    torch.save(first.state_dict(), tmp_path / "solver.pt")
    resumed = make_solver("L3-bias-mse", seed=1)  # different particles, overwritten by the load
    resumed.load_state_dict(torch.load(tmp_path / "solver.pt", weights_only=True))
    assert resumed.steps == 5 and resumed.time == pytest.approx(0.25)
    first.run(data, steps=5, progress=False)
    resumed.run(data, steps=5, progress=False)
    assert_same_particles(first.network, uninterrupted.network)
    assert_same_particles(resumed.network, uninterrupted.network)


def test_tf32_off_during_steps_and_restored() -> None:
    solver = make_solver("L4-half_mse")
    seen = []
    hook = lambda *_: seen.append(torch.backends.cuda.matmul.allow_tf32)  # noqa: E731
    solver.network.layer1.register_forward_hook(hook)
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        solver.step(*make_data())
        solver(make_data()[0])
        assert seen == [False, False]
        assert torch.backends.cuda.matmul.allow_tf32 is True
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def test_sequential_conv_network_steps_like_sgd() -> None:
    g = torch.Generator().manual_seed(0)
    net = nn.Sequential(
        MeanFieldConv1d(2, 8, 3, role="input", generator=g),
        nn.Tanh(),
        MeanFieldConv1d(8, 6, 3, role="hidden", init=Normal(1.0, 0.5), generator=g),
        nn.ReLU(),
        MeanFieldConv1d(6, 1, 3, role="readout", generator=g),
        nn.Flatten(),
    ).double()
    x = torch.randn(16, 2, 10, generator=g, dtype=torch.float64)
    y = torch.randn(16, 4, generator=g, dtype=torch.float64)
    solver = ParticleLimitSolver(net, lr=0.1)
    optimizer = torch.optim.SGD(param_groups(net, 0.1, rule="sgd"))
    for _ in range(2):
        solver.step(x, y)
        optimizer.zero_grad()
        mean_field_loss("mse", net(x), y).backward()
        optimizer.step()
    assert_same_particles(solver.network, net)
    with pytest.raises(ValueError, match="MeanFieldMLP"):
        solver.couple([4, 3])


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        (dict(lr=0.0), "`lr`"),
        (dict(lr=-1.0), "`lr`"),
        (dict(lr=0.1, loss="l1"), "`loss`"),
        (dict(lr=0.1, dtype=torch.int64), "`dtype`"),
    ],
)
def test_bad_constructor_arguments(kwargs: dict, argument: str) -> None:
    with pytest.raises(ValueError, match=argument):
        ParticleLimitSolver(MeanFieldMLP(5, [4]), **kwargs)


def test_bad_network() -> None:
    with pytest.raises(ValueError, match="`network`"):
        ParticleLimitSolver(nn.Linear(3, 1), lr=0.1)
    with pytest.raises(ValueError, match="`network`"):
        ParticleLimitSolver(nn.Sequential(MeanFieldMLP(3, [4]), nn.Linear(1, 1)), lr=0.1)


def test_bad_batches() -> None:
    solver = make_solver("L4-half_mse")
    x, y = make_data()
    bad_x = x.clone()
    bad_x[3, 1] = float("nan")
    with pytest.raises(ValueError, match="`x`"):
        solver.step(bad_x, y)
    with pytest.raises(ValueError, match="`x`"):
        solver.step(x[:, 0], y)
    with pytest.raises(ValueError, match="`y`"):
        solver.step(x, y[:10])
    with pytest.raises(ValueError, match="`y`"):
        solver.step(x, torch.full_like(y, float("inf")))
    with pytest.raises(ValueError, match="`steps`"):
        solver.run((x, y), steps=-1)
    with pytest.raises(ValueError, match="`data`"):
        solver.run([], steps=1, progress=False)
    with pytest.raises(ValueError, match="`data`"):
        solver.run(3, steps=1)  # type: ignore[arg-type]
    assert solver.steps == 0


def test_load_state_dict_rejects_other_lr() -> None:
    state = make_solver("L4-half_mse", lr=0.05).state_dict()
    with pytest.raises(ValueError, match=r"`state_dict`.*lr"):
        make_solver("L4-half_mse", lr=0.1).load_state_dict(state)
