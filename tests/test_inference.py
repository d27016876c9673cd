"""The fast inference path (issue 13): each option within its stated tolerance of the fp32 path on the reference
networks, the wrapped network never modified, weights cast once, activations kept in their layout, and the
compiled path giving the eager path's images.

Stated tolerances (docs/speed.md): relative L2 error ||D_fast - D_fp32|| / ||D_fp32|| on the fixtures' inputs
(sigma from 0.002 to 80) at most 1e-5 for channels_last alone and for the compiled fp32 path (fp32 arithmetic in
another order), 5e-3 for fp16 and 3e-2 for bf16. These are bounds of the form c * sqrt(depth) * u with the unit
roundoff u = 2^-24 / 2^-11 / 2^-8; on these networks the measured errors are 3-10 times smaller.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from edm_toolkit.errors import ConfigError
from edm_toolkit.inference import CONVOLUTIONS, FastDenoiser, InferenceOptions, optimize, prepare_network
from edm_toolkit.networks import edm_layers
from edm_toolkit.networks.edm_layers import GroupNorm, _group_norm_in_place, group_norm
from edm_toolkit.networks.openai_layers import GroupNorm32

TOLERANCE = {"fp32": 1e-5, "fp16": 5e-3, "bf16": 3e-2}
EAGER_OPTIONS = [
    InferenceOptions(channels_last=True),
    InferenceOptions(precision="fp16"),
    InferenceOptions(precision="fp16", channels_last=True),
    InferenceOptions(precision="bf16"),
    InferenceOptions(precision="bf16", channels_last=True),
]
FIXTURE_CASES = ["edm", "vp", "ve", "iddpm"]  # DDPM++ (skip decoder), DDPM++, NCSN++, ADM


def _edm_case(load_fixture, case):
    from test_edm_pickle import toolkit_network

    fx = load_fixture(f"edm_precond_{case}")
    labels = fx.inputs["class_labels"] if fx.meta["constructor_kwargs"]["label_dim"] else None
    return toolkit_network(fx, case), fx.inputs["x"], fx.inputs["sigma"], labels


def _guided_case(load_fixture, tmp_path):
    """guided-diffusion's UNet (GroupNorm32, nn.Conv2d) through its adapter, at sigma <= 5: at larger sigma
    D = x - sigma * eps cancels and amplifies relative errors of the predicted noise by about sigma."""
    from test_cli_networks import guided_diffusion_file

    from edm_toolkit.loading import load_denoiser

    path, extra = guided_diffusion_file(load_fixture, tmp_path)
    net = load_denoiser(path, model_flags=extra[1])
    x = 2 * torch.randn(4, net.img_channels, net.img_resolution, net.img_resolution,
                        generator=torch.Generator().manual_seed(0))
    return net, x, torch.tensor([0.05, 0.5, 2.0, 5.0]), torch.eye(net.label_dim)[:4]


def _relative_error(out, reference):
    return float((out.double() - reference.double()).norm() / reference.double().norm())


def _state(module):
    return {k: (v.clone(), v.dtype, v.stride()) for k, v in module.state_dict().items()}


def test_options_are_validated():
    with pytest.raises(ConfigError, match="precision"):
        InferenceOptions(precision="fp8")
    with pytest.raises(ConfigError, match="compile mode"):
        InferenceOptions(compile=True, compile_mode="fastest")
    with pytest.raises(ConfigError, match="compile=True"):
        InferenceOptions(compile_mode="reduce-overhead")
    with pytest.raises(ConfigError, match="compile=True"):
        InferenceOptions(compile_cache="/tmp/cache")
    assert InferenceOptions().faithful and not InferenceOptions(channels_last=True).faithful


@pytest.mark.parametrize("case", FIXTURE_CASES)
def test_each_option_within_its_tolerance_of_fp32(case, load_fixture, one_thread):
    net, x, sigma, labels = _edm_case(load_fixture, case)
    before = _state(net)
    with torch.no_grad():
        reference = net(x, sigma, labels)
        for options in EAGER_OPTIONS:
            out = optimize(net, options)(x, sigma, labels)
            assert out.dtype == torch.float32 and out.is_contiguous()
            assert _relative_error(out, reference) < TOLERANCE[options.precision], options
            # A real error of that dtype, not the fp32 path again.
            assert options.precision == "fp32" or _relative_error(out, reference) > TOLERANCE[options.precision] / 100
    after = _state(net)
    assert all(torch.equal(before[k][0], after[k][0]) and before[k][1:] == after[k][1:] for k in before)


def test_guided_diffusion_network_within_tolerance(load_fixture, tmp_path, one_thread):
    net, x, sigma, labels = _guided_case(load_fixture, tmp_path)
    with torch.no_grad():
        reference = net(x, sigma, labels)
        for options in EAGER_OPTIONS:
            assert _relative_error(optimize(net, options)(x, sigma, labels), reference) < TOLERANCE[options.precision]


@pytest.mark.parametrize("case", ["vp", "iddpm"])
def test_gpu_group_norm_path_within_tolerance(case, load_fixture, monkeypatch, one_thread):
    """channels_last on a GPU normalises in place (PyTorch's CUDA kernel would copy to NCHW); run that code here."""
    net, x, sigma, labels = _edm_case(load_fixture, case)
    with torch.no_grad():
        reference = net(x, sigma, labels)
    monkeypatch.setattr(edm_layers, "_native_group_norm_keeps_layout", lambda x: False)
    calls = []
    monkeypatch.setattr(edm_layers, "_group_norm_in_place", _counting(edm_layers._group_norm_in_place, calls))
    with torch.no_grad():
        for options in EAGER_OPTIONS:
            if options.channels_last:
                assert _relative_error(optimize(net, options)(x, sigma, labels), reference) < TOLERANCE[options.precision]
    assert calls  # the in-place path did run


def _counting(function, calls):
    def counted(*args, **kwargs):
        calls.append(1)
        return function(*args, **kwargs)
    return counted


def test_cast_once_gives_per_call_autocast_bit_for_bit(load_fixture, one_thread):
    """Casting the convolution weights once is what autocast does to them on every call: identical outputs."""
    net, x, sigma, labels = _edm_case(load_fixture, "vp")
    with torch.no_grad():
        for precision, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
            with torch.autocast("cpu", dtype=dtype):
                per_call = net(x, sigma, labels).float()
            assert torch.equal(optimize(net, InferenceOptions(precision=precision))(x, sigma, labels), per_call)


class _WeightCasts(TorchDispatchMode):
    """Records the shapes of the tensors that dtype conversions (aten._to_copy) read during a call."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._to_copy.default:
            self.shapes.append(tuple(args[0].shape))
        return func(*args, **(kwargs or {}))


def test_no_convolution_weight_is_cast_per_call(load_fixture, one_thread):
    net, x, sigma, labels = _edm_case(load_fixture, "vp")
    weights = {tuple(m.weight.shape) for m in net.modules() if isinstance(m, CONVOLUTIONS) and m.weight is not None}
    fast = optimize(net, InferenceOptions(precision="bf16", channels_last=True))
    assert all(m.weight.dtype == torch.bfloat16 for m in fast.denoiser.modules()
               if isinstance(m, CONVOLUTIONS) and m.weight is not None)
    with torch.no_grad():
        with _WeightCasts() as plain, torch.autocast("cpu", dtype=torch.bfloat16):
            net(x, sigma, labels)
        with _WeightCasts() as cast_once:
            fast(x, sigma, labels)
    weights -= {tuple(x.shape)}
    assert weights <= set(plain.shapes)  # the probe sees autocast cast every weight on every call
    # Left: the layers that read the fp32 image itself, whose weight the layer casts up to meet it.
    assert {shape for shape in cast_once.shapes if shape in weights} <= {w for w in weights if w[1] == x.shape[1]}


@pytest.mark.parametrize("gpu_kernel", [False, True])
def test_channels_last_is_kept_through_group_norm_and_attention(gpu_kernel, load_fixture, monkeypatch, one_thread):
    if gpu_kernel:
        monkeypatch.setattr(edm_layers, "_native_group_norm_keeps_layout", lambda x: False)
    net, x, sigma, labels = _edm_case(load_fixture, "vp")
    fast = optimize(net, InferenceOptions(precision="bf16", channels_last=True))
    outputs = []
    for module in fast.denoiser.modules():
        if isinstance(module, (GroupNorm, edm_layers.UNetBlock)):
            module.register_forward_hook(lambda m, args, out: outputs.append((type(m).__name__, out)))
    with torch.no_grad():
        fast(x, sigma, labels)
    assert {name for name, _ in outputs} == {"GroupNorm", "UNetBlock"}
    assert all(out.is_contiguous(memory_format=torch.channels_last) and out.dtype == torch.bfloat16
               for _, out in outputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_in_place_group_norm_matches_group_norm(dtype, one_thread):
    """Against F.group_norm in float64 of the same (rounded) input, with a mean of 5 standard deviations (the
    one-pass variance of bf16/fp16 input cancels); the bound is 8 units of the output dtype's roundoff per unit of
    (1 + |mean| / std), the error that rounding scale and shift to that dtype can cause."""
    g = torch.Generator().manual_seed(0)
    x = (5 + torch.randn(3, 64, 6, 6, generator=g)).to(dtype).contiguous(memory_format=torch.channels_last)
    weight, bias = 1 + 0.1 * torch.randn(64, generator=g), torch.randn(64, generator=g)
    reference = torch.nn.functional.group_norm(x.double(), 8, weight.double(), bias.double(), 1e-5)
    out = _group_norm_in_place(x, 8, weight, bias, 1e-5)
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
    roundoff = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[dtype]
    assert float((out.double() - reference).abs().max()) <= 8 * roundoff * (1 + 5)
    # The dispatcher: the faithful path is F.group_norm itself.
    plain = (5 + torch.randn(3, 64, 6, 6, generator=g))
    assert torch.equal(group_norm(plain, 8, weight, bias, 1e-5),
                       torch.nn.functional.group_norm(plain, 8, weight, bias, 1e-5))


def test_group_norm32_normalises_low_precision_in_float32_statistics(one_thread):
    g = torch.Generator().manual_seed(1)
    norm = GroupNorm32(32, 64).requires_grad_(False)
    x = (3 + torch.randn(2, 64, 5, 5, generator=g)).to(torch.bfloat16)
    reference = torch.nn.functional.group_norm(x.double(), 32, norm.weight.double(), norm.bias.double(), norm.eps)
    out = norm(x)
    assert out.dtype == torch.bfloat16 and float((out.double() - reference).abs().max()) <= 8 * 2.0**-8 * 4


def test_prepare_network_leaves_the_original_alone():
    torch.manual_seed(0)
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.GroupNorm(2, 4))
    copy = prepare_network(conv, InferenceOptions(precision="fp16", channels_last=True))
    assert conv[0].weight.dtype == torch.float32 and conv[0].weight.is_contiguous()
    assert copy[0].weight.dtype == torch.float16 and copy[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert copy[1].weight.dtype == torch.float32  # normalisation parameters stay fp32
    assert copy[0].weight.data_ptr() != conv[0].weight.data_ptr()


def _tiny_sampler_images(net, **options):
    from edm_toolkit.generate import sample_batch
    from edm_toolkit.sampling import Sampler

    with torch.no_grad():
        return sample_batch(optimize(net, InferenceOptions(**options)), Sampler(num_steps=3), seeds=[0, 1, 2])


def test_compiled_path_gives_the_eager_images(load_fixture, one_thread):
    """Images of a 3-step Heun run (5 network evaluations at 3 noise levels: no recompilation per sigma)."""
    import torch._dynamo

    net, *_ = _edm_case(load_fixture, "ve")
    eager = _tiny_sampler_images(net)
    torch._dynamo.utils.counters.clear()
    compiled = _tiny_sampler_images(net, compile=True)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert float((compiled - eager).abs().max()) < TOLERANCE["fp32"] * float(eager.abs().max())


@pytest.mark.slow
@pytest.mark.parametrize("options", [dict(precision="bf16", channels_last=True, compile=True),
                                     dict(compile=True, compile_mode="reduce-overhead")])
def test_compiled_fast_options_give_the_eager_fast_images(options, load_fixture, one_thread):
    net, *_ = _edm_case(load_fixture, "vp")
    eager = _tiny_sampler_images(net, **{k: v for k, v in options.items() if not k.startswith("compile")})
    compiled = _tiny_sampler_images(net, **options)
    precision = options.get("precision", "fp32")
    assert float((compiled - eager).abs().max()) < 2 * TOLERANCE[precision] * float(eager.abs().max())


@pytest.mark.slow
def test_compile_cache_is_reused_by_the_next_process(tmp_path):
    """The second process with the same --compile-cache loads the compiled graph instead of compiling it."""
    import json
    import subprocess
    import sys

    child = (
        "import json, sys, torch\n"
        "from torch._dynamo.utils import counters\n"
        "from edm_toolkit.inference import InferenceOptions, optimize\n"
        "from edm_toolkit.networks.song_unet import SongUNet\n"
        "from edm_toolkit.precond import EDMPrecond\n"
        "torch.manual_seed(0)\n"
        "net = EDMPrecond(SongUNet(img_resolution=8, in_channels=3, out_channels=3, model_channels=16, "
        "channel_mult=[1], num_blocks=1, attn_resolutions=[8]), img_resolution=8, img_channels=3).eval()\n"
        "fast = optimize(net, InferenceOptions(compile=True, compile_cache=sys.argv[1]))\n"
        "with torch.no_grad():\n"
        "    fast(torch.zeros(1, 3, 8, 8), torch.tensor(1.0))\n"
        "print(json.dumps(dict(counters['inductor'])))\n"
    )
    runs = []
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", child, str(tmp_path / "cache")], capture_output=True, text=True,
                              timeout=1200)
        assert done.returncode == 0, done.stderr[-2000:]
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    assert runs[0].get("fxgraph_cache_miss", 0) > 0 and runs[1].get("fxgraph_cache_hit", 0) > 0
    assert any((tmp_path / "cache").iterdir())


def test_fast_denoiser_keeps_the_protocol(load_fixture):
    net, *_ = _edm_case(load_fixture, "iddpm")
    fast = optimize(net, InferenceOptions(precision="bf16"))
    assert isinstance(fast, FastDenoiser)
    for name in ("img_channels", "img_resolution", "label_dim", "sigma_min", "sigma_max", "learned_variance"):
        assert getattr(fast, name) == getattr(net, name)
    assert torch.equal(fast.step_grid.sigmas, net.step_grid.sigmas)
    assert torch.equal(fast.round_sigma(torch.tensor([0.3, 7.0])), net.round_sigma(torch.tensor([0.3, 7.0])))
    assert optimize(net) is net
