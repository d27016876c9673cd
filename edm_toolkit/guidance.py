"""Guidance as denoiser wrappers: D'(x; sigma) built from a denoiser D(x; sigma) and a guiding model.

Every wrapper is itself a denoiser of the toolkit's protocol (``forward(x, sigma, class_labels, **kwargs)`` and
the wrapped denoiser's sigma_min, sigma_max, round_sigma, img_channels, ...), so it works with every solver.
:class:`GuidedDenoiser` is their shared base: the guidance scale, and an optional interval of noise levels
[lo, hi] outside which the wrapper is the plain denoiser.

Classifier guidance (Dhariwal & Nichol 2021, Sec. 4.1): conditioning on a class y adds grad_x log p(y | x) to
the score. Since D(x; sigma) = x + sigma^2 grad_x log p(x; sigma) (Karras et al. 2022, Eq. 3),

    D'(x; sigma) = D(x; sigma) + sigma^2 * scale * grad_x log p_phi(y | x; sigma).

ADM's noisy classifier p_phi(y | x_t, t) was trained on x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps at step
index t, which is EDM's x (= x_0 + sigma n) scaled by 1/sqrt(1 + sigma^2) at sigma_t^2 = (1 - abar_t)/abar_t.
The wrapper feeds it exactly that, with t the step nearest to sigma on the model's grid, and takes the gradient
with respect to EDM's x through the scaling. The discrete samplers of :mod:`edm_toolkit.discrete` use the
original forms instead, built on :func:`classifier_log_prob_grad` (``cond_fn`` of ADM's classifier_sample.py):

    ancestral (Algorithm 1):  mu' = mu + Sigma * scale * grad_{x_t} log p_phi(y | x_t, t)
    DDIM (Algorithm 2):       eps' = eps - sqrt(1 - abar_t) * scale * grad_{x_t} log p_phi(y | x_t, t)
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .errors import ConfigError

__all__ = ["AutoGuidance", "ClassifierFreeGuidance", "ClassifierGuidance", "GuidedDenoiser", "class_indices", "classifier_log_prob_grad",
           "grid_alphas_cumprod"]


def grid_alphas_cumprod(net) -> torch.Tensor | None:
    """abar_t (float64, t = 0..T-1) of a model's discrete step grid, or None for a continuous-time model.

    guided-/improved-diffusion models give their own ``alphas_cumprod``; EDM's iDDPM preconditioner its table
    ``u`` (u_j is the noise level of step t = M - 1 - j, and u_M = 0 is no step); other grid denoisers their
    increasing ``sigmas``. Noise levels map to the VP grid by abar = 1 / (1 + sigma^2).
    """
    abar = getattr(net, "alphas_cumprod", None)
    if isinstance(abar, torch.Tensor):
        return abar.detach().to("cpu", torch.float64)
    u, M = getattr(net, "u", None), getattr(net, "M", None)
    if isinstance(u, torch.Tensor) and isinstance(M, int):
        sigmas = u[:M].flip(0)
    else:
        sigmas = getattr(net, "sigmas", None)
        if not isinstance(sigmas, torch.Tensor):
            return None
    return 1 / (1 + sigmas.detach().to("cpu", torch.float64) ** 2)


def class_indices(class_labels: torch.Tensor | None, batch: int) -> torch.Tensor:
    """Class indices [batch] from the toolkit's one-hot labels ([batch, C] or [1, C])."""
    if class_labels is None:
        raise ConfigError("classifier guidance needs class labels: pass class_labels (one-hot) or --class")
    if not class_labels.is_floating_point():
        raise ConfigError("class labels must be one-hot (float [batch, classes]), not indices: use torch.eye(C)[y]")
    return class_labels.reshape(-1, class_labels.shape[-1]).argmax(dim=1).expand(batch)


def classifier_log_prob_grad(classifier, x_t: torch.Tensor, timesteps: torch.Tensor,
                             labels: torch.Tensor) -> torch.Tensor:
    """grad_{x_t} sum_i log softmax(classifier(x_t, t))[i, y_i]: ADM's ``cond_fn`` at classifier_scale 1.

    ``classifier(x_t, timesteps)`` gives logits (an :class:`~edm_toolkit.adapters.openai.OpenAIClassifier` takes
    step indices and feeds them in its own timestep convention). Works under ``torch.no_grad()``.
    """
    with torch.enable_grad():
        x_in = x_t.detach().requires_grad_(True)
        log_probs = torch.log_softmax(classifier(x_in, timesteps), dim=-1)
        selected = log_probs[torch.arange(len(labels), device=labels.device), labels]
        return torch.autograd.grad(selected.sum(), x_in)[0]


