"""Noise schedules sigma(t) and signal scalings s(t): two axes of EDM's Table 1.

The general probability-flow ODE (Karras et al. 2022, Eq. 4) is

    dx/dt = (sigma'(t)/sigma(t) + s'(t)/s(t)) x - sigma'(t) s(t)/sigma(t) D(x/s(t); sigma(t)).

A schedule gives sigma(t), sigma'(t) and sigma^-1; a scaling gives s and s' in terms of the schedule's values.
All methods are closed forms on float64 tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from .errors import ConfigError
from .registry import Registry

SCHEDULES: Registry["NoiseSchedule"] = Registry("schedule")
SCALINGS: Registry["Scaling"] = Registry("scaling")


def _f64(t) -> torch.Tensor:
    return torch.as_tensor(t, dtype=torch.float64)


def vp_sigma(t, beta_d: float, beta_min: float) -> torch.Tensor:
    """sigma(t) = sqrt(exp(beta_d t^2/2 + beta_min t) - 1) of the VP schedule (EDM Table 1), in t's dtype.

    In float32 it is computed as EDM's preconditioners and losses compute it (exp, then minus 1), for bit parity:
    sigma(1e-5) is 0.0009765625 there, not 0.0010000. Other dtypes use the accurate expm1.
    """
    t = torch.as_tensor(t)
    exponent = 0.5 * beta_d * t**2 + beta_min * t
    return (exponent.exp() - 1 if t.dtype == torch.float32 else exponent.expm1()).sqrt()


def vp_sigma_inv(sigma, beta_d: float, beta_min: float) -> torch.Tensor:
    """t(sigma) = (sqrt(beta_min^2 + 2 beta_d ln(1 + sigma^2)) - beta_min)/beta_d, the inverse of :func:`vp_sigma`,
    in sigma's dtype (float32: EDM's log(sigma^2 + 1); otherwise the accurate log1p)."""
    sigma = torch.as_tensor(sigma)
    log_term = (sigma**2 + 1).log() if sigma.dtype == torch.float32 else (sigma**2).log1p()
    return ((beta_min**2 + 2 * beta_d * log_term).sqrt() - beta_min) / beta_d


class NoiseSchedule:
    """sigma(t): the noise level at time t (Table 1, "Schedule")."""

    name: ClassVar[str]

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def sigma_deriv(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def sigma_inv(self, sigma: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def bind(self, sigma_min: float, sigma_max: float) -> "NoiseSchedule":
        """The schedule used to sample over [sigma_min, sigma_max]; only VP depends on the range."""
        return self


@SCHEDULES.register
@dataclass(frozen=True)
class VPSchedule(NoiseSchedule):
    """VP: sigma(t) = sqrt(exp(beta_d t^2/2 + beta_min t) - 1) (Table 1; Song et al. 2021, Eq. 32).

    With ``fit_to_range`` (EDM's ablation sampler) beta_d and beta_min are refit so that sigma(epsilon_s) and
    sigma(1) hit the sampled range exactly; with the default range the refit gives back 19.9 and 0.1.
    """

    name: ClassVar[str] = "vp"
    beta_d: float = 19.9
    beta_min: float = 0.1
    epsilon_s: float = 1e-3
    fit_to_range: bool = True

    def __post_init__(self):
        if not self.beta_d > 0:
            raise ConfigError(f"vp schedule beta_d must be > 0, got {self.beta_d}")
        if not 0 < self.epsilon_s < 1:
            raise ConfigError(f"vp schedule epsilon_s must lie in (0, 1), got {self.epsilon_s}")
        # beta_min may be negative (a refit range can need it) as long as sigma(t) > 0 on [epsilon_s, 1].
        if not 0.5 * self.beta_d * self.epsilon_s**2 + self.beta_min * self.epsilon_s > 0:
            raise ConfigError(f"vp schedule with beta_d={self.beta_d}, beta_min={self.beta_min} has sigma(epsilon_s) <= 0")

    @staticmethod
    def fit(sigma_min: float, sigma_max: float, epsilon_s: float) -> "VPSchedule":
        """The VP schedule with sigma(epsilon_s) = sigma_min and sigma(1) = sigma_max (EDM's beta refit)."""
        beta_d = 2 * (math.log(sigma_min**2 + 1) / epsilon_s - math.log(sigma_max**2 + 1)) / (epsilon_s - 1)
        beta_min = math.log(sigma_max**2 + 1) - 0.5 * beta_d
        return VPSchedule(beta_d=beta_d, beta_min=beta_min, epsilon_s=epsilon_s, fit_to_range=False)

    def bind(self, sigma_min: float, sigma_max: float) -> "VPSchedule":
        return VPSchedule.fit(sigma_min, sigma_max, self.epsilon_s) if self.fit_to_range else self

    def sigma(self, t):
        return vp_sigma(_f64(t), self.beta_d, self.beta_min)

    def sigma_deriv(self, t):
        t = _f64(t)
        sigma = self.sigma(t)
        return 0.5 * (self.beta_min + self.beta_d * t) * (sigma + 1 / sigma)

    def sigma_inv(self, sigma):
        return vp_sigma_inv(_f64(sigma), self.beta_d, self.beta_min)


@SCHEDULES.register
@dataclass(frozen=True)
class VESchedule(NoiseSchedule):
    """VE: sigma(t) = sqrt(t) (Table 1; Song et al. 2021, the variance-exploding SDE in t = sigma^2)."""

    name: ClassVar[str] = "ve"

    def sigma(self, t):
        return _f64(t).sqrt()

    def sigma_deriv(self, t):
        return 0.5 / _f64(t).sqrt()

    def sigma_inv(self, sigma):
        return _f64(sigma) ** 2


@SCHEDULES.register
@dataclass(frozen=True)
class LinearSchedule(NoiseSchedule):
    """EDM: sigma(t) = t (Table 1, "Ours"), which makes the ODE dx/dsigma = (x - D(x; sigma))/sigma."""

    name: ClassVar[str] = "linear"

    def sigma(self, t):
        return _f64(t)

    def sigma_deriv(self, t):
        return torch.ones_like(_f64(t))

    def sigma_inv(self, sigma):
        return _f64(sigma)


class Scaling:
    """s(t): the scale of the signal, written in terms of the schedule's sigma(t) and sigma'(t) (Table 1)."""

    name: ClassVar[str]

    def s(self, sigma: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def s_deriv(self, sigma: torch.Tensor, sigma_deriv: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


@SCALINGS.register
@dataclass(frozen=True)
class VPScaling(Scaling):
    """VP: s(t) = 1/sqrt(1 + sigma(t)^2), s'(t) = -sigma(t) sigma'(t) s(t)^3."""

    name: ClassVar[str] = "vp"

    def s(self, sigma):
        return 1 / (1 + _f64(sigma) ** 2).sqrt()

    def s_deriv(self, sigma, sigma_deriv):
        sigma = _f64(sigma)
        return -sigma * sigma_deriv * self.s(sigma) ** 3


@SCALINGS.register
@dataclass(frozen=True)
class NoScaling(Scaling):
    """No scaling: s(t) = 1 (VE and EDM)."""

    name: ClassVar[str] = "none"

    def s(self, sigma):
        return torch.ones_like(_f64(sigma))

    def s_deriv(self, sigma, sigma_deriv):
        return torch.zeros_like(_f64(sigma))
