"""The shipped default model: it loads from the package, samples finite images of its geometry and classes, and
is what `edm generate` samples without --network. (Its quality is measured by tools/bench_default_model.py.)"""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import edm_toolkit as edm
from edm_toolkit.cli import main
from edm_toolkit.default_model import CLASSES

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_shipped_weights_load_and_sample():
    net = edm.default_model()
    assert (net.img_channels, net.img_resolution, net.label_dim) == (1, 32, len(CLASSES)) == (1, 32, 10)
    assert type(net).__name__ == "EDMPrecond" and sum(p.numel() for p in net.parameters()) < 2_000_000  # <= 8 MB
    images = edm.sample_batch(net, edm.Sampler(solver="heun", num_steps=18), seeds=[0, 1], class_idx=7)  # 35 NFE
    assert images.shape == (2, 1, 32, 32) and bool(images.isfinite().all())
    assert float(images.abs().max()) < 1.5  # the data lie in [-1, 1]; the network's D overshoots a little


# Measured on the 1,000 held-out animal-mnist images (tools/train_default_model.py's split; not in the training
# data): the mean fraction of foreground pixels (x > 0) per image of the thinnest and the bulkiest class, and the
# fraction of all pixels within 0.25 of -1 or +1 (silhouettes are near-binary).
HELD_OUT_FOREGROUND = {"giraffe": 0.111, "elephant": 0.261}
HELD_OUT_NEAR_BINARY = 0.887


def test_the_samples_are_silhouettes_of_the_asked_class():
    """Class-conditional samples have their class's bulk: 16 giraffes are as thin, 16 elephants as bulky as the
    held-out images of those classes (the mean of 16 images has a standard deviation of about 0.011 here), and
    the images are near-binary like the data."""
    net = edm.default_model()
    sampler = edm.Sampler(solver="dpmpp_2m", num_steps=10)
    near_binary = []
    for name, expected in HELD_OUT_FOREGROUND.items():
        images = edm.sample_batch(net, sampler, seeds=list(range(16)), class_idx=CLASSES.index(name))
        foreground = float((images > 0).double().mean())
        assert abs(foreground - expected) < 0.04, (name, foreground)
        near_binary.append(float(((images.abs() - 1).abs() < 0.25).double().mean()))
    assert min(near_binary) > HELD_OUT_NEAR_BINARY - 0.08, near_binary


def test_edm_generate_samples_it_by_default(tmp_path):
    result = CliRunner().invoke(main, ["generate", "--outdir", str(tmp_path), "--seeds", "3", "--steps", "3",
                                       "--class", "9"])
    assert result.exit_code == 0, result.stderr
    assert "DDPM++ trained on animal-mnist" in result.stderr
    written = np.asarray(Image.open(tmp_path / "000003.png"))
    expected = edm.io.images.to_uint8(edm.sample_batch(edm.default_model(), edm.Sampler(num_steps=3), [3],
                                                       class_idx=9))[0, :, :, 0]
    assert written.shape == (32, 32) and np.array_equal(written, expected)
    ideal = CliRunner().invoke(main, ["generate", "--network", "ideal", "--outdir", str(tmp_path / "i"), "--seeds",
                                      "0", "--steps", "3"])
    assert ideal.exit_code == 0 and "ideal denoiser" in ideal.stderr
    assert np.asarray(Image.open(tmp_path / "i" / "000000.png")).shape == (32, 32, 3)
