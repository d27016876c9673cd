"""The original discrete samplers (DDPM ancestral, DDIM) and respacing, against guided-diffusion (fixture B12).

ddpm and ddim are solvers of the one sampling loop; with the vp scaling its state is the original's x_t.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edm_toolkit.adapters.openai import load_openai_checkpoint, load_openai_classifier
from edm_toolkit.discrete import space_timesteps
from edm_toolkit.errors import ConfigError
from edm_toolkit.precond import EDMPrecond, IDDPMPrecond
from edm_toolkit.rng import SeedGenerators
from edm_toolkit.sampling import Sampler
from edm_toolkit.solvers import SOLVERS
from edm_toolkit.solvers.discrete import DDIM, DDPM

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread (conftest)

from gd_fixture_flags import CLASSIFIER_FLAGS, MODEL_FLAGS, NUM_CLASSES  # noqa: E402

# The fixture's runs as solvers; a run whose name says "guided" adds the classifier at scale 1.
RUNS = {
    "ddim_eta0_ddim5": DDIM(respacing="ddim5"),
    "ddim_eta0.5_ddim5": DDIM(respacing="ddim5", eta=0.5),
    "p_sample_10": DDPM(respacing="10"),
    "ddim_eta0_ddim5_classifier_guided": DDIM(respacing="ddim5"),
    "extra_p_sample_10_classifier_guided": DDPM(respacing="10"),
    "extra_ddim_eta0_ddim5_noclip": DDIM(respacing="ddim5", clip_denoised=False),
}


def sampler(solver, **options) -> Sampler:
    """The solver in the sampling loop, its state in the original's VP space (x_t)."""
    return Sampler(solver=solver, scaling="vp", **options)


@pytest.fixture(scope="module")
def sampling(load_fixture):
    return load_fixture("gd_sampling")


@pytest.fixture(scope="module")
def net(load_fixture):
    return load_openai_checkpoint(load_fixture("gd_unet_legacy").state_dict, model_flags=MODEL_FLAGS)


@pytest.fixture(scope="module")
def classifier(load_fixture):
    return load_openai_classifier(load_fixture("gd_classifier_attention").state_dict, model_flags=CLASSIFIER_FLAGS)


def stored_noise(step_noise: torch.Tensor):
    """The fixture's patched torch.randn_like: the k-th call returns step_noise[k]; counts its calls."""
    def randn_like(x):
        randn_like.calls += 1
        return step_noise[randn_like.calls - 1].to(x.dtype)

    randn_like.calls = 0
    return randn_like


@contextmanager
def recorded_timesteps(module: nn.Module):
    """The timesteps ``module`` receives as its second argument, one entry per call."""
    seen: list[torch.Tensor] = []
    handle = module.register_forward_pre_hook(lambda _, args: seen.append(args[1].detach().clone()))
    try:
        yield seen
    finally:
        handle.remove()


# ---- respacing


def test_space_timesteps_match_the_original(sampling):
    pairs = sampling.outputs["space_timesteps"]
    assert len(pairs) == 9
    for key, expected in pairs.items():
        steps, counts = key.split("|")
        assert space_timesteps(int(steps), counts) == expected.tolist(), key


def test_respaced_chain_is_the_spaced_diffusion(sampling, net):
    for respacing, expected in sampling.outputs["spaced_diffusions"].items():
        plan = sampler(DDPM(respacing=respacing)).plan(net)
        records = [step.record for step in reversed(plan.steps)]  # the chain's order: original index ascending
        timesteps = torch.tensor([r.t_index for r in records])
        assert torch.equal(timesteps, expected["timestep_map"])
        assert torch.equal(timesteps, expected["use_timesteps_sorted"])
        assert torch.equal(net.step_grid.index(plan.sigma_steps[:-1]).flip(0), expected["timestep_map"])
        betas = torch.tensor([r.log_beta for r in records], dtype=torch.float64).exp()
        torch.testing.assert_close(betas, expected["betas"], rtol=1e-12, atol=0)
        abar = torch.tensor([r.sqrt_abar for r in records], dtype=torch.float64) ** 2
        torch.testing.assert_close(abar, expected["alphas_cumprod"], rtol=1e-12, atol=0)
        assert plan.nfe == len(expected["timestep_map"]) and net.step_grid.num_timesteps == 1000


