"""Time-step discretizations: the noise levels sigma_0 > ... > sigma_{N-1} a sampler visits (Table 1, "Time steps").

Each discretization returns the N noise levels for a range [sigma_min, sigma_max] (float64); the sampler adds
the final sigma_N = 0, clamps the range to what the network supports and rounds every level with the
network's round_sigma.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from .errors import ConfigError
from .registry import Registry, show
from .schedules import VPSchedule

DISCRETIZATIONS: Registry["Discretization"] = Registry("discretization")

# The most sampling steps (and table entries) anything takes: 25 times the 4000 steps of the longest published
# discrete models (iDDPM), far below what exhausts memory; bounds are checked before any work.
MAX_STEPS = 100_000


def check_num_steps(num_steps, what: str = "num_steps") -> int:
    """``num_steps`` if it is an integer in [2, MAX_STEPS], else a ConfigError."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or not 2 <= num_steps <= MAX_STEPS:
        raise ConfigError(f"{what} must be an integer >= 2 and at most {MAX_STEPS}, got {show(num_steps)}")
    return num_steps


def _fractions(num_steps: int) -> torch.Tensor:
    """i/(N-1) for i = 0..N-1, float64."""
    check_num_steps(num_steps)
    return torch.arange(num_steps, dtype=torch.float64) / (num_steps - 1)


