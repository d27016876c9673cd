"""Classifier guidance as a denoiser wrapper (sigma form), against autograd, finite differences and ADM's cond_fn.

The discrete samplers' original guided forms are covered by test_discrete (fixture B12).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from edm_toolkit.adapters.openai import load_openai_checkpoint, load_openai_classifier
from edm_toolkit.errors import ConfigError
from edm_toolkit.guidance import ClassifierGuidance, GuidedDenoiser, classifier_log_prob_grad
from edm_toolkit.precond import EDMPrecond
from edm_toolkit.sampling import Sampler
from edm_toolkit.solvers.discrete import DDIM

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread (conftest)

from gd_fixture_flags import CLASSIFIER_FLAGS, MODEL_FLAGS, NUM_CLASSES  # noqa: E402


@pytest.fixture(scope="module")
def net(load_fixture):
    return load_openai_checkpoint(load_fixture("gd_unet_legacy").state_dict, model_flags=MODEL_FLAGS)


@pytest.fixture(scope="module")
def classifier(load_fixture):
    return load_openai_classifier(load_fixture("gd_classifier_attention").state_dict, model_flags=CLASSIFIER_FLAGS)


@pytest.fixture(scope="module")
def case(load_fixture, net):
    """gd_classifier_attention's inputs as EDM's x at the grid levels of its steps, with one-hot labels."""
    fx = load_fixture("gd_classifier_attention")
    sigma = net.step_grid.sigmas[fx.inputs["t"]]
    x = fx.inputs["x"].double() * (1 + sigma**2).sqrt().reshape(-1, 1, 1, 1)
    return fx, x, sigma, F.one_hot(fx.inputs["y"], NUM_CLASSES).float()


def log_prob(classifier, x, sigma, t, labels):
    """sum_i log p(y_i | x_i; sigma_i), written out: the classifier sees x/sqrt(1 + sigma^2) at steps t."""
    x_t = (x / (1 + sigma**2).sqrt().reshape(-1, 1, 1, 1)).float()
    log_probs = torch.log_softmax(classifier(x_t, t), dim=-1)
    return log_probs[torch.arange(len(x)), labels.argmax(1)].sum()


def test_gradient_is_adm_cond_fn_through_the_scaling(case, net, classifier):
    fx, x, sigma, labels = case
    guided = ClassifierGuidance(net, classifier)
    assert torch.equal(guided.timestep_of_sigma(sigma), fx.inputs["t"])
    grad = guided.log_prob_grad(x, sigma, labels.argmax(1))
    assert grad.dtype == torch.float64
    # d/dx f(x / sqrt(1 + sigma^2)) = cond_fn's gradient in x_t, divided by sqrt(1 + sigma^2).
    expected = fx.outputs["cond_fn_grad"].double() / (1 + sigma**2).sqrt().reshape(-1, 1, 1, 1)
    torch.testing.assert_close(grad, expected, rtol=1e-3, atol=1e-6)
    x_t = (x / (1 + sigma**2).sqrt().reshape(-1, 1, 1, 1)).float()
    torch.testing.assert_close(classifier_log_prob_grad(classifier, x_t, fx.inputs["t"], fx.inputs["y"]),
                               fx.outputs["cond_fn_grad"], rtol=1e-3, atol=1e-5)


def test_gradient_matches_autograd_and_finite_differences(case, net, classifier):
    fx, x, sigma, labels = case
    t = fx.inputs["t"]  # the steps of these sigmas on the model's grid
    grad = ClassifierGuidance(net, classifier).log_prob_grad(x, sigma, labels.argmax(1))
    x_in = x.clone().requires_grad_(True)
    reference = torch.autograd.grad(log_prob(classifier, x_in, sigma, t, labels), x_in)[0]
    torch.testing.assert_close(grad, reference, rtol=1e-5, atol=1e-8)
    direction = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    h = 1e-2
    with torch.no_grad():
        difference = (log_prob(classifier, x + h * direction, sigma, t, labels)
                      - log_prob(classifier, x - h * direction, sigma, t, labels)) / (2 * h)
    assert float(difference) == pytest.approx(float((grad * direction).sum()), rel=2e-2)


def test_wrapper_adds_sigma_squared_times_the_gradient(case, net, classifier):
    _, x, sigma, labels = case
    guided = ClassifierGuidance(net, classifier, scale=2.5)
    with torch.no_grad():
        D, D_guided = net(x, sigma, labels), guided(x, sigma, labels)
    grad = guided.log_prob_grad(x, sigma, labels.argmax(1))
    expected = D.double() + sigma.reshape(-1, 1, 1, 1) ** 2 * 2.5 * grad
    torch.testing.assert_close(D_guided.double(), expected, rtol=1e-5, atol=1e-5)
    assert D_guided.dtype == D.dtype


def test_scale_zero_is_the_plain_denoiser(case, net, classifier):
    _, x, sigma, labels = case
    off = ClassifierGuidance(net, classifier, scale=0)
    with torch.no_grad():
        assert torch.equal(off(x, sigma, labels), net(x, sigma, labels))
    sampler, latents = Sampler(solver="euler", num_steps=3), torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(sampler(off, latents, labels[:1]), sampler(net, latents, labels[:1]))
    plain = Sampler(solver=DDIM(respacing="ddim2"))(net, latents, labels[:1], randn_like=torch.zeros_like)
    off_in_ddim = Sampler(solver=DDIM(respacing="ddim2", classifier=classifier, classifier_scale=0.0))
    assert torch.equal(off_in_ddim(net, latents, labels[:1], randn_like=torch.zeros_like), plain)


def test_sigma_interval_switches_guidance_off_outside(case, net, classifier):
    _, x, sigma, labels = case  # sigma of steps 0, 437 and 999: about 0.006, 0.8 and 2e4
    full = ClassifierGuidance(net, classifier)
    middle = ClassifierGuidance(net, classifier, sigma_interval=(0.1, 10.0))
    with torch.no_grad():
        D, D_full, D_middle = net(x, sigma, labels), full(x, sigma, labels), middle(x, sigma, labels)
        # nothing inside: the plain call
        assert torch.equal(middle(x[:1], sigma[:1], labels[:1]), net(x[:1], sigma[:1], labels[:1]))
    assert torch.equal(D_middle[[0, 2]], D[[0, 2]])
    assert not torch.equal(D_middle[1], D[1])
    torch.testing.assert_close(D_middle[1], D_full[1], rtol=1e-5, atol=1e-5)


def test_wrapper_is_a_denoiser_for_every_sampler(net, classifier):
    guided = ClassifierGuidance(net, classifier, scale=3.0)
    assert (guided.sigma_min, guided.sigma_max, guided.img_resolution, guided.label_dim) == (
        net.sigma_min, net.sigma_max, 16, NUM_CLASSES)
    assert torch.equal(guided.round_sigma(torch.tensor([0.5, 3.0])), net.round_sigma(torch.tensor([0.5, 3.0])))
    latents, labels = torch.randn(1, 3, 16, 16), torch.eye(NUM_CLASSES)[[4]]
    sampler = Sampler(solver="heun", num_steps=2)
    with torch.no_grad():
        images = sampler(guided, latents, labels)
    assert images.shape == latents.shape and bool(images.isfinite().all())
    with torch.no_grad():
        assert not torch.allclose(images, sampler(net, latents, labels))


def test_sigma_form_in_ddim_is_adm_eps_form(net, classifier):
    """Without clipping, DDIM through D' equals DDIM with eps' = eps - sqrt(1 - abar) grad (Algorithm 2)."""
    latents, labels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3)), torch.eye(10)[[1, 7]]
    ddim = DDIM(respacing="ddim3", clip_denoised=False)
    eps_form = Sampler(solver=dataclasses.replace(ddim, classifier=classifier, classifier_scale=2.0))(
        net, latents, labels, randn_like=torch.zeros_like)
    sampler = Sampler(solver=ddim)
    sigma_form = sampler(ClassifierGuidance(net, classifier, scale=2.0), latents, labels, randn_like=torch.zeros_like)
    torch.testing.assert_close(sigma_form, eps_form, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(eps_form, sampler(net, latents, labels, randn_like=torch.zeros_like))


def test_continuous_denoiser_uses_the_classifier_grid(classifier):
    guided = ClassifierGuidance(EDMPrecond(label_dim=0), classifier)
    assert guided.label_dim == NUM_CLASSES  # the classifier's classes, so that samplers draw labels
    torch.testing.assert_close(guided.grid_sigmas, classifier.step_grid.sigmas)


@pytest.mark.parametrize("kwargs,match", [
    ({"scale": float("nan")}, "finite"),
    ({"scale": True}, "finite"),
    ({"sigma_interval": (2.0, 1.0)}, "lo <= hi"),
    ({"sigma_interval": 3.0}, "pair"),
])
def test_option_errors(net, classifier, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ClassifierGuidance(net, classifier, **kwargs)


def test_errors(net, classifier, case):
    _, x, sigma, _ = case
    with pytest.raises(ConfigError, match="class labels"):
        ClassifierGuidance(EDMPrecond(label_dim=0), classifier)(x, sigma)
    with pytest.raises(ConfigError, match="one-hot"):
        ClassifierGuidance(EDMPrecond(label_dim=0), classifier)(x, sigma, torch.tensor([1, 2, 3]))
    short = load_openai_classifier(classifier.model.state_dict(), model_flags=CLASSIFIER_FLAGS + " --diffusion_steps 500")
    with pytest.raises(ConfigError, match="500 steps"):
        ClassifierGuidance(net, short)
    assert issubclass(ClassifierGuidance, GuidedDenoiser)


# --- classifier-free guidance and autoguidance --------------------------------------------------------------

def _ideal_pair():
    from edm_toolkit.ideal import IdealDenoiser

    g = torch.Generator().manual_seed(5)
    data = torch.randn(6, 1, 2, 2, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    return IdealDenoiser(data, labels, label_dim=3), IdealDenoiser(data, labels, label_dim=3, width=0.5), data


def test_classifier_free_guidance_formula_and_identity():
    from edm_toolkit.guidance import ClassifierFreeGuidance

    net, _, _ = _ideal_pair()
    x = torch.randn(4, 1, 2, 2, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    y = torch.eye(3)[[0, 1, 2, 1]]
    D_c, D_u = net(x, 0.7, y), net(x, 0.7, torch.zeros(4, 3))
    torch.testing.assert_close(ClassifierFreeGuidance(net, 3.0)(x, 0.7, y), D_u + 3.0 * (D_c - D_u))
    assert torch.equal(ClassifierFreeGuidance(net, 1.0)(x, 0.7, y), D_c)  # w = 1 is plain conditional D
    g = ClassifierFreeGuidance(net, 3.0, sigma_interval=(1.0, 5.0))
    assert torch.equal(g(x, 0.7, y), D_c) and g.network_evaluations(0.7) == 1 and g.network_evaluations(2.0) == 2
    with pytest.raises(ConfigError, match="class-conditional"):
        from edm_toolkit.ideal import IdealDenoiser

        ClassifierFreeGuidance(IdealDenoiser(torch.zeros(2, 1, 2, 2)), 2.0)  # unconditional


def test_autoguidance_formula_and_sampling_identity():
    from edm_toolkit.generate import sample_batch
    from edm_toolkit.guidance import AutoGuidance
    from edm_toolkit.sampling import Sampler

    net, weak, _ = _ideal_pair()
    x = torch.randn(3, 1, 2, 2, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    y = torch.eye(3)[[0, 1, 2]]
    expected = weak(x, 2.0, y) + 2.5 * (net(x, 2.0, y) - weak(x, 2.0, y))
    torch.testing.assert_close(AutoGuidance(net, weak, 2.5)(x, 2.0, y), expected)
    # w = 1: plain sampling, bit for bit, with the honest NFE of one network per call.
    net.img_resolution = 2
    sampler = Sampler(num_steps=5)
    plain = sample_batch(net, sampler, [0, 1, 2], "cpu")
    guided = AutoGuidance(net, weak, 1.0)
    assert torch.equal(sample_batch(guided, sampler, [0, 1, 2], "cpu"), plain)
    counts = []
    sampler(AutoGuidance(net, weak, 2.0), plain, callback=lambda info: counts.append(info.nfe))
    assert counts[-1] == 2 * sampler.nfe
