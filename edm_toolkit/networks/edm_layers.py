"""Building blocks of EDM's backbones (NVlabs/edm ``training/networks.py``).

Karras et al., "Elucidating the Design Space of Diffusion-Based Generative
Models" (2022), Appendix F.2 and Table 7, re-implement DDPM++/NCSN++ (Song et
al. 2021) and ADM (Dhariwal & Nichol 2021) on one set of layers.  The layers
here keep EDM's constructor arguments, weight initialisation (including the
order of random draws) and ``state_dict`` layout, so original weights load
with ``strict=True`` and a freshly built network starts where EDM's starts.

Every layer casts its parameters to the input dtype, as EDM does for its
``use_fp16`` mode, and has no Python control flow on tensor values, so it runs
under ``torch.autocast`` and ``torch.compile``.  Low-precision and
channels_last activations (the fast path of ``edm_toolkit.inference``) go
through :func:`group_norm` and a layout-aware :func:`self_attention`, which
avoid PyTorch's dtype and layout round trips; fp32 activations in the
standard layout take exactly the faithful code path.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "weight_init",
    "Linear",
    "Conv2d",
    "GroupNorm",
    "group_norm",
    "self_attention",
    "UNetBlock",
    "PositionalEmbedding",
    "FourierEmbedding",
]

_INIT_MODES = ("xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal")


def weight_init(shape: Sequence[int], mode: str, fan_in: int, fan_out: int) -> torch.Tensor:
    """Random initial weights, drawn exactly as EDM's ``weight_init``.

    ``xavier_*`` use the variance 2/(fan_in+fan_out), ``kaiming_*`` 1/fan_in;
    the uniform variants draw ``rand*2-1`` and the normal ones ``randn``, one
    draw per call, so construction consumes the global RNG like EDM does.

    The arithmetic is in place (same operations, same order, same values):
    on the meta device, where ``checkpoints.build_backbone`` builds networks,
    out-of-place arithmetic runs PyTorch's Python reference kernels, which
    import ``torch._dynamo`` (about a second of start-up for every load).
    """
    if mode == "xavier_uniform":
        return torch.rand(*shape).mul_(2).sub_(1).mul_(math.sqrt(6 / (fan_in + fan_out)))
    if mode == "xavier_normal":
        return torch.randn(*shape).mul_(math.sqrt(2 / (fan_in + fan_out)))
    if mode == "kaiming_uniform":
        return torch.rand(*shape).mul_(2).sub_(1).mul_(math.sqrt(3 / fan_in))
    if mode == "kaiming_normal":
        return torch.randn(*shape).mul_(math.sqrt(1 / fan_in))
    raise ValueError(f"unknown init_mode {mode!r}; expected one of {', '.join(_INIT_MODES)}")


def _cast(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    return None if t is None else t.to(like.dtype)


class Linear(nn.Module):
    """Fully connected layer with EDM's initialisation (``weight`` [out, in], optional ``bias``)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        init_mode: str = "kaiming_normal",
        init_weight: float = 1,
        init_bias: float = 0,
    ):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        fans = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = nn.Parameter(weight_init([out_features, in_features], **fans).mul_(init_weight))
        self.bias = nn.Parameter(weight_init([out_features], **fans).mul_(init_bias)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype), _cast(self.bias, x))


def _resample_kernel(taps: Sequence[float]) -> torch.Tensor:
    """Separable 2-D FIR filter ``outer(f, f) / sum(f)^2`` as a [1, 1, k, k] float32 tensor.

    Computed on the CPU and copied to the default device, so that building on the meta device runs no
    out-of-place arithmetic there (see :func:`weight_init`).
    """
    f = torch.as_tensor(taps, dtype=torch.float32, device="cpu")
    kernel = (torch.outer(f, f) / f.sum().square()).reshape(1, 1, len(f), len(f))
    return torch.empty(kernel.shape).copy_(kernel)


