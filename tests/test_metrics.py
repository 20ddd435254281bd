"""Limit-tracking metrics (docs/theory.md §C) against slow numpy float64 references.

Covers, for every class and functional twin: value vs reference, accumulation over updates,
reset, clone, pickling, empty state_dict, merge of two "processes" (merge_state), a real 2-process
gloo DDP run, bad inputs, and the N^-1/2 scaling of NeuronSpread.
"""

from __future__ import annotations

import itertools
import math
import pickle
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import scipy.stats
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import loglog_slope
from torch import Tensor
from torchmetrics import Metric

from mflightning.functional import (
    coupled_deviation,
    loss_gap,
    neuron_spread,
    output_gap,
    sliced_directions,
    sliced_wasserstein,
)
from mflightning.metrics import (
    CoupledDeviation,
    LossGap,
    NeuronSpread,
    OutputGap,
    SlicedWasserstein,
)

TOL = 1e-10
LAYERS = ["layers.0.weight", "layers.1.weight", "readout"]


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _value(result: Tensor | dict[str, Tensor]) -> float | dict[str, float]:
    if isinstance(result, dict):
        return {key: float(value) for key, value in result.items()}
    return float(result)


def _assert_close(actual: Any, expected: Any, tol: float = TOL) -> None:
    actual, expected = _value(actual), _value(expected)
    if isinstance(expected, dict):
        assert list(actual) == list(expected)
        for key in expected:
            assert actual[key] == pytest.approx(expected[key], rel=tol, abs=tol), key
    else:
        assert actual == pytest.approx(expected, rel=tol, abs=tol)


# --- numpy float64 references -------------------------------------------------------------------


def ref_output_gap(finite: np.ndarray, limit: np.ndarray) -> float:
    squares = [(a - b) ** 2 for a, b in zip(finite.ravel(), limit.ravel(), strict=True)]
    return math.sqrt(math.fsum(squares) / len(squares))


def ref_loss_gap(finite: list[float], limit: list[float], weights: list[float]) -> float:
    total = math.fsum(weights)
    mean_finite = math.fsum(w * v for w, v in zip(weights, finite, strict=True)) / total
    mean_limit = math.fsum(w * v for w, v in zip(weights, limit, strict=True)) / total
    return abs(mean_finite - mean_limit)


def ref_coupled(weights: dict[str, np.ndarray], ideal: dict[str, np.ndarray]) -> dict[str, float]:
    return {layer: ref_output_gap(weights[layer], ideal[layer]) for layer in weights}


def ref_neuron_spread(h: np.ndarray) -> float:
    stds = []
    for row in h:
        mean = math.fsum(row) / len(row)
        stds.append(math.sqrt(math.fsum((v - mean) ** 2 for v in row) / len(row)))
    return math.fsum(stds) / len(stds)


def ref_quantile_wpp(u: np.ndarray, v: np.ndarray, p: float) -> float:
    """W_p^p of two 1-D empirical laws: integrate |F_u^-1 - F_v^-1|^p piece by piece, exactly."""
    u, v = np.sort(u), np.sort(v)
    n, m = len(u), len(v)
    grid = sorted({Fraction(i, n) for i in range(n + 1)} | {Fraction(j, m) for j in range(m + 1)})
    total = []
    for left, right in itertools.pairwise(grid):
        mid = (left + right) / 2  # both quantile functions are constant on (left, right]
        qu, qv = u[math.ceil(mid * n) - 1], v[math.ceil(mid * m) - 1]
        total.append(float(right - left) * abs(qu - qv) ** p)
    return math.fsum(total)


def ref_sliced(x: np.ndarray, y: np.ndarray, directions: np.ndarray, p: float) -> float:
    if p == 1:
        per_direction = [scipy.stats.wasserstein_distance(x @ t, y @ t) for t in directions]
    else:
        per_direction = [ref_quantile_wpp(x @ t, y @ t, p) for t in directions]
    return (math.fsum(per_direction) / len(per_direction)) ** (1 / p)


