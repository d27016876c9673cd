"""The denoiser protocol: what every model, adapter and wrapper of the toolkit is, and what it can do.

A denoiser is EDM's D(x; sigma) (Karras et al. 2022, Eq. 2-3 and 7): given x = y + n with n ~ N(0, sigma^2 I),
it returns an estimate of the clean y. Solvers, guidance, training losses and metrics see a model only through
this protocol, so a sampler never knows which file format a network came from.

Every denoiser has

* ``__call__(x, sigma, class_labels=None, **model_kwargs) -> D(x; sigma)``: ``sigma`` a scalar or one level per
  row, ``class_labels`` one-hot [batch or 1, label_dim] (None: unconditional), ``model_kwargs`` for the network
  (``augment_labels=`` while training, ``low_res=`` for upsamplers);
* ``img_channels``, ``img_resolution``, ``label_dim`` (0: unconditional) and ``augment_dim`` (the width of the
  augment labels the network is conditioned on, EDM's non-leaking augmentation; 0: none);
* ``sigma_min``, ``sigma_max``: the noise range it supports, and ``round_sigma(sigma)``: the nearest level it
  supports (the identity for continuous-time models);
* ``network_evaluations(sigma) -> int``: the network evaluations one call costs (2 for guidance by a second
  prediction), so that samplers count NFE honestly;

and declares its optional capabilities instead of leaving them to be discovered:

* ``step_grid``: a :class:`~edm_toolkit.discrete.StepGrid` for a model trained on T discrete steps (what the
  original DDPM/DDIM samplers and noisy-classifier guidance need), None for a continuous-time model;
* ``learned_variance``: True when the model also predicts its reverse-process variance (iDDPM's learned range,
  ``step_grid.variance == "learned"``); ``denoise_with_variance(x, sigma, class_labels) -> (D, v)`` then returns
  the interpolation v in [-1, 1] of Nichol & Dhariwal 2021, Eq. 15, beside D.

:class:`DenoiserBase` gives the defaults of a plain continuous model; :class:`DenoiserWrapper` is the base of
every wrapper (mixed precision, guidance, ...): it forwards the whole protocol, capabilities included, to the
denoiser it wraps and never modifies it. :class:`BoundInputs` binds extra network inputs of a batch (an
upsampler's ``low_res=``) so that solvers and losses, which call ``net(x, sigma, class_labels)``, pass them on.
"""

from __future__ import annotations

import math
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from .discrete import StepGrid, nearest_index
from .errors import ConfigError

__all__ = ["BoundInputs", "Denoiser", "DenoiserBase", "DenoiserWrapper", "check_denoiser"]

_MEMBERS = ("img_channels", "img_resolution", "label_dim", "augment_dim", "sigma_min", "sigma_max", "step_grid",
            "learned_variance", "round_sigma", "network_evaluations", "denoise_with_variance")


@runtime_checkable
class Denoiser(Protocol):
    """EDM's denoiser D(x; sigma) with its geometry, noise range and declared capabilities (module docstring)."""

    img_channels: int
    img_resolution: int
    label_dim: int
    augment_dim: int
    sigma_min: float
    sigma_max: float
    step_grid: StepGrid | None
    learned_variance: bool

    def __call__(self, x: torch.Tensor, sigma: Any, class_labels: torch.Tensor | None = None,
                 **model_kwargs) -> torch.Tensor: ...

    def round_sigma(self, sigma: Any) -> torch.Tensor: ...

    def network_evaluations(self, sigma: float) -> int: ...

    def denoise_with_variance(self, x: torch.Tensor, sigma: Any, class_labels: torch.Tensor | None = None,
                              **model_kwargs) -> tuple[torch.Tensor, torch.Tensor]: ...


def check_denoiser(net: Any) -> None:
    """Refuses, with the fix, an object that lacks a member of the protocol (checked once, where a run starts)."""
    missing = [name for name in _MEMBERS if not hasattr(net, name)]
    if missing or not callable(net):
        what = ", ".join(missing) if missing else "__call__"
        raise ConfigError(f"{type(net).__name__} does not implement the denoiser protocol (missing {what}); derive "
                          "it from edm_toolkit.DenoiserBase, or a wrapper from edm_toolkit.DenoiserWrapper")


