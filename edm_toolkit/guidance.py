"""Guidance as denoiser wrappers: D'(x; sigma) built from a denoiser D(x; sigma) and a guiding model.

Every wrapper is a :class:`~edm_toolkit.protocol.DenoiserWrapper`: a denoiser of the toolkit's protocol whose
geometry, noise range, step grid and learned variance are the wrapped denoiser's, so it works with every solver
(the original ddpm/ddim samplers included; a learned variance passes through unchanged). :class:`GuidedDenoiser`
is their shared base: the guidance scale, and an optional interval of noise levels [lo, hi] outside which the
wrapper is the plain denoiser.

Classifier guidance (Dhariwal & Nichol 2021, Sec. 4.1): conditioning on a class y adds grad_x log p(y | x) to
the score. Since D(x; sigma) = x + sigma^2 grad_x log p(x; sigma) (Karras et al. 2022, Eq. 3),

    D'(x; sigma) = D(x; sigma) + sigma^2 * scale * grad_x log p_phi(y | x; sigma).

ADM's noisy classifier p_phi(y | x_t, t) was trained on x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps at step
index t, which is EDM's x (= x_0 + sigma n) scaled by 1/sqrt(1 + sigma^2) at sigma_t^2 = (1 - abar_t)/abar_t.
The wrapper feeds it exactly that, with t the step nearest to sigma on the model's grid, and takes the gradient
with respect to EDM's x through the scaling. The discrete samplers of :mod:`edm_toolkit.solvers.discrete` use the
original forms instead, built on :func:`classifier_log_prob_grad` (``cond_fn`` of ADM's classifier_sample.py):

    ancestral (Algorithm 1):  mu' = mu + Sigma * scale * grad_{x_t} log p_phi(y | x_t, t)
    DDIM (Algorithm 2):       eps' = eps - sqrt(1 - abar_t) * scale * grad_{x_t} log p_phi(y | x_t, t)
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .discrete import nearest_index
from .errors import ConfigError
from .protocol import DenoiserWrapper

__all__ = ["AutoGuidance", "ClassifierFreeGuidance", "ClassifierGuidance", "GuidedDenoiser", "class_indices",
           "classifier_log_prob_grad"]


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


class GuidedDenoiser(DenoiserWrapper):
    """Base of the guidance wrappers: ``denoiser`` guided with strength ``scale`` where lo <= sigma <= hi.

    ``sigma_interval`` (lo, hi), default everywhere, limits guidance to a range of noise levels; at scale 0 or
    outside the interval a wrapper returns the plain D(x; sigma), bit for bit. Subclasses define
    :meth:`guide`, which turns the wrapped denoiser's D into the guided one; a learned variance v is the wrapped
    denoiser's, unchanged.
    """

    def __init__(self, denoiser: nn.Module, scale: float = 1.0,
                 sigma_interval: tuple[float, float] | None = None):
        super().__init__(denoiser)
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
        self.scale = float(scale)
        self.sigma_interval = sigma_interval

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

    def guide(self, D, rows, x, sigma, class_labels, **model_kwargs) -> torch.Tensor:
        """The guided D from the wrapped denoiser's ``D`` where ``rows`` (bool [B], not all False) are active."""
        raise NotImplementedError

    def check_inputs(self, x, class_labels) -> None:
        """Validates the inputs of a guided call before any network runs (nothing to check by default)."""

    def forward(self, x, sigma, class_labels=None, **model_kwargs):
        rows = self._rows(x, sigma)
        if not bool(rows.any()):
            return self.denoiser(x, sigma, class_labels, **model_kwargs)
        self.check_inputs(x, class_labels)
        D = self.denoiser(x, sigma, class_labels, **model_kwargs)
        return self.guide(D, rows, x, sigma, class_labels, **model_kwargs)

    def denoise_with_variance(self, x, sigma, class_labels=None, **model_kwargs):
        rows = self._rows(x, sigma)
        if bool(rows.any()):
            self.check_inputs(x, class_labels)
        D, v = self.denoiser.denoise_with_variance(x, sigma, class_labels, **model_kwargs)
        if bool(rows.any()):
            D = self.guide(D, rows, x, sigma, class_labels, **model_kwargs)
        return D, v

    def _rows(self, x, sigma) -> torch.Tensor:
        return self.active(torch.as_tensor(sigma, device=x.device).to(torch.float64).reshape(-1).expand(x.shape[0]))


