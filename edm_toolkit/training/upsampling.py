"""ADM's upsampling models (Dhariwal & Nichol 2021, Sec. 5 and App. C; improved-diffusion's super-resolution
model): the low-resolution conditioning of training, and the cascade of sampling.

Training (``edm train --arch guided --model-flags "--large_size 256 --small_size 64 ..."``): every training
image y is area-downsampled to the small size, as the original's ``super_res_train.py`` does
(``F.interpolate(large, small, mode="area")``, no noise augmentation), and bound to the denoiser as its
``low_res`` input (:class:`~edm_toolkit.protocol.BoundInputs`); the network upsamples it bilinearly and takes it
as extra input channels.

Sampling (a cascade): low-resolution samples, as the uint8 images a base model's ``edm generate`` wrote, are
the ``low_res`` of the upsampler, whose samples come from per-seed noise (:func:`upsample_batch`).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import EDMToolkitError
from ..protocol import BoundInputs

__all__ = ["area_downsample", "low_res_from_uint8", "upsample_batch"]


def area_downsample(images: torch.Tensor, size: int) -> torch.Tensor:
    """Images [N, C, H, W] -> [N, C, size, size] by area averaging (the original's ``mode="area"``)."""
    return F.interpolate(images, (size, size), mode="area")


def low_res_from_uint8(images, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 low-resolution images [N, C, h, w] (a tensor or array; or [N, h, w, C] arrays as read from PNG
    files, recognised by C in (1, 3) last) -> float32 [N, C, h, w] in [-1, 1], as the training data is scaled."""
    array = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(images))
    if array.dtype != torch.uint8 or array.ndim != 4:
        raise EDMToolkitError(f"low-resolution images must be uint8 [N, C, h, w], got {array.dtype} "
                              f"{list(array.shape)}")
    if array.shape[1] not in (1, 3) and array.shape[3] in (1, 3):
        array = array.permute(0, 3, 1, 2)
    return array.to(device, torch.float32) / 127.5 - 1


def upsample_batch(net, sampler, low_res_uint8, seeds: Sequence[int], device: torch.device | str = "cpu", *,
                   class_labels: torch.Tensor | None = None, class_idx: int | None = None,
                   callback: Callable | None = None) -> torch.Tensor:
    """High-resolution samples (float64 [N, C, H, W] in [-1, 1]) of the upsampler ``net`` conditioned on the
    low-resolution images ``low_res_uint8`` (uint8, one per seed, see :func:`low_res_from_uint8`).

    The noise of image i comes from its seed alone (:func:`~edm_toolkit.generate.sample_batch`), so an image
    depends on its seed and its low-resolution input, not on the batch. A class-conditional upsampler takes the
    classes of the low-resolution samples as one-hot ``class_labels`` [N, label_dim] (or one ``class_idx``;
    else drawn per seed).
    """
    from ..generate import check_class, sample_batch

    seeds = [int(s) for s in seeds]
    low_res = low_res_from_uint8(low_res_uint8, device)
    if len(low_res) != len(seeds):
        raise EDMToolkitError(f"{len(low_res)} low-resolution images for {len(seeds)} seeds; give one per seed")
    if low_res.shape[1] != net.img_channels:
        raise EDMToolkitError(f"the low-resolution images have {low_res.shape[1]} channels, the upsampler makes "
                              f"{net.img_channels}")
    if low_res.shape[-1] >= net.img_resolution:
        raise EDMToolkitError(f"the low-resolution images are {low_res.shape[-1]}x{low_res.shape[-2]}, not smaller "
                              f"than the upsampler's {net.img_resolution}x{net.img_resolution}")
    check_class(net, class_idx)
    if class_labels is not None:
        class_labels = torch.as_tensor(class_labels, dtype=torch.float32, device=device)
    return sample_batch(BoundInputs(net, low_res=low_res), sampler, seeds, device, class_idx, callback=callback,
                        class_labels=class_labels)
