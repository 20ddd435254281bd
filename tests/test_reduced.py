"""ReducedLimitSolver (docs/theory.md §B.3/§B.4) against the brute-force solver; §D.3 T-REDUCED,
T-DEGEN and T-ARAUJO; degeneracy diagnostics (§C.6)."""

from __future__ import annotations

import multiprocessing
import threading
from collections.abc import Sequence

import numpy as np
import pytest
import torch
from conftest import loglog_slope, single_thread
from torch import Tensor, nn

from mflightning import (
    MeanFieldConv1d,
    MeanFieldMLP,
    MeanFieldModule,
    Normal,
    ParticleLimitSolver,
    ReducedLimitSolver,
    TrivialLimitWarning,
    param_groups,
)
from mflightning.activations import ACTIVATIONS
from mflightning.degeneracy import effective_rank, middle_displacement_variance
from mflightning.functional import coupled_deviation, neuron_spread
from mflightning.guards import DivergenceError
from mflightning.limit import endatoms, native
from mflightning.limit.cost import ReducedCost, default_atoms, step_seconds
from mflightning.limit.endatoms import KERNELS
from mflightning.losses import mean_field_loss
from mflightning.scaling import mean_field_layers

pytestmark = pytest.mark.usefixtures("float64_default")  # middle weights exactly mu_i (§D.3)

MEANS = (1.0, 0.8, 0.9, 0.7)  # mu_2, mu_3, ... of the middle laws (§D.3 T-REDUCED)
LR = 0.1


