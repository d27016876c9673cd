"""An adaptive reference solver: the Dormand-Prince 5(4) embedded Runge-Kutta pair in u = log sigma.

For ground truth on any network, through the same sampling loop: the discretization's time steps become output
points, and between them the step size is chosen by error control. Every network evaluation goes through the
loop's counter, so StepInfo.nfe reports the true cost.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import ConfigError, EDMToolkitError
from ..registry import show
from .base import SOLVERS, ODEPoint, Solver

_MIN_RTOL = 100 * 2.0**-52
MAX_EVALUATIONS = 10_000_000  # a budget, not a cost: the run stops when it is spent


class BudgetExceeded(EDMToolkitError, RuntimeError):
    """The adaptive solver spent max_evaluations: a user-facing error (one line in the CLI) and a RuntimeError."""

# Dormand & Prince (1980), "A family of embedded Runge-Kutta formulae": nodes c, matrix a, the fifth-order weights
# (the last row of a, first same as last) and the fourth-order weights of the error estimate.
_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
_B4 = (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)
_ERROR = tuple(b5 - b4 for b5, b4 in zip(_A[6] + (0.0,), _B4))


@dataclass(frozen=True, slots=True)
class _AdaptiveRecord:
    point: ODEPoint
    sigma_next: float
    s_next: float


@SOLVERS.register
@dataclass(frozen=True)
class Adaptive(Solver):
    """Dormand-Prince 5(4) with error control on dy/du = y - D(y; e^u), y = x/s, u = log sigma (smooth at every
    scale; the same equation for every schedule and scaling, EDM Eq. 4).

    A step is accepted when, for every image, the RMS over its elements of err/(atol + rtol max(|y|, |y_new|)) is at
    most 1 (err: the difference of the embedded fifth- and fourth-order solutions); the next step size is
    h 0.9 err^(-1/5), within [h/5, 5h]. The solution advances with the fifth-order result (local extrapolation),
    and the last stage, evaluated there, is the next step's first (FSAL), also across the discretization's points
    when churn does not move them. The final step to sigma = 0 returns D(y_{N-1}; sigma_{N-1}), as EDM's Euler step.

    The network is evaluated at noise levels between the discretization's points, so it should be continuous in
    sigma (a network that rounds sigma to a grid, as iDDPM's does, makes D piecewise constant and error control
    pays for each jump). One step size serves the whole batch, so results depend on the batch within tolerance.
    The cost is known only afterwards: ``evaluations`` returns the fewest possible, 6 (N - 1) + 1 (one accepted
    step per interval); StepInfo.nfe has the true count.
    """

    name: ClassVar[str] = "adaptive"
    order: ClassVar[int] = 5
    fixed_cost: ClassVar[bool] = False  # the step control decides; evaluations() is the minimum
    rtol: float = 1e-6
    atol: float = 1e-6
    max_evaluations: int = 100_000

    def __post_init__(self):
        for key in ("rtol", "atol"):
            value = getattr(self, key)
            if not (value > 0 and math.isfinite(value)):
                raise ConfigError(f"adaptive {key} must be a finite number > 0, got {value}")
        if not self.rtol >= _MIN_RTOL:  # float64 rounding alone exceeds it: no step would ever be accepted
            raise ConfigError(f"adaptive rtol must be at least {_MIN_RTOL:.2g} (100 float64 epsilons), got {self.rtol}")
        budget = self.max_evaluations
        if isinstance(budget, bool) or not isinstance(budget, int) or not 7 <= budget <= MAX_EVALUATIONS:
            raise ConfigError(f"adaptive max_evaluations must be an integer >= 7 and at most {MAX_EVALUATIONS:,}, "
                              f"got {show(budget)}")

    def evaluations(self, num_steps):
        return 6 * (num_steps - 1) + 1

    def prepare(self, ode, t_hat, t_next, device):
        if self.evaluations(len(t_hat)) > self.max_evaluations:  # certain to run out: say so before any work
            raise ConfigError(f"adaptive max_evaluations={self.max_evaluations} is below the {self.evaluations(len(t_hat))}"
                              f" network evaluations {len(t_hat)} steps need at least; raise it or use fewer steps")
        return [_AdaptiveRecord(p, sigma, s) for p, sigma, s in
                zip(ode.points(t_hat, device), ode.sigma(t_next).tolist(), ode.s(t_next).tolist())]

    def step(self, x_hat, record, ctx):
        state = ctx.state
        if state.get("x") is x_hat and state["sigma"] == record.point.sigma:  # unchanged: reuse the last stage
            y, slope = state["y"], state["slope"]
        else:
            y = x_hat if record.point.inv_s == 1.0 else x_hat * record.point.inv_s
            slope = y - ctx.denoise(x_hat, record.point)
            state["evaluations"] = state.get("evaluations", 0) + 1
        if record.sigma_next == 0:
            return torch.sub(y, slope).mul_(record.s_next)
        u, u_end = math.log(record.point.sigma), math.log(record.sigma_next)
        h = state.get("h", -0.1)
        while u > u_end:
            h_try = max(h, u_end - u)
            y_new, slope_new, error = self._attempt(y, slope, u, h_try, x_hat.device, ctx)
            state["evaluations"] += 6
            if state["evaluations"] > self.max_evaluations:
                raise BudgetExceeded(f"the adaptive solver exceeded max_evaluations={self.max_evaluations}; "
                                     "raise it or loosen rtol/atol")
            factor = 5.0 if error == 0 else min(5.0, max(0.2, 0.9 * error ** -0.2))
            if error <= 1:
                u, y, slope = (u_end if h_try == u_end - u else u + h_try), y_new, slope_new
                if h_try == h or factor < 1:  # a step clipped to the interval's end does not limit the next one
                    h = h_try * factor
            else:
                h = h_try * min(factor, 1.0)
        x_next = y * record.s_next
        state.update(h=h, x=x_next, y=y, slope=slope, sigma=record.sigma_next)
        return x_next

    def _attempt(self, y, slope, u, h, device, ctx):
        """One Dormand-Prince step of size h from (u, y): the fifth-order solution, its slope, the error norm."""
        stages = [slope]
        for c, row in zip(_C[1:], _A[1:]):
            y_stage = y.clone()
            for a, k in zip(row, stages):
                if a != 0.0:
                    y_stage.add_(k, alpha=h * a)
            sigma = math.exp(u + c * h)
            sigma_net = torch.tensor(sigma, dtype=torch.float64, device=device)
            point = ODEPoint(math.nan, sigma, sigma_net, 1.0, math.nan, math.nan)  # inv_s 1: stages are in y = x/s
            stages.append(y_stage - ctx.denoise(y_stage, point))
        y_new = y_stage  # the last stage is evaluated at the fifth-order solution
        error = torch.zeros_like(y)
        for e, k in zip(_ERROR, stages):
            if e != 0.0:
                error.add_(k, alpha=h * e)
        scale = torch.maximum(y.abs(), y_new.abs()).mul_(self.rtol).add_(self.atol)
        norm = error.div_(scale).square_().flatten(1).mean(1).sqrt().max()
        return y_new, stages[-1], float(norm)
