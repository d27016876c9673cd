"""ADM's evaluator suite (edm_toolkit.metrics.adm): Inception Score, improved precision/recall (k = 3), sFID and
the .npz sample/reference batches, on synthetic feature sets with known answers."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from edm_toolkit.errors import EDMToolkitError
from edm_toolkit.metrics.adm import (SampleBatch, evaluate, inception_score, manifold_radii, precision_recall,
                                     write_sample_batch)
from edm_toolkit.metrics.detector_files import detector_from_state_dict
from edm_toolkit.metrics.inception import SPATIAL_DIM
from edm_toolkit.metrics.pipeline import Activations, accumulate
from edm_toolkit.metrics.statistics import FeatureStatistics, FIDStatistics, frechet_distance
from test_metrics_detector import random_state_dict

# ----------------------------------------------------------------------------------------------------------
# Inception Score


def adm_inception_score(logits: np.ndarray, split_size: int = 5000) -> float:
    """ADM's compute_inception_score, literally (softmax then log of the probabilities), in float64."""
    preds = np.exp(logits - logits.max(1, keepdims=True))
    preds /= preds.sum(1, keepdims=True)
    scores = []
    for i in range(0, len(preds), split_size):
        part = preds[i:i + split_size]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return float(np.mean(scores))


def test_inception_score_known_answers():
    assert inception_score(torch.zeros(20, 1008)).mean == pytest.approx(1.0, abs=1e-12)  # uniform p(y|x)
    # Confident and evenly spread over K classes: exp(KL) = K.
    for classes in (1, 7, 10):
        logits = torch.zeros(70, 1008)
        logits[torch.arange(70), torch.arange(70) % classes] = 100.0
        assert inception_score(logits).mean == pytest.approx(classes, rel=1e-12)


def test_inception_score_splits_as_adm():
    """Parts of 5000 rows (10 splits for 50k samples); the mean over splits is ADM's number."""
    logits = torch.from_numpy(np.random.default_rng(0).normal(0, 3, (12000, 16)))
    result = inception_score(logits)
    assert len(result.scores) == 3  # 5000 + 5000 + 2000
    assert result.mean == pytest.approx(adm_inception_score(logits.numpy()), rel=1e-10)
    assert result.std == pytest.approx(np.std(result.scores))
    assert len(inception_score(torch.zeros(50000, 4)).scores) == 10
    # Halves of a set that is confident on class 0 in one half and class 1 in the other: 1 per split, 2 overall.
    logits = torch.zeros(10000, 4)
    logits[:5000, 0] = logits[5000:, 1] = 100.0
    assert inception_score(logits).mean == pytest.approx(1.0)
    assert inception_score(logits, split_size=10000).mean == pytest.approx(2.0)


# ----------------------------------------------------------------------------------------------------------
# Precision and recall


def brute_force_precision_recall(reference: np.ndarray, samples: np.ndarray, k: int = 3) -> tuple[float, float]:
    """The definition, directly: radius of x = distance to its k-th nearest point of its own set (x itself
    being the 0th); y is inside a set's manifold when it lies within the radius of one of its points."""
    def radii(points):
        d = ((points[:, None] - points[None]) ** 2).sum(-1)
        return np.sort(d, axis=1)[:, k]

    cross = ((reference[:, None] - samples[None]) ** 2).sum(-1)
    precision = np.mean((cross <= radii(reference)[:, None]).any(0))
    recall = np.mean((cross <= radii(samples)[None]).any(1))
    return float(precision), float(recall)