def reduced_data(n: int = 100, dim: int = 5, seed: int = 1234) -> tuple[Tensor, Tensor]:
    """§D.3 T-REDUCED: X ~ N(0, I), y = tanh(g + x_1) with g ~ N(0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=gen)
    return x, torch.tanh(torch.randn(n, generator=gen) + x[:, 0])


def reduced_net(
    widths: Sequence[int], tau: float, seed: int = 0, frozen: Sequence[str] = ()
) -> MeanFieldMLP:
    """ReLU first layer, tanh middle, identity readout; N(0, I), N(mu_i, tau^2), N(0.5, 1)."""
    depth = len(widths) + 1
    init = [Normal(0.0, 1.0), *(Normal(MEANS[i], tau) for i in range(depth - 2)), Normal(0.5, 1.0)]
    return MeanFieldMLP(
        5,
        widths,
        activations=["relu"] + ["tanh"] * (depth - 2) + ["identity"],
        init=init,
        frozen=frozen,
        generator=torch.Generator().manual_seed(seed),
    )


def solve_both(
    net: MeanFieldMLP, steps: int = 20
) -> tuple[ParticleLimitSolver, ReducedLimitSolver, list[float], list[float]]:
    data = reduced_data()
    brute = ParticleLimitSolver(net, LR, loss="half_mse")
    reduced = ReducedLimitSolver(net, LR, loss="half_mse")
    return brute, reduced, brute.run(data, steps, False), reduced.run(data, steps, False)


def relative_gap(brute: ParticleLimitSolver, reduced: ReducedLimitSolver) -> float:
    x = reduced_data()[0]
    return ((brute(x) - reduced(x)).norm() / brute(x).norm()).item()


EXACT_CASES = {
    "L2": dict(widths=[48]),
    "L3": dict(widths=[48, 40]),
    "L4": dict(widths=[64, 40, 48]),
    "L5": dict(widths=[64, 40, 30, 48]),
    "L6": dict(widths=[32, 40, 30, 20, 48]),
    "L4-araujo": dict(widths=[64, 40, 48], frozen=("input", "readout")),
    "L3-araujo": dict(widths=[48, 40], frozen=("input", "readout")),
}


@pytest.mark.parametrize("case", sorted(EXACT_CASES))
def test_exact_when_middle_laws_are_constant(case: str) -> None:
    """tau_i = 0: the degeneracy is exact at every M, so R_M == S_M to rounding (§D.3)."""
    net = reduced_net(**EXACT_CASES[case], tau=0.0)
    brute, reduced, brute_losses, reduced_losses = solve_both(net)
    np.testing.assert_allclose(reduced_losses, brute_losses, rtol=0, atol=1e-13)
    assert relative_gap(brute, reduced) < 1e-12
    assert reduced.steps == 20 and reduced.time == pytest.approx(20 * LR)
    # the fields are the brute-force weights: w_i(t) = mu_i + g_i / + w_i#, end layers = atoms
    layers, fields, depth = brute.network.layers, reduced.fields, net.depth
    torch.testing.assert_close(fields["w1"], layers[0].weight, rtol=0, atol=1e-12)
    torch.testing.assert_close(fields[f"w{depth}"], layers[-1].weight, rtol=0, atol=1e-12)
    expected = {2: fields["g2"]} if depth == 3 else {}
    if depth >= 4:
        expected = {2: fields["g2"][None, :], depth - 1: fields[f"g{depth - 1}"][:, None]}
        expected |= {i: fields[f"w{i}#"] for i in range(3, depth - 1)}
    for i, offset in expected.items():
        displacement = layers[i - 1].weight - MEANS[i - 2]
        torch.testing.assert_close(displacement, offset.expand_as(displacement), atol=1e-12, rtol=0)
    if "araujo" in case:
        torch.testing.assert_close(fields["w1"], net.layer1.weight.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("depth", [3, 4, 5])
def test_exact_for_several_outputs_cross_entropy_and_input_scale(depth: int) -> None:
    """tau_i = 0 exactness with C = 3 logits, loss "cross_entropy", gelu/sigmoid, input_scale."""
    gen = torch.Generator().manual_seed(5)
    x, y = torch.randn(60, 5, generator=gen), torch.randint(0, 3, (60,), generator=gen)
    net = MeanFieldMLP(
        5,
        [16] * (depth - 1),
        out_features=3,
        activations=["gelu"] + ["sigmoid"] * (depth - 2) + ["identity"],
        init=[Normal(0.1, 1.0)] + [Normal(0.7, 0.0)] * (depth - 2) + [Normal(0.2, 1.0)],
        input_scale=0.5,
        generator=gen,
    )
    brute = ParticleLimitSolver(net, 0.3, loss="cross_entropy")
    reduced = ReducedLimitSolver(net, 0.3, loss="cross_entropy")
    losses = brute.run((x, y), 15, progress=False)
    np.testing.assert_allclose(reduced.run((x, y), 15, progress=False), losses, rtol=0, atol=1e-13)
    assert losses[-1] < losses[0] - 1e-3
    torch.testing.assert_close(reduced(x), brute(x), rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    ("depth", "frozen"),
    [(2, ())] + [(d, f) for d in (3, 4, 5) for f in [(), ("input", "readout")]],
)
def test_exact_with_biases(depth: int, frozen: tuple[str, ...]) -> None:
    """tau_i = 0 exactness with iid end-atom biases (b_1, b_{L-1}, readout) and constant biases
    in the degenerate layers (§B.3), two outputs, loss "mse"."""
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(60, 5, generator=gen)
    y = torch.stack([torch.tanh(x[:, 0]), x[:, 1].cos()], dim=1)
    net = biased_net(depth, [16, 12, 10, 14][: depth - 1], frozen, out_features=2, generator=gen)
    brute = ParticleLimitSolver(net, LR)
    reduced = ReducedLimitSolver(net, LR)
    losses = brute.run((x, y), 15, progress=False)
    np.testing.assert_allclose(reduced.run((x, y), 15, progress=False), losses, rtol=0, atol=1e-13)
    assert losses[-1] < losses[0] - 1e-3
    torch.testing.assert_close(reduced(x), brute(x), rtol=0, atol=1e-12)
    torch.testing.assert_close(reduced.fields["b1"], brute.network.layer1.bias, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "widths",
    [
        pytest.param([128, 256, 512, 1024], marks=pytest.mark.slow, id="M1024"),
        pytest.param([64, 128, 256, 512], id="M512"),
    ],
)
def test_shared_atom_gap_shrinks_like_one_over_m(widths: list[int]) -> None:
    """tau_i = 0.5, shared end atoms: ||y_S - y_R|| / ||y_S|| ~ M^-1 (§D.3 found -0.96).

    Seeds 0-3 give slopes -0.85 (M up to 1024) and -1.18 (M up to 512; seeds 4-7: -0.89).
    """
    gaps = [
        np.mean(
            [relative_gap(*solve_both(reduced_net([m] * 3, 0.5, seed))[:2]) for seed in range(4)]
        )
        for m in widths
    ]
    assert gaps[0] < 2e-2
    assert -1.4 <= loglog_slope(widths, gaps) <= -0.6, gaps


def test_translation_is_the_mean_displacement_of_middle_weights() -> None:
    """L = 5: w_3#(t) = mean of W_3(t) - W_3(0), and the displacement's variance over entries
    shrinks with M (§C.6).

    Tolerance: §D.3 reports a relative 5e-3 at M >= 512, but the absolute error is O(1/M)
    (~1e-4 at M = 512, ~2e-5 at 1024) while |w_3#(2)| varies with the atoms (6e-3 to 2e-2), so the
    relative error at M = 512 ranges over 4e-3 to 3e-2 across seeds; at M = 1024 it is 1.3e-3.
    """
    variances = []
    for m in (128, 1024):
        net = reduced_net([m] * 4, 0.5)
        brute, reduced, _, _ = solve_both(net)
        now, start = brute.network.layer3.weight.detach(), net.layer3.weight.detach()
        translation = reduced.fields["w3#"]
        error = abs((now - start).mean() - translation) / abs(translation)
        variances.append(middle_displacement_variance(now, start).item())
    assert abs(translation) > 1e-3  # the middle layer moved
    assert error < 5e-3, error
    assert variances[1] < variances[0] / 2, variances


def degen_spreads(widths: Sequence[int], seeds: int = 3) -> np.ndarray:
    """§D.3 T-DEGEN at T = 4: mean over seeds of (S_1, S_2, S_3, erank(H_3) - 1) per width."""
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (256,), generator=gen) * 2.0 - 1.0
    x = torch.randn(256, 10, generator=gen) * torch.where(y > 0, 1.4, 0.6)[:, None]
    rows = []
    for n in widths:
        per_seed = []
        for seed in range(seeds):
            net = MeanFieldMLP(
                10,
                [n] * 3,
                activations=["relu", "tanh", "tanh", "identity"],
                init=[Normal(0.0, 1.0), Normal(1.0, 0.5), Normal(1.0, 0.5), Normal(0.0, 2.0)],
                generator=torch.Generator().manual_seed(10 + seed),
            )
            solver = ParticleLimitSolver(net, 0.2, loss="half_mse")
            solver.run((x, y), 20, progress=False)
            h = solver.network.hidden_preactivations(x)
            spreads = [neuron_spread(h[i]).item() for i in range(3)]
            per_seed.append([*spreads, effective_rank(h[2]).item() - 1])
        rows.append(np.mean(per_seed, axis=0))
    return np.array(rows)


def check_degeneracy(widths: list[int]) -> None:
    rows = degen_spreads(widths)
    slopes = [loglog_slope(widths, rows[:, j]) for j in range(4)]
    assert -0.75 <= slopes[1] <= -0.3, slopes  # degenerate middle layer (§C.6: -0.505)
    assert slopes[0] > -0.1, slopes  # first layer stays heterogeneous
    assert slopes[3] < -0.3, slopes  # last hidden layer tends to rank one (L = 4)


def test_middle_layer_degenerates_small() -> None:
    """T-DEGEN (§D.3) at N in {128, 256, 512}; the full grid is the slow test below."""
    check_degeneracy([128, 256, 512])


@pytest.mark.slow
def test_middle_layer_degenerates() -> None:
    """T-DEGEN (§D.3): N in {128, ..., 1024}, lr 0.2, T = 4, 3 seeds."""
    check_degeneracy([128, 256, 512, 1024])


def test_araujo_frozen_ends_gap_shrinks_with_m() -> None:
    """Araújo–Oliveira–Yukimura (xi_1 = xi_L = 0), L = 3, tau = 0.5: R_M vs S_M with shared
    atoms; the ends never move and the gap shrinks with M while the output moves O(1)."""
    widths, gaps = [64, 128, 256], []
    for m in widths:
        per_seed = []
        for seed in range(3):
            net = reduced_net([m, m], 0.5, seed, frozen=("input", "readout"))
            brute, reduced, _, _ = solve_both(net)
            per_seed.append(relative_gap(brute, reduced))
            torch.testing.assert_close(reduced.fields["w3"], net.layer3.weight.detach())
        gaps.append(np.mean(per_seed))
    x = reduced_data()[0]
    assert (reduced(x) - net(x)).norm() > 0.1 * net(x).norm()
    assert gaps[-1] < 2e-2
    assert loglog_slope(widths, gaps) < -0.5, gaps


def antithetic_tanh_net(tau: float) -> MeanFieldMLP:
    """tanh everywhere, w_1 ~ N(0, I), readout N(0, 1), middle mean 1; atoms in +/- pairs so that
    their empirical laws are exactly symmetric, as the limit's laws are."""
    net = MeanFieldMLP(
        5,
        [32, 32, 32],
        activations=["tanh", "tanh", "tanh", "identity"],
        init=[Normal(0.0, 1.0), Normal(1.0, tau), Normal(1.0, tau), Normal(0.0, 1.0)],
        generator=torch.Generator().manual_seed(3),
    )
    with torch.no_grad():
        net.layer1.weight[16:] = -net.layer1.weight[:16]
        net.layer4.weight[:, 16:] = -net.layer4.weight[:, :16]
    return net


