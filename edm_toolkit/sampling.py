"""The one sampling loop: discretization + schedule + scaling + churn + solver around any denoiser.

It generalises EDM's Algorithm 2 (the ``ablation_sampler`` of EDM's generate.py): noise levels from the
discretization, clamped to the network's range and rounded with ``net.round_sigma``, mapped to times
t_i = sigma^-1(sigma_i) with t_N = 0; at each step churn raises the noise to t_hat and the solver integrates
the ODE of Eq. 4 to t_{i+1}. Solvers that run on the model's own step grid (the original ddpm/ddim samplers)
choose the noise levels themselves, among the denoiser's ``step_grid``. Everything that does not depend on x is
computed once, before the loop, so the loop itself is only the solver's tensor arithmetic and the network calls.
Computation is in float64. The denoiser is used only through its protocol (:mod:`edm_toolkit.protocol`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import torch

from .discretizations import DISCRETIZATIONS, Discretization, EDMDiscretization, check_num_steps
from .errors import ConfigError
from .protocol import check_denoiser
from .registry import show
from .schedules import SCALINGS, SCHEDULES, LinearSchedule, NoiseSchedule, NoScaling, Scaling
from .solvers import SOLVERS, Heun, Solver
from .solvers.base import ProbabilityFlowODE, StepContext


# Network evaluations one sampling call may cost (a fixed-cost solver's count, an adaptive one's minimum): 5 times
# 100,000 steps of a two-evaluation solver; far beyond any useful run, and checked before any work.
MAX_EVALUATIONS = 1_000_000


@dataclass(frozen=True)
class Churn:
    """Stochastic churn (EDM Algorithm 2): gamma_i = min(S_churn/N, sqrt(2) - 1) where S_min <= sigma_i <= S_max,
    and x_hat = x + sqrt(sigma_hat^2 - sigma_i^2) S_noise eps with sigma_hat = (1 + gamma_i) sigma_i."""

    S_churn: float = 0.0
    S_min: float = 0.0
    S_max: float = field(default=math.inf, metadata={"allow_inf": True})  # EDM's default: churn at every level
    S_noise: float = 1.0

    def __post_init__(self):
        if not (self.S_churn >= 0 and math.isfinite(self.S_churn)):
            raise ConfigError(f"S_churn must be >= 0 and finite, got {self.S_churn}")
        if not math.isfinite(self.S_min):
            raise ConfigError(f"S_min must be a finite number, got {self.S_min}")
        if not 0 <= self.S_min <= self.S_max:
            raise ConfigError(f"need 0 <= S_min <= S_max, got S_min={self.S_min}, S_max={self.S_max}")
        if not (self.S_noise >= 0 and math.isfinite(self.S_noise)):
            raise ConfigError(f"S_noise must be a finite number >= 0, got {self.S_noise}")

    def gamma(self, sigma: torch.Tensor, num_steps: int) -> torch.Tensor:
        active = (sigma >= self.S_min) & (sigma <= self.S_max)
        gamma = torch.full(sigma.shape, min(self.S_churn / num_steps, math.sqrt(2) - 1), dtype=torch.float64)
        return torch.where(active, gamma, torch.zeros_like(gamma))


class StepInfo(NamedTuple):
    """What a progress callback receives after each step."""

    step: int  # 1-based index of the step just taken
    num_steps: int
    sigma: float  # noise level reached
    nfe: int  # network evaluations so far
    x: torch.Tensor  # the state after the step (x s(t): the VP space with the vp scaling)
    sigma_hat: float  # the noise level the step started from (after churn)
    denoised: torch.Tensor | None  # the step's last prediction of the clean image (EDM's unscaled x)


@dataclass(frozen=True)
class _Step:
    record: Any  # the solver's precomputed coefficients
    scale_hat: float  # s(t_hat)/s(t_i)
    noise_std: float  # sqrt(sigma_hat^2 - sigma_i^2) s(t_hat) S_noise
    draw_noise: bool
    sigma_hat: float
    sigma_next: float


@dataclass(frozen=True)
class Plan:
    """Everything about a sampling run that does not depend on x."""

    t_steps: torch.Tensor  # t_0..t_N (t_N = 0), float64
    sigma_steps: torch.Tensor  # sigma(t_0)..sigma(t_N)
    x_scale: float  # sigma(t_0) s(t_0): the latents' multiplier
    steps: Sequence[_Step]
    nfe: int


@dataclass(frozen=True)
class Sampler:
    """A composed sampler. Components are given as instances or names (``Sampler(solver="euler")``).

    ``sigma_min``/``sigma_max`` of None take the discretization's default range; either way the range is clamped
    to the network's [sigma_min, sigma_max]. ``discretization`` None is EDM's (rho = 7), except for solvers that
    run on the model's own step grid (ddpm, ddim), which take no discretization and no noise range.
    """

    solver: Solver = field(default_factory=Heun)
    discretization: Discretization | None = None
    schedule: NoiseSchedule = field(default_factory=LinearSchedule)
    scaling: Scaling = field(default_factory=NoScaling)
    num_steps: int = 18
    sigma_min: float | None = None
    sigma_max: float | None = None
    churn: Churn = field(default_factory=Churn)

    def __post_init__(self):
        for name, registry in (("solver", SOLVERS), ("schedule", SCHEDULES), ("scaling", SCALINGS)):
            object.__setattr__(self, name, registry.create(getattr(self, name)))
        if self.solver.runs_on_model_grid:
            given = [k for k in ("discretization", "sigma_min", "sigma_max") if getattr(self, k) is not None]
            if given:
                raise ConfigError(f"solver {self.solver.name!r} runs on the model's own step grid: {given[0]} does "
                                  "not apply (choose the steps with num_steps or the solver's respacing)")
        else:
            object.__setattr__(self, "discretization", DISCRETIZATIONS.create(self.discretization or EDMDiscretization()))
        if isinstance(self.churn, Mapping):
            object.__setattr__(self, "churn", Churn(**self.churn))
        if self.churn.S_churn > 0 and not self.solver.accepts_churn:
            takers = [n for n in SOLVERS.names() if SOLVERS.get(n).accepts_churn]
            raise ConfigError(f"solver {self.solver.name!r} cannot take stochastic churn; set S_churn to 0 "
                              f"or choose one of: {', '.join(takers)}")
        check_num_steps(self.num_steps)
        for name in ("sigma_min", "sigma_max"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not (value > 0 and math.isfinite(value))):
                raise ConfigError(f"{name} must be > 0 and finite, got {show(value)}")
        if self.sigma_min is not None and self.sigma_max is not None and not self.sigma_min < self.sigma_max:
            raise ConfigError(f"sigma_min ({self.sigma_min}) must be below sigma_max ({self.sigma_max})")
        if not self.solver.runs_on_model_grid:  # the levels on the unclamped range, before any network is loaded
            default_min, default_max = self.discretization.default_sigma_range
            lo = default_min if self.sigma_min is None else self.sigma_min
            hi = default_max if self.sigma_max is None else self.sigma_max
            if lo < hi:  # else sigma_range says so, once the network's range is known
                self._check_levels(self.discretization, lo, hi)
        if self.nfe > MAX_EVALUATIONS:
            raise ConfigError(f"solver {self.solver.name!r} with num_steps {self.num_steps} costs {self.nfe:,} network "
                              f"evaluations per image; at most {MAX_EVALUATIONS:,} are allowed")

    def replace(self, **changes) -> "Sampler":
        return dataclasses.replace(self, **changes)

    @property
    def nfe(self) -> int:
        """Network evaluations one call costs."""
        return self.solver.evaluations(self.num_steps)

    def sigma_range(self, net) -> tuple[float, float]:
        """[sigma_min, sigma_max]: the given or default range, clamped to what the network supports."""
        default_min, default_max = self.discretization.default_sigma_range
        lo = default_min if self.sigma_min is None else self.sigma_min
        hi = default_max if self.sigma_max is None else self.sigma_max
        lo, hi = max(lo, net.sigma_min), min(hi, net.sigma_max)
        if not lo < hi:
            raise ConfigError(
                f"empty noise range: sigma_min {lo:g} >= sigma_max {hi:g} after clamping to the network's "
                f"range [{net.sigma_min:g}, {net.sigma_max:g}]"
            )
        return lo, hi

    def sigma_steps(self, net) -> tuple[torch.Tensor, float, float]:
        """The decreasing noise levels sigma_0 > ... > sigma_{N-1} for ``net`` (before rounding), and the range
        [sigma_min, sigma_max] they were chosen from."""
        if not self.solver.runs_on_model_grid:
            lo, hi = self.sigma_range(net)
            return self._check_levels(self.discretization, lo, hi), lo, hi
        if net.step_grid is None:
            raise ConfigError(f"{type(net).__name__} has no discrete step grid: solver {self.solver.name!r} needs a "
                              "model trained on T steps (guided-/improved-diffusion, iDDPM); use a continuous solver")
        steps = self.solver.model_grid_steps(net.step_grid, self.num_steps)
        return steps, float(steps[-1]), float(steps[0])

    def _check_levels(self, discretization: Discretization, lo: float, hi: float) -> torch.Tensor:
        """The discretization's levels on [lo, hi], refused unless positive, non-increasing, not all equal, and with
        a finite sigma^2 (the ODE needs it): an extreme rho or range overflows, underflows or collapses them.
        (Repeated levels are allowed: EDM's iddpm discretization repeats table entries for large N.)"""
        try:
            sigmas = discretization.sigma_steps(self.num_steps, lo, hi)
        except (OverflowError, ZeroDivisionError):
            sigmas = None
        if (sigmas is None or not bool(torch.isfinite(sigmas.square()).all()) or not bool((sigmas > 0).all())
                or not bool((sigmas[1:] <= sigmas[:-1]).all()) or not sigmas[0] > sigmas[-1]):
            options = ", rho" if isinstance(discretization, EDMDiscretization) else ""
            raise ConfigError(f"the {discretization.name} discretization gives no usable noise levels for "
                              f"{self.num_steps} steps in [{lo:g}, {hi:g}] (they overflow, vanish or repeat); "
                              f"change num_steps, sigma_min, sigma_max{options}")
        return sigmas

    def plan(self, net, device: torch.device | str = "cpu") -> Plan:
        """Precomputes the time steps, churn and solver coefficients for ``net`` (EDM Algorithm 2, lines 1-6)."""
        check_denoiser(net)
        round_sigma = net.round_sigma
        sigma_steps, lo, hi = self.sigma_steps(net)
        schedule = self.schedule.bind(lo, hi)
        ode = ProbabilityFlowODE(schedule, self.scaling, net.step_grid)
        N = len(sigma_steps)

        t_cur = schedule.sigma_inv(_round(round_sigma, sigma_steps))
        t_next = torch.cat([t_cur[1:], torch.zeros(1, dtype=torch.float64)])
        sigma_cur = schedule.sigma(t_cur)
        gamma = self.churn.gamma(sigma_cur, N)
        t_hat = torch.where(gamma > 0, schedule.sigma_inv(_round(round_sigma, sigma_cur + gamma * sigma_cur)), t_cur)
        sigma_hat = schedule.sigma(t_hat)
        s_cur, s_hat = ode.s(t_cur), ode.s(t_hat)
        noise_std = (sigma_hat**2 - sigma_cur**2).clip(min=0).sqrt() * s_hat * self.churn.S_noise
        last_draw = int(torch.nonzero(gamma > 0).max()) if bool((gamma > 0).any()) else -1

        records = self.solver.prepare(ode, t_hat, t_next, device)
        steps = [
            _Step(record, scale, std, i <= last_draw, hat, sig)
            for i, (record, scale, std, hat, sig) in enumerate(zip(
                records, (s_hat / s_cur).tolist(), noise_std.tolist(), sigma_hat.tolist(),
                sigma_cur[1:].tolist() + [0.0]))
        ]
        t_all = torch.cat([t_cur, torch.zeros(1, dtype=torch.float64)])
        return Plan(
            t_steps=t_all,
            sigma_steps=torch.cat([sigma_cur, torch.zeros(1, dtype=torch.float64)]),
            x_scale=float(self.solver.prior_std(float(schedule.sigma(t_cur[0]))) * ode.s(t_cur[0])),
            steps=steps,
            nfe=self.solver.evaluations(N),
        )

    def __call__(
        self,
        net,
        latents: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        *,
        randn_like: Callable[[torch.Tensor], torch.Tensor] = torch.randn_like,
        callback: Callable[[StepInfo], None] | None = None,
        plan: Plan | None = None,
    ) -> torch.Tensor:
        """Draws samples from unit-variance ``latents``; returns float64 images at sigma = 0.

        ``randn_like`` supplies the churn noise (pass per-seed generators for batch-independent results; it is
        called once per step up to the last step with churn, as EDM does). ``callback`` gets a StepInfo per step.
        """
        plan = plan if plan is not None else self.plan(net, latents.device)
        nfe = 0

        def denoise(x, point):
            nonlocal nfe
            nfe += net.network_evaluations(point.sigma)
            D = net(x if point.inv_s == 1.0 else x * point.inv_s, point.sigma_net, class_labels).to(torch.float64)
            ctx.denoised = D
            return D

        def denoise_with_variance(x, point):
            nonlocal nfe
            nfe += net.network_evaluations(point.sigma)
            D, v = net.denoise_with_variance(x * point.inv_s, point.sigma_net, class_labels)
            ctx.denoised = D.to(torch.float64)
            return ctx.denoised, v.to(torch.float64)

        ctx = StepContext(denoise, randn_like, denoise_with_variance, class_labels)
        x = latents.to(torch.float64) * plan.x_scale
        for i, step in enumerate(plan.steps):
            if step.draw_noise:
                eps = randn_like(x)
                if step.noise_std > 0:
                    x = torch.add(x * step.scale_hat, eps, alpha=step.noise_std)
            x = self.solver.step(x, step.record, ctx)
            if callback is not None:
                callback(StepInfo(i + 1, len(plan.steps), step.sigma_next, nfe, x, step.sigma_hat, ctx.denoised))
        return x


def _round(round_sigma, sigma: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(round_sigma(sigma), dtype=torch.float64)


def sample(net, latents, class_labels=None, *, randn_like=torch.randn_like, callback=None, **options) -> torch.Tensor:
    """Functional form: ``sample(net, latents, solver="heun", num_steps=18, S_churn=40, ...)``.

    Options are the Sampler fields plus the churn parameters S_churn, S_min, S_max, S_noise.
    """
    churn = {k: options.pop(k) for k in ("S_churn", "S_min", "S_max", "S_noise") if k in options}
    sampler = Sampler(**options, churn=Churn(**churn))
    return sampler(net, latents, class_labels, randn_like=randn_like, callback=callback)
