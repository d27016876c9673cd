"""Non-leaking geometric augmentation with augment labels (Karras et al. 2022; NVlabs/edm training/augment.py).

Each image is flipped, scaled, rotated, stretched and translated with probability ``p`` per transform, and the
network is told what was done through a 9-dim augment label; at sampling time the label is zero (the
preconditioner passes ``augment_labels=None``, which the backbones treat as zeros), so the augmentations do not
leak into the generated images. The label layout (``augment_dim = 9``):

    0 xflip (0/1)       1 yflip (0/1)       2 scale draw w_s, scale = 2^(scale_std w_s)
    3 cos(theta) - 1    4 sin(theta)        (theta: counter-clockwise rotation of the content on screen)
    5 w_a cos(r)        6 w_a sin(r)        (stretch 2^(aniso_std w_a) along (cos r, -sin r), 1/that across)
    7 w_x               8 w_y               (content shift w_x W translate_frac_std, w_y H translate_frac_std px)

The content is flipped, then scaled, rotated, stretched and translated, in this order. A disabled transform
(multiplier 0) keeps its columns at zero, so the layout never changes. As in EDM, labels 5 and 6 are the same for
(w_a, r) and (-w_a, r +- pi), which are inverse stretches: the labels alone do not always determine the
transform; ``AugmentTransforms`` keeps the transform itself.

The work is split in three steps, each usable alone:
``AugmentPipe.draw`` (every random number, in EDM's order) -> ``AugmentPipe.select`` (the gates with probability
p; the per-image ``AugmentTransforms``) -> ``AugmentPipe.apply`` (flips as exact pixel blits, then the geometric
resampling of ``resample_affine``). ``AugmentPipe.__call__`` runs the three.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..errors import ConfigError

AUGMENT_DIM = 9

# Daubechies' symlet 6 low-pass filter (12 taps, sum sqrt(2)), EDM's resampling filter.
SYM6 = (
    0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633,
    0.4910559419267466, 0.787641141030194, 0.3379294217276218, -0.07263752278646252,
    -0.021060292512300564, 0.04472490177066578, 0.0017677118642428036, -0.007800708325034148,
)
# Margin (input pixels) that the padding keeps around the sampled footprint: half the filter, doubled as in EDM.
_MARGIN = 2 * (len(SYM6) // 4)


@dataclass(frozen=True)
class AugmentDraws:
    """Every random tensor the pipe draws, in EDM's call order; ``None`` for a transform that is disabled (EDM
    draws nothing for it). ``*_gate_u`` are the uniforms compared with multiplier * p; each transform draws its
    value and its gate even when the gate fails, so the random stream does not depend on p."""

    batch: int
    device: torch.device | str = "cpu"
    xflip_w: torch.Tensor | None = None  # randint(2), [N]
    xflip_gate_u: torch.Tensor | None = None
    yflip_w: torch.Tensor | None = None
    yflip_gate_u: torch.Tensor | None = None
    scale_w: torch.Tensor | None = None  # N(0, 1)
    scale_gate_u: torch.Tensor | None = None
    rotate_u: torch.Tensor | None = None  # U(0, 1); theta = (2u - 1) pi rotate_frac_max
    rotate_gate_u: torch.Tensor | None = None
    aniso_w: torch.Tensor | None = None  # N(0, 1)
    aniso_r_u: torch.Tensor | None = None  # U(0, 1); r = (2u - 1) pi
    aniso_gate_u: torch.Tensor | None = None
    aniso_rotate_gate_u: torch.Tensor | None = None  # compared with aniso_rotate_prob, independent of p
    translate_w: torch.Tensor | None = None  # N(0, 1), [2, N] (x, y)
    translate_gate_u: torch.Tensor | None = None  # one gate for both axes, [1, N]


@dataclass(frozen=True)
class AugmentTransforms:
    """The transforms actually applied to each image (the gated draws; 0 where a gate failed), all [N]."""

    xflip: torch.Tensor  # int64 0/1: mirrored left-right
    yflip: torch.Tensor  # int64 0/1: mirrored top-bottom
    scale_w: torch.Tensor
    rotate_theta: torch.Tensor
    aniso_w: torch.Tensor
    aniso_r: torch.Tensor
    translate_wx: torch.Tensor
    translate_wy: torch.Tensor

    def labels(self) -> torch.Tensor:
        """The augment labels [N, 9], float32, computed from the float32 draws exactly as EDM does."""
        theta, w_a, r = self.rotate_theta, self.aniso_w, self.aniso_r
        columns = [
            self.xflip, self.yflip, self.scale_w, theta.cos() - 1, theta.sin(), w_a * r.cos(), w_a * r.sin(),
            self.translate_wx, self.translate_wy,
        ]
        return torch.stack([c.to(torch.float32) for c in columns], dim=1)

    def geometric(self) -> torch.Tensor:
        """bool [N]: images that need resampling (a non-zero scale, rotation, stretch or translation)."""
        # The axis angle r alone changes nothing: the stretch is the identity when w_a = 0.
        parameters = (self.scale_w, self.rotate_theta, self.aniso_w, self.translate_wx, self.translate_wy)
        return torch.stack([x != 0 for x in parameters]).any(dim=0)


@dataclass(frozen=True)
class AugmentPipe:
    """EDM's AugmentPipe restricted to the transforms EDM's train.py uses (integer blits and colour transforms
    are not offered). Each multiplier scales ``p`` into that transform's probability; ``xflip = 1e8`` turns the
    x-flip gate on for any p > 1e-8, so every image is mirrored with probability 1/2 and always labelled.
    ``AugmentPipe.edm_train(p)`` is train.py's ``--augment p`` setting."""

    p: float = 0.12  # overall probability multiplier
    xflip: float = 0  # probability multipliers of the transforms
    yflip: float = 0
    scale: float = 0
    rotate_frac: float = 0
    aniso: float = 0
    translate_frac: float = 0
    scale_std: float = 0.2  # log2 standard deviation of the isotropic scale
    rotate_frac_max: float = 1  # rotation range, 1 = full circle
    aniso_std: float = 0.2  # log2 standard deviation of the anisotropic stretch
    aniso_rotate_prob: float = 0.5  # probability that the stretch axis is rotated (independent of p)
    translate_frac_std: float = 0.125  # translation standard deviation, relative to the image size

    augment_dim: ClassVar[int] = AUGMENT_DIM

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ConfigError(f"augmentation option {f.name} must be a finite number >= 0, got {value!r}")
            object.__setattr__(self, f.name, float(value))
        if self.p > 1 or self.aniso_rotate_prob > 1:
            raise ConfigError(f"augmentation probabilities p and aniso_rotate_prob must lie in [0, 1], "
                              f"got {self.p} and {self.aniso_rotate_prob}")

    @classmethod
    def edm_train(cls, p: float = 0.12) -> "AugmentPipe":
        """EDM train.py's pipe for ``--augment p``: xflip 1e8, yflip, scale, rotate_frac, aniso, translate_frac 1."""
        return cls(p=p, xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None):
        """Augments a batch [N, C, H, W] (float, in [-1, 1]); returns (images, augment_labels [N, 9]).

        Draws from ``generator`` (on the images' device), or from the global RNG when None, in EDM's order, so
        ``torch.manual_seed(s)`` followed by this call reproduces EDM's AugmentPipe.
        """
        transforms = self.select(self.draw(images.shape[0], generator=generator, device=images.device))
        return self.apply(images, transforms), transforms.labels()

    def draw(self, batch: int, generator: torch.Generator | None = None, device="cpu") -> AugmentDraws:
        """Every random number of one call, in EDM's order: per enabled transform its value(s), then its gate."""
        def rand(*shape):
            return torch.rand(shape, generator=generator, device=device)

        def randn(*shape):
            return torch.randn(shape, generator=generator, device=device)

        def flip():
            return torch.randint(2, [batch], generator=generator, device=device), rand(batch)

        draws = {}
        if self.xflip > 0:
            draws["xflip_w"], draws["xflip_gate_u"] = flip()
        if self.yflip > 0:
            draws["yflip_w"], draws["yflip_gate_u"] = flip()
        if self.scale > 0:
            draws["scale_w"], draws["scale_gate_u"] = randn(batch), rand(batch)
        if self.rotate_frac > 0:
            draws["rotate_u"], draws["rotate_gate_u"] = rand(batch), rand(batch)
        if self.aniso > 0:
            draws["aniso_w"], draws["aniso_r_u"] = randn(batch), rand(batch)
            draws["aniso_gate_u"], draws["aniso_rotate_gate_u"] = rand(batch), rand(batch)
        if self.translate_frac > 0:
            draws["translate_w"], draws["translate_gate_u"] = randn(2, batch), rand(1, batch)
        return AugmentDraws(batch, device, **draws)

    def select(self, draws: AugmentDraws) -> AugmentTransforms:
        """Gates the draws: a transform is applied where its gate uniform is < multiplier * p (EDM's arithmetic,
        float32), else its value is 0. A disabled transform (no draws) is 0 for every image."""
        batch, device = draws.batch, draws.device

        def gated(value, gate_u, threshold):
            if value is None:
                return torch.zeros([batch], device=device)
            return torch.where(gate_u < threshold, value, torch.zeros_like(value))

        def flip(w, gate_u, multiplier):
            if w is None:
                return torch.zeros([batch], dtype=torch.int64, device=device)
            return gated(w.reshape(batch), gate_u.reshape(batch), multiplier * self.p)

        theta = None if draws.rotate_u is None else (draws.rotate_u * 2 - 1) * (math.pi * self.rotate_frac_max)
        aniso_r = None if draws.aniso_r_u is None else (draws.aniso_r_u * 2 - 1) * math.pi
        translate_w = torch.zeros([2, batch], device=device) if draws.translate_w is None else gated(
            draws.translate_w, draws.translate_gate_u.reshape(1, batch), self.translate_frac * self.p)
        return AugmentTransforms(
            xflip=flip(draws.xflip_w, draws.xflip_gate_u, self.xflip),
            yflip=flip(draws.yflip_w, draws.yflip_gate_u, self.yflip),
            scale_w=gated(draws.scale_w, draws.scale_gate_u, self.scale * self.p),
            rotate_theta=gated(theta, draws.rotate_gate_u, self.rotate_frac * self.p),
            aniso_w=gated(draws.aniso_w, draws.aniso_gate_u, self.aniso * self.p),
            aniso_r=gated(aniso_r, draws.aniso_rotate_gate_u, self.aniso_rotate_prob),
            translate_wx=translate_w[0],
            translate_wy=translate_w[1],
        )

    def pixel_matrix(self, transforms: AugmentTransforms, height: int, width: int) -> torch.Tensor:
        """float64 [N, 3, 3]: maps an output pixel (x, y, 1) (x the column, y the row pointing down, pixel centres
        at integers) to the point it samples in the flipped input. About the centre c it is
        S(1/s) R(theta) R(-r) S(1/a, a) R(r) T(-t), R(phi) = [[cos, -sin], [sin, cos]], s = 2^(scale_std w_s),
        a = 2^(aniso_std w_a), t = (w_x W, w_y H) translate_frac_std (EDM's G_inv)."""
        def f64(x):
            return x.to(torch.float64)

        s = torch.exp2(f64(transforms.scale_w) * self.scale_std)
        a = torch.exp2(f64(transforms.aniso_w) * self.aniso_std)
        theta, r = f64(transforms.rotate_theta), f64(transforms.aniso_r)
        tx = f64(transforms.translate_wx) * (width * self.translate_frac_std)
        ty = f64(transforms.translate_wy) * (height * self.translate_frac_std)
        one, zero = torch.ones_like(s), torch.zeros_like(s)
        cx, cy = (width - 1) / 2, (height - 1) / 2

        def affine(a11, a12, a13, a21, a22, a23):
            rows = [torch.stack(row, dim=-1) for row in ((a11, a12, a13), (a21, a22, a23), (zero, zero, one))]
            return torch.stack(rows, dim=-2)

        def rotation(phi):
            return affine(phi.cos(), -phi.sin(), zero, phi.sin(), phi.cos(), zero)

        def scaling(sx, sy):
            return affine(sx, zero, zero, zero, sy, zero)

        def translation(tx, ty):
            return affine(one, zero, tx, zero, one, ty)

        centred = scaling(1 / s, 1 / s) @ rotation(theta) @ rotation(-r) @ scaling(1 / a, a) @ rotation(r)
        centred = centred @ translation(-tx, -ty)
        return translation(one * cx, one * cy) @ centred @ translation(-one * cx, -one * cy)

    def apply(self, images: torch.Tensor, transforms: AugmentTransforms) -> torch.Tensor:
        """Applies given per-image transforms: the flips as exact pixel blits, then ``resample_affine`` on the
        images with a geometric transform. Images without one come back exactly (after their flips), not
        through the resampler; the result may be ``images`` itself when nothing applies."""
        if images.dim() != 4 or not images.is_floating_point():
            raise ConfigError(f"augmentation needs float images shaped [N, C, H, W], got {images.dtype} "
                              f"{list(images.shape)}")
        xflip, yflip = (t.to(images.device).reshape(-1, 1, 1, 1) == 1 for t in (transforms.xflip, transforms.yflip))
        if bool(xflip.any()):
            images = torch.where(xflip, images.flip(3), images)
        if bool(yflip.any()):
            images = torch.where(yflip, images.flip(2), images)
        index = transforms.geometric().nonzero().flatten().to(images.device)
        if index.numel() == 0:
            return images
        matrix = self.pixel_matrix(transforms, images.shape[2], images.shape[3]).to(images.device)[index]
        return images.index_copy(0, index, resample_affine(images[index], matrix))


