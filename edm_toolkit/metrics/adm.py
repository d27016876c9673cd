"""ADM's evaluator suite (guided-diffusion ``evaluations/evaluator.py``) on the toolkit's detector.

- Inception Score: softmax of ``pool @ W`` (the 1008-way output layer without bias), split into parts of 5000
  (10 splits for 50k samples), exp(mean KL(p(y|x) || p(y))) per split, averaged.
- FID on pool_3 and sFID on ``mixed_6/conv[..., :7]`` (2023 values): the Frechet distance of their statistics.
- Improved precision and recall (Kynkaanniemi et al. 2019, k = 3): the manifold of a set is the union of balls
  around its points, each with the radius of its k-th nearest neighbour (the point itself counted as the 0th);
  precision = fraction of samples inside the reference manifold, recall = fraction of references inside the
  sample manifold. Distances are squared Euclidean, computed blockwise (ADM's blocks are 10000 and it computes
  them in float16 where finite; here float32 for CPU speed and float64 on request).
- Batches: ``.npz`` files whose ``arr_0`` is uint8 NHWC; reference batches also hold ``mu``, ``sigma`` (pool) and
  ``mu_s``, ``sigma_s`` (spatial), which ADM uses instead of recomputing. ``arr_0`` is read and written
  streaming, a batch at a time.
"""

from __future__ import annotations

import contextlib
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple

import numpy as np
import torch

from ..errors import EDMToolkitError
from ..io.outputs import write_atomically
from .inception import InceptionV3
from .pipeline import Activations
from .statistics import FIDStatistics

__all__ = ["ADMMetrics", "InceptionScore", "SampleBatch", "evaluate", "inception_score", "manifold_radii",
           "precision_recall", "write_sample_batch"]

Statistics = tuple[FIDStatistics, FIDStatistics]  # (pool, spatial)
IS_SPLIT_SIZE = 5000  # ADM's compute_inception_score(split_size=5000)
NEIGHBOURHOOD = 3  # ADM's ManifoldEstimator(nhood_sizes=(3,))
BLOCK_SIZE = 10000  # ADM's row/column batch size
STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")


class InceptionScore(NamedTuple):
    """``mean`` is what ADM reports; ``std`` and the per-split ``scores`` are given too."""

    mean: float
    std: float
    scores: tuple[float, ...]


def inception_score(logits: torch.Tensor, split_size: int = IS_SPLIT_SIZE) -> InceptionScore:
    """IS from logits [N, classes]: for each consecutive part of ``split_size`` rows, p = softmax(logits),
    exp(mean_i sum_j p_ij (log p_ij - log mean_i p_ij)); computed in float64 with log-softmax (ADM takes the
    log of float32 probabilities)."""
    logits = torch.as_tensor(logits).to(torch.float64)
    if logits.ndim != 2 or logits.shape[0] == 0:
        raise EDMToolkitError(f"logits of shape {list(logits.shape)}, expected [N, classes] with N >= 1")
    scores = []
    for part in logits.split(split_size):
        log_p = torch.log_softmax(part, dim=1)
        log_marginal = torch.logsumexp(log_p, dim=0) - np.log(part.shape[0])
        kl = (log_p.exp() * (log_p - log_marginal)).sum(1).mean()
        scores.append(float(kl.exp()))
    return InceptionScore(float(np.mean(scores)), float(np.std(scores)), tuple(scores))


