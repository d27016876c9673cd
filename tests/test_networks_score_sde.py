"""NCSNpp (score_sde_pytorch's DDPM++ / NCSN++) and the score_sde checkpoint reader.

Reference outputs: ../shared/fixtures/sde_ddpmpp_vp and sde_ncsnpp_ve (README section D), produced by
the original code at yang-song/score_sde_pytorch@cb1f359.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from scipy import signal
from torch import nn

from edm_toolkit.networks.score_sde import (
    PUBLISHED_CONFIGS,
    NCSNpp,
    NCSNppConfig,
    ResnetBlockBigGANpp,
    ResnetBlockDDPMpp,
    conv_downsample_2d,
    downsample_2d,
    published_config,
    upsample_2d,
)
from edm_toolkit.adapters.score_sde_checkpoint import (
    ema_parameter_names,
    load_score_sde_checkpoint,
    score_sde_state_dict,
)

CASES = ["sde_ddpmpp_vp", "sde_ncsnpp_ve"]
RECIPE = {"model": {"nf": 16, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [8], "dropout": 0.0},
          "data": {"image_size": 16}}  # the fixtures' size overrides of the published configs


def _plain(obj):
    """Tuples -> lists, recursively, to compare with JSON."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _build(fx, use_ema: bool) -> NCSNpp:
    net = NCSNpp(fx.meta["config"]).eval()
    return load_score_sde_checkpoint(net, fx.state_dict, use_ema=use_ema, strict=True)


# ---------------------------------------------------------------------------------------------
# Reference outputs of the original network


