"""The built-in models, shipped in the package so that ``edm generate`` works right after installing, offline.

* :func:`default_model`: a class-conditional DDPM++ (EDM preconditioning, 1.03M parameters, 32x32 grayscale,
  10 classes) that ``edm train`` trained on the animal-mnist silhouettes (MIT licence; bear, bird, cat, cow, dog,
  elephant, giraffe, horse, sheep, zebra) on a 2-core CPU. Its recipe, one command, is tools/train_default_model.py;
  its measured quality is in docs/default_model.md. ``edm generate`` without ``--network`` samples it.
* :func:`ideal_model`: the exact (ideal) denoiser of 64 procedurally drawn 32x32 RGB images of 4 classes (disk,
  square, triangle, ring; tools/make_default_dataset.py). It needs no training and lands on its training images,
  which makes it a model with a known right answer for tests and benchmarks: ``edm generate --network ideal``.
"""

from __future__ import annotations

import json
from importlib import resources

import numpy as np
import torch
from PIL import Image
from torch import nn

from .ideal import IdealDenoiser

NAME = "built-in default model (DDPM++ trained on animal-mnist, 32x32, 10 classes)"
IDEAL_NAME = "ideal denoiser of 64 shapes (32x32, 4 classes)"
IDEAL = "ideal"  # the --network name of the ideal model
CLASSES = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")


def default_model() -> nn.Module:
    """The trained default model (a toolkit model file in the package, loaded as every model file is)."""
    from .loading import load_model

    with resources.as_file(resources.files("edm_toolkit.data").joinpath("default_model.pt")) as path:
        return load_model(path)


def ideal_dataset() -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """The ideal model's images in [-1, 1] as float64 [64, 3, 32, 32], their labels [64] and the class names."""
    files = resources.files("edm_toolkit.data")
    meta = json.loads(files.joinpath("default_images.json").read_text())
    with files.joinpath("default_images.png").open("rb") as f:
        sheet = np.asarray(Image.open(f).convert("RGB"))
    r, columns = meta["resolution"], meta["columns"]
    tiles = [sheet[(i // columns) * r:(i // columns + 1) * r, (i % columns) * r:(i % columns + 1) * r]
             for i in range(meta["count"])]
    images = torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2).to(torch.float64) / 127.5 - 1
    return images, torch.tensor(meta["labels"]), list(meta["classes"])


def ideal_model() -> IdealDenoiser:
    """The exact denoiser of the 64 images of :func:`ideal_dataset`, class-conditional (4 classes)."""
    images, labels, classes = ideal_dataset()
    return IdealDenoiser(images, labels, label_dim=len(classes))
