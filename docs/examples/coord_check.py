"""Coordinate check of a mean-field MLP and of a network with one wrongly scaled layer.

Writes docs/coord_check_mean_field.png and docs/coord_check_broken.png (guide/coord_check.md).
"""

import warnings
from collections import OrderedDict
from pathlib import Path

from torch import nn

import mflightning as mfl
from mflightning.coord_check import check_coord_data, get_coord_data, plot_coord_data

out = Path(__file__).resolve().parents[1]  # docs/
x, y = mfl.data.IsotropicGaussians(dim=10, n_train=64, seed=0).train_set.tensors  # one batch

# a correct network: every layer averages over its input neurons, every lr has its multiplier
good = mfl.MeanFieldMLP(in_features=10, widths=[8, 8], activations=["relu", "tanh", "identity"])


def broken(n: int) -> nn.Module:
    """The same network with a plain nn.Linear (1/sqrt(fan-in) init, no multiplier) inside."""
    return nn.Sequential(
        OrderedDict(
            input=mfl.MeanFieldLinear(10, n, role="input"),
            relu=nn.ReLU(),
            hidden=nn.Linear(n, n, bias=False),  # the mistake
            tanh=nn.Tanh(),
            readout=mfl.MeanFieldLinear(n, 1, role="readout"),
        )
    )


warnings.simplefilter("ignore", mfl.scaling.NonMeanFieldParameterWarning)  # it names 'hidden' too
for name, make in (("mean_field", good), ("broken", broken)):
    data = get_coord_data(make, x, y, widths=(64, 128, 256, 512, 1024, 2048), seeds=(0, 1, 2))
    flagged = check_coord_data(data)  # |log-log slope| > 0.25 at the last step
    print(f"{name}: {len(flagged)} flagged layer(s)")
    for entry in flagged:
        print("  " + entry.message)
    plot_coord_data(data, out / f"coord_check_{name}.png")