class DenoiserBase(nn.Module):
    """The protocol's defaults: unconditional, no augment labels, continuous sigma in [0, inf), no step grid.

    Subclasses set ``img_channels`` and ``img_resolution`` and override what differs; a model with a step grid
    sets ``step_grid`` and gets grid rounding from :meth:`round_sigma`.
    """

    img_channels: int
    img_resolution: int
    label_dim: int = 0
    augment_dim: int = 0
    sigma_min: float = 0.0
    sigma_max: float = math.inf
    step_grid: StepGrid | None = None

    @property
    def learned_variance(self) -> bool:
        return self.step_grid is not None and self.step_grid.variance == "learned"

    def round_sigma(self, sigma):
        """The nearest level of the step grid; the identity for a continuous-time model."""
        sigma = torch.as_tensor(sigma)
        if self.step_grid is None:
            return sigma
        levels = self.step_grid.sigmas
        return levels[nearest_index(sigma, levels).cpu()].to(sigma.device, sigma.dtype)

    def network_evaluations(self, sigma: float) -> int:
        return 1

    def denoise_with_variance(self, x, sigma, class_labels=None, **model_kwargs):
        raise ConfigError(f"{type(self).__name__} does not predict its variance (learned_variance is False); "
                          "use a fixed variance ('small' or 'large')")


class DenoiserWrapper(DenoiserBase):
    """Base of every wrapper: the wrapped ``denoiser``'s protocol and capabilities, forwarded unchanged.

    A subclass overrides what it changes (``forward``, and ``denoise_with_variance`` where it changes D) and
    leaves everything else to the wrapped denoiser, which it must not modify.
    """

    def __init__(self, denoiser: nn.Module):
        super().__init__()
        self.denoiser = denoiser

    img_channels = property(lambda self: self.denoiser.img_channels)
    img_resolution = property(lambda self: self.denoiser.img_resolution)
    label_dim = property(lambda self: self.denoiser.label_dim)
    augment_dim = property(lambda self: self.denoiser.augment_dim)
    sigma_min = property(lambda self: self.denoiser.sigma_min)
    sigma_max = property(lambda self: self.denoiser.sigma_max)
    step_grid = property(lambda self: self.denoiser.step_grid)
    learned_variance = property(lambda self: self.denoiser.learned_variance)

    def round_sigma(self, sigma):
        return self.denoiser.round_sigma(sigma)

    def network_evaluations(self, sigma: float) -> int:
        return self.denoiser.network_evaluations(sigma)

    def forward(self, x, sigma, class_labels=None, **model_kwargs):
        return self.denoiser(x, sigma, class_labels, **model_kwargs)

    def denoise_with_variance(self, x, sigma, class_labels=None, **model_kwargs):
        return self.denoiser.denoise_with_variance(x, sigma, class_labels, **model_kwargs)


class BoundInputs(DenoiserWrapper):
    """The wrapped denoiser with extra network inputs bound to every call: ``BoundInputs(net, low_res=images)``.

    Each bound tensor holds one row per image of the batch the wrapper is called with (or a single row, shared
    by every image); they go to the network as ``model_kwargs`` of both ``forward`` and
    ``denoise_with_variance`` (ADM's upsampler: ``low_res``, the low-resolution image in [-1, 1]). Keyword
    arguments given to a call as well are refused rather than silently replaced. Bound per batch: by the
    trainer of an upsampler and by a cascade (``edm_toolkit.generate.upsample_batch``).
    """

    def __init__(self, denoiser: nn.Module, **inputs: torch.Tensor):
        super().__init__(denoiser)
        if not inputs:
            raise ConfigError("BoundInputs needs at least one input to bind, e.g. low_res=images")
        for name, value in inputs.items():
            if not isinstance(value, torch.Tensor) or value.ndim < 1:
                raise ConfigError(f"bound input {name!r} must be a tensor with one row per image")
        self.inputs = dict(inputs)  # plain attributes: neither parameters nor buffers of the wrapper

    def _with_inputs(self, x: torch.Tensor, model_kwargs: dict) -> dict:
        clash = sorted(set(model_kwargs) & set(self.inputs))
        if clash:
            raise ConfigError(f"{clash[0]!r} is bound already; pass it either to BoundInputs or to the call")
        bound = {}
        for name, value in self.inputs.items():
            if value.shape[0] not in (1, x.shape[0]):
                raise ConfigError(f"bound input {name!r} has {value.shape[0]} rows but the batch has {x.shape[0]} "
                                  "images; bind one row per image (or one for all)")
            value = value.to(x.device)
            bound[name] = value.expand(x.shape[0], *value.shape[1:]) if value.shape[0] == 1 else value
        return {**model_kwargs, **bound}

    def forward(self, x, sigma, class_labels=None, **model_kwargs):
        return self.denoiser(x, sigma, class_labels, **self._with_inputs(x, model_kwargs))

    def denoise_with_variance(self, x, sigma, class_labels=None, **model_kwargs):
        return self.denoiser.denoise_with_variance(x, sigma, class_labels, **self._with_inputs(x, model_kwargs))