class ClassifierGuidance(GuidedDenoiser):
    """D'(x; sigma) = D(x; sigma) + sigma^2 * scale * grad_x log p_phi(y | x / sqrt(1 + sigma^2), t(sigma)).

    ``classifier(x_t, t)`` is a noisy classifier over step indices with a ``step_grid`` and ``num_classes``
    (ADM's, via ``load_openai_classifier``); t(sigma) is the step nearest to sigma on the denoiser's grid (the
    classifier's own grid for a continuous denoiser), so both must count the same steps. y is the argmax of the
    one-hot class labels; for an unconditional denoiser the wrapper has the classifier's classes as
    ``label_dim`` so that samplers draw them.
    """

    def __init__(self, denoiser: nn.Module, classifier: nn.Module, scale: float = 1.0,
                 sigma_interval: tuple[float, float] | None = None):
        super().__init__(denoiser, scale, sigma_interval)
        self.classifier = classifier
        grid = denoiser.step_grid if denoiser.step_grid is not None else classifier.step_grid
        if classifier.step_grid.num_timesteps != grid.num_timesteps:
            raise ConfigError(f"the classifier counts {classifier.step_grid.num_timesteps} steps but the model's "
                              f"grid has {grid.num_timesteps}")
        self.register_buffer("grid_sigmas", grid.sigmas, persistent=False)
        if denoiser.label_dim and denoiser.label_dim != classifier.num_classes:
            raise ConfigError(f"the classifier has {classifier.num_classes} classes but the denoiser "
                              f"{denoiser.label_dim}")
        self._label_dim = denoiser.label_dim or int(classifier.num_classes)

    @property
    def label_dim(self) -> int:
        return self._label_dim

    def timestep_of_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        """Index of the grid level nearest to each sigma (int64)."""
        return nearest_index(torch.as_tensor(sigma).reshape(-1), self.grid_sigmas)

    def log_prob_grad(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """grad_x log p_phi(y | x; sigma) for EDM's x (per-row sigma [B]), in x's dtype.

        With x_t = c x, c = 1/sqrt(1 + sigma^2), the chain rule gives grad_x = c grad_{x_t}.
        """
        c = (1 + sigma.to(torch.float64) ** 2).rsqrt().reshape(-1, *[1] * (x.ndim - 1))
        x_t = (x.to(torch.float64) * c).to(torch.float32)
        grad_t = classifier_log_prob_grad(self.classifier, x_t, self.timestep_of_sigma(sigma), labels)
        return (c * grad_t.to(torch.float64)).to(x.dtype)

    def guide(self, D, rows, x, sigma, class_labels, **model_kwargs):
        labels = class_indices(class_labels, x.shape[0]).to(x.device)
        sigmas = torch.as_tensor(sigma, device=x.device).to(torch.float64).reshape(-1).expand(x.shape[0])
        s = sigmas[rows].reshape(-1, *[1] * (x.ndim - 1))
        correction = s**2 * self.scale * self.log_prob_grad(x[rows], sigmas[rows], labels[rows]).to(torch.float64)
        D = D.clone()
        D[rows] = (D[rows].to(torch.float64) + correction).to(D.dtype)
        return D

    def check_inputs(self, x, class_labels) -> None:
        class_indices(class_labels, x.shape[0])


class _TwoModelGuidance(GuidedDenoiser):
    """D_w = D_ref + w (D - D_ref) where the rows are active; w = 1 (or an inactive row) is the plain D.

    Subclasses say what the reference prediction D_ref is and what it costs. ``network_evaluations(sigma)`` is
    the honest cost of one call (the reference's evaluations too where guidance is active), which the sampler
    adds to its NFE count.
    """

    def active(self, sigma: torch.Tensor) -> torch.Tensor:
        """Rows inside the interval, unless w = 1 (plain D); w = 0 is a valid weight here (D_ref alone)."""
        if self.scale == 1:
            return torch.zeros_like(sigma, dtype=torch.bool)
        return self.in_interval(sigma)

    def network_evaluations(self, sigma: float) -> int:
        own = self.denoiser.network_evaluations(sigma)
        if bool(self.active(torch.tensor([float(sigma)], dtype=torch.float64)).any()):
            return own + self.reference_evaluations(sigma)
        return own

    def reference(self, x, sigma, class_labels, **model_kwargs) -> torch.Tensor:
        raise NotImplementedError

    def reference_evaluations(self, sigma: float) -> int:
        raise NotImplementedError

    def guide(self, D, rows, x, sigma, class_labels, **model_kwargs):
        D_ref = self.reference(x, sigma, class_labels, **model_kwargs)
        guided = (D_ref.to(torch.float64) + self.scale * (D.to(torch.float64) - D_ref.to(torch.float64))).to(D.dtype)
        return torch.where(rows.reshape(-1, *[1] * (x.ndim - 1)), guided, D)


class ClassifierFreeGuidance(_TwoModelGuidance):
    """Classifier-free guidance (Ho & Salimans 2022): D_w = D(x; sigma) + w (D(x; sigma, y) - D(x; sigma)).

    For networks trained with label dropout, where the unconditional prediction is the one for an all-zero label
    vector (EDM's convention: dropped labels are zeroed, and its preconditioners pass zeros for None).
    """

    def __init__(self, denoiser: nn.Module, scale: float = 1.0, sigma_interval: tuple[float, float] | None = None):
        if not denoiser.label_dim:
            raise ConfigError("classifier-free guidance needs a class-conditional network (label_dim > 0); "
                              "use autoguidance with a guide network instead")
        super().__init__(denoiser, scale, sigma_interval)

    def reference(self, x, sigma, class_labels, **model_kwargs):
        zeros = torch.zeros(x.shape[0], self.denoiser.label_dim, device=x.device)
        return self.denoiser(x, sigma, zeros, **model_kwargs)

    def reference_evaluations(self, sigma: float) -> int:
        return self.denoiser.network_evaluations(sigma)


class AutoGuidance(_TwoModelGuidance):
    """Guidance by a second, weaker network (Karras et al. 2024, "Guiding a Diffusion Model with a Bad Version of
    Itself", EDM2): D_w = D_guide(x; sigma) + w (D(x; sigma) - D_guide(x; sigma))."""

    def __init__(self, denoiser: nn.Module, guide: nn.Module, scale: float = 1.0,
                 sigma_interval: tuple[float, float] | None = None):
        for name in ("img_channels", "img_resolution"):
            a, b = getattr(denoiser, name), getattr(guide, name)
            if a != b:
                raise ConfigError(f"the guide network's {name} is {b} but the main network's is {a}")
        if guide.label_dim not in (0, denoiser.label_dim):
            raise ConfigError("the guide network's label_dim differs from the main network's")
        super().__init__(denoiser, scale, sigma_interval)
        self.guide_network = guide

    def reference(self, x, sigma, class_labels, **model_kwargs):
        labels = class_labels if self.guide_network.label_dim else None
        return self.guide_network(x, sigma, labels, **model_kwargs)

    def reference_evaluations(self, sigma: float) -> int:
        return self.guide_network.network_evaluations(sigma)
