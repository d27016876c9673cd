"""The original discrete-time samplers of DDPM/iDDPM/ADM, as solvers on the model's own step grid.

A model trained on T steps (its :class:`~edm_toolkit.discrete.StepGrid`) is sampled down a chain of kept steps
(respacing, Nichol & Dhariwal 2021, Sec. 4; :func:`~edm_toolkit.discrete.space_timesteps`). Between two kept
levels sigma > sigma' the chain has abar = 1/(1 + sigma^2), abar' = 1/(1 + sigma'^2) (1 after the last step) and
its own beta = 1 - abar/abar'. The samplers work in the original's VP space, x_t = x/sqrt(1 + sigma^2) for EDM's
x, with pred_x0 = D(x; sigma) (clipped to [-1, 1] with ``clip_denoised``):

* **ddpm** (ancestral, Ho et al. 2020, Eq. 6-7): x_{t'} ~ N(mu, Sigma) with the posterior mean
  mu = beta sqrt(abar')/(1 - abar) pred_x0 + (1 - abar') sqrt(1 - beta)/(1 - abar) x_t and Sigma = beta_tilde =
  beta (1 - abar')/(1 - abar) ('small'), beta ('large') or, 'learned' (Nichol & Dhariwal 2021, Eq. 15),
  log Sigma = frac log beta + (1 - frac) log beta_tilde with frac = (v + 1)/2. beta_tilde is 0 at the last step;
  as the original, its logarithm (and 'large' there) takes the previous step's beta_tilde.
* **ddim** (Song et al. 2021, Eq. 12 and 16), with eps re-derived from the clipped pred_x0:
  x_{t'} = sqrt(abar') pred_x0 + sqrt(1 - abar' - s^2) eps + s z,  s = eta sqrt((1 - abar')/(1 - abar))
  sqrt(1 - abar/abar').

Classifier guidance takes the original forms (Dhariwal & Nichol 2021, Algorithms 1 and 2), the classifier
receiving the original step index: mu' = mu + Sigma g (ddpm) and eps' = eps - sqrt(1 - abar) g (ddim), with
g = scale grad_{x_t} log p_phi(y | x_t, t). Both draw one noise tensor per step, the last step included (no noise
is added there), as the original does, so per-seed streams make an image depend only on its seed. They start
from x_T ~ N(0, I) in the VP space (:meth:`prior_std`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from ..discrete import StepGrid, respaced_count, space_timesteps
from ..errors import ConfigError
from ..guidance import class_indices, classifier_log_prob_grad
from .base import SOLVERS, ODEPoint, Solver

__all__ = ["DDIM", "DDPM"]

VARIANCES = ("auto", "learned", "small", "large")
NOT_AN_OPTION = {"option": False}  # set in code (edm generate --classifier), not by --solver-opt


@dataclass(frozen=True, slots=True)
class _GridStep:
    point: ODEPoint
    s_next: float  # s(t_next): the sampler's scaling of the next state
    t_index: int  # the original step index (what a classifier receives)
    sqrt_abar: float
    sqrt_abar_prev: float
    sqrt_one_minus_abar: float
    coef_x0: float  # posterior mean coefficients (ddpm)
    coef_xt: float
    variance: float  # the fixed variance Sigma (ddpm; unused with a learned one)
    log_beta: float  # the two ends of the learned range (ddpm)
    log_beta_tilde: float
    ddim_noise: float  # DDIM's s (0 for eta = 0)
    ddim_eps: float  # DDIM's sqrt(1 - abar' - s^2)
    last: bool
    learned: bool  # ddpm with the model's learned variance


@dataclass(frozen=True)
class _GridSolver(Solver):
    """Shared by ddpm and ddim: the respaced chain, its coefficients, and the original guidance.

    ``respacing``: '' (N steps, respaced as the solver's ``default_spacing``), 'ddimN' or section counts
    '10,15,20'; ``clip_denoised`` clips pred_x0 to [-1, 1]; ``classifier`` and ``classifier_scale`` guide in
    the original forms (set by ``edm generate --classifier/--classifier-scale``, not by --solver-opt).
    """

    order: ClassVar[int] = 1
    accepts_churn: ClassVar[bool] = False
    runs_on_model_grid: ClassVar[bool] = True
    default_spacing: ClassVar[str]  # how N steps are respaced when no respacing is given: "ddimN" or "N"

    respacing: str = ""
    clip_denoised: bool = True
    classifier: nn.Module | None = field(default=None, metadata=NOT_AN_OPTION)
    classifier_scale: float = field(default=1.0, metadata=NOT_AN_OPTION)

    def __post_init__(self):
        if not isinstance(self.respacing, str):
            raise ConfigError(f"respacing must be a string like 'ddim25' or '10,15,20', got {self.respacing!r}")
        respaced_count(self.respacing)  # validates the form
        if not isinstance(self.clip_denoised, bool):
            raise ConfigError(f"clip_denoised must be true or false, got {self.clip_denoised!r}")
        if self.classifier is not None and not isinstance(self.classifier, nn.Module):
            raise ConfigError("classifier must be a noisy classifier module: load one with --classifier PATH")
        if not math.isfinite(self.classifier_scale):
            raise ConfigError(f"classifier_scale must be a finite number, got {self.classifier_scale}")

    def evaluations(self, num_steps):
        return respaced_count(self.respacing) or num_steps

    def model_grid_steps(self, grid: StepGrid, num_steps: int) -> torch.Tensor:
        spacing = self.respacing or (f"ddim{num_steps}" if self.default_spacing == "ddim" else str(num_steps))
        kept = space_timesteps(grid.num_timesteps, spacing)
        return grid.sigmas[kept].flip(0)

    def prior_std(self, sigma_max: float) -> float:
        """x_T ~ N(0, I) in the VP space is x ~ N(0, (1 + sigma_max^2) I) in EDM's."""
        return math.sqrt(1 + sigma_max**2)

    def variance_of(self, grid: StepGrid) -> str:
        """'learned', 'small' or 'large': the variance this sampler uses on ``grid``."""
        return "small"

    def ddim_noise(self, abar: torch.Tensor, abar_prev: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(abar)

    def prepare(self, ode, t_hat, t_next, device):
        if ode.grid is None:
            raise ConfigError(f"solver {self.name!r} needs a model with a discrete step grid")
        if self.classifier is not None and self.classifier.step_grid.num_timesteps != ode.grid.num_timesteps:
            raise ConfigError(f"the classifier counts {self.classifier.step_grid.num_timesteps} steps but the model "
                              f"{ode.grid.num_timesteps}")
        points = ode.points(t_hat, device)
        t_index = ode.grid.index(torch.tensor([p.sigma for p in points], dtype=torch.float64))
        # The chain's tables as the original's SpacedDiffusion computes them (float64): its betas from the model's
        # abar, then its own abar as their cumulative product (StepGrid.from_betas), in the order of the original
        # indices; the records run the other way, from the highest level down.
        kept_abar = ode.grid.alphas_cumprod[t_index]
        beta = 1 - kept_abar / torch.cat([kept_abar[1:], torch.ones(1, dtype=torch.float64)])
        chain = StepGrid.from_betas(beta.flip(0))
        abar, abar_prev = chain.alphas_cumprod.flip(0), chain.alphas_cumprod_prev.flip(0)
        coef_x0, coef_xt = (c.flip(0) for c in chain.posterior_mean_coefs)
        variance = self.variance_of(ode.grid)
        # The clipped log beta_tilde (and 'large' at the last step) take the step before's beta_tilde (a one-step
        # chain has none; its variance is never used, beta stands in).
        log_fixed = chain.fixed_log_variance("large" if variance == "large" else "small").flip(0)
        s = self.ddim_noise(abar, abar_prev)
        columns = (points, ode.s(t_next).tolist(), t_index.tolist(), abar.sqrt().tolist(),
                   abar_prev.sqrt().tolist(), (1 - abar).sqrt().tolist(), coef_x0.tolist(), coef_xt.tolist(),
                   log_fixed.exp().tolist(), chain.betas.log().flip(0).tolist(),
                   chain.posterior_log_variance_clipped.flip(0).tolist(), s.tolist(),
                   (1 - abar_prev - s**2).clamp(min=0).sqrt().tolist())
        n = len(points)
        return [_GridStep(*row, last=i == n - 1, learned=variance == "learned") for i, row in enumerate(zip(*columns))]

    def predict_x0(self, x, record, ctx):
        """(pred_x0, v): D at the step's level, clipped as asked; v for a learned variance, else None."""
        if record.learned:
            D, v = ctx.denoise_with_variance(x, record.point)
        else:
            D, v = ctx.denoise(x, record.point), None
        return (D.clamp(-1, 1) if self.clip_denoised else D), v

    def gradient(self, x_t, record, ctx):
        """scale grad_{x_t} log p_phi(y | x_t, t): ADM's cond_fn at the step's original index, or None."""
        if self.classifier is None or self.classifier_scale == 0:
            return None
        labels = class_indices(ctx.class_labels, x_t.shape[0]).to(x_t.device)
        t = torch.full([x_t.shape[0]], record.t_index, dtype=torch.int64, device=x_t.device)
        grad = classifier_log_prob_grad(self.classifier, x_t.to(torch.float32), t, labels)
        return self.classifier_scale * grad.to(torch.float64)


@SOLVERS.register
@dataclass(frozen=True)
class DDPM(_GridSolver):
    """DDPM ancestral sampling on the model's own grid (Ho et al. 2020; iDDPM's learned variance).

    ``variance``: 'auto' (the model's own choice, as the original's create_gaussian_diffusion made it),
    'learned', 'small' (beta_tilde) or 'large' (beta). ``respacing`` '' takes N even steps (the original's "N").
    """

    name: ClassVar[str] = "ddpm"
    default_spacing: ClassVar[str] = "even"
    variance: str = "auto"

    def __post_init__(self):
        super().__post_init__()
        if self.variance not in VARIANCES:
            raise ConfigError(f"unknown variance {self.variance!r}; choose one of: {', '.join(VARIANCES)}")

    def variance_of(self, grid):
        if self.variance == "auto":
            return grid.variance
        if self.variance == "learned" and grid.variance != "learned":
            raise ConfigError("variance 'learned' needs a model that predicts its variance (trained with "
                              "learn_sigma); use 'small' or 'large'")
        return self.variance

    def step(self, x, record, ctx):
        x_edm = x * record.point.inv_s
        x_t = x_edm * record.sqrt_abar
        x0, v = self.predict_x0(x, record, ctx)
        ctx.denoised = x0
        mean = record.coef_x0 * x0 + record.coef_xt * x_t
        if record.learned:
            frac = (v + 1) / 2
            variance = (frac * record.log_beta + (1 - frac) * record.log_beta_tilde).exp()
        else:
            variance = record.variance
        grad = self.gradient(x_t, record, ctx)
        if grad is not None:
            mean = mean + variance * grad
        noise = ctx.randn_like(x)
        x_prev = mean if record.last else mean + variance**0.5 * noise
        return x_prev * (record.s_next / record.sqrt_abar_prev)


@SOLVERS.register
@dataclass(frozen=True)
class DDIM(_GridSolver):
    """DDIM on the model's own grid (Song et al. 2021): deterministic at eta 0, ancestral-like at eta 1.

    ``eta`` scales the noise of each step (Song et al. 2021, Eq. 16); ``respacing`` '' takes the original's
    "ddimN" striding for N steps.
    """

    name: ClassVar[str] = "ddim"
    default_spacing: ClassVar[str] = "ddim"
    eta: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        if not (self.eta >= 0 and math.isfinite(self.eta)):
            raise ConfigError(f"eta must be a finite number >= 0, got {self.eta!r}")

    def ddim_noise(self, abar, abar_prev):
        return self.eta * ((1 - abar_prev) / (1 - abar)).sqrt() * (1 - abar / abar_prev).sqrt()

    def step(self, x, record, ctx):
        x_edm = x * record.point.inv_s
        x0, _ = self.predict_x0(x, record, ctx)
        sigma = record.point.sigma
        eps = (x_edm - x0) / sigma
        grad = self.gradient(x_edm * record.sqrt_abar, record, ctx)
        if grad is not None:
            eps = eps - record.sqrt_one_minus_abar * grad
            x0 = x_edm - sigma * eps
        ctx.denoised = x0
        x_prev = x0 * record.sqrt_abar_prev + record.ddim_eps * eps
        noise = ctx.randn_like(x)
        if not record.last:
            x_prev = x_prev + record.ddim_noise * noise
        return x_prev * (record.s_next / record.sqrt_abar_prev)
