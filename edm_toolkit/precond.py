"""Preconditioners: D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma)) (EDM Eq. 7).

Each preconditioner is a torch module that wraps any backbone ``F(x, c_noise, class_labels, augment_labels)``
and is itself a denoiser of EDM's protocol: ``D = precond(x, sigma, class_labels)`` with the attributes
sigma_min, sigma_max, round_sigma, img_channels, img_resolution and label_dim. Its state_dict has the layout
of EDM's networks (``model.*``, plus the ``u`` buffer of iDDPM), so EDM weights load 1:1. The closed forms
c_skip, c_out, c_in, c_noise are methods usable without a backbone (``EDMPrecond().c_skip(sigma)``).

The forward pass follows EDM's arithmetic: inputs cast to float32, sigma reshaped to [-1, 1, 1, 1], missing
class labels replaced by zeros([1, label_dim]), the backbone run in float16 only when asked for on CUDA.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import nn

from .discrete import StepGrid, nearest_index
from .discretizations import iddpm_sigma_table
from .errors import ConfigError
from .protocol import DenoiserBase
from .registry import Registry
from .schedules import vp_sigma, vp_sigma_inv

PRECONDITIONERS: Registry["Preconditioner"] = Registry("preconditioner")


class Preconditioner(DenoiserBase):
    """Base class: subclasses define the four closed forms and the supported sigma range (Table 1)."""

    name: ClassVar[str]

    def __init__(
        self,
        model: nn.Module | None = None,
        *,
        img_resolution: int | None = None,
        img_channels: int | None = None,
        label_dim: int | None = None,
        use_fp16: bool = False,
    ):
        super().__init__()
        self.model = model
        # The image geometry and label count come from the backbone's constructor arguments when it has them.
        self.img_resolution = _attribute(model, "img_resolution", img_resolution)
        self.img_channels = _attribute(model, "in_channels", img_channels, also="img_channels")
        self.label_dim = int(_attribute(model, "label_dim", label_dim) or 0)
        self.augment_dim = int(_attribute(model, "augment_dim", None) or 0)
        self.use_fp16 = use_fp16

    # Closed forms (float32 tensors in, float32 tensors out, shaped like sigma).
    def c_skip(self, sigma: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def c_out(self, sigma: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def c_in(self, sigma: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def c_noise(self, sigma: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """The preconditioner's own parameters, as plain data (for the toolkit's model files)."""
        return {"name": self.name, "label_dim": self.label_dim, "use_fp16": self.use_fp16, **self._params()}

    def _params(self) -> dict[str, Any]:
        return {}

    def forward(self, x, sigma, class_labels=None, force_fp32=False, **model_kwargs):
        if self.model is None:
            raise RuntimeError(f"{type(self).__name__} has no backbone: pass model=... to evaluate D(x; sigma)")
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, device=x.device).to(torch.float32).reshape(-1, 1, 1, 1)
        if self.label_dim == 0:
            class_labels = None
        elif class_labels is None:
            class_labels = torch.zeros([1, self.label_dim], device=x.device)
        else:
            class_labels = class_labels.to(torch.float32).reshape(-1, self.label_dim)
        dtype = torch.float16 if (self.use_fp16 and not force_fp32 and x.device.type == "cuda") else torch.float32

        F_x = self.model(
            (self.c_in(sigma) * x).to(dtype), self.c_noise(sigma).flatten(), class_labels=class_labels, **model_kwargs
        )
        # Backbones with learned variance (iDDPM, ADM) return 2C channels; D uses the first C.
        return self.c_skip(sigma) * x + self.c_out(sigma) * F_x[:, : x.shape[1]].to(torch.float32)


def _attribute(model, name, given, also=None):
    """An explicit value, else the backbone's attribute or recorded constructor argument of that name."""
    if given is not None:
        return given
    recorded = getattr(model, "init_kwargs", None) or {}
    for key in (name, also):
        if key is not None and hasattr(model, key):
            return getattr(model, key)
        if key in recorded:
            return recorded[key]
    return None


class _VariancePreserving(Preconditioner):
    """The variance-preserving parameterization shared by VP and iDDPM (Table 1): the network predicts the noise,
    c_skip = 1, c_out = -sigma, c_in = 1/sqrt(sigma^2 + 1); they differ only in c_noise."""

    def c_skip(self, sigma):
        return torch.ones_like(sigma)

    def c_out(self, sigma):
        return -sigma

    def c_in(self, sigma):
        return 1 / (sigma**2 + 1).sqrt()


@PRECONDITIONERS.register
class VPPrecond(_VariancePreserving):
    """VP (DDPM++ cont.): c_skip = 1, c_out = -sigma, c_in = 1/sqrt(sigma^2 + 1), c_noise = (M - 1) sigma^-1(sigma)."""

    name = "vp"

    def __init__(self, model=None, *, beta_d=19.9, beta_min=0.1, M=1000, epsilon_t=1e-5, **kwargs):
        super().__init__(model, **kwargs)
        self.beta_d, self.beta_min, self.M, self.epsilon_t = float(beta_d), float(beta_min), int(M), float(epsilon_t)
        if not (0 < self.epsilon_t < 1 and 0 < self.beta_d < math.inf and math.isfinite(self.beta_min)
                and 2 <= self.M <= 100_000):
            raise ConfigError(f"vp preconditioner needs 0 < epsilon_t < 1, a finite beta_d > 0 and beta_min, and "
                              f"2 <= M <= 100000; got epsilon_t={epsilon_t}, beta_d={beta_d}, beta_min={beta_min}, M={M}")
        # EDM evaluates the range in float32 from Python floats: sigma(1e-5) is 0.0009765625, not 0.0010000.
        self.sigma_min = float(vp_sigma(torch.tensor(self.epsilon_t), self.beta_d, self.beta_min))
        self.sigma_max = float(vp_sigma(torch.tensor(1.0), self.beta_d, self.beta_min))

    def _params(self):
        return {"beta_d": self.beta_d, "beta_min": self.beta_min, "M": self.M, "epsilon_t": self.epsilon_t}

    def c_noise(self, sigma):
        return (self.M - 1) * vp_sigma_inv(sigma, self.beta_d, self.beta_min)


