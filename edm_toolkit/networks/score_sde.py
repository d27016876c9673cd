"""NCSN++ / DDPM++ (``NCSNpp``) of score_sde_pytorch, with the original state_dict layout.

Song, Sohl-Dickstein, Kingma, Kumar, Ermon & Poole, "Score-Based Generative Modeling through
Stochastic Differential Equations", ICLR 2021 (arXiv:2011.13456), Sec. 4.4 and Appendix H.
The network is the one of yang-song/score_sde_pytorch (``models/ncsnpp.py``), rebuilt so that a
checkpoint's ``model`` entry (minus the DataParallel ``module.`` prefix) loads with ``strict=True``:
the layers live in one flat ``all_modules`` list whose indices depend on the config, and every
layer keeps its original attribute names (``GroupNorm_0``, ``Conv_0``, ``Dense_0``, ``NIN_0.W``, ...).

``forward(x, time_cond)`` returns what the original returns, before any SDE score conversion:

* DDPM++ cont. (VP): ``time_cond = 999 t``, sinusoidal embedding; the output predicts the noise,
  score = -output / std(t). Data are centred in [-1, 1].
* NCSN++ cont. (VE): ``time_cond = sigma(t)``, Gaussian Fourier features of ``log sigma``; with
  ``scale_by_sigma`` the output is already divided by sigma, i.e. it *is* the score. Data are in
  [0, 1] (``data.centered=False``) and the network maps x to 2x - 1 itself.

The FIR resampling (Appendix H: "FIR up/downsampling", kernel [1, 3, 3, 1], from StyleGAN2) is
pure PyTorch: one ``upfirdn2d`` built on ``conv2d`` / ``conv_transpose2d``.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .registry import register_network

__all__ = [
    "AttnBlockpp",
    "Combine",
    "Downsample",
    "FIRDownConv2d",
    "GaussianFourierProjection",
    "NCSNpp",
    "NCSNppConfig",
    "NIN",
    "PUBLISHED_CONFIGS",
    "ResnetBlockBigGANpp",
    "ResnetBlockDDPMpp",
    "Upsample",
    "conv_downsample_2d",
    "default_init_",
    "downsample_2d",
    "published_config",
    "timestep_embedding",
    "upfirdn2d",
    "upsample_2d",
]

# ----------------------------------------------------------------------------------------------
# Initialisation and small helpers


def default_init_(weight: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """DDPM's initialiser, in place: variance scaling, ``fan_avg`` mode, uniform distribution.

    Fans are taken with the output axis 0 and the input axis 1 (a NIN ``W [in, out]`` therefore
    has its fans swapped, which ``fan_avg`` does not notice). ``scale=0`` means 1e-10, as in the
    original, so that zero-initialised output layers still get a (tiny) random weight.
    """
    scale = 1e-10 if scale == 0 else scale
    receptive = math.prod(weight.shape[2:])
    fan_avg = (weight.shape[0] + weight.shape[1]) * receptive / 2
    bound = math.sqrt(3.0 * scale / fan_avg)
    with torch.no_grad():
        return weight.uniform_(-bound, bound)


def _conv(in_ch: int, out_ch: int, kernel_size: int = 3, *, stride: int = 1, padding: int | None = None,
          init_scale: float = 1.0) -> nn.Conv2d:
    """``ddpm_conv3x3`` / ``ddpm_conv1x1``: a biased Conv2d with ``default_init_`` and zero bias."""
    padding = kernel_size // 2 if padding is None else padding
    conv = nn.Conv2d(in_ch, out_ch, kernel_size, stride=stride, padding=padding)
    default_init_(conv.weight, init_scale)
    nn.init.zeros_(conv.bias)
    return conv


def _linear(in_features: int, out_features: int) -> nn.Linear:
    layer = nn.Linear(in_features, out_features)
    default_init_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def _group_norm(channels: int) -> nn.GroupNorm:
    """score_sde's GroupNorm: ``min(C // 4, 32)`` groups, eps 1e-6."""
    return nn.GroupNorm(num_groups=min(channels // 4, 32), num_channels=channels, eps=1e-6)


def _residual_sum(x: torch.Tensor, h: torch.Tensor, skip_rescale: bool) -> torch.Tensor:
    """``x + h``, divided by sqrt(2) with ``skip_rescale`` (paper Appendix H, "rescaling skip connections")."""
    return (x + h) / math.sqrt(2.0) if skip_rescale else x + h


_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "swish": F.silu,
    "relu": F.relu,
    "elu": F.elu,
    "lrelu": functools.partial(F.leaky_relu, negative_slope=0.2),
}

# ----------------------------------------------------------------------------------------------
# FIR resampling (StyleGAN2's upfirdn2d, in pure PyTorch)


def _fir_kernel_2d(kernel: Sequence[float] | torch.Tensor, gain: float, like: torch.Tensor) -> torch.Tensor:
    """A 1-D kernel becomes its outer product; the result is normalised to sum 1, times ``gain``."""
    k = torch.as_tensor(kernel, dtype=torch.float32, device=like.device)
    if k.ndim == 1:
        k = torch.outer(k, k)
    if k.ndim != 2 or k.shape[0] != k.shape[1]:
        raise ValueError(f"FIR kernel must be 1-D or square 2-D, got shape {tuple(k.shape)}")
    return (k / k.sum() * gain).to(like.dtype)


def _register_fir_kernel(module: nn.Module, fir_kernel: Sequence[int]) -> None:
    """Keeps the FIR taps on the module's device (a non-persistent buffer: not in the state_dict)."""
    module.register_buffer("fir_kernel", torch.tensor(fir_kernel, dtype=torch.float32), persistent=False)


def _pad_or_crop(x: torch.Tensor, before: int, after: int) -> torch.Tensor:
    """Pads (positive) or crops (negative) the two spatial axes, the same amounts on both."""
    return F.pad(x, (before, after, before, after))


def upfirdn2d(x: torch.Tensor, kernel: torch.Tensor, *, up: int = 1, down: int = 1,
              pad: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """Upsample by zero insertion, pad, convolve with a 2-D FIR ``kernel``, then keep every ``down``-th pixel.

    The same operation as StyleGAN2's ``upfirdn2d`` with ``pad=(before, after)`` on both axes: the
    zero-stuffed signal has ``H * up`` rows, is padded, and is *convolved* (not correlated) with
    ``kernel``. Zero insertion plus convolution is a strided ``conv_transpose2d``, so no zeros are
    materialised; the pad is then re-expressed relative to that transposed convolution's full output.
    """
    batch, channels, height, width = x.shape
    k = kernel.shape[-1]
    weight = kernel.to(x.dtype)[None, None]
    x = x.reshape(batch * channels, 1, height, width)  # every channel filtered alike: one 1-channel conv
    before, after = pad
    if up > 1:
        x = F.conv_transpose2d(x, weight, stride=up)
        x = _pad_or_crop(x, before - (k - 1), after + up - k)[:, :, ::down, ::down]
    else:
        x = F.conv2d(_pad_or_crop(x, before, after), weight.flip(-1, -2), stride=down)
    return x.reshape(batch, channels, *x.shape[-2:])


def upsample_2d(x: torch.Tensor, kernel: Sequence[float] | torch.Tensor = (1, 3, 3, 1), factor: int = 2,
                gain: float = 1.0) -> torch.Tensor:
    """FIR upsampling by ``factor``; constant images keep their value times ``gain``."""
    k = _fir_kernel_2d(kernel, gain * factor**2, x)
    p = k.shape[0] - factor
    return upfirdn2d(x, k, up=factor, pad=((p + 1) // 2 + factor - 1, p // 2))


def downsample_2d(x: torch.Tensor, kernel: Sequence[float] | torch.Tensor = (1, 3, 3, 1), factor: int = 2,
                  gain: float = 1.0) -> torch.Tensor:
    """FIR downsampling by ``factor`` (anti-aliasing filter, then decimation)."""
    k = _fir_kernel_2d(kernel, gain, x)
    p = k.shape[0] - factor
    return upfirdn2d(x, k, down=factor, pad=((p + 1) // 2, p // 2))


def conv_downsample_2d(x: torch.Tensor, weight: torch.Tensor, kernel: Sequence[float] | torch.Tensor = (1, 3, 3, 1),
                       factor: int = 2, gain: float = 1.0) -> torch.Tensor:
    """FIR filtering followed by a strided convolution with ``weight`` (padding applied once, up front)."""
    k = _fir_kernel_2d(kernel, gain, x)
    p = (k.shape[0] - factor) + (weight.shape[-1] - 1)
    x = upfirdn2d(x, k, pad=((p + 1) // 2, p // 2))
    return F.conv2d(x, weight, stride=factor)


# ----------------------------------------------------------------------------------------------
# Layers (original attribute names, so that the state_dict keys match)


def timestep_embedding(timesteps: torch.Tensor, embedding_dim: int, max_positions: int = 10000) -> torch.Tensor:
    """DDPM's sinusoidal embedding ``[sin, cos]`` with frequencies ``exp(-ln(max_positions) i / (half - 1))``."""
    half = embedding_dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=timesteps.device)
                      * -(math.log(max_positions) / (half - 1)))
    args = timesteps.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return F.pad(emb, (0, 1)) if embedding_dim % 2 else emb


class GaussianFourierProjection(nn.Module):
    """Random Fourier features of the (log) noise level, ``[sin(2 pi W x), cos(2 pi W x)]`` (paper Appendix H).

    ``W ~ N(0, scale^2)`` is a frozen ``Parameter`` (``requires_grad=False``): it is saved in the
    state_dict but is not part of the EMA's ``shadow_params``.
    """

    def __init__(self, embedding_size: int = 256, scale: float = 1.0):
        super().__init__()
        self.W = nn.Parameter(torch.randn(embedding_size).mul_(scale), requires_grad=False)  # in place: no meta-device reference kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_proj = x[:, None] * self.W[None, :] * 2 * math.pi
        return torch.cat([torch.sin(x_proj), torch.cos(x_proj)], dim=-1)


class NIN(nn.Module):
    """Per-pixel linear map ("network in network"); ``W`` is stored as ``[in, out]``."""

    def __init__(self, in_dim: int, num_units: int, init_scale: float = 0.1):
        super().__init__()
        self.W = nn.Parameter(default_init_(torch.empty(in_dim, num_units), init_scale))
        self.b = nn.Parameter(torch.zeros(num_units))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.W.t()[:, :, None, None], self.b)


class AttnBlockpp(nn.Module):
    """Single-head self-attention over pixels with NIN projections, scaled by ``C^-1/2``."""

    def __init__(self, channels: int, skip_rescale: bool = False, init_scale: float = 0.0):
        super().__init__()
        self.GroupNorm_0 = _group_norm(channels)
        self.NIN_0 = NIN(channels, channels)
        self.NIN_1 = NIN(channels, channels)
        self.NIN_2 = NIN(channels, channels)
        self.NIN_3 = NIN(channels, channels, init_scale=init_scale)
        self.skip_rescale = skip_rescale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        h = self.GroupNorm_0(x)
        q, k, v = (nin(h).reshape(batch, 1, channels, height * width).transpose(-1, -2)
                   for nin in (self.NIN_0, self.NIN_1, self.NIN_2))
        h = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(C)) v
        h = h.transpose(-1, -2).reshape(batch, channels, height, width)
        return _residual_sum(x, self.NIN_3(h), self.skip_rescale)


class Combine(nn.Module):
    """Merges the input pyramid into the features (``progressive_input='input_skip'``) by sum or concat."""

    def __init__(self, dim1: int, dim2: int, method: str = "cat"):
        super().__init__()
        self.Conv = _conv(dim1, dim2, kernel_size=1)
        self.method = method

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.Conv(x)
        return torch.cat([h, y], dim=1) if self.method == "cat" else h + y


class FIRDownConv2d(nn.Module):
    """StyleGAN2's fused FIR-filter-then-strided-conv downsampling layer (``up_or_down_sampling.Conv2d``)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int = 3, fir_kernel: Sequence[int] = (1, 3, 3, 1)):
        super().__init__()
        self.weight = nn.Parameter(default_init_(torch.empty(out_ch, in_ch, kernel, kernel)))
        self.bias = nn.Parameter(torch.zeros(out_ch))
        _register_fir_kernel(self, fir_kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv_downsample_2d(x, self.weight, self.fir_kernel) + self.bias.reshape(1, -1, 1, 1)


def _unsupported_fir_upsample_conv() -> ValueError:
    return ValueError(
        "fir=True with an upsampling convolution (resblock_type='ddpm' with resamp_with_conv=True, or "
        "progressive='residual') is not supported: the original's upsample_conv_2d fails in PyTorch, "
        "so no such checkpoint exists; use fir=False, or resblock_type='biggan' with progressive "
        "'none' or 'output_skip'")


class Upsample(nn.Module):
    """2x upsampling: nearest (+ 3x3 conv ``Conv_0``), or FIR without a conv."""

    def __init__(self, in_ch: int, out_ch: int | None = None, with_conv: bool = False, fir: bool = False,
                 fir_kernel: Sequence[int] = (1, 3, 3, 1)):
        super().__init__()
        out_ch = out_ch or in_ch
        if fir and with_conv:
            raise _unsupported_fir_upsample_conv()
        if with_conv:
            self.Conv_0 = _conv(in_ch, out_ch)
        self.fir, self.with_conv = fir, with_conv
        _register_fir_kernel(self, fir_kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fir:
            return upsample_2d(x, self.fir_kernel)
        h = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.Conv_0(h) if self.with_conv else h


class Downsample(nn.Module):
    """2x downsampling: FIR (+ fused conv ``Conv2d_0``), or 'SAME'-padded strided conv ``Conv_0`` / average pool."""

    def __init__(self, in_ch: int, out_ch: int | None = None, with_conv: bool = False, fir: bool = False,
                 fir_kernel: Sequence[int] = (1, 3, 3, 1)):
        super().__init__()
        out_ch = out_ch or in_ch
        if with_conv and fir:
            self.Conv2d_0 = FIRDownConv2d(in_ch, out_ch, fir_kernel=fir_kernel)
        elif with_conv:
            self.Conv_0 = _conv(in_ch, out_ch, stride=2, padding=0)
        self.fir, self.with_conv = fir, with_conv
        _register_fir_kernel(self, fir_kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fir:
            return self.Conv2d_0(x) if self.with_conv else downsample_2d(x, self.fir_kernel)
        x = F.pad(x, (0, 1, 0, 1))
        return self.Conv_0(x) if self.with_conv else F.avg_pool2d(x, 2, stride=2)


class _ResnetBlockBase(nn.Module):
    """The two residual blocks share: norm-act-conv, + Dense(act(temb)), norm-act-dropout-conv."""

    def __init__(self, act, in_ch: int, out_ch: int, temb_dim: int | None, dropout: float, init_scale: float):
        super().__init__()
        self.GroupNorm_0 = _group_norm(in_ch)
        self.Conv_0 = _conv(in_ch, out_ch)
        if temb_dim is not None:
            self.Dense_0 = _linear(temb_dim, out_ch)
        self.GroupNorm_1 = _group_norm(out_ch)
        self.Dropout_0 = nn.Dropout(dropout)
        self.Conv_1 = _conv(out_ch, out_ch, init_scale=init_scale)
        self.act = act

    def _second_half(self, h: torch.Tensor, temb: torch.Tensor | None) -> torch.Tensor:
        h = self.Conv_0(h)
        if temb is not None:
            h = h + self.Dense_0(self.act(temb))[:, :, None, None]
        h = self.act(self.GroupNorm_1(h))
        return self.Conv_1(self.Dropout_0(h))


class ResnetBlockDDPMpp(_ResnetBlockBase):
    """DDPM's residual block with a NIN (or 3x3 conv) shortcut when the width changes."""

    def __init__(self, act, in_ch: int, out_ch: int | None = None, temb_dim: int | None = None,
                 conv_shortcut: bool = False, dropout: float = 0.1, skip_rescale: bool = False,
                 init_scale: float = 0.0):
        out_ch = out_ch or in_ch
        super().__init__(act, in_ch, out_ch, temb_dim, dropout, init_scale)
        if in_ch != out_ch:
            if conv_shortcut:
                self.Conv_2 = _conv(in_ch, out_ch)
            else:
                self.NIN_0 = NIN(in_ch, out_ch)
        self.skip_rescale = skip_rescale

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self._second_half(self.act(self.GroupNorm_0(x)), temb)
        if hasattr(self, "Conv_2"):
            x = self.Conv_2(x)
        elif hasattr(self, "NIN_0"):
            x = self.NIN_0(x)
        return _residual_sum(x, h, self.skip_rescale)


class ResnetBlockBigGANpp(_ResnetBlockBase):
    """BigGAN-style residual block that can resample both paths (paper Appendix H), 1x1 ``Conv_2`` shortcut."""

    def __init__(self, act, in_ch: int, out_ch: int | None = None, temb_dim: int | None = None, up: bool = False,
                 down: bool = False, dropout: float = 0.1, fir: bool = False,
                 fir_kernel: Sequence[int] = (1, 3, 3, 1), skip_rescale: bool = True, init_scale: float = 0.0):
        out_ch = out_ch or in_ch
        super().__init__(act, in_ch, out_ch, temb_dim, dropout, init_scale)
        if in_ch != out_ch or up or down:
            self.Conv_2 = _conv(in_ch, out_ch, kernel_size=1)
        self.up, self.down, self.fir = up, down, fir
        _register_fir_kernel(self, fir_kernel)
        self.skip_rescale = skip_rescale

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.up:
            return upsample_2d(x, self.fir_kernel) if self.fir else F.interpolate(x, scale_factor=2, mode="nearest")
        if self.down:
            return downsample_2d(x, self.fir_kernel) if self.fir else F.avg_pool2d(x, 2)
        return x

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self._second_half(self._resample(self.act(self.GroupNorm_0(x))), temb)
        x = self._resample(x)
        if hasattr(self, "Conv_2"):
            x = self.Conv_2(x)
        return _residual_sum(x, h, self.skip_rescale)


# ----------------------------------------------------------------------------------------------
# Config

_REQUIRED = object()

_CHOICES = {
    "embedding_type": ("fourier", "positional"),
    "resblock_type": ("biggan", "ddpm"),
    "progressive": ("none", "output_skip", "residual"),
    "progressive_input": ("none", "input_skip", "residual"),
    "progressive_combine": ("sum", "cat"),
    "nonlinearity": tuple(_ACTIVATIONS),
    "attention_type": ("ddpm",),
    "normalization": ("groupnorm",),
}


@dataclasses.dataclass(frozen=True)
class NCSNppConfig:
    """The config fields NCSNpp reads, with the original names (``model.*`` and ``data.*`` flattened).

    Build it from an ml_collections-style nested config (dict or attribute object) with
    :meth:`from_config`; the string options are lower-cased as in the original.
    """

    nf: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    attn_resolutions: tuple[int, ...]
    dropout: float
    resamp_with_conv: bool
    conditional: bool
    fir: bool
    fir_kernel: tuple[int, ...]
    skip_rescale: bool
    resblock_type: str
    progressive: str
    progressive_input: str
    progressive_combine: str
    embedding_type: str
    init_scale: float
    scale_by_sigma: bool
    nonlinearity: str
    image_size: int
    centered: bool
    num_channels: int = 3
    fourier_scale: float = 16.0
    attention_type: str = "ddpm"
    normalization: str = "groupnorm"
    conv_size: int = 3
    sigma_min: float = 0.01
    sigma_max: float = 50.0
    num_scales: int = 1000
    continuous: bool = True

    def __post_init__(self) -> None:
        for name in ("ch_mult", "attn_resolutions", "fir_kernel"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        for name, allowed in _CHOICES.items():
            value = str(getattr(self, name)).lower()
            object.__setattr__(self, name, value)
            if value not in allowed:
                raise ValueError(f"NCSNpp: unsupported {name}={value!r}; supported: {', '.join(allowed)}")
        if self.conv_size != 3:
            raise ValueError(f"NCSNpp: unsupported conv_size={self.conv_size!r}; supported: 3")
        for name, low, high in (("nf", 1, 4096), ("num_res_blocks", 1, 64), ("image_size", 1, 4096),
                                ("num_channels", 1, 16), ("num_scales", 1, 100_000)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ValueError(f"NCSNpp: {name}={value!r} must be an integer in [{low}, {high}]")
        if not 1 <= len(self.ch_mult) <= 16 or not all(isinstance(m, int) and 1 <= m <= 64 for m in self.ch_mult):
            raise ValueError(f"NCSNpp: ch_mult={self.ch_mult!r} must be 1 to 16 integers in [1, 64]")
        for name in ("dropout", "init_scale", "fourier_scale", "sigma_min", "sigma_max"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"NCSNpp: {name}={value!r} must be a finite number")
        if not 0 <= self.dropout <= 1 or not 0 < self.sigma_min < self.sigma_max:
            raise ValueError(f"NCSNpp: needs 0 <= dropout <= 1 and 0 < sigma_min < sigma_max, got {self.dropout}, "
                             f"{self.sigma_min}, {self.sigma_max}")
        if self.embedding_type == "fourier" and not self.continuous:
            raise ValueError("NCSNpp: embedding_type='fourier' requires training.continuous=True")
        upsample_conv = (self.resblock_type == "ddpm" and self.resamp_with_conv) or self.progressive == "residual"
        if self.fir and upsample_conv:
            raise _unsupported_fir_upsample_conv()
        levels = len(self.ch_mult)
        if levels == 0 or self.image_size % 2 ** (levels - 1):
            raise ValueError(f"NCSNpp: image_size={self.image_size} must be divisible by 2**(len(ch_mult)-1) "
                             f"with a non-empty ch_mult, got ch_mult={self.ch_mult}")

    @classmethod
    def from_config(cls, config: Any) -> NCSNppConfig:
        """Reads ``config.model.*``, ``config.data.*`` and ``config.training.continuous`` (dicts or attributes)."""
        model, data = _section(config, "model"), _section(config, "data")
        training = _section(config, "training", required=False)
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            if field.name in ("image_size", "centered", "num_channels"):
                source, where = data, "data"
            elif field.name == "continuous":
                source, where = training, "training"
            else:
                source, where = model, "model"
            default = _REQUIRED if field.default is dataclasses.MISSING else field.default
            if field.name == "fourier_scale" and str(_get(model, "embedding_type", "")).lower() == "fourier":
                default = _REQUIRED
            values[field.name] = _get(source, field.name, default, where)
        return cls(**values)

    @property
    def all_resolutions(self) -> tuple[int, ...]:
        return tuple(self.image_size // 2**i for i in range(len(self.ch_mult)))


def _section(config: Any, name: str, required: bool = True) -> Any:
    section = config.get(name) if isinstance(config, Mapping) else getattr(config, name, None)
    if section is None and required:
        raise ValueError(f"NCSNpp config has no '{name}' section")
    return section


def _get(section: Any, key: str, default: Any = _REQUIRED, where: str = "model") -> Any:
    if section is not None:
        if isinstance(section, Mapping):
            if key in section:
                return section[key]
        elif hasattr(section, key):
            return getattr(section, key)
    if default is _REQUIRED:
        raise ValueError(f"NCSNpp config is missing '{where}.{key}'")
    return default


def _as_config(config: Any) -> NCSNppConfig:
    return config if isinstance(config, NCSNppConfig) else NCSNppConfig.from_config(config)


# ----------------------------------------------------------------------------------------------
# The network


@register_network("ncsnpp")
class NCSNpp(nn.Module):
    """NCSN++ / DDPM++ U-Net of Song et al. (2021), module for module as in score_sde_pytorch.

    ``config`` is an ml_collections-style nested config (a dict such as :func:`published_config`
    returns, or an attribute object) or an :class:`NCSNppConfig`.
    """

    def __init__(self, config: Any):
        super().__init__()
        self.config = cfg = _as_config(config)
        self._init_record = self._plain_config  # how model files store this network
        self.act = act = _ACTIVATIONS[cfg.nonlinearity]
        sigmas = np.exp(np.linspace(np.log(cfg.sigma_max), np.log(cfg.sigma_min), cfg.num_scales))
        self.register_buffer("sigmas", torch.tensor(sigmas, dtype=torch.float64))

        nf, channels, temb_dim = cfg.nf, cfg.num_channels, 4 * cfg.nf
        levels = len(cfg.ch_mult)
        self.attn_at_level = [res in cfg.attn_resolutions for res in cfg.all_resolutions]
        # As in the original, blocks get a Dense_0 for the embedding even when conditional=False.
        block_kwargs = {"act": act, "dropout": cfg.dropout, "init_scale": cfg.init_scale,
                        "skip_rescale": cfg.skip_rescale, "temb_dim": temb_dim}
        if cfg.resblock_type == "biggan":
            resblock = functools.partial(ResnetBlockBigGANpp, fir=cfg.fir, fir_kernel=cfg.fir_kernel, **block_kwargs)
        else:
            resblock = functools.partial(ResnetBlockDDPMpp, **block_kwargs)
        attn = functools.partial(AttnBlockpp, init_scale=cfg.init_scale, skip_rescale=cfg.skip_rescale)
        resample = {"fir": cfg.fir, "fir_kernel": cfg.fir_kernel}

        modules: list[nn.Module] = []
        if cfg.embedding_type == "fourier":
            modules.append(GaussianFourierProjection(embedding_size=nf, scale=cfg.fourier_scale))
        if cfg.conditional:
            embed_dim = 2 * nf if cfg.embedding_type == "fourier" else nf
            modules += [_linear(embed_dim, temb_dim), _linear(temb_dim, temb_dim)]

        # Encoder.
        modules.append(_conv(channels, nf))
        skip_channels = [nf]
        in_ch, pyramid_ch = nf, channels
        for level in range(levels):
            for _ in range(cfg.num_res_blocks):
                out_ch = nf * cfg.ch_mult[level]
                modules.append(resblock(in_ch=in_ch, out_ch=out_ch))
                in_ch = out_ch
                if self.attn_at_level[level]:
                    modules.append(attn(channels=in_ch))
                skip_channels.append(in_ch)
            if level != levels - 1:
                if cfg.resblock_type == "ddpm":
                    modules.append(Downsample(in_ch=in_ch, with_conv=cfg.resamp_with_conv, **resample))
                else:
                    modules.append(resblock(in_ch=in_ch, down=True))
                if cfg.progressive_input == "input_skip":
                    modules.append(Downsample(in_ch=pyramid_ch, with_conv=False, **resample))
                    modules.append(Combine(dim1=pyramid_ch, dim2=in_ch, method=cfg.progressive_combine))
                    in_ch *= 2 if cfg.progressive_combine == "cat" else 1
                elif cfg.progressive_input == "residual":
                    modules.append(Downsample(in_ch=pyramid_ch, out_ch=in_ch, with_conv=True, **resample))
                    pyramid_ch = in_ch
                skip_channels.append(in_ch)

        # Bottleneck.
        in_ch = skip_channels[-1]
        modules += [resblock(in_ch=in_ch), attn(channels=in_ch), resblock(in_ch=in_ch)]

        # Decoder.
        pyramid_ch = 0
        for level in reversed(range(levels)):
            for _ in range(cfg.num_res_blocks + 1):
                out_ch = nf * cfg.ch_mult[level]
                modules.append(resblock(in_ch=in_ch + skip_channels.pop(), out_ch=out_ch))
                in_ch = out_ch
            if self.attn_at_level[level]:
                modules.append(attn(channels=in_ch))
            if cfg.progressive != "none":
                if level != levels - 1:
                    modules.append(Upsample(in_ch=pyramid_ch, out_ch=in_ch if cfg.progressive == "residual" else None,
                                            with_conv=cfg.progressive == "residual", **resample))
                if cfg.progressive == "output_skip":
                    modules += [_group_norm(in_ch), _conv(in_ch, channels, init_scale=cfg.init_scale)]
                    pyramid_ch = channels
                elif level == levels - 1:  # residual
                    modules += [_group_norm(in_ch), _conv(in_ch, in_ch)]
                    pyramid_ch = in_ch
                else:
                    pyramid_ch = in_ch
            if level != 0:
                if cfg.resblock_type == "ddpm":
                    modules.append(Upsample(in_ch=in_ch, with_conv=cfg.resamp_with_conv, **resample))
                else:
                    modules.append(resblock(in_ch=in_ch, up=True))

        if cfg.progressive != "output_skip":
            modules += [_group_norm(in_ch), _conv(in_ch, channels, init_scale=cfg.init_scale)]
        self.all_modules = nn.ModuleList(modules)

    def _plain_config(self) -> dict[str, Any]:
        """The config as nested plain data that NCSNppConfig.from_config reads back."""
        cfg = dataclasses.asdict(self.config)
        data = {k: cfg.pop(k) for k in ("image_size", "centered", "num_channels")}
        return {"config": {"model": cfg, "data": data, "training": {"continuous": cfg.pop("continuous")}}}

    def forward(self, x: torch.Tensor, time_cond: torch.Tensor) -> torch.Tensor:
        """Raw network output for images ``x [B, C, H, W]`` and labels ``time_cond`` (``[B]``, or one for all).

        ``time_cond`` is ``999 t`` for the positional embedding (VP) and ``sigma`` for the Fourier
        embedding (VE); see the module docstring for what the output means.
        """
        cfg = self.config
        if x.ndim != 4 or x.shape[1] != cfg.num_channels:
            raise ValueError(f"NCSNpp expects x of shape [B, {cfg.num_channels}, H, W], got {tuple(x.shape)}")
        time_cond = torch.as_tensor(time_cond, device=x.device).reshape(-1)
        if time_cond.numel() == 1:
            time_cond = time_cond.expand(x.shape[0])
        elif time_cond.numel() != x.shape[0]:
            raise ValueError(f"NCSNpp: time_cond has {time_cond.numel()} entries for a batch of {x.shape[0]}")

        modules = iter(self.all_modules)
        if cfg.embedding_type == "fourier":
            used_sigmas = time_cond
            temb = next(modules)(torch.log(used_sigmas))
        else:
            used_sigmas = self.sigmas[time_cond.int()] if cfg.scale_by_sigma else None
            temb = timestep_embedding(time_cond, cfg.nf)
        if cfg.conditional:
            dense_0, dense_1 = next(modules), next(modules)
            temb = dense_1(self.act(dense_0(temb.to(dense_0.weight.dtype))))
        else:
            temb = None
        if not cfg.centered:
            x = 2 * x - 1.0

        h = self._unet(x, temb, modules)
        if next(modules, None) is not None:  # construction and forward must walk all_modules alike
            raise RuntimeError("NCSNpp: not every module was used in forward")
        if cfg.scale_by_sigma:
            h = h / used_sigmas.to(h.dtype).reshape(-1, 1, 1, 1)
        return h

    def _block(self, module: nn.Module, h: torch.Tensor, temb: torch.Tensor | None) -> torch.Tensor:
        """Calls a residual block with the embedding, a plain resampler without."""
        return module(h, temb) if isinstance(module, _ResnetBlockBase) else module(h)

    def _unet(self, x: torch.Tensor, temb: torch.Tensor | None, modules) -> torch.Tensor:
        cfg = self.config
        levels = len(cfg.ch_mult)
        input_pyramid = x
        hs = [next(modules)(x)]
        for level in range(levels):
            for _ in range(cfg.num_res_blocks):
                h = next(modules)(hs[-1], temb)
                if self.attn_at_level[level]:
                    h = next(modules)(h)
                hs.append(h)
            if level != levels - 1:
                h = self._block(next(modules), hs[-1], temb)
                if cfg.progressive_input == "input_skip":
                    input_pyramid = next(modules)(input_pyramid)
                    h = next(modules)(input_pyramid, h)
                elif cfg.progressive_input == "residual":
                    input_pyramid = _residual_sum(next(modules)(input_pyramid), h, cfg.skip_rescale)
                    h = input_pyramid
                hs.append(h)

        h = next(modules)(hs[-1], temb)
        h = next(modules)(h)
        h = next(modules)(h, temb)

        pyramid = None
        for level in reversed(range(levels)):
            for _ in range(cfg.num_res_blocks + 1):
                h = next(modules)(torch.cat([h, hs.pop()], dim=1), temb)
            if self.attn_at_level[level]:
                h = next(modules)(h)
            if cfg.progressive != "none":
                if level != levels - 1:
                    pyramid = next(modules)(pyramid)
                if cfg.progressive == "output_skip":
                    pyramid_h = self._norm_act_conv(modules, h)
                    pyramid = pyramid_h if pyramid is None else pyramid + pyramid_h
                elif level == levels - 1:  # residual: start the pyramid
                    pyramid = self._norm_act_conv(modules, h)
                else:
                    pyramid = h = _residual_sum(pyramid, h, cfg.skip_rescale)
            if level != 0:
                h = self._block(next(modules), h, temb)

        if cfg.progressive == "output_skip":
            return pyramid
        return self._norm_act_conv(modules, h)

    def _norm_act_conv(self, modules, h: torch.Tensor) -> torch.Tensor:
        """The output head: the next two modules, a GroupNorm and a conv, with the activation between."""
        norm, conv = next(modules), next(modules)
        return conv(self.act(norm(h)))


# ----------------------------------------------------------------------------------------------
# Published CIFAR-10 configs (score_sde_pytorch configs/, as nested plain data)

_CIFAR10_DEFAULTS: dict[str, dict[str, Any]] = {  # configs/default_cifar10_configs.py (without `device`)
    "training": {
        "batch_size": 128, "n_iters": 1300001, "snapshot_freq": 50000, "log_freq": 50, "eval_freq": 100,
        "snapshot_freq_for_preemption": 10000, "snapshot_sampling": True, "likelihood_weighting": False,
        "continuous": True, "reduce_mean": False,
    },
    "sampling": {"n_steps_each": 1, "noise_removal": True, "probability_flow": False, "snr": 0.16},
    "eval": {
        "begin_ckpt": 9, "end_ckpt": 26, "batch_size": 1024, "enable_sampling": False, "num_samples": 50000,
        "enable_loss": True, "enable_bpd": False, "bpd_dataset": "test",
    },
    "data": {
        "dataset": "CIFAR10", "image_size": 32, "random_flip": True, "centered": False,
        "uniform_dequantization": False, "num_channels": 3,
    },
    "model": {
        "sigma_min": 0.01, "sigma_max": 50, "num_scales": 1000, "beta_min": 0.1, "beta_max": 20.0,
        "dropout": 0.1, "embedding_type": "fourier",
    },
    "optim": {
        "weight_decay": 0, "optimizer": "Adam", "lr": 2e-4, "beta1": 0.9, "eps": 1e-8, "warmup": 5000,
        "grad_clip": 1.0,
    },
    "seed": 42,
}

_NCSNPP_MODEL = {  # model fields shared by the four CIFAR-10 continuous configs
    "name": "ncsnpp", "normalization": "GroupNorm", "nonlinearity": "swish", "nf": 128, "ch_mult": (1, 2, 2, 2),
    "num_res_blocks": 4, "attn_resolutions": (16,), "resamp_with_conv": True, "conditional": True,
    "fir_kernel": (1, 3, 3, 1), "skip_rescale": True, "resblock_type": "biggan", "progressive": "none",
    "progressive_combine": "sum", "attention_type": "ddpm", "init_scale": 0.0, "fourier_scale": 16, "conv_size": 3,
}

_VP_DDPMPP = {
    "training": {"sde": "vpsde", "continuous": True, "reduce_mean": True},
    "sampling": {"method": "pc", "predictor": "euler_maruyama", "corrector": "none"},
    "data": {"centered": True},
    "model": {**_NCSNPP_MODEL, "scale_by_sigma": False, "ema_rate": 0.9999, "fir": False,
              "progressive_input": "none", "embedding_type": "positional"},
}

_VE_NCSNPP = {
    "training": {"sde": "vesde", "continuous": True},
    "sampling": {"method": "pc", "predictor": "reverse_diffusion", "corrector": "langevin"},
    "model": {**_NCSNPP_MODEL, "scale_by_sigma": True, "ema_rate": 0.999, "fir": True,
              "progressive_input": "residual"},
}

_DEEP = {"training": {"n_iters": 950001}, "model": {"num_res_blocks": 8}}


def _merge(base: Mapping, *overrides: Mapping) -> dict:
    out = copy.deepcopy(dict(base))
    for override in overrides:
        for key, value in override.items():
            if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
                out[key] = _merge(out[key], value)
            else:
                out[key] = copy.deepcopy(value)
    return out


PUBLISHED_CONFIGS: Mapping[str, Mapping[str, Any]] = {
    "vp/cifar10_ddpmpp_continuous": _merge(_CIFAR10_DEFAULTS, _VP_DDPMPP),
    "vp/cifar10_ddpmpp_deep_continuous": _merge(_CIFAR10_DEFAULTS, _VP_DDPMPP, _DEEP),
    "ve/cifar10_ncsnpp_continuous": _merge(_CIFAR10_DEFAULTS, _VE_NCSNPP),
    "ve/cifar10_ncsnpp_deep_continuous": _merge(_CIFAR10_DEFAULTS, _VE_NCSNPP, _DEEP),
}
"""The released CIFAR-10 continuous-time configs (DDPM++ cont. VP, NCSN++ cont. VE, and their deep variants)."""


def published_config(name: str) -> dict[str, Any]:
    """A fresh, mutable copy of one of :data:`PUBLISHED_CONFIGS` (e.g. ``'vp/cifar10_ddpmpp_continuous'``)."""
    if name not in PUBLISHED_CONFIGS:
        raise ValueError(f"unknown score_sde config {name!r}; known: {', '.join(PUBLISHED_CONFIGS)}")
    return copy.deepcopy(dict(PUBLISHED_CONFIGS[name]))