@pytest.mark.parametrize(
    ("solver_class", "tau"), [(ReducedLimitSolver, 0.5), (ParticleLimitSolver, 0.0)]
)
def test_odd_first_activation_gives_stationary_limit(
    solver_class: type[ReducedLimitSolver | ParticleLimitSolver], tau: float
) -> None:
    """Odd phi_1, symmetric rho^1, zero-mean readout: H_2* = 0 and every drift vanishes (§B.3)."""
    x, y = reduced_data()
    with pytest.warns(TrivialLimitWarning, match="odd first activation"):  # said at construction
        net = antithetic_tanh_net(tau)
    solver = solver_class(net, LR, loss="half_mse")
    before = solver(x)
    losses = solver.run((x, y), 10, progress=False)
    assert (solver(x) - before).abs().max() < 1e-12
    np.testing.assert_allclose(losses, losses[0], rtol=0, atol=1e-12)


def test_odd_first_activation_warns_at_module_construction() -> None:
    with pytest.warns(TrivialLimitWarning, match="odd first activation"):
        MeanFieldModule(antithetic_tanh_net(0.5), lr=LR)


def test_state_dict_round_trip_is_bit_identical(tmp_path) -> None:
    data = reduced_data()
    net = reduced_net([32, 32, 32, 32], 0.5)
    solver = ReducedLimitSolver(net, LR)
    solver.run(data, 3, progress=False)
    torch.save(solver.state_dict(), tmp_path / "reduced.pt")
    resumed = ReducedLimitSolver(net, LR)
    resumed.load_state_dict(torch.load(tmp_path / "reduced.pt", weights_only=True))
    assert resumed.steps == 3
    solver.run(data, 2, progress=False)
    resumed.run(data, 2, progress=False)
    assert torch.equal(solver(data[0]), resumed(data[0]))
    with pytest.raises(ValueError, match=r"lr=0\.1"):
        ReducedLimitSolver(net, 0.2).load_state_dict(solver.state_dict())
    with pytest.raises(ValueError, match="same architecture"):
        ReducedLimitSolver(reduced_net([16, 32, 32, 32], 0.5), LR).load_state_dict(
            solver.state_dict()
        )


def test_divergence_raises_and_keeps_the_state() -> None:
    x, y = reduced_data()
    solver = ReducedLimitSolver(reduced_net([16, 16, 16], 0.5), 1e6)
    with pytest.raises(DivergenceError, match="reduced limit solver diverged"):
        solver.run((x, y), 50, progress=False)
    assert all(torch.isfinite(value).all() for value in solver.fields.values())


def biased_net(
    depth: int,
    widths: Sequence[int],
    frozen: Sequence[str] = (),
    out_features: int = 1,
    generator: torch.Generator | None = None,
) -> MeanFieldMLP:
    """tau = 0 middle laws, iid end-atom and readout biases, constant degenerate biases.

    Drawn from ``generator`` (default: a fresh one seeded 6).
    """
    gen = torch.Generator().manual_seed(6) if generator is None else generator
    net = MeanFieldMLP(
        5,
        widths,
        out_features=out_features,
        activations=["relu"] + ["tanh"] * (depth - 2) + ["identity"],
        init=[Normal(0.1, 1.0)] + [Normal(0.7, 0.0)] * (depth - 2) + [Normal(0.2, 1.0)],
        bias=True,
        bias_init=Normal(0.3, 0.0),
        frozen=frozen,
        generator=gen,
    )
    with torch.no_grad():
        for i in {1, depth - 1, depth}:
            net.layers[i - 1].bias.normal_(generator=gen)
    return net


def layer_weights(net: nn.Module) -> dict[str, Tensor]:
    return {name: layer.weight.detach() for name, layer in mean_field_layers(net)}


@pytest.mark.parametrize("depth", [2, 3, 4, 5])
def test_ideal_weights_are_the_network_at_t0(depth: int) -> None:
    """A fresh network with its own draws; ideal particles = its weights, float32 included."""
    solver = ReducedLimitSolver(reduced_net([24] * (depth - 1), 0.5), LR)
    widths = [6, 5, 4, 7][: depth - 1]
    small, coupling = solver.couple(widths, generator=torch.Generator().manual_seed(3))
    assert isinstance(small, MeanFieldMLP) and small.widths == widths
    assert coupling.solver is solver and coupling.method == "ideal"
    assert small.layer1.weight.dtype == torch.float64
    ideal = coupling.ideal_weights()
    assert ideal.keys() == layer_weights(small).keys()
    for name, weight in layer_weights(small).items():
        assert torch.equal(ideal[name], weight), name
    again, _ = solver.couple(widths, generator=torch.Generator().manual_seed(3))
    assert torch.equal(again.layer1.weight, small.layer1.weight)  # drawn from `generator`
    small32, coupling32 = solver.couple(widths, dtype=torch.float32)
    assert small32.layer1.weight.dtype == torch.float32
    for name, weight in layer_weights(small32).items():
        assert torch.equal(coupling32.ideal_weights()[name], weight.double()), name


@pytest.mark.parametrize(
    ("depth", "frozen"),
    [(2, ())] + [(d, f) for d in (3, 4, 5) for f in [(), ("input", "readout")]],
)
def test_ideal_particles_match_subsampled_particles_at_tau0(
    depth: int, frozen: tuple[str, ...]
) -> None:
    """tau = 0: a subsample of the brute-force particles and the same network coupled to R_M by
    ideal-particle integration follow the same trajectories (§B.4 items 1 and 3); biases too."""
    net = biased_net(depth, [40, 36, 30, 32][: depth - 1], frozen)
    x, y = reduced_data(60)
    brute = ParticleLimitSolver(net, LR)
    small, subsampled = brute.couple([8, 7, 6, 5][: depth - 1], torch.Generator().manual_seed(2))
    reduced, uncoupled = ReducedLimitSolver(net, LR), ReducedLimitSolver(net, LR)
    same, ideal = reduced.couple(small.widths, network=small)
    assert same is small
    before = {name: weight.clone() for name, weight in layer_weights(small).items()}
    brute_losses = brute.run((x, y), 10, progress=False)
    losses = reduced.run((x, y), 10, progress=False)
    assert losses == uncoupled.run((x, y), 10, progress=False)  # tracers add exactly zero
    np.testing.assert_allclose(losses, brute_losses, rtol=0, atol=1e-13)
    expected, got = subsampled.ideal_weights(), ideal.ideal_weights()
    for name, weight in expected.items():
        assert (weight - before[name]).abs().max() > 1e-4 or net.get_submodule(name).frozen
        torch.testing.assert_close(got[name], weight, rtol=0, atol=1e-10)
    expected, got = subsampled.ideal_biases(), ideal.ideal_biases()
    assert got.keys() == expected.keys()
    for name, bias in expected.items():
        torch.testing.assert_close(got[name], bias, rtol=0, atol=1e-10)
    assert all(torch.equal(layer_weights(small)[name], w) for name, w in before.items())


