"""Discrete-time Gaussian diffusion (DDPM, iDDPM, ADM): a model's own step grid, its beta schedules, respacing,
and the Gaussian algebra of its variational bound.

A model trained on T steps has abar_t = prod_{s<=t} (1 - beta_s), t = 0..T-1; in EDM's terms (Karras et al.
2022, Table 1, VP scaling) step t is the noise level sigma_t = sqrt((1 - abar_t)/abar_t), and its input
x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps is EDM's x = x_0 + sigma_t eps scaled by s = 1/sqrt(1 + sigma_t^2).
:class:`StepGrid` is that grid as a capability of the denoiser protocol (:mod:`edm_toolkit.protocol`): what the
original samplers (``ddpm``, ``ddim`` in :mod:`edm_toolkit.solvers.discrete`) and classifier guidance need.
Respacing (Nichol & Dhariwal 2021, Sec. 4) keeps a subset of the steps (:func:`space_timesteps`).

The variational bound (Ho et al. 2020, Eq. 5; Nichol & Dhariwal 2021, Eq. 4-6) is written once here, for the
training losses (:mod:`edm_toolkit.losses`, iddpm-*) and the bits/dim evaluation
(:mod:`edm_toolkit.metrics.likelihood`): the posterior q(x_{t-1} | x_t, x_0) (:meth:`StepGrid.posterior_mean`,
:attr:`StepGrid.posterior_log_variance_clipped`), p's variance (:meth:`StepGrid.model_log_variance`),
:func:`normal_kl`, the discretised Gaussian decoder :func:`discretized_gaussian_log_likelihood`, and the terms
L_{t-1} (:func:`vlb_terms`) and L_T (:func:`prior_kl`) per element. A denoiser's D(x; sigma_t) is p's prediction
of x_0, so p's mean is the posterior mean at x_0 = D.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Sequence

import torch

from .errors import ConfigError

__all__ = ["MAX_TIMESTEPS", "NOISE_SCHEDULES", "VARIANCES", "StepGrid", "discretized_gaussian_log_likelihood",
           "named_beta_schedule", "nearest_index", "normal_kl", "prior_kl", "respaced_count", "space_timesteps",
           "vlb_terms"]

NOISE_SCHEDULES = ("linear", "cosine")
VARIANCES = ("learned", "small", "large")
MAX_TIMESTEPS = 100_000  # tables are built step by step: bound the work a file or flag can ask for


def nearest_index(sigma: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index of the level nearest to each sigma (int64, sigma's shape), compared in the levels' dtype.

    The dtype matters for parity: EDM's iDDPM preconditioner compares in float32 against its float32 table,
    guided-diffusion grids are float64.
    """
    sigma = torch.as_tensor(sigma)
    distance = (sigma.to(levels.device, levels.dtype).reshape(-1, 1) - levels.reshape(1, -1)).abs()
    return distance.argmin(dim=1).reshape(sigma.shape).to(sigma.device)