def test_precision_recall_identical_and_disjoint_sets():
    points = torch.randn(40, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert precision_recall(points, points) == (1.0, 1.0)
    assert precision_recall(points, points + 100.0) == (0.0, 0.0)


def test_manifold_radii_by_hand():
    """On a line, {0, 1, 2, 3, 10}: squared distance to the 3rd other point."""
    points = torch.tensor([[0.0], [1.0], [2.0], [3.0], [10.0]], dtype=torch.float64)
    radii = manifold_radii(points, dtype=torch.float64)
    assert radii.tolist() == [9.0, 4.0, 4.0, 9.0, 81.0]
    # Samples at 0.5 (in the ball of 0), 5.5 (in those of 3 and 10), 20 and 20.1 (outside): precision 2/4.
    # With 4 samples each sample's radius reaches the farthest one (0.5 -> 384.16): every reference is covered.
    samples = torch.tensor([[0.5], [5.5], [20.0], [20.1]], dtype=torch.float64)
    assert precision_recall(points, samples, dtype=torch.float64) == pytest.approx((2 / 4, 1.0))


@pytest.mark.parametrize("block_size", [1, 7, 10000])
def test_precision_recall_equals_the_definition(block_size):
    rng = np.random.default_rng(2)
    reference = rng.normal(size=(60, 5))
    samples = np.concatenate([rng.normal(size=(30, 5)) * 0.5, rng.normal(size=(25, 5)) * 2 + 1])
    expected = brute_force_precision_recall(reference, samples)
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1
    result = precision_recall(torch.from_numpy(reference), torch.from_numpy(samples), block_size=block_size,
                              dtype=torch.float64)
    assert result == pytest.approx(expected, abs=1e-12)
    with pytest.raises(EDMToolkitError, match="nearest neighbours need more"):
        manifold_radii(torch.zeros(3, 5))


# ----------------------------------------------------------------------------------------------------------
# sFID and the evaluation


@pytest.fixture(scope="module")
def detector():
    return detector_from_state_dict(random_state_dict(seed=3))


def test_evaluate_combines_the_five_metrics(detector):
    """evaluate() on activations: FID of the pool statistics, sFID of the spatial statistics, IS of pool W^T,
    precision/recall of the pool features; stored reference statistics take precedence, as in ADM. (The
    statistics here are of a few coordinates only, to keep the Frechet distances cheap.)"""
    rng = np.random.default_rng(4)

    def activations(n, shift):
        pool = torch.from_numpy(rng.normal(shift, 1.0, (n, 2048))).float()
        spatial = torch.from_numpy(rng.normal(shift, 1.0, (n, 6))).float()
        result = Activations(FeatureStatistics(8), FeatureStatistics(6), pool)
        result.pool.update(pool[:, :8])
        result.spatial.update(spatial)
        return result

    reference, samples = activations(30, 0.0), activations(40, 0.1)
    metrics = evaluate(detector, reference, samples)
    pool_ref, spatial_ref = reference.pool.fid_statistics(), reference.spatial.fid_statistics()
    assert metrics.fid == pytest.approx(samples.pool.fid_statistics().frechet_distance(pool_ref), rel=1e-12)
    assert metrics.sfid == pytest.approx(samples.spatial.fid_statistics().frechet_distance(spatial_ref), rel=1e-12)
    logits = samples.features.double() @ detector.output.weight.double().T
    assert metrics.inception_score == pytest.approx(adm_inception_score(logits.numpy()), rel=1e-5)
    assert (metrics.precision, metrics.recall) == pytest.approx(
        brute_force_precision_recall(reference.features.double().numpy(), samples.features.double().numpy()))
    assert metrics.report().splitlines()[0].startswith("Inception Score: ")
    stored = (FIDStatistics(np.zeros(8), np.eye(8)), FIDStatistics(np.zeros(6), np.eye(6)))
    with_stored = evaluate(detector, reference, samples, reference_statistics=stored)
    spatial = samples.spatial.fid_statistics()
    expected = frechet_distance(np.zeros(6), np.eye(6), spatial.mu, spatial.sigma)
    assert with_stored.sfid == pytest.approx(expected, rel=1e-12)


def test_spatial_statistics_from_images(detector, one_thread):
    """accumulate(spatial=True): 2023-dimensional sFID statistics of the detector's mixed_6/conv outputs."""
    images = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    activations = accumulate(detector, [images[:2], images[2:]], spatial=True, keep_features=True)
    with torch.no_grad():
        outputs = detector.embed(images, spatial=True)
    assert activations.spatial.dim == SPATIAL_DIM == 17 * 17 * 7 and activations.spatial.num == 3
    torch.testing.assert_close(activations.spatial.mean(), outputs.spatial.double().mean(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(activations.features, outputs.pool, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# ADM batch files


def test_sample_batch_round_trip_streaming(tmp_path):
    images = np.random.default_rng(6).integers(0, 256, (11, 8, 6, 3), dtype=np.uint8)
    stats = (FIDStatistics(np.arange(3.0), np.eye(3)), FIDStatistics(np.ones(2), 2 * np.eye(2)))
    chunks = (images[i:i + 4] for i in range(0, 11, 4))
    path = write_sample_batch(tmp_path / "ref.npz", chunks, 11, statistics=lambda: stats)
    with np.load(path) as data:  # ADM's own reader: np.load(...)["arr_0"], mu, sigma, mu_s, sigma_s
        np.testing.assert_array_equal(data["arr_0"], images)
        np.testing.assert_array_equal(data["mu_s"], stats[1].mu)
    batch = SampleBatch.open(path)
    assert len(batch) == 11 and batch.has_statistics and batch.shape == (11, 8, 6, 3)
    read = list(batch.batches(5))
    assert [b.shape[0] for b in read] == [5, 5, 1] and read[0].shape[1:] == (3, 8, 6)
    np.testing.assert_array_equal(torch.cat(read).permute(0, 2, 3, 1).numpy(), images)
    np.testing.assert_array_equal(batch.statistics()[0].sigma, np.eye(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref.npz"]


def test_batches_written_by_numpy_are_read(tmp_path):
    images = np.random.default_rng(7).integers(0, 256, (5, 4, 4, 3), dtype=np.uint8)
    for name, save in (("plain.npz", np.savez), ("compressed.npz", np.savez_compressed)):
        save(tmp_path / name, images)  # positional -> arr_0, as ADM's sampling scripts write it
        batch = SampleBatch.open(tmp_path / name)
        assert not batch.has_statistics
        np.testing.assert_array_equal(torch.cat(list(batch.batches(2))).permute(0, 2, 3, 1).numpy(), images)


def test_bad_batches_are_one_line_errors(tmp_path):
    np.savez(tmp_path / "float.npz", np.zeros((2, 4, 4, 3), np.float32))
    np.savez(tmp_path / "named.npz", images=np.zeros((2, 4, 4, 3), np.uint8))
    (tmp_path / "junk.npz").write_bytes(b"junk")
    for name, message in [("float.npz", "expected C-ordered uint8"), ("named.npz", "has no arr_0"),
                          ("junk.npz", "not a readable ADM batch"), ("missing.npz", "not found")]:
        with pytest.raises(EDMToolkitError, match=message) as info:
            SampleBatch.open(tmp_path / name)
        assert "\n" not in str(info.value)
    np.savez(tmp_path / "ok.npz", np.zeros((4, 2, 2, 3), np.uint8))
    data = (tmp_path / "ok.npz").read_bytes()
    with pytest.raises(EDMToolkitError, match="not a readable ADM batch|truncated"):
        (tmp_path / "cut.npz").write_bytes(data[:-40])
        list(SampleBatch.open(tmp_path / "cut.npz").batches(2))
    images = np.zeros((2, 4, 4, 3), np.uint8)
    for batches, count, message in [([images, images[:, :2]], 4, "equally sized"), ([images], 3, "2 images were given"),
                                    ([images.astype(np.float32)], 2, "uint8")]:
        with pytest.raises(EDMToolkitError, match=message):
            write_sample_batch(tmp_path / "out.npz", iter(batches), count)
    assert not (tmp_path / "out.npz").exists() and not list(tmp_path.glob(".out.npz*"))
    assert list(itertools.islice(SampleBatch.open(tmp_path / "ok.npz").batches(3), 5))[1].shape[0] == 1