def test_respacing_forms_and_edge_cases():
    assert space_timesteps(7, "") == list(range(7))  # create_gaussian_diffusion's '' keeps every step
    assert space_timesteps(300, [10, 15, 20]) == space_timesteps(300, "10,15,20")
    assert space_timesteps(1000, "ddim1000") == list(range(1000))
    assert space_timesteps(10, "1") == [0]
    assert space_timesteps(10, "0,5") == [5, 6, 7, 8, 9]  # an empty section, as the original allows
    assert space_timesteps(10, "3,3,3") == [0, 2, 3, 4, 5, 6, 7, 8, 9]  # sections of 4, 3 and 3 steps
    assert space_timesteps(6, "3") == [0, 2, 5]  # round(2.5) = 2: half to even
    assert DDIM(respacing="ddim25").evaluations(18) == 25 and DDPM(respacing="10,15").evaluations(18) == 25
    assert Sampler(solver=DDPM(respacing="4,4"), num_steps=18).nfe == 8
    assert DDPM().evaluations(18) == 18  # no respacing: num_steps even steps (the original's "N")


@pytest.mark.parametrize("steps,counts,match", [
    (1000, "ddim1", "integer stride"),
    (1000, "ddim0", "bad respacing"),
    (1000, "ddimx", "bad respacing"),
    (1000, "10,,5", "bad respacing"),
    (1000, "-3", ">= 0"),
    (1000, "0,0", "at least one step"),
    (1000, [2.5], "integers"),
    (10, "11", "section of 10"),
    (10, "3,6", "section of 5"),
    (0, "1", "positive integer"),
])
def test_respacing_errors(steps, counts, match):
    with pytest.raises(ConfigError, match=match):
        space_timesteps(steps, counts)


@pytest.mark.parametrize("options,match", [
    ({"name": "plms"}, "unknown solver"),
    ({"name": "ddpm", "variance": "medium"}, "unknown variance"),
    ({"name": "ddim", "eta": -1.0}, "eta"),
    ({"name": "ddpm", "eta": 0.5}, "unknown option 'eta'"),
    ({"name": "ddim", "variance": "small"}, "unknown option 'variance'"),
    ({"name": "ddpm", "respacing": "ddim"}, "bad respacing"),
    ({"name": "ddim", "clip_denoised": 1}, "clip_denoised"),
])
def test_sampler_option_errors(options, match):
    with pytest.raises(ConfigError, match=match):
        SOLVERS.create(options)


def test_grid_solvers_take_no_discretization():
    for options in ({"discretization": "edm"}, {"sigma_min": 0.1}, {"sigma_max": 10.0}):
        with pytest.raises(ConfigError, match="own step grid"):
            Sampler(solver="ddim", **options)
    assert Sampler(solver="ddim").discretization is None and Sampler().discretization.name == "edm"
    with pytest.raises(ConfigError, match="cannot take stochastic churn"):
        Sampler(solver="ddpm", churn={"S_churn": 10})


# ---- the original's runs


@pytest.mark.parametrize("run", list(RUNS))
def test_reproduces_guided_diffusion(run, sampling, net, classifier):
    expected, meta = sampling.outputs["runs"][run], sampling.meta["runs"][run]
    guided = "guided" in run
    randn_like = stored_noise(sampling.inputs["step_noise"])
    steps = []
    solver = dataclasses.replace(RUNS[run], classifier=classifier if guided else None)
    with recorded_timesteps(net.model) as network_t, recorded_timesteps(classifier.model) as classifier_t:
        x = sampler(solver)(net, sampling.inputs["x_T"], F.one_hot(sampling.inputs["y"], NUM_CLASSES).float(),
                            randn_like=randn_like, callback=steps.append)
    tol = dict(rtol=sampling.meta["tolerance"]["rtol"], atol=sampling.meta["tolerance"]["atol"], check_dtype=False)
    torch.testing.assert_close(x, expected["sample"], **tol)
    torch.testing.assert_close(torch.stack([s.x for s in steps]), expected["per_step_sample"], **tol)
    torch.testing.assert_close(steps[0].x, expected["per_step_sample"][0], rtol=1e-4, atol=1e-4, check_dtype=False)
    if "per_step_pred_xstart" in expected:
        torch.testing.assert_close(torch.stack([s.denoised for s in steps]), expected["per_step_pred_xstart"], **tol)
    assert torch.equal(torch.stack(network_t), expected["network_timesteps"])
    if guided:
        assert torch.equal(torch.stack(classifier_t), expected["classifier_timesteps"])
    else:
        assert not classifier_t
    assert randn_like.calls == meta["num_randn_like_calls"] == len(steps)
    assert [int(net.step_grid.index(torch.tensor(s.sigma_hat))) for s in steps] == expected["network_timesteps"][:, 0].tolist()
    assert [s.nfe for s in steps] == list(range(1, len(steps) + 1)) and steps[-1].sigma == 0.0