@pytest.mark.parametrize("case", CASES)
def test_layout_matches_original(load_fixture, case):
    fx = load_fixture(case)
    net = NCSNpp(fx.meta["config"])
    layout = fx.meta["all_modules_layout"]
    assert len(net.all_modules) == len(layout)
    for index, module in enumerate(net.all_modules):
        assert layout[f"module.all_modules.{index}"].split("(")[0] == type(module).__name__
    expected = [name[len("module."):] for name in fx.meta["trainable_parameter_names_in_ema_order"]]
    assert ema_parameter_names(net) == expected
    assert [n for n, p in net.named_parameters() if p.requires_grad] == expected


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("weights", ["model", "ema"])
def test_reproduces_original_outputs(load_fixture, case, weights):
    fx = load_fixture(case)
    cfg = fx.meta["config"]
    t, labels = fx.inputs["t"], fx.outputs["model_labels"]
    if cfg["training"]["sde"] == "vpsde":  # continuous VP: the label is 999 t
        torch.testing.assert_close(labels, t * 999)
    else:  # continuous VE: the label is sigma(t) = sigma_min (sigma_max / sigma_min)^t
        sigma_min, sigma_max = cfg["model"]["sigma_min"], cfg["model"]["sigma_max"]
        torch.testing.assert_close(labels, sigma_min * (sigma_max / sigma_min) ** t)

    net = _build(fx, use_ema=weights == "ema")
    with torch.no_grad():
        out = net(fx.inputs["x"], labels)
    expected = fx.outputs[weights]["raw_output"]
    tol = fx.meta["tolerance"]
    if cfg["model"]["scale_by_sigma"]:
        # The stored output is already divided by sigma (down to 0.01): compare the network before
        # that division with the case's tolerance, and the score with the atol 1e-3 its note gives.
        sigma = labels[:, None, None, None]
        torch.testing.assert_close(out * sigma, expected * sigma, rtol=tol["rtol"], atol=tol["atol"])
        torch.testing.assert_close(out, fx.outputs[weights]["score"], rtol=1e-4, atol=1e-3)
    else:
        torch.testing.assert_close(out, expected, rtol=tol["rtol"], atol=tol["atol"])
        score = -out / fx.outputs["marginal_std"][:, None, None, None]
        torch.testing.assert_close(score, fx.outputs[weights]["score"], rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("case", CASES)
def test_channels_last_and_bfloat16_autocast(load_fixture, case):
    fx = load_fixture(case)
    net = _build(fx, use_ema=True).to(memory_format=torch.channels_last)
    x = fx.inputs["x"].to(memory_format=torch.channels_last)
    labels, expected = fx.outputs["model_labels"], fx.outputs["ema"]["raw_output"]
    with torch.no_grad():
        out = net(x, labels)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out_bf16 = net(x, labels)
    scale = labels[:, None, None, None] if fx.meta["config"]["model"]["scale_by_sigma"] else 1.0
    torch.testing.assert_close(out * scale, expected * scale, rtol=1e-4, atol=1e-4)
    rel = ((out_bf16.float() - expected) * scale).norm() / (expected * scale).norm()
    assert out_bf16.dtype == torch.bfloat16 and rel < 0.05


def test_one_label_for_the_whole_batch(load_fixture):
    fx = load_fixture("sde_ddpmpp_vp")
    net = _build(fx, use_ema=False)
    x = fx.inputs["x"]
    with torch.no_grad():
        shared = net(x, torch.tensor(500.0))
        per_row = net(x, torch.full((x.shape[0],), 500.0))
    torch.testing.assert_close(shared, per_row)
    with pytest.raises(ValueError, match="time_cond has 3 entries for a batch of 4"):
        net(x, torch.ones(3))
    with pytest.raises(ValueError, match=r"expects x of shape \[B, 3, H, W\]"):
        net(x[:, :2], torch.ones(4))


# ---------------------------------------------------------------------------------------------
# FIR resampling against a direct computation: zero insertion, zero padding, 2-D convolution


def _direct_upfirdn(x: np.ndarray, k2d: np.ndarray, up: int, down: int, pad: tuple[int, int]) -> np.ndarray:
    n, c, h, w = x.shape
    stuffed = np.zeros((n, c, h * up, w * up))
    stuffed[:, :, ::up, ::up] = x
    padded = np.pad(stuffed, ((0, 0), (0, 0), pad, pad))
    out = np.stack([[signal.convolve2d(padded[i, j], k2d, mode="valid") for j in range(c)] for i in range(n)])
    return out[:, :, ::down, ::down]


@pytest.mark.parametrize("kernel", [(1, 3, 3, 1), (1, 2, 5)], ids=["1331", "asymmetric"])
def test_fir_resampling_matches_direct_computation(kernel):
    x = torch.randn(2, 3, 8, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    k = np.outer(kernel, kernel) / np.sum(kernel) ** 2
    p = len(kernel) - 2  # StyleGAN2's padding for factor 2: (p+1)//2 + 1, p//2 up; (p+1)//2, p//2 down
    up = upsample_2d(x, kernel)
    down = downsample_2d(x, kernel)
    assert up.shape == (2, 3, 16, 12) and down.shape == (2, 3, 4, 3)
    np.testing.assert_allclose(up.numpy(), _direct_upfirdn(x.numpy(), 4 * k, 2, 1, ((p + 1) // 2 + 1, p // 2)),
                               rtol=0, atol=1e-12)
    np.testing.assert_allclose(down.numpy(), _direct_upfirdn(x.numpy(), k, 1, 2, ((p + 1) // 2, p // 2)),
                               rtol=0, atol=1e-12)
    if kernel == (1, 3, 3, 1):  # the explicit numbers for the kernel the models use
        assert (p + 1) // 2 + 1 == 2 and p // 2 == 1


def test_fir_conv_downsample_matches_direct_computation():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=gen)
    weight = torch.randn(5, 3, 3, 3, dtype=torch.float64, generator=gen)
    k = np.outer([1, 3, 3, 1], [1, 3, 3, 1]) / 64.0
    blurred = _direct_upfirdn(x.numpy(), k, 1, 1, (2, 2))  # p = (4 - 2) + (3 - 1) = 4
    expected = np.stack([[sum(signal.correlate2d(blurred[i, c], weight[o, c].numpy(), mode="valid")
                              for c in range(3))[::2, ::2] for o in range(5)] for i in range(2)])
    out = conv_downsample_2d(x, weight, (1, 3, 3, 1))
    assert out.shape == (2, 5, 4, 4)
    np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=1e-12)


def test_fir_upsample_keeps_constant_images():
    x = torch.full((1, 2, 6, 6), 3.0)
    up = upsample_2d(x)
    torch.testing.assert_close(up[:, :, 2:-2, 2:-2], torch.full((1, 2, 8, 8), 3.0))


# ---------------------------------------------------------------------------------------------
# Checkpoint reading


def test_raw_and_ema_weights_differ_and_land_where_expected(load_fixture):
    fx = load_fixture("sde_ncsnpp_ve")
    names = ema_parameter_names(NCSNpp(fx.meta["config"]))
    raw = score_sde_state_dict(fx.state_dict, names, use_ema=False)
    ema = score_sde_state_dict(fx.state_dict, names, use_ema=True)
    assert set(raw) == set(ema) and all(not k.startswith("module.") for k in raw)
    shadow = fx.state_dict["ema"]["shadow_params"]
    assert ema[names[0]] is shadow[0] and ema[names[-1]] is shadow[-1]
    assert not torch.equal(raw[names[0]], ema[names[0]])
    # The frozen Fourier W and the sigmas buffer are not in the EMA list: identical in both.
    assert "all_modules.0.W" not in names
    assert raw["all_modules.0.W"] is ema["all_modules.0.W"] and raw["sigmas"] is ema["sigmas"]


def test_ema_names_survive_requires_grad_false(load_fixture):
    net = NCSNpp(load_fixture("sde_ncsnpp_ve").meta["config"])
    names = ema_parameter_names(net)
    net.requires_grad_(False)
    assert ema_parameter_names(net) == names


def test_checkpoint_file_and_unprefixed_keys(load_fixture, tmp_path):
    fx = load_fixture("sde_ddpmpp_vp")
    path = tmp_path / "checkpoint_3.pth"
    torch.save(fx.state_dict, path)  # includes the Adam state_dict (tuples, None): must load weights_only
    from_file = load_score_sde_checkpoint(NCSNpp(fx.meta["config"]), path)
    ckpt = dict(fx.state_dict, model={k[len("module."):]: v for k, v in fx.state_dict["model"].items()})
    unprefixed = load_score_sde_checkpoint(NCSNpp(fx.meta["config"]), ckpt)
    for a, b in zip(from_file.state_dict().values(), unprefixed.state_dict().values()):
        assert torch.equal(a, b)


def _malformed(ckpt: dict, problem: str) -> dict:
    ckpt = dict(ckpt, ema=dict(ckpt["ema"]), model=dict(ckpt["model"]))
    shadow = list(ckpt["ema"]["shadow_params"])
    if problem == "no model":
        del ckpt["model"]
    elif problem == "no ema":
        del ckpt["ema"]
    elif problem == "no shadow_params":
        del ckpt["ema"]["shadow_params"]
    elif problem == "short shadow_params":
        ckpt["ema"]["shadow_params"] = shadow[:-1]
    elif problem == "shadow shape":
        shadow[5] = torch.zeros(7)
        ckpt["ema"]["shadow_params"] = shadow
    elif problem == "shadow not tensor":
        shadow[2] = [1.0, 2.0]
        ckpt["ema"]["shadow_params"] = shadow
    elif problem == "missing model key":
        del ckpt["model"]["module.all_modules.2.bias"]
    elif problem == "model shape":
        ckpt["model"]["module.all_modules.2.bias"] = torch.zeros(7)
    return ckpt


@pytest.mark.parametrize(("problem", "use_ema", "message"), [
    ("no model", False, r"no 'model' entry"),
    ("no ema", True, r"no 'ema' entry"),
    ("no shadow_params", True, r"no 'shadow_params' entry"),
    ("short shadow_params", True, r"shadow_params'\] has 153 tensors but the model has 154 trainable"),
    ("shadow shape", True,
     r"shadow_params'\]\[5\] has shape \(7,\) but parameter 'all_modules.2.bias' has shape \(16,\)"),
    ("shadow not tensor", True, r"shadow_params'\]\[2\] is a list, not a tensor"),
    ("missing model key", False, r"missing 1: all_modules.2.bias"),
    ("missing model key", True, r"has no parameter 'all_modules.2.bias'"),
    ("model shape", False, r"wrong shape 1: all_modules.2.bias \[7\] \(expected \[16\]\)"),
])
def test_malformed_checkpoints_raise_clear_errors(load_fixture, problem, use_ema, message):
    fx = load_fixture("sde_ddpmpp_vp")
    with pytest.raises(ValueError, match=message):
        load_score_sde_checkpoint(NCSNpp(fx.meta["config"]), _malformed(fx.state_dict, problem), use_ema=use_ema)


def test_raw_weights_need_no_ema_entry_and_wrong_inputs_are_named(load_fixture):
    fx = load_fixture("sde_ddpmpp_vp")
    load_score_sde_checkpoint(NCSNpp(fx.meta["config"]), _malformed(fx.state_dict, "no ema"), use_ema=False)
    with pytest.raises(ValueError, match="should be a dict, got list"):
        score_sde_state_dict([1, 2], [])
    with pytest.raises(ValueError, match="'model' should be a Mapping, got Tensor"):
        score_sde_state_dict({"model": torch.zeros(1)}, [])
    other = copy.deepcopy(fx.meta["config"])
    other["model"]["nf"] = 32  # a model built from the wrong config
    with pytest.raises(ValueError, match="shape"):
        load_score_sde_checkpoint(NCSNpp(other), fx.state_dict)


# ---------------------------------------------------------------------------------------------
# Configs


@pytest.mark.parametrize(("case", "name"), [("sde_ddpmpp_vp", "vp/cifar10_ddpmpp_continuous"),
                                            ("sde_ncsnpp_ve", "ve/cifar10_ncsnpp_continuous")])
def test_published_configs_match_the_fixture_recipe(load_fixture, case, name):
    config = published_config(name)
    for section, overrides in RECIPE.items():
        config[section].update(overrides)
    expected = dict(load_fixture(case).meta["config"])
    expected.pop("device")
    assert _plain(config) == _plain(expected)


def test_deep_configs_differ_only_in_depth_and_iterations():
    for sde, base in [("vp", "cifar10_ddpmpp"), ("ve", "cifar10_ncsnpp")]:
        plain, deep = published_config(f"{sde}/{base}_continuous"), published_config(f"{sde}/{base}_deep_continuous")
        assert (deep["model"]["num_res_blocks"], deep["training"]["n_iters"]) == (8, 950001)
        deep["model"]["num_res_blocks"], deep["training"]["n_iters"] = 4, 1300001
        assert deep == plain
    config = published_config("vp/cifar10_ddpmpp_continuous")
    config["model"]["nf"] = 1
    assert PUBLISHED_CONFIGS["vp/cifar10_ddpmpp_continuous"]["model"]["nf"] == 128  # copies are independent


def _count_parameters(model: dict, image_size: int = 32, channels: int = 3) -> int:
    """NCSN++ / DDPM++ parameter count from the paper's architecture description (biggan blocks, progressive
    input none or residual), without building a network."""
    nf, temb = model["nf"], 4 * model["nf"]

    def conv(cin, cout, k=3):
        return cin * cout * k * k + cout

    def resblock(cin, cout, resample=False):  # GN, conv, dense, GN, conv, 1x1 shortcut
        shortcut = conv(cin, cout, 1) if cin != cout or resample else 0
        return 2 * cin + conv(cin, cout) + temb * cout + cout + 2 * cout + conv(cout, cout) + shortcut

    def attention(c):  # GN and four NIN (W [c, c], b [c])
        return 2 * c + 4 * (c * c + c)

    fourier = model["embedding_type"] == "fourier"
    total = (nf if fourier else 0) + (2 * nf if fourier else nf) * temb + temb + temb * temb + temb + conv(channels, nf)
    widths = [nf * m for m in model["ch_mult"]]
    attn = [image_size // 2**i in model["attn_resolutions"] for i in range(len(widths))]
    skips, cin, pyramid = [nf], nf, channels
    for level, width in enumerate(widths):
        for _ in range(model["num_res_blocks"]):
            total += resblock(cin, width) + (attention(width) if attn[level] else 0)
            cin = width
            skips.append(cin)
        if level < len(widths) - 1:
            total += resblock(cin, cin, resample=True)
            if model["progressive_input"] == "residual":
                total += conv(pyramid, cin)  # FIR downsampling conv
                pyramid = cin
            skips.append(cin)
    total += 2 * resblock(cin, cin) + attention(cin)
    for level in reversed(range(len(widths))):
        for _ in range(model["num_res_blocks"] + 1):
            total += resblock(cin + skips.pop(), widths[level])
            cin = widths[level]
        total += (attention(cin) if attn[level] else 0) + (resblock(cin, cin, resample=True) if level else 0)
    return total + 2 * cin + conv(cin, channels)


@pytest.mark.parametrize("name", list(PUBLISHED_CONFIGS))
def test_published_networks_on_meta_device(name):
    config = published_config(name)
    with torch.device("meta"):
        net = NCSNpp(config)
    model = config["model"]
    deep = model["num_res_blocks"] == 8
    ve = name.startswith("ve/")
    # 2 embedding Linears (+ Fourier) + stem; per level n blocks (+n attention at 16x16), 3 down blocks
    # (+3 pyramid convs for VE), 3 middle; per level n+1 blocks (+1 attention), 3 up blocks; norm + conv.
    n = model["num_res_blocks"]
    expected_modules = 2 + 1 + (4 * n + n + 3) + 3 + (4 * (n + 1) + 1 + 3) + 2 + (4 if ve else 0)
    assert len(net.all_modules) == expected_modules == {(False, False): 55, (False, True): 91,
                                                        (True, False): 59, (True, True): 95}[(ve, deep)]
    sd = net.state_dict()
    first = 1 if ve else 0
    assert sd["sigmas"].shape == (1000,) and sd["sigmas"].dtype == torch.float64
    assert (sd["all_modules.0.W"].shape == (128,)) if ve else ("all_modules.0.W" not in sd)
    assert sd[f"all_modules.{first}.weight"].shape == (512, 256 if ve else 128)
    assert sd[f"all_modules.{first + 1}.weight"].shape == (512, 512)
    assert sd[f"all_modules.{first + 2}.weight"].shape == (128, 3, 3, 3)
    last = len(net.all_modules) - 1
    assert isinstance(net.all_modules[last - 1], nn.GroupNorm) and net.all_modules[last - 1].num_groups == 32
    assert sd[f"all_modules.{last - 1}.weight"].shape == (128,)
    assert sd[f"all_modules.{last}.weight"].shape == (3, 128, 3, 3) and sd[f"all_modules.{last}.bias"].shape == (3,)
    if ve:  # the input-pyramid FIR downsampling convs: 3 -> 128 -> 256 -> 256 channels
        pyramid = [tuple(v.shape) for k, v in sd.items() if k.endswith("Conv2d_0.weight")]
        assert pyramid == [(128, 3, 3, 3), (256, 128, 3, 3), (256, 256, 3, 3)]
    assert sum(p.numel() for p in net.parameters()) == _count_parameters(model)


def test_published_parameter_counts():
    """The counts the arithmetic above gives for the published configs, written out for reference.

    No authoritative count is published with score_sde (README and paper give none); these equal the
    NCSNpp networks' counts by the test above.
    """
    counts = {name: _count_parameters(config["model"]) for name, config in PUBLISHED_CONFIGS.items()}
    assert counts == {
        "vp/cifar10_ddpmpp_continuous": 61_804_419,
        "vp/cifar10_ddpmpp_deep_continuous": 106_632_579,
        "ve/cifar10_ncsnpp_continuous": 62_758_915,
        "ve/cifar10_ncsnpp_deep_continuous": 107_587_075,
    }


@pytest.mark.parametrize(("overrides", "message"), [
    ({"resblock_type": "wide"}, r"unsupported resblock_type='wide'; supported: biggan, ddpm"),
    ({"attention_type": "legacy"}, r"unsupported attention_type='legacy'; supported: ddpm"),
    ({"progressive": "residual"}, r"fir=True with an upsampling convolution"),
    ({"conv_size": 5}, r"unsupported conv_size=5"),
    ({"nonlinearity": "gelu"}, r"unsupported nonlinearity='gelu'"),
    ({"nf": None}, r"missing 'model.nf'"),
])
def test_unsupported_options_are_named(overrides, message):
    config = published_config("ve/cifar10_ncsnpp_continuous")
    for key, value in overrides.items():
        if value is None:
            del config["model"][key]
        else:
            config["model"][key] = value
    with pytest.raises(ValueError, match=message):
        NCSNpp(config)


def test_fourier_needs_continuous_training_and_names_are_checked():
    config = published_config("ve/cifar10_ncsnpp_continuous")
    config["training"]["continuous"] = False
    with pytest.raises(ValueError, match="embedding_type='fourier' requires training.continuous=True"):
        NCSNpp(config)
    with pytest.raises(ValueError, match="unknown score_sde config 've/cifar10_ncsnpp'"):
        published_config("ve/cifar10_ncsnpp")
    with pytest.raises(ValueError, match="config has no 'model' section"):
        NCSNpp({"data": {}})


@pytest.mark.parametrize("model", [
    {"resblock_type": "ddpm", "fir": False, "progressive": "output_skip", "progressive_input": "input_skip",
     "progressive_combine": "cat", "embedding_type": "positional"},
    {"fir": False, "progressive": "residual", "progressive_input": "none", "conditional": False},
])
def test_other_supported_options_build_and_run(model):
    """Options beyond the CIFAR-10 continuous configs (no reference outputs; shapes and finiteness only)."""
    config = published_config("ve/cifar10_ncsnpp_continuous")
    config["model"].update({"nf": 16, "ch_mult": (1, 2), "num_res_blocks": 1, "attn_resolutions": (8,), **model})
    config["data"]["image_size"] = 16
    net = NCSNpp(config).eval()
    assert isinstance(net.config, NCSNppConfig)
    # The original gives every block a Dense_0 (temb_dim = 4 nf) even when conditional=False.
    blocks = [m for m in net.all_modules if isinstance(m, (ResnetBlockBigGANpp, ResnetBlockDDPMpp))]
    assert len(blocks) in (8, 10) and all(hasattr(m, "Dense_0") for m in blocks)
    with torch.no_grad():
        out = net(torch.rand(2, 3, 16, 16), torch.tensor([0.5, 20.0]))
    assert out.shape == (2, 3, 16, 16) and torch.isfinite(out).all()
