"""ADM's upsampling model (issue 11, item 4): trained with its area-downsampled training image bound as low_res, and
run as a cascade (low-resolution samples in, high-resolution samples out) through upsample_batch, per-seed
deterministic across batch sizes. Tiny networks on 8x8 grayscale discs, upsampled from 4x4."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from edm_toolkit.checkpoints import save_model
from edm_toolkit.cli import main
from edm_toolkit.errors import ConfigError, EDMToolkitError
from edm_toolkit.generate import low_res_from_uint8, sample_batch, upsample_batch
from edm_toolkit.ideal import IdealDenoiser
from edm_toolkit.io.images import quantize, to_uint8
from edm_toolkit.loading import load_model
from edm_toolkit.protocol import BoundInputs, DenoiserBase
from edm_toolkit.sampling import Sampler
from edm_toolkit.training import TrainingOptions, train
from edm_toolkit.training.dataset import ImageDataset

from test_training import make_dataset

pytestmark = pytest.mark.usefixtures("one_thread")

SR_FLAGS = ("--num_channels 32 --num_res_blocks 1 --channel_mult 1 --attention_resolutions 1 --num_heads 1 "
            "--large_size 8 --small_size 4")


class Recorder(DenoiserBase):
    """Returns x and records the keyword arguments of each call."""

    img_channels, img_resolution = 1, 8

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, sigma, class_labels=None, **model_kwargs):
        self.calls.append(model_kwargs)
        return x

    def denoise_with_variance(self, x, sigma, class_labels=None, **model_kwargs):
        self.calls.append(model_kwargs)
        return x, torch.zeros_like(x)


def test_bound_inputs_reach_every_call():
    net = Recorder()
    low = torch.arange(3.0).reshape(3, 1, 1, 1)
    bound = BoundInputs(net, low_res=low)
    x = torch.zeros(3, 1, 8, 8)
    bound(x, 1.0)
    bound.denoise_with_variance(x, 1.0, None, augment_labels=None)
    assert [sorted(c) for c in net.calls] == [["low_res"], ["augment_labels", "low_res"]]
    assert all(torch.equal(c["low_res"], low) for c in net.calls)
    BoundInputs(net, low_res=low[:1])(x, 1.0)  # one row: shared by every image
    assert net.calls[-1]["low_res"].shape == (3, 1, 1, 1)
    assert bound.img_resolution == 8 and bound.step_grid is None and not bound.learned_variance
    with pytest.raises(ConfigError, match="2 rows but the batch has 3"):
        BoundInputs(net, low_res=low[:2])(x, 1.0)
    with pytest.raises(ConfigError, match="'low_res' is bound already"):
        bound(x, 1.0, low_res=low)
    with pytest.raises(ConfigError, match="at least one input"):
        BoundInputs(net)


def area_downsample(images: torch.Tensor, size: int) -> torch.Tensor:
    """The original's downsampling for the low-resolution input: the mean of each block."""
    n, c, h, w = images.shape
    return images.reshape(n, c, size, h // size, size, w // size).mean(dim=(3, 5))


def test_low_res_images_scale_like_training_data():
    images = np.array([[[[0], [255]], [[128], [64]]]], dtype=np.uint8)  # NHWC, as read from a PNG
    low = low_res_from_uint8(images)
    assert low.shape == (1, 1, 2, 2)
    torch.testing.assert_close(low.flatten(), torch.tensor([0, 255, 128, 64]) / 127.5 - 1)
    with pytest.raises(EDMToolkitError, match="uint8"):
        low_res_from_uint8(torch.zeros(1, 1, 2, 2))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("upsampling") / "discs", n=8)


