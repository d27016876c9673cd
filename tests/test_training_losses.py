"""The loss interface the training loop uses (edm_toolkit.losses.TrainingLoss), for every registered loss: the
split draw (variates per image, noise levels at step time), the declared terms, the weights, the state."""

from __future__ import annotations

import pytest
import torch

from edm_toolkit.errors import ConfigError
from edm_toolkit.losses import LOSSES, total_of
from edm_toolkit.training.architectures import build_openai_denoiser, openai_flags

pytestmark = pytest.mark.usefixtures("one_thread")

FLAGS = "--num_channels 32 --num_res_blocks 1 --channel_mult 1 --attention_resolutions 1 --num_heads 1"


def model_for(loss):
    """A tiny improved-diffusion model on 20 cosine steps (learned variance where the loss trains one) for the
    grid losses; EDM's losses take any denoiser, here the same kind of network."""
    learned = loss.name in ("iddpm-hybrid", "iddpm-kl")
    flags = openai_flags("iddpm", FLAGS + (" --learn_sigma True" if learned else ""), resolution=8, cond=False,
                         diffusion_steps=20, noise_schedule="cosine")
    torch.manual_seed(0)
    net = build_openai_denoiser("iddpm", flags, channels=1, label_dim=0)
    with torch.no_grad():  # a non-zero output layer, so that D and v depend on the input
        for p in net.model.out.parameters():
            p.normal_(0, 0.05)
    return net


@pytest.mark.parametrize("name", LOSSES.names())
def test_every_loss_draws_and_evaluates_through_one_interface(name):
    loss = LOSSES.create(name)
    net = model_for(loss)
    draws = loss.draw_variates(6, torch.Generator().manual_seed(1))
    assert draws.shape == (6, 1, 1, 1)
    sigma, weight = loss.noise_levels(net, draws)
    again = loss.draw(net, 6, torch.Generator().manual_seed(1))
    assert torch.equal(sigma, again[0]) and torch.equal(weight, again[1])
    assert sigma.dtype == weight.dtype == torch.float32 and sigma.shape == weight.shape == (6, 1, 1, 1)
    if loss.draws_on_model_grid:  # the levels are the grid's, weighted 1/(T p_t) = 1 under uniform steps
        assert bool(torch.isin(sigma.double().flatten(), net.step_grid.sigmas.float().double()).all())
    assert torch.equal(weight, torch.ones_like(weight))

    y = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(2)) * 2 - 1
    n = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)) * sigma
    with torch.no_grad():
        terms = loss.element_terms(net, y, sigma, n)
        assert tuple(terms) == loss.term_names and all(t.shape == y.shape for t in terms.values())
        assert torch.equal(loss.loss(net, y, sigma, n), total_of(terms))
    state = loss.state_dict()
    loss.load_state_dict(state)
    if not loss.draws_on_model_grid:
        assert state == {}
        with pytest.raises(ConfigError, match="keeps no state"):
            loss.load_state_dict({"loss_history": torch.zeros(1)})


def test_noise_levels_follow_the_schedule_samplers_state():
    """The same variates give other steps and weights once loss-second-moment is warmed up: the draw's random part
    is the image's, its distribution the sampler's at step time."""
    loss = LOSSES.create({"name": "iddpm-simple", "schedule_sampler": "loss-second-moment"})
    net = model_for(loss)
    variates = loss.draw_variates(64, torch.Generator().manual_seed(4))
    before = loss.noise_levels(net, variates)
    grid = net.step_grid
    for t in range(grid.num_timesteps):  # 10 losses per step, growing with t
        sigma = grid.sigmas[t].float().expand(10).reshape(-1, 1, 1, 1)
        loss.observe(net, sigma, torch.full([10, 1], float(t + 1)))
    sigma, weight = loss.noise_levels(net, variates)
    assert not torch.equal(sigma, before[0]) and not torch.equal(weight, before[1])
    assert float(sigma.mean()) > float(before[0].mean())  # p_t grows with sqrt(E[L_t^2])
    t = grid.index(sigma.flatten().double())
    p = loss.step_sampler(grid).probabilities()
    torch.testing.assert_close(weight.flatten(), (1 / (grid.num_timesteps * p[t])).float())
