"""guided-/improved-diffusion checkpoints as EDM denoisers, against the reference fixtures (sections B, C)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from edm_toolkit.adapters.openai import (
    OpenAIDenoiser,
    OpenAIDiffusion,
    inspect_openai_checkpoint,
    is_openai_state_dict,
    load_openai_checkpoint,
    load_openai_classifier,
)
from edm_toolkit.discrete import named_beta_schedule
from edm_toolkit.adapters.openai_flags import RELEASED_CHECKPOINTS, format_model_flags, released_network
from edm_toolkit.checkpoints import save_model
from edm_toolkit.errors import CheckpointError
from edm_toolkit.loading import load_model

FIXTURE_CLASSES = 10  # the fixtures were generated with script_util.NUM_CLASSES = 10
# What the weights of the 16x16 fixtures cannot tell (gd_unet_legacy: legacy attention order, 2 heads).
LEGACY_UNKNOWNS = ("--image_size 16 --num_heads 2 --use_new_attention_order False --noise_schedule cosine "
                   "--diffusion_steps 1000 --rescale_timesteps False")


def _legacy_flags(meta) -> str:
    """gd_unet_legacy's create_model flags, as the command line its scripts would get (gd_sampling's diffusion)."""
    flags = {k: v for k, v in meta["create_model_args"].items() if not k.startswith("__")}
    return format_model_flags(flags) + " --noise_schedule cosine --diffusion_steps 1000"


def _to_edm(x_t: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """EDM's x = x_t * sqrt(1 + sigma^2) for a VP sample x_t at noise level sigma (one per row)."""
    return (x_t.double() * (1 + sigma**2).sqrt().reshape(-1, 1, 1, 1)).float()


def _assert_D_close(actual, expected, sigma, tol) -> None:
    """D errors are network errors times sigma: scale atol by max(1, sigma) per row."""
    scale = sigma.clamp(min=1).reshape(-1, 1, 1, 1)
    excess = (actual.double() - expected.double()).abs() - tol["atol"] * scale - tol["rtol"] * expected.double().abs()
    assert excess.max() <= 0, f"D differs by up to {excess.max().item():.3g} beyond tolerance"


def _recorded_timesteps(denoiser: OpenAIDenoiser) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    denoiser.model.register_forward_pre_hook(lambda module, args: seen.append(args[1].detach().clone()))
    return seen


@pytest.fixture(scope="module")
def legacy(load_fixture):
    return load_fixture("gd_unet_legacy")


@pytest.fixture(scope="module")
def legacy_denoiser(legacy):
    return load_openai_checkpoint(legacy.state_dict, model_flags=_legacy_flags(legacy.meta))


@pytest.fixture
def legacy_file(legacy, tmp_path):
    path = tmp_path / "model.pt"
    torch.save(dict(legacy.state_dict), path)  # the original layout: a plain state_dict
    return path


# ---- schedules


def test_beta_schedules_are_the_originals(load_fixture):
    sampling, improved = load_fixture("gd_sampling"), load_fixture("id_unet_rescaled")
    assert torch.equal(named_beta_schedule("cosine", 1000), sampling.outputs["base_betas_cosine_1000"])
    for key, betas in improved.outputs["beta_schedules"].items():
        name, steps = key.split("_")
        torch.testing.assert_close(named_beta_schedule(name, int(steps)), betas, rtol=1e-12, atol=1e-15)
    diffusion = OpenAIDiffusion("cosine", 1000, learn_sigma=True)
    for spaced in sampling.outputs["spaced_diffusions"].values():  # respaced chains keep abar at their steps
        torch.testing.assert_close(diffusion.alphas_cumprod[spaced["timestep_map"]], spaced["alphas_cumprod"],
                                   rtol=1e-8, atol=0)
    sigmas = diffusion.sigmas
    assert sigmas.dtype == torch.float64 and bool((sigmas.diff() > 0).all())
    torch.testing.assert_close(sigmas**2, (1 - diffusion.alphas_cumprod) / diffusion.alphas_cumprod)


def test_timestep_conventions():
    t = torch.tensor([0, 1234, 3999])
    assert torch.equal(OpenAIDiffusion(diffusion_steps=4000).scale_timesteps(t), t)
    rescaled = OpenAIDiffusion(diffusion_steps=4000, rescale_timesteps=True).scale_timesteps(t)
    assert rescaled.dtype == torch.float32 and rescaled.tolist() == [0.0, 308.5, 999.75]