def test_variance_choices(sampling, net):
    """'auto' is the model's own choice (learned range here); fixed small, fixed large and learned all differ."""
    assert DDPM().variance_of(net.step_grid) == "learned"
    assert DDPM().variance_of(IDDPMPrecond(_Identity(), label_dim=0).step_grid) == "small"
    x_T, labels = sampling.inputs["x_T"][:1], F.one_hot(sampling.inputs["y"][:1], NUM_CLASSES).float()
    noise = sampling.inputs["step_noise"][:2, :1]
    results = [sampler(DDPM(respacing="2", variance=variance))(net, x_T, labels, randn_like=stored_noise(noise))
               for variance in ("learned", "small", "large")]
    assert all(not torch.allclose(a, b) for i, a in enumerate(results) for b in results[i + 1:])


# ---- seeds, other denoisers, errors


def test_images_depend_only_on_their_seed(net):
    ddpm = sampler(DDPM(respacing="2", variance="large"))
    labels = torch.eye(NUM_CLASSES)[[2, 5, 7]]

    def run(seeds, rows):
        rnd = SeedGenerators(seeds)
        return ddpm(net, rnd.randn([len(seeds), 3, 16, 16]), labels[rows], randn_like=rnd.randn_like)

    together, alone = run([11, 12, 13], [0, 1, 2]), run([12], [1])
    torch.testing.assert_close(together[1:2], alone, rtol=1e-5, atol=1e-5)


class _Identity(nn.Module):
    """A backbone with F = 0, so that D(x; sigma) = x under iDDPM preconditioning; records c_noise."""

    def __init__(self):
        super().__init__()
        self.noise_labels = []

    def forward(self, x, noise_labels, class_labels=None):
        self.noise_labels.append(noise_labels.clone())
        return torch.zeros_like(x)


def test_edm_iddpm_precond_runs_on_its_own_grid():
    net = IDDPMPrecond(_Identity(), img_resolution=4, img_channels=1, label_dim=0)
    abar = net.step_grid.alphas_cumprod
    assert len(abar) == 1000
    torch.testing.assert_close(abar, 1 / (1 + net.u[:1000].flip(0).double() ** 2))
    x_T = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    x = sampler(DDIM(respacing="ddim5", clip_denoised=False))(net, x_T, randn_like=torch.randn_like)
    # The network sees the original step indices; D = x makes DDIM carry x_t/sqrt(abar) down to x_0.
    assert [int(c) for c in net.model.noise_labels] == [800, 600, 400, 200, 0]
    torch.testing.assert_close(x, x_T.double() / abar[800].sqrt(), rtol=1e-5, atol=1e-5)


def test_errors_name_the_fix(net, classifier):
    x = torch.zeros(1, 3, 16, 16)
    identity = IDDPMPrecond(_Identity(), img_resolution=16, img_channels=3, label_dim=0)
    with pytest.raises(ConfigError, match="no discrete step grid"):
        sampler(DDPM()).plan(EDMPrecond(img_resolution=16, img_channels=3))
    with pytest.raises(ConfigError, match="learn_sigma"):
        sampler(DDPM(variance="learned"))(identity, x, randn_like=torch.randn_like)
    with pytest.raises(ConfigError, match="class labels"):
        sampler(DDPM(respacing="2"))(net, x, randn_like=torch.randn_like)
    with pytest.raises(ConfigError, match="class labels"):
        sampler(DDPM(respacing="2", classifier=classifier))(identity, x, randn_like=torch.randn_like)
    short = load_openai_checkpoint(net.model.state_dict(), model_flags=MODEL_FLAGS + " --diffusion_steps 500")
    with pytest.raises(ConfigError, match="1000"):
        sampler(DDPM(respacing="2", classifier=classifier))(short, x, torch.eye(NUM_CLASSES)[:1],
                                                            randn_like=torch.randn_like)
