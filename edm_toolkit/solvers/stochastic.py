"""Stochastic samplers: Euler ancestral, DPM-Solver++(2M/3M) SDE and Restart, on the toolkit's one sampling loop.

Every sampler works on the denoised image D and on x/s at noise level sigma (the loop's x is s(t) times that),
so it runs unchanged on any schedule, scaling, discretization and denoiser. Every random draw comes from
``ctx.randn_like``, the per-seed streams, so an image depends only on its seed, whatever batch it is drawn in.
Steps to sigma = 0 add no noise and draw none.

EDM churn (applied by the loop before each step) can be combined with the single-step samplers
(``euler_ancestral``, ``restart``: ``accepts_churn = True``) but not with the multistep DPM-Solver++ SDE samplers,
whose history assumes that each step starts where the previous one ended; they raise ConfigError when it does not.
The DPM-Solver++ SDE samplers share their coefficients and multistep machinery with the ODE solvers dpmpp_2m and
dpmpp_3m (multistep.py): at eta = 0 they are those solvers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import torch

from ..discretizations import EDMDiscretization
from ..errors import ConfigError
from .base import SOLVERS, ODEPoint, Solver
from .multistep import DPMSolverPPFamily
from .ode import Heun

_HEUN = Heun()


def _check_nonnegative(owner: str, name: str, value: float) -> None:
    if not (value >= 0 and math.isfinite(value)):
        raise ConfigError(f"{owner} {name} must be a finite number >= 0, got {value}")


def ancestral_split(sigma_from: float, sigma_to: float, eta: float) -> tuple[float, float]:
    """(sigma_down, sigma_up) of an ancestral step from sigma_from to sigma_to (k-diffusion's get_ancestral_step).

    The deterministic step goes down to sigma_down, and fresh noise of standard deviation sigma_up brings the level
    back up to sigma_to (sigma_down^2 + sigma_up^2 = sigma_to^2). eta = 1 is DDPM's posterior variance
    (Ho et al. 2020), eta = 0 gives sigma_down = sigma_to: the deterministic Euler/DDIM step (Song et al. 2021).
    """
    sigma_up = min(sigma_to, eta * sigma_to * math.sqrt(max(1 - (sigma_to / sigma_from) ** 2, 0.0)))
    return math.sqrt(sigma_to**2 - sigma_up**2), sigma_up


@dataclass(frozen=True, slots=True)
class _Update:
    """x_next = x_coef x_hat + d_coef D(x_hat) + noise_std eps."""

    point: ODEPoint
    x_coef: float
    d_coef: float
    noise_std: float


@dataclass(frozen=True)
class _DenoisedUpdateSolver(Solver):
    """A step of one network evaluation whose result is linear in x/s, D and fresh noise.

    Subclasses give that update in terms of the noise levels only (``_level_updates``: (c_y, c_D, c_eps) with
    y_next = c_y y + c_D D + c_eps eps, y = x/s); ``prepare`` maps it onto the loop's scaled x = s(t) x/s, which is
    what makes the samplers independent of the schedule and scaling.
    """

    accepts_churn: ClassVar[bool] = True

    eta: float = 1.0
    s_noise: float = 1.0

    def __post_init__(self):
        _check_nonnegative(self.name, "eta", self.eta)
        _check_nonnegative(self.name, "s_noise", self.s_noise)

    def evaluations(self, num_steps):
        return num_steps

    def _level_updates(self, sigma: Sequence[float], sigma_next: Sequence[float]) -> list[tuple[float, float, float]]:
        raise NotImplementedError

    def prepare(self, ode, t_hat, t_next, device):
        points = ode.points(t_hat, device)
        sigma_next, s_next = ode.sigma(t_next).tolist(), ode.s(t_next).tolist()
        updates = self._level_updates([p.sigma for p in points], sigma_next)
        return [
            _Update(p, s * p.inv_s * c_y, s * c_d, s * c_eps * self.s_noise)
            for p, s, (c_y, c_d, c_eps) in zip(points, s_next, updates)
        ]

    def step(self, x_hat, record, ctx):
        D = ctx.denoise(x_hat, record.point)
        x = torch.mul(x_hat, record.x_coef).add_(D, alpha=record.d_coef)
        if record.noise_std:
            x.add_(ctx.randn_like(x), alpha=record.noise_std)
        return x


@SOLVERS.register
@dataclass(frozen=True)
class EulerAncestral(_DenoisedUpdateSolver):
    """Euler ancestral (k-diffusion's sample_euler_ancestral): an Euler step from sigma to sigma_down, then fresh
    noise of std sigma_up (``ancestral_split``). One evaluation per step.

    ``eta`` scales the noise (1: DDPM's ancestral sampling, Ho et al. 2020; 0: the deterministic Euler/DDIM step);
    ``s_noise`` multiplies the drawn noise. Accepts EDM churn.
    """

    name: ClassVar[str] = "euler_ancestral"
    order: ClassVar[int] = 1

    def _level_updates(self, sigma, sigma_next):
        updates = []
        for s, s_next in zip(sigma, sigma_next):
            sigma_down, sigma_up = ancestral_split(s, s_next, self.eta)
            updates.append((sigma_down / s, 1 - sigma_down / s, sigma_up))
        return updates


@dataclass(frozen=True)
class _DPMSolverSDE(DPMSolverPPFamily):
    """DPM-Solver++ SDE (Lu et al. 2022, "DPM-Solver++"; k-diffusion's dpmpp_2m_sde/dpmpp_3m_sde) in data prediction.

    With h = log(sigma/sigma_next) and z = (1 + eta) h, a step is exact for the SDE given a constant D:
    y_next = (sigma_next/sigma) e^(-eta h) y + phi_1(z) D + sigma_next sqrt(1 - e^(-2 eta h)) s_noise eps, plus the
    multistep corrections from earlier denoised images (``dpmpp_weights`` with z). eta = 0 is the deterministic
    DPM-Solver++(2M/3M). The last step, to sigma = 0, returns D. Multistep: cannot take EDM churn.
    ``lower_order_final`` "reference" is k-diffusion's rule: never (only the warm-up is lower order).
    """

    accepts_churn: ClassVar[bool] = False
    reference_rule: ClassVar[tuple[float, str]] = (0, "k-diffusion")

    eta: float = 1.0
    s_noise: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        _check_nonnegative(self.name, "eta", self.eta)
        _check_nonnegative(self.name, "s_noise", self.s_noise)

    def prepare(self, ode, t_hat, t_next, device):
        if not torch.equal(t_hat[1:], t_next[:-1]):
            raise ConfigError(
                f"solver {self.name!r} is multistep and cannot take EDM churn (S_churn > 0): its steps must start "
                f"where the previous one ended; set S_churn to 0 (eta sets this sampler's own noise)"
            )
        return super().prepare(ode, t_hat, t_next, device)


@SOLVERS.register
@dataclass(frozen=True)
class DPMSolverPP2MSDE(_DPMSolverSDE):
    """DPM-Solver++(2M) SDE: second-order multistep, one evaluation per step (k-diffusion's dpmpp_2m_sde).

    The first difference D - D_prev is weighted 0.5 phi_1(z)/r (``solver_type='midpoint'``) or phi_2(z)/r
    (``'heun'``), r = h_prev/h. Options ``eta`` (noise strength, 0 = dpmpp_2m), ``s_noise``, ``lower_order_final``.
    Cannot take EDM churn.
    """

    name: ClassVar[str] = "dpmpp_2m_sde"
    order: ClassVar[int] = 2
    solver_type: str = "midpoint"
    lower_order_final: str = "reference"


@SOLVERS.register
@dataclass(frozen=True)
class DPMSolverPP3MSDE(_DPMSolverSDE):
    """DPM-Solver++(3M) SDE: multistep, one evaluation per step (k-diffusion's dpmpp_3m_sde); its first steps are
    first and second order (the latter with phi_2, "heun") while the history fills. ``third_order`` as in dpmpp_3m
    ("reference", k-diffusion's phi_3 weighting, is second order; "exact" third). Options ``eta`` (0 = dpmpp_3m with
    solver_type "heun"), ``s_noise``, ``third_order``, ``lower_order_final``. Cannot take EDM churn.
    """

    name: ClassVar[str] = "dpmpp_3m_sde"
    order: ClassVar[int] = 3
    solver_type: ClassVar[str] = "heun"
    third_order: str = "reference"
    lower_order_final: str = "reference"


@dataclass(frozen=True, slots=True)
class _Restart:
    repeats: int  # K
    scale: float  # s(t_max)/s(t_min)
    noise_std: float  # s(t_max) sqrt(sigma_max^2 - sigma_min^2) s_noise
    steps: tuple  # Heun records from t_max back to t_min


@dataclass(frozen=True, slots=True)
class _RestartRecord:
    main: Any  # the main step's Heun record
    restart: _Restart | None  # the restarts that follow this step, if it lands on an interval's t_min


def _heun_chain(ode, t: torch.Tensor, device) -> list:
    """Second-order Heun records for t[0] -> t[1] -> ... -> t[-1] > 0. (Heun.prepare makes its last step a
    first-order one to sigma = 0, so it is handed one step too many, t[-1] -> 0, which is dropped.)"""
    return _HEUN.prepare(ode, t, torch.cat([t[1:], t.new_zeros(1)]), device)[:-1]


@SOLVERS.register
@dataclass(frozen=True)
class Restart(Solver):
    """Restart sampling (Xu et al. 2023, "Restart Sampling for Improving Generative Processes", Algorithm 1).

    The main process is EDM's deterministic Heun ODE solver. Each restart interval (N, K, t_min, t_max), in noise
    levels sigma (the paper's t with sigma(t) = t), applies K times, once the main process reaches t_min: add
    fresh noise from t_min up to t_max, x/s += sqrt(t_max^2 - t_min^2) s_noise eps, then solve the ODE back to
    t_min with Heun's method on N noise levels (N - 1 steps, EDM's rho = 7 spacing), as in the paper's
    configurations: (3, 2, 0.06, 0.30) costs 2 x 2 x 2 = 8 extra evaluations. t_min is snapped to the nearest
    positive level of the main grid, as in the paper's code. The default is the paper's single interval
    (3, 2, 0.06, 0.30). Evaluations: 2 num_steps - 1 + sum over intervals of 2 K (N - 1). Accepts EDM churn
    on the main steps; the restart levels are not rounded with the network's round_sigma.
    """

    name: ClassVar[str] = "restart"
    order: ClassVar[int] = 2
    accepts_churn: ClassVar[bool] = True

    intervals: tuple[tuple[float, ...], ...] = ((3, 2, 0.06, 0.30),)
    s_noise: float = 1.0

    def __post_init__(self):
        _check_nonnegative(self.name, "s_noise", self.s_noise)
        if not self.intervals:
            raise ConfigError("restart needs at least one interval (N, K, t_min, t_max); without one use solver 'heun'")
        object.__setattr__(self, "intervals", tuple(_restart_interval(v) for v in self.intervals))

    def evaluations(self, num_steps):
        return 2 * num_steps - 1 + sum(2 * K * (n - 1) for n, K, _, _ in self.intervals)

    def prepare(self, ode, t_hat, t_next, device):
        levels = ode.sigma(t_next[:-1])  # the positive noise levels the main steps land on
        restarts: dict[int, _Restart] = {}
        for n, K, t_min, t_max in self.intervals:
            i = int(torch.argmin((levels - t_min).abs()))
            if i in restarts:
                raise ConfigError(
                    f"two restart intervals start at the same main-grid noise level {float(levels[i]):g}; "
                    f"merge them or use more steps"
                )
            restarts[i] = self._restart(ode, t_next[i], n, K, t_max, device)
        main = _HEUN.prepare(ode, t_hat, t_next, device)
        return [_RestartRecord(record, restarts.get(i)) for i, record in enumerate(main)]

    def _restart(self, ode, t_min: torch.Tensor, n: int, K: int, sigma_max: float, device) -> _Restart:
        sigma_min = float(ode.sigma(t_min))
        if not sigma_max > sigma_min:
            raise ConfigError(
                f"restart interval t_max {sigma_max:g} must exceed its t_min, snapped to the main-grid noise level "
                f"{sigma_min:g}; raise t_max or move t_min"
            )
        t = ode.schedule.sigma_inv(EDMDiscretization().sigma_steps(n, sigma_min, sigma_max))
        t[-1] = t_min  # end exactly where the main process stands
        s_max, s_min = ode.s(t[0]), ode.s(t_min)
        noise_std = s_max * (ode.sigma(t[0]) ** 2 - sigma_min**2).sqrt() * self.s_noise
        return _Restart(K, float(s_max / s_min), float(noise_std), tuple(_heun_chain(ode, t, device)))

    def step(self, x_hat, record, ctx):
        x = _HEUN.step(x_hat, record.main, ctx)
        restart = record.restart
        if restart is not None:
            for _ in range(restart.repeats):
                x = torch.add(x * restart.scale, ctx.randn_like(x), alpha=restart.noise_std)
                for inner in restart.steps:
                    x = _HEUN.step(x, inner, ctx)
        return x


def _restart_interval(value) -> tuple[int, int, float, float]:
    """Validates one (N, K, t_min, t_max) restart interval."""
    what = f"restart interval {value!r}"
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 4:
        raise ConfigError(f"{what} must be a list (N, K, t_min, t_max)")
    n, K, t_min, t_max = value
    for name, v, low in (("N", n, 2), ("K", K, 1)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v != int(v) or v < low:
            raise ConfigError(f"{what}: {name} must be an integer >= {low}, got {v!r}")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (t_min, t_max)):
        raise ConfigError(f"{what}: t_min and t_max must be numbers")
    if not (0 < t_min < t_max < math.inf):
        raise ConfigError(f"{what}: need 0 < t_min < t_max (finite noise levels), got t_min={t_min}, t_max={t_max}")
    return int(n), int(K), float(t_min), float(t_max)
