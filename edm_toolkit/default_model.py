"""The built-in default model: the ideal denoiser of a small procedurally drawn image set.

64 RGB images of 32x32 (classes disk, square, triangle, ring; see tools/make_default_dataset.py), shipped in
the package (41 kB), so ``edm generate`` works right after installing, with no download. Being the exact
denoiser of its training set, it reproduces training images: a deterministic sampler lands on one of the 64.
"""

from __future__ import annotations

import json
from importlib import resources

import numpy as np
import torch
from PIL import Image

from .ideal import IdealDenoiser

NAME = "built-in default (ideal denoiser of 64 shapes, 32x32, 4 classes)"


def default_dataset() -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Images in [-1, 1] as float64 [64, 3, 32, 32], their labels [64] and the class names."""
    files = resources.files("edm_toolkit.data")
    meta = json.loads(files.joinpath("default_images.json").read_text())
    with files.joinpath("default_images.png").open("rb") as f:
        sheet = np.asarray(Image.open(f).convert("RGB"))
    r, columns = meta["resolution"], meta["columns"]
    tiles = [sheet[(i // columns) * r:(i // columns + 1) * r, (i % columns) * r:(i % columns + 1) * r]
             for i in range(meta["count"])]
    images = torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2).to(torch.float64) / 127.5 - 1
    return images, torch.tensor(meta["labels"]), list(meta["classes"])


def default_model() -> IdealDenoiser:
    images, labels, classes = default_dataset()
    return IdealDenoiser(images, labels, label_dim=len(classes))
