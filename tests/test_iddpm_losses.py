"""iDDPM's training losses on the model's own grid and the loss-second-moment schedule sampler, against
improved-diffusion's training_losses and LossSecondMomentResampler (fixture E19 id_losses)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edm_toolkit.adapters.generic import PredictionDenoiser
from edm_toolkit.adapters.openai import load_openai_checkpoint
from edm_toolkit.discrete import StepGrid, named_beta_schedule
from edm_toolkit.errors import ConfigError
from edm_toolkit.ideal import IdealDenoiser
from edm_toolkit.losses import LOSSES, STEP_SAMPLERS, LossSecondMomentSampler

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread (conftest)

FLAGS = "--image_size 8 --num_heads 4 --noise_schedule cosine --diffusion_steps 100 --rescale_timesteps True"
# Fixture case -> (loss, options, extra flags): the original's flag combinations as the toolkit's losses.
CASES = {
    "a_hybrid": ("iddpm-hybrid", {}, ""),  # learn_sigma, rescale_learned_sigmas (RESCALED_MSE)
    "b_mse_unrescaled_vb": ("iddpm-hybrid", {"rescale_learned_sigmas": False}, ""),  # MSE
    "c_kl": ("iddpm-kl", {}, ""),  # use_kl (RESCALED_KL)
    "d_fixed_small": ("iddpm-simple", {}, " --learn_sigma False --sigma_small True"),
}
NUM_CLASSES = 4


@pytest.fixture(scope="module")
def fixture(load_fixture):
    return load_fixture("id_losses")


def fixture_network(load_fixture, case):
    """The fixture's UNet (id_unet_rescaled's weights with this fixture's class embedding) as a denoiser."""
    sd = dict(load_fixture("id_unet_rescaled").state_dict)
    sd["label_emb.weight"] = load_fixture("id_losses").state_dict["label_emb.weight"]
    if case == "d_fixed_small":
        sd["out.2.weight"], sd["out.2.bias"] = sd["out.2.weight"][:3], sd["out.2.bias"][:3]
    return load_openai_checkpoint(sd, codebase="improved", model_flags=FLAGS + CASES[case][2])


def record_output(net, substitute: torch.Tensor | None = None) -> dict:
    """Records the network's raw output and timesteps; the output (or ``substitute``, the original's recorded
    output) goes on as a leaf that keeps its gradient."""
    seen = {}

    def hook(module, args, out):
        seen.update(network_output=out.detach(), timesteps=args[1])
        leaf = (out if substitute is None else substitute).detach().clone().requires_grad_()
        leaf.retain_grad()
        seen["leaf"] = leaf
        return leaf

    net.model.register_forward_hook(hook)
    return seen


@pytest.mark.parametrize("case", list(CASES))
def test_terms_match_training_losses(case, fixture, load_fixture):
    name, options, _ = CASES[case]
    inputs, expected = fixture.inputs, fixture.outputs[case]
    tol = fixture.meta["tolerance"]["loss, mse, vb, d_loss_sum_d_network_output"]
    labels = F.one_hot(inputs["y"], NUM_CLASSES).float()
    loss = LOSSES.create({"name": name, **options})
    net = fixture_network(load_fixture, case)
    seen = record_output(net)
    terms = loss.terms(net, inputs["x_start"], inputs["t"], inputs["noise"], labels)
    assert sorted(terms) == sorted(fixture.meta["diffusion_types"][case]["terms"])
    assert torch.equal(seen["timesteps"], expected["network_timesteps"])  # t * 1000/T, as the original's
    torch.testing.assert_close(seen["network_output"], expected["network_output"],
                               **fixture.meta["tolerance"]["network_output, x_t"])
    for key, value in terms.items():  # t = 0 (decoder NLL), 17, 63 and T - 1 = 99
        torch.testing.assert_close(value.detach(), expected[key], **tol, msg=f"{case} {key}")


@pytest.mark.parametrize("case", list(CASES))
def test_gradients_match_training_losses(case, fixture, load_fixture):
    """The loss's gradient w.r.t. the network output, given the original's own output: at t = T-1 (sigma = 2029)
    a network difference of 1e-6 moves D by 2e-3, so the comparison feeds the loss the recorded output. The eps
    channels get the mse gradient only (the stop-gradient of the hybrid loss)."""
    name, options, _ = CASES[case]
    inputs, expected = fixture.inputs, fixture.outputs[case]
    tol = fixture.meta["tolerance"]["loss, mse, vb, d_loss_sum_d_network_output"]
    net = fixture_network(load_fixture, case)
    seen = record_output(net, substitute=expected["network_output"])
    loss = LOSSES.create({"name": name, **options})
    terms = loss.terms(net, inputs["x_start"], inputs["t"], inputs["noise"], F.one_hot(inputs["y"], NUM_CLASSES).float())
    terms["loss"].sum().backward()
    for key, value in terms.items():
        torch.testing.assert_close(value.detach(), expected[key], **tol, msg=f"{case} {key}")
    torch.testing.assert_close(seen["leaf"].grad, expected["d_loss_sum_d_network_output"], **tol)


