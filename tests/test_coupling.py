import numpy as np
import pytest
import torch
from conftest import single_thread

from mflightning import (
    Coupling,
    MeanFieldMLP,
    Normal,
    ParticleLimitSolver,
    fit_loglog_slope,
    param_groups,
)
from mflightning.data import isotropic_gaussians
from mflightning.functional import coupled_deviation, output_gap
from mflightning.losses import mean_field_loss
from mflightning.scaling import mean_field_layers


def make_solver(bias: bool = True, frozen: tuple[str, ...] = ()) -> ParticleLimitSolver:
    net = MeanFieldMLP(
        6,
        [512, 256],
        activations=["relu", "tanh", "identity"],
        bias=bias,
        bias_init=Normal(0.1, 0.5),
        frozen=frozen,
        generator=torch.Generator().manual_seed(0),
    )
    return ParticleLimitSolver(net, lr=0.1, loss="mse")


def weights(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: layer.weight.detach() for name, layer in mean_field_layers(net)}


def gd_step(net: torch.nn.Module, optimizer: torch.optim.Optimizer, x, y, loss: str) -> None:
    """One full-batch GD step of a finite network with the §1.2 multipliers."""
    optimizer.zero_grad()
    mean_field_loss(loss, net(x), y).backward()
    optimizer.step()


def test_subsample_equals_particles_at_t0() -> None:
    solver = make_solver()
    small, coupling = solver.couple([32, 16], generator=torch.Generator().manual_seed(1))
    assert isinstance(coupling, Coupling) and coupling.solver is solver
    s1, s2 = coupling.indices
    assert s1.shape == (32,) and s2.shape == (16,)
    assert len(set(s1.tolist())) == 32 and len(set(s2.tolist())) == 16  # without replacement
    assert int(s1.max()) < 512 and int(s2.max()) < 256
    big = solver.network
    expected = {
        "layer1": (big.layer1.weight[s1], big.layer1.bias[s1]),
        "layer2": (big.layer2.weight[s2][:, s1], big.layer2.bias[s2]),
        "layer3": (big.layer3.weight[:, s2], big.layer3.bias),
    }
    ideal_w, ideal_b = coupling.ideal_weights(), coupling.ideal_biases()
    for name, layer in mean_field_layers(small):
        assert torch.equal(layer.weight, expected[name][0])
        assert torch.equal(layer.bias, expected[name][1])
        assert torch.equal(ideal_w[name], expected[name][0])
        assert torch.equal(ideal_b[name], expected[name][1])
    assert small.widths == [32, 16] and small.layer1.weight.dtype == torch.float64

    x = torch.randn(20, 6, dtype=torch.float64)
    h1 = torch.relu(x @ expected["layer1"][0].T + expected["layer1"][1])
    h2 = torch.tanh(h1 @ expected["layer2"][0].T / 32 + expected["layer2"][1])
    manual = h2 @ expected["layer3"][0].T / 16 + expected["layer3"][1]
    torch.testing.assert_close(small(x), manual, rtol=1e-13, atol=1e-13)


def test_ideal_weights_follow_the_current_particles_and_frozen_layers() -> None:
    solver = make_solver(frozen=("input",))
    small, coupling = solver.couple([32, 16], generator=torch.Generator().manual_seed(2))
    x = torch.randn(64, 6, dtype=torch.float64)
    y = torch.tanh(x[:, 0])
    optimizer = torch.optim.SGD(param_groups(small, 0.1))
    for _ in range(5):
        solver.step(x, y)
        gd_step(small, optimizer, x, y, "mse")
    big, (s1, s2) = solver.network, coupling.indices
    ideal = coupling.ideal_weights()
    assert torch.equal(ideal["layer2"], big.layer2.weight.detach()[s2][:, s1])
    assert not torch.equal(ideal["layer2"], weights(small)["layer2"])  # both moved, differently
    assert torch.equal(ideal["layer1"], weights(small)["layer1"])  # frozen: never moves
    assert not small.layer1.weight.requires_grad