# --- cases: (metric factory, functional, reference, list of update argument tuples) -------------


def _output_gap_case() -> tuple:
    rng = _rng(1)
    batches = [(rng.normal(size=(n, 3)), rng.normal(size=(n, 3))) for n in (5, 1, 9)]
    return OutputGap, output_gap, ref_output_gap, batches


def _coupled_case() -> tuple:
    rng = _rng(2)
    shapes = {"layers.0.weight": (6, 4), "layers.1.weight": (6, 6), "readout": (6,)}
    batches = [
        tuple({k: rng.normal(size=(n, *s[1:])) for k, s in shapes.items()} for _ in range(2))
        for n in (6, 2, 3)
    ]
    return lambda: CoupledDeviation(LAYERS), coupled_deviation, ref_coupled, batches


def _spread_case() -> tuple:
    rng = _rng(3)
    batches = [(rng.normal(size=(b, 17)),) for b in (4, 1, 7)]
    return NeuronSpread, neuron_spread, ref_neuron_spread, batches


def _sliced_case(p: float) -> tuple:
    rng = _rng(4)
    batches = [
        (rng.normal(size=(n, 3)), rng.normal(1.0, 2.0, size=(m, 3)))
        for n, m in [(5, 7), (3, 1), (4, 6)]
    ]
    directions = sliced_directions(3, n_projections=8, seed=11).numpy()

    def reference(x: np.ndarray, y: np.ndarray) -> float:
        return ref_sliced(x, y, directions, p)

    def functional(x: Tensor, y: Tensor) -> Tensor:
        return sliced_wasserstein(x, y, n_projections=8, p=p, seed=11)

    return lambda: SlicedWasserstein(n_projections=8, p=p, seed=11), functional, reference, batches


CASES: dict[str, Callable[[], tuple]] = {
    "output_gap": _output_gap_case,
    "coupled_deviation": _coupled_case,
    "neuron_spread": _spread_case,
    "sliced_w1": lambda: _sliced_case(1),
    "sliced_w2": lambda: _sliced_case(2),
}


def _to_torch(arg: Any, dtype: torch.dtype = torch.float64) -> Any:
    if isinstance(arg, dict):
        return {key: torch.as_tensor(value, dtype=dtype) for key, value in arg.items()}
    return torch.as_tensor(arg, dtype=dtype)


def _concat(batches: list[tuple]) -> tuple:
    columns = list(zip(*batches, strict=True))
    if isinstance(columns[0][0], dict):
        return tuple({k: np.concatenate([b[k] for b in col]) for k in col[0]} for col in columns)
    return tuple(np.concatenate(col) for col in columns)


def _updated(factory: Callable[[], Metric], batches: list[tuple]) -> Metric:
    metric = factory()
    for batch in batches:
        metric.update(*(_to_torch(arg) for arg in batch))
    return metric


# --- values against the references --------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_functional_matches_reference_on_every_batch(name: str) -> None:
    _, functional, reference, batches = CASES[name]()
    for batch in batches:
        _assert_close(functional(*(_to_torch(arg) for arg in batch)), reference(*batch))


@pytest.mark.parametrize("name", list(CASES))
def test_accumulated_class_equals_reference_on_concatenation(name: str) -> None:
    factory, functional, reference, batches = CASES[name]()
    whole = _concat(batches)
    value = _updated(factory, batches).compute()
    _assert_close(value, reference(*whole))
    _assert_close(value, functional(*(_to_torch(arg) for arg in whole)), tol=1e-12)


@pytest.mark.parametrize("name", list(CASES))
def test_float32_inputs_are_accumulated_in_float64(name: str) -> None:
    factory, _, reference, batches = CASES[name]()
    batches32 = [tuple(_to_torch(arg, torch.float32) for arg in batch) for batch in batches]
    metric = factory()
    for batch in batches32:
        metric.update(*batch)
    value = metric.compute()
    for result in value.values() if isinstance(value, dict) else [value]:
        assert result.dtype == torch.float64
    as_numpy = [
        tuple(
            {k: t.double().numpy() for k, t in a.items()}
            if isinstance(a, dict)
            else a.double().numpy()
            for a in b
        )
        for b in batches32
    ]
    _assert_close(value, reference(*_concat(as_numpy)))