def test_coupled_deviation_shrinks_with_width() -> None:
    """§C.3 with R_M (M = 2048): networks with their own iid draws (tau = 0.5), trained by
    full-batch GD (same lr and data), stay closer to their ideal particles as N grows.

    Median over 4 seeds at T = 2; measured (layer1..layer4): N = 32 (0.011, 0.044, 0.053,
    0.034), N = 64 (0.007, 0.022, 0.018, 0.013), N = 128 (0.006, 0.021, 0.019, 0.014); ratios
    128/32 of 0.35-0.55 against 0.5 for N^-1/2 (per-seed values vary 4x, §C.3).
    """
    x, y = reduced_data()
    medians = []
    with single_thread():
        for n in (32, 64, 128):
            per_seed = []
            for seed in range(4):
                solver = ReducedLimitSolver(
                    reduced_net([2048] * 3, 0.5, 100 + seed), LR, "half_mse"
                )
                small, coupling = solver.couple([n] * 3, torch.Generator().manual_seed(seed))
                optimizer = torch.optim.SGD(param_groups(small, LR, rule="sgd"))
                for _ in range(20):
                    optimizer.zero_grad()
                    mean_field_loss("half_mse", small(x), y).backward()
                    optimizer.step()
                    solver.step(x, y)
                deviations = coupled_deviation(layer_weights(small), coupling.ideal_weights())
                per_seed.append([deviations[f"layer{i}"].item() for i in range(1, 5)])
            medians.append(np.median(per_seed, axis=0))
    assert solver.time == pytest.approx(2.0)
    assert all(medians[2] < 0.75 * medians[0]), medians
    assert medians[0].max() < 0.1, medians


def test_araujo_frozen_ends_ideal_weights() -> None:
    """xi_1 = xi_L = 0: the frozen layers' ideal particles are their initial values; the middle
    ones move (L = 4) and the trained network (N = 128) follows them: its deviation from them is
    well below its own displacement (and shrinks with N: 0.04-0.15 at N = 32, 0.01-0.03 at 512)."""
    x, y = reduced_data()
    solver = ReducedLimitSolver(reduced_net([512] * 3, 0.5, frozen=("input", "readout")), LR)
    small, coupling = solver.couple([128] * 3, torch.Generator().manual_seed(1))
    start = {name: weight.clone() for name, weight in layer_weights(small).items()}
    optimizer = torch.optim.SGD(param_groups(small, LR, rule="sgd"))
    for _ in range(20):
        optimizer.zero_grad()
        mean_field_loss("mse", small(x), y).backward()
        optimizer.step()
        solver.step(x, y)
    ideal = coupling.ideal_weights()
    assert torch.equal(ideal["layer1"], start["layer1"])
    assert torch.equal(ideal["layer4"], start["layer4"])
    for name in ("layer2", "layer3"):  # measured: ideal 0.14, 0.15; net 0.15, 0.19; deviation 0.04
        moved = (ideal[name] - start[name]).pow(2).mean().sqrt()
        trained = layer_weights(small)[name]
        deviation = (trained - ideal[name]).pow(2).mean().sqrt()
        assert moved > 0.05 and deviation < 0.5 * (trained - start[name]).pow(2).mean().sqrt()


def test_couple_refusals() -> None:
    net = reduced_net([16, 16, 16], 0.5)
    solver = ReducedLimitSolver(net, LR)
    with pytest.raises(ValueError, match=r"`method`.*ParticleLimitSolver"):
        solver.couple([4, 4, 4], method="subsample")
    with pytest.raises(ValueError, match="`widths` must list 3"):
        solver.couple([4, 4])
    with pytest.raises(ValueError, match="`network` must be a MeanFieldMLP of the solver's"):
        solver.couple([4, 4, 4], network=reduced_net([4, 4, 4], 0.5, frozen=("input",)))
    with pytest.raises(ValueError, match="`network` must be a MeanFieldMLP of the solver's"):
        solver.couple([4, 4, 8], network=reduced_net([4, 4, 4], 0.5))
    state = solver.state_dict()
    solver.couple([4, 4, 4])
    with pytest.raises(ValueError, match="coupled networks"):
        solver.load_state_dict(state)
    solver.step(*reduced_data())
    with pytest.raises(ValueError, match="couple the network at t = 0"):
        solver.couple([4, 4, 4])


@pytest.mark.parametrize(
    ("make_network", "match"),
    [
        (lambda: nn.Sequential(MeanFieldConv1d(1, 8, 3, role="input")), "`network`.*Particle"),
        (
            lambda: MeanFieldMLP(
                5, [8, 8, 8], init=[Normal(), torch.nn.init.ones_, Normal(1.0), Normal()]
            ),
            "`network` layer2 .*unknown mean.*Particle",
        ),
        (
            lambda: MeanFieldMLP(5, [8, 8, 8], bias=True, bias_init=Normal(0.0, 1.0)),
            "`network` layer2 has non-constant initial biases.*Particle",
        ),
        (
            lambda: MeanFieldMLP(5, [8, 8], frozen=("layer1", "layer2", "layer3")),
            "`network` has no trainable layer",
        ),
    ],
)
def test_refuses_networks_it_cannot_reduce(make_network, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ReducedLimitSolver(make_network(), LR)


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [(dict(lr=0.0), "`lr`"), (dict(loss="l1"), "`loss`"), (dict(dtype=torch.int64), "`dtype`")],
)
def test_bad_constructor_arguments(kwargs: dict, argument: str) -> None:
    with pytest.raises(ValueError, match=argument):
        ReducedLimitSolver(reduced_net([8, 8, 8], 0.5), **{"lr": LR, **kwargs})


def numpy_effective_rank(features: np.ndarray) -> float:
    singular = np.linalg.svd(features, compute_uv=False)
    p = singular / singular.sum()
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


def test_effective_rank_matches_numpy() -> None:
    features = torch.randn(50, 20, generator=torch.Generator().manual_seed(0))
    assert effective_rank(features).item() == pytest.approx(numpy_effective_rank(features.numpy()))
    rank_one = torch.outer(torch.randn(30), torch.rand(12) + 0.5)
    assert effective_rank(rank_one).item() == pytest.approx(1.0, abs=1e-6)
    assert effective_rank(torch.eye(7)).item() == pytest.approx(7.0)
    assert effective_rank(torch.eye(3, dtype=torch.float32)).dtype == torch.float64
    for bad in (torch.zeros(3, 3), torch.ones(3), torch.full((2, 2), float("nan"))):
        with pytest.raises(ValueError, match="`features`"):
            effective_rank(bad)


def test_middle_displacement_variance_matches_numpy() -> None:
    gen = torch.Generator().manual_seed(1)
    w_init, w_now = torch.randn(6, 5, generator=gen), torch.randn(6, 5, generator=gen)
    expected = np.var(w_now.numpy() - w_init.numpy())
    assert middle_displacement_variance(w_now, w_init).item() == pytest.approx(expected)
    assert middle_displacement_variance(w_init + 0.3, w_init).item() == pytest.approx(
        0.0, abs=1e-30
    )
    with pytest.raises(ValueError, match="same shape"):
        middle_displacement_variance(w_now, w_init[:, :4])


# --- chunked end-atom passes against a plain unchunked reference ---------------------------------


def field_layer(name: str) -> int:
    """The layer index of a reduced field or tracer name (``w3#`` -> 3, ``g2:atoms1`` -> 2)."""
    return int("".join(ch for ch in name.split(":")[0] if ch.isdigit()))


