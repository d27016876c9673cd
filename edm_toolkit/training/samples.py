"""The training inputs of each image position: image, label, noise-level variates, augmentation and noise, drawn
per sample.

``TrainingSamples`` is a map-style torch dataset whose keys are global image positions (see streams.py); the
data loader's workers therefore do the per-sample drawing in parallel with the training step.
``PositionBatches`` yields the positions of one process's micro-batches, step after step, from a start count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Protocol

import numpy as np
import torch

from ..losses import TrainingLoss
from .streams import TrainingStreams


class ImageSource(Protocol):
    """What the loop needs from a dataset (edm_toolkit.training.dataset.ImageDataset has it): uint8 [C, H, W]
    images and float32 [label_dim] labels (one-hot, or empty when unlabelled)."""

    name: str
    resolution: int
    num_channels: int
    label_dim: int
    has_labels: bool

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]: ...


class AugmentPipeline(Protocol):
    """Augmentation with augment labels (edm_toolkit.training.augment.AugmentPipe)."""

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass
class TrainingSamples(torch.utils.data.Dataset):
    """Position p -> (y, labels, variates, noise, augment_labels), CPU tensors:

    y = image / 127.5 - 1 (EDM's scaling of uint8 data), augmented if a pipeline is given; labels (empty unless
    ``use_labels``) zeroed with probability ``label_dropout`` (classifier-free guidance: the unconditional model
    sees all-zero labels); variates: the loss's random draw of the noise level (``draw_variates``, shaped
    [1, 1, 1]: sigma ~ p_train itself for EDM's losses), which the loop turns into sigma with the loss's state at
    step time (``noise_levels``); noise ~ N(0, I) like y (not yet multiplied by sigma); augment_labels [9], or an
    empty tensor without augmentation. All float32 but the variates, in the loss's dtype.
    """

    source: ImageSource
    streams: TrainingStreams
    loss: TrainingLoss
    use_labels: bool = True
    label_dropout: float = 0.0
    augment_pipe: AugmentPipeline | None = None

    def __getitem__(self, position: int):
        image, labels = self.source[self.streams.item(position)]
        generator = self.streams.sample_generator(position)
        variates = self.loss.draw_variates(1, generator).reshape(1, 1, 1)
        keep = torch.rand([], generator=generator) >= self.label_dropout
        y = torch.from_numpy(np.asarray(image, dtype=np.float32)) / 127.5 - 1
        labels = torch.from_numpy(np.asarray(labels, dtype=np.float32)) * keep if self.use_labels else torch.zeros([0])
        augment_labels = torch.zeros([0])
        if self.augment_pipe is not None:
            y, augment_labels = self.augment_pipe(y[None], generator=generator)
            y, augment_labels = y[0], augment_labels[0].to(torch.float32)
        noise = torch.randn(y.shape, generator=generator)
        return y, labels, variates, noise, augment_labels


class PositionBatches:
    """The image positions of one process's micro-batches: for each step (from ``start_nimg`` on, ``batch``
    images per step), process ``rank`` of ``world_size`` takes the contiguous slice of batch/world_size
    positions at rank * batch/world_size and cuts it into micro-batches of ``batch_gpu``."""

    def __init__(self, start_nimg: int, batch: int, batch_gpu: int, rank: int = 0, world_size: int = 1):
        per_rank = batch // world_size
        if per_rank * world_size != batch or per_rank % batch_gpu:
            raise ValueError("batch must be divisible by world_size * batch_gpu")
        self.start_nimg, self.batch, self.batch_gpu = int(start_nimg), int(batch), int(batch_gpu)
        self.first = rank * per_rank
        self.rounds = per_rank // batch_gpu

    def __iter__(self) -> Iterator[list[int]]:
        nimg = self.start_nimg
        while True:
            for r in range(self.rounds):
                start = nimg + self.first + r * self.batch_gpu
                yield list(range(start, start + self.batch_gpu))
            nimg += self.batch
