"""Euler and EDM's generalised second-order solver (Heun for alpha = 1) (EDM Algorithm 1 and Sec. 3)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import ConfigError
from .base import SOLVERS, ODEPoint, Solver


@dataclass(frozen=True, slots=True)
class _EulerRecord:
    point: ODEPoint
    h: float


@SOLVERS.register
@dataclass(frozen=True)
class Euler(Solver):
    """x_{i+1} = x_hat + (t_{i+1} - t_hat) dx/dt(x_hat, t_hat): first order, one evaluation per step."""

    name: ClassVar[str] = "euler"
    order: ClassVar[int] = 1

    def evaluations(self, num_steps):
        return num_steps

    def prepare(self, ode, t_hat, t_next, device):
        h = (t_next - t_hat).tolist()
        return [_EulerRecord(p, hi) for p, hi in zip(ode.points(t_hat, device), h)]

    def step(self, x_hat, record, ctx):
        return torch.add(x_hat, ctx.slope(x_hat, record.point), alpha=record.h)


@dataclass(frozen=True, slots=True)
class _HeunRecord:
    point: ODEPoint
    h: float
    prime: ODEPoint | None  # None on the last step, which is an Euler step to t_N = 0
    alpha_h: float
    w_cur: float
    w_prime: float


@SOLVERS.register
@dataclass(frozen=True)
class Heun(Solver):
    """EDM's second-order step: x' = x_hat + alpha h d, t' = t_hat + alpha h,
    x_{i+1} = x_hat + h ((1 - 1/(2 alpha)) d + 1/(2 alpha) d'(x', t')); alpha = 1 is Heun's method (Algorithm 1).

    The last step, to sigma = 0, is an Euler step, so N steps cost 2N - 1 evaluations.
    """

    name: ClassVar[str] = "heun"
    order: ClassVar[int] = 2
    alpha: float = 1.0

    def __post_init__(self):
        if not 0 < self.alpha <= 1:
            raise ConfigError(f"heun alpha must lie in (0, 1], got {self.alpha}")

    def evaluations(self, num_steps):
        return 2 * num_steps - 1

    def prepare(self, ode, t_hat, t_next, device):
        h = t_next - t_hat
        points = ode.points(t_hat, device)
        primes = ode.points((t_hat + self.alpha * h)[:-1], device) + [None]
        w_prime = 1 / (2 * self.alpha)
        return [
            _HeunRecord(p, hi, q, self.alpha * hi, hi * (1 - w_prime), hi * w_prime) if q is not None
            else _HeunRecord(p, hi, None, 0.0, hi, 0.0)
            for p, q, hi in zip(points, primes, h.tolist())
        ]

    def step(self, x_hat, record, ctx):
        d = ctx.slope(x_hat, record.point)
        if record.prime is None:
            return torch.add(x_hat, d, alpha=record.h)
        x_prime = torch.add(x_hat, d, alpha=record.alpha_h)
        d_prime = ctx.slope(x_prime, record.prime)
        return torch.add(x_hat, d, alpha=record.w_cur).add_(d_prime, alpha=record.w_prime)