class Discretization:
    """Chooses N noise levels within [sigma_min, sigma_max], largest first."""

    name: ClassVar[str]

    @property
    def default_sigma_range(self) -> tuple[float, float]:
        raise NotImplementedError

    def sigma_steps(self, num_steps: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
        raise NotImplementedError


@DISCRETIZATIONS.register
@dataclass(frozen=True)
class EDMDiscretization(Discretization):
    """sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho (EDM Eq. 5)."""

    name: ClassVar[str] = "edm"
    rho: float = 7.0

    def __post_init__(self):
        if not (self.rho > 0 and math.isfinite(self.rho)):
            raise ConfigError(f"edm discretization rho must be > 0 and finite, got {self.rho}")

    @property
    def default_sigma_range(self):
        return (0.002, 80.0)

    def sigma_steps(self, num_steps, sigma_min, sigma_max):
        a, b = sigma_max ** (1 / self.rho), sigma_min ** (1 / self.rho)
        return (a + _fractions(num_steps) * (b - a)) ** self.rho


@DISCRETIZATIONS.register
@dataclass(frozen=True)
class VPDiscretization(Discretization):
    """t_i = 1 + i/(N-1) (epsilon_s - 1), sigma_i = sigma_vp(t_i) (Song et al. 2021; EDM Table 1, column VP).

    The VP schedule is refit to [sigma_min, sigma_max] (``VPSchedule.fit``), so a clamped range still spans
    t in [epsilon_s, 1]. The default range is that of beta_d, beta_min over [epsilon_s, 1].
    """

    name: ClassVar[str] = "vp"
    epsilon_s: float = 1e-3
    beta_d: float = 19.9
    beta_min: float = 0.1

    def __post_init__(self):
        for key in ("epsilon_s", "beta_d", "beta_min"):
            if not math.isfinite(getattr(self, key)):
                raise ConfigError(f"vp discretization {key} must be a finite number, got {getattr(self, key)}")
        VPSchedule(self.beta_d, self.beta_min, self.epsilon_s)  # validates the values

    @property
    def default_sigma_range(self):
        schedule = VPSchedule(self.beta_d, self.beta_min, self.epsilon_s)
        return (float(schedule.sigma(self.epsilon_s)), float(schedule.sigma(1.0)))

    def sigma_steps(self, num_steps, sigma_min, sigma_max):
        t = 1 + _fractions(num_steps) * (self.epsilon_s - 1)
        return VPSchedule.fit(sigma_min, sigma_max, self.epsilon_s).sigma(t)


@DISCRETIZATIONS.register
@dataclass(frozen=True)
class VEDiscretization(Discretization):
    """t_i = sigma_max^2 (sigma_min^2/sigma_max^2)^(i/(N-1)), sigma_i = sqrt(t_i): geometric in sigma (Song et al. 2021)."""

    name: ClassVar[str] = "ve"

    @property
    def default_sigma_range(self):
        return (0.02, 100.0)

    def sigma_steps(self, num_steps, sigma_min, sigma_max):
        t = sigma_max**2 * (sigma_min**2 / sigma_max**2) ** _fractions(num_steps)
        return t.sqrt()


def iddpm_sigma_table(C_1: float = 0.001, C_2: float = 0.008, M: int = 1000, dtype=torch.float64) -> torch.Tensor:
    """iDDPM's noise levels u_0 > ... > u_M = 0 (EDM Table 1, column iDDPM; Nichol & Dhariwal 2021 cosine schedule).

    alpha_bar(j) = sin^2(pi j / (2 M (C_2 + 1))), u_M = 0 and
    u_{j-1} = sqrt((u_j^2 + 1) / max(alpha_bar(j-1)/alpha_bar(j), C_1) - 1), j = M..1.
    As in EDM, alpha_bar and its ratio are evaluated in float32 (EDM feeds an integer j), which moves u by up to
    ~5e-4 relative from the exact cosine table; the recurrence itself runs in ``dtype`` (float32 reproduces
    EDM's iDDPMPrecond buffer, float64 its ablation sampler).
    """
    check_num_steps(M, "iddpm M")  # a recurrence of M Python steps: bounded before any work
    return _iddpm_sigma_table(float(C_1), float(C_2), M, dtype).clone()


@functools.lru_cache(maxsize=8)
def _iddpm_sigma_table(C_1, C_2, M, dtype):
    j = torch.arange(M + 1)
    alpha_bar = (0.5 * math.pi * j / M / (C_2 + 1)).sin() ** 2
    ratio = (alpha_bar[:-1] / alpha_bar[1:]).clip(min=C_1)
    u = torch.zeros(M + 1, dtype=dtype)
    for k in range(M, 0, -1):  # a recurrence: each level depends on the next
        u[k - 1] = ((u[k] ** 2 + 1) / ratio[k - 1] - 1).sqrt()
    return u


@DISCRETIZATIONS.register
@dataclass(frozen=True)
class IDDPMDiscretization(Discretization):
    """Levels picked from iDDPM's table u_j within the range: sigma_i = u'[round(i (len(u') - 1)/(N-1))]."""

    name: ClassVar[str] = "iddpm"
    C_1: float = 0.001
    C_2: float = 0.008
    M: int = 1000

    def __post_init__(self):
        check_num_steps(self.M, "iddpm discretization M")
        if not 0 < self.C_1 <= 1:
            raise ConfigError(f"iddpm discretization C_1 must lie in (0, 1], got {self.C_1}")
        if not (self.C_2 >= 0 and math.isfinite(self.C_2)):
            raise ConfigError(f"iddpm discretization C_2 must be >= 0 and finite, got {self.C_2}")

    @property
    def default_sigma_range(self):
        return (0.002, 81.0)

    def sigma_steps(self, num_steps, sigma_min, sigma_max):
        u = iddpm_sigma_table(self.C_1, self.C_2, self.M)
        kept = u[(u >= sigma_min) & (u <= sigma_max)]
        if len(kept) == 0:
            raise ConfigError(f"no iDDPM noise level lies in [{sigma_min}, {sigma_max}]; widen --sigma_min/--sigma_max")
        index = ((len(kept) - 1) / (num_steps - 1) * torch.arange(num_steps, dtype=torch.float64)).round()
        return kept[index.to(torch.int64)]


@DISCRETIZATIONS.register
@dataclass(frozen=True)
class LogSNRDiscretization(Discretization):
    """Uniform in log sigma (equivalently in log-SNR): sigma_i = sigma_max (sigma_min/sigma_max)^(i/(N-1))."""

    name: ClassVar[str] = "logsnr"

    @property
    def default_sigma_range(self):
        return (0.002, 80.0)

    def sigma_steps(self, num_steps, sigma_min, sigma_max):
        log_max, log_min = math.log(sigma_max), math.log(sigma_min)
        return torch.exp(log_max + _fractions(num_steps) * (log_min - log_max))


@DISCRETIZATIONS.register
@dataclass(frozen=True)
class ExplicitDiscretization(Discretization):
    """An explicit, strictly decreasing list of positive noise levels; num_steps must equal its length."""

    name: ClassVar[str] = "explicit"
    sigmas: tuple[float, ...] = ()

    def __post_init__(self):
        s = self.sigmas
        if len(s) < 2:
            raise ConfigError("explicit discretization needs at least 2 noise levels in 'sigmas'")
        if any(not (x > 0 and math.isfinite(x)) for x in s) or any(a <= b for a, b in zip(s, s[1:])):
            raise ConfigError("explicit discretization 'sigmas' must be finite, positive and strictly decreasing")

    @property
    def default_sigma_range(self):
        return (self.sigmas[-1], self.sigmas[0])

    def sigma_steps(self, num_steps, sigma_min, sigma_max):
        if num_steps != len(self.sigmas):
            raise ConfigError(
                f"num_steps is {num_steps} but the explicit discretization lists {len(self.sigmas)} noise levels; "
                f"set num_steps to {len(self.sigmas)}"
            )
        sigmas = torch.tensor(self.sigmas, dtype=torch.float64)
        outside = sigmas[(sigmas < sigma_min * (1 - 1e-12)) | (sigmas > sigma_max * (1 + 1e-12))]
        if len(outside):
            raise ConfigError(
                f"explicit noise level {outside[0].item():g} lies outside the supported range "
                f"[{sigma_min:g}, {sigma_max:g}]; remove it or change sigma_min/sigma_max"
            )
        return sigmas