@dataclass(frozen=True, eq=False)
class StepGrid:
    """A model's discrete step grid: ``alphas_cumprod`` abar_t, t = 0..T-1 (float64, decreasing).

    ``variance`` is the model's own reverse-process variance as the original's ``create_gaussian_diffusion``
    chose it: 'learned' (learn_sigma: the network also outputs the interpolation v of Nichol & Dhariwal 2021,
    Eq. 15), 'small' (beta_tilde) or 'large' (beta).
    """

    alphas_cumprod: torch.Tensor
    variance: str = "small"

    def __post_init__(self):
        abar = torch.as_tensor(self.alphas_cumprod).detach().to("cpu", torch.float64)
        if abar.ndim != 1 or not 1 <= len(abar) <= MAX_TIMESTEPS:
            raise ConfigError(f"a step grid needs 1 to {MAX_TIMESTEPS} steps, got shape {tuple(abar.shape)}")
        if not bool(((abar > 0) & (abar <= 1)).all()) or not bool((abar.diff() < 0).all()):
            raise ConfigError("a step grid needs decreasing alphas_cumprod in (0, 1]")
        if self.variance not in VARIANCES:
            raise ConfigError(f"unknown variance {self.variance!r}; choose one of: {', '.join(VARIANCES)}")
        object.__setattr__(self, "alphas_cumprod", abar)

    @classmethod
    def from_betas(cls, betas: torch.Tensor, variance: str = "small") -> "StepGrid":
        return cls(torch.cumprod(1 - torch.as_tensor(betas, dtype=torch.float64), dim=0), variance)

    @classmethod
    def from_sigmas(cls, sigmas: torch.Tensor, variance: str = "small") -> "StepGrid":
        """The grid of increasing noise levels sigma_t: abar_t = 1/(1 + sigma_t^2)."""
        return cls(1 / (1 + torch.as_tensor(sigmas).detach().to("cpu", torch.float64) ** 2), variance)

    @property
    def num_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    @cached_property
    def sigmas(self) -> torch.Tensor:
        """sigma_t = sqrt((1 - abar_t)/abar_t), increasing (float64)."""
        return ((1 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()

    def index(self, sigma: torch.Tensor) -> torch.Tensor:
        """The step t whose level is nearest to each sigma (int64)."""
        return nearest_index(sigma, self.sigmas)

    # The tables of the original's GaussianDiffusion (float64), computed from abar alone: a respaced chain is the
    # grid of its kept abar (SpacedDiffusion recomputes its betas the same way).

    @cached_property
    def alphas_cumprod_prev(self) -> torch.Tensor:
        """abar_{t-1}, with abar_{-1} = 1."""
        return torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])

    @cached_property
    def betas(self) -> torch.Tensor:
        """beta_t = 1 - abar_t/abar_{t-1}."""
        return 1 - self.alphas_cumprod / self.alphas_cumprod_prev

    @cached_property
    def posterior_variance(self) -> torch.Tensor:
        """beta_tilde_t = beta_t (1 - abar_{t-1})/(1 - abar_t), the variance of q(x_{t-1} | x_t, x_0) (Ho et al.
        2020, Eq. 7); 0 at t = 0."""
        return self.betas * (1 - self.alphas_cumprod_prev) / (1 - self.alphas_cumprod)

    @cached_property
    def posterior_log_variance_clipped(self) -> torch.Tensor:
        """log beta_tilde_t with t = 0 taking beta_tilde_1, as the original (beta_tilde_0 = 0); a one-step grid has
        no beta_tilde_1 and takes beta_0."""
        first = self.posterior_variance[1:2] if self.num_timesteps > 1 else self.betas[:1]
        return torch.cat([first, self.posterior_variance[1:]]).log()

    @cached_property
    def posterior_mean_coefs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(c_0, c_t): the posterior mean is c_0 x_0 + c_t x_t (Ho et al. 2020, Eq. 7); c_0 = 1, c_t = 0 at t = 0."""
        coef_x0 = self.betas * self.alphas_cumprod_prev.sqrt() / (1 - self.alphas_cumprod)
        coef_xt = (1 - self.alphas_cumprod_prev) * (1 - self.betas).sqrt() / (1 - self.alphas_cumprod)
        return coef_x0, coef_xt

    def fixed_log_variance(self, variance: str) -> torch.Tensor:
        """log Sigma_t of a fixed reverse-process variance: 'small' is the clipped log beta_tilde_t, 'large' is
        log beta_t with t = 0 taking beta_tilde_1 ("to get a better decoder log likelihood", the original)."""
        if variance == "small":
            return self.posterior_log_variance_clipped
        if variance == "large":
            return torch.cat([self.posterior_log_variance_clipped[:1], self.betas[1:].log()])
        raise ConfigError(f"variance {variance!r} is not fixed; choose 'small' or 'large'")

    def model_log_variance(self, t: torch.Tensor, variance: str, v: torch.Tensor | None = None,
                           like: torch.Tensor | None = None) -> torch.Tensor:
        """log Sigma_theta(x_t, t) of p(x_{t-1} | x_t) at steps ``t`` [N], shaped [N, 1, ...] like ``like`` (or v).

        'learned': the learned range of Nichol & Dhariwal 2021, Eq. 15, log Sigma = frac log beta_t +
        (1 - frac) log beta_tilde_t (clipped) with frac = (v + 1)/2 for the network's v; 'small'/'large': fixed
        (:meth:`fixed_log_variance`). Tables are cast to the dtype of v (or ``like``), as the original casts its
        float64 tables to the network's float32.
        """
        ref = v if v is not None else like
        if variance == "learned":
            if v is None:
                raise ConfigError("a learned variance needs the network's variance output v")
            max_log = _at(self.betas.log(), t, v)
            min_log = _at(self.posterior_log_variance_clipped, t, v)
            frac = (v + 1) / 2
            return frac * max_log + (1 - frac) * min_log
        return _at(self.fixed_log_variance(variance), t, ref)

    def posterior_mean(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The mean of q(x_{t-1} | x_t, x_0) in the VP space of x_t (Ho et al. 2020, Eq. 7)."""
        coef_x0, coef_xt = self.posterior_mean_coefs
        return _at(coef_x0, t, x0) * x0 + _at(coef_xt, t, x_t) * x_t