class GuidedDenoiser(nn.Module):
    """Base of the guidance wrappers: ``denoiser`` guided with strength ``scale`` where lo <= sigma <= hi.

    ``sigma_interval`` (lo, hi), default everywhere, limits guidance to a range of noise levels; at scale 0 or
    outside the interval a wrapper returns the plain D(x; sigma), bit for bit. Attributes the wrapper does not
    define itself (sigma_min, sigma_max, round_sigma, img_resolution, ...) are the wrapped denoiser's.
    """

    def __init__(self, denoiser: nn.Module, scale: float = 1.0,
                 sigma_interval: tuple[float, float] | None = None):
        super().__init__()
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise ConfigError(f"guidance scale must be a finite number, got {scale!r}")
        if sigma_interval is not None:
            try:
                lo, hi = (float(s) for s in sigma_interval)
            except (TypeError, ValueError):
                raise ConfigError(f"sigma_interval must be a pair (lo, hi), got {sigma_interval!r}") from None
            if not 0 <= lo <= hi:
                raise ConfigError(f"sigma_interval needs 0 <= lo <= hi, got ({lo:g}, {hi:g})")
            sigma_interval = (lo, hi)
        self.denoiser = denoiser
        self.scale = float(scale)
        self.sigma_interval = sigma_interval

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "denoiser":
                raise
            return getattr(self.denoiser, name)

    def in_interval(self, sigma: torch.Tensor) -> torch.Tensor:
        """Which rows (per-row sigma, float64 [B]) lie inside the guidance interval."""
        if self.sigma_interval is None:
            return torch.ones_like(sigma, dtype=torch.bool)
        lo, hi = self.sigma_interval
        return (sigma >= lo) & (sigma <= hi)

    def active(self, sigma: torch.Tensor) -> torch.Tensor:
        """Which rows are guided: scale != 0 and sigma inside the interval."""
        if self.scale == 0:
            return torch.zeros_like(sigma, dtype=torch.bool)
        return self.in_interval(sigma)


class ClassifierGuidance(GuidedDenoiser):
    """D'(x; sigma) = D(x; sigma) + sigma^2 * scale * grad_x log p_phi(y | x / sqrt(1 + sigma^2), t(sigma)).

    ``classifier(x_t, t)`` is a noisy classifier over step indices (ADM's, via ``load_openai_classifier``);
    t(sigma) is the step nearest to sigma on the denoiser's grid (the classifier's own grid for a continuous
    denoiser), so both must count the same steps. y is the argmax of the one-hot class labels; for an
    unconditional denoiser the wrapper has the classifier's classes as ``label_dim`` so that samplers draw them.
    """

    def __init__(self, denoiser: nn.Module, classifier: nn.Module, scale: float = 1.0,
                 sigma_interval: tuple[float, float] | None = None):
        super().__init__(denoiser, scale, sigma_interval)
        self.classifier = classifier
        abar = grid_alphas_cumprod(denoiser)
        if abar is None:
            abar = grid_alphas_cumprod(classifier)
        if abar is None:
            raise ConfigError("classifier guidance needs a step grid: the denoiser is continuous and the "
                              "classifier has no sigmas")
        steps = getattr(classifier, "num_timesteps", len(abar))
        if steps != len(abar):
            raise ConfigError(f"the classifier counts {steps} steps but the model's grid has {len(abar)}")
        self.register_buffer("grid_sigmas", ((1 - abar) / abar).sqrt(), persistent=False)
        num_classes = getattr(classifier, "num_classes", None)
        label_dim = int(getattr(denoiser, "label_dim", 0) or 0)
        if label_dim and num_classes and label_dim != num_classes:
            raise ConfigError(f"the classifier has {num_classes} classes but the denoiser {label_dim}")
        self.label_dim = label_dim or int(num_classes or 0)

    def timestep_of_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        """Index of the grid level nearest to each sigma (int64)."""
        grid = self.grid_sigmas.to(sigma.device)
        return (sigma.to(torch.float64).reshape(-1, 1) - grid.reshape(1, -1)).abs().argmin(dim=1)

    def log_prob_grad(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """grad_x log p_phi(y | x; sigma) for EDM's x (per-row sigma [B]), in x's dtype.

        With x_t = c x, c = 1/sqrt(1 + sigma^2), the chain rule gives grad_x = c grad_{x_t}.
        """
        c = (1 + sigma.to(torch.float64) ** 2).rsqrt().reshape(-1, *[1] * (x.ndim - 1))
        x_t = (x.to(torch.float64) * c).to(torch.float32)
        grad_t = classifier_log_prob_grad(self.classifier, x_t, self.timestep_of_sigma(sigma), labels)
        return (c * grad_t.to(torch.float64)).to(x.dtype)

    def forward(self, x, sigma, class_labels=None, **model_kwargs):
        sigmas = torch.as_tensor(sigma, device=x.device).to(torch.float64).reshape(-1).expand(x.shape[0])
        rows = self.active(sigmas)
        if not bool(rows.any()):
            return self.denoiser(x, sigma, class_labels, **model_kwargs)
        labels = class_indices(class_labels, x.shape[0]).to(x.device)
        D = self.denoiser(x, sigma, class_labels, **model_kwargs)
        s = sigmas[rows].reshape(-1, *[1] * (x.ndim - 1))
        correction = s**2 * self.scale * self.log_prob_grad(x[rows], sigmas[rows], labels[rows]).to(torch.float64)
        D = D.clone()
        D[rows] = (D[rows].to(torch.float64) + correction).to(D.dtype)
        return D


class _TwoModelGuidance(GuidedDenoiser):
    """D_w = D_ref + w (D - D_ref) where the rows are active; w = 1 (or an inactive row) is the plain D.

    Subclasses say what the reference prediction D_ref is. ``network_evaluations(sigma)`` is the honest cost of
    one call (2 where guidance is active, else 1), which the sampler adds to its NFE count.
    """

    def __init__(self, denoiser: nn.Module, scale: float = 1.0, sigma_interval: tuple[float, float] | None = None):
        super().__init__(denoiser, scale, sigma_interval)

    def active(self, sigma: torch.Tensor) -> torch.Tensor:
        """Rows inside the interval, unless w = 1 (plain D); w = 0 is a valid weight here (D_ref alone)."""
        if self.scale == 1:
            return torch.zeros_like(sigma, dtype=torch.bool)
        return self.in_interval(sigma)

    def network_evaluations(self, sigma: float) -> int:
        return 2 if bool(self.active(torch.tensor([float(sigma)], dtype=torch.float64)).any()) else 1

    def reference(self, x, sigma, class_labels, **model_kwargs) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x, sigma, class_labels=None, **model_kwargs):
        sigmas = torch.as_tensor(sigma, device=x.device).to(torch.float64).reshape(-1).expand(x.shape[0])
        rows = self.active(sigmas)
        D = self.denoiser(x, sigma, class_labels, **model_kwargs)
        if not bool(rows.any()):
            return D
        D_ref = self.reference(x, sigma, class_labels, **model_kwargs)
        guided = (D_ref.to(torch.float64) + self.scale * (D.to(torch.float64) - D_ref.to(torch.float64))).to(D.dtype)
        return torch.where(rows.reshape(-1, *[1] * (x.ndim - 1)), guided, D)