def reflect_padding(pixel_matrix: torch.Tensor, height: int, width: int) -> tuple[int, int, int, int]:
    """(left, right, top, bottom): the reflect padding that keeps a margin of 6 input pixels around where any
    image's output corners land, clamped to the image size minus one (EDM's rule, over the whole batch)."""
    corners = torch.tensor([[0, width - 1, width - 1, 0], [0, 0, height - 1, height - 1], [1, 1, 1, 1]],
                           dtype=torch.float64, device=pixel_matrix.device)
    x, y = (pixel_matrix.to(torch.float64) @ corners)[:, :2].unbind(1)
    margins = torch.stack([_MARGIN - x.min(), x.max() - (width - 1) + _MARGIN,
                           _MARGIN - y.min(), y.max() - (height - 1) + _MARGIN])
    limits = torch.tensor([width - 1, width - 1, height - 1, height - 1], dtype=torch.float64, device=margins.device)
    return tuple(int(m) for m in torch.minimum(margins.clamp(min=0), limits).ceil().tolist())


def resample_affine(images: torch.Tensor, pixel_matrix: torch.Tensor) -> torch.Tensor:
    """Resamples each image [N, C, H, W] at the points given by its output->input ``pixel_matrix`` [N, 3, 3]
    (see ``AugmentPipe.pixel_matrix``), as EDM does: reflect padding (``reflect_padding``), 2x upsampling with
    sym6, bilinear sampling (zeros outside) of a 2x-resolution output with a 3-pixel border, then sym6 filtering
    and 2x decimation. The filters run as matrix products per axis; one grid_sample for the whole batch."""
    N, C, H, W = images.shape
    left, right, top, bottom = reflect_padding(pixel_matrix, H, W)
    h = torch.tensor(SYM6, dtype=images.dtype, device=images.device)
    x = F.pad(images, [left, right, top, bottom], mode="reflect")
    pad_h, pad_w = x.shape[2], x.shape[3]
    # Upsampling (zero-stuffing, then h): U[j] = sum_i h[j + 5 - 2i] P[i] along each axis.
    up = len(SYM6) // 2 - 1
    x = _filter_matrix(2 * pad_h, pad_h, up, 2, h) @ (x @ _filter_matrix(2 * pad_w, pad_w, up, 2, h).T)
    up_h, up_w = x.shape[2], x.shape[3]

    # The intermediate O (index j per axis) covers output pixels j/2 - 2.5, i.e. EDM's 2x grid with a 3-pixel
    # border minus its first and last sample, which the decimation below never reads.
    out_h, out_w = 2 * H + 2 * _MARGIN - 2, 2 * W + 2 * _MARGIN - 2
    half_border = _MARGIN / 2 - 0.5

    def translate(tx, ty):
        return torch.tensor([[1, 0, tx], [0, 1, ty], [0, 0, 1]], dtype=torch.float64, device=pixel_matrix.device)

    def scale(sx, sy):
        return torch.tensor([[sx, 0, 0], [0, sy, 0], [0, 0, 1]], dtype=torch.float64, device=pixel_matrix.device)

    # O index (i, j) -> output pixel -> input pixel (pixel_matrix) -> index into U (u = 2 (x + left))
    # -> grid_sample's normalised input coordinate (align_corners=False); affine in (i, j).
    to_output = translate(-half_border, -half_border) @ scale(0.5, 0.5)
    to_up = scale(2, 2) @ translate(left, top)
    to_grid = translate(-1, -1) @ scale(2 / up_w, 2 / up_h) @ translate(0.5, 0.5)
    theta = (to_grid @ to_up @ pixel_matrix.to(torch.float64) @ to_output)[:, :2, :, None, None]
    i = torch.arange(out_w, dtype=torch.float64, device=images.device)
    j = torch.arange(out_h, dtype=torch.float64, device=images.device)[:, None]
    grid = theta[:, :, 0] * i + theta[:, :, 1] * j + theta[:, :, 2]  # float64: sub-1e-7 pixel positions
    grid = grid.to(images.dtype).permute(0, 2, 3, 1)  # [N, out_h, out_w, (x, y)]
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    # Decimation (h, then every second sample): out[k] = sum_t h[t] O[2k + t] along each axis.
    return _filter_matrix(out_h, H, 0, 2, h).T @ x @ _filter_matrix(out_w, W, 0, 2, h)



def _filter_matrix(outputs: int, inputs: int, offset: int, step: int, h: torch.Tensor) -> torch.Tensor:
    """[outputs, inputs] matrix A with A[j, i] = h[offset + j - step i] (zero outside the 12 taps): the 1-D
    filtering of one image axis as a matrix product, which on CPU beats a 1-channel convolution by far."""
    q = offset + torch.arange(outputs, device=h.device)[:, None] - step * torch.arange(inputs, device=h.device)
    return torch.where((q >= 0) & (q < len(h)), h[q.clamp(0, len(h) - 1)], torch.zeros((), dtype=h.dtype,
                                                                                       device=h.device))
