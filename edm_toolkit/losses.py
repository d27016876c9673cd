"""Training noise distributions p_train(sigma) and loss weightings lambda(sigma) (EDM Table 1, "Training").

The per-element loss of a denoiser D on clean images y is (EDM Eq. 8)

    lambda(sigma) (D(y + n; sigma) - y)^2,   n ~ N(0, sigma^2 I),   sigma ~ p_train.

Each loss is a small class with the closed forms ``sample_sigma`` and ``weight``; calling it returns the
per-element loss of any denoiser on a batch, so any backbone can be trained in a user's own loop, and ``loss``
evaluates it for given sigma and noise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .discretizations import iddpm_sigma_table
from .errors import ConfigError
from .registry import Registry
from .schedules import vp_sigma

LOSSES: Registry["DenoisingLoss"] = Registry("loss")


class DenoisingLoss:
    """lambda(sigma) (D(y + n; sigma) - y)^2 with sigma ~ p_train."""

    name: ClassVar[str]

    def sample_sigma(self, batch: int, generator: torch.Generator | None = None, device="cpu") -> torch.Tensor:
        """Draws sigma ~ p_train, shaped [batch, 1, 1, 1] (float32, as EDM)."""
        raise NotImplementedError

    def weight(self, sigma: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, net, images, labels=None, augment_pipe=None, generator: torch.Generator | None = None):
        """Per-element loss [N, C, H, W] of a freshly drawn sigma and noise, in EDM's draw order: sigma, then the
        augmentation ``augment_pipe(images, generator=generator) -> (y, augment_labels)`` (e.g.
        ``edm_toolkit.training.augment.AugmentPipe``), then the noise n. From ``generator``, or the global RNG
        when None (then ``torch.manual_seed(s)`` reproduces EDM's loss call)."""
        sigma = self.sample_sigma(images.shape[0], generator, images.device)
        y, augment_labels = (images, None) if augment_pipe is None else augment_pipe(images, generator=generator)
        n = torch.randn(y.shape, generator=generator, device=y.device, dtype=y.dtype) * sigma
        return self.loss(net, y, sigma, n, labels, augment_labels)

    def loss(self, net, y, sigma, n, labels=None, augment_labels=None) -> torch.Tensor:
        """lambda(sigma) (D(y + n; sigma) - y)^2 per element for given clean images y, noise levels sigma
        [N, 1, 1, 1] and noise n (standard deviation sigma); augment labels, when given, go to the network."""
        extra = {} if augment_labels is None else {"augment_labels": augment_labels}
        D_yn = net(y + n, sigma, labels, **extra)
        return self.weight(sigma) * (D_yn - y) ** 2


def _uniform(batch, generator, device):
    return torch.rand([batch, 1, 1, 1], generator=generator, device=device)


@LOSSES.register
@dataclass(frozen=True)
class EDMLoss(DenoisingLoss):
    """ln sigma ~ N(P_mean, P_std^2), lambda = (sigma^2 + sigma_data^2)/(sigma sigma_data)^2 (EDM Sec. 5)."""

    name: ClassVar[str] = "edm"
    P_mean: float = -1.2
    P_std: float = 1.2
    sigma_data: float = 0.5

    def __post_init__(self):
        if not (self.P_std > 0 and self.sigma_data > 0):
            raise ConfigError(f"edm loss needs P_std > 0 and sigma_data > 0, got {self.P_std}, {self.sigma_data}")

    def sample_sigma(self, batch, generator=None, device="cpu"):
        return (torch.randn([batch, 1, 1, 1], generator=generator, device=device) * self.P_std + self.P_mean).exp()

    def weight(self, sigma):
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2


@LOSSES.register
@dataclass(frozen=True)
class VPLoss(DenoisingLoss):
    """sigma = sigma_vp(t), t ~ U(epsilon_t, 1), lambda = 1/sigma^2 (DDPM++ cont., Song et al. 2021)."""

    name: ClassVar[str] = "vp"
    beta_d: float = 19.9
    beta_min: float = 0.1
    epsilon_t: float = 1e-5

    def __post_init__(self):
        if not (self.beta_d > 0 and 0 < self.epsilon_t < 1):
            raise ConfigError(f"vp loss needs beta_d > 0 and 0 < epsilon_t < 1, got {self.beta_d}, {self.epsilon_t}")

    def sigma(self, t):
        return vp_sigma(t, self.beta_d, self.beta_min)

    def sample_sigma(self, batch, generator=None, device="cpu"):
        return self.sigma(1 + _uniform(batch, generator, device) * (self.epsilon_t - 1))

    def weight(self, sigma):
        return 1 / sigma**2


@LOSSES.register
@dataclass(frozen=True)
class VELoss(DenoisingLoss):
    """sigma = sigma_min (sigma_max/sigma_min)^U, U ~ U(0, 1) (log-uniform), lambda = 1/sigma^2 (NCSN++ cont.)."""

    name: ClassVar[str] = "ve"
    sigma_min: float = 0.02
    sigma_max: float = 100.0

    def __post_init__(self):
        if not 0 < self.sigma_min < self.sigma_max:
            raise ConfigError(f"ve loss needs 0 < sigma_min < sigma_max, got {self.sigma_min}, {self.sigma_max}")

    def sample_sigma(self, batch, generator=None, device="cpu"):
        return self.sigma_min * ((self.sigma_max / self.sigma_min) ** _uniform(batch, generator, device))

    def weight(self, sigma):
        return 1 / sigma**2


@LOSSES.register
@dataclass(frozen=True)
class IDDPMLoss(DenoisingLoss):
    """sigma = u_j, j ~ U{0, ..., M-1}, lambda = 1/sigma^2 (EDM Table 1, column iDDPM: L_simple only; iDDPM's
    additional L_vlb term for the learned variances is not part of this loss)."""

    name: ClassVar[str] = "iddpm"
    C_1: float = 0.001
    C_2: float = 0.008
    M: int = 1000

    def sample_sigma(self, batch, generator=None, device="cpu"):
        u = iddpm_sigma_table(self.C_1, self.C_2, self.M, dtype=torch.float32).to(device)
        j = torch.randint(self.M, [batch], generator=generator, device=device)
        return u[j].reshape(batch, 1, 1, 1)

    def weight(self, sigma):
        return 1 / sigma**2
