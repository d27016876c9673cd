"""The solver protocol and the time points it evaluates the ODE at."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Sequence

import torch

from ..registry import Registry
from ..schedules import NoiseSchedule, Scaling

SOLVERS: Registry["Solver"] = Registry("solver")


@dataclass(frozen=True, slots=True)
class ODEPoint:
    """The ODE at one time t, as plain floats (precomputed so that the sampling loop does no scalar work).

    dx/dt = a x - b D(x/s; sigma) = a (x - c D(x/s; sigma)) with a = sigma'/sigma + s'/s, b = sigma' s/sigma,
    c = b/a (EDM Eq. 4). ``sigma_net`` is the noise level handed to the network (a 0-d float64 tensor).
    """

    t: float
    sigma: float
    sigma_net: torch.Tensor
    inv_s: float
    a: float
    c: float


class ProbabilityFlowODE:
    """EDM's general ODE (Eq. 4) for a schedule sigma(t) and scaling s(t)."""

    def __init__(self, schedule: NoiseSchedule, scaling: Scaling):
        self.schedule = schedule
        self.scaling = scaling

    def sigma(self, t):
        return self.schedule.sigma(t)

    def s(self, t):
        return self.scaling.s(self.schedule.sigma(t))

    def points(self, t: torch.Tensor, device: torch.device) -> list[ODEPoint]:
        """ODEPoints for a vector of times (vectorised: one pass of tensor ops for all steps)."""
        t = torch.as_tensor(t, dtype=torch.float64)
        sigma = self.schedule.sigma(t)
        sigma_deriv = self.schedule.sigma_deriv(t)
        s = self.scaling.s(sigma)
        s_deriv = self.scaling.s_deriv(sigma, sigma_deriv)
        a = sigma_deriv / sigma + s_deriv / s
        b = sigma_deriv * s / sigma
        sigma_net = sigma.to(device).unbind(0)
        rows = zip(t.tolist(), sigma.tolist(), sigma_net, (1 / s).tolist(), a.tolist(), (b / a).tolist())
        return [ODEPoint(*row) for row in rows]


class StepContext:
    """What a solver step may use, fresh for every sampling call.

    ``denoise(x, point)`` evaluates the network once (D(x/s; sigma) in float64, counted as one NFE);
    ``derivative(x, D, point)`` is dx/dt of Eq. 4 from that D; ``randn_like`` draws from the per-seed noise
    streams (for stochastic solvers); ``state`` is a dict a multistep solver may keep its history in.
    """

    __slots__ = ("denoise", "randn_like", "state")

    def __init__(self, denoise: Callable[[torch.Tensor, ODEPoint], torch.Tensor],
                 randn_like: Callable[[torch.Tensor], torch.Tensor]):
        self.denoise = denoise
        self.randn_like = randn_like
        self.state: dict = {}

    @staticmethod
    def derivative(x: torch.Tensor, D: torch.Tensor, point: ODEPoint) -> torch.Tensor:
        return torch.sub(x, D, alpha=point.c).mul_(point.a)

    def slope(self, x: torch.Tensor, point: ODEPoint) -> torch.Tensor:
        """dx/dt at (x, point): one network evaluation."""
        return self.derivative(x, self.denoise(x, point), point)


class Solver:
    """Advances x_hat at t_hat to t_next. Subclasses precompute their per-step coefficients in ``prepare``."""

    name: ClassVar[str]
    order: ClassVar[int]
    fixed_cost: ClassVar[bool] = True  # False: ``evaluations`` is a lower bound (error-controlled solvers)
    # Whether the sampling loop may raise the noise level before a step (EDM's churn). Multistep methods whose
    # history assumes t_hat_i = t_{i} cannot take it.
    accepts_churn: ClassVar[bool] = True

    def evaluations(self, num_steps: int) -> int:
        """Network evaluations for ``num_steps`` steps (counted honestly, e.g. 2N - 1 for Heun)."""
        raise NotImplementedError

    def prepare(self, ode: ProbabilityFlowODE, t_hat: torch.Tensor, t_next: torch.Tensor, device) -> Sequence[Any]:
        """One record per step with everything ``step`` needs, computed once before sampling."""
        raise NotImplementedError

    def step(self, x_hat: torch.Tensor, record: Any, ctx: StepContext) -> torch.Tensor:
        raise NotImplementedError
