"""The original discrete-time samplers of improved-/guided-diffusion, on a model's own step grid.

A model trained on T steps with abar_t = prod_{s<=t} (1 - beta_s) is sampled down a chain of kept steps
(respacing, Nichol & Dhariwal 2021, Sec. 4): :func:`space_timesteps` picks the kept original indices, the chain's
betas are recomputed from their abar as beta'_k = 1 - abar_{t_k}/abar_{t_{k-1}}, and the network still receives
the original indices t_k (times 1000/T with ``rescale_timesteps``). At each kept step, from the last to 0:

* the network gives eps (or x_0) and, with learned variances, v; pred_x0 = sqrt(1/abar) x_t - sqrt(1/abar - 1) eps,
  clipped to [-1, 1] with ``clip_denoised``;
* **ddpm** (ancestral, Ho et al. 2020, Eq. 6-7): x_{k-1} ~ N(mu, Sigma) with the posterior mean
  mu = coef1 pred_x0 + coef2 x_t and Sigma = beta_tilde (small), beta (large, beta_tilde at the first step as
  the original does) or, learned (Nichol & Dhariwal 2021, Eq. 15), log Sigma = frac log beta + (1 - frac)
  log beta_tilde with frac = (v + 1)/2;
* **ddim** (Song et al. 2021, Eq. 12 and 16): with eps re-derived from the clipped pred_x0,
  x_{k-1} = sqrt(abar') pred_x0 + sqrt(1 - abar' - s^2) eps + s z,
  s = eta sqrt((1 - abar')/(1 - abar)) sqrt(1 - abar/abar').

Classifier guidance takes the original forms (Dhariwal & Nichol 2021, Algorithms 1 and 2; see
:mod:`edm_toolkit.guidance`), the classifier receiving the original step index. Noise comes from ``randn_like``,
called once per step (also at the last step and with eta 0) as the original does, so per-seed generators make
each image depend only on its seed. Arithmetic follows the original: float64 tables, cast to float32 per step.

guided-/improved-diffusion models (:class:`~edm_toolkit.adapters.openai.OpenAIDenoiser`) are run through their
raw network output. Any other denoiser with a discrete grid (EDM's iDDPMPrecond, grid ``PredictionDenoiser``s)
is run through D: pred_x0 = D(x_t / sqrt(abar_t); sigma_t) on the grid abar = 1/(1 + sigma^2); such models
have no learned variances.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import cached_property
from types import SimpleNamespace
from typing import Callable, NamedTuple, Sequence

import torch

from .adapters.openai import OpenAIDenoiser
from .errors import ConfigError
from .guidance import class_indices, classifier_log_prob_grad, grid_alphas_cumprod

__all__ = ["DiscreteChain", "DiscreteSampler", "DiscreteStepInfo", "METHODS", "VARIANCES", "space_timesteps"]

METHODS = ("ddpm", "ddim")
VARIANCES = ("auto", "learned", "small", "large")
_VARIANCE_OF_MODEL = {"learned_range": "learned", "fixed_small": "small", "fixed_large": "large"}


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


def space_timesteps(num_timesteps: int, section_counts: str | Sequence[int]) -> list[int]:
    """The original step indices kept by a respacing, sorted (improved-diffusion's ``space_timesteps``).

    ``"ddimN"``: ``range(0, T, stride)`` for the smallest stride giving exactly N steps (DDIM's striding).
    Section counts (``"10,15,20"`` or a list): T is cut into len(counts) near-equal sections (the first T mod n
    one step longer) and section i keeps counts[i] steps at ``round(j * stride)``, stride = (size-1)/(count-1),
    accumulated by repeated addition and rounded half to even exactly as the original. ``""`` keeps every step.
    """
    if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, int) or num_timesteps < 1:
        raise ConfigError(f"num_timesteps must be a positive integer, got {num_timesteps!r}")
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


# ----------------------------------------------------------------------------------------------------------
# The respaced chain


@dataclass(frozen=True, eq=False)
class DiscreteChain:
    """A chain of kept steps of a model's diffusion (the original's SpacedDiffusion) and its float64 tables.

    ``timesteps[k]`` is the original index of chain step k (``timestep_map``); ``betas`` are the chain's own,
    beta'_k = 1 - abar_{t_k} / abar_{t_{k-1}}, and ``alphas_cumprod`` is recomputed from them as the original
    does. ``sigmas_model[k]`` is the model's own noise level at t_k (what a denoiser D receives); ``num_timesteps``
    is the model's T.
    """

    timesteps: torch.Tensor
    betas: torch.Tensor
    sigmas_model: torch.Tensor
    num_timesteps: int

    @classmethod
    def respaced(cls, alphas_cumprod: torch.Tensor, kept: Sequence[int]) -> "DiscreteChain":
        """The chain keeping original indices ``kept`` (sorted) of a model with these abar_t."""
        kept_abar = alphas_cumprod.to(torch.float64)[list(kept)]
        previous = torch.cat([torch.ones(1, dtype=torch.float64), kept_abar[:-1]])
        return cls(torch.tensor(list(kept), dtype=torch.int64), 1 - kept_abar / previous,
                   ((1 - kept_abar) / kept_abar).sqrt(), len(alphas_cumprod))

    def __len__(self) -> int:
        return len(self.timesteps)

    @property
    def nfe(self) -> int:
        """Network evaluations of one pass down the chain (one per step)."""
        return len(self)

    @cached_property
    def alphas_cumprod(self) -> torch.Tensor:
        return torch.cumprod(1 - self.betas, dim=0)

    @cached_property
    def tables(self) -> dict[str, torch.Tensor]:
        """Per-step float64 coefficients, named as in the original's GaussianDiffusion."""
        betas, abar = self.betas, self.alphas_cumprod
        abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        posterior_variance = betas * (1 - abar_prev) / (1 - abar)
        # beta_tilde is 0 at the first step: the original uses the second step's value there (log clipped).
        # A one-step chain has none (the original fails); its variance is never used, beta stands in.
        first = posterior_variance[1:2] if len(self) > 1 else betas[:1]
        clipped = torch.cat([first, posterior_variance[1:]])
        large = torch.cat([first, betas[1:]])
        return {
            "alphas_cumprod": abar,
            "alphas_cumprod_prev": abar_prev,
            "sqrt_recip_alphas_cumprod": (1 / abar).sqrt(),
            "sqrt_recipm1_alphas_cumprod": (1 / abar - 1).sqrt(),
            "posterior_mean_coef1": betas * abar_prev.sqrt() / (1 - abar),
            "posterior_mean_coef2": (1 - abar_prev) * (1 - betas).sqrt() / (1 - abar),
            "posterior_variance": posterior_variance,
            "posterior_log_variance_clipped": clipped.log(),
            "log_betas": betas.log(),
            "large_variance": large,
            "large_log_variance": large.log(),
        }

    def coefficients(self, k: int, device) -> SimpleNamespace:
        """Step k's coefficients as float32 scalars on ``device`` (the original's _extract_into_tensor)."""
        return SimpleNamespace(**{name: table[k].to(device, torch.float32) for name, table in self.tables.items()})

    def sigma_after(self, k: int) -> float:
        """Noise level of the sample after step k (the chain's level at k - 1; 0 after the last step)."""
        if k == 0:
            return 0.0
        abar = float(self.alphas_cumprod[k - 1])
        return math.sqrt((1 - abar) / abar)


# ----------------------------------------------------------------------------------------------------------
# The samplers


class DiscreteStepInfo(NamedTuple):
    """What a progress callback receives after each step: StepInfo's fields, then the step's details."""

    step: int  # 1-based index of the step just taken
    num_steps: int
    sigma: float  # noise level reached
    nfe: int  # network evaluations so far
    x: torch.Tensor  # the sample x_{t-1} (the original's VP space)
    pred_xstart: torch.Tensor  # the step's x_0 prediction (clipped; guided for guided DDIM)
    timestep: int  # the original step index the network received (before any 1000/T rescaling)


@dataclass(frozen=True)
class DiscreteSampler:
    """An original discrete sampler: ``method`` 'ddpm' (ancestral) or 'ddim', down a respaced chain.

    ``respacing``: "" (every step), "ddimN" or section counts ("10,15,20" or a list), see :func:`space_timesteps`.
    ``eta``: DDIM's noise (0 deterministic, 1 ancestral-like). ``variance`` (ddpm): 'learned' (the model's v),
    'small' (beta_tilde), 'large' (beta) or 'auto', the model's own choice as the original's
    create_gaussian_diffusion made it (learned with learn_sigma, else small with sigma_small, else large), small
    for denoisers that do not say. ``clip_denoised`` clips pred_x0 to [-1, 1].
    """

    method: str = "ddpm"
    respacing: str | tuple[int, ...] = ""
    eta: float = 0.0
    variance: str = "auto"
    clip_denoised: bool = True

    def __post_init__(self):
        if self.method not in METHODS:
            raise ConfigError(f"unknown discrete method {self.method!r}; choose one of: {', '.join(METHODS)}")
        if self.variance not in VARIANCES:
            raise ConfigError(f"unknown variance {self.variance!r}; choose one of: {', '.join(VARIANCES)}")
        if isinstance(self.eta, bool) or not isinstance(self.eta, (int, float)) or not 0 <= self.eta < math.inf:
            raise ConfigError(f"eta must be a finite number >= 0, got {self.eta!r}")
        if self.method == "ddpm" and self.eta != 0:
            raise ConfigError("eta applies to method='ddim' only")
        if self.method == "ddim" and self.variance != "auto":
            raise ConfigError("variance applies to method='ddpm' only; DDIM's noise is set by eta")
        if not isinstance(self.clip_denoised, bool):
            raise ConfigError(f"clip_denoised must be True or False, got {self.clip_denoised!r}")
        if not isinstance(self.respacing, str):
            object.__setattr__(self, "respacing", tuple(self.respacing))
        _section_counts(self.respacing)

    def replace(self, **changes) -> "DiscreteSampler":
        return dataclasses.replace(self, **changes)

    @property
    def nfe(self) -> int | None:
        """Network evaluations per call; None for respacing "" (every step: ``plan(net).nfe`` tells)."""
        counts = _section_counts(self.respacing)
        if not counts:
            return None
        return counts[1] if counts[0] == "ddim" else sum(counts)

    def plan(self, net, device=None) -> DiscreteChain:
        """The respaced chain of ``net``'s step grid (``device`` is accepted for the Sampler interface)."""
        abar = grid_alphas_cumprod(net)
        if abar is None:
            raise ConfigError(f"{type(net).__name__} has no discrete step grid: the discrete samplers need a model "
                              "trained on T steps (guided-/improved-diffusion, iDDPM); use the continuous samplers")
        return DiscreteChain.respaced(abar, space_timesteps(len(abar), self.respacing))

    def resolved_variance(self, net) -> str:
        """'learned', 'small' or 'large' for ``net`` (see ``variance``)."""
        native = isinstance(net, OpenAIDenoiser)
        if self.variance == "auto":
            return _VARIANCE_OF_MODEL[net.model_var_type] if native else "small"
        if self.variance == "learned" and not (native and net.learn_sigma):
            raise ConfigError("variance='learned' needs a guided-/improved-diffusion model trained with learn_sigma")
        return self.variance

    def __call__(
        self,
        net,
        latents: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        *,
        randn_like: Callable[[torch.Tensor], torch.Tensor],
        callback: Callable[[DiscreteStepInfo], None] | None = None,
        classifier=None,
        classifier_scale: float = 1.0,
        plan: DiscreteChain | None = None,
        **model_kwargs,
    ) -> torch.Tensor:
        """Samples in [-1, 1] (float32, the original's x_0 space) from unit-normal ``latents`` (x_T).

        ``class_labels`` are one-hot; ``classifier(x_t, t)`` with ``classifier_scale`` guides the sampler (ADM's
        noisy classifier over the same steps). ``model_kwargs`` go to the network (``low_res=`` for upsamplers).
        """
        chain = plan if plan is not None else self.plan(net)
        variance = self.resolved_variance(net) if self.method == "ddpm" else None
        device, batch = latents.device, latents.shape[0]
        predict = _predictor(net, class_labels, model_kwargs, batch, device, need_v=variance == "learned")
        guide = None
        if classifier is not None and classifier_scale != 0:
            guide = _classifier_gradient(classifier, classifier_scale, class_labels, batch, device,
                                         chain.num_timesteps)
        x = latents.to(torch.float32)
        with torch.no_grad():
            for step, k in enumerate(reversed(range(len(chain))), start=1):
                c = chain.coefficients(k, device)
                t = chain.timesteps[k].to(device).expand(batch)
                pred_xstart, v = predict(x, t, chain.sigmas_model[k], c)
                if self.clip_denoised:
                    pred_xstart = pred_xstart.clamp(-1, 1)
                grad = guide(x, t) if guide is not None else None
                noise = randn_like(x)
                if self.method == "ddim":
                    x, pred_xstart = self._ddim_step(x, pred_xstart, c, noise, grad, last=k == 0)
                else:
                    x = self._ddpm_step(x, pred_xstart, v, c, noise, grad, variance, last=k == 0)
                if callback is not None:
                    callback(DiscreteStepInfo(step, len(chain), chain.sigma_after(k), step, x, pred_xstart,
                                              int(chain.timesteps[k])))
        return x

    def _ddpm_step(self, x, pred_xstart, v, c, noise, grad, variance, last):
        """Ancestral step: x_{t-1} = mu + Sigma grad + sqrt(Sigma) z (Dhariwal & Nichol 2021, Algorithm 1)."""
        mean = c.posterior_mean_coef1 * pred_xstart + c.posterior_mean_coef2 * x
        if variance == "learned":
            frac = (v + 1) / 2
            log_variance = frac * c.log_betas + (1 - frac) * c.posterior_log_variance_clipped
        elif variance == "small":
            log_variance = c.posterior_log_variance_clipped
        else:
            log_variance = c.large_log_variance
        if grad is not None:
            model_variance = {"learned": log_variance.exp(), "small": c.posterior_variance,
                              "large": c.large_variance}[variance]
            mean = mean + model_variance * grad
        return mean if last else mean + (0.5 * log_variance).exp() * noise

    def _ddim_step(self, x, pred_xstart, c, noise, grad, last):
        """DDIM step (Song et al. 2021, Eq. 12); guidance shifts eps (Dhariwal & Nichol 2021, Algorithm 2)."""
        eps = (c.sqrt_recip_alphas_cumprod * x - pred_xstart) / c.sqrt_recipm1_alphas_cumprod
        if grad is not None:
            eps = eps - (1 - c.alphas_cumprod).sqrt() * grad
            pred_xstart = c.sqrt_recip_alphas_cumprod * x - c.sqrt_recipm1_alphas_cumprod * eps
        abar, abar_prev = c.alphas_cumprod, c.alphas_cumprod_prev
        sigma = self.eta * ((1 - abar_prev) / (1 - abar)).sqrt() * (1 - abar / abar_prev).sqrt()
        mean = pred_xstart * abar_prev.sqrt() + (1 - abar_prev - sigma**2).sqrt() * eps
        return (mean if last else mean + sigma * noise), pred_xstart


def _predictor(net, class_labels, model_kwargs, batch, device, need_v):
    """(x_t, t, sigma_t, coefficients) -> (unclipped pred_x0, variance values v or None) for ``net``."""
    if isinstance(net, OpenAIDenoiser):
        y = class_indices(class_labels, batch).to(device) if net.label_dim else None
        channels = net.img_channels

        def predict(x, t, sigma, c):
            out = net.model_output(x, t, y=y, **model_kwargs).to(torch.float32)
            pred = out[:, :channels]
            if not net.predict_xstart:
                pred = c.sqrt_recip_alphas_cumprod * x - c.sqrt_recipm1_alphas_cumprod * pred
            return pred, (out[:, channels:] if need_v else None)

        return predict

    def predict_with_D(x, t, sigma, c):
        D = net(x * math.sqrt(1 + float(sigma) ** 2), sigma.to(x.device), class_labels, **model_kwargs)
        return D.to(torch.float32), None

    return predict_with_D


def _classifier_gradient(classifier, scale, class_labels, batch, device, num_timesteps):
    """(x_t, t) -> scale * grad_{x_t} log p(y | x_t, t): ADM's cond_fn."""
    steps = getattr(classifier, "num_timesteps", num_timesteps)
    if steps != num_timesteps:
        raise ConfigError(f"the classifier counts {steps} steps but the model {num_timesteps}")
    labels = class_indices(class_labels, batch).to(device)

    def gradient(x, t):
        return classifier_log_prob_grad(classifier, x, t, labels) * scale

    return gradient