class ClassifierFreeGuidance(_TwoModelGuidance):
    """Classifier-free guidance (Ho & Salimans 2022): D_w = D(x; sigma) + w (D(x; sigma, y) - D(x; sigma)).

    For networks trained with label dropout, where the unconditional prediction is the one for an all-zero label
    vector (EDM's convention: dropped labels are zeroed, and its preconditioners pass zeros for None).
    """

    def __init__(self, denoiser: nn.Module, scale: float = 1.0, sigma_interval: tuple[float, float] | None = None):
        if not int(getattr(denoiser, "label_dim", 0) or 0):
            raise ConfigError("classifier-free guidance needs a class-conditional network (label_dim > 0); "
                              "use autoguidance with a guide network instead")
        super().__init__(denoiser, scale, sigma_interval)

    def reference(self, x, sigma, class_labels, **model_kwargs):
        zeros = torch.zeros(x.shape[0], self.denoiser.label_dim, device=x.device)
        return self.denoiser(x, sigma, zeros, **model_kwargs)


class AutoGuidance(_TwoModelGuidance):
    """Guidance by a second, weaker network (Karras et al. 2024, "Guiding a Diffusion Model with a Bad Version of
    Itself", EDM2): D_w = D_guide(x; sigma) + w (D(x; sigma) - D_guide(x; sigma))."""

    def __init__(self, denoiser: nn.Module, guide: nn.Module, scale: float = 1.0,
                 sigma_interval: tuple[float, float] | None = None):
        for name in ("img_channels", "img_resolution"):
            a, b = getattr(denoiser, name, None), getattr(guide, name, None)
            if a is not None and b is not None and a != b:
                raise ConfigError(f"the guide network's {name} is {b} but the main network's is {a}")
        if int(getattr(guide, "label_dim", 0) or 0) not in (0, int(getattr(denoiser, "label_dim", 0) or 0)):
            raise ConfigError("the guide network's label_dim differs from the main network's")
        super().__init__(denoiser, scale, sigma_interval)
        self.guide = guide

    def reference(self, x, sigma, class_labels, **model_kwargs):
        labels = class_labels if int(getattr(self.guide, "label_dim", 0) or 0) else None
        return self.guide(x, sigma, labels, **model_kwargs)
