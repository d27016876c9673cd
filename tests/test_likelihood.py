"""Bits/dim: the variational bound against improved-diffusion's calc_bpd_loop (fixture C14 id_bpd), and the
probability-flow ODE likelihood against exact log-densities of Gaussian (mixture) data."""

from __future__ import annotations

import math

import pytest
import torch

from edm_toolkit.adapters.openai import load_openai_checkpoint
from edm_toolkit.errors import ConfigError
from edm_toolkit.ideal import IdealDenoiser
from edm_toolkit.metrics.likelihood import ProbabilityFlowLikelihood, bits_per_dim, dequantize, variational_bound
from edm_toolkit.rng import SeedGenerators

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread (conftest)

BPD_FLAGS = "--image_size 8 --num_heads 4 --noise_schedule cosine --diffusion_steps 50 --rescale_timesteps True"
# RK45 at rtol = atol = 1e-5 (score_sde's): the log-density of 16 dimensions comes out within this many nats.
ODE_TOLERANCE = 5e-3


@pytest.fixture(scope="module")
def bpd_net(load_fixture):
    return load_openai_checkpoint(load_fixture("id_unet_rescaled").state_dict, codebase="improved",
                                  model_flags=BPD_FLAGS)


def test_variational_bound_matches_calc_bpd_loop(load_fixture, bpd_net):
    fx = load_fixture("id_bpd")
    noise = iter(fx.inputs["step_noise"])  # one draw per step, t = T-1 down to 0
    seen = []
    hook = bpd_net.model.register_forward_pre_hook(lambda module, args: seen.append(args[1].clone()))
    steps = []
    try:
        result = variational_bound(bpd_net, fx.inputs["x_start"], randn_like=lambda x: next(noise),
                                   progress=lambda done, T: steps.append((done, T)))
    finally:
        hook.remove()
    assert steps[-1] == (50, 50) and torch.equal(torch.stack(seen), fx.outputs["network_timesteps_per_call"])
    tol = {"rtol": fx.meta["tolerance"]["rtol"], "atol": fx.meta["tolerance"]["atol"]}
    expected = fx.outputs
    torch.testing.assert_close(result.total_bpd.float(), expected["total_bpd"], **tol)
    torch.testing.assert_close(result.prior_bpd.float(), expected["prior_bpd"], **tol)
    for key in ("vb", "xstart_mse", "mse"):  # the original's columns run from t = T-1 down to 0
        torch.testing.assert_close(getattr(result, key).flip(1).float(), expected[key], **tol, msg=key)
    assert torch.equal(result.total_bpd, result.vb.sum(1) + result.prior_bpd)


def test_variational_bound_depends_only_on_each_images_seed(load_fixture, bpd_net):
    x0 = load_fixture("id_bpd").inputs["x_start"]
    both = variational_bound(bpd_net, x0, randn_like=SeedGenerators([3, 4]).randn_like).total_bpd
    alone = variational_bound(bpd_net, x0[1:], randn_like=SeedGenerators([4]).randn_like).total_bpd
    torch.testing.assert_close(both[1:], alone, rtol=1e-6, atol=1e-6)


def test_variational_bound_errors(bpd_net):
    with pytest.raises(ConfigError, match="needs a model with a discrete step grid.*use --method ode"):
        variational_bound(IdealDenoiser(torch.zeros(1, 3, 2, 2)), torch.zeros(1, 3, 2, 2))
    with pytest.raises(ConfigError, match="8-bit data scaled to \\[-1, 1\\]"):
        variational_bound(bpd_net, torch.full([1, 3, 8, 8], 2.0))


# ---- the probability-flow ODE likelihood


def gaussian_log_density(x, mean, variance):
    d = x[0].numel()
    return -0.5 * (x - mean).square().flatten(1).sum(1) / variance - 0.5 * d * math.log(2 * math.pi * variance)


def gaussian_data(seed=0, n=6, s=0.2):
    """The exact denoiser of N(mu, s^2 I) data on 1x4x4 images, and samples of it."""
    torch.manual_seed(seed)
    mu = torch.rand(1, 1, 4, 4, dtype=torch.float64) - 0.5
    return IdealDenoiser(mu, width=s), mu, s, mu + s * torch.randn(n, 1, 4, 4, dtype=torch.float64)


