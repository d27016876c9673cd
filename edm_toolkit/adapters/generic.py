"""Any denoising network as an EDM denoiser D(x; sigma): eps-, x0-, v- or score-prediction, on a continuous
noise range or a discrete grid of noise levels.

EDM's x is x_0 + sigma n (VE form). A VP-trained network sees x_t = alpha_t x_0 + sigma_t eps instead, with
alpha_t = 1/sqrt(1 + sigma^2) and sigma_t = sigma alpha_t, so its input is x/sqrt(1 + sigma^2) (EDM Eq. 7's c_in)
and its predictions map to D as

    eps:   D = x - sigma eps                 x0:    D = x0
    v:     D = alpha_t x_t - sigma_t v       score: D = x + sigma^2 s  (VE: s = grad log p(x));
                                                    VP: eps = -sigma_t s_t with s_t the score of x_t.

A discrete grid (DDPM-style models) gives ``round_sigma`` (nearest grid level) and the time index that the
network receives; a continuous model gets its time input from a function of sigma.
"""

from __future__ import annotations

import math
from typing import Callable, Literal

import torch
from torch import nn

from ..discrete import StepGrid, nearest_index
from ..errors import ConfigError
from ..protocol import DenoiserBase

Prediction = Literal["eps", "x0", "v", "score"]
PREDICTIONS = ("eps", "x0", "v", "score")
PARAMETERIZATIONS = ("vp", "ve")
TIME_INPUTS = ("index", "sigma", "log_sigma")


class PredictionDenoiser(DenoiserBase):
    """Wraps ``model(x_in, time, **kwargs)`` into EDM's denoiser protocol.

    Args:
        model: the network; called as ``model(x_in, time, y=labels)`` where ``label_arg`` is "y" (index labels,
            guided-diffusion style) or as ``model(x_in, time, class_labels=one_hot)`` with ``label_arg`` set to
            "class_labels"; unconditional when ``label_dim`` is 0.
        prediction: what the network outputs ("eps", "x0", "v", "score").
        parameterization: "vp" (input x/sqrt(1 + sigma^2)) or "ve" (input x).
        sigmas: a discrete grid, sigmas[i] the noise level of time index i (increasing); None for continuous.
            A grid is the denoiser's ``step_grid`` (with ``variance``: the model's own reverse-process variance,
            'learned' when the network also outputs the variance interpolation v after its prediction).
        time: the network's time input: "index" (grid index, times ``time_scale``), "sigma" or "log_sigma"
            (times ``time_scale``), or a callable sigma -> time input.
        sigma_min, sigma_max: the continuous range (ignored with a grid, whose extremes are used).
        img_channels: the image channels of the prediction; with a learned variance the network outputs as many
            more (v), returned by ``denoise_with_variance``.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        prediction: Prediction = "eps",
        parameterization: str = "vp",
        sigmas: torch.Tensor | None = None,
        time: str | Callable[[torch.Tensor], torch.Tensor] = "index",
        time_scale: float = 1.0,
        sigma_min: float = 0.0,
        sigma_max: float = math.inf,
        img_resolution: int | None = None,
        img_channels: int = 3,
        label_dim: int = 0,
        label_arg: str = "y",
        variance: str = "small",
    ):
        super().__init__()
        if prediction not in PREDICTIONS:
            raise ConfigError(f"unknown prediction {prediction!r}; choose one of: {', '.join(PREDICTIONS)}")
        if parameterization not in PARAMETERIZATIONS:
            raise ConfigError(f"unknown parameterization {parameterization!r}; choose vp or ve")
        if prediction == "v" and parameterization != "vp":
            raise ConfigError("v-prediction is defined for the vp parameterization only")
        if isinstance(time, str) and time not in TIME_INPUTS:
            raise ConfigError(f"unknown time input {time!r}; choose one of: {', '.join(TIME_INPUTS)} or a function")
        if time == "index" and sigmas is None:
            raise ConfigError("time='index' needs a discrete grid: pass sigmas=...")
        if label_arg not in ("y", "class_labels"):
            raise ConfigError("label_arg must be 'y' (class indices) or 'class_labels' (one-hot)")
        self.model = model
        self.prediction, self.parameterization = prediction, parameterization
        self.time, self.time_scale = time, float(time_scale)
        self.img_resolution, self.img_channels, self.label_dim = img_resolution, int(img_channels), int(label_dim)
        self.label_arg = label_arg
        if sigmas is not None:
            sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
            if sigmas.ndim != 1 or len(sigmas) < 1 or not bool((sigmas.diff() > 0).all()):
                raise ConfigError("sigmas must be a 1-D grid of increasing noise levels")
            self.step_grid = StepGrid.from_sigmas(sigmas, variance)
            self.register_buffer("grid_sigmas", sigmas, persistent=False)  # on the network's device, for time_input
            self.sigma_min, self.sigma_max = float(sigmas[0]), float(sigmas[-1])
        else:
            if variance == "learned":
                raise ConfigError("a learned variance needs a discrete grid: pass sigmas=...")
            self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)

    def time_input(self, sigma: torch.Tensor) -> torch.Tensor:
        """What the network receives as its time argument for noise level ``sigma`` ([B] float64)."""
        if callable(self.time):
            return self.time(sigma)
        if self.time == "index":
            return nearest_index(sigma, self.grid_sigmas).to(torch.float64) * self.time_scale
        if self.time == "sigma":
            return sigma * self.time_scale
        return sigma.log() * self.time_scale

    def _labels(self, class_labels, batch, device):
        if self.label_dim == 0:
            return {}
        if class_labels is None:
            raise ConfigError(f"this network is class-conditional ({self.label_dim} classes): pass class labels")
        class_labels = class_labels.reshape(-1, self.label_dim).expand(batch, -1)
        if self.label_arg == "class_labels":
            return {"class_labels": class_labels.to(device, torch.float32)}
        return {"y": class_labels.argmax(dim=1).to(device)}

    def forward(self, x, sigma, class_labels=None, **model_kwargs):
        return self.denoise_with_variance(x, sigma, class_labels, **model_kwargs)[0]

    def denoise_with_variance(self, x, sigma, class_labels=None, **model_kwargs):
        """(D(x; sigma), v): v is the network's variance output (empty channels without a learned variance)."""
        x = x.to(torch.float32)
        batch = x.shape[0]
        sigma64 = torch.as_tensor(sigma, device=x.device).to(torch.float64).reshape(-1).expand(batch)
        s = sigma64.to(torch.float32).reshape(-1, 1, 1, 1)
        alpha = 1 / (1 + s**2).sqrt() if self.parameterization == "vp" else torch.ones_like(s)
        x_in = x * alpha
        time = self.time_input(sigma64)
        time = time.to(torch.float32) if time.is_floating_point() else time  # step indices stay integers
        out = self.model(x_in, time, **self._labels(class_labels, batch, x.device), **model_kwargs).to(torch.float32)
        pred, extra = out[:, : self.img_channels], out[:, self.img_channels:]
        if self.prediction == "x0":
            D = pred
        elif self.prediction == "eps":
            D = x - s * pred
        elif self.prediction == "v":
            D = alpha * x_in - (s * alpha) * pred
        elif self.parameterization == "ve":
            D = x + s**2 * pred
        else:  # VP score of x_t: eps = -sigma_t s_t
            D = x - s * (-(s * alpha) * pred)
        return D, extra
