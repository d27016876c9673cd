"""Likelihoods in bits/dim: the variational bound of discrete-time models and the probability-flow ODE likelihood
of any denoiser.

* :func:`variational_bound` (Ho et al. 2020, Eq. 5; Nichol & Dhariwal 2021, Sec. 2 and 3.3; improved-diffusion's
  ``calc_bpd_loop``): for a denoiser with a ``step_grid`` of T steps, every term L_{t-1}, t = T-1..0 (one network
  evaluation each, on x_t drawn from q(x_t | x_0)), the decoder NLL at t = 0 and the prior term L_T, in bits per
  dimension of 8-bit data scaled to [-1, 1]. Their sum is the bound on -log2 p(x_0) per dimension that the paper
  reports (2.94 on CIFAR-10, 3.53 on ImageNet-64).
* :class:`ProbabilityFlowLikelihood` (Song et al. 2021, Sec. 4.3 and App. D.2; score_sde's ``likelihood.py``): the
  exact log-density of the probability-flow ODE's model (EDM Eq. 4, any schedule and scaling) at sigma_min, by
  integrating the ODE and its divergence from sigma_min to sigma_max with scipy's RK45 (rtol = atol = 1e-5), the
  divergence by the Hutchinson-Skilling estimator (one Rademacher or Gaussian probe per image for the whole
  solve), and the prior N(0, sigma_max^2 I) at the end. :func:`dequantize` and :func:`bits_per_dim` turn it into
  bits/dim of 8-bit data (uniform dequantisation; the offset of 7 bits for bins of width 2/256 in [-1, 1]).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from ..discrete import prior_kl, vlb_terms
from ..errors import ConfigError
from ..schedules import (
    SCALINGS,
    SCHEDULES,
    LinearSchedule,
    NoiseSchedule,
    NoScaling,
    Scaling,
)
from ..solvers.base import ProbabilityFlowODE

__all__ = ["ESTIMATORS", "ODELikelihoodResult", "ProbabilityFlowLikelihood", "VLBResult", "bits_per_dim",
           "dequantize", "variational_bound"]

ESTIMATORS = ("rademacher", "gaussian", "exact")
BIN_WIDTH = 2 / 256  # 8-bit data in [-1, 1]: what the bits/dim of a dequantised density refer to


def _no_grid_error(net) -> ConfigError:
    return ConfigError(f"the variational bound needs a model with a discrete step grid, and {type(net).__name__} "
                       "has none; use --method ode (the probability-flow ODE likelihood)")


# ----------------------------------------------------------------------------------------------------------
# The variational bound of discrete-time models


@dataclass(frozen=True)
class VLBResult:
    """The terms of the bound per image, in bits/dim: ``vb[:, t]`` is L_{t-1} (the decoder NLL at t = 0),
    ``prior_bpd`` is L_T and ``total_bpd`` their sum. ``xstart_mse[:, t]`` and ``mse[:, t]`` are the mean squared
    errors of D and of eps at step t (the original's diagnostics). Columns are in step order t = 0..T-1 (the
    original stacks them from t = T-1 down)."""

    total_bpd: torch.Tensor
    prior_bpd: torch.Tensor
    vb: torch.Tensor
    xstart_mse: torch.Tensor
    mse: torch.Tensor


@torch.no_grad()
def variational_bound(net, x0: torch.Tensor, class_labels: torch.Tensor | None = None, *, clip_denoised: bool = True,
                      randn_like: Callable[[torch.Tensor], torch.Tensor] = torch.randn_like,
                      progress: Callable[[int, int], None] | None = None) -> VLBResult:
    """The variational bound of a denoiser with a ``step_grid`` on images x0 (8-bit data scaled to [-1, 1]).

    For t = T-1 down to 0 (the original's order) it draws eps = ``randn_like(x0)``, evaluates D(x0 + sigma_t eps;
    sigma_t) (with the learned variance where the model has one, else the grid's fixed variance), clipped to
    [-1, 1] with ``clip_denoised``, and takes L_{t-1} of :func:`~edm_toolkit.discrete.vlb_terms` averaged over
    dimensions. Pass per-image streams (``SeedGenerators(seeds).randn_like``) for results that do not depend on
    the batch. ``progress(done, T)`` is called after every step. The terms are computed in float64.
    """
    grid = net.step_grid
    if grid is None:
        raise _no_grid_error(net)
    if not bool((x0.abs() <= 1).all()):
        raise ConfigError("the variational bound is defined for 8-bit data scaled to [-1, 1] (uint8/127.5 - 1); "
                          f"the images span [{float(x0.min()):.3g}, {float(x0.max()):.3g}]")
    T, batch = grid.num_timesteps, x0.shape[0]
    data = x0.to(torch.float64)
    vb, xstart_mse, mse = (torch.zeros(batch, T, dtype=torch.float64, device=x0.device) for _ in range(3))
    for done, t in enumerate(reversed(range(T)), start=1):
        steps = torch.full([batch], t, dtype=torch.int64)
        sigma = grid.sigmas[t].item()
        noise = randn_like(x0)
        x = x0 + sigma * noise
        sigmas = torch.full([batch], sigma, dtype=torch.float64, device=x0.device)
        if net.learned_variance:
            D, v = net.denoise_with_variance(x, sigmas, class_labels)
            v = v.to(torch.float64)
        else:
            D, v = net(x, sigmas, class_labels), None
        D = D.to(torch.float64)
        if clip_denoised:
            D = D.clamp(-1, 1)
        log_variance = grid.model_log_variance(steps, grid.variance, v, like=D)
        vb[:, t] = vlb_terms(grid, data, D, steps, log_variance).flatten(1).mean(dim=1)
        xstart_mse[:, t] = (D - data).square().flatten(1).mean(dim=1)
        mse[:, t] = ((x.to(torch.float64) - D) / sigma - noise.to(torch.float64)).square().flatten(1).mean(dim=1)
        if progress is not None:
            progress(done, T)
    prior_bpd = prior_kl(grid, data).flatten(1).mean(dim=1)
    return VLBResult(vb.sum(dim=1) + prior_bpd, prior_bpd, vb, xstart_mse, mse)


# ----------------------------------------------------------------------------------------------------------
# The probability-flow ODE likelihood


def dequantize(images: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Uniformly dequantised 8-bit images in [-1, 1): (k + u)/128 - 1 for uint8 k and u ~ U[0, 1) (score_sde's
    (u + 255 x)/256 of data x = k/255, scaled to [-1, 1]); float64."""
    if images.dtype != torch.uint8:
        raise ConfigError(f"dequantize takes uint8 images, got {images.dtype}")
    return (images.to(torch.float64) + uniform.to(torch.float64)) / 128 - 1


def bits_per_dim(log_likelihood: torch.Tensor, dims: int, bin_width: float = BIN_WIDTH) -> torch.Tensor:
    """-log2 P per dimension of the quantised data whose dequantised density is e^log_likelihood: the density
    times the bin volume bin_width^dims; 2/256 for 8-bit data in [-1, 1] adds log2(128) = 7 bits (score_sde's
    offset; 8 for data in [0, 1])."""
    return -(log_likelihood / dims + math.log(bin_width)) / math.log(2)


@dataclass(frozen=True)
class ODELikelihoodResult:
    """Per image: ``log_likelihood`` = log p_{sigma_min}(x) in nats (of x in EDM's unscaled space), its parts
    ``prior_logp`` (log N(z; 0, sigma_max^2 I) of the end point z) and ``delta_logp`` (the integrated divergence,
    with the scaling's log-Jacobian at the start), the end point ``z`` (unscaled), and the solver's ``nfe``
    (each one forward and one backward pass of the network, ``exact``: one backward pass per dimension)."""

    log_likelihood: torch.Tensor
    prior_logp: torch.Tensor
    delta_logp: torch.Tensor
    z: torch.Tensor
    nfe: int


@dataclass(frozen=True)
class ProbabilityFlowLikelihood:
    """log p(x) under the probability-flow ODE of a denoiser (EDM Eq. 4 with ``schedule`` and ``scaling``),
    between ``sigma_min`` and ``sigma_max``.

    The ODE dx/dt = a (x - c D(x/s; sigma)) is integrated forward in t from x(t_min) = s(t_min) x with scipy's
    ``solve_ivp`` (``method``, ``rtol``, ``atol``: score_sde's RK45 at 1e-5), one solve for the whole batch (as
    the original: the step sizes are shared, so an image's value moves with its batch within the tolerance),
    together with the divergence div f = a (d - c/s tr dD/dx) (d dimensions). tr dD/dx is estimated by
    Hutchinson-Skilling, eps^T (dD/dx) eps with one probe eps per image for the whole solve ('rademacher' or
    'gaussian', score_sde's two; 'exact' computes the trace with one backward pass per dimension, for small
    images). Then log p_{t_min}(x(t_min)) = log N(x(t_max); 0, (sigma_max s(t_max))^2 I) + integral of div f, and
    log p_{sigma_min}(x) adds d log s(t_min). The prior N(0, sigma_max^2 I) (EDM's latents) leaves out the data's
    own variance: for unit-scale data the error is about d/(2 sigma_max^2) nats (1e-4 bits/dim at sigma_max 80).

    Any schedule and scaling have the same trajectory of x/s (EDM Sec. 3), so the value depends on them only
    through the solver's error; they change how hard the solve is.
    """

    schedule: NoiseSchedule = field(default_factory=LinearSchedule)
    scaling: Scaling = field(default_factory=NoScaling)
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    estimator: str = "rademacher"
    rtol: float = 1e-5
    atol: float = 1e-5
    method: str = "RK45"
    max_evaluations: int = 10_000

    def __post_init__(self):
        object.__setattr__(self, "schedule", SCHEDULES.create(self.schedule))
        object.__setattr__(self, "scaling", SCALINGS.create(self.scaling))
        if not 0 < self.sigma_min < self.sigma_max < math.inf:
            raise ConfigError(f"need 0 < sigma_min < sigma_max < inf, got {self.sigma_min}, {self.sigma_max}")
        if self.estimator not in ESTIMATORS:
            raise ConfigError(f"unknown trace estimator {self.estimator!r}; choose one of: {', '.join(ESTIMATORS)}")
        if not (self.rtol > 0 and self.atol > 0):
            raise ConfigError(f"rtol and atol must be > 0, got {self.rtol}, {self.atol}")
        if isinstance(self.max_evaluations, bool) or not (isinstance(self.max_evaluations, int)
                                                          and self.max_evaluations > 0):
            raise ConfigError(f"max_evaluations must be a positive integer, got {self.max_evaluations!r}")
        if self.method not in ("RK45", "RK23", "DOP853"):
            raise ConfigError(f"unknown ODE method {self.method!r}; choose RK45 (score_sde's), RK23 or DOP853")

    @classmethod
    def from_sampler(cls, sampler, net, **changes) -> "ProbabilityFlowLikelihood":
        """The ODE of a sampler (a preset's ``sampling``): its schedule, scaling and noise range (clamped to the
        network's, as sampling does); ``changes`` set the other fields."""
        if sampler.solver.runs_on_model_grid:
            raise ConfigError(f"solver {sampler.solver.name!r} samples on the model's grid and defines no ODE range; "
                              "choose a preset with a continuous solver (e.g. edm or vp)")
        sigma_min, sigma_max = sampler.sigma_range(net)
        return cls(schedule=sampler.schedule, scaling=sampler.scaling, sigma_min=sigma_min, sigma_max=sigma_max,
                   **changes)

    def probe(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor | None:
        """One Hutchinson probe shaped like x (None for the exact trace)."""
        if self.estimator == "gaussian":
            return torch.randn(x.shape, generator=generator, dtype=torch.float64, device=x.device)
        if self.estimator == "rademacher":
            return torch.randint(0, 2, x.shape, generator=generator, device=x.device).to(torch.float64) * 2 - 1
        return None

    def __call__(self, net, x: torch.Tensor, class_labels: torch.Tensor | None = None, *,
                 probe: torch.Tensor | None = None,
                 progress: Callable[[float, int], None] | None = None) -> ODELikelihoodResult:
        """log p_{sigma_min}(x) per image (nats). ``probe``: the Hutchinson probes, shaped like x (default: drawn
        from the global RNG, :meth:`probe`); ``progress(sigma, nfe)`` after every evaluation. A solve that needs
        more than ``max_evaluations`` evaluations stops with a :class:`ConfigError`."""
        from scipy.integrate import solve_ivp

        if self.estimator == "exact":
            probe = None
        elif probe is None:
            probe = self.probe(x)
        elif probe.shape != x.shape:
            raise ConfigError(f"the probes must be shaped like the images {tuple(x.shape)}, got {tuple(probe.shape)}")
        schedule = self.schedule.bind(self.sigma_min, self.sigma_max)
        ode = ProbabilityFlowODE(schedule, self.scaling)
        t_min, t_max = (float(schedule.sigma_inv(torch.tensor(s, dtype=torch.float64)))
                        for s in (self.sigma_min, self.sigma_max))
        shape, batch, dims, device = x.shape, x.shape[0], x[0].numel(), x.device
        probe = None if probe is None else probe.to(device, torch.float64)
        nfe = 0

        def rhs(t: float, state: np.ndarray) -> np.ndarray:
            nonlocal nfe
            if nfe == self.max_evaluations:
                raise _TooManyEvaluations
            nfe += 1
            point = ode.points(torch.tensor([t], dtype=torch.float64), device)[0]
            x_t = torch.from_numpy(state[:-batch]).reshape(shape).to(device)
            D, trace = _denoise_with_trace(net, x_t * point.inv_s, point.sigma_net, class_labels, probe)
            dx = point.a * (x_t - point.c * D)
            divergence = point.a * (dims - point.c * point.inv_s * trace)
            if progress is not None:
                progress(point.sigma, nfe)
            return np.concatenate([dx.flatten().cpu().numpy(), divergence.cpu().numpy()])

        s_min, s_max = (float(ode.s(torch.tensor(t, dtype=torch.float64))) for t in (t_min, t_max))
        start = np.concatenate([(x.to(torch.float64) * s_min).flatten().cpu().numpy(), np.zeros(batch)])
        try:
            solution = solve_ivp(rhs, (t_min, t_max), start, method=self.method, rtol=self.rtol, atol=self.atol)
        except _TooManyEvaluations:
            raise ConfigError(f"the probability-flow ODE solve needed more than {self.max_evaluations} evaluations "
                              f"(stiff near sigma_min = {self.sigma_min:g}?); raise sigma_min, loosen rtol/atol or "
                              "allow more evaluations") from None
        if not solution.success:
            raise ConfigError(f"the probability-flow ODE solve failed ({solution.message}); try a smaller sigma_max "
                              "or looser tolerances")
        end = torch.from_numpy(np.ascontiguousarray(solution.y[:, -1])).to(device)
        z = end[:-batch].reshape(shape) / s_max
        prior_std = self.sigma_max * s_max
        prior_logp = (-0.5 * (z * s_max / prior_std).square().flatten(1).sum(dim=1)
                      - dims * (math.log(prior_std) + 0.5 * math.log(2 * math.pi)))
        delta_logp = end[-batch:] + dims * math.log(s_min)
        return ODELikelihoodResult(prior_logp + delta_logp, prior_logp, delta_logp, z, nfe)


class _TooManyEvaluations(Exception):
    pass


def _denoise_with_trace(net, x_hat: torch.Tensor, sigma, class_labels, probe: torch.Tensor | None):
    """(D(x_hat; sigma), tr dD/dx_hat per image): eps^T (dD/dx) eps for a probe eps, or the exact trace (one
    backward pass per dimension) when ``probe`` is None."""
    with torch.enable_grad():
        x_hat = x_hat.detach().requires_grad_(True)
        D = net(x_hat, sigma, class_labels).to(torch.float64)
        if probe is not None:
            (grad,) = torch.autograd.grad((D * probe).sum(), x_hat)
            return D.detach(), (grad.to(torch.float64) * probe).flatten(1).sum(dim=1)
        flat = D.flatten(1)
        trace = torch.zeros(flat.shape[0], dtype=torch.float64, device=flat.device)
        for i in range(flat.shape[1]):
            (grad,) = torch.autograd.grad(flat[:, i].sum(), x_hat, retain_graph=i + 1 < flat.shape[1])
            trace += grad.flatten(1)[:, i].to(torch.float64)
        return D.detach(), trace