@pytest.fixture(scope="module")
def upsampler(data, tmp_path_factory):
    """150 steps of guided-diffusion's upsampler (L_simple, 50 cosine steps) from 4x4 to 8x8, on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        options = TrainingOptions(data=str(data), outdir=str(tmp_path_factory.mktemp("sr")), arch="guided",
                                  model_flags=SR_FLAGS, diffusion_steps=50, noise_schedule="cosine", batch=8,
                                  duration=150 * 8e-6, lr=2e-3, lr_rampup=0, ema=0.0005, ema_rampup=None, tick=0.4,
                                  snap=3, dump=3, workers=0, seed=0, nosubdir=True)
        return load_model(train(options) / "network-snapshot-000001.pt")
    finally:
        torch.set_num_threads(threads)


def dataset_images(data) -> torch.Tensor:
    dataset = ImageDataset(data, use_labels=False)
    return torch.stack([torch.from_numpy(np.array(dataset[i][0])) for i in range(len(dataset))]).float() / 127.5 - 1


def test_the_upsampler_follows_its_low_resolution_input(data, upsampler):
    """Area-downsampled again, the upsampled images are close to their own low-resolution inputs, far from the
    others': the training bound each image's downsampled version as low_res."""
    assert type(upsampler.model).__name__ == "SuperResModel" and upsampler.img_resolution == 8
    low = quantize(area_downsample(dataset_images(data), 4))
    upsampled = upsample_batch(upsampler, Sampler(solver="ddpm", num_steps=50), low, range(8))
    assert upsampled.shape == (8, 1, 8, 8)
    back = area_downsample(upsampled.float(), 4)
    target = low_res_from_uint8(low)
    own = float(((back - target) ** 2).mean())
    other = float(((back - target.roll(1, 0)) ** 2).mean())
    assert own < 0.3 * other, (own, other)  # measured 0.10 vs 0.67


def test_cascade_is_per_seed_deterministic_across_batch_sizes(data, upsampler):
    """Low-resolution samples of a base model (the exact denoiser of the 4x4 data) -> uint8, as a base run writes
    them -> the upsampler: 8x8 images, the same bytes whether the seeds go in one batch, in pairs or alone."""
    base = IdealDenoiser(area_downsample(dataset_images(data), 4).double())
    seeds = [3, 10, 11, 42]
    low = quantize(sample_batch(base, Sampler(solver="heun", num_steps=12), seeds))
    sampler = Sampler(solver="ddpm", num_steps=10)
    together = quantize(upsample_batch(upsampler, sampler, low, seeds))
    assert together.shape == (4, 1, 8, 8)
    pairs = torch.cat([quantize(upsample_batch(upsampler, sampler, low[i:i + 2], seeds[i:i + 2])) for i in (0, 2)])
    alone = torch.cat([quantize(upsample_batch(upsampler, sampler, low[i:i + 1], seeds[i:i + 1])) for i in range(4)])
    assert torch.equal(together, pairs) and torch.equal(together, alone)
    other_seeds = quantize(upsample_batch(upsampler, sampler, low, [s + 1 for s in seeds]))
    assert not torch.equal(together, other_seeds)  # the noise is the seed's


def test_cascade_through_the_cli(data, upsampler, tmp_path):
    """edm generate --upsample-from: the base model's PNGs in, the upsampler's PNGs out, the same bytes as
    upsample_batch gives and whatever the batch size."""
    base = IdealDenoiser(area_downsample(dataset_images(data), 4).double())
    save_model(base, tmp_path / "base.pt")
    save_model(upsampler, tmp_path / "sr.pt")
    runner = CliRunner()
    common = ["--seeds", "0-4", "--solver", "ddpm", "--steps", "6"]
    result = runner.invoke(main, ["generate", "--network", str(tmp_path / "base.pt"), "--outdir", str(tmp_path / "low"),
                                  "--seeds", "0-4", "--steps", "8"])
    assert result.exit_code == 0, result.stderr
    for batch in (5, 2):
        result = runner.invoke(main, ["generate", "--network", str(tmp_path / "sr.pt"), "--upsample-from",
                                      str(tmp_path / "low"), "--outdir", str(tmp_path / f"high{batch}"), "--batch",
                                      str(batch), *common])
        assert result.exit_code == 0, result.stderr
    low = np.stack([np.asarray(Image.open(tmp_path / "low" / f"{s:06d}.png"))[:, :, None] for s in range(5)])
    expected = to_uint8(upsample_batch(upsampler, Sampler(solver="ddpm", num_steps=6), low, range(5)))
    for batch in (5, 2):
        written = np.stack([np.asarray(Image.open(tmp_path / f"high{batch}" / f"{s:06d}.png")) for s in range(5)])
        assert written.shape == (5, 8, 8) and np.array_equal(written, expected[..., 0])
    (tmp_path / "low" / "000003.png").unlink()
    result = runner.invoke(main, ["generate", "--network", str(tmp_path / "sr.pt"), "--upsample-from",
                                  str(tmp_path / "low"), "--outdir", str(tmp_path / "missing"), *common])
    assert result.exit_code == 1 and "000003.png not found" in result.stderr.strip().splitlines()[-1]


def test_cascade_refuses_mismatched_inputs(upsampler):
    sampler = Sampler(solver="ddim", num_steps=4)
    low = torch.zeros(2, 1, 4, 4, dtype=torch.uint8)
    with pytest.raises(EDMToolkitError, match="2 low-resolution images for 3 seeds"):
        upsample_batch(upsampler, sampler, low, [0, 1, 2])
    with pytest.raises(EDMToolkitError, match="3 channels, the upsampler makes 1"):
        upsample_batch(upsampler, sampler, torch.zeros(2, 3, 4, 4, dtype=torch.uint8), [0, 1])
    with pytest.raises(EDMToolkitError, match="not smaller"):
        upsample_batch(upsampler, sampler, torch.zeros(2, 1, 8, 8, dtype=torch.uint8), [0, 1])