def _at(table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """table[t] shaped [N, 1, ..., 1] for broadcasting against ``like``, in its dtype and on its device."""
    values = table[torch.as_tensor(t).reshape(-1).cpu()]
    return values.reshape(-1, *[1] * (like.ndim - 1)).to(like.device, like.dtype)


# ----------------------------------------------------------------------------------------------------------
# The variational bound


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) per element, in nats (broadcasting)."""
    logvar1, logvar2 = torch.as_tensor(logvar1), torch.as_tensor(logvar2)
    return 0.5 * (-1.0 + logvar2 - logvar1 + (logvar1 - logvar2).exp() + (mean1 - mean2) ** 2 * (-logvar2).exp())


def _approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """The tanh approximation of the standard normal CDF that the original decoder uses (not erf)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """log P(x) per element, in nats, of N(means, e^(2 log_scales)) discretised to 8-bit data in [-1, 1]
    (Ho et al. 2020, Eq. 13): the mass of the bin [x - 1/255, x + 1/255], the outer bins reaching to -inf below
    -0.999 and to +inf above 0.999; the normal CDF is the original's tanh approximation and every probability is
    clamped at 1e-12 before its logarithm, as the original."""
    centered = x - means
    inv_std = (-log_scales).exp()
    cdf_plus = _approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = cdf_plus.clamp(min=1e-12).log()
    log_one_minus_cdf_min = (1.0 - cdf_min).clamp(min=1e-12).log()
    log_delta = (cdf_plus - cdf_min).clamp(min=1e-12).log()
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def vlb_terms(grid: StepGrid, x0: torch.Tensor, denoised: torch.Tensor, t: torch.Tensor,
              log_variance: torch.Tensor) -> torch.Tensor:
    """L_{t-1} per element, in bits, for clean images x0, p's prediction ``denoised`` = D(x_t; sigma_t) of x0 and
    p's log variance: KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t > 0 and the decoder NLL
    -log p(x_0 | x_1) (:func:`discretized_gaussian_log_likelihood`) for t = 0 (Nichol & Dhariwal 2021, Eq. 4-6).

    The two means are posterior means at x_0 and at D (:meth:`StepGrid.posterior_mean`), so they differ by
    c_0 (x_0 - D) whatever x_t is; at t = 0 p's mean is D itself (c_0 = 1, c_t = 0). The mean over a sample's
    elements is the original's ``_vb_terms_bpd`` output.
    """
    coef_x0 = _at(grid.posterior_mean_coefs[0], t, denoised)
    kl = normal_kl(coef_x0 * x0, _at(grid.posterior_log_variance_clipped, t, denoised), coef_x0 * denoised,
                   log_variance)
    decoder_nll = -discretized_gaussian_log_likelihood(x0, coef_x0 * denoised, 0.5 * log_variance)
    first = (torch.as_tensor(t).reshape(-1, *[1] * (x0.ndim - 1)) == 0).to(x0.device)
    return torch.where(first, decoder_nll, kl) / math.log(2.0)


def prior_kl(grid: StepGrid, x0: torch.Tensor) -> torch.Tensor:
    """L_T per element, in bits: KL(q(x_{T-1} | x_0) || N(0, I)) in the VP space (the original's ``_prior_bpd``)."""
    last = torch.full([x0.shape[0]], grid.num_timesteps - 1, dtype=torch.int64)
    mean = _at(grid.alphas_cumprod.sqrt(), last, x0) * x0
    log_variance = _at((1 - grid.alphas_cumprod).log(), last, x0)
    return normal_kl(mean, log_variance, 0.0, 0.0) / math.log(2.0)