class UnchunkedReference:
    """The reduced Euler step computed plainly: autograd through the whole §B.3 forward pass
    (every P x M intermediate at once), tracers as zero-valued ``z - z.detach()`` terms, then
    ``f <- f - lr m dLoss/df`` with the multipliers m of the module docstring of
    ``mflightning.limit.reduced``. Built from the network and the solver's t = 0 state."""

    def __init__(
        self, net: MeanFieldMLP, fields: dict[str, Tensor], tracers: list[dict[str, Tensor]]
    ) -> None:
        self.layers = [getattr(net, f"layer{i}") for i in range(1, net.depth + 1)]
        self.depth = len(self.layers)
        self.phi = [
            getattr(torch, a) if a in ("tanh", "sigmoid", "sin") else ACTS[a]
            for a in net.activation_names
        ]
        self.mu = {i: float(self.layers[i - 1].init_law.mean) for i in range(2, self.depth)}
        self.fields = {name: value.clone() for name, value in fields.items()}
        self.tracers = [{name: value.clone() for name, value in t.items()} for t in tracers]
        self.m1, self.m_last = fields["w1"].shape[0], fields[f"w{self.depth}"].shape[1]

    def multiplier(self, name: str) -> float:
        i, depth, m1, m_last = field_layer(name), self.depth, self.m1, self.m_last
        if i == 1:
            return m1
        if i == depth:
            return m_last if name.startswith("w") else 1.0
        if depth == 3:
            return m1 * m_last if name.startswith("g") else m_last
        if i == depth - 1:
            return m_last
        return m1 if name.startswith("g") else 1.0

    def forward(self, x: Tensor, f: dict[str, Tensor], tracers: list[dict[str, Tensor]]) -> Tensor:
        phi, mu, depth = self.phi, self.mu, self.depth
        scale = self.layers[0].forward_scale

        def ghost(z: Tensor) -> Tensor:
            return z - z.detach()

        def first(t: dict[str, Tensor]) -> Tensor:
            return phi[0](scale * (x @ t["w1"].T) + t.get("b1", 0.0))

        a1, ta = first(f), [first(t) for t in tracers]
        m1, m_last = self.m1, self.m_last
        if depth == 2:
            out = a1 @ f["w2"].T / m1
            for t, a in zip(tracers, ta, strict=True):
                out = out + ghost(a @ t["w2"].T) / m1
        elif depth == 3:
            h2 = a1 @ (mu[2] + f["g2"]).T / m1 + f.get("b2", 0.0)
            for t, a in zip(tracers, ta, strict=True):
                h2 = h2 + ghost(a @ (mu[2] + t["g2:atoms3"]).T) / m1
            out = phi[1](h2) @ f["w3"].T / m_last
            for t, a in zip(tracers, ta, strict=True):
                own = a1.detach() @ (mu[2] + t["g2:atoms1"]).T / m1 + t.get("b2", 0.0)
                own = own + ghost(a.detach() @ t["g2"].T) / m1
                out = out + ghost(phi[1](own) @ t["w3"].T) / m_last
        else:
            h = a1 @ (mu[2] + f["g2"]) / m1 + f.get("b2", 0.0)
            for t, a in zip(tracers, ta, strict=True):
                h = h + ghost(a @ (mu[2] + t["g2"])) / m1
            for i in range(3, depth - 1):
                h = (mu[i] + f[f"w{i}#"]) * phi[i - 2](h) + f.get(f"b{i}", 0.0)
            feature, g = phi[depth - 3](h), f"g{depth - 1}"
            bias = f.get(f"b{depth - 1}", 0.0)
            out = (
                phi[depth - 2](feature[:, None] * (mu[depth - 1] + f[g]) + bias)
                @ f[f"w{depth}"].T
                / m_last
            )
            for t in tracers:
                own = phi[depth - 2](
                    feature.detach()[:, None] * (mu[depth - 1] + t[g]) + t.get(f"b{depth - 1}", 0.0)
                )
                out = out + ghost(own @ t[f"w{depth}"].T) / m_last
        return phi[depth - 1](out + f.get(f"b{depth}", 0.0))

    def trainable(self, name: str) -> bool:
        return not self.layers[field_layer(name) - 1].frozen

    def step(self, x: Tensor, y: Tensor, loss_name: str) -> float:
        f = {n: v.detach().requires_grad_(self.trainable(n)) for n, v in self.fields.items()}
        tracers = [
            {n: v.detach().requires_grad_(self.trainable(n)) for n, v in t.items()}
            for t in self.tracers
        ]
        loss = mean_field_loss(loss_name, self.forward(x, f, tracers), y)
        leaves = [(n, v) for n, v in f.items() if v.requires_grad]
        leaves += [(n, v) for t in tracers for n, v in t.items() if v.requires_grad]
        grads = torch.autograd.grad(loss, [v for _, v in leaves])
        with torch.no_grad():
            for (name, leaf), grad in zip(leaves, grads, strict=True):
                leaf.sub_(grad, alpha=LR * self.multiplier(name))
        return loss.item()


ACTS = {
    "relu": torch.relu,
    "identity": lambda z: z,
    "gelu": torch.nn.functional.gelu,
    "silu": torch.nn.functional.silu,
    "softplus": torch.nn.functional.softplus,
}


CHUNK_CASES = [
    # depth, first / middle activations, frozen layers, outputs, biases, loss
    (2, ("relu", "tanh"), (), 1, False, "half_mse"),
    (2, ("gelu", "tanh"), (), 2, True, "mse"),
    (3, ("relu", "tanh"), (), 2, True, "mse"),
    (3, ("relu", "tanh"), ("input", "readout"), 1, True, "mse"),
    (4, ("relu", "tanh"), (), 1, False, "half_mse"),
    (4, ("silu", "sigmoid"), (), 3, True, "cross_entropy"),
    (4, ("relu", "tanh"), ("input", "readout"), 1, True, "mse"),
    (5, ("relu", "tanh"), (), 1, False, "half_mse"),
    (5, ("softplus", "sin"), (), 2, True, "mse"),
    (5, ("relu", "gelu"), ("layer3",), 1, True, "mse"),
    (5, ("relu", "tanh"), ("layer2", "layer4"), 1, True, "mse"),
    # the compiled passes' general form (several outputs) and the sigmoid / identity cores
    (2, ("relu", "tanh"), (), 2, True, "mse"),
    (4, ("sigmoid", "identity"), ("readout",), 1, True, "half_mse"),
    # deeper chains of middle scalars (w3#, w4#, w5#; b3*, b4*, b5*)
    (6, ("relu", "tanh"), (), 1, True, "mse"),
    (7, ("relu", "sigmoid"), ("layer4",), 2, True, "cross_entropy"),
]