@pytest.mark.parametrize("settings", [
    {},  # EDM's ODE: sigma(t) = t, no scaling, sigma in [0.002, 80]
    {"schedule": "vp", "scaling": "vp", "sigma_min": 0.001, "sigma_max": 152.0},  # score_sde's VP range
    {"schedule": "ve", "sigma_min": 0.02, "sigma_max": 10.0},
    {"estimator": "exact"},
])
def test_gaussian_data_exact_log_density(settings):
    """N(mu, s^2 I) data: the noisy marginal at sigma is N(mu, (s^2 + sigma^2) I) and the ideal denoiser is linear,
    so the Rademacher estimate of its trace is exact. log p_{sigma_min}(x) = log N(z; mu, (s^2 + sigma_max^2) I) +
    delta_logp holds to the solver's tolerance; the value with the toolkit's prior N(0, sigma_max^2 I) differs
    from it by exactly the two priors' difference at z."""
    net, mu, s, x = gaussian_data()
    likelihood = ProbabilityFlowLikelihood(**settings)
    result = likelihood(net, x)
    exact = gaussian_log_density(x, mu, s**2 + likelihood.sigma_min**2)
    sigma_max = likelihood.sigma_max
    with_true_prior = result.log_likelihood + (gaussian_log_density(result.z, mu, s**2 + sigma_max**2)
                                                - gaussian_log_density(result.z, 0, sigma_max**2))
    assert (with_true_prior - exact).abs().max() < ODE_TOLERANCE
    assert result.nfe > 10 and result.z.shape == x.shape
    torch.testing.assert_close(result.log_likelihood, result.prior_logp + result.delta_logp)


def test_prior_error_is_small_at_large_sigma_max():
    net, mu, s, x = gaussian_data(seed=1)
    result = ProbabilityFlowLikelihood(sigma_max=2000.0)(net, x)
    assert (result.log_likelihood - gaussian_log_density(x, mu, s**2 + 0.002**2)).abs().max() < ODE_TOLERANCE


def test_mixture_exact_log_density_with_the_exact_trace():
    """A non-linear denoiser (three widened points): the exact trace gives the mixture's exact log-density."""
    torch.manual_seed(1)
    points, s = torch.rand(3, 1, 2, 2, dtype=torch.float64) * 2 - 1, 0.1
    net = IdealDenoiser(points, width=s)
    x = points[torch.tensor([0, 1, 2, 0])] + s * torch.randn(4, 1, 2, 2, dtype=torch.float64)

    def mixture(z, variance):
        return torch.logsumexp(torch.stack([gaussian_log_density(z, p, variance) for p in points], 1), 1) - math.log(3)

    likelihood = ProbabilityFlowLikelihood(estimator="exact")
    result = likelihood(net, x)
    with_true_prior = result.delta_logp + mixture(result.z, s**2 + 80.0**2)
    assert (with_true_prior - mixture(x, s**2 + 0.002**2)).abs().max() < ODE_TOLERANCE


def test_gaussian_probe_is_unbiased():
    """With Gaussian probes the estimate of a linear denoiser's trace is c |eps|^2 for c d: unbiased, not exact."""
    torch.manual_seed(2)
    mu, s = torch.zeros(1, 1, 1, 1, dtype=torch.float64), 0.5
    x = s * torch.randn(512, 1, 1, 1, dtype=torch.float64)
    likelihood = ProbabilityFlowLikelihood(estimator="gaussian", sigma_max=20.0)
    result = likelihood(IdealDenoiser(mu, width=s), x, probe=torch.randn(x.shape, dtype=torch.float64))
    exact = gaussian_log_density(x, mu, s**2 + 0.002**2)
    error = result.log_likelihood - exact
    assert error.std() > 0.5  # single-probe noise, of the order of log(sigma_max/s)
    assert abs(float(error.mean())) < 4 * float(error.std()) / math.sqrt(len(error))


def test_dequantisation_and_bits_per_dim():
    images = torch.tensor([[[[0, 255]]]], dtype=torch.uint8)
    x = dequantize(images, torch.full(images.shape, 0.5))
    assert x.flatten().tolist() == [-1 + 0.5 / 128, 1 - 0.5 / 128]
    # A uniform density over [-1, 1]^d is 2^-d: log2(256) = 8 bits per dimension of 8-bit data.
    assert float(bits_per_dim(torch.tensor(-3 * math.log(2.0)), 3)) == pytest.approx(8.0)


def test_ode_likelihood_errors():
    with pytest.raises(ConfigError, match="unknown trace estimator 'hutch'"):
        ProbabilityFlowLikelihood(estimator="hutch")
    with pytest.raises(ConfigError, match="need 0 < sigma_min < sigma_max"):
        ProbabilityFlowLikelihood(sigma_min=1.0, sigma_max=0.5)
    with pytest.raises(ConfigError, match="dequantize takes uint8"):
        dequantize(torch.zeros(1), torch.zeros(1))
    net, _, _, x = gaussian_data()
    with pytest.raises(ConfigError, match="probes must be shaped like the images"):
        ProbabilityFlowLikelihood()(net, x, probe=torch.ones(1))
    with pytest.raises(ConfigError, match="needed more than 5 evaluations"):
        ProbabilityFlowLikelihood(max_evaluations=5)(net, x)
