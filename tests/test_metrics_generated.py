"""Statistics of generated images (edm_toolkit.metrics.generated) and the in-training FID of `edm train --metrics`.

A detector with random weights built here (test_metrics_detector.random_state_dict) stands in for the FID
Inception network: what is checked is the pipeline, not the published numbers. Tiny counts of 8x8 images.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from edm_toolkit.errors import EDMToolkitError
from edm_toolkit.generate import generate_images
from edm_toolkit.ideal import IdealDenoiser
from edm_toolkit.loading import load_model
from edm_toolkit.metrics.detector_files import detector_from_state_dict
from edm_toolkit.io.images import quantize
from edm_toolkit.metrics.generated import generated_statistics
from edm_toolkit.metrics.statistics import FeatureStatistics, FIDStatistics
from edm_toolkit.presets import load_preset
from edm_toolkit.sampling import Sampler

from test_cli_train import edm, fails_cleanly, short_run
from test_metrics_detector import random_state_dict
from test_training import make_dataset

pytestmark = pytest.mark.usefixtures("one_thread")

SAMPLER = Sampler(solver="heun", num_steps=6)


@pytest.fixture(scope="module")
def detector_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("detector") / "inception.pt"
    state = random_state_dict(seed=3)
    torch.save(state, path)
    return path, detector_from_state_dict(state)


@pytest.fixture(scope="module")
def net():
    """The exact denoiser of 6 random 8x8 grayscale images."""
    data = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return IdealDenoiser(data * 2 - 1)


def statistics_of(detector, images: np.ndarray) -> FIDStatistics:
    stats = FeatureStatistics(2048)
    with torch.no_grad():
        stats.update(detector(torch.from_numpy(images)))
    return stats.fid_statistics()


def test_statistics_are_those_of_the_png_files(net, detector_file, tmp_path):
    """The same mean and covariance as the detector gives on the PNG files edm generate writes for these seeds:
    the images are quantised as EDM's generate.py quantises them."""
    _, detector = detector_file
    seeds = [0, 7, 9]
    result = generated_statistics(net, SAMPLER, seeds, detector, batch_size=2)
    paths = generate_images(net, SAMPLER, seeds, tmp_path, max_batch_size=2, progress=False)
    pngs = np.stack([np.asarray(Image.open(p))[None] for p in paths])
    expected = statistics_of(detector, pngs)
    np.testing.assert_allclose(result.mu, expected.mu, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(result.sigma, expected.sigma, rtol=1e-9, atol=1e-12)
    one_batch = generated_statistics(net, SAMPLER, seeds, detector, batch_size=64)
    np.testing.assert_allclose(one_batch.mu, result.mu, rtol=1e-12, atol=1e-12)  # per-seed images: any batching


def test_quantisation_and_bad_input(net, detector_file):
    _, detector = detector_file
    x = torch.tensor([-1.5, -1.0, 0.0, 0.999, 1.2])
    assert quantize(x).tolist() == [0, 0, 128, 255, 255]  # (x 127.5 + 128).clip(0, 255), truncated
    with pytest.raises(EDMToolkitError, match="at least 2 images"):
        generated_statistics(net, SAMPLER, [0], detector)


@pytest.mark.slow
def test_torchrun_shards_give_the_same_statistics(net, detector_file, tmp_path):
    """Two gloo processes each generate EDM's batches r::2 of the seeds; the sums are added across them."""
    torch.save(net.data, tmp_path / "data.pt")
    script = tmp_path / "stats.py"
    script.write_text(
        "import sys, numpy as np, torch\n"
        "from edm_toolkit.distributed import init_from_env, shutdown\n"
        "from edm_toolkit.ideal import IdealDenoiser\n"
        "from edm_toolkit.metrics.detector_files import load_detector\n"
        "from edm_toolkit.metrics.generated import generated_statistics\n"
        "from edm_toolkit.sampling import Sampler\n"
        "group = init_from_env('cpu')\n"
        "net = IdealDenoiser(torch.load(sys.argv[1], weights_only=True))\n"
        "stats = generated_statistics(net, Sampler(solver='heun', num_steps=6), range(3), load_detector(sys.argv[2]),\n"
        "                             batch_size=1, group=group)\n"
        "if group.rank == 0:\n"
        "    np.savez(sys.argv[3], mu=stats.mu, sigma=stats.sigma)\n"
        "shutdown()\n")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), str(tmp_path / "data.pt"), str(detector_file[0]), str(tmp_path / "two.npz")],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    two = FIDStatistics.load(tmp_path / "two.npz")
    one = generated_statistics(net, Sampler(solver="heun", num_steps=6), range(3), detector_file[1], batch_size=1)
    np.testing.assert_allclose(two.mu, one.mu, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(two.sigma, one.sigma, rtol=1e-9, atol=1e-12)


def test_in_training_fid_per_snapshot(detector_file, tmp_path):
    """edm train --metrics fid2 --ref REF: with every snapshot, the FID of 2 images of the EMA (the grid's sampler,
    seeds 0-1) against REF, in metric-fid2.jsonl (StyleGAN's/EDM2's record) and as Metrics/fid2 in that tick's
    stats.jsonl line; the value is the FID of the snapshot file's images."""
    data = make_dataset(tmp_path / "data", n=3)
    reference = edm("fid", "ref", "--data", data, "--dest", tmp_path / "ref.npz", "--detector", detector_file[0])
    assert reference.exit_code == 0, reference.output
    result = short_run(data, tmp_path / "run", "--nosubdir", "--metrics", "fid2", "--ref", tmp_path / "ref.npz",
                       "--detector", detector_file[0], "--snap", 2, steps=3)
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metric-fid2.jsonl").read_text().splitlines()]
    assert [r["kimg"] for r in records] == [0.004, 0.012]  # ticks 0 and 2 (--snap 2), and the last
    assert records[-1]["metric"] == "fid2" and records[-1]["snapshot_pkl"] == "network-snapshot-000000.pt"
    stats = [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]
    assert ["Metrics/fid2" in s for s in stats] == [True, False, True]
    assert stats[2]["Metrics/fid2"]["mean"] == records[-1]["results"]["fid2"]

    snapshot = load_model(run / "network-snapshot-000000.pt")  # the EMA after the last step
    expected = generated_statistics(snapshot, load_preset("edm").sampling, range(2), detector_file[1], batch_size=4)
    fid = expected.frechet_distance(FIDStatistics.load(tmp_path / "ref.npz"))
    assert records[-1]["results"]["fid2"] == pytest.approx(fid, rel=1e-9) and fid > 0


def test_metric_options_are_checked_before_anything_is_written(detector_file, tmp_path):
    data = make_dataset(tmp_path / "data")
    out = tmp_path / "runs"
    fails_cleanly(short_run(data, out, "--metrics", "fid2"), "--metrics needs --ref")
    fails_cleanly(short_run(data, out, "--ref", tmp_path / "ref.npz"), "add --metrics")
    fails_cleanly(short_run(data, out, "--metrics", "is50k", "--ref", tmp_path / "ref.npz"),
                  "unknown --metrics 'is50k'")
    fails_cleanly(short_run(data, out, "--metrics", "fid2", "--ref", tmp_path / "missing.npz",
                            "--detector", detector_file[0]), "missing.npz")
    np.savez(tmp_path / "ref.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    fails_cleanly(short_run(data, out, "--metrics", "fid2", "--ref", tmp_path / "ref.npz",
                            "--detector", tmp_path / "nowhere.pt"), "nowhere.pt")
    assert not out.exists()