@PRECONDITIONERS.register
class VEPrecond(Preconditioner):
    """VE (NCSN++ cont.): c_skip = 1, c_out = sigma, c_in = 1, c_noise = ln(sigma/2)."""

    name = "ve"

    def __init__(self, model=None, *, sigma_min=0.02, sigma_max=100.0, **kwargs):
        super().__init__(model, **kwargs)
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)

    def _params(self):
        return {"sigma_min": self.sigma_min, "sigma_max": self.sigma_max}

    def c_skip(self, sigma):
        return torch.ones_like(sigma)

    def c_out(self, sigma):
        return sigma

    def c_in(self, sigma):
        return torch.ones_like(sigma)

    def c_noise(self, sigma):
        return (0.5 * sigma).log()


@PRECONDITIONERS.register
class IDDPMPrecond(_VariancePreserving):
    """iDDPM: c_skip = 1, c_out = -sigma, c_in = 1/sqrt(sigma^2 + 1), c_noise = M - 1 - argmin_j |u_j - sigma|.

    The buffer ``u`` (float32, M + 1 entries, u_M = 0) is iDDPM's cosine-schedule noise table; round_sigma snaps
    to its nearest entry, u_M = 0 included, exactly as EDM does. Its step grid (for the original discrete samplers)
    is u_{M-1} < ... < u_0: step t = M - 1 - j has the level u_j. Only the first img_channels output channels are
    used (EDM's convention), so it declares no learned variance.
    """

    name = "iddpm"

    def __init__(self, model=None, *, C_1=0.001, C_2=0.008, M=1000, **kwargs):
        super().__init__(model, **kwargs)
        self.C_1, self.C_2, self.M = float(C_1), float(C_2), int(M)
        if not 2 <= self.M <= 100_000:  # the table is built step by step: bound the work a file can ask for
            raise ConfigError(f"iddpm preconditioner M must lie in [2, 100000], got {M}")
        self.register_buffer("u", iddpm_sigma_table(self.C_1, self.C_2, self.M, dtype=torch.float32))
        self.sigma_min = float(self.u[self.M - 1])
        self.sigma_max = float(self.u[0])
        self.step_grid = StepGrid.from_sigmas(self.u[: self.M].flip(0))

    def _params(self):
        return {"C_1": self.C_1, "C_2": self.C_2, "M": self.M}

    def c_noise(self, sigma):
        return self.M - 1 - self.round_sigma(sigma, return_index=True).to(torch.float32)

    def round_sigma(self, sigma, return_index=False):
        sigma = torch.as_tensor(sigma)
        index = nearest_index(sigma, self.u)
        return index if return_index else self.u[index.to(self.u.device)].to(sigma.device, sigma.dtype)


@PRECONDITIONERS.register
class EDMPrecond(Preconditioner):
    """EDM: c_skip = sd^2/(sigma^2 + sd^2), c_out = sigma sd/sqrt(sigma^2 + sd^2), c_in = 1/sqrt(sd^2 + sigma^2),
    c_noise = ln(sigma)/4, with sd = sigma_data (EDM Table 1, "Ours")."""

    name = "edm"

    def __init__(self, model=None, *, sigma_min=0.0, sigma_max=math.inf, sigma_data=0.5, **kwargs):
        super().__init__(model, **kwargs)
        self.sigma_min, self.sigma_max, self.sigma_data = float(sigma_min), float(sigma_max), float(sigma_data)
        if not self.sigma_data > 0:
            raise ConfigError(f"edm preconditioner sigma_data must be > 0, got {sigma_data}")

    def _params(self):
        return {"sigma_min": self.sigma_min, "sigma_max": self.sigma_max, "sigma_data": self.sigma_data}

    def c_skip(self, sigma):
        return self.sigma_data**2 / (sigma**2 + self.sigma_data**2)

    def c_out(self, sigma):
        return sigma * self.sigma_data / (sigma**2 + self.sigma_data**2).sqrt()

    def c_in(self, sigma):
        return 1 / (self.sigma_data**2 + sigma**2).sqrt()

    def c_noise(self, sigma):
        return sigma.log() / 4


def build_precond(spec: dict[str, Any] | str, model: nn.Module | None = None, **geometry) -> Preconditioner:
    """Builds a preconditioner from plain data ``{"name": "vp", "beta_d": 19.9, ...}`` around ``model``."""
    params = {"name": spec} if isinstance(spec, str) else dict(spec)
    cls = PRECONDITIONERS.get(params.pop("name", None))
    try:
        return cls(model, **params, **geometry)
    except TypeError as exc:
        raise ConfigError(f"bad option for preconditioner {cls.name!r}: {exc}") from None