def test_loss_gap_functional_and_weighted_class_match_reference() -> None:
    rng = _rng(5)
    finite, limit = rng.uniform(0, 2, size=4).tolist(), rng.uniform(0, 2, size=4).tolist()
    weights = [32.0, 32.0, 7.0, 1.0]
    for f, lim in zip(finite, limit, strict=True):
        _assert_close(loss_gap(torch.tensor(f, dtype=torch.float64), lim), abs(f - lim))
    metric = LossGap()
    for f, lim, w in zip(finite, limit, weights, strict=True):
        metric.update(torch.tensor(f, dtype=torch.float32), lim, weight=w)
    expected = ref_loss_gap(
        [float(torch.tensor(f, dtype=torch.float32)) for f in finite], limit, weights
    )
    _assert_close(metric.compute(), expected)


def test_sliced_wasserstein_equal_counts_reduce_to_sorting() -> None:
    rng = _rng(6)
    x, y = rng.normal(size=(9, 4)), rng.standard_t(3, size=(9, 4))
    directions = sliced_directions(4, n_projections=5, seed=3).numpy()
    for p in (1, 2, 3.5):
        per_direction = [np.mean(np.abs(np.sort(x @ t) - np.sort(y @ t)) ** p) for t in directions]
        expected = np.mean(per_direction) ** (1 / p)
        got = sliced_wasserstein(torch.tensor(x), torch.tensor(y), n_projections=5, p=p, seed=3)
        _assert_close(got, expected)
        _assert_close(got, ref_sliced(x, y, directions, p))


def test_sliced_wasserstein_of_a_translation_is_the_projected_shift() -> None:
    x = torch.tensor(_rng(7).normal(size=(13, 3)))
    shift = torch.tensor([0.5, -2.0, 1.0], dtype=torch.float64)
    theta = sliced_directions(3, n_projections=16, seed=0)
    for p in (1, 2):
        expected = (theta @ shift).abs().pow(p).mean().pow(1 / p)
        _assert_close(sliced_wasserstein(x, x + shift, n_projections=16, p=p), expected)
        _assert_close(sliced_wasserstein(x + shift, x, directions=theta, p=p), expected)
    assert float(sliced_wasserstein(x, x)) == 0.0


def test_sliced_wasserstein_one_dimensional_input_and_explicit_directions() -> None:
    rng = _rng(8)
    u, v = rng.normal(size=11), rng.normal(size=4)
    got = sliced_wasserstein(torch.tensor(u), torch.tensor(v), p=1, directions=torch.ones(1, 1))
    _assert_close(got, scipy.stats.wasserstein_distance(u, v))
    _assert_close(ref_quantile_wpp(u, v, 1), scipy.stats.wasserstein_distance(u, v))


def test_sliced_directions_are_unit_deterministic_and_leave_global_rng_alone() -> None:
    state = torch.get_rng_state()
    first = sliced_directions(5, n_projections=32, seed=4)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(first, sliced_directions(5, n_projections=32, seed=4))
    assert not torch.equal(first, sliced_directions(5, n_projections=32, seed=5))
    torch.testing.assert_close(first.norm(dim=1), torch.ones(32, dtype=torch.float64))


def test_neuron_spread_is_the_population_std() -> None:
    h = torch.tensor([[1.0, 3.0], [0.0, 0.0]])
    _assert_close(neuron_spread(h), 0.5)  # std([1, 3], correction=0) = 1; std([0, 0]) = 0


