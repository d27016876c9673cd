"""score_sde_pytorch checkpoints as EDM denoisers (edm_toolkit.adapters.score_sde).

Reference: ../shared/fixtures/sde_ddpmpp_vp and sde_ncsnpp_ve (README section D), produced by the original code
(yang-song/score_sde_pytorch@cb1f359): a checkpoint dict in utils.save_checkpoint's layout, inputs x at four
times t, and what get_score_fn(sde, model, continuous=True) returned for them, with the raw and the EMA weights.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

from edm_toolkit.adapters.score_sde import (
    ScoreSDEDenoiser,
    inspect_score_sde_checkpoint,
    is_score_sde_checkpoint,
    load_score_sde_denoiser,
)
from edm_toolkit.checkpoints import read_model_file, save_model
from edm_toolkit.loading import load_model
from edm_toolkit.errors import CheckpointError
from edm_toolkit.networks.score_sde import PUBLISHED_CONFIGS, NCSNpp, NCSNppConfig, published_config
from edm_toolkit.precond import VPPrecond
from edm_toolkit.sampling import Sampler

CASES = ["sde_ddpmpp_vp", "sde_ncsnpp_ve"]
WEIGHTS = ["ema", "model"]
# What the tensors cannot tell, for the fixtures' (unreleased, 16x16) configs; the rest is inferred.
MISSING_FACTS = {"sde_ddpmpp_vp": {"training": {"sde": "vpsde"}, "data": {"image_size": 16}},
                 "sde_ncsnpp_ve": {"data": {"image_size": 16}}}
# The VE output is the score, divided by sigma (down to 0.01): fixtures README D16 gives "rtol 1e-4, atol 1e-3",
# as does the JSON's note.
VE_SCORE_ATOL = 1e-3
FLOAT32_EPS = torch.finfo(torch.float32).eps


class Reference(NamedTuple):
    """The fixture's inputs and the original's result, in EDM's units."""

    x: torch.Tensor  # EDM's x = x0 + sigma n (float64)
    sigma: torch.Tensor  # EDM's sigma, [B] float64
    D: torch.Tensor  # the denoised image implied by the original's score
    tolerance: torch.Tensor  # elementwise bound on |D - reference D|
    raw_atol: float  # absolute tolerance on the network's own output


def _column(values: torch.Tensor) -> torch.Tensor:
    return values.reshape(-1, 1, 1, 1)


def _reference(fx, weights: str) -> Reference:
    """EDM's (x, sigma, D) for the fixture; D from the stored *score*, its tolerance from the fixture JSON's.

    VP: x_t = alpha x0 + std z, so x = x_t / alpha, sigma = std / alpha, eps = -score std and D = x - sigma eps;
    an error in eps moves D by sigma times it, so the JSON tolerance on the raw output (eps) is scaled by sigma.
    VE (data in [0, 1]): x = 2 x_t - 1, sigma = 2 sigma_song and D = 2 (x_t + sigma_song^2 score) - 1;
    the JSON tolerance on the score is scaled by 2 sigma_song^2. Both get a few float32 ulps of the summands for
    the rounding of x (which the denoiser receives in float32) and of the sum that forms D.
    """
    cfg, tol = fx.meta["config"], fx.meta["tolerance"]
    t, x_original = fx.inputs["t"].double(), fx.inputs["x"].double()  # what get_score_fn received
    score = fx.outputs[weights]["score"].double()
    if cfg["training"]["sde"] == "vpsde":
        beta_min, beta_max = cfg["model"]["beta_min"], cfg["model"]["beta_max"]
        alpha = torch.exp(-0.25 * t**2 * (beta_max - beta_min) - 0.5 * t * beta_min)  # VPSDE.marginal_prob's mean
        std = (1 - alpha**2).sqrt()
        torch.testing.assert_close(std.float(), fx.outputs["marginal_std"])  # the same SDE as the original's
        sigma = std / alpha
        x = x_original / _column(alpha)
        eps = -score * _column(std)
        step = -_column(sigma) * eps
        bound = _column(sigma) * (tol["atol"] + tol["rtol"] * eps.abs())
        raw_atol = tol["atol"]
    else:
        sigma_song = fx.outputs["model_labels"].double()  # sigma(t) = sigma_min (sigma_max / sigma_min)^t
        model = cfg["model"]
        torch.testing.assert_close(sigma_song, model["sigma_min"] * (model["sigma_max"] / model["sigma_min"]) ** t)
        sigma = 2 * sigma_song
        x = 2 * x_original - 1
        step = 2 * _column(sigma_song) ** 2 * score
        bound = 2 * _column(sigma_song) ** 2 * (VE_SCORE_ATOL + tol["rtol"] * score.abs())
        raw_atol = VE_SCORE_ATOL
    rounding = 4 * FLOAT32_EPS * (x.abs() + step.abs() + 1)
    return Reference(x, sigma, x + step, bound + rounding, raw_atol)