def test_per_element_losses_sum_to_the_per_sample_loss(fixture, load_fixture):
    """loss() spreads each sample's loss over its elements: their sum over a sample is terms()['loss']."""
    net = fixture_network(load_fixture, "a_hybrid")
    loss = LOSSES.create("iddpm-hybrid")
    x0, t, noise = fixture.inputs["x_start"], fixture.inputs["t"], fixture.inputs["noise"]
    labels = F.one_hot(fixture.inputs["y"], NUM_CLASSES).float()
    sigma = net.step_grid.sigmas[t].float().reshape(-1, 1, 1, 1)
    elements = loss.loss(net, x0, sigma, noise * sigma, labels)
    assert elements.shape == x0.shape
    torch.testing.assert_close(elements.flatten(1).sum(1), fixture.outputs["a_hybrid"]["loss"], rtol=1e-5, atol=1e-5)


def test_loss_second_moment_sampler_matches_the_original(fixture):
    inputs, expected = fixture.inputs["resampler"], fixture.outputs["loss_second_moment_resampler"]
    sampler = LossSecondMomentSampler(100)
    warmup = inputs["n_updates_before_first_weights"]
    sampler.update(inputs["ts"][:warmup], inputs["losses"][:warmup])
    assert not sampler.warmed_up and torch.equal(sampler.weights(), expected["weights_before_warmup"])
    sampler.update(inputs["ts"][warmup:], inputs["losses"][warmup:])
    assert sampler.warmed_up
    torch.testing.assert_close(sampler.weights(), expected["weights"], rtol=1e-12, atol=0)
    assert torch.equal(sampler.loss_history, expected["loss_history"])
    assert torch.equal(sampler.loss_counts, expected["loss_counts"])
    weights = sampler.loss_weights(inputs["t_given"])
    assert torch.equal(inputs["t_given"], expected["sample_given_t"])
    torch.testing.assert_close(weights, expected["sample_weights_given_t"], rtol=1e-6, atol=0)
    # np.random.seed(1234); sample(8): numpy's choice is the inverse CDF at its uniform draws.
    u = torch.from_numpy(np.random.RandomState(expected["sample_np_seed"]).random_sample(8))
    t, weights = sampler.steps_of(u)
    assert torch.equal(t, expected["sample_np_indices"])
    torch.testing.assert_close(weights, expected["sample_np_weights"], rtol=1e-6, atol=0)


# ---- the loss in a training loop, on a tiny model


class TinyEpsNet(nn.Module):
    """A 1x1 convolution predicting [eps, v] (or eps), conditioned on nothing: enough for the loss's plumbing."""

    def __init__(self, learned: bool):
        super().__init__()
        self.conv = nn.Conv2d(3, 6 if learned else 3, 1)

    def forward(self, x, t, **kwargs):
        return self.conv(x)


def tiny_denoiser(learned: bool, T: int = 4) -> PredictionDenoiser:
    torch.manual_seed(0)
    grid = StepGrid.from_betas(named_beta_schedule("cosine", T))
    return PredictionDenoiser(TinyEpsNet(learned), sigmas=grid.sigmas, variance="learned" if learned else "small")


