"""mflightning: mean-field neural networks in PyTorch Lightning, and their infinite-width limit."""

from mflightning.diagnostics import TrivialLimitWarning, trivial_limit_reasons
from mflightning.laws import InitLaw, Normal, Uniform
from mflightning.mlp import MeanFieldMLP
from mflightning.module import MeanFieldModule
from mflightning.nn import MeanFieldConv1d, MeanFieldConv2d, MeanFieldLayer, MeanFieldLinear
from mflightning.scaling import PRESETS, param_groups, time_step

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "InitLaw",
    "MeanFieldConv1d",
    "MeanFieldConv2d",
    "MeanFieldLayer",
    "MeanFieldLinear",
    "MeanFieldMLP",
    "MeanFieldModule",
    "Normal",
    "TrivialLimitWarning",
    "Uniform",
    "param_groups",
    "time_step",
    "trivial_limit_reasons",
]