# ---- D of the adapter equals what the original computes


def test_guided_denoiser_is_x_minus_sigma_eps(legacy, legacy_denoiser):
    den, out = legacy_denoiser, legacy.outputs["out"]
    assert (den.label_dim, den.img_resolution, den.img_channels, den.step_grid.num_timesteps) == (FIXTURE_CLASSES, 16, 3, 1000)
    assert den.learned_variance and not den.diffusion.rescale_timesteps and den.diffusion.model_var_type == "learned_range"
    t, y = legacy.inputs["t"], legacy.inputs["y"]
    sigma = den.step_grid.sigmas[t]
    x = _to_edm(legacy.inputs["x"], sigma)
    seen = _recorded_timesteps(den)
    D, extra = den.denoise_with_variance(x, sigma, F.one_hot(y, FIXTURE_CLASSES).float())
    assert torch.equal(seen[-1], t.float())  # the original step index, unscaled
    _assert_D_close(D, x.double() - sigma.reshape(-1, 1, 1, 1) * out[:, :3].double(), sigma, legacy.meta["tolerance"])
    torch.testing.assert_close(extra, out[:, 3:], rtol=1e-4, atol=1e-4)  # learned-variance values v
    torch.testing.assert_close(den.model_output(legacy.inputs["x"], t, y), out, rtol=1e-4, atol=1e-4)
    assert torch.equal(den.round_sigma(sigma * 1.0001), sigma)


