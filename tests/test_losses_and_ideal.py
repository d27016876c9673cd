"""Training losses (noise distributions and weightings) and the analytic ideal denoiser."""

import math

import numpy as np
import pytest
import torch

from edm_toolkit.ideal import IdealDenoiser
from edm_toolkit.losses import LOSSES, EDMLoss, IDDPMLoss, VELoss, VPLoss
from edm_toolkit.precond import IDDPMPrecond


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_edm_noise_distribution_is_log_normal():
    sigma = EDMLoss().sample_sigma(200_000, _gen())
    log_sigma = sigma.log().flatten()
    assert sigma.shape == (200_000, 1, 1, 1)
    assert float(log_sigma.mean()) == pytest.approx(-1.2, abs=0.01)
    assert float(log_sigma.std()) == pytest.approx(1.2, abs=0.01)


def test_vp_noise_distribution_is_uniform_in_t():
    loss = VPLoss()
    sigma = loss.sample_sigma(100_000, _gen()).double().flatten()
    t = (torch.sqrt(0.1**2 + 2 * 19.9 * torch.log1p(sigma**2)) - 0.1) / 19.9  # sigma_vp^-1
    assert float(t.min()) >= 1e-5 - 1e-7 and float(t.max()) <= 1 + 1e-6
    assert float(t.mean()) == pytest.approx((1 + 1e-5) / 2, abs=0.005)
    assert float(sigma.max()) <= 152.17


def test_ve_noise_distribution_is_log_uniform():
    sigma = VELoss().sample_sigma(100_000, _gen()).double().flatten()
    u = torch.log(sigma / 0.02) / math.log(100 / 0.02)
    assert float(u.min()) >= 0 and float(u.max()) <= 1
    assert float(u.mean()) == pytest.approx(0.5, abs=0.005) and float(u.var()) == pytest.approx(1 / 12, abs=0.002)


def test_iddpm_noise_distribution_picks_table_entries():
    sigma = IDDPMLoss().sample_sigma(5000, _gen()).flatten()
    u = IDDPMPrecond().u
    assert bool(torch.isin(sigma, u[:1000]).all()) and not bool((sigma == 0).any())


@pytest.mark.parametrize("name,expected", [
    ("edm", lambda s: (s**2 + 0.25) / (s * 0.5) ** 2), ("vp", lambda s: 1 / s**2), ("ve", lambda s: 1 / s**2),
    ("iddpm", lambda s: 1 / s**2),
])
def test_loss_weightings(name, expected):
    sigma = torch.tensor([0.002, 0.5, 3.0, 80.0], dtype=torch.float64)
    torch.testing.assert_close(LOSSES.create(name).weight(sigma), expected(sigma))


def test_per_element_loss_of_any_denoiser():
    images = torch.randn(4, 3, 8, 8, generator=_gen(1))
    loss_fn = EDMLoss()

    class Shifted(torch.nn.Module):  # D(x; sigma) = y + 0.1: loss must be weight(sigma) * 0.01 everywhere
        def forward(self, x, sigma, labels=None):
            return images + 0.1

    loss = loss_fn(Shifted(), images, generator=_gen(2))
    sigma = loss_fn.sample_sigma(4, _gen(2))  # the same first draw
    assert loss.shape == images.shape
    torch.testing.assert_close(loss, (loss_fn.weight(sigma) * 0.01).expand_as(loss), rtol=1e-5, atol=0)
    # Deterministic given the generator, and differentiable end to end.
    torch.testing.assert_close(loss_fn(Shifted(), images, generator=_gen(2)), loss)


def test_per_element_loss_trains_a_parameter():
    """A denoiser D = c x with learnable c, data N(0, 0.5^2): one gradient step lowers the EDM loss."""
    c = torch.nn.Parameter(torch.tensor(0.0))
    net = lambda x, sigma, labels=None: c * x
    images = 0.5 * torch.randn(64, 1, 4, 4, generator=_gen(3))
    first = EDMLoss()(net, images, generator=_gen(4)).mean()
    first.backward()
    assert float(c.grad) != 0
    with torch.no_grad():
        c -= 1e-4 * c.grad  # small enough for a first-order decrease
        assert float(EDMLoss()(net, images, generator=_gen(4)).mean()) < float(first)