def test_generate_fid_measures_without_writing(net, detector_file, tmp_path):
    """edm generate --fid: FID of the images as they are generated, no PNG written. Against the statistics of the
    PNGs that edm generate writes for the same seeds the distance is 0 (the same images), against other seeds
    it is not; a wrong combination of options is one line."""
    from click.testing import CliRunner

    from edm_toolkit.checkpoints import save_model
    from edm_toolkit.cli import main

    path, detector = detector_file
    save_model(net, tmp_path / "net.pt")
    paths = generate_images(net, SAMPLER, range(8), tmp_path / "pngs", progress=False)
    statistics_of(detector, np.stack([np.asarray(Image.open(p))[None] for p in paths])).save(tmp_path / "ref.npz")
    runner = CliRunner()
    common = ["generate", "--network", str(tmp_path / "net.pt"), "--fid", str(tmp_path / "ref.npz"), "--detector",
              str(path), "--steps", "6", "--batch", "3"]
    before = sorted(p.name for p in tmp_path.iterdir())
    same = runner.invoke(main, [*common, "--num", "8"])
    assert same.exit_code == 0, same.stderr
    assert abs(float(same.stdout.strip())) < 1e-6
    other = runner.invoke(main, [*common, "--seeds", "100-107"])
    assert other.exit_code == 0 and float(other.stdout.strip()) > 1e-3
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written
    for extra, message in ((["--num", "8", "--outdir", str(tmp_path / "o")], "drop --outdir"),
                           (["--num", "8", "--seeds", "0-3"], "either as --seeds or as --num")):
        result = runner.invoke(main, [*common, *extra])
        assert result.exit_code == 2 and message in result.stderr.strip().splitlines()[-1], result.stderr
    result = runner.invoke(main, ["generate", "--network", str(tmp_path / "net.pt"), "--num", "8"])
    assert result.exit_code == 2 and "--outdir" in result.stderr
    FIDStatistics(np.zeros(3), np.eye(3)).save(tmp_path / "small.npz")
    result = runner.invoke(main, [*common[:3], "--fid", str(tmp_path / "small.npz"), "--num", "4"])
    assert result.exit_code == 2 and "3-dimensional statistics" in result.stderr


