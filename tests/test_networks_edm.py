"""EDM backbones (SongUNet, DhariwalUNet, UNetBlock) against NVlabs/edm reference fixtures A1-A5."""

from __future__ import annotations

import pytest
import torch

from edm_toolkit.networks import dhariwal_unet, song_unet
from edm_toolkit.networks.dhariwal_unet import DhariwalUNet
from edm_toolkit.networks.edm_layers import Conv2d, Linear, UNetBlock
from edm_toolkit.networks.song_unet import SongUNet

# Bare-network fixture -> (class, preconditioner fixture that stores its weights under 'model.').
NETWORK_CASES = {
    "edm_songunet_ddpmpp": (SongUNet, "edm_precond_vp"),
    "edm_songunet_ncsnpp": (SongUNet, "edm_precond_ve"),
    "edm_songunet_skip": (SongUNet, "edm_precond_edm"),
    "edm_dhariwalunet": (DhariwalUNet, "edm_precond_iddpm"),
}

# bf16 autocast vs fp32 on the fixture nets: measured relative L2 error 0.022-0.030.
BF16_REL_TOL = 0.06


def _tolerance(fx) -> dict:
    return dict(rtol=fx.meta["tolerance"]["rtol"], atol=fx.meta["tolerance"]["atol"])


def _build(load_fixture, case: str):
    """The fixture's network with the original weights (strict load), its inputs and outputs."""
    fx = load_fixture(case)
    cls, precond_case = NETWORK_CASES[case]
    precond_sd = load_fixture(precond_case).state_dict
    state_dict = {k[len("model."):]: v for k, v in precond_sd.items() if k.startswith("model.")}
    net = cls(**fx.meta["constructor_kwargs"]).eval()
    net.load_state_dict(state_dict, strict=True)
    return net, fx


def _call_args(fx):
    return fx.inputs["noise_labels"], fx.inputs.get("class_labels"), fx.inputs.get("augment_labels")


@pytest.mark.parametrize("case", sorted(NETWORK_CASES))
def test_network_matches_edm(load_fixture, case):
    net, fx = _build(load_fixture, case)
    noise_labels, class_labels, augment_labels = _call_args(fx)
    with torch.no_grad():
        out = net(fx.inputs["x"], noise_labels, class_labels=class_labels, augment_labels=augment_labels)
        torch.testing.assert_close(out, fx.outputs["F"], **_tolerance(fx))
        if "F_without_augment_labels" in fx.outputs:
            out = net(fx.inputs["x"], noise_labels, class_labels=class_labels)
            torch.testing.assert_close(out, fx.outputs["F_without_augment_labels"], **_tolerance(fx))


@pytest.mark.parametrize("case", ["edm_unetblock_adm_mh", "edm_unetblock_song_up_mh"])
def test_multihead_unetblock_matches_edm(load_fixture, case):
    fx = load_fixture(case)
    block = UNetBlock(**fx.meta["constructor_kwargs"]).eval()
    block.load_state_dict(fx.state_dict, strict=True)
    assert block.num_heads == 2
    with torch.no_grad():
        out = block(fx.inputs["x"], fx.inputs["emb"])
    torch.testing.assert_close(out, fx.outputs["y"], **_tolerance(fx))


def test_fourier_freqs_drawn_like_edm(load_fixture):
    """Same seed, same construction-time draw: the random `map_noise.freqs` buffer equals EDM's."""
    fx = load_fixture("edm_songunet_ncsnpp")
    precond = load_fixture("edm_precond_ve")
    torch.manual_seed(precond.meta["seed"])
    net = SongUNet(**fx.meta["constructor_kwargs"])
    torch.testing.assert_close(net.map_noise.freqs, precond.state_dict["model.map_noise.freqs"], rtol=0, atol=0)