def test_neuron_spread_scales_as_inverse_square_root_of_width() -> None:
    generator = torch.Generator().manual_seed(0)
    widths = [64, 128, 256, 512, 1024, 2048, 4096]
    mean = torch.randn(32, 1, generator=generator, dtype=torch.float64)
    spreads = []
    for n in widths:
        noise = torch.randn(32, n, generator=generator, dtype=torch.float64)
        metric = NeuronSpread()
        metric.update(mean + noise / math.sqrt(n))
        spreads.append(float(metric.compute()))
    assert loglog_slope(widths, spreads) == pytest.approx(-0.5, abs=0.05)


# --- Metric machinery ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_reset_clone_pickle_and_empty_state_dict(name: str) -> None:
    factory, _, reference, batches = CASES[name]()
    metric = _updated(factory, batches)
    value = _value(metric.compute())
    assert metric.state_dict() == {}
    _assert_close(pickle.loads(pickle.dumps(metric)).compute(), value, tol=0)
    clone = metric.clone()
    _assert_close(clone.compute(), value, tol=0)
    clone.update(*(_to_torch(arg) for arg in batches[0]))
    _assert_close(metric.compute(), value, tol=0)
    metric.reset()
    metric.update(*(_to_torch(arg) for arg in batches[1]))
    _assert_close(metric.compute(), reference(*batches[1]))


def test_loss_gap_reset_clone_pickle_and_merge() -> None:
    metric, other, single = LossGap(), LossGap(), LossGap()
    updates = [(0.3, 0.1, 2.0), (1.2, 0.7, 5.0), (0.4, 0.9, 1.0)]
    for i, (f, lim, w) in enumerate(updates):
        (metric if i < 2 else other).update(f, lim, weight=w)
        single.update(f, lim, weight=w)
    expected = ref_loss_gap(*(list(col) for col in zip(*updates, strict=True)))
    assert metric.state_dict() == {}
    _assert_close(pickle.loads(pickle.dumps(metric)).compute(), metric.compute(), tol=0)
    _assert_close(metric.clone().compute(), metric.compute(), tol=0)
    metric.merge_state(other)
    _assert_close(metric.compute(), single.compute(), tol=1e-12)
    _assert_close(metric.compute(), expected)
    metric.reset()
    metric.update(1.0, 0.25)
    _assert_close(metric.compute(), 0.75)


@pytest.mark.parametrize("name", list(CASES))
def test_two_process_merge_equals_single_process(name: str) -> None:
    factory, _, _, batches = CASES[name]()
    single = _updated(factory, batches).compute()
    rank0, rank1 = _updated(factory, batches[:2]), _updated(factory, batches[2:])
    rank0.compute()  # a cached result must not survive the merge
    rank0.merge_state(rank1)
    _assert_close(rank0.compute(), single, tol=1e-12)


def test_forward_returns_the_batch_value_and_accumulates() -> None:
    factory, functional, reference, batches = CASES["coupled_deviation"]()
    metric = factory()
    for batch in batches:
        args = [_to_torch(arg) for arg in batch]
        _assert_close(metric(*args), functional(*args), tol=1e-12)
    _assert_close(metric.compute(), reference(*_concat(batches)))


def test_metadata() -> None:
    for cls in (OutputGap, LossGap, CoupledDeviation, SlicedWasserstein, NeuronSpread):
        assert cls.higher_is_better is False
        assert cls.is_differentiable is False
        assert cls.full_state_update is False


# --- real DDP (gloo, 2 processes) ---------------------------------------------------------------