def test_call_draws_on_the_grid_and_learns_the_second_moment():
    net, T, batch = tiny_denoiser(True), 4, 8
    loss = LOSSES.create({"name": "iddpm-hybrid", "schedule_sampler": "loss-second-moment"})
    images = torch.rand([batch, 3, 4, 4]) * 2 - 1
    generator = torch.Generator().manual_seed(1)
    for _ in range(12):  # enough draws for every step to hold 10 losses
        per_element = loss(net, images, generator=generator)
        assert per_element.shape == images.shape
    sampler = loss.step_sampler(net.step_grid)
    assert sampler.warmed_up and int(sampler.loss_counts.sum()) == 10 * T
    # Weights are 1/(T p_t): with the sampler's state restored in a fresh loss, the same draw gives the same values.
    state = loss.state_dict()
    restored = LOSSES.create({"name": "iddpm-hybrid", "schedule_sampler": "loss-second-moment"})
    restored.load_state_dict({k: v.clone() for k, v in state.items()})
    a = loss(net, images, generator=torch.Generator().manual_seed(5))
    b = restored(net, images, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    sigma, weight = restored.draw(net, 256, torch.Generator().manual_seed(2))
    t = net.step_grid.index(sigma.reshape(-1).double())
    p = restored.step_sampler(net.step_grid).probabilities()
    torch.testing.assert_close(weight.reshape(-1), (1 / (T * p[t])).float())
    assert not torch.allclose(p, torch.full_like(p, 1 / T))  # importance sampling is on


def test_uniform_sampler_weights_are_one_and_the_state_survives_torch_save(tmp_path):
    net = tiny_denoiser(False)
    loss = LOSSES.create("iddpm-simple")
    sigma, weight = loss.draw(net, 64, torch.Generator().manual_seed(0))
    assert torch.equal(weight, torch.ones_like(weight))
    assert set(net.step_grid.index(sigma.reshape(-1).double()).tolist()) == {0, 1, 2, 3}
    sampler = LOSSES.create({"name": "iddpm-kl", "schedule_sampler": "loss-second-moment"})
    sampler(net, torch.zeros([4, 3, 2, 2]))
    torch.save(sampler.state_dict(), tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    fresh = LOSSES.create({"name": "iddpm-kl", "schedule_sampler": "loss-second-moment"})
    fresh.load_state_dict(state)
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in sampler.state_dict().items())


def test_bad_input_gets_one_line_errors():
    with pytest.raises(ConfigError, match="trains a learned variance but the model predicts none; use a backbone with learned variance"):
        LOSSES.create("iddpm-hybrid").draw(tiny_denoiser(False), 2)
    with pytest.raises(ConfigError, match="untrained; use loss iddpm-hybrid"):
        LOSSES.create("iddpm-simple").draw(tiny_denoiser(True), 2)
    with pytest.raises(ConfigError, match="has none .*continuous loss"):
        LOSSES.create("iddpm-kl")(IdealDenoiser(torch.zeros(1, 3, 2, 2)), torch.zeros(2, 3, 2, 2))
    with pytest.raises(ConfigError, match="unknown schedule sampler 'importance'; choose one of: uniform, loss-second"):
        LOSSES.create({"name": "iddpm-hybrid", "schedule_sampler": "importance"})
    with pytest.raises(ConfigError, match="unknown option 'predict_xstart'"):
        LOSSES.create({"name": "iddpm-kl", "predict_xstart": True})
    with pytest.raises(ConfigError, match="holds 4 steps but the model's grid has 8"):
        loss = LOSSES.create("iddpm-hybrid")
        loss.draw(tiny_denoiser(True, T=4), 2)
        loss.draw(tiny_denoiser(True, T=8), 2)
    with pytest.raises(ConfigError, match="resume with the schedule sampler"):
        LOSSES.create({"name": "iddpm-hybrid", "schedule_sampler": "loss-second-moment"}).load_state_dict(
            {"num_timesteps": torch.tensor(4), "loss_history": torch.zeros(3, 10, dtype=torch.float64)})
    uniform = LOSSES.create("iddpm-hybrid")
    with pytest.raises(ConfigError, match="holds 'loss_counts', which the uniform sampler does not keep"):
        uniform.load_state_dict(LossSecondMomentSampler(4).state_dict())
    assert STEP_SAMPLERS.names() == ["uniform", "loss-second-moment"]


def _update_in_process(rank, init_file, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        rows = {0: ([0, 1, 1], [1.0, 2.0, 3.0]), 1: ([3, 0], [4.0, 5.0])}[rank]  # unequal batches
        sampler = LossSecondMomentSampler(4)
        sampler.update(torch.tensor(rows[0]), torch.tensor(rows[1], dtype=torch.float32))
        torch.save(sampler.state_dict(), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes: about 12 s on two cores
def test_second_moment_state_is_the_same_on_every_process(tmp_path):
    """Under torch.distributed every process records every process's losses, in rank order (the original's
    update_with_local_losses), so that all draw from the same p_t."""
    import torch.multiprocessing as mp

    mp.spawn(_update_in_process, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    states = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    expected = LossSecondMomentSampler(4)
    expected.update(torch.tensor([0, 1, 1, 3, 0]), torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]))
    for state in states:
        assert all(torch.equal(state[k], v) for k, v in expected.state_dict().items())
