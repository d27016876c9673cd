"""The solver protocol and the time points it evaluates the ODE at."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Sequence

import torch

from ..discrete import StepGrid
from ..errors import ConfigError
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
    """EDM's general ODE (Eq. 4) for a schedule sigma(t) and scaling s(t); ``grid`` is the denoiser's discrete
    step grid, if it has one (the original discrete samplers need it)."""

    def __init__(self, schedule: NoiseSchedule, scaling: Scaling, grid: StepGrid | None = None):
        self.schedule = schedule
        self.scaling = scaling
        self.grid = grid

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
    ``denoise_with_variance(x, point)`` is (D, v) for a denoiser with a learned variance; ``derivative(x, D,
    point)`` is dx/dt of Eq. 4 from that D; ``randn_like`` draws from the per-seed noise streams (for stochastic
    solvers); ``class_labels`` are the batch's one-hot labels (for classifier guidance in the original forms);
    ``state`` is a dict a multistep solver may keep its history in. ``denoised`` is the last D evaluated, which
    the progress callback reports; a solver whose step ends on a corrected prediction may set it.
    """

    __slots__ = ("denoise", "denoise_with_variance", "randn_like", "class_labels", "state", "denoised")

    def __init__(self, denoise: Callable[[torch.Tensor, ODEPoint], torch.Tensor],
                 randn_like: Callable[[torch.Tensor], torch.Tensor],
                 denoise_with_variance: Callable[[torch.Tensor, ODEPoint], tuple[torch.Tensor, torch.Tensor]] | None = None,
                 class_labels: torch.Tensor | None = None):
        self.denoise = denoise
        self.denoise_with_variance = denoise_with_variance
        self.randn_like = randn_like
        self.class_labels = class_labels
        self.state: dict = {}
        self.denoised: torch.Tensor | None = None

    @staticmethod
    def derivative(x: torch.Tensor, D: torch.Tensor, point: ODEPoint) -> torch.Tensor:
        return torch.sub(x, D, alpha=point.c).mul_(point.a)

    def slope(self, x: torch.Tensor, point: ODEPoint) -> torch.Tensor:
        """dx/dt at (x, point): one network evaluation."""
        return self.derivative(x, self.denoise(x, point), point)


def solver_options(solver: "Solver") -> list[str]:
    """The options a user may set on ``solver`` (its dataclass fields, less those marked ``{"option": False}``)."""
    return [f.name for f in dataclasses.fields(solver) if f.init and f.metadata.get("option", True)]


class Solver:
    """Advances x_hat at t_hat to t_next. Subclasses precompute their per-step coefficients in ``prepare``.

    Most solvers integrate over the noise levels the sampler's discretization chooses. A solver that
    ``runs_on_model_grid`` (the original DDPM/DDIM samplers) chooses its own levels instead, among the denoiser's
    step grid (:meth:`model_grid_steps`), and may start from another prior (:meth:`prior_std`).
    """

    name: ClassVar[str]
    order: ClassVar[int]
    fixed_cost: ClassVar[bool] = True  # False: ``evaluations`` is a lower bound (error-controlled solvers)
    # Whether the sampling loop may raise the noise level before a step (EDM's churn). Multistep methods whose
    # history assumes t_hat_i = t_{i} cannot take it.
    accepts_churn: ClassVar[bool] = True
    runs_on_model_grid: ClassVar[bool] = False

    def evaluations(self, num_steps: int) -> int:
        """Network evaluations for ``num_steps`` steps (counted honestly, e.g. 2N - 1 for Heun)."""
        raise NotImplementedError

    def prepare(self, ode: ProbabilityFlowODE, t_hat: torch.Tensor, t_next: torch.Tensor, device) -> Sequence[Any]:
        """One record per step with everything ``step`` needs, computed once before sampling."""
        raise NotImplementedError

    def step(self, x_hat: torch.Tensor, record: Any, ctx: StepContext) -> torch.Tensor:
        raise NotImplementedError

    def model_grid_steps(self, grid: StepGrid, num_steps: int) -> torch.Tensor:
        """The decreasing noise levels sigma_0 > ... > sigma_{N-1} on ``grid`` (solvers that run on the model's
        grid)."""
        raise ConfigError(f"solver {self.name!r} integrates over the sampler's discretization, not a model's grid")

    def prior_std(self, sigma_max: float) -> float:
        """Standard deviation of the latents x_0 at the first level sigma_max, in EDM's unscaled x: sigma_max
        (x ~ N(0, sigma_max^2 I), EDM Algorithm 1)."""
        return sigma_max
