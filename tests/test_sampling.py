"""The sampling loop: convergence orders against the exact ODE, honest NFE counts, churn determinism."""

import functools
import itertools
import math

import numpy as np
import pytest
import torch

from edm_toolkit.errors import ConfigError
from edm_toolkit.generate import sample_batch
from edm_toolkit.ideal import IdealDenoiser, solve_pf_ode
from edm_toolkit.protocol import DenoiserWrapper
from edm_toolkit.sampling import Churn, Sampler

_gen = torch.Generator().manual_seed(0)
DATA = torch.randn(6, 1, 2, 2, generator=_gen, dtype=torch.float64) * 0.5
LATENTS = torch.randn(3, 1, 2, 2, generator=_gen, dtype=torch.float64)
NET = IdealDenoiser(DATA, width=0.3)  # a smooth Gaussian mixture: every ODE solution is smooth


@functools.lru_cache(maxsize=None)
def exact(sigma_start: float, sigma_end: float) -> torch.Tensor:
    """x/s at sigma_end on the exact PF-ODE trajectory from the latents (one solve serves every schedule and
    scaling: they share the trajectory of x/s, EDM Eq. 4)."""
    return solve_pf_ode(NET, LATENTS * sigma_start, sigma_start, sigma_end)


def error_at_last_nonzero_step(sampler: Sampler) -> float:
    """Max error of x at t_{N-1} (before the final step to sigma = 0, which maps exact and numerical alike)."""
    plan = sampler.plan(NET)
    N = sampler.num_steps
    states = {}
    sampler(NET, LATENTS, callback=lambda info: states.__setitem__(info.step, info.x), plan=plan)
    sigma_start, sigma_end = float(plan.sigma_steps[0]), float(plan.sigma_steps[N - 1])
    s_end = 1 / math.sqrt(1 + sigma_end**2) if sampler.scaling.name == "vp" else 1.0
    return float((states[N - 1] - s_end * exact(sigma_start, sigma_end)).abs().max())


def observed_order(sampler: Sampler, steps) -> float:
    """Least-squares slope of -log2(error) against log2(N) as N doubles."""
    errors = [error_at_last_nonzero_step(sampler.replace(num_steps=n)) for n in steps]
    return -np.polyfit(np.log2(steps), np.log2(errors), 1)[0]


COMBOS = list(itertools.product(["edm", "vp", "ve", "iddpm", "logsnr"], ["vp", "ve", "linear"], ["vp", "none"]))


@pytest.mark.parametrize("disc,schedule,scaling", COMBOS)
def test_euler_is_first_order(disc, schedule, scaling):
    sampler = Sampler(solver="euler", discretization=disc, schedule=schedule, scaling=scaling)
    assert 0.7 < observed_order(sampler, [32, 64, 128]) < 1.35


@pytest.mark.parametrize("disc,schedule,scaling", COMBOS)
def test_heun_is_second_order(disc, schedule, scaling):
    sampler = Sampler(solver="heun", discretization=disc, schedule=schedule, scaling=scaling)
    assert 1.7 < observed_order(sampler, [16, 32, 64]) < 2.7


@pytest.mark.parametrize("alpha", [0.5, 0.8])
def test_generalised_second_order_solver(alpha):
    sampler = Sampler(solver={"name": "heun", "alpha": alpha})
    assert 1.7 < observed_order(sampler, [16, 32, 64]) < 2.7


def test_reference_solution_is_exact_for_a_single_gaussian():
    """One data point y with width s: x/s-trajectory is x(sigma) = y + (x0 - y) sqrt((s^2+sigma^2)/(s^2+sigma0^2))."""
    y = torch.randn(1, 1, 2, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    net = IdealDenoiser(y, width=0.4)
    x0 = LATENTS * 80.0
    got = solve_pf_ode(net, x0, 80.0, 0.002)
    expected = y + (x0 - y) * math.sqrt((0.4**2 + 0.002**2) / (0.4**2 + 80.0**2))
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-10)


