"""ADM networks of guided-diffusion / improved-diffusion against the reference fixtures (section B, C13)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from edm_toolkit.adapters.openai_flags import (
    RELEASED_CHECKPOINTS,
    classifier_from_flags,
    create_model,
    format_model_flags,
    model_from_flags,
    parse_model_flags,
    released_network,
)
from edm_toolkit.networks.openai_unet import EncoderUNetModel, SuperResModel, UNetModel

FIXTURE_CLASSES = 10  # the fixtures were generated with script_util.NUM_CLASSES = 10


def _flags(meta: dict) -> dict:
    return {k: v for k, v in meta["create_model_args"].items() if not k.startswith("__")}


def _shapes(module: torch.nn.Module) -> dict:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _loaded(net: torch.nn.Module, state_dict: dict) -> torch.nn.Module:
    net.load_state_dict(state_dict, strict=True)
    return net.eval()


def _close(actual, expected, tol: dict) -> None:
    torch.testing.assert_close(actual, expected, rtol=tol["rtol"], atol=tol["atol"])


def _weights(load_fixture, name: str) -> dict:
    """Resolve `state_dict_from` as described in fixtures/README.md."""
    fx = load_fixture(name)
    source = {
        "gd_unet_neworder": "gd_unet_legacy",
        "gd_superres": "gd_unet_legacy",
        "gd_classifier_adaptive": "gd_classifier_attention",
    }.get(name)
    if source is None:
        return fx.state_dict
    if name == "gd_classifier_adaptive":
        base = {k: v for k, v in load_fixture(source).state_dict.items() if not k.startswith("out.")}
    else:
        base = dict(load_fixture(source).state_dict)
    base.update(fx.state_dict)
    return base


def _legacy_net(load_fixture) -> tuple[UNetModel, object]:
    fx = load_fixture("gd_unet_legacy")
    net = model_from_flags(_flags(fx.meta), num_classes=FIXTURE_CLASSES)
    return _loaded(net, fx.state_dict), fx


# ---------------------------------------------------------------------------------------------
# guided-diffusion U-Nets built through the flag path


@pytest.mark.parametrize("name", ["gd_unet_legacy", "gd_unet_neworder", "gd_unet_plain"])
def test_unet_matches_original(load_fixture, name):
    fx = load_fixture(name)
    net = model_from_flags(_flags(fx.meta), num_classes=FIXTURE_CLASSES)
    direct = UNetModel(**fx.meta["unet_model_kwargs"])
    assert _shapes(net) == _shapes(direct)
    _loaded(net, _weights(load_fixture, name))
    y = fx.inputs.get("y")
    with torch.no_grad():
        out = net(fx.inputs["x"], fx.inputs["t"], y)
    _close(out, fx.outputs["out"], fx.meta["tolerance"])


def test_flag_string_path_equals_dict_path(load_fixture):
    fx = load_fixture("gd_unet_legacy")
    from_string = model_from_flags(format_model_flags(_flags(fx.meta)), num_classes=FIXTURE_CLASSES)
    _loaded(from_string, fx.state_dict)
    with torch.no_grad():
        out = from_string(fx.inputs["x"], fx.inputs["t"], fx.inputs["y"])
    _close(out, fx.outputs["out"], fx.meta["tolerance"])


def test_wrong_attention_order_loads_silently_but_differs(load_fixture):
    """Legacy weights load strictly into a new-order model, and give a different output."""
    fx = load_fixture("gd_unet_legacy")
    flags = dict(_flags(fx.meta), use_new_attention_order=True)
    wrong = _loaded(model_from_flags(flags, num_classes=FIXTURE_CLASSES), fx.state_dict)
    with torch.no_grad():
        out = wrong(fx.inputs["x"], fx.inputs["t"], fx.inputs["y"])
    assert (out - fx.outputs["out"]).abs().max() > 1e-2


# ---------------------------------------------------------------------------------------------
# noisy classifiers


def _cond_fn_grad(classifier, x, t, y):
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        log_probs = F.log_softmax(classifier(x, t), dim=-1)
        selected = log_probs[torch.arange(len(y)), y]
        return torch.autograd.grad(selected.sum(), x)[0]


@pytest.mark.parametrize("name", ["gd_classifier_attention", "gd_classifier_adaptive"])
def test_classifier_matches_original(load_fixture, name):
    fx = load_fixture(name)
    meta = fx.meta
    flags = dict(meta["create_classifier_equivalent"], image_size=meta["constructor_kwargs"]["image_size"])
    net = classifier_from_flags(flags, num_classes=FIXTURE_CLASSES, num_head_channels=16, channel_mult="1,2")
    assert _shapes(net) == _shapes(EncoderUNetModel(**meta["constructor_kwargs"]))
    _loaded(net, _weights(load_fixture, name))
    x, t, y = fx.inputs["x"], fx.inputs["t"], fx.inputs["y"]
    with torch.no_grad():
        logits = net(x, t)
    _close(logits, fx.outputs["logits"], meta["tolerance"]["logits"])
    _close(_cond_fn_grad(net, x, t, y), fx.outputs["cond_fn_grad"], meta["tolerance"]["cond_fn_grad"])


@pytest.mark.parametrize("pool", ["spatial", "spatial_v2"])
def test_spatial_pool_heads_run(pool):
    net = EncoderUNetModel(16, 3, 32, 5, 1, (2,), channel_mult=(1, 2), num_head_channels=16, pool=pool)
    logits = net(torch.randn(2, 3, 16, 16), torch.tensor([3, 7]))
    assert logits.shape == (2, 5)


# ---------------------------------------------------------------------------------------------
# super-resolution


def test_superres_matches_original(load_fixture):
    fx = load_fixture("gd_superres")
    legacy_flags = _flags(load_fixture("gd_unet_legacy").meta)
    sr_flags = {k: v for k, v in legacy_flags.items() if k not in ("image_size", "use_new_attention_order")}
    sr_flags.update(large_size=16, small_size=8)
    net = model_from_flags(sr_flags, num_classes=FIXTURE_CLASSES)
    assert isinstance(net, SuperResModel)
    assert _shapes(net) == _shapes(SuperResModel(**fx.meta["constructor_kwargs"]))
    _loaded(net, _weights(load_fixture, "gd_superres"))

    seen = {}
    hook = net.input_blocks[0][0].register_forward_pre_hook(lambda _m, args: seen.setdefault("input", args[0]))
    with torch.no_grad():
        out = net(fx.inputs["x"], fx.inputs["t"], low_res=fx.inputs["low_res"], y=fx.inputs["y"])
    hook.remove()
    tol = fx.meta["tolerance"]
    _close(out, fx.outputs["out"], tol)
    torch.testing.assert_close(seen["input"][:, :3], fx.inputs["x"])
    _close(seen["input"][:, 3:], fx.outputs["upsampled_low_res"], tol)


# ---------------------------------------------------------------------------------------------
# improved-diffusion


def test_improved_diffusion_unet_matches_original(load_fixture):
    fx = load_fixture("id_unet_rescaled")
    kwargs = fx.meta["constructor_kwargs"]
    direct = _loaded(UNetModel.from_improved_diffusion(**kwargs), fx.state_dict)
    flags = dict(
        image_size=16,
        channel_mult="1,1",
        attention_resolutions="16,8",
        num_channels=kwargs["model_channels"],
        num_res_blocks=kwargs["num_res_blocks"],
        num_heads=kwargs["num_heads"],
        learn_sigma=True,
        dropout=0.0,
    )  # the other flags keep improved-diffusion's defaults (use_scale_shift_norm True, num_heads_upsample -1)
    via_flags = _loaded(model_from_flags(flags, codebase="improved"), fx.state_dict)
    tol = fx.meta["tolerance"]["network"]
    for run in fx.outputs["p_mean_variance"].values():
        with torch.no_grad():
            for net in (direct, via_flags):
                _close(net(fx.inputs["x"], run["network_timesteps"]), run["network_output"], tol)


def test_improved_codebase_rejects_guided_only_options():
    with pytest.raises(ValueError, match="use_new_attention_order"):
        create_model(64, 128, 2, use_new_attention_order=True, codebase="improved")
    with pytest.raises(ValueError, match="unsupported image size 128"):
        create_model(128, 128, 2, codebase="improved")


# ---------------------------------------------------------------------------------------------
# flags


README_64 = (
    "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --dropout 0.1 --image_size 64 "
    "--learn_sigma True --noise_schedule cosine --num_channels 192 --num_head_channels 64 --num_res_blocks 3 "
    "--resblock_updown True --use_new_attention_order True --use_fp16 True --use_scale_shift_norm True"
)


def test_parse_model_flags_round_trip():
    flags = parse_model_flags(README_64 + " --timestep_respacing 250 --classifier_scale 1.0 --num_heads_upsample -1")
    assert flags["attention_resolutions"] == "32,16,8"
    assert flags["class_cond"] is True and flags["use_fp16"] is True
    assert flags["dropout"] == 0.1 and flags["num_channels"] == 192 and flags["num_heads_upsample"] == -1
    assert flags["timestep_respacing"] == "250" and flags["classifier_scale"] == 1.0
    assert parse_model_flags(format_model_flags(flags)) == flags
    empty = parse_model_flags("--timestep_respacing '' --channel_mult ''")
    assert empty == {"timestep_respacing": "", "channel_mult": ""}


def test_parse_model_flags_argparse_semantics():
    assert parse_model_flags("--class_cond yes --learn_sigma 0 --use_fp16 F") == {
        "class_cond": True,
        "learn_sigma": False,
        "use_fp16": False,
    }
    assert parse_model_flags("--num_channels=64 --num_channels 96") == {"num_channels": 96}
    with pytest.raises(ValueError, match="boolean value expected"):
        parse_model_flags("--class_cond maybe")
    with pytest.raises(ValueError, match="--num_channels"):
        parse_model_flags("--num_channels 19.5")
    with pytest.raises(ValueError, match="expects a value"):
        parse_model_flags("--image_size --class_cond True")


def test_unknown_flag_is_named_with_the_valid_ones():
    with pytest.raises(ValueError) as err:
        parse_model_flags("--image_size 64 --num_chanels 192")
    message = str(err.value)
    assert "--num_chanels" in message and "--num_channels" in message and "--attention_resolutions" in message
    with pytest.raises(ValueError, match="--bogus"):
        model_from_flags({"bogus": 1})


# ---------------------------------------------------------------------------------------------
# released configurations


@pytest.mark.parametrize("file_name", [k for k, v in RELEASED_CHECKPOINTS.items() if v["params"]])
def test_released_parameter_counts(file_name):
    with torch.device("meta"):
        net = released_network(file_name)
    count = sum(p.numel() for p in net.parameters())
    assert f"{count / 1e6:.1f}M" == RELEASED_CHECKPOINTS[file_name]["params"]


@pytest.mark.parametrize(
    "file_name, millions",
    [("imagenet64_cond_270M_250K.pt", 270), ("upsample_cond_500K.pt", 280), ("cifar10_uncond_50M_500K.pt", 50)],
)
def test_improved_released_sizes_match_their_names(file_name, millions):
    with torch.device("meta"):
        net = released_network(file_name)
    assert round(sum(p.numel() for p in net.parameters()) / 1e7) * 10 == millions


def test_released_registry():
    expected = {
        "64x64_diffusion.pt", "64x64_classifier.pt", "128x128_diffusion.pt", "256x256_diffusion.pt",
        "256x256_diffusion_uncond.pt", "256x256_classifier.pt", "512x512_diffusion.pt", "512x512_classifier.pt",
        "64_256_upsampler.pt", "128_512_upsampler.pt", "lsun_bedroom.pt", "lsun_cat.pt", "lsun_horse.pt",
        "lsun_horse_nodropout.pt", "cifar10_uncond_50M_500K.pt", "imagenet64_uncond_100M_1500K.pt",
        "imagenet64_cond_270M_250K.pt", "upsample_cond_500K.pt",
    }  # fmt: skip
    assert expected <= set(RELEASED_CHECKPOINTS)
    new_order = {k for k, v in RELEASED_CHECKPOINTS.items() if v["flags"].get("use_new_attention_order")}
    assert new_order == {"64x64_diffusion.pt"}
    assert RELEASED_CHECKPOINTS["64x64_diffusion.pt"]["flags"] == dict(
        parse_model_flags(README_64), rescale_timesteps=False
    )
    assert RELEASED_CHECKPOINTS["cifar10_uncond_50M_500K.pt"]["flags"]["rescale_timesteps"] is True
    assert RELEASED_CHECKPOINTS["imagenet64_cond_270M_250K.pt"]["flags"]["rescale_timesteps"] is False
    assert RELEASED_CHECKPOINTS["lsun_horse_nodropout.pt"]["flags"]["dropout"] == 0.0
    with pytest.raises(ValueError, match="unknown checkpoint"):
        released_network("nope.pt")


# ---------------------------------------------------------------------------------------------
# execution modes and input validation


def test_channels_last_and_bf16_autocast(load_fixture):
    net, fx = _legacy_net(load_fixture)
    x, t, y = fx.inputs["x"], fx.inputs["t"], fx.inputs["y"]
    expected = fx.outputs["out"]
    with torch.no_grad():
        net_cl = net.to(memory_format=torch.channels_last)
        out = net_cl(x.to(memory_format=torch.channels_last), t, y)
        _close(out, expected, fx.meta["tolerance"])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = net(x, t, y)
    assert low.dtype == torch.bfloat16
    relative_error = torch.linalg.vector_norm(low.float() - expected) / torch.linalg.vector_norm(expected)
    assert relative_error < 0.05  # about 2.5% observed in bfloat16


def test_torch_compile_full_graph(load_fixture):
    net, fx = _legacy_net(load_fixture)
    compiled = torch.compile(net, backend="eager", fullgraph=True, dynamic=False)
    with torch.no_grad():
        out = compiled(fx.inputs["x"], fx.inputs["t"], fx.inputs["y"])
    _close(out, fx.outputs["out"], fx.meta["tolerance"])


def test_fp16_torso(load_fixture):
    net, fx = _legacy_net(load_fixture)
    net.convert_to_fp16()
    assert net.dtype == torch.float16 and net.out[2].weight.dtype == torch.float32
    with torch.no_grad():
        out = net(fx.inputs["x"], fx.inputs["t"], fx.inputs["y"])
    assert out.dtype == torch.float32
    assert (out - fx.outputs["out"]).abs().max() < 0.02
    net.convert_to_fp32()
    assert net.dtype == torch.float32


def test_input_validation():
    with pytest.raises(ValueError, match="dims"):
        UNetModel(16, 3, 32, 3, 1, (2,), dims=3)
    with pytest.raises(ValueError, match="image_size // res"):
        UNetModel(16, 3, 32, 3, 1, "8")
    with pytest.raises(ValueError, match="num_head_channels"):
        UNetModel(16, 3, 32, 3, 1, (1,), num_head_channels=24)
    with pytest.raises(ValueError, match="unknown pool"):
        EncoderUNetModel(16, 3, 32, 10, 1, (2,), pool="max")
    with pytest.raises(ValueError, match="num_head_channels"):
        EncoderUNetModel(16, 3, 32, 10, 1, (2,), pool="attention")
    net = UNetModel(16, 3, 32, 3, 1, (2,), channel_mult=(1, 2), num_classes=4)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([1, 2])
    with pytest.raises(ValueError, match="class-conditional"):
        net(x, t)
    with pytest.raises(ValueError, match="shape"):
        net(x, t, torch.tensor([[1], [2]]))
    y = torch.tensor([0, 3])
    with torch.no_grad():  # a single timestep broadcasts over the batch
        torch.testing.assert_close(net(x, torch.tensor(7), y), net(x, torch.tensor([7, 7]), y))
    with pytest.raises(ValueError, match="low_res"):
        SuperResModel(16, 3, 32, 3, 1, (2,), channel_mult=(1, 2))(x, t)


# ---------------------------------------------------------------------------------------------
# model files written before the trunk took one ADMConfig still load


# What the registry recorded for these fixture networks before the ADMConfig refactor (commit 1ffa2bb):
# UNetModel and EncoderUNetModel recorded their whole signature, SuperResModel (with *args, **kwargs) only
# what it was given.
OLD_RECORDED = {
    "gd_unet_legacy": {"type": "openai_unet", "kwargs": {
        "image_size": 16, "in_channels": 3, "model_channels": 32, "out_channels": 6, "num_res_blocks": 1,
        "attention_resolutions": [2], "dropout": 0.0, "channel_mult": [1, 2], "conv_resample": True, "dims": 2,
        "num_classes": 10, "use_checkpoint": False, "use_fp16": False, "num_heads": 2, "num_head_channels": -1,
        "num_heads_upsample": -1, "use_scale_shift_norm": True, "resblock_updown": True,
        "use_new_attention_order": False}},
    "gd_superres": {"type": "openai_superres", "kwargs": {
        "image_size": 16, "in_channels": 3, "num_head_channels": -1, "resblock_updown": True, "use_fp16": False,
        "use_new_attention_order": False, "model_channels": 32, "out_channels": 6, "num_res_blocks": 1,
        "attention_resolutions": [2], "dropout": 0.0, "channel_mult": [1, 2], "num_classes": 10, "num_heads": 2,
        "num_heads_upsample": -1, "use_scale_shift_norm": True}},
    "gd_classifier_attention": {"type": "openai_classifier", "kwargs": {
        "image_size": 16, "in_channels": 3, "model_channels": 32, "out_channels": 10, "num_res_blocks": 1,
        "attention_resolutions": [1, 2], "dropout": 0, "channel_mult": [1, 2], "conv_resample": True, "dims": 2,
        "use_checkpoint": False, "use_fp16": False, "num_heads": 1, "num_head_channels": 16,
        "num_heads_upsample": -1, "use_scale_shift_norm": True, "resblock_updown": True,
        "use_new_attention_order": False, "pool": "attention"}},
}


@pytest.mark.parametrize("name", list(OLD_RECORDED))
def test_networks_build_from_their_old_recorded_arguments(load_fixture, name):
    from edm_toolkit.networks.registry import build_network, network_config

    fx = load_fixture(name)
    net = _loaded(build_network(OLD_RECORDED[name]), _weights(load_fixture, name))
    x, t = fx.inputs["x"], fx.inputs["t"]
    with torch.no_grad():
        if name == "gd_classifier_attention":
            _close(net(x, t), fx.outputs["logits"], fx.meta["tolerance"]["logits"])
        else:
            extra = {"low_res": fx.inputs["low_res"]} if name == "gd_superres" else {}
            _close(net(x, t, y=fx.inputs["y"], **extra), fx.outputs["out"], fx.meta["tolerance"])
    recorded = network_config(net)
    assert recorded["type"] == OLD_RECORDED[name]["type"]
    old = OLD_RECORDED[name]["kwargs"]
    assert {k: v for k, v in recorded["kwargs"].items() if k in old} == old  # the record is the same data


def test_a_model_file_saved_before_the_refactor_loads(load_fixture, tmp_path):
    """A toolkit model file of an OpenAIDenoiser as save_model wrote it before (config JSON + weights)."""
    import json

    from edm_toolkit.checkpoints import FORMAT
    from edm_toolkit.loading import load_model

    fx = load_fixture("gd_unet_legacy")
    config = {"type": "openai", "network": OLD_RECORDED["gd_unet_legacy"], "diffusion": {
        "noise_schedule": "cosine", "diffusion_steps": 1000, "learn_sigma": True, "sigma_small": False,
        "predict_xstart": False, "rescale_timesteps": False}, "codebase": "guided", "flags": {},
        "label_dim": 10, "img_resolution": 16, "img_channels": 3}
    path = tmp_path / "old.pt"
    torch.save({"format": FORMAT, "version": 1, "config": json.dumps(config),
                "state_dict": {f"model.{k}": v for k, v in fx.state_dict.items()}}, path)
    denoiser = load_model(path)
    with torch.no_grad():
        out = denoiser.model(fx.inputs["x"], fx.inputs["t"], fx.inputs["y"])
    _close(out, fx.outputs["out"], fx.meta["tolerance"])