class Conv2d(nn.Module):
    """2-D convolution with optional 2x FIR up- or downsampling (EDM's ``Conv2d``).

    ``kernel=0`` gives a resample-only layer without weights (EDM's ``aux_up`` /
    ``aux_down``).  The ``resample_filter`` buffer exists only when ``up`` or
    ``down`` is set, as in EDM's state_dict.  Upsampling is a depthwise
    transposed convolution with the filter times 4 (unit DC gain after zero
    insertion), downsampling a depthwise stride-2 convolution.  With
    ``fused_resample`` the order and padding follow EDM's fused variant
    (used by NCSN++'s ``aux_residual``), which differs at the borders.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int,
        bias: bool = True,
        up: bool = False,
        down: bool = False,
        resample_filter: Sequence[float] = (1, 1),
        fused_resample: bool = False,
        init_mode: str = "kaiming_normal",
        init_weight: float = 1,
        init_bias: float = 0,
    ):
        if up and down:
            raise ValueError("Conv2d: up and down cannot both be set")
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.up = up
        self.down = down
        self.fused_resample = fused_resample
        fans = dict(mode=init_mode, fan_in=in_channels * kernel * kernel, fan_out=out_channels * kernel * kernel)
        shape = [out_channels, in_channels, kernel, kernel]
        self.weight = nn.Parameter(weight_init(shape, **fans).mul_(init_weight)) if kernel else None
        self.bias = nn.Parameter(weight_init([out_channels], **fans).mul_(init_bias)) if kernel and bias else None
        self.register_buffer("resample_filter", _resample_kernel(resample_filter) if up or down else None)

    def _fir(self, x: torch.Tensor, channels: int, padding: int) -> torch.Tensor:
        """Depthwise 2x FIR resampling of ``x`` (``channels`` = its channel count)."""
        f = self.resample_filter.to(x.dtype)
        if self.up:
            f = (f * 4).expand(channels, 1, -1, -1)
            return F.conv_transpose2d(x, f, groups=channels, stride=2, padding=padding)
        return F.conv2d(x, f.expand(channels, 1, -1, -1), groups=channels, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = _cast(self.weight, x)
        b = _cast(self.bias, x)
        w_pad = w.shape[-1] // 2 if w is not None else 0
        f_pad = (self.resample_filter.shape[-1] - 1) // 2 if self.resample_filter is not None else 0

        if self.fused_resample and self.up and w is not None:
            x = self._fir(x, self.in_channels, w_pad + f_pad)
            x = F.conv2d(x, w, b)
        elif self.fused_resample and self.down and w is not None:
            x = F.conv2d(x, w, padding=w_pad + f_pad)
            x = self._fir(x, self.out_channels, 0)
            if b is not None:
                x = x + b.reshape(1, -1, 1, 1)
        else:
            if self.up or self.down:
                x = self._fir(x, self.in_channels, f_pad)
            if w is not None:
                x = F.conv2d(x, w, b, padding=w_pad)
        return x


def group_norm(x: torch.Tensor, num_groups: int, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """``F.group_norm(x, num_groups, weight, bias, eps)`` for x [B, C, ...], computed in x's dtype and memory layout.

    fp32 input in the standard layout takes ``F.group_norm`` unchanged: the faithful path.  bf16/fp16 input takes
    ``F.group_norm`` in that dtype (statistics accumulated in fp32 inside the kernel), as EDM's ``use_fp16`` does,
    with autocast disabled around it: autocast would run it in fp32, a round trip of the largest tensors of the
    network through fp32 copies.  channels_last input on a device whose kernel would copy it to the standard
    layout (the GPU: the next convolution then copies it back) takes :func:`_group_norm_in_place`.
    """
    native = x.is_contiguous() or _native_group_norm_keeps_layout(x)
    if x.dtype == torch.float32 and native:
        return F.group_norm(x, num_groups, weight.to(x.dtype), bias.to(x.dtype), eps)
    with torch.autocast(x.device.type, enabled=False):
        if native:
            return F.group_norm(x, num_groups, weight.to(x.dtype), bias.to(x.dtype), eps)
        return _group_norm_in_place(x, num_groups, weight, bias, eps)


def _native_group_norm_keeps_layout(x: torch.Tensor) -> bool:
    """Whether ``F.group_norm`` normalises x in its own memory layout: PyTorch's CPU kernels do (channels_last
    included); its CUDA kernel first copies the input to the standard layout (ATen ``group_norm``)."""
    return x.device.type == "cpu"


def _group_norm_in_place(x: torch.Tensor, num_groups: int, weight: torch.Tensor, bias: torch.Tensor,
                         eps: float) -> torch.Tensor:
    """Group normalisation that reads x where it is, whatever its memory layout, and writes one tensor like it.

    The per-group statistics are reductions over a grouped view of x that accumulate in fp32; the normalisation
    and affine map are one ``addcmul`` with per-channel ``scale = weight / std`` and ``shift = bias - mean *
    scale``, in x's dtype.  fp32 statistics come from ``var_mean`` (Welford).  For bf16/fp16 input the variance
    is E[x^2] - mean^2 from two fp32 reductions that need no fp32 copy of x; its rounding error relative to the
    standard deviation, ~2^-25 (mean/std)^2, stays below the error that the input's own rounding carries into the
    normalised value, ~2^-9 (bf16) or 2^-11 (fp16) times mean/std, for any mean/std below 2^14.
    """
    batch, channels = x.shape[:2]
    grouped = x.unflatten(1, (num_groups, channels // num_groups))  # a view in any memory layout
    dims = tuple(range(2, grouped.ndim))
    if x.dtype == torch.float32:
        var, mean = torch.var_mean(grouped, dim=dims, correction=0)
    else:
        mean = grouped.mean(dim=dims, dtype=torch.float32)
        norm = torch.linalg.vector_norm(grouped, 2, dim=dims, dtype=torch.float32)
        var = torch.addcmul(norm.square() / grouped[0, 0].numel(), mean, mean, value=-1).clamp_min(0)
    scale = weight.float().reshape(1, num_groups, -1) * (var + eps).rsqrt()[:, :, None]  # [B, groups, C/groups]
    shift = torch.addcmul(bias.float().reshape(1, num_groups, -1), mean[:, :, None], scale, value=-1)
    shape = (batch, channels) + (1,) * (x.ndim - 2)
    return torch.addcmul(shift.reshape(shape).to(x.dtype), x, scale.reshape(shape).to(x.dtype))


class GroupNorm(nn.Module):
    """Group normalisation with ``min(num_groups, C // min_channels_per_group)`` groups (EDM's ``GroupNorm``).

    Fewer than 32 groups for narrow layers is why EDM's ADM differs from
    guided-diffusion's ``GroupNorm32`` below 128 channels.  Computed by
    :func:`group_norm` (``F.group_norm`` for fp32 activations).
    """

    def __init__(self, num_channels: int, num_groups: int = 32, min_channels_per_group: int = 4, eps: float = 1e-5):
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


def self_attention(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Multi-head self-attention over pixels in EDM's qkv channel layout.

    ``qkv`` is the [B, 3C, H, W] output of the qkv 1x1 conv.  EDM reads it as
    [B*heads, C/heads, 3, H*W]: q, k and v are interleaved per channel, not
    stored as blocks.  Logits are q.k / sqrt(C/heads), as in EDM (which scales
    k), and the result is returned as [B, C, H, W], in qkv's memory layout.

    Runs through ``scaled_dot_product_attention``; its fused kernels keep the
    softmax in float32 also for bf16/fp16 inputs, matching EDM's
    float32 ``AttentionOp``.  q, k and v are made contiguous (what the fused
    kernels need) by one copy in either memory layout.
    """
    batch, channels3, height, width = qkv.shape
    head_dim = channels3 // (3 * num_heads)
    channels_last = qkv.is_contiguous(memory_format=torch.channels_last) and not qkv.is_contiguous()
    if channels_last:  # memory [B, H, W, heads, c, 3] -> [3, B, heads, HW, c]
        qkv = qkv.permute(0, 2, 3, 1).reshape(batch, height * width, num_heads, head_dim, 3).permute(4, 0, 2, 1, 3)
    else:  # memory [B, heads, c, 3, HW] -> [3, B, heads, HW, c]
        qkv = qkv.reshape(batch, num_heads, head_dim, 3, height * width).permute(3, 0, 1, 4, 2)
    q, k, v = qkv.contiguous().unbind(0)
    out = F.scaled_dot_product_attention(q, k, v)  # default scale 1/sqrt(head_dim); [B, heads, HW, c]
    if channels_last:
        return out.transpose(1, 2).reshape(batch, height, width, num_heads * head_dim).permute(0, 3, 1, 2)
    # One head makes the reshape a transposed view; the convolutions after it want the standard layout.
    return out.transpose(-1, -2).reshape(batch, num_heads * head_dim, height, width).contiguous()


class UNetBlock(nn.Module):
    """Residual block with optional up/downsampling and self-attention (EDM's ``UNetBlock``).

    One class covers DDPM++, NCSN++ (``adaptive_scale=False``: the embedding is
    added before ``norm1``) and ADM (``adaptive_scale=True``: scale/shift
    modulation ``silu(shift + norm1(x) * (scale + 1))``).  The residual sum
    and the attention output are each multiplied by ``skip_scale``.

    ``init``, ``init_zero`` and ``init_attn`` are keyword dicts for the layers
    (``init_mode``, ``init_weight``, ``init_bias``): ``init_zero`` is used for
    ``conv1`` and ``proj``, the layers EDM initialises at or near zero.
    ``num_heads`` defaults to ``out_channels // channels_per_head``, so ADM
    blocks narrower than 64 channels get no attention even if asked for.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        up: bool = False,
        down: bool = False,
        attention: bool = False,
        num_heads: int | None = None,
        channels_per_head: int = 64,
        dropout: float = 0,
        skip_scale: float = 1,
        eps: float = 1e-5,
        resample_filter: Sequence[float] = (1, 1),
        resample_proj: bool = False,
        adaptive_scale: bool = True,
        init: dict | None = None,
        init_zero: dict | None = None,
        init_attn: dict | None = None,
    ):
        super().__init__()
        init = {} if init is None else init
        init_zero = dict(init_weight=0) if init_zero is None else init_zero
        init_attn = init if init_attn is None else init_attn
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.emb_channels = emb_channels
        if not attention:
            self.num_heads = 0
        else:
            self.num_heads = num_heads if num_heads is not None else out_channels // channels_per_head
        self.dropout = dropout
        self.skip_scale = skip_scale
        self.adaptive_scale = adaptive_scale

        # Creation order fixes both the RNG draws and the state_dict order of EDM.
        resample = dict(up=up, down=down, resample_filter=resample_filter)
        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, kernel=3, **resample, **init)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, kernel=3, **init_zero)

        self.skip = None
        if out_channels != in_channels or up or down:
            # A 1x1 projection unless the block only resamples (then kernel 0 = FIR only).
            kernel = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = Conv2d(in_channels, out_channels, kernel=kernel, **resample, **init)

        if self.num_heads:
            self.norm2 = GroupNorm(out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, kernel=1, **init_attn)
            self.proj = Conv2d(out_channels, out_channels, kernel=1, **init_zero)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        residual = x if self.skip is None else self.skip(x)
        x = self.conv0(F.silu(self.norm0(x)))

        params = self.affine(emb).to(x.dtype)[:, :, None, None]
        if self.adaptive_scale:
            scale, shift = params.chunk(2, dim=1)
            x = F.silu(torch.addcmul(shift, self.norm1(x), scale + 1))
        else:
            x = F.silu(self.norm1(x + params))

        x = self.conv1(F.dropout(x, p=self.dropout, training=self.training))
        x = self._rescale(x + residual)

        if self.num_heads:
            attn = self_attention(self.qkv(self.norm2(x)), self.num_heads)
            x = self._rescale(self.proj(attn) + x)
        return x

    def _rescale(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.skip_scale == 1 else x * self.skip_scale


class PositionalEmbedding(nn.Module):
    """Sinusoidal timestep embedding ``[cos(x w), sin(x w)]`` (DDPM++ and ADM).

    Frequencies ``w_i = max_positions ** (-i / (N/2 - endpoint))``.  ADM uses
    ``endpoint=False``; SongUNet uses ``endpoint=True`` and swaps the halves,
    reproducing score_sde's ``[sin, cos]`` embedding.  No parameters.
    """

    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = False):
        super().__init__()
        self.num_channels = num_channels
        self.max_positions = max_positions
        self.endpoint = endpoint

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = self.num_channels // 2
        exponents = torch.arange(half, dtype=torch.float32, device=x.device) / (half - (1 if self.endpoint else 0))
        freqs = (1 / self.max_positions) ** exponents
        angles = torch.outer(x, freqs.to(x.dtype))
        return torch.cat([angles.cos(), angles.sin()], dim=1)


class FourierEmbedding(nn.Module):
    """Random Fourier feature embedding ``[cos(2 pi x f), sin(2 pi x f)]`` (NCSN++).

    ``freqs`` ~ N(0, scale^2) is drawn at construction and stored as a
    persistent buffer (``map_noise.freqs`` in EDM checkpoints).
    """

    def __init__(self, num_channels: int, scale: float = 16):
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2).mul_(scale))  # in place: see weight_init

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        angles = torch.outer(x, (2 * math.pi * self.freqs).to(x.dtype))
        return torch.cat([angles.cos(), angles.sin()], dim=1)