def named_beta_schedule(name: str, num_timesteps: int) -> torch.Tensor:
    """float64 betas of the original ``get_named_beta_schedule``, value for value.

    linear (Ho et al. 2020, stretched to any T): ``linspace(s * 1e-4, s * 0.02, T)`` with s = 1000/T, evaluated
    as numpy does (start + i * step, last value exactly the end). cosine (Nichol & Dhariwal 2021, Eq. 17):
    ``beta_i = min(1 - abar((i+1)/T) / abar(i/T), 0.999)`` with ``abar(t) = cos^2((t + 0.008)/1.008 * pi/2)``.
    """
    check_schedule(name, num_timesteps)
    if name == "linear":
        scale = 1000 / num_timesteps
        start, end = scale * 0.0001, scale * 0.02
        if num_timesteps == 1:
            return torch.tensor([start], dtype=torch.float64, device="cpu")
        step = (end - start) / (num_timesteps - 1)
        betas = torch.arange(num_timesteps, dtype=torch.float64, device="cpu") * step + start
        betas[-1] = end
        return betas

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    T = num_timesteps
    return torch.tensor(
        [min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), 0.999) for i in range(T)],
        dtype=torch.float64,
        device="cpu",
    )


def check_schedule(name: str, num_timesteps: int) -> None:
    """A named beta schedule and its length T, validated (1 <= T <= MAX_TIMESTEPS)."""
    if name not in NOISE_SCHEDULES:
        raise ConfigError(f"unknown noise schedule {name!r}; choose one of: {', '.join(NOISE_SCHEDULES)}")
    if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, int) or not 1 <= num_timesteps <= MAX_TIMESTEPS:
        raise ConfigError(f"diffusion_steps must be a positive integer of at most {MAX_TIMESTEPS}, got {num_timesteps!r}")


# ----------------------------------------------------------------------------------------------------------
# Respacing


def _section_counts(section_counts: str | Sequence[int]) -> tuple[str, int] | tuple[int, ...]:
    """("ddim", N) for "ddimN", else the section counts; () for "" (every step)."""
    if isinstance(section_counts, str):
        text = section_counts.strip()
        try:
            if text.startswith("ddim"):
                count = int(text[4:])
                if count < 1:
                    raise ValueError
                return ("ddim", count)
            counts = tuple(int(c) for c in text.split(",")) if text else ()
        except ValueError:
            raise ConfigError(f"bad respacing {section_counts!r}: use 'ddimN' or section counts like "
                              "'10,15,20'") from None
    else:
        counts = tuple(section_counts)
        if any(isinstance(c, bool) or not isinstance(c, int) for c in counts):
            raise ConfigError(f"section counts must be integers, got {section_counts!r}")
    if any(c < 0 for c in counts) or (counts and sum(counts) == 0):
        raise ConfigError(f"section counts must be >= 0 and keep at least one step, got {section_counts!r}")
    return counts


def respaced_count(section_counts: str | Sequence[int]) -> int | None:
    """How many steps a respacing keeps: N for "ddimN", the sum of the section counts, None for "" (every step)."""
    counts = _section_counts(section_counts)
    if not counts:
        return None
    return counts[1] if counts[0] == "ddim" else sum(counts)


def space_timesteps(num_timesteps: int, section_counts: str | Sequence[int]) -> list[int]:
    """The original step indices kept by a respacing, sorted (improved-diffusion's ``space_timesteps``).

    ``"ddimN"``: ``range(0, T, stride)`` for the smallest stride giving exactly N steps (DDIM's striding).
    Section counts (``"10,15,20"`` or a list): T is cut into len(counts) near-equal sections (the first T mod n
    one step longer) and section i keeps counts[i] steps at ``round(j * stride)``, stride = (size-1)/(count-1),
    accumulated by repeated addition and rounded half to even exactly as the original. ``""`` keeps every step.
    """
    if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, int) or not 1 <= num_timesteps <= MAX_TIMESTEPS:
        raise ConfigError(f"num_timesteps must be a positive integer of at most {MAX_TIMESTEPS}, got {num_timesteps!r}")
    counts = _section_counts(section_counts)
    if not counts:
        return list(range(num_timesteps))
    if counts[0] == "ddim":
        for stride in range(1, num_timesteps):
            if len(range(0, num_timesteps, stride)) == counts[1]:
                return list(range(0, num_timesteps, stride))
        raise ConfigError(f"cannot take exactly {counts[1]} of {num_timesteps} steps with an integer stride "
                          f"(ddimN); use section counts like '{counts[1]}' instead")
    size_per, extra = divmod(num_timesteps, len(counts))
    kept, start = [], 0
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ConfigError(f"cannot take {count} steps from a section of {size} (T = {num_timesteps}, "
                              f"{len(counts)} sections)")
        stride = (size - 1) / (count - 1) if count > 1 else 1
        position = 0.0
        for _ in range(count):
            kept.append(start + round(position))
            position += stride
        start += size
    return sorted(set(kept))