def _ddp_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    try:
        results = {}
        for name in ("output_gap", "coupled_deviation", "neuron_spread", "sliced_w2"):
            factory, _, _, batches = CASES[name]()
            shard = batches[:2] if rank == 0 else batches[2:]  # uneven shards
            results[name] = _value(_updated(factory, shard).compute())
        loss = LossGap()
        loss.update(0.5 * rank, 1.0, weight=1 + 3 * rank)
        results["loss_gap"] = _value(loss.compute())
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_gloo_ddp_sync_equals_single_process(tmp_path: Path) -> None:
    # fork, not spawn: a spawned child re-imports lightning (about 10 s on a 2-core machine)
    mp.start_processes(
        _ddp_worker,
        args=(2, str(tmp_path / "init"), str(tmp_path)),
        nprocs=2,
        join=True,
        start_method="fork",
    )
    for rank in range(2):
        results = torch.load(tmp_path / f"rank{rank}.pt")
        for name, value in results.items():
            if name == "loss_gap":
                _assert_close(value, ref_loss_gap([0.0, 0.5], [1.0, 1.0], [1.0, 4.0]), tol=1e-12)
                continue
            factory, _, _, batches = CASES[name]()
            _assert_close(value, _updated(factory, batches).compute(), tol=1e-12)


# --- bad inputs ---------------------------------------------------------------------------------

GOOD = torch.zeros(3, 2)
NAN = torch.tensor([[0.0, float("nan")]])


@pytest.mark.parametrize(
    ("call", "argument"),
    [
        (lambda: output_gap(GOOD, torch.zeros(3, 3)), "finite"),
        (lambda: output_gap(NAN, NAN), "finite"),
        (lambda: output_gap(GOOD, GOOD * float("inf")), "limit"),
        (lambda: output_gap(torch.zeros(0), torch.zeros(0)), "finite"),
        (lambda: OutputGap().update(GOOD, GOOD[:2]), "finite"),
        (lambda: loss_gap(torch.zeros(2), 0.0), "finite_loss"),
        (lambda: loss_gap(0.0, float("nan")), "limit_loss"),
        (lambda: LossGap().update(0.0, 0.0, weight=0), "weight"),
        (lambda: LossGap().update(0.0, 0.0, weight=float("inf")), "weight"),
        (lambda: coupled_deviation({"a": GOOD}, {"b": GOOD}), "weights"),
        (lambda: coupled_deviation({"a": GOOD}, {"a": GOOD.T}), "weights\\['a'\\]"),
        (lambda: coupled_deviation({"a": GOOD}, {"a": NAN}), "ideal_weights\\['a'\\]"),
        (lambda: coupled_deviation({}, {}), "weights"),
        (lambda: coupled_deviation([GOOD], [GOOD]), "weights"),
        (lambda: CoupledDeviation(["a"]).update({"b": GOOD}, {"b": GOOD}), "weights"),
        (lambda: CoupledDeviation([]), "layers"),
        (lambda: CoupledDeviation(["a.b", "a_b"]), "layers"),
        (lambda: sliced_wasserstein(GOOD, torch.zeros(3, 3)), "x"),
        (lambda: sliced_wasserstein(torch.zeros(2, 2, 2), GOOD), "x"),
        (lambda: sliced_wasserstein(GOOD, NAN), "y"),
        (lambda: sliced_wasserstein(GOOD, GOOD, p=0.5), "p"),
        (lambda: sliced_wasserstein(GOOD, GOOD, n_projections=0), "n_projections"),
        (lambda: sliced_wasserstein(GOOD, GOOD, directions=torch.ones(4, 3)), "directions"),
        (lambda: SlicedWasserstein(p=float("nan")), "p"),
        (lambda: SlicedWasserstein(n_projections=0), "n_projections"),
        (lambda: _updated(SlicedWasserstein, [(GOOD, GOOD), (GOOD, NAN)]), "y"),
        (lambda: _updated(SlicedWasserstein, [(GOOD, GOOD), (torch.ones(2, 3),) * 2]), "x"),
        (lambda: neuron_spread(torch.zeros(4)), "h"),
        (lambda: NeuronSpread().update(NAN), "h"),
        (lambda: output_gap("nope", GOOD), "finite"),
    ],
)
def test_bad_inputs_raise_value_error_naming_the_argument(
    call: Callable[[], Any], argument: str
) -> None:
    with pytest.raises(ValueError, match=f"`{argument}`"):
        call()
