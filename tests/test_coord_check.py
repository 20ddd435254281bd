"""mflightning.coord_check: sizes against a numpy reference, a correct network passes, a wrongly
scaled layer is flagged by name (docs/theory.md §1.1, §1.2, §E.1)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import mflightning as mfl
from mflightning.coord_check import (
    CoordData,
    check_coord_data,
    coord_slopes,
    get_coord_data,
    plot_coord_data,
)
from mflightning.scaling import NonMeanFieldParameterWarning
from tests.conftest import single_thread

WIDTHS = (64, 256, 1024)
SEEDS = (0, 1)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    with single_thread():
        yield


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 10, generator=g)
    return x, torch.sign(x[:, :1])


def _sandwich(middle: Callable[[int], nn.Module]) -> Callable[[int], nn.Module]:
    """Mean-field input and readout layers around ``middle(n)``: only the middle can be wrong."""

    def make(n: int) -> nn.Module:
        layers = OrderedDict(
            input=mfl.MeanFieldLinear(10, n, role="input"),
            relu=nn.ReLU(),
            hidden=middle(n),
            tanh=nn.Tanh(),
            readout=mfl.MeanFieldLinear(n, 1, role="readout"),
        )
        return nn.Sequential(layers)

    return make


def _summing_layer(n: int) -> nn.Module:
    """O(1) weights summed over n neurons: the 1/n average of §1.1 is missing."""
    layer = nn.Linear(n, n, bias=False)
    nn.init.normal_(layer.weight, 1.0, 0.5)
    return layer


def test_sizes_match_a_numpy_reference() -> None:
    """Two-layer relu network, 2 GD steps: the recorded RMS sizes equal a float64 hand computation.

    yhat = (1/n) sum_j a_j relu(<w_j, x>); half-MSE; SGD with the §1.2 rates lr * n (both
    layers) gives a_j -= lr * mean_b[r_b relu(h_bj)] and w_j -= lr * mean_b[r_b a_j 1(h_bj > 0) x_b]
    with the residual r = yhat - y.
    """
    x, y = _batch()
    widths, lr, steps = (4, 8), 0.5, 2
    template = mfl.MeanFieldMLP(10, [3])
    data = get_coord_data(template, x, y, widths=widths, seeds=(7,), steps=steps, lr=lr)
    assert list(data.activation) == ["layer1", "layer2"] and list(data.update) == [
        "layer1",
        "layer2",
    ]
    xs, ys = x.double().numpy(), y.double().numpy()[:, 0]
    for w_index, n in enumerate(widths):
        torch.manual_seed(7)
        net = template.with_widths([n])
        w = net.layer1.weight.detach().double().numpy()  # (n, d)
        a = net.layer2.weight.detach().double().numpy()[0]  # (n,)
        for t in range(steps + 1):
            h = xs @ w.T  # (batch, n)
            yhat = np.maximum(h, 0) @ a / n
            np.testing.assert_allclose(
                data.activation["layer1"][w_index, 0, t], np.sqrt(np.mean(h**2)), rtol=1e-5
            )
            np.testing.assert_allclose(
                data.activation["layer2"][w_index, 0, t], np.sqrt(np.mean(yhat**2)), rtol=1e-5
            )
            if t == steps:
                break
            r = yhat - ys
            da = -lr * (r[:, None] * np.maximum(h, 0)).mean(0)
            dw = -lr * np.einsum("b,bj,bd->jd", r, (h > 0) * a[None, :], xs) / len(xs)
            np.testing.assert_allclose(
                data.update["layer1"][w_index, 0, t], np.sqrt(np.mean(dw**2)), rtol=1e-4
            )
            np.testing.assert_allclose(
                data.update["layer2"][w_index, 0, t], np.sqrt(np.mean(da**2)), rtol=1e-4
            )
            w, a = w + dw, a + da


def test_a_mean_field_mlp_passes() -> None:
    x, y = _batch()
    net = mfl.MeanFieldMLP(10, [8, 8], activations=["relu", "tanh", "identity"])
    data = get_coord_data(net, x, y, widths=WIDTHS, seeds=SEEDS)
    slopes = coord_slopes(data)
    assert {(s.layer, s.quantity) for s in slopes} == {
        (f"layer{i}", q) for i in (1, 2, 3) for q in ("activation", "update")
    }
    assert max(abs(s.slope) for s in slopes) < 0.15, [(s.layer, s.slope) for s in slopes]
    assert check_coord_data(data) == []


def test_a_plain_linear_hidden_layer_is_flagged_by_name() -> None:
    """nn.Linear gets no multiplier: its update is lr * dL/dW ~ lr / N (lazy, §E.1 item 2)."""
    x, y = _batch()
    with pytest.warns(NonMeanFieldParameterWarning):
        data = get_coord_data(
            _sandwich(lambda n: nn.Linear(n, n)), x, y, widths=WIDTHS, seeds=SEEDS
        )
    flagged = check_coord_data(data)
    assert [(s.layer, s.quantity) for s in flagged] == [("hidden", "update")]
    assert -1.15 < flagged[0].slope < -0.85  # theory: N^-1
    assert "layer 'hidden'" in flagged[0].message and "shrink" in flagged[0].message


def test_a_layer_without_the_one_over_n_is_flagged_by_name() -> None:
    """Summing O(1) weights over N neurons: the pre-activations grow like N (§E.1 item 1)."""
    x, y = _batch()
    with pytest.warns(NonMeanFieldParameterWarning):
        data = get_coord_data(_sandwich(_summing_layer), x, y, widths=WIDTHS, seeds=SEEDS)
    flagged = {(s.layer, s.quantity): s for s in check_coord_data(data)}
    hidden = flagged[("hidden", "activation")]
    assert 0.85 < hidden.slope < 1.15  # theory: N^+1
    assert "grow" in hidden.message and "1/n" in hidden.message
    assert ("readout", "activation") not in flagged and ("input", "activation") not in flagged


def test_an_update_that_vanishes_is_flagged_as_degenerate() -> None:
    """tanh after the summing layer saturates: the input layer stops moving (zero update)."""
    x, y = _batch()
    with pytest.warns(NonMeanFieldParameterWarning):
        data = get_coord_data(_sandwich(_summing_layer), x, y, widths=WIDTHS, seeds=(0,))
    entry = next(s for s in coord_slopes(data) if (s.layer, s.quantity) == ("input", "update"))
    assert entry.flagged and entry.degenerate_widths == WIDTHS and np.isnan(entry.slope)
    assert "0 or not finite" in entry.message


def test_figure_is_written_atomically(tmp_path: Path) -> None:
    x, y = _batch()
    data = get_coord_data(mfl.MeanFieldMLP(10, [8]), x, y, widths=(16, 32), seeds=(0,), steps=2)
    path = plot_coord_data(data, tmp_path / "coord.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["coord.png"]  # no temporary file left


def test_callers_random_state_is_untouched() -> None:
    x, y = _batch()
    net = mfl.MeanFieldMLP(10, [4])
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    get_coord_data(net, x, y, widths=(4, 8), seeds=(5,), steps=2)
    assert torch.equal(torch.rand(3), expected)


def _tuple_output(n: int) -> nn.Module:
    class Pair(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = mfl.MeanFieldMLP(10, [n])
            self.scale = nn.Parameter(torch.ones(()))

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.inner(x) * self.scale, x

    return Pair()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"widths": (64,)}, "`widths`"),
        ({"widths": (128, 64)}, "`widths`"),
        ({"seeds": ()}, "`seeds`"),
        ({"steps": 1}, "`steps`"),
        ({"loss": "l1"}, "`loss`"),
        ({"lr": -1.0}, "`lr`"),
        ({"layers": ["layer9"]}, "`layers`.*layer9"),
        ({"make": 3}, "`make`"),
        ({"make": lambda n: mfl.MeanFieldMLP(10, [n] * (1 if n < 8 else 2))}, "different layers"),
        ({"make": _tuple_output}, "'root' returns a tuple.*`layers=`"),
    ],
)
@pytest.mark.filterwarnings("ignore::mflightning.scaling.NonMeanFieldParameterWarning")
def test_bad_arguments_are_named(kwargs: dict, match: str) -> None:
    x, y = _batch()
    args = {"make": mfl.MeanFieldMLP(10, [4]), "widths": (4, 8), "seeds": (0,), "steps": 2}
    with pytest.raises(ValueError, match=match):
        get_coord_data(x=x, y=y, **(args | kwargs))


def test_bad_check_arguments_are_named() -> None:
    data = CoordData((4, 8), (0,), 2, {"a": np.ones((2, 1, 3))}, {})
    with pytest.raises(ValueError, match="`tolerance`"):
        coord_slopes(data, tolerance=0)
    with pytest.raises(ValueError, match="`step`"):
        coord_slopes(data, step=3)