def chunk_case_net(depth, acts, frozen, outputs, bias, seed=7) -> MeanFieldMLP:
    gen = torch.Generator().manual_seed(seed)
    net = MeanFieldMLP(
        5,
        [20, 9, 8, 23][: depth - 1] if depth <= 5 else [*[20, 9, 8, 7, 6][: depth - 2], 23],
        out_features=outputs,
        activations=[acts[0]] + [acts[1]] * (depth - 2) + ["identity"],
        init=[Normal(0.1, 1.0)] + [Normal(0.7, 0.5)] * (depth - 2) + [Normal(0.2, 1.0)],
        bias=bias,
        bias_init=Normal(0.3, 0.0),
        frozen=frozen,
        input_scale=0.7,
        generator=gen,
    )
    if bias:
        with torch.no_grad():
            for i in {1, depth - 1, depth}:
                getattr(net, f"layer{i}").bias.normal_(generator=gen)
    return net


@pytest.fixture
def threads():
    """Set torch's thread count for a test; restored afterwards."""
    previous = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(previous)


@pytest.mark.parametrize(
    ("kept", "workers", "compiled"),
    [
        *((True, 1, False), (False, 1, False), (True, 3, False), (False, 3, False)),
        *((True, 1, True), (False, 1, True), (True, 3, True), (False, 3, True)),
    ],
)
@pytest.mark.parametrize("case", range(len(CHUNK_CASES)))
def test_chunked_steps_match_unchunked_reference(
    case: int, kept: bool, workers: int, compiled: bool, monkeypatch, threads
) -> None:
    """Chunks of 7 atoms (ragged last chunk) and two coupled networks: losses, every field,
    every tracer and the outputs equal the plain autograd step to 1e-12 after 6 steps; with
    the torch ops (``MFL_NATIVE=0``), the forward values kept for the backward pass and
    recomputed (``CACHE_ELEMENTS = 0``), and with the compiled passes (the layers they cover);
    by the calling thread, and split over 3 worker threads (``MIN_PART = 1``)."""
    fused = count_compiled_passes(monkeypatch)
    if compiled and native.library() is None:
        pytest.skip("no C compiler: the compiled passes are unavailable")
    if not compiled:
        monkeypatch.setenv("MFL_NATIVE", "0")
    if not kept:
        monkeypatch.setattr(endatoms, "CACHE_ELEMENTS", 0)
    monkeypatch.setattr(endatoms, "MIN_PART", 1)
    threads(workers)
    depth, acts, frozen, outputs, bias, loss = CHUNK_CASES[case]
    net = chunk_case_net(depth, acts, frozen, outputs, bias)
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(30, 5, generator=gen)
    y = (
        torch.randint(0, outputs, (30,), generator=gen)
        if loss == "cross_entropy"
        else torch.tanh(x[:, :outputs] + 0.3 * torch.randn(30, outputs, generator=gen))
    )
    solver = ReducedLimitSolver(net, LR, loss, chunk_size=7)
    tracer_widths = [[*[5, 4, 3, 2, 2][: depth - 2], 6], [*[11, 3, 2, 2, 2][: depth - 2], 9]]
    couplings = [
        solver.couple(widths, generator=torch.Generator().manual_seed(k))[1]
        for k, widths in enumerate(tracer_widths)
    ]
    reference = UnchunkedReference(net, solver.fields, [c.tracers for c in couplings])
    start = {name: value.clone() for name, value in solver.fields.items()}
    losses = solver.run((x, y), 6, progress=False)
    expected = [reference.step(x, y, loss) for _ in range(6)]
    np.testing.assert_allclose(losses, expected, rtol=0, atol=1e-12)
    assert losses[-1] < losses[0]
    split = workers == 3 and depth != 3  # L = 3 keeps the unchunked table pass
    ends = acts[:1] if depth == 2 else acts if depth > 3 else ()  # the end layers' activations
    native_ends = [a for a in ends if compiled and native.supports(KERNELS[a].native, x.double())]
    torch_ends = len(ends) - len(native_ends)  # passed by torch ops, on Python worker threads
    assert len(solver._workspace._workers) == (3 if split and torch_ends else 0)  # the split ran
    assert set(fused) == ({3 if split else 1} if native_ends else set())  # parts per C pass
    assert torch.get_num_threads() == workers  # the workers' set-up left it as it was
    for name, value in solver.fields.items():
        torch.testing.assert_close(value, reference.fields[name], rtol=0, atol=1e-12)
        assert torch.equal(value, start[name]) != reference.trainable(name), name  # moved
    for coupling, tracers in zip(couplings, reference.tracers, strict=True):
        for name, value in coupling.tracers.items():
            torch.testing.assert_close(value, tracers[name], rtol=0, atol=1e-12, msg=name)
    with torch.no_grad():
        expected_out = reference.forward(x, reference.fields, [])
    torch.testing.assert_close(solver(x), expected_out, rtol=0, atol=1e-12)


def count_compiled_passes(monkeypatch) -> list[int]:
    """A list that grows at every call of the compiled passes (``endatoms._fused_*``) by the
    number of parts the call ran side by side."""
    calls: list[int] = []
    for name in ("_fused_forward", "_fused_backward"):
        original = getattr(endatoms, name)

        def counted(*args, _original=original, **kwargs):
            calls.append(args[2])
            return _original(*args, **kwargs)

        monkeypatch.setattr(endatoms, name, counted)
    return calls


def wide_net(features: int, depth: int, dtype: torch.dtype) -> MeanFieldMLP:
    """A net whose first layer has ``features`` inputs (relu) and tanh above, biases on."""
    gen = torch.Generator().manual_seed(3)
    net = MeanFieldMLP(
        features,
        [37] + [1] * (depth - 3) + [41] if depth > 2 else [37],
        activations=["relu"] + ["tanh"] * (depth - 2) + ["identity"],
        init=[Normal(0.0, 1.0)] + [Normal(0.8, 0.5)] * (depth - 2) + [Normal(0.3, 1.0)],
        bias=True,
        bias_init=Normal(0.1, 0.0),
        generator=gen,
    )
    with torch.no_grad():
        net.layer1.bias.normal_(generator=gen)
        getattr(net, f"layer{depth - 1}").bias.normal_(generator=gen)
    return net.to(dtype)


