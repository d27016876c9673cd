"""Streaming float64 statistics and the Frechet distance (edm_toolkit.metrics.statistics): closed forms, numpy's
covariance, and EDM fid.py's value for the fixture's statistics (fixture fid_detector, README E20)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch

from edm_toolkit.errors import EDMToolkitError
from edm_toolkit.metrics.statistics import FeatureStatistics, FIDStatistics, frechet_distance


def random_rotation(dim, seed):
    return scipy.stats.special_ortho_group.rvs(dim, random_state=seed)


def test_streaming_statistics_equal_numpy():
    features = np.random.default_rng(0).normal(3.0, 2.0, (37, 5)) @ np.random.default_rng(1).normal(size=(5, 5))
    stats = FeatureStatistics(5)
    for batch in np.array_split(features, [8, 9, 30]):  # uneven batches, one of a single row
        stats.update(torch.from_numpy(batch).float())
    as_float32 = features.astype(np.float32).astype(np.float64)  # the batches were given in float32
    np.testing.assert_allclose(stats.mean().numpy(), as_float32.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.covariance().numpy(), np.cov(as_float32, rowvar=False), rtol=1e-10, atol=1e-12)
    assert stats.num == 37 and stats.sum.dtype == torch.float64


def test_merged_shares_equal_one_pass():
    features = torch.randn(50, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    whole, first, second = FeatureStatistics(4), FeatureStatistics(4), FeatureStatistics(4)
    whole.update(features)
    first.update(features[:21])
    second.update(features[21:])
    merged = first.merge(second)
    assert merged.num == 50
    torch.testing.assert_close(merged.covariance(), whole.covariance(), rtol=1e-13, atol=1e-13)
    with pytest.raises(EDMToolkitError, match="dimension"):
        merged.merge(FeatureStatistics(3))
    with pytest.raises(EDMToolkitError, match="at least 2"):
        single = FeatureStatistics(4)
        single.update(features[:1])
        single.covariance()


def test_frechet_distance_diagonal_covariances():
    """Independent coordinates: |dmu|^2 + sum (a + b - 2 sqrt(a b))."""
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.5])
    a, b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(a + b - 2 * np.sqrt(a * b))
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(7.25 + 4 + 1 + 0, rel=1e-15)


def test_frechet_distance_full_covariances():
    """Covariances sharing eigenvectors Q: tr sqrt(S1 S2) = sum sqrt(a_i b_i). Arbitrary ones: tr sqrt(S1 S2) =
    tr sqrt(S1^1/2 S2 S1^1/2), computed here from symmetric eigendecompositions instead of sqrtm."""
    dim = 6
    q = random_rotation(dim, 4)
    rng = np.random.default_rng(5)
    a, b = rng.uniform(0.1, 3.0, dim), rng.uniform(0.1, 3.0, dim)
    mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(a + b - 2 * np.sqrt(a * b))
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-10)

    x, y = rng.normal(size=(dim, dim)), rng.normal(size=(dim, dim))
    s1, s2 = x @ x.T + 0.1 * np.eye(dim), y @ y.T + 0.1 * np.eye(dim)
    w, v = np.linalg.eigh(s1)
    root1 = v @ np.diag(np.sqrt(w)) @ v.T
    middle = np.linalg.eigvalsh(root1 @ s2 @ root1)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(middle))
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-10)
    assert FIDStatistics(mu1, s1).frechet_distance(FIDStatistics(mu2, s2)) == pytest.approx(expected, rel=1e-10)


def test_fid_of_a_set_with_itself_is_zero():
    features = torch.randn(400, 16, generator=torch.Generator().manual_seed(6)) * 3 + 1
    stats = FeatureStatistics(16)
    stats.update(features)
    own = stats.fid_statistics()
    assert abs(own.frechet_distance(own)) < 1e-9 * np.trace(own.sigma)
    other = FeatureStatistics(16)
    other.update(features + 0.5)  # a shift changes only the mean term
    assert own.frechet_distance(other.fid_statistics()) == pytest.approx(16 * 0.25, rel=1e-8)


def test_eigh_and_sqrtm_methods_agree():
    """The default (two symmetric eigendecompositions) against fid.py's scipy sqrtm of the product."""
    rng = np.random.default_rng(8)
    x, y = rng.normal(size=(300, 40)), rng.normal(size=(250, 40)) * 1.5 + 0.2
    s1, s2 = np.cov(x, rowvar=False), np.cov(y @ rng.normal(size=(40, 40)) / 6, rowvar=False)
    args = (x.mean(0), s1, y.mean(0), s2)
    assert frechet_distance(*args) == pytest.approx(frechet_distance(*args, method="sqrtm"), rel=1e-10)
    with pytest.raises(EDMToolkitError, match="unknown Frechet distance method"):
        frechet_distance(*args, method="svd")
    with pytest.raises(EDMToolkitError, match="NaN"):
        frechet_distance(x.mean(0) * np.nan, s1, y.mean(0), s2)


