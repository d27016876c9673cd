"""Turning samples into PNG files: EDM's uint8 conversion, atomic writes and grids."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from .outputs import write_atomically


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[N, C, H, W] in [-1, 1] -> uint8 [N, H, W, C], as EDM's generate.py: (x 127.5 + 128).clip(0, 255)."""
    return (images * 127.5 + 128).clip(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def save_png(image: np.ndarray, path: str | Path) -> None:
    """Writes one HWC uint8 image ('L' for one channel, else 'RGB') atomically, with the permissions the umask
    gives (:func:`edm_toolkit.outputs.write_atomically`): a reader or an interrupted run never sees a truncated
    file."""
    picture = Image.fromarray(image[:, :, 0], "L") if image.shape[2] == 1 else Image.fromarray(image, "RGB")
    write_atomically(path, lambda f: picture.save(f, format="PNG"))


def image_path(outdir: str | Path, seed: int, subdirs: bool = False) -> Path:
    """EDM's layout: outdir/{seed:06d}.png, or outdir/{seed - seed % 1000:06d}/{seed:06d}.png with subdirs."""
    outdir = Path(outdir)
    return (outdir / f"{seed - seed % 1000:06d}" if subdirs else outdir) / f"{seed:06d}.png"


def make_grid(images: Sequence[np.ndarray], columns: int | None = None) -> np.ndarray:
    """Tiles equally sized HWC images into one image, row-major, in a near-square layout."""
    if not images:
        raise ValueError("no images to put in a grid")
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    h, w, c = images[0].shape
    grid = np.zeros((rows * h, columns * w, c), dtype=np.uint8)
    for index, image in enumerate(images):
        r, q = divmod(index, columns)
        grid[r * h:(r + 1) * h, q * w:(q + 1) * w] = image
    return grid
