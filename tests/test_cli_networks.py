"""Every checkpoint family through the CLI: `edm generate --network X` gives the same images as the same weights
after an `edm convert` round trip to the toolkit's format; `edm inspect` describes each file."""

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from edm_toolkit.cli import main


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.stderr
    return result


def edm_pickle_file(load_fixture, tmp_path):
    from test_edm_pickle import snapshot, toolkit_network, write_pickle

    fx = load_fixture("edm_precond_edm")
    return write_pickle(tmp_path / "network-snapshot-000000.pkl", snapshot(toolkit_network(fx, "edm"))), []


def guided_diffusion_file(load_fixture, tmp_path):
    """A plain state_dict .pt as guided-diffusion saves it; the architecture comes from --model-flags."""
    fx = load_fixture("gd_unet_legacy")
    path = tmp_path / "model.pt"
    torch.save(dict(fx.state_dict), path)
    flags = " ".join(f"--{k} {v}" for k, v in fx.meta["create_model_args"].items() if not k.startswith("__"))
    return path, ["--model-flags", flags + " --noise_schedule cosine --diffusion_steps 1000"]


def improved_diffusion_file(load_fixture, tmp_path):
    """An improved-diffusion state_dict (T = 4000, rescaled timesteps); flags in that code base's syntax."""
    fx = load_fixture("id_unet_rescaled")
    path = tmp_path / "model.pt"
    torch.save(dict(fx.state_dict), path)
    # Shapes give the architecture; what they cannot tell is passed as flags.
    flags = ("--image_size 16 --num_heads 4 --noise_schedule cosine --diffusion_steps 4000 --rescale_timesteps True "
             "--use_new_attention_order False")  # improved-diffusion always used the legacy order
    return path, ["--model-flags", flags]


def score_sde_file(load_fixture, tmp_path):
    """The original checkpoint dict {'optimizer', 'model', 'ema', 'step'}; the config as JSON."""
    import json

    fx = load_fixture("sde_ncsnpp_ve")
    path = tmp_path / "checkpoint_8.pth"
    torch.save(fx.state_dict, path)
    return path, ["--model-config", json.dumps(fx.meta["config"])]


FAMILIES = {"edm-pickle": edm_pickle_file, "guided-diffusion": guided_diffusion_file,
            "improved-diffusion": improved_diffusion_file, "score_sde": score_sde_file}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_generate_matches_converted_model(family, load_fixture, tmp_path):
    path, extra = FAMILIES[family](load_fixture, tmp_path)
    info = run("inspect", path, *extra)
    # guided- and improved-diffusion files share one format; given flags only, the file reads as guided-diffusion.
    expected = {"improved-diffusion": ("improved-diffusion", "guided-diffusion")}.get(family, (family,))
    assert info.stdout.split()[0] == "family" and info.stdout.split()[1] in expected
    native = tmp_path / "converted.pt"
    run("convert", path, native, *extra)
    common = ["--seeds", "0-3", "--steps", "3", "--batch", "2"] + (["--class", "1"] if family in ("edm-pickle", "guided-diffusion") else [])
    run("generate", "--network", path, "--outdir", tmp_path / "a", *extra, *common)
    run("generate", "--network", native, "--outdir", tmp_path / "b", *common)
    images = []
    for seed in range(4):
        a = np.asarray(Image.open(tmp_path / "a" / f"{seed:06d}.png"))
        b = np.asarray(Image.open(tmp_path / "b" / f"{seed:06d}.png"))
        assert np.array_equal(a, b), seed
        images.append(a)
    assert not np.array_equal(images[0], images[1])  # the network really drove the samples


def test_fast_path_stays_close_to_the_faithful_path(load_fixture):
    """channels_last (fp32) within 1e-3 relative error; bf16 autocast within a few percent."""
    from test_edm_pickle import toolkit_network

    from edm_toolkit.inference import InferenceOptions, optimize

    fx = load_fixture("edm_precond_vp")
    net = toolkit_network(fx, "vp")
    x, sigma, labels = fx.inputs["x"], fx.inputs["sigma"], fx.inputs["class_labels"]
    with torch.no_grad():
        reference = net(x, sigma, labels)
        for options, bound in ((InferenceOptions(channels_last=True), 1e-3), (InferenceOptions(precision="bf16"), 5e-2)):
            out = optimize(net, options)(x, sigma, labels)
            rel = float((out - reference).norm() / reference.norm())
            assert out.dtype == torch.float32 and rel < bound, (options, rel)
            net.to(memory_format=torch.contiguous_format)
