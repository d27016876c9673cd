"""The denoiser protocol: every model and wrapper declares it, wrappers forward every capability and modify
nothing, and the original discrete samplers run through every wrapper (issue 7's two bugs)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from PIL import Image

from edm_toolkit.adapters.openai import load_openai_checkpoint, load_openai_classifier
from edm_toolkit.cli import main
from edm_toolkit.default_model import ideal_model
from edm_toolkit.errors import ConfigError
from edm_toolkit.guidance import AutoGuidance, ClassifierFreeGuidance, ClassifierGuidance
from edm_toolkit.inference import FastDenoiser, InferenceOptions
from edm_toolkit.precond import PRECONDITIONERS
from edm_toolkit.protocol import Denoiser, DenoiserBase, check_denoiser
from edm_toolkit.sampling import Sampler
from edm_toolkit.solvers.discrete import DDIM, DDPM

pytestmark = pytest.mark.usefixtures("one_thread")

from gd_fixture_flags import CLASSIFIER_FLAGS, MODEL_FLAGS, NUM_CLASSES  # noqa: E402


@pytest.fixture(scope="module")
def net(load_fixture):
    """guided-diffusion's 16x16 fixture network: a step grid of 1000 cosine steps and a learned variance."""
    return load_openai_checkpoint(load_fixture("gd_unet_legacy").state_dict, model_flags=MODEL_FLAGS)


@pytest.fixture(scope="module")
def classifier(load_fixture):
    return load_openai_classifier(load_fixture("gd_classifier_attention").state_dict, model_flags=CLASSIFIER_FLAGS)


def wrappers(net, classifier):
    """Every wrapper of the toolkit around ``net``, as (name, wrapped)."""
    weak = load_openai_checkpoint({k: 0.9 * v for k, v in net.model.state_dict().items()}, model_flags=MODEL_FLAGS)
    return [
        ("bf16", FastDenoiser(net, InferenceOptions(precision="bf16"))),
        ("channels_last", FastDenoiser(net, InferenceOptions(channels_last=True))),
        ("classifier-free", ClassifierFreeGuidance(net, 2.0)),
        ("autoguidance", AutoGuidance(net, weak, 2.0)),
        ("classifier", ClassifierGuidance(net, classifier, 2.0)),
        ("nested", ClassifierFreeGuidance(FastDenoiser(net, InferenceOptions(channels_last=True)), 1.5)),
    ]


def test_every_denoiser_declares_the_protocol(net, classifier):
    models = [ideal_model(), net, *(PRECONDITIONERS.get(n)(img_resolution=8, img_channels=3)
                                      for n in PRECONDITIONERS.names())]
    for model in models + [w for _, w in wrappers(net, classifier)]:
        assert isinstance(model, Denoiser), type(model).__name__
        check_denoiser(model)
    assert ideal_model().step_grid is None and not ideal_model().learned_variance
    assert PRECONDITIONERS.get("iddpm")().step_grid.num_timesteps == 1000
    with pytest.raises(ConfigError, match="does not implement the denoiser protocol"):
        Sampler().plan(lambda x, sigma: x)


def test_wrappers_forward_every_capability(net, classifier):
    for name, wrapped in wrappers(net, classifier):
        grid = wrapped.step_grid  # the fast path's private copy of the network has an equal grid
        assert torch.equal(grid.alphas_cumprod, net.step_grid.alphas_cumprod) and wrapped.learned_variance, name
        assert (wrapped.img_channels, wrapped.img_resolution, wrapped.label_dim, wrapped.augment_dim) == (
            3, 16, NUM_CLASSES, 0), name
        assert (wrapped.sigma_min, wrapped.sigma_max) == (net.sigma_min, net.sigma_max), name
        levels = torch.tensor([0.01, 0.5, 30.0], dtype=torch.float64)
        assert torch.equal(wrapped.round_sigma(levels), net.round_sigma(levels)), name
        assert DDPM().variance_of(wrapped.step_grid) == "learned", name  # 'auto' stays learned (issue 7, bug 2)


def test_learned_variance_passes_through_unchanged(net, classifier):
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    sigma, labels = torch.tensor(2.0, dtype=torch.float64), torch.eye(NUM_CLASSES)[[3, 8]]
    with torch.no_grad():
        D, v = net.denoise_with_variance(x, sigma, labels)
        for name, wrapped in wrappers(net, classifier):
            D_w, v_w = wrapped.denoise_with_variance(x, sigma, labels)
            tolerance = 0.15 if name == "bf16" else 1e-5  # bf16 (8-bit mantissa) through a random-weight network
            torch.testing.assert_close(v_w, v, rtol=tolerance, atol=tolerance, msg=name)
            torch.testing.assert_close(D_w, wrapped(x, sigma, labels), rtol=1e-6, atol=1e-6, msg=name)
            if name in ("classifier-free", "autoguidance", "classifier"):
                assert not torch.allclose(D_w, D), name  # guided D, the model's own v