def _param_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize(
    "cls, module, arch, resolution, overrides, expected",
    [
        (SongUNet, song_unet, "ddpmpp", 32, dict(label_dim=10, augment_dim=9), 55_735_299),
        (SongUNet, song_unet, "ddpmpp", 32, dict(label_dim=0, augment_dim=0), 55_732_739),
        (SongUNet, song_unet, "ncsnpp", 32, dict(label_dim=0, augment_dim=9), 56_397_827),
        (SongUNet, song_unet, "ddpmpp", 64, dict(channel_mult=[1, 2, 2, 2], label_dim=0, augment_dim=9), 61_805_571),
        (DhariwalUNet, dhariwal_unet, "adm", 64, dict(label_dim=1000, augment_dim=0), 295_899_267),
    ],
)
def test_published_parameter_counts(cls, module, arch, resolution, overrides, expected):
    with torch.device("meta"):
        kwargs = module.published_config(arch, **overrides)
        net = cls(img_resolution=resolution, in_channels=3, out_channels=3, **kwargs)
    assert _param_count(net) == expected


def test_published_key_names():
    with torch.device("meta"):
        ddpmpp = SongUNet(32, 3, 3, **song_unet.published_config("ddpmpp", label_dim=10))
        ncsnpp = SongUNet(32, 3, 3, **song_unet.published_config("ncsnpp"))
        adm = DhariwalUNet(64, 3, 3, **dhariwal_unet.published_config("adm", label_dim=1000, augment_dim=0))
    ddpmpp_keys = set(ddpmpp.state_dict())
    assert {
        "map_label.weight", "map_label.bias", "map_augment.weight", "map_layer0.weight",
        "enc.32x32_conv.weight", "enc.32x32_block0.norm0.weight", "enc.32x32_block0.skip.weight",
        "enc.16x16_down.conv0.resample_filter", "enc.16x16_down.skip.resample_filter",
        "enc.16x16_block0.norm2.weight", "enc.16x16_block0.qkv.weight", "enc.16x16_block0.proj.bias",
        "dec.8x8_in0.qkv.weight", "dec.16x16_up.conv0.resample_filter",
        "dec.32x32_aux_norm.weight", "dec.32x32_aux_conv.weight",
    } <= ddpmpp_keys
    assert "map_augment.bias" not in ddpmpp_keys
    assert not any(k.endswith("resample_filter") and "_down" not in k and "_up" not in k for k in ddpmpp_keys)
    assert {"map_noise.freqs", "enc.16x16_aux_residual.weight", "enc.16x16_aux_residual.resample_filter"} <= set(
        ncsnpp.state_dict()
    )
    adm_keys = set(adm.state_dict())
    assert {
        "map_label.weight", "enc.64x64_conv.weight", "enc.32x32_block0.qkv.weight", "dec.8x8_in0.qkv.weight",
        "out_norm.weight", "out_conv.weight",
    } <= adm_keys
    assert "enc.64x64_block0.qkv.weight" not in adm_keys  # attention only at 32, 16, 8
    assert "map_label.bias" not in adm_keys


def test_skip_architecture_resample_only_layers(load_fixture):
    net, _ = _build(load_fixture, "edm_songunet_skip")
    assert dict(net.enc["8x8_aux_down"].named_parameters()) == {}
    assert dict(net.dec["16x16_aux_up"].named_parameters()) == {}
    assert net.dec["16x16_aux_up"].resample_filter.shape == (1, 1, 4, 4)


@pytest.mark.parametrize("case", sorted(NETWORK_CASES))
def test_bfloat16_autocast_close_to_fp32(load_fixture, case):
    net, fx = _build(load_fixture, case)
    with torch.no_grad():
        reference = net(fx.inputs["x"], *_call_args(fx))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = net(fx.inputs["x"], *_call_args(fx))
    rel = (low.float() - reference).norm() / reference.norm()
    assert rel < BF16_REL_TOL