class NetworkCall:
    """Records what the wrapped NCSNpp receives and returns, within a ``with`` block."""

    def __init__(self, denoiser: ScoreSDEDenoiser):
        self.network = denoiser.network

    def __enter__(self) -> NetworkCall:
        self.handle = self.network.register_forward_hook(self._record)
        return self

    def __exit__(self, *exc_info) -> None:
        self.handle.remove()

    def _record(self, module, args, output):
        self.image, self.label = args
        self.output = output


_LOADED: dict[tuple[str, str], ScoreSDEDenoiser] = {}


def _denoiser(fx, weights: str = "ema") -> ScoreSDEDenoiser:
    """The fixture's checkpoint, loaded with its config dict (once per case and weights; tests do not modify it)."""
    key = (fx.name, weights)
    if key not in _LOADED:
        _LOADED[key] = load_score_sde_denoiser(fx.state_dict, config=fx.meta["config"], use_ema=weights == "ema")
    return _LOADED[key]


def _checkpoint_file(fx, tmp_path: Path, **changes) -> Path:
    """The fixture checkpoint as the original writes it (torch.save of the dict), with entries changed."""
    path = tmp_path / "checkpoint_3.pth"
    torch.save({**fx.state_dict, **changes}, path)
    return path


PROBE_SIGMAS = torch.tensor([0.03, 0.7, 5.0, 90.0], dtype=torch.float64)


def _probe(seed: int = 0) -> torch.Tensor:
    """Images of the fixtures' batch size (4) and shape, for checks that need no reference output."""
    return torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------------