class Counting(DenoiserWrapper):
    def __init__(self, net):
        super().__init__(net)
        self.calls = 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.denoiser(*args, **kwargs)


@pytest.mark.parametrize("solver,steps,nfe", [("heun", 18, 35), ("heun", 2, 3), ("euler", 18, 18)])
def test_evaluations_are_counted_honestly(solver, steps, nfe):
    sampler = Sampler(solver=solver, num_steps=steps)
    net, reported = Counting(NET), []
    sampler(net, LATENTS, callback=lambda info: reported.append(info.nfe))
    assert net.calls == nfe == sampler.nfe == reported[-1]
    assert len(reported) == steps


def test_sampler_is_float64_and_casts_network_output():
    class Float32Net(Counting):
        def forward(self, x, sigma, labels=None):
            assert x.dtype == torch.float64 and sigma.dtype == torch.float64 and sigma.ndim == 0
            return super().forward(x, sigma).to(torch.float32)

    out = Sampler(num_steps=4)(Float32Net(NET), LATENTS.float())
    assert out.dtype == torch.float64


def test_churn_uses_only_the_given_noise_and_is_deterministic_per_seed():
    sampler = Sampler(num_steps=8, churn=Churn(S_churn=40, S_min=0.05, S_max=50, S_noise=1.003))
    net = IdealDenoiser(torch.randn(5, 3, 4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64))
    net.img_resolution = 4
    a = sample_batch(net, sampler, [0, 1, 2, 3], "cpu")
    b = sample_batch(net, sampler, [0, 1, 2, 3], "cpu")
    assert torch.equal(a, b)
    # The same seeds in other batch compositions give bit-identical images.
    c = torch.cat([sample_batch(net, sampler, [s], "cpu") for s in range(4)])
    d = torch.cat([sample_batch(net, sampler, [0, 1, 2], "cpu"), sample_batch(net, sampler, [3], "cpu")])
    assert torch.equal(a, c) and torch.equal(a, d)
    # Churn really injects noise: without it the result differs.
    assert not torch.equal(a, sample_batch(net, sampler.replace(churn=Churn()), [0, 1, 2, 3], "cpu"))


def test_churn_draws_noise_once_per_step_until_its_last_active_step():
    calls = []
    sampler = Sampler(num_steps=10, churn=Churn(S_churn=40, S_min=1.0, S_max=50))
    plan = sampler.plan(NET)
    last_active = max(i for i, s in enumerate(plan.sigma_steps[:-1].tolist()) if 1.0 <= s <= 50)
    sampler(NET, LATENTS, randn_like=lambda x: calls.append(1) or torch.zeros_like(x), plan=plan)
    assert len(calls) == last_active + 1  # EDM draws every step; draws after the last churn step are unused
    calls.clear()
    Sampler(num_steps=10)(NET, LATENTS, randn_like=lambda x: calls.append(1) or torch.zeros_like(x))
    assert calls == []


def test_sigma_range_is_clamped_to_the_network():
    class Narrow(Counting):
        sigma_min, sigma_max = 0.01, 20.0

    net = Narrow(NET)
    net.sigma_min, net.sigma_max = 0.01, 20.0
    plan = Sampler(num_steps=5).plan(net)
    assert float(plan.sigma_steps[0]) == pytest.approx(20.0) and float(plan.sigma_steps[-2]) == pytest.approx(0.01)
    with pytest.raises(ConfigError, match="empty noise range"):
        Sampler(sigma_min=30.0, sigma_max=40.0).plan(net)


@pytest.mark.parametrize("bad,match", [
    (dict(num_steps=1), "num_steps must be an integer >= 2"),
    (dict(sigma_min=-1.0), "sigma_min must be > 0"),
    (dict(sigma_min=5.0, sigma_max=1.0), "must be below sigma_max"),
    (dict(solver="rk4"), "unknown solver 'rk4'"),
    (dict(churn={"S_min": 2, "S_max": 1}), "need 0 <= S_min <= S_max"),
])
def test_sampler_validation(bad, match):
    with pytest.raises(ConfigError, match=match):
        Sampler(**bad)