def test_bootstrap_dtype_and_reproducibility() -> None:
    solver = make_solver(bias=False)
    before = torch.random.get_rng_state()
    small, coupling = solver.couple(
        [600, 300], generator=torch.Generator().manual_seed(3), method="bootstrap",
        dtype=torch.float32,
    )  # fmt: skip
    assert torch.equal(torch.random.get_rng_state(), before)  # global RNG untouched
    assert coupling.method == "bootstrap" and coupling.ideal_biases() == {}
    assert len(set(coupling.indices[0].tolist())) < 600  # with replacement: duplicates
    assert small.layer2.weight.dtype == torch.float32
    torch.testing.assert_close(
        small.layer2.weight, coupling.ideal_weights()["layer2"].float(), rtol=0, atol=0
    )
    _, again = solver.couple(
        [600, 300], generator=torch.Generator().manual_seed(3), method="bootstrap"
    )
    for a, b in zip(coupling.indices, again.indices, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        (dict(widths=[32]), "`widths`"),
        (dict(widths=[32, 16, 8]), "`widths`"),
        (dict(widths=[513, 16]), r"`widths\[0\]`"),
        (dict(widths=[32, 0]), r"`widths\[1\]`"),
        (dict(widths=[32, 16], method="jackknife"), "`method`"),
        (dict(widths=[32, 16], generator=0), "`generator`"),
        (dict(widths=[32, 16], dtype=torch.int32), "`dtype`"),
    ],
)
def test_bad_coupling_arguments(kwargs: dict, argument: str) -> None:
    with pytest.raises(ValueError, match=argument):
        make_solver().couple(**kwargs)


# --- T-COUPLE (docs/theory.md §D.3, protocol §C.8) -----------------------------------------------


def t_couple(
    particles: int, widths: list[int], seeds: int, steps: int
) -> tuple[dict[int, list[float]], dict[int, list[dict[str, float]]]]:
    """NP L = 3 on isotropic Gaussians: output gaps and coupled deviations at T = steps * 0.1.

    One solver trajectory serves all seeds; a seed is an independent subsample at t = 0.
    """
    g = torch.Generator().manual_seed(0)
    x, y = isotropic_gaussians(256, 10, 0.4, g)
    probes, _ = isotropic_gaussians(512, 10, 0.4, g)
    net = MeanFieldMLP(
        10, [particles, particles], activations=["tanh", "tanh", "identity"],
        init=[Normal(0.0, 1.0), Normal(1.0, 0.5), Normal(0.0, 1.0)], generator=g,
    )  # fmt: skip
    solver = ParticleLimitSolver(net, lr=0.1, loss="half_mse")
    coupled = [
        (n, *solver.couple([n, n], generator=torch.Generator().manual_seed(100 * s + n)))
        for n in widths
        for s in range(seeds)
    ]
    solver.run((x, y), steps=steps, progress=False)
    x, y = x.double(), y.double()
    gaps: dict[int, list[float]] = {n: [] for n in widths}
    devs: dict[int, list[dict[str, float]]] = {n: [] for n in widths}
    limit = solver(probes)
    for n, small, coupling in coupled:
        optimizer = torch.optim.SGD(param_groups(small, 0.1))
        with single_thread():
            for _ in range(steps):
                gd_step(small, optimizer, x, y, "half_mse")
        with torch.no_grad():
            gaps[n].append(float(output_gap(small(probes.double()), limit)))
        deviation = coupled_deviation(weights(small), coupling.ideal_weights())
        devs[n].append({name: float(value) for name, value in deviation.items()})
    return gaps, devs


@pytest.mark.parametrize(
    ("particles", "widths"),
    [
        pytest.param(2048, [32, 64, 128, 256], marks=pytest.mark.slow, id="M2048"),
        pytest.param(512, [8, 16, 32, 64], id="M512"),
    ],
)
def test_t_couple_output_gap_and_deviations_shrink_like_sqrt_width(
    particles: int, widths: list[int]
) -> None:
    """§D.3: T = 10, 8 subsample seeds; slope of the RMS output gap ~ -1/2.

    The acceptance size (M = 2048, N up to 256) is slow; the CI size (M = 512, N up to 64) gave
    slopes -0.42 to -0.56 over six data seeds.
    """
    gaps, devs = t_couple(particles=particles, widths=widths, seeds=8, steps=100)
    fit = fit_loglog_slope(gaps)
    assert -0.75 <= fit.slope <= -0.3, fit
    for layer in ("layer1", "layer2", "layer3"):
        medians = [np.median([d[layer] for d in devs[n]]) for n in widths]
        assert medians[-1] < medians[0], (layer, medians)
