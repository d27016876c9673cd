"""Building blocks of OpenAI's ADM networks, with their original parameter names.

These are the layers of the U-Nets in guided-diffusion ("Diffusion Models Beat GANs on Image
Synthesis", Dhariwal & Nichol 2021) and its parent improved-diffusion ("Improved Denoising
Diffusion Probabilistic Models", Nichol & Dhariwal 2021). Module and parameter names follow the
originals so that their released ``.pt`` state_dicts load with ``strict=True``; the code is an
independent implementation.

Numerical conventions that a checkpoint depends on:

* ``timestep_embedding`` is ``[cos, sin]`` with frequencies ``exp(-ln(10000) i / half)``.
* ``GroupNorm32`` always uses 32 groups and computes in float32.
* Attention projections (``qkv``, ``proj_out``) are ``Conv1d`` layers with kernel size 1.
* The ``qkv`` channels are read in one of two orders (see :func:`qkv_attention`); both orders
  have the same parameter shapes, so picking the wrong one loads silently and gives wrong outputs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .edm_layers import group_norm

__all__ = [
    "AttentionBlock",
    "AttentionPool2d",
    "class_embedding",
    "Downsample",
    "EmbedSequential",
    "GroupNorm32",
    "ResBlock",
    "Upsample",
    "normalization",
    "qkv_attention",
    "require_2d",
    "resolve_num_heads",
    "timestep_embedding",
    "zero_init",
]


def require_2d(dims: int) -> None:
    """The originals also offer 1-D and 3-D variants; only images (``dims=2``) are implemented."""
    if dims != 2:
        raise ValueError(f"dims={dims!r} is not supported: only 2-D image networks (dims=2) are implemented")


def zero_init(module: nn.Module) -> nn.Module:
    """Zero every parameter of ``module`` (the originals' ``zero_module``) and return it."""
    for param in module.parameters():
        nn.init.zeros_(param)
    return module


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding ``[cos(t f), sin(t f)]`` with ``f_i = exp(-ln(max_period) i / (dim // 2))``.

    ``timesteps`` is a 1-D tensor (fractional values allowed); the result is float32 ``[N, dim]``,
    zero-padded by one column when ``dim`` is odd.
    """
    half = dim // 2
    exponents = torch.arange(half, dtype=torch.float32, device=timesteps.device)
    freqs = torch.exp(-math.log(max_period) * exponents / half)
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = F.pad(embedding, (0, 1))
    return embedding


def class_embedding(num_classes: int, dim: int) -> nn.Embedding:
    """``nn.Embedding(num_classes, dim)`` (the originals' ``label_emb``), its N(0, 1) weights drawn by ``randn``.

    The same values from the same RNG state as ``nn.Embedding``'s own ``normal_`` initialisation, but built on the
    meta device (as ``checkpoints.build_backbone`` does) it runs no Python reference kernel, which would import
    ``torch._dynamo`` (about a second of start-up for every load).
    """
    return nn.Embedding(num_classes, dim, _weight=torch.randn(num_classes, dim))


class GroupNorm32(nn.GroupNorm):
    """GroupNorm that always normalises in float32 and returns the input's dtype.

    fp32 activations take the original's ``F.group_norm``. bf16/fp16 activations (the fast path, and the torso
    after ``convert_to_fp16``) are normalised by :func:`~edm_toolkit.networks.edm_layers.group_norm` in their own
    dtype, statistics accumulated in float32, without an fp32 copy of the input; the only difference from the
    original's fp32 computation is the rounding of the affine parameters to that dtype.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


def normalization(channels: int) -> GroupNorm32:
    """The ADM normalisation layer: 32 groups whatever the width (``channels`` must be a multiple of 32)."""
    if channels % 32:
        raise ValueError(f"ADM GroupNorm32 needs a channel count divisible by 32, got {channels}")
    return GroupNorm32(32, channels)


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, optionally followed by a 3x3 convolution (``conv``)."""

    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels: int | None = None):
        super().__init__()
        require_2d(dims)
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, self.out_channels, 3, padding=1)
        elif self.out_channels != channels:
            raise ValueError("Upsample without a convolution cannot change the channel count")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """2x downsampling: a 3x3 stride-2 convolution, or 2x2 average pooling (``op``)."""

    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels: int | None = None):
        super().__init__()
        require_2d(dims)
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        if use_conv:
            self.op = nn.Conv2d(channels, self.out_channels, 3, stride=2, padding=1)
        elif self.out_channels != channels:
            raise ValueError("Downsample without a convolution cannot change the channel count")
        else:
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ResBlock(nn.Module):
    """Residual block conditioned on the timestep (and class) embedding.

    ``in_layers`` = (norm, SiLU, 3x3 conv), ``emb_layers`` = (SiLU, linear), ``out_layers`` =
    (norm, SiLU, dropout, zero-initialised 3x3 conv), ``skip_connection`` a 1x1 (or 3x3 with
    ``use_conv``) conv when the width changes. With ``use_scale_shift_norm`` the embedding gives
    ``(scale, shift)`` applied as ``norm(h) * (1 + scale) + shift`` (FiLM, Dhariwal & Nichol 2021);
    otherwise it is added before ``out_layers``. With ``up``/``down`` (BigGAN-style resampling, the
    ``resblock_updown`` option) both paths are resampled between the input norm+SiLU and the conv.
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: int | None = None,
        use_conv: bool = False,
        use_scale_shift_norm: bool = False,
        dims: int = 2,
        use_checkpoint: bool = False,
        up: bool = False,
        down: bool = False,
    ):
        super().__init__()
        require_2d(dims)
        if up and down:
            raise ValueError("a ResBlock cannot both upsample and downsample")
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.use_checkpoint = use_checkpoint  # accepted for signature compatibility; not used

        self.in_layers = nn.Sequential(
            normalization(channels), nn.SiLU(), nn.Conv2d(channels, self.out_channels, 3, padding=1)
        )
        if up:
            self.resample = Upsample(channels, use_conv=False)
        elif down:
            self.resample = Downsample(channels, use_conv=False)
        else:
            self.resample = nn.Identity()
        emb_width = 2 * self.out_channels if use_scale_shift_norm else self.out_channels
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, emb_width))
        self.out_layers = nn.Sequential(
            normalization(self.out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_init(nn.Conv2d(self.out_channels, self.out_channels, 3, padding=1)),
        )
        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = nn.Conv2d(channels, self.out_channels, 3, padding=1)
        else:
            self.skip_connection = nn.Conv2d(channels, self.out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        in_norm, in_act, in_conv = self.in_layers
        h = in_conv(self.resample(in_act(in_norm(x))))
        x = self.resample(x)
        emb_out = self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        out_norm, out_act, out_dropout, out_conv = self.out_layers
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = out_norm(h) * (1 + scale) + shift
        else:
            h = out_norm(h + emb_out)
        h = out_conv(out_dropout(out_act(h)))
        return self.skip_connection(x) + h


def qkv_attention(qkv: torch.Tensor, num_heads: int, *, legacy: bool) -> torch.Tensor:
    """Multi-head dot-product attention on a fused ``[N, 3 * H * C, T]`` projection.

    ``legacy=True`` (improved-diffusion, and guided-diffusion unless ``use_new_attention_order``):
    the channels are split into heads first, each head holding contiguous ``[q | k | v]`` blocks.
    ``legacy=False`` (``use_new_attention_order`` and ``AttentionPool2d``): the channels are
    ``[q of all heads | k of all heads | v of all heads]``. The originals scale q and k by
    ``C^-1/4`` each, i.e. the logits by ``C^-1/2``. Returns ``[N, H * C, T]``, head-major.
    """
    batch, width, length = qkv.shape
    head_ch = width // (3 * num_heads)
    if legacy:
        qkv = qkv.reshape(batch, num_heads, 3, head_ch, length)
    else:
        qkv = qkv.reshape(batch, 3, num_heads, head_ch, length).transpose(1, 2)
    q, k, v = qkv.transpose(-1, -2).unbind(dim=2)  # each [N, H, T, C]
    out = F.scaled_dot_product_attention(q, k, v, scale=head_ch**-0.5)
    return out.transpose(-1, -2).reshape(batch, num_heads * head_ch, length)


def resolve_num_heads(channels: int, num_heads: int, num_head_channels: int) -> int:
    """Heads of an attention layer: ``channels // num_head_channels`` unless that is -1, else ``num_heads``."""
    if num_head_channels != -1:
        if num_head_channels <= 0 or channels % num_head_channels:
            raise ValueError(f"attention width {channels} is not divisible by num_head_channels={num_head_channels}")
        return channels // num_head_channels
    if num_heads <= 0 or channels % num_heads:
        raise ValueError(f"attention width {channels} is not divisible by num_heads={num_heads}")
    return num_heads


class AttentionBlock(nn.Module):
    """Self-attention over all spatial positions, with a residual connection.

    Parameters: ``norm`` (GroupNorm32), ``qkv`` (Conv1d C -> 3C), ``proj_out`` (Conv1d C -> C,
    zero-initialised).
    """

    def __init__(
        self,
        channels: int,
        num_heads: int = 1,
        num_head_channels: int = -1,
        use_checkpoint: bool = False,
        use_new_attention_order: bool = False,
    ):
        super().__init__()
        self.channels = channels
        self.num_heads = resolve_num_heads(channels, num_heads, num_head_channels)
        self.use_new_attention_order = use_new_attention_order
        self.use_checkpoint = use_checkpoint  # accepted for signature compatibility; not used
        self.norm = normalization(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = zero_init(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(x.shape[0], x.shape[1], -1)
        h = qkv_attention(self.qkv(self.norm(flat)), self.num_heads, legacy=not self.use_new_attention_order)
        return (flat + self.proj_out(h)).reshape(x.shape)


class AttentionPool2d(nn.Module):
    """CLIP-style attention pooling, the head of the ``pool='attention'`` noisy classifier.

    The spatial mean is prepended as an extra token, ``positional_embedding`` ``[C, S*S + 1]`` is
    added, and the output of that first token is projected by ``c_proj``. It always uses the new
    qkv order, whatever the network's ``use_new_attention_order``.
    """

    def __init__(self, spatial_dim: int, embed_dim: int, num_heads_channels: int, output_dim: int | None = None):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(embed_dim, spatial_dim**2 + 1).div_(embed_dim**0.5))
        self.qkv_proj = nn.Conv1d(embed_dim, 3 * embed_dim, 1)
        self.c_proj = nn.Conv1d(embed_dim, output_dim or embed_dim, 1)
        self.num_heads = resolve_num_heads(embed_dim, 1, num_heads_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], x.shape[1], -1)
        x = torch.cat([x.mean(dim=-1, keepdim=True), x], dim=-1)
        x = x + self.positional_embedding.to(x.dtype)
        x = self.c_proj(qkv_attention(self.qkv_proj(x), self.num_heads, legacy=False))
        return x[:, :, 0]


class EmbedSequential(nn.Sequential):
    """A sequence of layers where the ResBlocks also receive the embedding (``TimestepEmbedSequential``)."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x