# --- ideal denoiser ---------------------------------------------------------------------------------------------

def _brute_force(data, x, sigma, width=0.0):
    """E[x0 | x] for the mixture of N(y_i, width^2) written out in numpy."""
    y, x = data.reshape(len(data), -1).numpy(), x.reshape(len(x), -1).numpy()
    var = width**2 + sigma**2
    logits = -((x[:, None, :] - y[None]) ** 2).sum(-1) / (2 * var)
    w = np.exp(logits - logits.max(1, keepdims=True))
    w /= w.sum(1, keepdims=True)
    return (w[:, :, None] * ((width**2 * x[:, None, :] + sigma**2 * y[None]) / var)).sum(1)


@pytest.mark.parametrize("width", [0.0, 0.3])
@pytest.mark.parametrize("sigma", [0.05, 0.7, 20.0])
def test_ideal_denoiser_matches_brute_force(width, sigma):
    data = torch.randn(7, 2, 3, 3, generator=_gen(5), dtype=torch.float64)
    x = torch.randn(4, 2, 3, 3, generator=_gen(6), dtype=torch.float64) * (1 + sigma)
    got = IdealDenoiser(data, width=width)(x, sigma).reshape(4, -1).numpy()
    np.testing.assert_allclose(got, _brute_force(data, x, sigma, width), rtol=1e-10, atol=1e-12)


def test_ideal_denoiser_obeys_tweedie():
    """D(x; sigma) = x + sigma^2 grad log p_sigma(x) (Tweedie; EDM Eq. 3), with p_sigma the noised mixture."""
    data = torch.randn(5, 1, 2, 2, generator=_gen(7), dtype=torch.float64)
    x = torch.randn(3, 1, 2, 2, generator=_gen(8), dtype=torch.float64).requires_grad_(True)
    sigma, width = 0.8, 0.2
    var = sigma**2 + width**2
    sq = ((x.reshape(3, 1, -1) - data.reshape(1, 5, -1)) ** 2).sum(-1)
    torch.logsumexp(-sq / (2 * var), dim=1).sum().backward()
    expected = x + sigma**2 * x.grad
    got = IdealDenoiser(data, width=width)(x.detach(), sigma)
    torch.testing.assert_close(got, expected.detach(), rtol=1e-10, atol=1e-12)


def test_ideal_denoiser_class_conditioning():
    data = torch.randn(6, 1, 2, 2, generator=_gen(9), dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    net = IdealDenoiser(data, labels, label_dim=3)
    x = torch.randn(2, 1, 2, 2, generator=_gen(10), dtype=torch.float64)
    one_hot = torch.nn.functional.one_hot(torch.tensor([1, 2]), 3).double()
    got = net(x, 0.5, one_hot)
    for row, cls in enumerate([1, 2]):
        subset = data[labels == cls]
        np.testing.assert_allclose(got[row].flatten().numpy(), _brute_force(subset, x[row:row + 1], 0.5)[0], rtol=1e-10)
    # No labels (or a zero row, as EDM passes for None) keeps every point.
    torch.testing.assert_close(net(x, 0.5, torch.zeros(1, 3)), IdealDenoiser(data)(x, 0.5))
    # At tiny sigma the denoiser returns the nearest point of the class.
    assert torch.equal(net(data[1:2] + 1e-4, 1e-4, one_hot[:1]), data[1:2])


def test_ideal_denoiser_validates_its_input():
    with pytest.raises(ValueError, match="data must be"):
        IdealDenoiser(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="labels must be"):
        IdealDenoiser(torch.zeros(3, 1, 2, 2), torch.tensor([0, 1, 5]), label_dim=3)
