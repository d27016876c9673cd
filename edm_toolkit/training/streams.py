"""Random streams of training, keyed by the global sample position, not by process, batch split or history.

Training image number p (p = 0, 1, 2, ...; p = nimg + i for sample i of the batch that starts at nimg) gets

- its dataset item from a per-epoch permutation: item perm_e[p mod N] with e = p div N, perm_e drawn from
  (seed, e) -- every epoch visits every item once;
- its own generator, seeded from (seed, p), that draws in this order: the loss's noise-level variates (sigma
  ~ p_train itself for EDM's losses; a uniform number that the iddpm-* losses map to a step through their schedule
  sampler's p_t at step time), the label dropout coin, the augmentation, the noise n.

Everything a training step draws is therefore a function of (seed, p): the result does not depend on the
number of processes, on gradient accumulation, on data-loader workers, or on where a run was resumed, and a
resumed run needs no saved generator state, only the image count (and the state of a stateful loss, which the
training state holds). The one exception is dropout inside the
network, which draws from torch's global generator; it is reseeded per micro-batch from (seed, first p of the
micro-batch), so it is reproducible on resume but depends on how the batch is split.
"""

from __future__ import annotations

import torch

_MASK64 = (1 << 64) - 1

# Domain tags: distinct streams for distinct purposes.
_DATA_ORDER = 0x0D
_SAMPLE = 0x5A
_DROPOUT = 0xD0
_INIT = 0x1A


def _splitmix64(x: int) -> int:
    """SplitMix64's finaliser: a bijective mixing of 64-bit integers (Steele, Lea and Flood 2014)."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def derive_seed(*values: int) -> int:
    """A 63-bit seed from a tuple of non-negative integers (order matters), for torch.Generator.manual_seed."""
    h = 0
    for v in values:
        h = _splitmix64(h ^ (int(v) & _MASK64))
    return h >> 1


class TrainingStreams:
    """The random streams of one training run with ``seed`` over a dataset of ``num_items`` items."""

    def __init__(self, seed: int, num_items: int):
        if num_items < 1:
            raise ValueError("the dataset is empty")
        self.seed = int(seed)
        self.num_items = int(num_items)
        self._cached: tuple[int, torch.Tensor] | None = None  # (epoch, permutation): positions come in order

    def init_seed(self) -> int:
        """Seed of the network's random initialisation (the same on every process)."""
        return derive_seed(self.seed, _INIT)

    def _permutation(self, epoch: int) -> torch.Tensor:
        if self._cached is None or self._cached[0] != epoch:
            generator = torch.Generator().manual_seed(derive_seed(self.seed, _DATA_ORDER, epoch))
            self._cached = (epoch, torch.randperm(self.num_items, generator=generator))
        return self._cached[1]

    def item(self, position: int) -> int:
        """The dataset item that training image number ``position`` shows."""
        epoch, offset = divmod(int(position), self.num_items)
        return int(self._permutation(epoch)[offset])

    def sample_generator(self, position: int) -> torch.Generator:
        """The generator of every per-sample draw of training image number ``position`` (CPU, so CPU and GPU
        runs draw the same sigma and noise)."""
        return torch.Generator().manual_seed(derive_seed(self.seed, _SAMPLE, int(position)))

    def dropout_seed(self, first_position: int) -> int:
        """Seed of the global generator for the micro-batch starting at ``first_position`` (network dropout)."""
        return derive_seed(self.seed, _DROPOUT, int(first_position))
