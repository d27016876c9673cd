"""Per-seed random streams (EDM generate.py): one generator per image, so an image depends only on its seed.

Each generator is seeded with ``seed % 2**32`` and, in EDM's order, draws the latent, then the class label,
then the churn noise of every step. Batch composition and process count therefore do not change any image.
"""

from __future__ import annotations

from typing import Sequence

import torch


class SeedGenerators:
    """A batch of independent generators, one per seed; draws are stacked along the batch dimension."""

    def __init__(self, seeds: Sequence[int], device: torch.device | str = "cpu"):
        self.seeds = [int(s) for s in seeds]
        self.generators = [torch.Generator(device).manual_seed(s % (1 << 32)) for s in self.seeds]

    def __len__(self) -> int:
        return len(self.generators)

    def _check(self, size) -> None:
        if size[0] != len(self.generators):
            raise ValueError(f"batch dimension {size[0]} does not match the {len(self.generators)} seeds")

    def randn(self, size: Sequence[int], **kwargs) -> torch.Tensor:
        self._check(size)
        return torch.stack([torch.randn(list(size[1:]), generator=g, **kwargs) for g in self.generators])

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        return self.randn(x.shape, dtype=x.dtype, layout=x.layout, device=x.device)

    def randint(self, high: int, size: Sequence[int], **kwargs) -> torch.Tensor:
        self._check(size)
        return torch.stack([torch.randint(high, list(size[1:]), generator=g, **kwargs) for g in self.generators])
