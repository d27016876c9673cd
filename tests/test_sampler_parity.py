"""The toolkit's euler/heun sampler reproduces EDM's edm_sampler and ablation_sampler to float64 round-off."""

import itertools
import math
import random

import pytest
import torch

from edm_toolkit.precond import EDMPrecond, IDDPMPrecond, VPPrecond
from edm_toolkit.sampling import sample
from edm_reference import AnalyticDenoiser, reference_sampler, toolkit_options

RUNS = [
    "edm_det", "edm_churn", "abl_euler_vp_vp_vp", "abl_heun_ve_ve_none", "abl_heun_iddpm_linear_none",
    "abl_heun_edm_linear_none", "abl_heun_edm_linear_none_alpha0.5", "extra_abl_heun_ve_ve_none_18steps",
    "extra_abl_heun_edm_linear_none_churn", "extra_abl_heun_vp_vp_vp_churn",
]


def _stored_noise(step_noise):
    calls = iter(step_noise)
    return lambda x: next(calls).to(x.dtype)


def _fixture_net(fx):
    return AnalyticDenoiser(fx.inputs["analytic_mu"], fx.inputs["analytic_s2"], fx.inputs["analytic_c"])


@pytest.mark.parametrize("run", RUNS)
def test_reference_sampler_matches_original(load_fixture, run):
    """The test oracle itself reproduces EDM's original output (analytic net, pure float64)."""
    fx = load_fixture("edm_samplers")
    expected = fx.outputs["analytic"][run]
    net = _fixture_net(fx)
    x = reference_sampler(net, fx.inputs["latents"], fx.inputs["class_labels"],
                          randn_like=_stored_noise(fx.inputs["step_noise"]), **fx.meta["runs"][run]["kwargs_all"])
    torch.testing.assert_close(x, expected["x"], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(torch.tensor(net.sigmas, dtype=torch.float64), expected["net_sigmas"], rtol=1e-12, atol=0)


@pytest.mark.parametrize("run", RUNS)
def test_toolkit_matches_original_analytic(load_fixture, run):
    fx = load_fixture("edm_samplers")
    expected = fx.outputs["analytic"][run]
    kwargs = fx.meta["runs"][run]["kwargs_all"]
    net = _fixture_net(fx)
    x = sample(net, fx.inputs["latents"], fx.inputs["class_labels"],
               randn_like=_stored_noise(fx.inputs["step_noise"]), **toolkit_options(kwargs))
    torch.testing.assert_close(x, expected["x"], rtol=1e-9, atol=1e-9)
    # Honest evaluation count and the very noise levels the original handed to the network.
    assert len(net.sigmas) == fx.meta["runs"][run]["num_net_calls_analytic"]
    torch.testing.assert_close(torch.tensor(net.sigmas, dtype=torch.float64), expected["net_sigmas"], rtol=1e-12, atol=0)


def _edm_net(load_fixture):
    from edm_toolkit.networks.song_unet import SongUNet

    fx = load_fixture("edm_precond_edm")
    kwargs = {k: v for k, v in fx.meta["constructor_kwargs"].items()
              if k not in ("label_dim", "sigma_min", "sigma_max", "sigma_data", "use_fp16", "model_type", "img_channels")}
    model = SongUNet(in_channels=3, out_channels=3, label_dim=10, **kwargs)
    net = EDMPrecond(model, sigma_min=0.0, sigma_max=math.inf, sigma_data=0.5, img_channels=3, img_resolution=16, label_dim=10)
    net.load_state_dict(fx.state_dict, strict=True)
    return net.eval()


@pytest.mark.parametrize("run", ["edm_det", "edm_churn", "abl_heun_edm_linear_none_alpha0.5", "extra_abl_heun_vp_vp_vp_churn"])
def test_toolkit_matches_original_network(load_fixture, run):
    """The same with EDM's own EDMPrecond network (float32 inside, float64 sampler)."""
    pytest.importorskip("edm_toolkit.networks.song_unet")
    fx = load_fixture("edm_samplers")
    net = _edm_net(load_fixture)
    with torch.no_grad():
        x = sample(net, fx.inputs["latents"], fx.inputs["class_labels"],
                   randn_like=_stored_noise(fx.inputs["step_noise"]), **toolkit_options(fx.meta["runs"][run]["kwargs_all"]))
    torch.testing.assert_close(x, fx.outputs["edm_net"][run]["x"], rtol=1e-3, atol=2e-3)


class _RoundedAnalytic(AnalyticDenoiser):
    """The analytic net behind a real preconditioner's sigma range and round_sigma (VP range, iDDPM grid)."""

    def __init__(self, mu, precond):
        super().__init__(mu)
        self.sigma_min, self.sigma_max = precond.sigma_min, precond.sigma_max
        self.round_sigma = precond.round_sigma


COMBOS = list(itertools.product(["euler", "heun"], ["vp", "ve", "iddpm", "edm"], ["vp", "ve", "linear"], ["vp", "none"]))


@pytest.mark.parametrize("solver,disc,schedule,scaling", COMBOS)
def test_every_combination_matches_reference(solver, disc, schedule, scaling):
    """Every solver x discretization x schedule x scaling, with random churn and options, on three networks'
    sigma conventions (continuous, VP range, iDDPM's rounded grid): equal to the oracle to round-off."""
    rng = random.Random(f"{solver}{disc}{schedule}{scaling}")
    gen = torch.Generator().manual_seed(rng.randrange(1 << 30))
    mu = torch.randn(1, 2, 4, 4, generator=gen, dtype=torch.float64)
    latents = torch.randn(3, 2, 4, 4, generator=gen, dtype=torch.float64)
    for wrap in (None, VPPrecond(), IDDPMPrecond()):
        kwargs = dict(
            num_steps=rng.choice([4, 7, 12]), solver=solver, discretization=disc, schedule=schedule, scaling=scaling,
            alpha=rng.choice([1.0, 0.5, 0.8]), rho=rng.choice([7.0, 3.0]), epsilon_s=rng.choice([1e-3, 1e-2]),
            S_churn=rng.choice([0.0, 10.0, 80.0]), S_min=rng.choice([0.0, 0.05]), S_max=rng.choice([math.inf, 50.0]),
            S_noise=rng.choice([1.0, 1.007]),
        )
        if rng.random() < 0.5:
            kwargs.update(sigma_min=rng.choice([0.005, 0.02]), sigma_max=rng.choice([10.0, 60.0]))
        noise = torch.randn(kwargs["num_steps"], *latents.shape, generator=gen, dtype=torch.float64)
        net_ref = AnalyticDenoiser(mu) if wrap is None else _RoundedAnalytic(mu, wrap)
        net_new = AnalyticDenoiser(mu) if wrap is None else _RoundedAnalytic(mu, wrap)
        expected = reference_sampler(net_ref, latents, randn_like=_stored_noise(noise), **kwargs)
        actual = sample(net_new, latents, randn_like=_stored_noise(noise), **toolkit_options(kwargs))
        scale = expected.abs().max().clamp(min=1.0)
        torch.testing.assert_close(actual / scale, expected / scale, rtol=0, atol=1e-9, msg=lambda m: f"{kwargs}, {wrap}: {m}")
        torch.testing.assert_close(torch.tensor(net_new.sigmas, dtype=torch.float64),
                                   torch.tensor(net_ref.sigmas, dtype=torch.float64), rtol=1e-9, atol=0)
