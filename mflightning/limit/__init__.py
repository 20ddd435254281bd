"""The mean-field limit: particle solver (docs/theory.md §B.4) and coupling of networks to it."""

from mflightning.limit.cost import default_atoms
from mflightning.limit.coupling import Coupling, couple
from mflightning.limit.ideal import IdealCoupling
from mflightning.limit.reduced import ReducedLimitSolver
from mflightning.limit.solver import ParticleLimitSolver

__all__ = [
    "Coupling",
    "IdealCoupling",
    "ParticleLimitSolver",
    "ReducedLimitSolver",
    "couple",
    "default_atoms",
]