@pytest.mark.parametrize(("features", "depth"), [(12, 4), (12, 2), (3, 5), (16, 5), (10, 4)])
def test_compiled_passes_match_torch_ops_in_both_precisions(
    features: int, depth: int, monkeypatch, threads
) -> None:
    """The compiled passes (fixed form for <= 12 features, general form above) follow the torch
    ops' trajectory over 40 steps: to 1e-12 in float64 (two workers, 101 samples, not a
    multiple of the vector length), and in float32 to within its rounding (5e-5 relative)."""
    if native.library() is None:
        pytest.skip("no C compiler: the compiled passes are unavailable")
    monkeypatch.setattr(endatoms, "MIN_PART", 4)
    threads(2)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(101, features, generator=gen, dtype=torch.float64)
    y = torch.tanh(x[:, 0] + 0.5 * x[:, -1])[:, None]
    runs = {}
    for dtype in (torch.float64, torch.float32):
        for compiled in (True, False):
            monkeypatch.setenv("MFL_NATIVE", "1" if compiled else "0")
            solver = ReducedLimitSolver(wide_net(features, depth, dtype), 0.3, "mse", dtype=dtype)
            losses = solver.run((x.to(dtype), y.to(dtype)), 40, progress=False)
            runs[dtype, compiled] = (losses, solver(x.to(dtype)), solver.fields)
    for dtype, tolerance in ((torch.float64, 1e-12), (torch.float32, 5e-5)):
        (fused_losses, fused_out, fused_fields) = runs[dtype, True]
        (plain_losses, plain_out, plain_fields) = runs[dtype, False]
        assert plain_losses[-1] < 0.9 * plain_losses[0]  # it learns over the horizon
        np.testing.assert_allclose(fused_losses, plain_losses, rtol=tolerance, atol=0)
        scale = plain_out.abs().max().item()
        torch.testing.assert_close(fused_out, plain_out, rtol=0, atol=tolerance * scale)
        for name, value in plain_fields.items():
            size = value.abs().max().item()
            torch.testing.assert_close(
                fused_fields[name], value, rtol=0, atol=tolerance * max(size, 1.0), msg=name
            )


def split_run(monkeypatch, threads, steps: int = 8) -> tuple[list[float], dict[str, Tensor]]:
    """Losses and fields of a depth-5 solver whose compiled passes split over 3 threads."""
    monkeypatch.setattr(endatoms, "MIN_PART", 4)
    threads(3)
    solver = ReducedLimitSolver(wide_net(5, 5, torch.float64), 0.3, "mse")
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(64, 5, generator=gen, dtype=torch.float64)
    losses = solver.run((x, torch.tanh(x[:, :1])), steps, progress=False)
    return losses, solver.fields


def test_compiled_passes_from_two_threads_at_once(monkeypatch, threads) -> None:
    """Two Python threads whose solvers pass their split layers at the same time (each its own
    OpenMP team): both trajectories equal a lone run's."""
    if native.library() is None:
        pytest.skip("no C compiler: the compiled passes are unavailable")
    expected, expected_fields = split_run(monkeypatch, threads)
    fused = count_compiled_passes(monkeypatch)
    results: list[tuple[list[float], dict[str, Tensor]]] = []

    def run() -> None:
        torch.set_num_threads(3)  # thread-local in OpenMP; split_threads reads it
        results.append(split_run(monkeypatch, lambda count: None, steps=8))

    workers = [threading.Thread(target=run) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert len(results) == 2
    assert max(fused) == 3  # passes were split (torch's thread count is shared: not all)
    for losses, fields in results:
        np.testing.assert_allclose(losses, expected, rtol=0, atol=1e-12)
        for name, value in expected_fields.items():
            torch.testing.assert_close(fields[name], value, rtol=0, atol=1e-12)


@pytest.mark.timeout(120)  # the failure this guards against is a hang
def test_compiled_passes_in_a_forked_child(monkeypatch, threads) -> None:
    """After the parent has run split passes on OpenMP threads, a forked child (whose OpenMP
    threads did not survive the fork) runs its parts one after another, without waiting for
    them, and follows the same trajectory."""
    if native.library() is None:
        pytest.skip("no C compiler: the compiled passes are unavailable")
    expected, _ = split_run(monkeypatch, threads)
    context = multiprocessing.get_context("fork")
    with context.Pool(1) as pool:
        losses = pool.apply(_child_losses)
    np.testing.assert_allclose(losses, expected, rtol=0, atol=1e-12)


def _child_losses() -> list[float]:
    """``split_run``'s losses in a forked child (no pytest fixtures there)."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        return split_run(monkeypatch, torch.set_num_threads)[0]


def test_outputs_under_inference_mode(monkeypatch, threads) -> None:
    """``solver(x)`` inside ``torch.inference_mode`` (tensors without a version counter) equals
    the output outside it, split or not."""
    monkeypatch.setattr(endatoms, "MIN_PART", 4)
    threads(2)
    solver = ReducedLimitSolver(wide_net(5, 5, torch.float64), 0.3, "mse")
    x = torch.randn(64, 5, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    solver.run((x, torch.tanh(x[:, :1])), 3, progress=False)
    expected = solver(x)
    with torch.inference_mode():
        torch.testing.assert_close(solver(x.clone()), expected, rtol=0, atol=1e-15)


def test_uncompilable_passes_warn_once_and_fall_back(monkeypatch, tmp_path) -> None:
    """A compiler that fails: one RuntimeWarning naming the reason and MFL_NATIVE, then the
    torch ops (the same trajectory as MFL_NATIVE=0)."""
    monkeypatch.setenv("MFL_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # exits 1 without a word
    native._load.cache_clear()  # and again at the end: the real library is found then
    data = reduced_data()
    try:
        with pytest.warns(RuntimeWarning, match=r"`false` could not compile.*MFL_NATIVE=0"):
            losses = ReducedLimitSolver(reduced_net([40, 4, 4, 33], 0.5), LR).run(
                data, 3, progress=False
            )
        assert native.library() is None
        assert not list(tmp_path.glob("*.so"))
    finally:
        native._load.cache_clear()
    monkeypatch.setenv("MFL_NATIVE", "0")
    plain = ReducedLimitSolver(reduced_net([40, 4, 4, 33], 0.5), LR).run(data, 3, progress=False)
    np.testing.assert_allclose(losses, plain, rtol=0, atol=0)


def test_chunk_size_does_not_change_results() -> None:
    """One chunk, chunks of 1 atom, and the default give the same trajectory to rounding."""
    data = reduced_data()
    results = []
    for chunk in (None, 1, 1000):
        solver = ReducedLimitSolver(
            reduced_net([40, 4, 4, 33], 0.5), LR, "half_mse", chunk_size=chunk
        )
        results.append((solver.run(data, 4, progress=False), solver(data[0])))
    for losses, out in results[1:]:
        np.testing.assert_allclose(losses, results[0][0], rtol=0, atol=1e-13)
        torch.testing.assert_close(out, results[0][1], rtol=0, atol=1e-13)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="`chunk_size`"):
            ReducedLimitSolver(reduced_net([8, 8, 8], 0.5), LR, chunk_size=bad)


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_kernels_match_torch_activations_and_autograd(name: str) -> None:
    """Each end-layer kernel is the activation, and its slope torch's derivative, to 1e-15."""
    u = torch.cat([torch.linspace(-30, 30, 601), torch.randn(400, generator=torch.Generator())])
    u = u.double().requires_grad_()
    value = ACTIVATIONS[name].fn(u)
    (slope,) = torch.autograd.grad(value.sum(), u)
    kernel = KERNELS[name]
    kernel_value, kernel_slope = kernel.value_and_slope(u.detach())
    torch.testing.assert_close(kernel_value, value.detach(), rtol=0, atol=2e-15)
    torch.testing.assert_close(kernel_slope, slope, rtol=0, atol=2e-15)
    if kernel.value_slope is not None:  # the slope from the core's value
        core_value = kernel.core(kernel.inner * u.detach(), None)
        from_value = kernel.value_slope(core_value, torch.empty_like(core_value))
        torch.testing.assert_close(
            from_value * kernel.inner * kernel.outer, slope, rtol=0, atol=2e-15
        )
    if kernel.homogeneous_slope is not None:  # phi(u) = u phi'(u), phi' written over u
        homogeneous = kernel.homogeneous_slope(u.detach().clone())
        torch.testing.assert_close(homogeneous, slope, rtol=0, atol=0)
        torch.testing.assert_close(u.detach() * homogeneous, value.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("depth", [2, 3, 5])
def test_wrong_feature_count_is_refused_by_name(depth: int) -> None:
    solver = ReducedLimitSolver(reduced_net([8] * (depth - 1), 0.5), LR)
    x, y = reduced_data()
    for bad in (x[:, :4], x[:, :, None], x[0]):
        with pytest.raises(ValueError, match=r"`x` must have shape \(batch, 5\).*in_features=5"):
            solver.step(bad, y)
        with pytest.raises(ValueError, match=r"`x` must have shape \(batch, 5\)"):
            solver(bad)
    assert solver.steps == 0


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda s: s["fields"]["w1"].__setitem__((0, 0), float("nan")), r"NaN or infinite.*w1"),
        (lambda s: s["fields"]["g2"].__setitem__(3, float("inf")), r"NaN or infinite.*g2"),
        (lambda s: s.__setitem__("steps", -5), "steps=-5"),
        (lambda s: s.__setitem__("steps", 2.5), "steps=2.5"),
    ],
)
def test_load_state_dict_refuses_corrupt_states(edit, match: str) -> None:
    """Issue 13: NaN/inf fields and negative step counts are refused; the state is unchanged."""
    solver = ReducedLimitSolver(reduced_net([16, 8, 16], 0.5), LR)
    solver.run(reduced_data(), 2, progress=False)
    state = solver.state_dict()
    edit(state)
    fresh = ReducedLimitSolver(reduced_net([16, 8, 16], 0.5), LR)
    before = {name: value.clone() for name, value in fresh.fields.items()}
    with pytest.raises(ValueError, match=match):
        fresh.load_state_dict(state)
    assert fresh.steps == 0
    assert all(torch.equal(value, before[name]) for name, value in fresh.fields.items())


