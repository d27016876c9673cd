"""`edm nll`: bits/dim of a dataset by the variational bound or the probability-flow ODE, deterministic per seed,
with progress on stderr, the summary on stdout, an atomic JSON and one-line errors."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from edm_toolkit.adapters.openai import load_openai_checkpoint
from edm_toolkit.checkpoints import save_model
from edm_toolkit.cli import main
from edm_toolkit.cli.nll import _image_seeds, nll
from edm_toolkit.ideal import IdealDenoiser
from edm_toolkit.metrics.likelihood import bits_per_dim, dequantize, variational_bound
from edm_toolkit.rng import SeedGenerators

pytestmark = pytest.mark.usefixtures("one_thread")

BPD_FLAGS = "--image_size 8 --num_heads 4 --noise_schedule cosine --diffusion_steps 50 --rescale_timesteps True"


def run(*args):
    return CliRunner().invoke(main, ["nll", *map(str, args)], catch_exceptions=False)


def one_error_line(result, pattern):
    assert result.exit_code != 0
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("Error: ") and re.search(pattern, lines[-1]), result.stderr
    assert "Traceback" not in result.stderr


def write_images(folder, images: np.ndarray):
    """uint8 [N, H, W] (grayscale) or [N, H, W, 3] as PNGs in EDM's layout."""
    folder.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"img{i:08d}.png")
    return folder


@pytest.fixture
def rgb_data(tmp_path):
    rng = np.random.default_rng(0)
    return write_images(tmp_path / "rgb", rng.integers(0, 256, size=(5, 8, 8, 3), dtype=np.uint8))


@pytest.fixture
def discrete_model(tmp_path, load_fixture):
    path = tmp_path / "discrete.pt"
    save_model(load_openai_checkpoint(load_fixture("id_unet_rescaled").state_dict, codebase="improved",
                                      model_flags=BPD_FLAGS), path)
    return path


def test_vlb_is_the_bound_of_each_image_whatever_the_batch(tmp_path, rgb_data, discrete_model, load_fixture):
    out = tmp_path / "nll.json"
    result = run("--network", discrete_model, "--data", rgb_data, "--method", "vlb", "--batch", 2, "--seed", 7,
                 "--out", out)
    assert result.exit_code == 0, result.stderr
    assert "Evaluating 5 images" in result.stderr and "5/5 images" in result.stderr
    saved = json.loads(out.read_text())
    assert list(tmp_path.glob(".nll.json.*")) == []  # written atomically
    # The bound of each image with its own noise stream, computed through the API.
    images = torch.stack([torch.from_numpy(np.array(Image.open(rgb_data / f"img{i:08d}.png"))).permute(2, 0, 1)
                          for i in range(5)])
    net = load_openai_checkpoint(load_fixture("id_unet_rescaled").state_dict, codebase="improved",
                                 model_flags=BPD_FLAGS)
    expected = variational_bound(net, images.float() / 127.5 - 1,
                                 randn_like=SeedGenerators(_image_seeds(7, range(5))).randn_like).total_bpd
    np.testing.assert_allclose(saved["per_image_bits_per_dim"], expected.numpy(), rtol=1e-6)
    assert re.fullmatch(rf"{saved['bits_per_dim']:.4f} bits/dim \(\+- \d\.\d{{4}} standard error, 5 images, vlb\)\n",
                        result.stdout)
    again = run("--network", discrete_model, "--data", rgb_data, "--method", "vlb", "--batch", 5, "--seed", 7,
                "--num", 3)
    assert again.stdout.split()[0] == f"{np.mean(saved['per_image_bits_per_dim'][:3]):.4f}"


def test_ode_bits_per_dim_of_gaussian_data_are_exact(tmp_path):
    """8-bit data near N(mu, s^2 I): the dequantised images' bits/dim equal those of the exact density."""
    mu, s = torch.full([1, 1, 4, 4], 0.1, dtype=torch.float64), 0.3
    model = tmp_path / "gaussian.pt"
    save_model(IdealDenoiser(mu, width=s), model)
    rng = np.random.default_rng(1)
    pixels = np.clip(np.round((0.1 + 0.3 * rng.standard_normal((3, 4, 4)) + 1) * 127.5), 0, 255).astype(np.uint8)
    data = write_images(tmp_path / "gray", pixels)
    out = tmp_path / "ode.json"
    result = run("--network", model, "--data", data, "--method", "ode", "--sigma_max", 2000, "--seed", 3,
                 "--out", out)
    assert result.exit_code == 0, result.stderr
    assert "probability-flow ODE, linear/none, sigma 0.002...2000" in result.stderr
    # Image i dequantised with the uniform draws of its own stream, as the command draws them.
    generators = SeedGenerators(_image_seeds(3, range(3)))
    uniform = torch.stack([torch.rand([1, 4, 4], generator=g, dtype=torch.float64) for g in generators.generators])
    x = dequantize(torch.from_numpy(pixels)[:, None], uniform)
    variance = s**2 + 0.002**2
    exact = -0.5 * (x - mu).square().flatten(1).sum(1) / variance - 8 * math.log(2 * math.pi * variance)
    got = json.loads(out.read_text())["per_image_bits_per_dim"]
    np.testing.assert_allclose(got, bits_per_dim(exact, 16).numpy(), atol=5e-3 / (16 * math.log(2)))


def test_bad_input_gets_one_line_errors(tmp_path, rgb_data, discrete_model):
    ideal = tmp_path / "ideal.pt"
    save_model(IdealDenoiser(torch.zeros(1, 3, 8, 8)), ideal)
    one_error_line(run("--network", ideal, "--data", rgb_data, "--method", "vlb"),
                   "--method vlb needs a model with a discrete step grid.*; use --method ode")
    one_error_line(run("--network", discrete_model, "--data", rgb_data, "--method", "vlb", "--estimator", "gaussian"),
                   "--estimator applies to --method ode")
    one_error_line(run("--network", discrete_model, "--data", rgb_data, "--method", "vlb", "--max-evaluations", 9),
                   "--max-evaluations applies to --method ode")
    one_error_line(run("--network", ideal, "--data", rgb_data, "--method", "ode", "--max-evaluations", 9),
                   "needed more than 9 evaluations .*raise sigma_min")
    one_error_line(run("--network", ideal, "--data", rgb_data, "--method", "ode", "--no-clip-denoised"),
                   "applies to --method vlb")
    one_error_line(run("--network", ideal, "--data", rgb_data, "--method", "ode", "--num", 6),
                   "--num 6 but the dataset holds 5 images")
    one_error_line(run("--data", rgb_data, "--method", "ode"), "holds 3x8x8 images but the network takes 1x32x32")
    one_error_line(run("--network", ideal, "--data", tmp_path / "missing", "--method", "ode"), "not found")
    one_error_line(run("--network", ideal, "--data", rgb_data, "--method", "ode", "--preset", "nope"), "unknown preset")
    conditional = tmp_path / "conditional.pt"
    save_model(IdealDenoiser(torch.zeros(2, 3, 8, 8), torch.tensor([0, 1]), label_dim=2), conditional)
    one_error_line(run("--network", conditional, "--data", rgb_data, "--method", "ode"),
                   "conditional on 2 classes but the dataset has no labels")


def test_every_option_has_help():
    assert all(option.help for option in nll.params if option.name != "help")