def test_improved_rescaled_T4000_matches_p_mean_variance(load_fixture):
    fx = load_fixture("id_unet_rescaled")
    unknowns = "--image_size 16 --num_heads 4 --noise_schedule cosine --diffusion_steps 4000 --rescale_timesteps True"
    den = load_openai_checkpoint(fx.state_dict, codebase="improved", model_flags=unknowns)
    assert den.step_grid.num_timesteps == 4000 and den.diffusion.rescale_timesteps and den.family == "improved-diffusion"
    seen = _recorded_timesteps(den)
    x_t, results = fx.inputs["x"], {}
    for run, expected in fx.outputs["p_mean_variance"].items():
        t = expected["timestep_map"][expected["t"]]  # respaced runs still use the original step indices
        sigma = den.step_grid.sigmas[t]
        if tuple(t.tolist()) not in results:
            results[tuple(t.tolist())] = den.denoise_with_variance(_to_edm(x_t, sigma), sigma)
            assert torch.equal(seen[-1], expected["network_timesteps"]), run
        D, extra = results[tuple(t.tolist())]
        if fx.meta["runs"][run]["clip_denoised"]:
            D = D.clamp(-1, 1)
        _assert_D_close(D, expected["pred_xstart"], sigma, fx.meta["tolerance"]["p_mean_variance"])
        torch.testing.assert_close(extra, expected["network_output"][:, 3:], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(den.model_output(x_t, t), expected["network_output"], rtol=1e-4, atol=1e-4)


# ---- resolving the architecture


def test_flag_string_path(legacy, legacy_file):
    den = load_openai_checkpoint(legacy_file, model_flags=_legacy_flags(legacy.meta))
    assert not den.training and not any(p.requires_grad for p in den.parameters())
    assert den.flags["noise_schedule"] == "cosine" and den.family == "guided-diffusion"
    x, t, y = (legacy.inputs[k] for k in "xty")
    torch.testing.assert_close(den.model_output(x, t, y), legacy.outputs["out"], rtol=1e-4, atol=1e-4)


def test_flags_that_omit_the_codebase_must_name_it(legacy_file):
    with pytest.raises(CheckpointError, match="codebase='guided' or codebase='improved'"):
        load_openai_checkpoint(legacy_file, model_flags="--image_size 16 --num_channels 32 --learn_sigma True")


def test_inference_refuses_what_the_weights_cannot_tell(legacy_file):
    with pytest.raises(CheckpointError) as info:
        load_openai_checkpoint(legacy_file)
    message = str(info.value)
    assert "\n" not in message and "--model-flags '" in message
    for flag in ("--use_new_attention_order", "--noise_schedule", "--rescale_timesteps", "--diffusion_steps",
                 "--num_heads", "--image_size"):
        assert flag in message
    with pytest.raises(CheckpointError, match="cannot tell --use_new_attention_order: "):
        load_openai_checkpoint(legacy_file, model_flags=LEGACY_UNKNOWNS.replace("--use_new_attention_order False", ""))


def test_inference_with_only_the_unknowable_flags(legacy, legacy_file, load_fixture):
    den = load_openai_checkpoint(legacy_file, model_flags=LEGACY_UNKNOWNS)
    inferred = {k: den.flags[k] for k in ("num_channels", "num_res_blocks", "channel_mult", "attention_resolutions",
                                          "learn_sigma", "class_cond", "resblock_updown", "use_scale_shift_norm")}
    assert inferred == dict(num_channels=32, num_res_blocks=1, channel_mult=(1, 2), attention_resolutions=(8,),
                            learn_sigma=True, class_cond=True, resblock_updown=True, use_scale_shift_norm=True)
    x, t, y = (legacy.inputs[k] for k in "xty")
    torch.testing.assert_close(den.model_output(x, t, y), legacy.outputs["out"], rtol=1e-4, atol=1e-4)
    # Same weights, new qkv order: only the flag tells them apart (gd_unet_neworder).
    neworder = load_openai_checkpoint(
        legacy_file, model_flags=LEGACY_UNKNOWNS.replace("--num_heads 2", "--num_head_channels 16")
        .replace("--use_new_attention_order False", "--use_new_attention_order True"))
    expected = load_fixture("gd_unet_neworder").outputs["out"]
    torch.testing.assert_close(neworder.model_output(x, t, y), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("file_name", ["64x64_diffusion.pt", "512x512_diffusion.pt", "cifar10_uncond_50M_500K.pt",
                                       "64_256_upsampler.pt"])
def test_inference_recovers_released_layouts(file_name):
    """On meta tensors: the shapes alone plus the unknowable flags give the registry's network."""
    entry = RELEASED_CHECKPOINTS[file_name]
    with torch.device("meta"):
        state_dict = released_network(file_name).state_dict()
    published = inspect_openai_checkpoint(state_dict, file_name=file_name)
    flags = published["flags"]
    size = "large_size" if "large_size" in entry["flags"] else "image_size"
    unknowns = {k: flags[k] for k in ("noise_schedule", "diffusion_steps", "rescale_timesteps", "num_heads",
                                      "num_head_channels", size) if k in flags}
    if entry["codebase"] == "guided" and entry["kind"] == "diffusion":  # upsamplers have no such flag
        unknowns["use_new_attention_order"] = flags["use_new_attention_order"]
    inferred = inspect_openai_checkpoint(state_dict, model_flags=unknowns, codebase=entry["codebase"])
    assert inferred["resolved_from"] == "weights" and published["resolved_from"] == f"registry:{file_name}"
    for key in ("architecture", "parameters", "label_dim", "img_resolution", "sigma_min", "sigma_max", "family"):
        assert inferred[key] == published[key], key


def test_registry_by_file_name(tmp_path, legacy):
    with torch.device("meta"):
        state_dict = released_network("64x64_diffusion.pt").state_dict()
    info = inspect_openai_checkpoint(state_dict, file_name="64x64_diffusion.pt")
    assert info["family"] == "guided-diffusion" and info["architecture"] == "UNetModel"
    assert (info["label_dim"], info["img_resolution"], info["img_channels"]) == (1000, 64, 3)
    assert info["flags"]["use_new_attention_order"] and info["flags"]["noise_schedule"] == "cosine"
    assert round(info["parameters"] / 1e6, 1) == 295.9
    assert info["sigma_max"] == pytest.approx(20291.17, rel=1e-6)
    wrong = tmp_path / "64x64_diffusion.pt"
    torch.save(dict(legacy.state_dict), wrong)
    with pytest.raises(CheckpointError, match=r"do not match .*registry:64x64_diffusion.pt.*(missing|wrong shape)"):
        load_openai_checkpoint(wrong)
    with pytest.raises(CheckpointError, match="unknown released checkpoint"):
        load_openai_checkpoint(legacy.state_dict, file_name="no_such_model.pt")


def test_mismatched_flags_name_the_keys(legacy_file):
    flags = LEGACY_UNKNOWNS + " --num_channels 64 --channel_mult 1,2 --attention_resolutions 8 --num_res_blocks 1"
    with pytest.raises(CheckpointError, match=r"wrong shape \d+: time_embed"):
        load_openai_checkpoint(legacy_file, model_flags=flags)


def test_superres_by_inference(load_fixture):
    fx = load_fixture("gd_superres")
    state_dict = {**load_fixture("gd_unet_legacy").state_dict, **fx.state_dict}
    den = load_openai_checkpoint(state_dict, model_flags=LEGACY_UNKNOWNS.replace("--image_size", "--large_size"))
    assert type(den.model).__name__ == "SuperResModel" and den.img_resolution == 16
    t, y, low_res = fx.inputs["t"], fx.inputs["y"], fx.inputs["low_res"]
    sigma = den.step_grid.sigmas[t]
    D = den(_to_edm(fx.inputs["x"], sigma), sigma, F.one_hot(y, FIXTURE_CLASSES).float(), low_res=low_res)
    expected = _to_edm(fx.inputs["x"], sigma).double() - sigma.reshape(-1, 1, 1, 1) * fx.outputs["out"][:, :3].double()
    _assert_D_close(D, expected, sigma, fx.meta["tolerance"])


def test_classifier_with_flags(load_fixture, tmp_path):
    fx = load_fixture("gd_classifier_attention")
    flags = ("--image_size 16 --classifier_width 32 --classifier_depth 1 --classifier_attention_resolutions 16,8 "
             "--classifier_pool attention --num_head_channels 16 --channel_mult 1,2")
    classifier = load_openai_classifier(fx.state_dict, model_flags=flags)
    assert classifier.num_classes == FIXTURE_CLASSES and not classifier.diffusion.rescale_timesteps
    logits = classifier(fx.inputs["x"], fx.inputs["t"])
    torch.testing.assert_close(logits, fx.outputs["logits"], rtol=1e-4, atol=1e-4)
    sigma = classifier.step_grid.sigmas[fx.inputs["t"]]
    torch.testing.assert_close(classifier.edm_logits(_to_edm(fx.inputs["x"], sigma), sigma), fx.outputs["logits"],
                               rtol=1e-4, atol=1e-4)
    with pytest.raises(CheckpointError, match="load_openai_classifier"):
        load_openai_checkpoint(fx.state_dict)
    with pytest.raises(CheckpointError, match="cannot be inferred"):
        load_openai_classifier(fx.state_dict)
    with torch.device("meta"):
        state_dict = released_network("64x64_classifier.pt").state_dict()
    info = inspect_openai_checkpoint(state_dict, file_name="64x64_classifier.pt")
    assert info["architecture"] == "EncoderUNetModel" and info["flags"]["noise_schedule"] == "cosine"


# ---- the toolkit's own model files


def test_native_round_trip_is_bit_identical(legacy, legacy_denoiser, tmp_path):
    save_model(legacy_denoiser, tmp_path / "gd.edm")
    restored = load_model(tmp_path / "gd.edm")
    assert isinstance(restored, OpenAIDenoiser) and restored.diffusion == legacy_denoiser.diffusion
    assert torch.equal(restored.diffusion.betas, legacy_denoiser.diffusion.betas) and restored.flags["class_cond"]
    sigma = torch.tensor([0.05, 1.3, 80.0])
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2
    labels = F.one_hot(torch.tensor([0, 3, 9]), FIXTURE_CLASSES).float()
    D, extra = legacy_denoiser.denoise_with_variance(x, sigma, labels)
    D2, extra2 = restored.denoise_with_variance(x, sigma, labels)
    assert torch.equal(D, D2) and torch.equal(extra, extra2) and extra.shape == (3, 3, 16, 16)


# ---- malformed inputs


class _Code:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_malformed_files(tmp_path, legacy):
    assert is_openai_state_dict(legacy.state_dict)
    assert not is_openai_state_dict({"a": torch.zeros(1)}) and not is_openai_state_dict([torch.zeros(1)])
    torch.save({"state_dict": dict(legacy.state_dict)}, tmp_path / "wrapped.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    torch.save({"weights": _Code()}, tmp_path / "code.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    cases = {"wrapped.pt": "not a guided/improved-diffusion state_dict", "list.pt": "found a list",
             "code.pt": "refers to Python code", "junk.pt": "not a readable torch checkpoint",
             "missing.pt": "not found"}
    for name, message in cases.items():
        with pytest.raises(CheckpointError, match=message):
            load_openai_checkpoint(tmp_path / name)
    with pytest.raises(CheckpointError, match="unknown flag --not_a_flag"):
        load_openai_checkpoint(legacy.state_dict, model_flags="--not_a_flag 3")
    with pytest.raises(CheckpointError, match="unknown flag --bogus"):
        load_openai_checkpoint(legacy.state_dict, model_flags={"bogus": 1})