def test_edm_fid_value_for_the_fixture_statistics(load_fixture, one_thread):
    """The fixture's statistics rebuilt from its features (first 6 vs last 6 images) and EDM fid.py's FID."""
    fx = load_fixture("fid_detector")
    features = fx.outputs["features"]
    stats = {}
    for key, part in (("stats_first6", features[:6]), ("stats_last6", features[6:])):
        accumulated = FeatureStatistics(2048)
        accumulated.update(part[:4])
        accumulated.update(part[4:])
        mu, sigma = accumulated.mean().numpy(), accumulated.covariance().numpy()
        recorded = fx.outputs[key]
        scale = float(features.abs().max())
        np.testing.assert_allclose(mu, recorded["mu"].numpy(), rtol=0, atol=1e-6 * scale)
        np.testing.assert_allclose(np.diag(sigma), recorded["sigma_diag"].numpy(), rtol=0, atol=1e-6 * scale ** 2)
        np.testing.assert_allclose(sigma[:64, :64], recorded["sigma_block_64"].numpy(), rtol=0, atol=1e-6 * scale ** 2)
        np.testing.assert_allclose(sigma.sum(1), recorded["sigma_row_sums"].numpy(), rtol=1e-6, atol=1e-6 * scale ** 2)
        for name, value in (("sigma_trace", np.trace(sigma)), ("sigma_sum", sigma.sum()),
                            ("sigma_fro", np.linalg.norm(sigma))):
            assert value == pytest.approx(float(recorded[name]), rel=1e-6), name
        stats[key] = FIDStatistics(mu, sigma)
    fid = stats["stats_first6"].frechet_distance(stats["stats_last6"])
    assert fid == pytest.approx(fx.outputs["fid_first6_vs_last6"], rel=fx.meta["tolerance"]["fid"]["rtol"])
    # With rank-5 covariances fid.py's sqrtm is off the exact value by 1.3e-4; the eigh method is not.
    assert fid == pytest.approx(fx.outputs["fid_terms"]["fid_exact_via_nuclear_norm"], rel=1e-10)


def test_reference_files_round_trip(tmp_path):
    rng = np.random.default_rng(7)
    stats = FIDStatistics(rng.normal(size=3), np.eye(3) * 2)
    written = stats.save(tmp_path / "refs" / "cifar10")  # np.savez's rule: .npz is appended
    assert written == tmp_path / "refs" / "cifar10.npz" and sorted(p.name for p in written.parent.iterdir()) == [
        "cifar10.npz"]
    with np.load(written) as data:  # EDM's own reader: dict(np.load(f)) with keys mu and sigma
        assert sorted(data.files) == ["mu", "sigma"] and data["mu"].dtype == np.float64
    loaded = FIDStatistics.load(written)
    np.testing.assert_array_equal(loaded.mu, stats.mu)
    np.testing.assert_array_equal(loaded.sigma, stats.sigma)


def test_bad_reference_files_are_one_line_errors(tmp_path):
    np.savez(tmp_path / "nomu.npz", sigma=np.eye(2))
    np.savez(tmp_path / "objects.npz", mu=np.array([{"a": 1}], dtype=object), sigma=np.eye(1))
    np.savez(tmp_path / "shapes.npz", mu=np.zeros(3), sigma=np.eye(2))
    (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04garbage")
    cases = [("nomu.npz", "has no mu"), ("objects.npz", "not a readable npz file"),
             ("shapes.npz", r"not a mean \[D\] and covariance"), ("broken.npz", "not a readable npz file"),
             ("missing.npz", "not found"), ("https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/cifar10-32x32.npz", "URL")]
    for name, message in cases:
        path = name if name.startswith("https") else tmp_path / name
        with pytest.raises(EDMToolkitError, match=message) as info:
            FIDStatistics.load(path)
        assert "\n" not in str(info.value)
    with pytest.raises(EDMToolkitError, match="different shapes"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))
