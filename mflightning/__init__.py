"""mflightning: mean-field neural networks in PyTorch Lightning, and their infinite-width limit."""

from mflightning import data, functional, metrics, optim
from mflightning.callbacks import LimitTracker
from mflightning.convnet import MeanFieldConvNet
from mflightning.diagnostics import TrivialLimitWarning, trivial_limit_reasons
from mflightning.laws import InitLaw, Normal, Uniform
from mflightning.limit import Coupling, ParticleLimitSolver, ReducedLimitSolver
from mflightning.mlp import MeanFieldMLP
from mflightning.module import MeanFieldModule
from mflightning.nn import MeanFieldConv1d, MeanFieldConv2d, MeanFieldLayer, MeanFieldLinear
from mflightning.scaling import PRESETS, param_groups, time_step
from mflightning.widthfit import SlopeFit, fit_loglog_slope

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "Coupling",
    "InitLaw",
    "LimitTracker",
    "MeanFieldConv1d",
    "MeanFieldConv2d",
    "MeanFieldConvNet",
    "MeanFieldLayer",
    "MeanFieldLinear",
    "MeanFieldMLP",
    "MeanFieldModule",
    "Normal",
    "ParticleLimitSolver",
    "ReducedLimitSolver",
    "SlopeFit",
    "TrivialLimitWarning",
    "Uniform",
    "data",
    "fit_loglog_slope",
    "functional",
    "metrics",
    "optim",
    "param_groups",
    "time_step",
    "trivial_limit_reasons",
]