def test_float32_solver_follows_float64() -> None:
    """dtype=float32 (fields, chunks and sums in float32) stays within 1e-5 of float64 over 10
    steps at M = 512, far below the O(M^-1/2) ~ 4e-2 particle error."""
    x, y = reduced_data()
    net = reduced_net([512, 4, 4, 512], 0.5)
    solvers = [
        ReducedLimitSolver(net, LR, "half_mse", dtype) for dtype in (torch.float64, torch.float32)
    ]
    for solver in solvers:
        solver.run((x, y), 10, progress=False)
    out64, out32 = solvers[0](x), solvers[1](x)
    assert out32.dtype == torch.float32
    gap = ((out32.double() - out64).norm() / out64.norm()).item()
    assert 1e-9 < gap < 1e-5


@pytest.mark.parametrize("depth", [2, 3, 5])
def test_update_sizes_are_the_rms_displacements(depth: int) -> None:
    """The sizes a divergence message reports are RMS(f(t+h) - f(t)) of the last step."""
    net = biased_net(depth, [16, 12, 10, 14][: depth - 1])
    solver = ReducedLimitSolver(net, LR, chunk_size=5)
    data = reduced_data(40)
    solver.step(*data)
    before = {name: value.clone() for name, value in solver.fields.items()}
    solver.step(*data)
    sizes = solver._update_sizes()
    assert sizes.keys() == before.keys()
    for name, size in sizes.items():
        moved = (solver.fields[name] - before[name]).pow(2).mean().sqrt().item()
        assert size == pytest.approx(moved, rel=1e-9), name
    diverging = ReducedLimitSolver(net, 1e6, chunk_size=5)
    with pytest.raises(DivergenceError, match=r"largest last update: \w+ \(lr \* RMS grad = "):
        diverging.run(data, 50, progress=False)


# --- the cost model of the reduced step ------------------------------------------------------


def test_step_seconds_is_the_documented_formula() -> None:
    """Hand-computed from the module docstring's formula with round coefficients."""
    cost = ReducedCost(
        fixed=1.0,
        layer=0.5,
        coupled=2.0,
        first=3.0,
        feature=1.0,
        last=10.0,
        table=0.25,
        tracer=0.5,
        speedup=2.0,
    )
    # L = 5, M = 4, d = 2, P = 3, one network [6, 1, 1, 8]: 1 + 0.5 * 3 + 2 +
    # 3 * (4 * (3 + 2) + 4 * 10 + 0.5 * (6 * 5 + 8 * 10)) / 2
    assert step_seconds(4, 2, 3, 5, [[6, 1, 1, 8]], cost) == pytest.approx(4.5 + 3 * (60 + 55) / 2)
    assert step_seconds(4, 2, 3, 2, [], cost) == pytest.approx(1.0 + 3 * 4 * 5 / 2)
    # L = 3: the table M^2 plus the end atoms; tracers (6 + 8) M table entries
    assert step_seconds(4, 2, 3, 3, [[6, 8]], cost) == pytest.approx(
        1.5 + 2.0 + 3 * (16 * 0.25 + 4 * 5 + 4 * 10 + 0.5 * (6 * 5 + 8 * 10 + 14 * 4 * 0.25)) / 2
    )


def test_default_atoms_fills_the_budget() -> None:
    nets = [[w] * 4 for w in (50, 100, 200, 400) for _ in range(4)]
    m = default_atoms(5, 100, 5, 300, nets)
    assert m % 64 == 0 and m >= 16 * 400
    assert (
        300 * step_seconds(m, 5, 100, 5, nets) <= 60.0 < 300 * step_seconds(m + 64, 5, 100, 5, nets)
    )
    assert default_atoms(5, 100, 5, 600, nets) < m < default_atoms(5, 100, 5, 300)
    assert default_atoms(5, 100, 5, 300, nets, budget_s=120.0) > m
    assert default_atoms(5, 100, 5, 10**6, nets) == 16 * 400  # the floor
    assert default_atoms(5, 100, 5, 10**6) == 16
    assert default_atoms(5, 100, 3, 300, [[64, 64]]) >= 1024  # L = 3: O(M^2) table


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        (dict(steps=0), "`steps`"),
        (dict(batch=-1), "`batch`"),
        (dict(depth=1), "`depth`"),
        (dict(budget_s=0.0), "`budget_s`"),
        (dict(coupled=[[8, 8]]), "`coupled`"),
        (dict(coupled=[[8, 0, 8, 8]]), "`coupled widths`"),
        (dict(in_features=2.5), "`in_features`"),
    ],
)
def test_default_atoms_refuses_bad_arguments(kwargs: dict, argument: str) -> None:
    args = dict(in_features=5, batch=100, depth=5, steps=100) | kwargs
    with pytest.raises(ValueError, match=argument):
        default_atoms(**args)
