"""The CLI's issue-4 paths: the original discrete samplers, classifier(-free) guidance and autoguidance."""

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from edm_toolkit.checkpoints import save_model
from edm_toolkit.cli import main
from edm_toolkit.default_model import ideal_model


def run(*args, ok=True):
    result = CliRunner().invoke(main, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.stderr
    return result


def images(outdir, seeds):
    return [np.asarray(Image.open(outdir / f"{s:06d}.png")) for s in seeds]


def gd_files(load_fixture, tmp_path):
    """The fixture's guided-diffusion model and classifier, saved as the originals save them."""
    model, clf = load_fixture("gd_unet_legacy"), load_fixture("gd_classifier_attention")
    torch.save(dict(model.state_dict), tmp_path / "model.pt")
    torch.save(dict(clf.state_dict), tmp_path / "classifier.pt")
    flags = " ".join(f"--{k} {v}" for k, v in model.meta["create_model_args"].items() if not k.startswith("__"))
    kwargs = clf.meta["constructor_kwargs"]
    clf_flags = (f"--image_size 16 --classifier_width {kwargs['model_channels']} --classifier_depth "
                 f"{kwargs['num_res_blocks']} --classifier_attention_resolutions 16,8 --classifier_pool attention "
                 "--classifier_use_scale_shift_norm True --classifier_resblock_updown True "
                 f"--num_head_channels {kwargs['num_head_channels']} --channel_mult 1,2 --noise_schedule cosine "
                 "--diffusion_steps 1000")
    return tmp_path / "model.pt", flags + " --noise_schedule cosine --diffusion_steps 1000", tmp_path / "classifier.pt", clf_flags


def test_ddim_and_ddpm_through_the_cli(load_fixture, tmp_path):
    from edm_toolkit.generate import sample_batch
    from edm_toolkit.sampling import Sampler
    from edm_toolkit.io.images import to_uint8
    from edm_toolkit.loading import load_denoiser

    model, flags, _, _ = gd_files(load_fixture, tmp_path)
    run("generate", "--network", model, "--model-flags", flags, "--outdir", tmp_path / "ddim", "--seeds", "0-2",
        "--solver", "ddim", "--steps", "5", "--solver-opt", "eta=0.5", "--class", "3")
    net = load_denoiser(model, model_flags=flags)
    expected = to_uint8(sample_batch(net, Sampler(solver={"name": "ddim", "eta": 0.5}, num_steps=5), [0, 1, 2], "cpu",
                                     class_idx=3))
    assert all(np.array_equal(a, b) for a, b in zip(images(tmp_path / "ddim", range(3)), expected))
    run("generate", "--network", model, "--model-flags", flags, "--outdir", tmp_path / "ddpm", "--seeds", "0",
        "--solver", "ddpm", "--solver-opt", "respacing='10'")
    assert (tmp_path / "ddpm" / "000000.png").is_file()


def test_classifier_guidance_through_the_cli(load_fixture, tmp_path):
    model, flags, clf, clf_flags = gd_files(load_fixture, tmp_path)
    common = ["--network", model, "--model-flags", flags, "--seeds", "0-1", "--class", "2", "--steps", "5"]
    for solver in ("ddim", "heun"):
        run("generate", "--network", "ideal", *common, "--solver", solver, "--outdir", tmp_path / f"plain-{solver}")
        run("generate", "--network", "ideal", *common, "--solver", solver, "--outdir", tmp_path / f"zero-{solver}",
            "--classifier", clf, "--classifier-flags", clf_flags, "--classifier-scale", "0")
        run("generate", "--network", "ideal", *common, "--solver", solver, "--outdir", tmp_path / f"guided-{solver}",
            "--classifier", clf, "--classifier-flags", clf_flags, "--classifier-scale", "10")
        plain, zero, guided = (images(tmp_path / f"{k}-{solver}", range(2)) for k in ("plain", "zero", "guided"))
        assert all(np.array_equal(a, b) for a, b in zip(plain, zero))  # scale 0 is plain sampling
        assert not all(np.array_equal(a, b) for a, b in zip(plain, guided))


def test_classifier_free_and_autoguidance_identity_at_w1(tmp_path):
    weak = tmp_path / "weak.pt"
    save_model(ideal_model(), weak)
    common = ["--seeds", "0-3", "--steps", "5", "--class", "1"]
    run("generate", "--network", "ideal", *common, "--outdir", tmp_path / "plain")
    run("generate", "--network", "ideal", *common, "--outdir", tmp_path / "cfg1", "--guidance", "1")
    run("generate", "--network", "ideal", *common, "--outdir", tmp_path / "auto1", "--guidance", "1", "--guide-network", weak)
    run("generate", "--network", "ideal", *common, "--outdir", tmp_path / "cfg3", "--guidance", "3", "--guidance-interval", "0.1,10")
    plain = images(tmp_path / "plain", range(4))
    for other in ("cfg1", "auto1"):
        assert all(np.array_equal(a, b) for a, b in zip(plain, images(tmp_path / other, range(4))))


@pytest.mark.parametrize("args,message", [
    (["--guide-network", "x.pt"], "--guide-network needs a weight"),
    (["--classifier-scale", "2"], "add --classifier PATH"),
    (["--guidance-interval", "1,2"], "needs --guidance or --classifier"),
    (["--guidance", "2", "--guidance-interval", "a,b"], "is not LO,HI"),
    (["--solver", "ddim", "--disc", "edm"], "--disc does not apply to --solver ddim"),
    (["--solver", "ddim"], "has no discrete step grid"),
    (["--solver", "dpmpp_2m_sde", "--S_churn", "5"], "cannot take stochastic churn"),
])
def test_bad_guidance_and_solver_options(tmp_path, args, message):
    result = run("generate", "--network", "ideal", "--outdir", tmp_path, "--seeds", "0", *args, ok=False)
    lines = result.stderr.strip().splitlines()
    assert result.exit_code != 0 and lines[-1].startswith("Error: ") and message in lines[-1], result.stderr
