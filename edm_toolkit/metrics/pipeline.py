"""Images -> detector -> streaming statistics: the loop shared by ``edm fid`` and ADM's evaluator.

A batch is a uint8 tensor [n, 3, H, W] (images generated in memory) or a list of uint8 [3, H, W] arrays of
possibly different sizes (images read from files); either way the detector resizes every image to 299x299.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence, Union

import numpy as np
import torch

from ..distributed import ProcessGroup, rank_batches
from .image_files import ImageFolder
from .inception import FEATURE_DIM, SPATIAL_DIM, InceptionOutputs, InceptionV3
from .statistics import FeatureStatistics, FIDStatistics

__all__ = ["Activations", "accumulate", "embed_batch", "folder_batches", "folder_statistics"]

Batch = Union[torch.Tensor, Sequence[np.ndarray]]


@dataclass
class Activations:
    """What a pass over a set of images keeps: streaming statistics of the pool features, of the sFID spatial
    features where asked, and the pool features themselves where asked (precision/recall and IS need them)."""

    pool: FeatureStatistics
    spatial: FeatureStatistics | None = None
    features: torch.Tensor | None = None  # [N, 2048] float32 on the CPU


def embed_batch(detector: InceptionV3, batch: Batch, *, spatial: bool = False) -> InceptionOutputs:
    """The detector's outputs for one batch; images of different sizes are resized separately, then the
    network runs once on the whole batch (the order of the images is kept)."""
    if isinstance(batch, torch.Tensor):
        return detector.embed(batch, spatial=spatial)
    shapes = [image.shape for image in batch]
    if len(set(shapes)) == 1:
        return detector.embed(torch.from_numpy(np.stack(batch)), spatial=spatial)
    prepared = torch.cat([detector.prepare(torch.from_numpy(image[np.newaxis])) for image in batch])
    return detector.embed_prepared(prepared, spatial=spatial)


def accumulate(detector: InceptionV3, batches: Iterable[Batch], *, spatial: bool = False,
               keep_features: bool = False, progress: Callable[[int], None] | None = None) -> Activations:
    """Runs the detector over ``batches`` (read one ahead in a background thread) and accumulates float64
    statistics; memory is independent of the number of images unless ``keep_features``."""
    device = detector.layers.conv.weight.device
    result = Activations(FeatureStatistics(FEATURE_DIM, device),
                         FeatureStatistics(SPATIAL_DIM, device) if spatial else None)
    kept = []
    with torch.no_grad():
        for batch in _read_ahead(batches):
            outputs = embed_batch(detector, batch, spatial=spatial)
            result.pool.update(outputs.pool)
            if spatial:
                result.spatial.update(outputs.spatial)
            if keep_features:
                kept.append(outputs.pool.float().cpu())
            if progress is not None:
                progress(outputs.pool.shape[0])
    if keep_features:
        result.features = torch.cat(kept) if kept else torch.zeros(0, FEATURE_DIM)
    return result


def folder_batches(folder: ImageFolder, batches: Iterable[Sequence[int]]) -> Iterator[list[np.ndarray]]:
    """The images of ``folder`` batch by batch (lists of indices), one file at a time."""
    for indices in batches:
        yield [folder.read(int(index)) for index in indices]


def folder_statistics(detector: InceptionV3, folder: ImageFolder, indices: Sequence[int], *, batch_size: int = 64,
                      group: ProcessGroup = ProcessGroup(),
                      progress: Callable[[int], None] | None = None) -> FIDStatistics:
    """EDM fid.py's statistics of the images ``indices`` of ``folder``: the positions are cut into EDM's batches
    and rank r of a torchrun group takes batches r::world_size; the sums are added across ranks at the end."""
    positions = rank_batches(list(range(len(indices))), batch_size, group)
    batches = ([indices[p] for p in batch] for batch in positions if batch)
    activations = accumulate(detector, folder_batches(folder, batches), progress=progress)
    activations.pool.all_reduce(group)
    return activations.pool.fid_statistics()


def _read_ahead(batches: Iterable[Batch]) -> Iterator[Batch]:
    """Yields the batches while the next one is read in a background thread (file decoding overlaps compute)."""
    iterator = iter(batches)
    done = object()
    with ThreadPoolExecutor(max_workers=1) as reader:
        pending = reader.submit(next, iterator, done)
        while True:
            batch = pending.result()
            if batch is done:
                return
            pending = reader.submit(next, iterator, done)
            yield batch