def _squared_distances(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """max(|u|^2 - 2 u.v + |v|^2, 0) for every pair of rows, ADM's distance block."""
    return (u.square().sum(1, keepdim=True) - 2 * u @ v.T + v.square().sum(1)[None]).clamp_(min=0)


def manifold_radii(features: torch.Tensor, k: int = NEIGHBOURHOOD, block_size: int = BLOCK_SIZE,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Squared distance of each row to its k-th nearest row, the row itself being the 0th (ADM's radii).
    Memory is O(block_size^2); the result does not depend on the block size."""
    features = features.to(dtype)
    if features.shape[0] <= k:
        raise EDMToolkitError(f"{features.shape[0]} feature vectors: the k = {k} nearest neighbours need more")
    radii = []
    for rows in features.split(block_size):
        nearest = torch.full((rows.shape[0], 0), float("inf"), dtype=dtype, device=features.device)
        for cols in features.split(block_size):
            candidates = torch.cat([nearest, _squared_distances(rows, cols)], dim=1)
            nearest = candidates.topk(min(k + 1, candidates.shape[1]), dim=1, largest=False).values
        radii.append(nearest[:, k])
    return torch.cat(radii)


def precision_recall(reference: torch.Tensor, samples: torch.Tensor, k: int = NEIGHBOURHOOD,
                     block_size: int = BLOCK_SIZE, dtype: torch.dtype = torch.float32) -> tuple[float, float]:
    """(precision, recall) of ``samples`` against ``reference`` feature sets (ADM's compute_prec_recall)."""
    reference, samples = reference.to(dtype), samples.to(dtype)
    radii_ref = manifold_radii(reference, k, block_size, dtype)
    radii_samples = manifold_radii(samples, k, block_size, dtype)
    sample_inside = torch.zeros(samples.shape[0], dtype=torch.bool, device=samples.device)
    reference_inside = torch.zeros(reference.shape[0], dtype=torch.bool, device=reference.device)
    for i, ref_block in zip(range(0, reference.shape[0], block_size), reference.split(block_size)):
        for j, sample_block in zip(range(0, samples.shape[0], block_size), samples.split(block_size)):
            d = _squared_distances(ref_block, sample_block)
            reference_inside[i:i + len(ref_block)] |= (d <= radii_samples[j:j + len(sample_block)][None]).any(1)
            sample_inside[j:j + len(sample_block)] |= (d <= radii_ref[i:i + len(ref_block), None]).any(0)
    return float(sample_inside.double().mean()), float(reference_inside.double().mean())


@dataclass(frozen=True)
class ADMMetrics:
    """The five numbers of ADM's evaluator."""

    inception_score: float
    fid: float
    sfid: float
    precision: float
    recall: float

    def report(self) -> str:
        """The evaluator's own output lines."""
        return (f"Inception Score: {self.inception_score}\nFID: {self.fid}\nsFID: {self.sfid}\n"
                f"Precision: {self.precision}\nRecall: {self.recall}")


def evaluate(detector: InceptionV3, reference: Activations, samples: Activations,
             reference_statistics: tuple[FIDStatistics, FIDStatistics] | None = None,
             block_size: int = BLOCK_SIZE) -> ADMMetrics:
    """ADM's evaluation of samples against a reference batch, from activations that kept the pool features and
    the spatial statistics (``pipeline.accumulate(..., spatial=True, keep_features=True)``). Stored reference
    statistics (mu, sigma, mu_s, sigma_s of a reference batch) are used instead of recomputing, as ADM does."""
    for name, activations in (("reference", reference), ("samples", samples)):
        if activations.features is None or activations.spatial is None:
            raise EDMToolkitError(f"the {name} activations lack the pool features or the spatial statistics")
    pool_ref, spatial_ref = reference_statistics or (reference.pool.fid_statistics(),
                                                     reference.spatial.fid_statistics())
    device = detector.layers.conv.weight.device
    with torch.no_grad():
        logits = torch.cat([detector.logits(part.to(device)).cpu() for part in samples.features.split(block_size)])
    precision, recall = precision_recall(reference.features.to(device), samples.features.to(device),
                                         block_size=block_size)
    return ADMMetrics(
        inception_score=inception_score(logits).mean,
        fid=samples.pool.fid_statistics().frechet_distance(pool_ref),
        sfid=samples.spatial.fid_statistics().frechet_distance(spatial_ref),
        precision=precision,
        recall=recall,
    )


# ----------------------------------------------------------------------------------------------------------
# ADM's .npz sample and reference batches


@dataclass(frozen=True)
class SampleBatch:
    """An ADM batch file: ``arr_0`` uint8 [N, H, W, C] (C = 3, or 1 for grayscale), maybe with statistics."""

    path: Path
    shape: tuple[int, ...]
    keys: tuple[str, ...]

    @classmethod
    def open(cls, path: str | os.PathLike) -> "SampleBatch":
        path = Path(path)
        with _arr_0(path) as (_stream, shape, keys):
            return cls(path, shape, keys)

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def has_statistics(self) -> bool:
        return all(key in self.keys for key in STAT_KEYS)

    def statistics(self) -> tuple[FIDStatistics, FIDStatistics]:
        """The stored (pool, spatial) statistics of a reference batch."""
        return FIDStatistics.load(self.path, "mu", "sigma"), FIDStatistics.load(self.path, "mu_s", "sigma_s")

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        """uint8 NCHW tensors of up to ``batch_size`` images, read from the file one batch at a time."""
        with _arr_0(self.path) as (stream, shape, _keys):
            n, h, w, c = shape
            for start in range(0, n, batch_size):
                count = min(batch_size, n - start)
                data = stream.read(count * h * w * c)
                if len(data) != count * h * w * c:
                    raise EDMToolkitError(f"{self.path}: arr_0 ends after {start} of {n} images (truncated file)")
                yield torch.from_numpy(np.frombuffer(data, np.uint8).reshape(count, h, w, c).copy()).permute(0, 3, 1, 2)


@contextlib.contextmanager
def _arr_0(path: Path):
    """(stream positioned at arr_0's data, shape, keys) of an ADM batch, after checking its header."""
    if not path.is_file():
        raise EDMToolkitError(f"batch file {str(path)!r} not found")
    try:
        with zipfile.ZipFile(path) as archive:
            keys = tuple(name[:-4] for name in archive.namelist() if name.endswith(".npy"))
            if "arr_0" not in keys:
                raise EDMToolkitError(f"{path} has no arr_0 (keys: {', '.join(keys) or 'none'}); ADM batches "
                                      "hold the images as arr_0, uint8 [N, H, W, 3]")
            with archive.open("arr_0.npy") as stream:
                version = np.lib.format.read_magic(stream)
                if version not in ((1, 0), (2, 0)):
                    raise EDMToolkitError(f"{path}: arr_0 has npy format version {version}")
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, fortran_order, dtype = read_header(stream)
                if dtype != np.uint8 or len(shape) != 4 or shape[3] not in (1, 3) or fortran_order:
                    raise EDMToolkitError(f"{path}: arr_0 is {dtype} {list(shape)}{' (Fortran order)' * fortran_order},"
                                          " expected C-ordered uint8 [N, H, W, 3]")
                yield stream, tuple(int(n) for n in shape), keys
    except EDMToolkitError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        detail = (str(exc).strip().splitlines() or [""])[0][:160]
        raise EDMToolkitError(f"{path} is not a readable ADM batch file ({detail})") from None


def write_sample_batch(path: str | os.PathLike, batches: Iterable[np.ndarray], count: int,
                       statistics: Statistics | Callable[[], Statistics] | None = None) -> Path:
    """Writes an ADM batch: ``count`` images given as uint8 NHWC arrays, streamed into ``arr_0``, plus for a
    reference batch ``mu``, ``sigma``, ``mu_s``, ``sigma_s`` from the (pool, spatial) ``statistics``, or from
    the function returning them, which is called after the images are written (so that one pass over the images
    can both write and measure them). Written to a temporary file, then renamed."""
    path = Path(path)

    def write(file) -> None:
        nonlocal statistics
        with zipfile.ZipFile(file, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
            written, shape = 0, None
            with archive.open("arr_0.npy", "w", force_zip64=True) as stream:
                for batch in batches:
                    batch = np.asarray(batch)
                    if shape is None:
                        shape = batch.shape[1:]
                        if batch.dtype != np.uint8 or batch.ndim != 4 or shape[2] not in (1, 3):
                            raise EDMToolkitError(f"images of {batch.dtype} {list(batch.shape)}; an ADM batch "
                                                  "holds uint8 [N, H, W, 3]")
                        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                                  "shape": (count, *shape)}
                        np.lib.format.write_array_header_1_0(stream, header)
                    if batch.shape[1:] != shape or batch.dtype != np.uint8:
                        raise EDMToolkitError(f"images of {batch.dtype} {list(batch.shape[1:])} after "
                                              f"{list(shape)}: an ADM batch needs equally sized uint8 images")
                    written += batch.shape[0]
                    if written > count:
                        break
                    stream.write(np.ascontiguousarray(batch).tobytes())
            if written != count:
                raise EDMToolkitError(f"{written} images were given for a batch of {count}")
            if callable(statistics):
                statistics = statistics()
            if statistics is not None:
                for key, value in zip(STAT_KEYS, (statistics[0].mu, statistics[0].sigma,
                                                  statistics[1].mu, statistics[1].sigma)):
                    with archive.open(f"{key}.npy", "w", force_zip64=True) as stream:
                        np.lib.format.write_array(stream, np.asarray(value), allow_pickle=False)

    write_atomically(path, write)
    return path

