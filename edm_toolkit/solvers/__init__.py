"""ODE/SDE solvers that advance x from t_hat to t_next, registered by name.

A solver sees the probability-flow ODE only through ``evaluate(x, point)``, which returns dx/dt at a
precomputed time point and costs one network evaluation, so every solver runs unchanged on any schedule,
scaling, discretization and denoiser. Stochastic churn is applied by the sampling loop, before the step.
"""

from .base import SOLVERS, ODEPoint, ProbabilityFlowODE, Solver, StepContext
from .ode import Euler, Heun

__all__ = ["SOLVERS", "ODEPoint", "ProbabilityFlowODE", "Solver", "StepContext", "Euler", "Heun"]
