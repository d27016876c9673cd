"""The generic wrapper: eps-, x0-, v- and score-prediction networks become the same EDM denoiser."""


import pytest
import torch

from edm_toolkit.adapters.generic import PredictionDenoiser
from edm_toolkit.errors import ConfigError
from edm_toolkit.ideal import IdealDenoiser

DATA = torch.randn(5, 1, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
IDEAL = IdealDenoiser(DATA, width=0.2)


class Perfect(torch.nn.Module):
    """A network that predicts exactly, in its own parameterization, from the ideal D (time input = sigma)."""

    def __init__(self, prediction, parameterization):
        super().__init__()
        self.prediction, self.parameterization = prediction, parameterization

    def forward(self, x_in, time, **unused):
        s = time.double().reshape(-1, 1, 1, 1)
        alpha = 1 / (1 + s**2).sqrt() if self.parameterization == "vp" else torch.ones_like(s)
        x = x_in.double() / alpha  # back to EDM's x = x0 + sigma n
        D = IDEAL(x, s.flatten())
        eps = (x - D) / s
        if self.prediction == "eps":
            out = eps
        elif self.prediction == "x0":
            out = D
        elif self.prediction == "v":
            out = alpha * eps - (s * alpha) * D  # v = alpha_t eps - sigma_t x0
        elif self.parameterization == "ve":
            out = (D - x) / s**2  # grad log p(x)
        else:
            out = -eps / (s * alpha)  # grad log p(x_t) = -eps/sigma_t
        return out.float()


@pytest.mark.parametrize("prediction,parameterization",
                         [("eps", "vp"), ("eps", "ve"), ("x0", "vp"), ("v", "vp"), ("score", "vp"), ("score", "ve")])
def test_every_prediction_gives_the_ideal_denoiser(prediction, parameterization):
    net = PredictionDenoiser(Perfect(prediction, parameterization), prediction=prediction,
                             parameterization=parameterization, time="sigma", img_channels=1)
    x = torch.randn(4, 1, 3, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for sigma in (0.05, 0.8, 12.0):
        xs = DATA[:4] + sigma * x
        expected = IDEAL(xs, sigma)
        torch.testing.assert_close(net(xs, torch.tensor(sigma)).double(), expected, rtol=1e-4, atol=2e-5 * (1 + sigma))


def test_discrete_grid_rounds_and_feeds_the_index():
    seen = []

    class Recorder(torch.nn.Module):
        def forward(self, x, t, **unused):
            seen.append(t)
            return torch.zeros_like(x)

    grid = torch.tensor([0.01, 0.1, 1.0, 10.0], dtype=torch.float64)
    net = PredictionDenoiser(Recorder(), sigmas=grid, time="index", time_scale=250.0, img_channels=1)
    assert (net.sigma_min, net.sigma_max) == (0.01, 10.0)
    assert float(net.round_sigma(torch.tensor(0.7, dtype=torch.float64))) == 1.0
    assert net.step_grid.index(torch.tensor([0.012, 9.0])).tolist() == [0, 3]
    net(torch.zeros(2, 1, 2, 2), torch.tensor(0.09))
    assert seen[-1].tolist() == [250.0, 250.0]


def test_labels_and_extra_channels():
    class Echo(torch.nn.Module):
        def forward(self, x, t, y=None):
            return torch.cat([torch.zeros_like(x), torch.ones_like(x)], dim=1) + y.reshape(-1, 1, 1, 1)

    net = PredictionDenoiser(Echo(), prediction="x0", sigmas=torch.tensor([0.5, 1.0]), img_channels=1, label_dim=3)
    D, extra = net.denoise_with_variance(torch.zeros(2, 1, 2, 2), torch.tensor(1.0), torch.eye(3)[[2, 1]])
    assert D[:, 0, 0, 0].tolist() == [2.0, 1.0] and extra.shape == (2, 1, 2, 2)
    with pytest.raises(ConfigError, match="class-conditional"):
        net(torch.zeros(2, 1, 2, 2), torch.tensor(1.0))


@pytest.mark.parametrize("kwargs,match", [
    (dict(prediction="noise"), "unknown prediction"),
    (dict(parameterization="subvp"), "unknown parameterization"),
    (dict(prediction="v", parameterization="ve", time="sigma"), "v-prediction"),
    (dict(time="index"), "needs a discrete grid"),
    (dict(time="sigma", sigmas=torch.tensor([1.0, 0.5])), "increasing"),
])
def test_validation(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        PredictionDenoiser(torch.nn.Identity(), **kwargs)
