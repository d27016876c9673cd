"""ODE/SDE solvers that advance x from t_hat to t_next, registered by name.

A solver sees the network only through its step context (``ctx.denoise(x, point)``: one network evaluation at
a precomputed time point; ``ctx.derivative``: dx/dt of EDM Eq. 4), so every solver runs unchanged on any
schedule, scaling, discretization and denoiser. Stochastic churn is applied by the sampling loop, before the step.

ode: euler, heun. multistep: dpmpp, unipc, ipndm, lms, deis. adaptive: the reference solver. stochastic:
euler_ancestral, dpmpp_2m_sde, dpmpp_3m_sde, restart.
"""

from . import adaptive, multistep, stochastic  # noqa: F401  (register their solvers)
from .base import SOLVERS, ODEPoint, ProbabilityFlowODE, Solver, StepContext
from .ode import Euler, Heun

__all__ = ["SOLVERS", "ODEPoint", "ProbabilityFlowODE", "Solver", "StepContext", "Euler", "Heun"]