@pytest.mark.parametrize("case", sorted(NETWORK_CASES))
def test_channels_last_matches_contiguous(load_fixture, case):
    net, fx = _build(load_fixture, case)
    x = fx.inputs["x"]
    x_cl = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        reference = net(x, *_call_args(fx))
        torch.testing.assert_close(net(x_cl, *_call_args(fx)), reference, rtol=1e-5, atol=1e-5)
        net = net.to(memory_format=torch.channels_last)
        torch.testing.assert_close(net(x_cl, *_call_args(fx)), reference, rtol=1e-5, atol=1e-5)


def test_compiles_without_graph_breaks(load_fixture):
    net, fx = _build(load_fixture, "edm_songunet_ncsnpp")
    compiled = torch.compile(net, backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(fx.inputs["x"], *_call_args(fx)), fx.outputs["F"], **_tolerance(fx))


def test_fresh_networks_start_near_zero():
    """EDM zero-initialises the output layers (ADM exactly, Song's nets at 1e-5 scale)."""
    torch.manual_seed(0)
    x, noise = torch.randn(2, 3, 16, 16), torch.randn(2)
    small = dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8])
    with torch.no_grad():
        adm = DhariwalUNet(16, 3, 3, model_channels=16, channel_mult=[1, 4], num_blocks=1, attn_resolutions=[8])
        assert torch.count_nonzero(adm(x, noise, None)) == 0
        song = SongUNet(16, 3, 3, embedding_type="fourier", encoder_type="residual", **small)
        assert 0 < song(x, noise, None).abs().max() < 1e-3


@pytest.mark.parametrize("cls", [SongUNet, DhariwalUNet])
def test_label_dropout_only_in_training(cls):
    """label_dropout=1 drops every class label in training mode (EDM's classifier-free guidance training)."""
    torch.manual_seed(0)
    net = cls(16, 3, 3, label_dim=4, model_channels=16, channel_mult=[1, 4], num_blocks=1,
              attn_resolutions=[8], dropout=0, label_dropout=1)
    for p in net.parameters():  # un-zero the output layers
        torch.nn.init.normal_(p, std=0.05)
    x, noise, labels = torch.randn(2, 3, 16, 16), torch.randn(2), torch.eye(4)[:2]
    with torch.no_grad():
        unconditional = net(x, noise, torch.zeros_like(labels))
        assert not torch.allclose(net.eval()(x, noise, labels), unconditional)
        torch.testing.assert_close(net.train()(x, noise, labels), unconditional)


def test_bad_arguments_raise_value_error():
    with pytest.raises(ValueError, match="embedding_type"):
        SongUNet(16, 3, 3, embedding_type="sinusoidal")
    with pytest.raises(ValueError, match="encoder_type"):
        SongUNet(16, 3, 3, encoder_type="progressive")
    with pytest.raises(ValueError, match="decoder_type"):
        SongUNet(16, 3, 3, decoder_type="residual")
    with pytest.raises(ValueError, match="init_mode"):
        Linear(4, 4, init_mode="orthogonal")
    with pytest.raises(ValueError, match="up and down"):
        Conv2d(4, 4, kernel=3, up=True, down=True)
    with pytest.raises(ValueError, match="ddpm"):
        song_unet.published_config("ddpm")
    with pytest.raises(ValueError, match="adm"):
        dhariwal_unet.published_config("ddpmpp")


def test_missing_class_labels_raise_value_error():
    net = SongUNet(16, 3, 3, label_dim=4, model_channels=16, channel_mult=[1], num_blocks=1, attn_resolutions=[])
    with pytest.raises(ValueError, match="class_labels"):
        net(torch.randn(1, 3, 16, 16), torch.zeros(1), None)


def test_published_config_is_a_fresh_copy():
    config = song_unet.published_config("ncsnpp")
    config["resample_filter"].append(7)
    assert song_unet.published_config("ncsnpp")["resample_filter"] == [1, 3, 3, 1]
    assert song_unet.published_config("ddpmpp")["dropout"] == 0.13
    assert song_unet.published_config("ddpmpp")["augment_dim"] == 9
    assert dhariwal_unet.published_config("adm", dropout=0.10)["dropout"] == 0.10