def test_grid_solvers_run_through_every_wrapper(net, classifier):
    latents, labels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2)), torch.eye(10)[[1, 7]]
    for name, wrapped in wrappers(net, classifier):
        for solver in (DDIM(respacing="ddim3"), DDPM(respacing="3")):
            with torch.no_grad():
                images = Sampler(solver=solver)(wrapped, latents, labels, randn_like=torch.zeros_like)
            assert images.shape == latents.shape and bool(images.isfinite().all()), (name, solver.name)
    # At w = 1 classifier-free guidance is the plain model, learned variance included, bit for bit.
    ddpm = Sampler(solver=DDPM(respacing="3"))
    with torch.no_grad():
        assert torch.equal(ddpm(ClassifierFreeGuidance(net, 1.0), latents, labels, randn_like=torch.zeros_like),
                           ddpm(net, latents, labels, randn_like=torch.zeros_like))


def test_fast_path_leaves_the_wrapped_network_alone(net):
    before = {k: (v.clone(), v.stride()) for k, v in net.state_dict().items()}
    fast = FastDenoiser(net, InferenceOptions(channels_last=True))
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        fast(x, 1.0, torch.eye(NUM_CLASSES)[:1])
    for key, value in net.state_dict().items():
        assert value.stride() == before[key][1] and torch.equal(value, before[key][0]), key
    assert fast.denoiser is not net and isinstance(net, DenoiserBase)


def test_ddim_and_ddpm_through_the_fast_path_on_the_cli(load_fixture, tmp_path):
    """`--solver ddim --precision bf16` (and --channels-last) once failed: the wrapper hid the step grid."""
    fx = load_fixture("gd_unet_legacy")
    model = tmp_path / "model.pt"
    torch.save(dict(fx.state_dict), model)
    flags = " ".join(f"--{k} {v}" for k, v in fx.meta["create_model_args"].items() if not k.startswith("__"))
    flags += " --noise_schedule cosine --diffusion_steps 1000"
    common = ["generate", "--network", str(model), "--model-flags", flags, "--seeds", "0-1", "--steps", "3",
              "--class", "4"]
    results = {}
    for solver, extra in (("ddim", []), ("ddim", ["--precision", "bf16"]), ("ddpm", ["--channels-last"]),
                          ("ddpm", ["--guidance", "1.5"]), ("ddpm", [])):
        outdir = tmp_path / f"{solver}{''.join(extra)}"
        result = CliRunner().invoke(main, [*common, "--solver", solver, "--outdir", str(outdir), *extra])
        assert result.exit_code == 0, result.stderr
        results[(solver, tuple(extra))] = [np.asarray(Image.open(outdir / f"{s:06d}.png")) for s in (0, 1)]
    # channels_last computes the same images as the plain path up to float round-off (one grey level).
    for a, b in zip(results[("ddpm", ("--channels-last",))], results[("ddpm", ())]):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_guidance_cost_is_counted_through_nested_wrappers(net):
    inner = ClassifierFreeGuidance(net, 2.0)
    outer = FastDenoiser(inner, InferenceOptions(channels_last=True))
    assert inner.network_evaluations(1.0) == 2 and outer.network_evaluations(1.0) == 2
    assert ClassifierFreeGuidance(inner, 3.0).network_evaluations(1.0) == 4
    with torch.no_grad():
        counts = []
        Sampler(solver="euler", num_steps=3)(outer, torch.randn(1, 3, 16, 16), torch.eye(10)[:1],
                                             callback=lambda info: counts.append(info.nfe))
    assert counts == [2, 4, 6]


def test_the_unconditional_reference_is_zeros(net):
    """Classifier-free guidance's reference is D for an all-zero label vector (EDM's label dropout)."""
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    labels = F.one_hot(torch.tensor([5]), NUM_CLASSES).float()
    with torch.no_grad():
        D_c, D_u = net(x, 1.0, labels), net(x, 1.0, torch.zeros_like(labels))
        torch.testing.assert_close(ClassifierFreeGuidance(net, 3.0)(x, 1.0, labels), D_u + 3 * (D_c - D_u))