@pytest.mark.slow  # a benchmark tool end to end: about a minute of CPU
def test_fid_sweep_tool_writes_table_and_plot(net, detector_file, tmp_path):
    """tools/fid_sweep.py: one FID per solver and step count, indexed by the NFE each run cost; a table and a
    plot. The values are the same as edm generate --fid's for that setting."""
    import importlib.util

    from edm_toolkit.checkpoints import save_model

    path, detector = detector_file
    save_model(net, tmp_path / "net.pt")
    paths = generate_images(net, SAMPLER, range(6), tmp_path / "pngs", progress=False)
    statistics_of(detector, np.stack([np.asarray(Image.open(p))[None] for p in paths])).save(tmp_path / "ref.npz")
    spec = importlib.util.spec_from_file_location("fid_sweep", os.path.join(os.path.dirname(__file__), "..", "tools",
                                                                          "fid_sweep.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    tool.main(["--network", str(tmp_path / "net.pt"), "--ref", str(tmp_path / "ref.npz"), "--detector", str(path),
               "--solvers", "euler,heun", "--steps", "3,6", "--num", "6", "--batch", "3", "--device", "cpu",
               "--out", str(tmp_path / "out")])
    rows = json.loads((tmp_path / "out" / "fid_sweep.json").read_text())
    assert [(r["solver"], r["nfe"]) for r in rows] == [("euler", 3), ("euler", 6), ("heun", 5), ("heun", 11)]
    heun6 = next(r for r in rows if r["solver"] == "heun" and r["steps"] == 6)
    assert abs(heun6["fid"]) < 1e-6  # the reference is these very images (SAMPLER is heun with 6 steps)
    assert rows[0]["fid"] > 1e-3  # three Euler steps land elsewhere (the exact denoiser: finer runs may not)
    assert "| euler |" in (tmp_path / "out" / "fid_sweep.md").read_text()
    assert Image.open(tmp_path / "out" / "fid_sweep.png").size == (1000, 700)