# The original's outputs


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("weights", WEIGHTS)
def test_denoiser_matches_the_original(load_fixture, case, weights):
    fx = load_fixture(case)
    ref = _reference(fx, weights)
    net = _denoiser(fx, weights)
    with NetworkCall(net) as call:
        D = net(ref.x.float(), ref.sigma)
    assert D.dtype == torch.float32 and D.shape == ref.x.shape
    excess = (D.double() - ref.D).abs() - ref.tolerance
    assert (excess <= 0).all(), f"D exceeds the tolerance by up to {excess.max().item():.3g}"
    # The network received the original's label and input, and returned its output.
    torch.testing.assert_close(call.label, fx.outputs["model_labels"], rtol=1e-6, atol=0)
    torch.testing.assert_close(call.image, fx.inputs["x"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(call.output, fx.outputs[weights]["raw_output"],
                               rtol=fx.meta["tolerance"]["rtol"], atol=ref.raw_atol)


def test_ema_and_raw_weights_differ(load_fixture):
    fx = load_fixture("sde_ncsnpp_ve")
    x = _probe()
    assert not torch.allclose(_denoiser(fx, "ema")(x, PROBE_SIGMAS), _denoiser(fx, "model")(x, PROBE_SIGMAS))


@pytest.mark.parametrize("case", CASES)
def test_edm_protocol(load_fixture, case):
    fx = load_fixture(case)
    net = _denoiser(fx)
    assert (net.img_resolution, net.img_channels, net.label_dim) == (16, 3, 0)
    if case == "sde_ddpmpp_vp":  # sigma_vp over score_sde's training times [1e-5, 1]
        vp = VPPrecond(beta_d=19.9, beta_min=0.1)
        assert net.sigma_min == pytest.approx(math.sqrt(math.expm1(0.5 * 19.9e-10 + 0.1e-5)))
        assert net.sigma_max == pytest.approx(vp.sigma_max, rel=1e-6)
        assert net.architecture == "DDPM++ cont. (VP)"
    else:  # Song's VE range [0.01, 50] in EDM's units
        assert (net.sigma_min, net.sigma_max) == pytest.approx((0.02, 100.0))
        assert net.architecture == "NCSN++ cont. (VE)"
    sigma = torch.tensor(0.7, dtype=torch.float64)
    assert torch.equal(net.round_sigma(sigma), sigma)
    x = _probe().double()
    D = net(x, sigma, class_labels=torch.zeros(4, 0))  # unconditional: labels are ignored
    assert D.dtype == torch.float32
    assert torch.equal(D, net(x.float(), sigma.expand(4)))  # one sigma, or one per image


# ---------------------------------------------------------------------------------------------------------
# Files and configs


@pytest.mark.parametrize("case", CASES)
def test_checkpoint_file_by_config_dict_inference_and_name(load_fixture, case, tmp_path, monkeypatch):
    fx = load_fixture(case)
    path = _checkpoint_file(fx, tmp_path)
    x, sigma = _probe(1), PROBE_SIGMAS
    expected = _denoiser(fx)(x, sigma)

    by_dict = load_score_sde_denoiser(path, config=fx.meta["config"])
    assert torch.equal(by_dict(x, sigma), expected)

    inferred = load_score_sde_denoiser(path, config=MISSING_FACTS[case])
    assert torch.equal(inferred(x, sigma), expected)
    # Everything but dropout (not stored; inactive at inference) is read from the tensors or follows from the SDE.
    assert dataclasses.replace(inferred.network.config, dropout=0.0) == NCSNppConfig.from_config(fx.meta["config"])
    as_json = load_score_sde_denoiser(path, config=json.dumps(MISSING_FACTS[case]))
    assert as_json.network.config == inferred.network.config

    name = f"test/{case}"  # a config known by name loads exactly like the dict
    monkeypatch.setitem(PUBLISHED_CONFIGS, name, fx.meta["config"])
    by_name = load_score_sde_denoiser(path, config=name)
    assert by_name.config_name == name and by_name.architecture.endswith(name)
    assert torch.equal(by_name(x, sigma), expected)


@pytest.mark.parametrize("case", CASES)
def test_inference_refuses_what_the_checkpoint_does_not_store(load_fixture, case):
    fx = load_fixture(case)
    with pytest.raises(CheckpointError, match="image size") as error:
        load_score_sde_denoiser(fx.state_dict)
    message = str(error.value)
    assert "'data': {'image_size': <pixels>}" in message
    # A positional embedding leaves VP vs sub-VP open; Gaussian Fourier features are VE's.
    assert ("'training': {'sde': 'vpsde'}" in message) == (case == "sde_ddpmpp_vp")
    assert ("sub-VP" in message) == (case == "sde_ddpmpp_vp")


def _released_layout(name: str) -> dict:
    """A checkpoint dict with the keys and shapes of a released config (meta tensors: no memory, no values)
    and its real noise-level buffer; enough for inference, which reads shapes and the buffer only."""
    config = published_config(name)
    with torch.device("meta"):
        state = NCSNpp(config).state_dict()
    model = config["model"]
    state["sigmas"] = torch.exp(torch.linspace(math.log(model["sigma_max"]), math.log(model["sigma_min"]),
                                               model["num_scales"], dtype=torch.float64))
    return {"model": {f"module.{key}": value for key, value in state.items()},
            "ema": {"decay": 0.999, "num_updates": 1, "shadow_params": []}, "step": 1}


@pytest.mark.parametrize("name", ["ve/cifar10_ncsnpp_continuous", "ve/cifar10_ncsnpp_deep_continuous"])
def test_released_ve_configs_are_inferred(name):
    info = inspect_score_sde_checkpoint(_released_layout(name))
    assert info["architecture"] == f"NCSN++ cont. (VE), {name}"
    assert (info["img_resolution"], info["sigma_min"], info["sigma_max"]) == (32, 0.02, 100.0)


def test_released_vp_checkpoint_is_ambiguous_with_sub_vp():
    """The released vp/ and subvp/cifar10_ddpmpp_deep_continuous checkpoints have identical tensors."""
    name = "vp/cifar10_ddpmpp_deep_continuous"
    checkpoint = _released_layout(name)
    with pytest.raises(CheckpointError, match="sub-VP") as error:
        load_score_sde_denoiser(checkpoint)
    assert f"config='{name}'" in str(error.value)
    info = inspect_score_sde_checkpoint(checkpoint)
    assert (info["sde"], info["img_resolution"], info["sigma_min"]) == (None, 32, None)
    assert any(f"config='{name}'" in note for note in info["notes"])
    info = inspect_score_sde_checkpoint(checkpoint, config={"training": {"sde": "vpsde"}})
    assert info["architecture"] == f"DDPM++ cont. (VP), {name}"
    assert info["sigma_max"] == pytest.approx(VPPrecond().sigma_max, rel=1e-6)


def test_config_that_does_not_fit_is_refused(load_fixture):
    fx = load_fixture("sde_ddpmpp_vp")
    with pytest.raises(CheckpointError, match=r"do not fit the config 'vp/cifar10_ddpmpp_continuous'.*wrong shape"):
        load_score_sde_denoiser(fx.state_dict, config="vp/cifar10_ddpmpp_continuous")
    fx = load_fixture("sde_ncsnpp_ve")
    config = json.loads(json.dumps(fx.meta["config"]))
    config["model"]["sigma_max"] = 100  # same tensors, another VE SDE
    with pytest.raises(CheckpointError, match=r"noise levels .* span \[0.01, 50\]"):
        load_score_sde_denoiser(fx.state_dict, config=config)
    with pytest.raises(CheckpointError, match="unknown score_sde config 'vp/nope'; known: vp/cifar10_ddpmpp"):
        load_score_sde_denoiser(fx.state_dict, config="vp/nope")
    with pytest.raises(CheckpointError, match="config must be a config name or a dict"):
        load_score_sde_denoiser(fx.state_dict, config=42)
    sub_vp = json.loads(json.dumps(load_fixture("sde_ddpmpp_vp").meta["config"]))
    sub_vp["training"]["sde"] = "subvpsde"
    with pytest.raises(CheckpointError, match="sub-VP SDE checkpoints are not supported"):
        load_score_sde_denoiser(load_fixture("sde_ddpmpp_vp").state_dict, config=sub_vp)


@pytest.mark.parametrize("case", CASES)
def test_inspect(load_fixture, case, tmp_path):
    fx = load_fixture(case)
    info = inspect_score_sde_checkpoint(_checkpoint_file(fx, tmp_path), config=fx.meta["config"])
    net = _denoiser(fx)
    assert info["family"] == "score_sde"
    assert info["architecture"] == net.architecture
    assert info["parameters"] == sum(p.numel() for p in net.parameters())
    assert (info["label_dim"], info["img_resolution"], info["img_channels"]) == (0, 16, 3)
    assert (info["sigma_min"], info["sigma_max"]) == pytest.approx((net.sigma_min, net.sigma_max))
    assert (info["dtype"], info["step"], info["ema"]) == ("float32", 3, True)
    assert any("EMA" in note for note in info["notes"])


# ---------------------------------------------------------------------------------------------------------
# The toolkit's own model file and its samplers


@pytest.mark.parametrize("case", CASES)
def test_native_model_file_round_trip(load_fixture, case, tmp_path):
    net = _denoiser(load_fixture(case))
    save_model(net, tmp_path / "model.pt")
    config, _ = read_model_file(tmp_path / "model.pt")
    assert (config["type"], config["sde"], config["network"]["type"]) == ("score_sde", net.sde, "ncsnpp")
    loaded = load_model(tmp_path / "model.pt")
    assert isinstance(loaded, ScoreSDEDenoiser) and not loaded.training
    assert (loaded.sigma_min, loaded.sigma_max) == (net.sigma_min, net.sigma_max)
    x = _probe(2)
    assert torch.equal(loaded(x, PROBE_SIGMAS), net(x, PROBE_SIGMAS))


@pytest.mark.parametrize("case", CASES)
def test_sampler_drives_the_adapter(load_fixture, case):
    net = _denoiser(load_fixture(case))
    images = Sampler(num_steps=4)(net, _probe(3))
    assert images.shape == (4, 3, 16, 16) and torch.isfinite(images).all()


# ---------------------------------------------------------------------------------------------------------
# Malformed files


def test_missing_ema_needs_use_ema_false(load_fixture):
    fx = load_fixture("sde_ddpmpp_vp")
    without_ema = {key: value for key, value in fx.state_dict.items() if key != "ema"}
    with pytest.raises(CheckpointError, match="no 'ema' entry.*use_ema=False"):
        load_score_sde_denoiser(without_ema, config=fx.meta["config"])
    raw = load_score_sde_denoiser(without_ema, config=fx.meta["config"], use_ema=False)
    expected = _denoiser(fx, "model").state_dict()
    assert all(torch.equal(value, expected[key]) for key, value in raw.state_dict().items())


def test_wrong_number_of_ema_weights(load_fixture, tmp_path):
    fx = load_fixture("sde_ddpmpp_vp")
    ema = dict(fx.state_dict["ema"], shadow_params=fx.state_dict["ema"]["shadow_params"][:-1])
    with pytest.raises(CheckpointError, match="shadow_params'] has 153 tensors but the model has 154"):
        load_score_sde_denoiser(_checkpoint_file(fx, tmp_path, ema=ema), config=fx.meta["config"])


def test_not_a_checkpoint_dict(load_fixture, tmp_path):
    fx = load_fixture("sde_ddpmpp_vp")
    path = tmp_path / "list.pth"
    torch.save([fx.state_dict["model"]], path)
    with pytest.raises(CheckpointError, match="holds a list, not the dict of a score_sde checkpoint"):
        load_score_sde_denoiser(path, config=fx.meta["config"])
    with pytest.raises(CheckpointError, match="expected a score_sde checkpoint file or dict, got list"):
        load_score_sde_denoiser([fx.state_dict])
    with pytest.raises(CheckpointError, match="no 'model' entry"):
        load_score_sde_denoiser({"ema": {}, "step": 0})


class _RunsCode:
    """Pickles as a call that creates a file: what a hostile checkpoint would do on an unrestricted load."""

    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return Path.touch, (self.sentinel,)


def test_pickled_code_is_refused_unrun(load_fixture, tmp_path):
    fx = load_fixture("sde_ddpmpp_vp")
    sentinel = tmp_path / "code-ran"
    hostile = _checkpoint_file(fx, tmp_path, step=_RunsCode(sentinel))
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_score_sde_denoiser(hostile, config=fx.meta["config"])
    with pytest.raises(CheckpointError, match="weights_only=True"):
        inspect_score_sde_checkpoint(hostile)
    assert not sentinel.exists()


def test_missing_and_truncated_files(load_fixture, tmp_path):
    fx = load_fixture("sde_ddpmpp_vp")
    with pytest.raises(CheckpointError, match="not found"):
        load_score_sde_denoiser(tmp_path / "missing.pth")
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(_checkpoint_file(fx, tmp_path).read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_score_sde_denoiser(truncated, config=fx.meta["config"])


def test_is_score_sde_checkpoint(load_fixture):
    checkpoint = load_fixture("sde_ncsnpp_ve").state_dict
    assert is_score_sde_checkpoint(checkpoint)
    assert not is_score_sde_checkpoint({k: v for k, v in checkpoint.items() if k != "ema"})
    unprefixed = {key.removeprefix("module."): value for key, value in checkpoint["model"].items()}
    assert not is_score_sde_checkpoint({**checkpoint, "model": unprefixed})
    assert not is_score_sde_checkpoint({**checkpoint, "model": {}})
    assert not is_score_sde_checkpoint([checkpoint])
