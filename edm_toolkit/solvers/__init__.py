"""ODE/SDE solvers that advance x from t_hat to t_next, registered by name.

A solver sees the network only through its step context (``ctx.denoise(x, point)``: one network evaluation at
a precomputed time point; ``ctx.derivative``: dx/dt of EDM Eq. 4), so every solver runs unchanged on any
schedule, scaling, discretization and denoiser. Stochastic churn is applied by the sampling loop, before the step.

ode: euler, heun. multistep: dpmpp, unipc, ipndm, lms, deis. adaptive: the reference solver. stochastic:
euler_ancestral, dpmpp_2m_sde, dpmpp_3m_sde, restart. discrete: ddpm, ddim, the original samplers, which run on
the model's own step grid.
"""

from .base import SOLVERS, ODEPoint, ProbabilityFlowODE, Solver, StepContext
from .ode import Euler, Heun  # registered first: the order of listings and error messages

from . import multistep, adaptive, stochastic, discrete  # noqa: E402, F401, I001  (register their solvers)

__all__ = ["SOLVERS", "ODEPoint", "ProbabilityFlowODE", "Solver", "StepContext", "Euler", "Heun"]
